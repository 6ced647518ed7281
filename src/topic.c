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
 * A share group (listen() or subscribe() with share_group) subscribes
 * through the MQTT 5 shared subscription $share/<group>/<filter>: the
 * broker gives each matching message to one member of the group.  A
 * message that arrived that way is kept in the inbox (mqtt_emit.outbox)
 * with its delivery path in front of its topic, "$share/<group>/<filter>",
 * a newline, then the topic (me_inbox_model, me_inbox_split); the
 * listener worker runs only that path's listeners or handlers.  No
 * received topic starts with "$share/" (no filter a worker subscribes to
 * without a group can match one), so the two forms cannot be confused.
 * Each shared subscription carries a Subscription Identifier derived from
 * its filter (me_share_sub_id), the same in every process and after every
 * restart, so that messages the broker kept for this node's session tell
 * their path whichever worker takes them.
 *
 * Brokers that treat "." as a level separator: RabbitMQ's MQTT plugin
 * turns a topic into an AMQP routing key ("/" becomes ".", "+" becomes
 * "*") and back for its subscribers ("*" becomes "+", "." becomes "/").
 * An event of model "a.b" published to <prefix>/a.b/create is routed as
 * <prefix>.a.b.create and arrives as <prefix>/a/b/create; so does a
 * prefix with a ".".  The wire format stays as it is (other brokers and
 * peers see the topic as published); a receiver accepts, besides the
 * topic as published, its RabbitMQ form, when that is exactly what the
 * payload's model and operation give (me_topic_matches_mapped).  Names
 * without "." and "*" arrive unchanged everywhere.
 *
 * With watch(..., retain_last => true) a table also keeps one retained
 * message per row on <prefix>/<model>/state/<key> (capture.c).  The key
 * level is the text of each key column (payload.c, me_key_text) in UTF-8,
 * every byte other than A-Z, a-z, 0-9, "-", "_" and "~" percent-encoded
 * (%2F, %C3%A9: upper-case hex), the columns joined by ",".  So a key
 * never adds levels or wildcards, "$", "." (which RabbitMQ turns into a
 * level separator) and control characters never appear, the level is
 * ASCII (valid UTF-8 whatever the database encoding), and distinct keys
 * give distinct topics: "," and "%" only appear as the separator and as
 * escapes.  A received topic of that form is not an event: the subscriber
 * side ignores it (me_topic_is_state).
 *
 * Batched messages (watch(..., batch => true), pending.c) go to
 * <batch_topic_prefix>/<model>/batch, the model encoded as for events.
 * No subscriber of the events may receive them: the batch prefix must not
 * be the topic prefix, lie under it (<prefix>/# would match) or hold it
 * (the batches' <batch prefix>/# would match events), compared level by
 * level without regard to case, as the Node library's lower-cased topics
 * and the receiving side's prefix compare (me_batch_prefix_problem).
 * watch() and every captured change of a batched table check it.
 *
 * Whatever becomes part of a topic (model names, the topic prefix, the
 * topics of mqtt_emit.publish(), share group names) must follow MQTT's rules for UTF-8 strings
 * ([MQTT-1.5.3]): valid UTF-8 without U+0000, surrogates, control
 * characters or noncharacters.  The broker treats a topic that breaks them
 * as a protocol error and closes the connection, so one bad name would make
 * the publisher (or the subscriber) reconnect forever.  me_topic_text_check
 * and me_check_topic_text are where those rules live; every place a name
 * enters calls one of them.
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
#include "mb/pg_wchar.h"
#include "utils/builtins.h"

#include "pg_mqtt_emit.h"
#include "topic.h"

PG_FUNCTION_INFO_V1(mqtt_emit_topic_filter);
PG_FUNCTION_INFO_V1(mqtt_emit_check_name);
PG_FUNCTION_INFO_V1(mqtt_emit_check_share_group);
PG_FUNCTION_INFO_V1(mqtt_emit_check_batch_prefix);

/*
 * May code point c appear in an MQTT topic?  MQTT forbids U+0000 and the
 * surrogates, and mosquitto (as the specification allows) also refuses
 * the control characters U+0001..U+001F and U+007F..U+009F and the
 * noncharacters U+FDD0..U+FDEF and U+xFFFE, U+xFFFF of every plane.
 */
static bool
topic_char_allowed(pg_wchar c)
{
	if (c <= 0x1F || (c >= 0x7F && c <= 0x9F))
		return false;
	if (c >= 0xD800 && c <= 0xDFFF)
		return false;
	if (c >= 0xFDD0 && c <= 0xFDEF)
		return false;
	if ((c & 0xFFFE) == 0xFFFE || c > 0x10FFFF)
		return false;
	return true;
}

/*
 * Check that len bytes at s are a string MQTT accepts in a topic.  The
 * bytes are checked as UTF-8 whatever the database encoding is, because
 * they go to the broker as they are.  Returns ME_TOPIC_TEXT_OK, or
 * ME_TOPIC_TEXT_BAD_UTF8 with *pos the 1-based byte position of the first
 * byte that is not valid UTF-8, or ME_TOPIC_TEXT_BAD_CHAR with *pos the
 * 1-based character position and *cp the code point of the first
 * character MQTT does not allow.  Never raises an error (GUC check hooks
 * call it).
 */
MeTopicTextResult
me_topic_text_check(const char *s, int len, int *pos, pg_wchar *cp)
{
	const unsigned char *p = (const unsigned char *) s;
	int			off = 0;
	int			chars = 0;

	while (off < len)
	{
		int			l = pg_utf_mblen(p + off);
		pg_wchar	c;

		chars++;
		if (l > len - off || !pg_utf8_islegal(p + off, l))
		{
			*pos = off + 1;
			return ME_TOPIC_TEXT_BAD_UTF8;
		}
		c = utf8_to_unicode(p + off);
		if (!topic_char_allowed(c))
		{
			*pos = chars;
			*cp = c;
			return ME_TOPIC_TEXT_BAD_CHAR;
		}
		off += l;
	}
	return ME_TOPIC_TEXT_OK;
}

/*
 * Raise an error unless len bytes at s may be part of an MQTT topic (see
 * me_topic_text_check).  what names the string in the message, for
 * example "model name"; hint says how to fix it (a full sentence).
 */
void
me_check_topic_text(const char *s, int len, const char *what, const char *hint)
{
	int			pos = 0;
	pg_wchar	cp = 0;

	switch (me_topic_text_check(s, len, &pos, &cp))
	{
		case ME_TOPIC_TEXT_OK:
			break;
		case ME_TOPIC_TEXT_BAD_UTF8:
			ereport(ERROR,
					(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
					 errmsg("%s is not valid UTF-8 at byte %d", what, pos),
					 errdetail("MQTT topics are UTF-8; the database encoding is %s.",
							   GetDatabaseEncodingName()),
					 errhint("%s", hint)));
			break;
		case ME_TOPIC_TEXT_BAD_CHAR:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s contains character U+%04X at position %d, which MQTT does not allow in topics",
							what, (unsigned int) cp, pos),
					 errdetail("MQTT topics must not contain U+0000, control characters (U+0001 to U+001F, U+007F to U+009F), surrogates, or noncharacters (U+FDD0 to U+FDEF, and U+FFFE and U+FFFF in every plane); the broker closes the connection of a client that sends one."),
					 errhint("%s", hint)));
			break;
	}
}

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
 * Append the text of one key column to the key level of a state topic,
 * percent-encoding every byte but A-Z, a-z, 0-9, "-", "_" and "~" (see the
 * file header); s is UTF-8.
 */
void
me_append_topic_key(StringInfo buf, const char *s, int len)
{
	static const char hex[] = "0123456789ABCDEF";
	int			i;

	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
			(c >= '0' && c <= '9') || c == '-' || c == '_' || c == '~')
			appendStringInfoChar(buf, (char) c);
		else
		{
			appendStringInfoChar(buf, '%');
			appendStringInfoChar(buf, hex[c >> 4]);
			appendStringInfoChar(buf, hex[c & 0x0F]);
		}
	}
}

/*
 * Is a received topic a state topic, <prefix>/<model>/state/<key> (the
 * prefix compared without regard to case, as for events)?  The
 * subscriber's filter <prefix>/<model>/# matches these retained messages
 * too; they carry no event, and are ignored without a count.
 */
bool
me_topic_is_state(const char *topic, int topic_len)
{
	int			plen = strlen(mqtt_emit_topic_prefix);
	const char *rest;
	const char *slash;
	int			left;

	if (topic_len <= plen + 1 ||
		pg_strncasecmp(topic, mqtt_emit_topic_prefix, plen) != 0 ||
		topic[plen] != '/')
		return false;
	rest = topic + plen + 1;
	left = topic_len - plen - 1;
	slash = memchr(rest, '/', left);
	if (slash == NULL || slash == rest)
		return false;
	left -= (slash + 1) - rest;
	return left >= 6 && memcmp(slash + 1, "state/", 6) == 0;
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
 * Does one prefix equal the other, or lie under it (a/b under a)?  Case
 * is ignored.
 */
static bool
prefix_covers(const char *outer, const char *inner)
{
	size_t		len = strlen(outer);

	return pg_strncasecmp(outer, inner, len) == 0 &&
		(inner[len] == '\0' || inner[len] == '/');
}

/*
 * Why the batch topic prefix may not be used with the topic prefix in
 * effect (a sentence for errdetail), or NULL when it may.
 */
const char *
me_batch_prefix_problem(void)
{
	const char *p = mqtt_emit_topic_prefix;
	const char *b = mqtt_emit_batch_topic_prefix;

	if (p == NULL || b == NULL)
		return NULL;
	if (pg_strcasecmp(p, b) == 0)
		return "Both prefixes are the same: subscribers of the events would receive the batched messages.";
	if (prefix_covers(p, b))
		return "The batch topic prefix lies under the topic prefix: a subscriber of <topic prefix>/# would receive the batched messages.";
	if (prefix_covers(b, p))
		return "The topic prefix lies under the batch topic prefix: a subscriber of <batch topic prefix>/# would receive the events.";
	return NULL;
}

/*
 * Raise an error (22023) when batched messages would reach subscribers of
 * the events.
 */
void
me_check_batch_prefix(void)
{
	const char *problem = me_batch_prefix_problem();

	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"mqtt_emit.batch_topic_prefix\" \"%s\" collides with \"mqtt_emit.topic_prefix\" \"%s\"",
						mqtt_emit_batch_topic_prefix, mqtt_emit_topic_prefix),
				 errdetail("%s", problem),
				 errhint("Set \"mqtt_emit.batch_topic_prefix\" to a prefix outside \"mqtt_emit.topic_prefix\", such as its default \"prisma/batches\".")));
}

/*
 * mqtt_emit._check_batch_prefix(), for watch(..., batch => true).
 */
Datum
mqtt_emit_check_batch_prefix(PG_FUNCTION_ARGS)
{
	me_check_batch_prefix();
	PG_RETURN_VOID();
}

/*
 * The topic of a batched message of a model:
 * <batch_topic_prefix>/<model>/batch.
 */
void
me_build_batch_topic(StringInfo buf, const char *model, int len)
{
	resetStringInfo(buf);
	appendStringInfoString(buf, mqtt_emit_batch_topic_prefix);
	appendStringInfoChar(buf, '/');
	me_append_topic_model(buf, model, len, false);
	appendBinaryStringInfo(buf, "/batch", 6);
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
 * Append len bytes at s as RabbitMQ delivers them (see the top of this
 * file): "." as "/", "*" as "+".
 */
static void
append_mapped(StringInfo buf, const char *s, int len)
{
	int			i;

	for (i = 0; i < len; i++)
		appendStringInfoChar(buf, s[i] == '.' ? '/' : s[i] == '*' ? '+' : s[i]);
}

/* Does the topic prefix read differently in RabbitMQ's form? */
static bool
prefix_is_mapped(void)
{
	return strpbrk(mqtt_emit_topic_prefix, ".*") != NULL;
}

/*
 * Is this topic under the RabbitMQ form of a topic prefix that has a "."
 * or "*" (compared without regard to case), with more after it?  False
 * for a prefix without them (me_topic_is_event covers those).
 */
bool
me_topic_is_mapped_event(const char *topic, int len)
{
	StringInfoData p;
	bool		r;

	if (!prefix_is_mapped())
		return false;
	initStringInfo(&p);
	append_mapped(&p, mqtt_emit_topic_prefix, strlen(mqtt_emit_topic_prefix));
	appendStringInfoChar(&p, '/');
	r = len > p.len && pg_strncasecmp(topic, p.data, p.len) == 0;
	pfree(p.data);
	return r;
}

/*
 * Could a received topic be the RabbitMQ form of an event's topic: the
 * prefix in that form (or as it is), then a model part, then a leaf, none
 * of them empty?  A cheap look before the payload is parsed;
 * me_topic_matches_mapped decides.
 */
bool
me_topic_mapped_plausible(const char *topic, int topic_len)
{
	StringInfoData p;
	const char *rest;
	const char *last;
	bool		r = false;

	initStringInfo(&p);
	append_mapped(&p, mqtt_emit_topic_prefix, strlen(mqtt_emit_topic_prefix));
	appendStringInfoChar(&p, '/');
	if (topic_len > p.len && pg_strncasecmp(topic, p.data, p.len) == 0)
	{
		rest = topic + p.len;
		last = strrchr(rest, '/');
		r = (last != NULL && last > rest && last[1] != '\0');
	}
	pfree(p.data);
	return r;
}

/*
 * Is a received topic the RabbitMQ form of where an event of this model
 * and operation goes: the prefix and the (encoded) model with "." as "/"
 * and "*" as "+", then the operation or "all" (the Node library's leaf)?
 * Compared without regard to case, as the other topic checks are.
 */
bool
me_topic_matches_mapped(const char *topic, int topic_len, const char *model,
						const char *operation)
{
	StringInfoData enc;
	StringInfoData want;
	const char *leaf;
	int			leaf_len;
	bool		r;

	initStringInfo(&enc);
	me_append_topic_model(&enc, model, strlen(model), false);
	initStringInfo(&want);
	append_mapped(&want, mqtt_emit_topic_prefix, strlen(mqtt_emit_topic_prefix));
	appendStringInfoChar(&want, '/');
	append_mapped(&want, enc.data, enc.len);
	appendStringInfoChar(&want, '/');
	r = topic_len > want.len && pg_strncasecmp(topic, want.data, want.len) == 0;
	if (r)
	{
		leaf = topic + want.len;
		leaf_len = topic_len - want.len;
		r = (leaf_len == (int) strlen(operation) &&
			 pg_strncasecmp(leaf, operation, leaf_len) == 0) ||
			(leaf_len == 3 && pg_strncasecmp(leaf, "all", 3) == 0);
	}
	pfree(enc.data);
	pfree(want.data);
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

/*
 * mqtt_emit._check_name(name text, what text): raise an error unless name
 * may be part of an MQTT topic; what names it in the message ("model
 * name").  For the checks written in SQL (watch(), the listener registry).
 */
Datum
mqtt_emit_check_name(PG_FUNCTION_ARGS)
{
	text	   *name = PG_GETARG_TEXT_PP(0);
	char	   *what = text_to_cstring(PG_GETARG_TEXT_PP(1));
	char		hint[128];

	snprintf(hint, sizeof(hint), "Choose a %s without this character.", what);
	me_check_topic_text(VARDATA_ANY(name), VARSIZE_ANY_EXHDR(name), what, hint);
	PG_RETURN_VOID();
}

/*
 * Why len bytes at s are not a share group name, or NULL.  MQTT 5 forbids
 * "/", "+" and "#" in a ShareName ([MQTT-4.8.2-2]); it must not be empty
 * ([MQTT-4.8.2-1]); the MQTT UTF-8 rules of topics apply (the name is part
 * of the filter).  Never raises an error (the workers check rows with it).
 */
const char *
me_share_group_problem(const char *s, int len)
{
	int			pos;
	pg_wchar	cp;
	int			i;

	if (len == 0)
		return "A share group name must not be empty";
	if (len > ME_SHARE_GROUP_MAX)
		return "A share group name has at most 100 bytes";
	if ((int) strnlen(s, len) != len ||
		me_topic_text_check(s, len, &pos, &cp) != ME_TOPIC_TEXT_OK)
		return "A share group name must be UTF-8 text without control characters";
	for (i = 0; i < len; i++)
		if (s[i] == '/' || s[i] == '+' || s[i] == '#')
			return "A share group name must not contain \"/\", \"+\" or \"#\"";
	return NULL;
}

/*
 * Raise an error unless len bytes at s are a valid share group name:
 * 22021 or 22023 naming the character for what MQTT's UTF-8 rules refuse
 * (as for model names), 22023 for the rest.
 */
void
me_check_share_group(const char *s, int len)
{
	const char *problem;

	if (len > ME_SHARE_GROUP_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("share group name is too long"),
				 errdetail("It has %d bytes; a share group name has at most %d.",
						   len, ME_SHARE_GROUP_MAX)));
	/* first the characters, so that the message may quote the name */
	me_check_topic_text(s, len, "share group name",
						"Choose a share group name without this character.");
	problem = me_share_group_problem(s, len);
	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid share group name \"%s\"", pnstrdup(s, len)),
				 errdetail("%s.", problem),
				 errhint("A share group name has 1 to %d bytes and no \"/\", \"+\", \"#\" or control characters, such as \"pool\".",
						 ME_SHARE_GROUP_MAX)));
}

/*
 * mqtt_emit._check_share_group(name text): raise an error unless name is
 * a valid share group name.  For the registries' row triggers.
 */
Datum
mqtt_emit_check_share_group(PG_FUNCTION_ARGS)
{
	text	   *name = PG_GETARG_TEXT_PP(0);

	me_check_share_group(VARDATA_ANY(name), VARSIZE_ANY_EXHDR(name));
	PG_RETURN_VOID();
}

/*
 * The shared subscription of a group to a filter: $share/<group>/<filter>.
 */
void
me_share_filter(StringInfo buf, const char *group, const char *filter)
{
	resetStringInfo(buf);
	appendStringInfo(buf, "$share/%s/%s", group, filter);
}

/*
 * The Subscription Identifier of a shared subscription: a hash of its
 * filter (FNV-1a, 32 bits, the same on every platform) in 2 to
 * 268,435,455, the range MQTT 5 allows without ME_SUB_ID_PLAIN.  Stable
 * across restarts, so that what the broker queued for this node's
 * session under an earlier worker still says which path it took.
 */
uint32
me_share_sub_id(const char *filter)
{
	uint32		h = 2166136261u;
	const unsigned char *p;

	for (p = (const unsigned char *) filter; *p; p++)
	{
		h ^= *p;
		h *= 16777619u;
	}
	return 2 + h % (ME_SUB_ID_MAX - 1);
}

/*
 * The model column of an inbox row that arrived through the shared
 * subscription filter ("$share/<group>/<filter>"): the filter, a newline,
 * then the topic.  Without filter, the topic alone.
 */
void
me_inbox_model(StringInfo buf, const char *filter, const char *topic, int topic_len)
{
	resetStringInfo(buf);
	if (filter)
	{
		appendStringInfoString(buf, filter);
		appendStringInfoChar(buf, '\n');
	}
	appendBinaryStringInfo(buf, topic, topic_len);
}

/*
 * Take an inbox row's model column apart (see me_inbox_model): the topic,
 * and for a message that came through a share group the shared filter
 * and the group's name (palloc'd); NULLs for one that came through a
 * plain subscription.  A model that starts with "$share/" but is not of
 * that form is taken for a topic (it then matches no listener).
 */
void
me_inbox_split(const char *model, int len, MeInboxPath *path)
{
	const char *nl;
	const char *slash;

	memset(path, 0, sizeof(*path));
	path->topic = model;
	path->topic_len = len;
	if (len < 7 || strncmp(model, "$share/", 7) != 0 ||
		(nl = memchr(model, '\n', len)) == NULL ||
		(slash = memchr(model + 7, '/', nl - (model + 7))) == NULL ||
		slash == model + 7)
		return;
	path->filter = pnstrdup(model, nl - model);
	path->group = pnstrdup(model + 7, slash - (model + 7));
	path->group_filter = path->filter + (slash + 1 - model);
	path->topic = nl + 1;
	path->topic_len = len - (nl + 1 - model);
}
