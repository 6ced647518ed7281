/*-------------------------------------------------------------------------
 *
 * topic.c
 *		MQTT topic rules, used by the publisher, the subscription filters,
 *		the parser of received topics and the mqtt_emit.subscriptions view.
 *
 * A row event goes to <prefix>/<model>/<operation>, or in the style of
 * prisma-extension-emitter 2.x to <prefix>/<model>/all, lower-cased.  The
 * model is one topic level: "/", "+", "#" and "%" in it are
 * percent-encoded, so a model name never adds levels or wildcards.  The
 * subscriber asks for <prefix>/<model>/# in the registered spelling and in
 * lower case (where the Node library publishes).  A received topic must be
 * <prefix>/<level>/<leaf>, the prefix compared without regard to case.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/topic.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"

#include "pg_mqtt_emit.h"
#include "topic.h"

PG_FUNCTION_INFO_V1(mqtt_emit_topic_filter);

/*
 * Lower-case ASCII letters in place (MQTT topics compare byte-wise; the
 * Node library lower-cases with JavaScript's toLowerCase, which for the
 * names we accept only matters for ASCII).
 */
void
me_ascii_lower(char *s, int len)
{
	int			i;

	for (i = 0; i < len; i++)
		s[i] = (char) pg_ascii_tolower((unsigned char) s[i]);
}

/*
 * Append a model name as one topic level, percent-encoding "/", "+", "#"
 * and "%"; with lower, in lower case.
 */
void
me_append_topic_model(StringInfo buf, const char *model, int len, bool lower)
{
	int			i;

	for (i = 0; i < len; i++)
	{
		char		c = model[i];

		switch (c)
		{
			case '/':
				appendBinaryStringInfo(buf, "%2F", 3);
				break;
			case '+':
				appendBinaryStringInfo(buf, "%2B", 3);
				break;
			case '#':
				appendBinaryStringInfo(buf, "%23", 3);
				break;
			case '%':
				appendBinaryStringInfo(buf, "%25", 3);
				break;
			default:
				if (lower)
					c = (char) pg_ascii_tolower((unsigned char) c);
				appendStringInfoChar(buf, c);
				break;
		}
	}
}

/*
 * Build the topic of a queued row event: <prefix>/<model>/<operation>, or
 * with all_style the Node library's <prefix>/<model>/all, all lower case.
 */
void
me_build_topic(StringInfo buf, const MqttEmitEventHeader *hdr,
			   const char *model, bool all_style)
{
	resetStringInfo(buf);
	if (all_style)
	{
		int			start = buf->len;

		appendStringInfoString(buf, mqtt_emit_topic_prefix);
		me_ascii_lower(buf->data + start, buf->len - start);
		appendStringInfoChar(buf, '/');
		me_append_topic_model(buf, model, hdr->model_len, true);
		appendBinaryStringInfo(buf, "/all", 4);
	}
	else
	{
		appendStringInfoString(buf, mqtt_emit_topic_prefix);
		appendStringInfoChar(buf, '/');
		me_append_topic_model(buf, model, hdr->model_len, false);
		appendStringInfoChar(buf, '/');
		appendStringInfoString(buf, me_op_name(hdr->op));
	}
}

/*
 * The topic a dead letter records: the explicit topic of an ad-hoc publish
 * or of a received message, else the first topic of the event in the
 * configured style.
 */
void
me_build_dead_letter_topic(StringInfo buf, const MqttEmitEventHeader *hdr,
						   const char *model)
{
	if (hdr->kind == ME_KIND_PUBLISH || hdr->kind == ME_KIND_REMOTE)
	{
		resetStringInfo(buf);
		appendBinaryStringInfo(buf, model, hdr->model_len);
	}
	else
		me_build_topic(buf, hdr, model, mqtt_emit_topic_style == ME_TOPIC_ALL);
}

/*
 * The subscription filter for a model's remote events:
 * <prefix>/<model>/#, with lower the whole filter in lower case.
 */
void
me_topic_filter(StringInfo buf, const char *model, bool lower)
{
	resetStringInfo(buf);
	appendStringInfo(buf, "%s/", mqtt_emit_topic_prefix);
	me_append_topic_model(buf, model, strlen(model), false);
	appendStringInfoString(buf, "/#");
	if (lower)
		me_ascii_lower(buf->data, buf->len);
}

/*
 * Check that a received topic is <prefix>/<model>/<leaf>, the prefix
 * compared without regard to case (the seed lower-cases whole topics), and
 * return the model level's start and length.
 */
bool
me_topic_split(const char *topic, int topic_len,
			   const char **model, int *model_len)
{
	int			plen = strlen(mqtt_emit_topic_prefix);
	const char *rest;
	const char *slash;

	if (topic_len <= plen + 1 ||
		pg_strncasecmp(topic, mqtt_emit_topic_prefix, plen) != 0 ||
		topic[plen] != '/')
		return false;
	rest = topic + plen + 1;
	slash = strchr(rest, '/');
	if (slash == NULL || slash == rest || slash[1] == '\0' ||
		strchr(slash + 1, '/') != NULL)
		return false;
	*model = rest;
	*model_len = slash - rest;
	return true;
}

/*
 * Does a received topic's model level name this model?  The level is the
 * model with "/", "+", "#", "%" encoded, compared without regard to case.
 */
bool
me_topic_model_matches(const char *level, int level_len, const char *model)
{
	StringInfoData enc;
	bool		r;

	initStringInfo(&enc);
	me_append_topic_model(&enc, model, strlen(model), false);
	r = (level_len == enc.len && pg_strncasecmp(level, enc.data, level_len) == 0);
	pfree(enc.data);
	return r;
}

/*
 * mqtt_emit._topic_filter(model text, lower boolean): the filter the worker
 * subscribes to for a model, for the mqtt_emit.subscriptions view.
 */
Datum
mqtt_emit_topic_filter(PG_FUNCTION_ARGS)
{
	StringInfoData buf;
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(0));

	initStringInfo(&buf);
	me_topic_filter(&buf, model, PG_GETARG_BOOL(1));
	PG_RETURN_TEXT_P(cstring_to_text_with_len(buf.data, buf.len));
}
