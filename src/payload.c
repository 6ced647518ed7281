/*-------------------------------------------------------------------------
 *
 * payload.c
 *		JSON encoding of column values, event ids, timestamps and signatures (topics: topic.c).
 *
 * Column values are rendered with PostgreSQL's own JSON rules, so a row
 * reads the same as to_jsonb(NEW) would: numbers stay numbers (NaN and
 * infinities become strings), booleans become true/false, dates and
 * timestamps use the ISO form JSON output uses, json and jsonb values are
 * embedded, arrays and composites go through the core's array_to_json and
 * row_to_json, and everything else is its text output, escaped with
 * escape_json().  With mqtt_emit.json_profile = prisma, values read as
 * Prisma's client writes them: big integers and numeric as strings, dates
 * and timestamps in UTC with Z.  The type of each column is classified once (see
 * capture.c's relation cache) so that encoding a row is a loop of appends.
 *
 * Event ids are UUID-formatted (version 7 layout): 48 bits of Unix time in
 * milliseconds, 42 bits of a node-wide sequence kept in shared memory (it
 * starts at the server's start time in microseconds, so a restarted server
 * does not repeat itself), and 32 bits that identify the node (a hash of
 * the effective client id).  They are unique across rows, nodes and
 * restarts, unlike the seed's base64 prefix of the payload.
 *
 * Signed messages (mqtt_emit.signing_key) end in ,"signature":"<hex>"}
 * where <hex> is the HMAC-SHA256, under the shared key, of the message as
 * it would read without that member: the same bytes up to the comma, then
 * the closing brace.  Keeping the signature inside the JSON object lets
 * peers that do not know about it (the seed) read signed messages.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/payload.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "common/jsonapi.h"
#include "common/shortest_dec.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/fmgrprotos.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "pg_mqtt_emit.h"

/*
 * Work out how values of type typid are rendered.  The output function is
 * looked up in cxt, which must live as long as ct.
 */
void
me_classify_type(Oid typid, MqttEmitColType *ct, MemoryContext cxt)
{
	Oid			outfunc;
	bool		isvarlena;
	Oid			base = getBaseType(typid);

	ct->typid = base;
	switch (base)
	{
		case BOOLOID:
			ct->cat = ME_JSON_BOOL;
			break;
		case INT2OID:
			ct->cat = ME_JSON_INT2;
			break;
		case INT4OID:
			ct->cat = ME_JSON_INT4;
			break;
		case INT8OID:
			ct->cat = ME_JSON_INT8;
			break;
		case FLOAT4OID:
		case FLOAT8OID:
		case NUMERICOID:
			ct->cat = ME_JSON_NUMBER;
			break;
		case DATEOID:
		case TIMESTAMPOID:
		case TIMESTAMPTZOID:
			ct->cat = ME_JSON_DATETIME;
			break;
		case JSONOID:
			ct->cat = ME_JSON_JSON;
			break;
		case JSONBOID:
			ct->cat = ME_JSON_JSONB;
			break;
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
			/* their output functions return the bytes as they are */
			ct->cat = ME_JSON_TEXT;
			break;
		default:
			if (OidIsValid(get_element_type(base)))
				ct->cat = ME_JSON_ARRAY;
			else if (type_is_rowtype(base))
				ct->cat = ME_JSON_COMPOSITE;
			else
				ct->cat = ME_JSON_STRING;
			break;
	}
	getTypeOutputInfo(base, &outfunc, &isvarlena);
	fmgr_info_cxt(outfunc, &ct->outfunc, cxt);
}

/* the largest integer a JavaScript number holds exactly: 2^53 - 1 */
#define ME_JS_SAFE_INT	INT64CONST(9007199254740991)

/*
 * A date or timestamp as Prisma's client writes a DateTime: UTC, ISO 8601,
 * milliseconds, Z (a timestamp without time zone is taken as UTC, as Prisma
 * does; a date is its midnight).  False for values outside the years 1 to
 * 9999 (infinity too), which keep PostgreSQL's form.  out holds 32 bytes.
 */
static bool
prisma_datetime(char *out, Datum value, Oid typid)
{
	TimestampTz ts;
	struct pg_tm tm;
	fsec_t		fsec;

	if (typid == DATEOID)
	{
		DateADT		d = DatumGetDateADT(value);

		if (DATE_NOT_FINITE(d))
			return false;
		ts = (TimestampTz) d * USECS_PER_DAY;
	}
	else
	{
		ts = DatumGetTimestampTz(value);
		if (TIMESTAMP_NOT_FINITE(ts))
			return false;
	}
	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0 ||
		tm.tm_year < 1 || tm.tm_year > 9999)
		return false;
	me_format_timestamp(out, ts);
	return true;
}

/*
 * Append str (len bytes, no NUL among them) as a JSON string: the same
 * bytes as escape_json() writes (\b \f \n \r \t \" \\ and \u00xx for
 * the other control characters), but copying each run of bytes that need
 * no escape at once instead of one byte at a time.
 */
void
me_escape_json_len(StringInfo buf, const char *str, int len)
{
	const char *p = str;
	const char *end = str + len;

	enlargeStringInfo(buf, len + 2);
	appendStringInfoCharMacro(buf, '"');
	while (p < end)
	{
		const char *run = p;

		while (p < end && (unsigned char) *p >= ' ' && *p != '"' && *p != '\\')
			p++;
		if (p > run)
			appendBinaryStringInfo(buf, run, p - run);
		if (p == end)
			break;
		switch (*p)
		{
			case '\b':
				appendBinaryStringInfo(buf, "\\b", 2);
				break;
			case '\f':
				appendBinaryStringInfo(buf, "\\f", 2);
				break;
			case '\n':
				appendBinaryStringInfo(buf, "\\n", 2);
				break;
			case '\r':
				appendBinaryStringInfo(buf, "\\r", 2);
				break;
			case '\t':
				appendBinaryStringInfo(buf, "\\t", 2);
				break;
			case '"':
				appendBinaryStringInfo(buf, "\\\"", 2);
				break;
			case '\\':
				appendBinaryStringInfo(buf, "\\\\", 2);
				break;
			default:
				{
					static const char hex[] = "0123456789abcdef";
					char		u[6] = {'\\', 'u', '0', '0', 0, 0};

					u[4] = hex[((unsigned char) *p) >> 4];
					u[5] = hex[((unsigned char) *p) & 0x0F];
					appendBinaryStringInfo(buf, u, 6);
					break;
				}
		}
		p++;
	}
	appendStringInfoCharMacro(buf, '"');
}

/*
 * Append the JSON form of one value, as mqtt_emit.json_profile says.
 */
void
me_json_value(StringInfo buf, MqttEmitColType *ct, Datum value, bool isnull)
{
	char		tmp[MAXDATELEN + 32];
	char	   *s;
	bool		prisma = (mqtt_emit_json_profile == ME_JSON_PROFILE_PRISMA);

	if (isnull)
	{
		appendBinaryStringInfo(buf, "null", 4);
		return;
	}

	switch (ct->cat)
	{
		case ME_JSON_BOOL:
			if (DatumGetBool(value))
				appendBinaryStringInfo(buf, "true", 4);
			else
				appendBinaryStringInfo(buf, "false", 5);
			break;
		case ME_JSON_INT2:
			appendBinaryStringInfo(buf, tmp, pg_ltoa(DatumGetInt16(value), tmp));
			break;
		case ME_JSON_INT4:
			appendBinaryStringInfo(buf, tmp, pg_ltoa(DatumGetInt32(value), tmp));
			break;
		case ME_JSON_INT8:
			{
				int64		v = DatumGetInt64(value);
				int			len = pg_lltoa(v, tmp);

				/* beyond 2^53 a JavaScript number loses digits */
				if (prisma && (v > ME_JS_SAFE_INT || v < -ME_JS_SAFE_INT))
				{
					appendStringInfoChar(buf, '"');
					appendBinaryStringInfo(buf, tmp, len);
					appendStringInfoChar(buf, '"');
				}
				else
					appendBinaryStringInfo(buf, tmp, len);
				break;
			}
		case ME_JSON_NUMBER:
			s = OutputFunctionCall(&ct->outfunc, value);
			/* Prisma's Decimal is a string */
			if (IsValidJsonNumber(s, strlen(s)) &&
				!(prisma && ct->typid == NUMERICOID))
				appendStringInfoString(buf, s);
			else
				escape_json(buf, s);
			pfree(s);
			break;
		case ME_JSON_DATETIME:
			if (prisma && prisma_datetime(tmp, value, ct->typid))
			{
				appendStringInfoChar(buf, '"');
				appendStringInfoString(buf, tmp);
				appendStringInfoChar(buf, '"');
				break;
			}
			s = JsonEncodeDateTime(tmp, value, ct->typid, NULL);
			appendStringInfoChar(buf, '"');
			appendStringInfoString(buf, s);
			appendStringInfoChar(buf, '"');
			break;
		case ME_JSON_JSON:
			s = TextDatumGetCString(value);
			appendStringInfoString(buf, s);
			pfree(s);
			break;
		case ME_JSON_JSONB:
			{
				Jsonb	   *jb = DatumGetJsonbP(value);

				s = JsonbToCString(NULL, &jb->root, VARSIZE(jb));
				appendStringInfoString(buf, s);
				pfree(s);
				break;
			}
		case ME_JSON_ARRAY:
			s = TextDatumGetCString(DirectFunctionCall1(array_to_json, value));
			appendStringInfoString(buf, s);
			pfree(s);
			break;
		case ME_JSON_COMPOSITE:
			s = TextDatumGetCString(DirectFunctionCall1(row_to_json, value));
			appendStringInfoString(buf, s);
			pfree(s);
			break;
		case ME_JSON_TEXT:
			{
				/* textout, varcharout and bpcharout: the bytes themselves */
				text	   *t = DatumGetTextPP(value);

				me_escape_json_len(buf, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
				if ((Pointer) t != DatumGetPointer(value))
					pfree(t);
				break;
			}
		case ME_JSON_STRING:
			s = OutputFunctionCall(&ct->outfunc, value);
			me_escape_json_len(buf, s, strlen(s));
			pfree(s);
			break;
	}
}

/*
 * The text of one key column's value, for the key level of a state topic
 * (capture.c, retain_last; topic.c percent-encodes it).  A row's state
 * topic must be the same in every session and under every setting, or a
 * later change of the row would not clear the retained message of an
 * earlier one: so the forms that would follow settings are fixed here.
 * Integers and numeric as their digits, booleans true and false, float4
 * and float8 in their shortest exact form (whatever extra_float_digits
 * says), date and timestamp in ISO 8601 as to_jsonb() writes them
 * (whatever DateStyle says), timestamptz the same in UTC with +00:00
 * (whatever TimeZone says), bytea in hex (whatever bytea_output says),
 * anything else its type's output function (text, varchar, uuid, enums:
 * what the value is).  Neither mqtt_emit.json_profile nor the payload's
 * rendering applies.  Returns a palloc'd string.
 */
char *
me_key_text(MqttEmitColType *ct, Datum value)
{
	char		tmp[MAXDATELEN + 32];
	int			utc = 0;

	switch (ct->cat)
	{
		case ME_JSON_BOOL:
			return pstrdup(DatumGetBool(value) ? "true" : "false");
		case ME_JSON_INT2:
			pg_ltoa(DatumGetInt16(value), tmp);
			return pstrdup(tmp);
		case ME_JSON_INT4:
			pg_ltoa(DatumGetInt32(value), tmp);
			return pstrdup(tmp);
		case ME_JSON_INT8:
			pg_lltoa(DatumGetInt64(value), tmp);
			return pstrdup(tmp);
		case ME_JSON_NUMBER:
			if (ct->typid == FLOAT8OID)
			{
				double_to_shortest_decimal_buf(DatumGetFloat8(value), tmp);
				return pstrdup(tmp);
			}
			if (ct->typid == FLOAT4OID)
			{
				float_to_shortest_decimal_buf(DatumGetFloat4(value), tmp);
				return pstrdup(tmp);
			}
			break;				/* numeric: its output function */
		case ME_JSON_DATETIME:
			return pstrdup(JsonEncodeDateTime(tmp, value, ct->typid,
											  ct->typid == TIMESTAMPTZOID ? &utc : NULL));
		default:
			if (ct->typid == BYTEAOID)
			{
				bytea	   *b = DatumGetByteaPP(value);
				int			len = VARSIZE_ANY_EXHDR(b);
				char	   *out = palloc(2 + 2 * len + 1);

				out[0] = '\\';
				out[1] = 'x';
				hex_encode(VARDATA_ANY(b), len, out + 2);
				out[2 + 2 * len] = '\0';
				return out;
			}
			break;
	}
	return OutputFunctionCall(&ct->outfunc, value);
}

/*
 * Format ts as ISO 8601 UTC with milliseconds: 2026-11-13T10:30:00.123Z.
 * out must hold at least 32 bytes.
 */
void
me_format_timestamp(char *out, TimestampTz ts)
{
	struct pg_tm tm;
	fsec_t		fsec;

	int			ms;
	char	   *p = out;

	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
	{
		strcpy(out, "1970-01-01T00:00:00.000Z");
		return;
	}
	ms = (int) (fsec / 1000);
	if (tm.tm_year < 0 || tm.tm_year > 9999)
	{
		snprintf(out, 32, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
				 tm.tm_year, tm.tm_mon, tm.tm_mday,
				 tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
		return;
	}

	/*
	 * The digits by hand: snprintf() was a fifth of the capture trigger's
	 * instructions (callgrind, bench/README.md).  Same text as
	 * "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ".
	 */
#define ME_DIGITS2(v) do { *p++ = '0' + (v) / 10; *p++ = '0' + (v) % 10; } while (0)
	*p++ = '0' + tm.tm_year / 1000;
	*p++ = '0' + (tm.tm_year / 100) % 10;
	ME_DIGITS2(tm.tm_year % 100);
	*p++ = '-';
	ME_DIGITS2(tm.tm_mon);
	*p++ = '-';
	ME_DIGITS2(tm.tm_mday);
	*p++ = 'T';
	ME_DIGITS2(tm.tm_hour);
	*p++ = ':';
	ME_DIGITS2(tm.tm_min);
	*p++ = ':';
	ME_DIGITS2(tm.tm_sec);
	*p++ = '.';
	*p++ = '0' + ms / 100;
	ME_DIGITS2(ms % 100);
	*p++ = 'Z';
	*p = '\0';
#undef ME_DIGITS2
}

/*
 * Write a new event id (36 characters and a NUL) into out.
 */
void
me_make_event_id(char *out, TimestampTz now)
{
	static const char hex[] = "0123456789abcdef";
	static char *node_for = NULL;	/* a copy: a reload may reuse the address */
	static uint32 node = 0;
	uint64		ms;
	uint64		seq = me_next_event_seq() & ((UINT64CONST(1) << 42) - 1);
	uint8		b[16];
	int			i,
				j;
	const char *cid = me_client_id();

	if (node_for == NULL || strcmp(node_for, cid) != 0)
	{
		node = hash_bytes((const unsigned char *) cid, strlen(cid));
		if (node_for)
			pfree(node_for);
		node_for = MemoryContextStrdup(TopMemoryContext, cid);
	}

	ms = (uint64) ((now / 1000) +
				   ((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000));
	b[0] = (uint8) (ms >> 40);
	b[1] = (uint8) (ms >> 32);
	b[2] = (uint8) (ms >> 24);
	b[3] = (uint8) (ms >> 16);
	b[4] = (uint8) (ms >> 8);
	b[5] = (uint8) ms;
	b[6] = 0x70 | (uint8) ((seq >> 38) & 0x0F);
	b[7] = (uint8) (seq >> 30);
	b[8] = 0x80 | (uint8) ((seq >> 24) & 0x3F);
	b[9] = (uint8) (seq >> 16);
	b[10] = (uint8) (seq >> 8);
	b[11] = (uint8) seq;
	b[12] = (uint8) (node >> 24);
	b[13] = (uint8) (node >> 16);
	b[14] = (uint8) (node >> 8);
	b[15] = (uint8) node;

	for (i = 0, j = 0; i < 16; i++)
	{
		if (i == 4 || i == 6 || i == 8 || i == 10)
			out[j++] = '-';
		out[j++] = hex[b[i] >> 4];
		out[j++] = hex[b[i] & 0x0F];
	}
	out[j] = '\0';
}

/*
 * Append the envelope fields that follow "result":
 * ,"timestamp":"...","eventId":"..."
 */
void
me_json_event_tail(StringInfo buf, TimestampTz now)
{
	char		ts[32];
	char		id[MQTT_EMIT_EVENT_ID_LEN + 1];

	me_format_timestamp(ts, now);
	me_make_event_id(id, now);
	appendBinaryStringInfo(buf, ",\"timestamp\":\"", 14);
	appendStringInfoString(buf, ts);
	appendBinaryStringInfo(buf, "\",\"eventId\":\"", 13);
	appendBinaryStringInfo(buf, id, MQTT_EMIT_EVENT_ID_LEN);
	appendStringInfoCharMacro(buf, '"');
}

const char *
me_op_name(MqttEmitOp op)
{
	switch (op)
	{
		case ME_OP_CREATE:
			return "create";
		case ME_OP_UPDATE:
			return "update";
		case ME_OP_DELETE:
			return "delete";
		default:
			return "other";
	}
}

/*
 * HMAC-SHA256 of the unsigned form of a message: len bytes of payload
 * (which end before the closing brace) followed by "}".  Returns false when
 * the hash could not be computed.
 */
static bool
compute_signature(uint8 *mac, const char *payload, int len)
{
	static ResourceOwner owner = NULL;
	ResourceOwner save = CurrentResourceOwner;
	pg_hmac_ctx *ctx;
	bool		ok;

	/*
	 * With OpenSSL, pg_hmac_create() registers with the current resource
	 * owner, which the worker's loop outside a transaction does not have.
	 */
	if (CurrentResourceOwner == NULL)
	{
		if (owner == NULL)
			owner = ResourceOwnerCreate(NULL, "pg_mqtt_emit signing");
		CurrentResourceOwner = owner;
	}
	ctx = pg_hmac_create(PG_SHA256);
	if (ctx == NULL)
	{
		CurrentResourceOwner = save;
		return false;
	}
	ok = pg_hmac_init(ctx, (const uint8 *) mqtt_emit_signing_key,
					  strlen(mqtt_emit_signing_key)) == 0 &&
		pg_hmac_update(ctx, (const uint8 *) payload, len) == 0 &&
		pg_hmac_update(ctx, (const uint8 *) "}", 1) == 0 &&
		pg_hmac_final(ctx, mac, PG_SHA256_DIGEST_LENGTH) == 0;
	pg_hmac_free(ctx);
	CurrentResourceOwner = save;
	return ok;
}

/*
 * Write the signed form of a JSON object payload into out.  Returns false
 * (and leaves out empty) when there is no key or the payload is no object.
 */
bool
me_sign_payload(StringInfo out, const char *payload, int len)
{
	static const char hex[] = "0123456789abcdef";
	uint8		mac[PG_SHA256_DIGEST_LENGTH];
	int			i;

	resetStringInfo(out);
	if (mqtt_emit_signing_key == NULL || mqtt_emit_signing_key[0] == '\0' ||
		len < 2 || payload[0] != '{' || payload[len - 1] != '}')
		return false;
	if (!compute_signature(mac, payload, len - 1))
		return false;
	appendBinaryStringInfo(out, payload, len - 1);
	appendStringInfoString(out, ",\"signature\":\"");
	for (i = 0; i < PG_SHA256_DIGEST_LENGTH; i++)
	{
		appendStringInfoChar(out, hex[mac[i] >> 4]);
		appendStringInfoChar(out, hex[mac[i] & 0x0F]);
	}
	appendStringInfoString(out, "\"}");
	return true;
}

/*
 * Check the signature at the end of a received message, in constant time.
 */
MqttEmitSigCheck
me_check_signature(const char *payload, int len)
{
	static const char hex[] = "0123456789abcdef";
	static const char marker[] = ",\"signature\":\"";
	uint8		mac[PG_SHA256_DIGEST_LENGTH];
	const char *sig;
	int			body;
	int			i;
	int			diff = 0;

	if (len < ME_SIGNATURE_SUFFIX_LEN + 1)
		return ME_SIG_NONE;
	body = len - ME_SIGNATURE_SUFFIX_LEN;
	if (memcmp(payload + body, marker, sizeof(marker) - 1) != 0 ||
		payload[len - 2] != '"' || payload[len - 1] != '}')
		return ME_SIG_NONE;
	sig = payload + body + sizeof(marker) - 1;
	if (mqtt_emit_signing_key == NULL || mqtt_emit_signing_key[0] == '\0' ||
		!compute_signature(mac, payload, body))
		return ME_SIG_BAD;
	for (i = 0; i < PG_SHA256_DIGEST_LENGTH; i++)
	{
		diff |= sig[2 * i] ^ hex[mac[i] >> 4];
		diff |= sig[2 * i + 1] ^ hex[mac[i] & 0x0F];
	}
	return diff == 0 ? ME_SIG_OK : ME_SIG_BAD;
}
