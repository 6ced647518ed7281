/*-------------------------------------------------------------------------
 *
 * pubprops.c
 *		The MQTT 5 publish properties of mqtt_emit.publish(properties =>):
 *		checked and encoded in the calling backend, decoded by the worker
 *		when it publishes.
 *
 * The properties travel inside the event's payload, so that they need no
 * new column in the outbox (the library works with the 0.1.0 table too)
 * and no new field in the queue: an event with ME_FLAG_PROPS carries
 * "<n>:" and n bytes of records before its payload.  A record is a tag
 * character (ME_PROP_*), the value's length in decimal, ':' and the value.
 * The whole form is text (the values are), as the outbox's payload column
 * requires.  Every value is checked at call time, so a broker never sees a
 * property that makes it close the connection; the decoder still checks
 * every length, since outbox rows are data.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/pubprops.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "pg_mqtt_emit.h"
#include "pubprops.h"
#include "topic.h"

static void
append_record(StringInfo buf, char tag, const char *s, int len)
{
	appendStringInfo(buf, "%c%d:", tag, len);
	appendBinaryStringInfo(buf, s, len);
}

/*
 * A string property's value, checked: a JSON string of at most
 * ME_PROP_MAX_STRING bytes that MQTT allows in a UTF-8 string (the rules
 * of topics, topic.c), unless binary (correlation data is bytes to MQTT).
 */
static void
string_value(JsonbValue *v, const char *what, bool binary,
			 const char **s, int *len)
{
	char		whatbuf[128];

	if (v->type != jbvString)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("MQTT property %s must be a JSON string", what)));
	if (v->val.string.len > ME_PROP_MAX_STRING)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("MQTT property %s is too long (%d bytes)", what,
						v->val.string.len),
				 errdetail("String properties may have at most %d bytes.",
						   ME_PROP_MAX_STRING)));
	if (!binary)
	{
		snprintf(whatbuf, sizeof(whatbuf), "MQTT property %s", what);
		me_check_topic_text(v->val.string.val, v->val.string.len, whatbuf,
							"Use only characters that MQTT allows in strings.");
	}
	*s = v->val.string.val;
	*len = v->val.string.len;
}

/*
 * user_properties: an array of [name, value] pairs of strings, since MQTT
 * allows a name more than once and keeps their order.
 */
static void
encode_user_properties(JsonbValue *v, StringInfo out)
{
	JsonbIterator *it;
	JsonbValue	elem;
	JsonbIteratorToken r;
	int			npairs = 0;

	if (v->type != jbvBinary || !JsonContainerIsArray(v->val.binary.data) ||
		JsonContainerIsScalar(v->val.binary.data))
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("MQTT property user_properties must be a JSON array of [name, value] pairs"),
				 errhint("Write for example '[[\"source\", \"billing\"], [\"tag\", \"a\"], [\"tag\", \"b\"]]'.")));
	it = JsonbIteratorInit(v->val.binary.data);
	while ((r = JsonbIteratorNext(&it, &elem, true)) != WJB_DONE)
	{
		JsonbIterator *pit;
		JsonbValue	part;
		JsonbIteratorToken pr;
		const char *s[2];
		int			len[2];
		int			nparts = 0;

		if (r != WJB_ELEM)
			continue;
		if (elem.type != jbvBinary || !JsonContainerIsArray(elem.val.binary.data) ||
			JsonContainerIsScalar(elem.val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("MQTT property user_properties must be a JSON array of [name, value] pairs"),
					 errdetail("Element %d is not an array.", npairs + 1)));
		pit = JsonbIteratorInit(elem.val.binary.data);
		while ((pr = JsonbIteratorNext(&pit, &part, true)) != WJB_DONE)
		{
			if (pr != WJB_ELEM)
				continue;
			if (nparts >= 2)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("MQTT property user_properties must be a JSON array of [name, value] pairs"),
						 errdetail("Element %d has more than two members.", npairs + 1)));
			string_value(&part, nparts == 0 ? "user property name" : "user property value",
						 false, &s[nparts], &len[nparts]);
			nparts++;
		}
		if (nparts != 2)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("MQTT property user_properties must be a JSON array of [name, value] pairs"),
					 errdetail("Element %d has %d members.", npairs + 1, nparts)));
		if (++npairs > ME_PROP_MAX_USER)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("too many MQTT user properties"),
					 errdetail("A message may carry at most %d user properties.",
							   ME_PROP_MAX_USER)));
		append_record(out, ME_PROP_USER_NAME, s[0], len[0]);
		append_record(out, ME_PROP_USER_VALUE, s[1], len[1]);
	}
}

/*
 * message_expiry: whole seconds, 1 to 4294967295 (MQTT's four-byte integer).
 */
static void
encode_expiry(JsonbValue *v, StringInfo out)
{
	char	   *s;
	char	   *end;
	unsigned long long n;

	if (v->type != jbvNumeric)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("MQTT property message_expiry must be a JSON number")));
	s = DatumGetCString(DirectFunctionCall1(numeric_out,
											NumericGetDatum(v->val.numeric)));
	errno = 0;
	n = strtoull(s, &end, 10);
	if (s[0] < '0' || s[0] > '9' || *end != '\0' || errno != 0 ||
		n < 1 || n > PG_UINT32_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("MQTT property message_expiry %s is out of range", s),
				 errdetail("The message expiry is a whole number of seconds from 1 to %u.",
						   PG_UINT32_MAX)));
	append_record(out, ME_PROP_EXPIRY, s, strlen(s));
}

/*
 * Check the properties object of mqtt_emit.publish() and append its
 * encoded records to out (which the caller has initialised).  Returns
 * false when the object is empty.  Every bad input raises an error here,
 * in the calling transaction.
 */
bool
me_pubprops_encode(Jsonb *props, StringInfo out)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken r;
	char	   *key = NULL;
	int			start = out->len;

	if (!JB_ROOT_IS_OBJECT(props) || JB_ROOT_IS_SCALAR(props))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("MQTT properties must be a JSON object"),
				 errhint("Give an object with any of the keys content_type, response_topic, correlation_data, message_expiry and user_properties.")));
	it = JsonbIteratorInit(&props->root);
	while ((r = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		const char *s;
		int			len;

		if (r == WJB_KEY)
		{
			key = pnstrdup(v.val.string.val, v.val.string.len);
			continue;
		}
		if (r != WJB_VALUE)
			continue;
		if (v.type == jbvNull)
			continue;			/* a key set to null is no property */
		if (strcmp(key, "content_type") == 0)
		{
			string_value(&v, key, false, &s, &len);
			append_record(out, ME_PROP_CONTENT_TYPE, s, len);
		}
		else if (strcmp(key, "response_topic") == 0)
		{
			string_value(&v, key, false, &s, &len);
			if (len == 0 || memchr(s, '+', len) || memchr(s, '#', len))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid MQTT response topic \"%.*s\"", len, s),
						 errdetail("A response topic is a topic name: not empty, without \"+\" or \"#\".")));
			append_record(out, ME_PROP_RESPONSE_TOPIC, s, len);
		}
		else if (strcmp(key, "correlation_data") == 0)
		{
			string_value(&v, key, true, &s, &len);
			append_record(out, ME_PROP_CORRELATION, s, len);
		}
		else if (strcmp(key, "message_expiry") == 0)
			encode_expiry(&v, out);
		else if (strcmp(key, "user_properties") == 0)
			encode_user_properties(&v, out);
		else
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown MQTT property \"%s\"", key),
					 errhint("The keys are content_type, response_topic, correlation_data, message_expiry and user_properties.")));
	}
	if (out->len - start > ME_PROP_MAX_TOTAL)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("MQTT properties too large (%d bytes encoded)", out->len - start),
				 errdetail("The properties of one message may take at most %d bytes.",
						   ME_PROP_MAX_TOTAL)));
	return out->len > start;
}

/* a decimal length followed by ':'; -1 when malformed */
static int
read_len(const char **pos, const char *end)
{
	const char *p = *pos;
	int			n = 0;

	if (p >= end || *p < '0' || *p > '9')
		return -1;
	while (p < end && *p >= '0' && *p <= '9')
	{
		n = n * 10 + (*p - '0');
		if (n > ME_PROP_MAX_TOTAL)
			return -1;
		p++;
	}
	if (p >= end || *p != ':')
		return -1;
	*pos = p + 1;
	return n;
}

/*
 * The payload of an event with ME_FLAG_PROPS is "<n>:", n bytes of
 * records, then the message.  Point *props at the records and *payload at
 * the message; false (nothing changed) when the prefix is malformed.
 */
bool
me_pubprops_split(const char **payload, int *len,
				  const char **props, int *props_len)
{
	const char *p = *payload;
	const char *end = *payload + *len;
	int			n = read_len(&p, end);

	if (n < 0 || n > end - p)
		return false;
	*props = p;
	*props_len = n;
	*payload = p + n;
	*len = (int) (end - (p + n));
	return true;
}

/*
 * Read the record at *pos (before end) and step past it.
 */
bool
me_pubprops_next(const char **pos, const char *end, char *tag,
				 const char **value, int *value_len)
{
	const char *p = *pos;
	int			n;

	if (p >= end)
		return false;
	*tag = *p++;
	n = read_len(&p, end);
	if (n < 0 || n > end - p)
		return false;
	*value = p;
	*value_len = n;
	*pos = p + n;
	return true;
}
