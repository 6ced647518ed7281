/*-------------------------------------------------------------------------
 *
 * remote.c
 *		Messages received from the bus: checks, deduplication, and the hand
 *		over to the listeners.  Runs in the background worker only.
 *
 * State messages of retain_last tables (<prefix>/<model>/state/<key>) are no
 * events: the worker does not keep them (inbound.c), and one that was kept
 * all the same is skipped here without a count.
 *
 * Received messages are checked before anything runs: size, encoding, NUL
 * bytes, JSON syntax, field types, model name, and that the topic has the
 * form <prefix>/<model>/<something> (or is what RabbitMQ makes of the
 * topic of the payload's model and operation: topic.c).  A message that fails is dropped with a
 * log line (rate-limited) and counted as rejected.  Messages whose origin is
 * this node are our own echo and are skipped, unless they came through a
 * share group (the broker gives each of the group's events to one of its
 * members, this node's own included; listeners.c).  Others are
 * deduplicated for mqtt_emit.dedup_ttl by a key: the event id when the
 * message comes from a pg_mqtt_emit node (it has an origin and a UUID
 * event id), otherwise a 128-bit hash of the message bytes, because other
 * publishers (the seed) reuse event ids for different events; and the
 * path it came through (the plain subscription, or a share group), since
 * a node in a group gets an event once through the group and once through
 * the plain subscription when it has listeners of both, and each path's
 * listeners are to run once.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/remote.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "pg_mqtt_emit.h"
#include "listeners.h"
#include "topic.h"

typedef struct DedupKey
{
	uint64		a;
	uint64		b;
} DedupKey;

typedef struct DedupEntry
{
	DedupKey	key;
	TimestampTz seen;
} DedupEntry;

static HTAB *dedup_hash = NULL;
static DedupEntry *dedup_ring = NULL;	/* insertion order */
static int	dedup_ring_size = 0;
static int	dedup_start = 0;
static int	dedup_count = 0;
static DedupKey tentative_key;	/* remembered by the row being handled */
static bool tentative = false;

/* what a remote message may be at most */
#define MAX_JSON_DEPTH		64
#define MAX_JSON_KEYS		10000

/* rate limit for rejection log lines */
static TimestampTz reject_log_second = 0;
static int	reject_log_count = 0;

/*
 * Drop a received message: count it, and log it (at most 20 lines a
 * second at LOG, then DEBUG1).
 */
void
me_remote_reject(const char *topic, int payload_len, const char *why)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz second = now - (now % USECS_PER_SEC);
	int			elevel = LOG;

	me_count(ME_STAT_REJECTED, 1);
	if (second != reject_log_second)
	{
		reject_log_second = second;
		reject_log_count = 0;
	}
	if (++reject_log_count > 20)
		elevel = DEBUG1;
	me_set_last_error("rejected message on \"%.100s\": %s", topic, why);
	ereport(elevel,
			(errmsg("pg_mqtt_emit rejected a message on topic \"%.200s\": %s",
					topic, why),
			 errdetail("The message had %d bytes.", payload_len)));
}

static void
reject(const MeRemoteMessage *m, const char *why)
{
	me_remote_reject(m->topic, m->payload_len, why);
}

static void
dedup_init(void)
{
	HASHCTL		ctl;

	if (dedup_hash != NULL && dedup_ring_size == mqtt_emit_dedup_max)
		return;
	if (dedup_hash)
		hash_destroy(dedup_hash);
	if (dedup_ring)
		pfree(dedup_ring);
	ctl.keysize = sizeof(DedupKey);
	ctl.entrysize = sizeof(DedupEntry);
	dedup_hash = hash_create("pg_mqtt_emit dedup", 1024, &ctl,
							 HASH_ELEM | HASH_BLOBS);
	dedup_ring_size = mqtt_emit_dedup_max;
	dedup_ring = MemoryContextAllocHuge(TopMemoryContext,
										sizeof(DedupEntry) * dedup_ring_size);
	dedup_start = dedup_count = 0;
}

static void
dedup_pop_oldest(void)
{
	DedupEntry *e = &dedup_ring[dedup_start];

	hash_search(dedup_hash, &e->key, HASH_REMOVE, NULL);
	dedup_start = (dedup_start + 1) % dedup_ring_size;
	dedup_count--;
}

/*
 * The persistent record of handled events (mqtt_emit.received_ids): the
 * key is inserted in the transaction that runs the event's listeners
 * (handle_row's subtransaction, listener_worker.c), so it is there exactly
 * when their work is, and kept for mqtt_emit.dedup_keep.  True when the key
 * was there already.  An extension of before 0.2.0 has no table: memory
 * only.
 */
static SPIPlanPtr seen_plan = NULL;
static int	seen_table = -1;		/* unknown, 0 no, 1 yes */
static TimestampTz last_prune = 0;

static bool
received_id_seen(const DedupKey *key)
{
	Datum		args[2];
	bool		seen;

	if (mqtt_emit_dedup_keep == 0 || seen_table == 0)
		return false;
	if (seen_table < 0)
		seen_table = me_extension_table_exists("received_ids") ? 1 : 0;
	if (seen_table == 0)
		return false;
	SPI_connect();
	if (seen_plan == NULL)
	{
		Oid			types[2] = {INT8OID, INT8OID};

		seen_plan = SPI_prepare("INSERT INTO mqtt_emit.received_ids (a, b) VALUES ($1, $2)"
								" ON CONFLICT DO NOTHING", 2, types);
		if (seen_plan == NULL)
			elog(ERROR, "SPI_prepare failed for mqtt_emit.received_ids: %s",
				 SPI_result_code_string(SPI_result));
		SPI_keepplan(seen_plan);
	}
	args[0] = Int64GetDatum((int64) key->a);
	args[1] = Int64GetDatum((int64) key->b);
	if (SPI_execute_plan(seen_plan, args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "cannot record a received event id");
	seen = (SPI_processed == 0);
	SPI_finish();
	return seen;
}

/*
 * Remove the records older than mqtt_emit.dedup_keep; at most once a
 * minute, from the listener worker's transaction.
 */
void
me_remote_prune(void)
{
	TimestampTz now = GetCurrentTimestamp();
	Datum		arg;
	Oid			type = INT4OID;

	if (seen_table != 1 || now - last_prune < 60 * USECS_PER_SEC)
		return;
	last_prune = now;
	arg = Int32GetDatum(mqtt_emit_dedup_keep);
	SPI_connect();
	if (SPI_execute_with_args("DELETE FROM mqtt_emit.received_ids"
								 " WHERE seen_at OPERATOR(pg_catalog.<)"
								 " (pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1))",
								 1, &type, &arg, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "cannot remove old keys from mqtt_emit.received_ids");
	SPI_finish();
}

/* the registry was reloaded: the extension may be another now */
void
me_remote_forget_table(void)
{
	seen_table = -1;
	if (seen_plan)
		SPI_freeplan(seen_plan);
	seen_plan = NULL;
}

/*
 * True when key was seen within the TTL (in memory) or is in the
 * persistent record; otherwise remember it in both.
 */
static bool
dedup_seen(const DedupKey *key, TimestampTz now)
{
	DedupEntry *e;
	bool		found;
	TimestampTz cutoff = now - (TimestampTz) mqtt_emit_dedup_ttl * 1000;

	dedup_init();
	while (dedup_count > 0 && dedup_ring[dedup_start].seen < cutoff)
		dedup_pop_oldest();
	if (mqtt_emit_dedup_ttl == 0)
		return received_id_seen(key);

	e = hash_search(dedup_hash, key, HASH_FIND, NULL);
	if (e != NULL)
		return true;
	if (received_id_seen(key))
		return true;

	if (dedup_count == dedup_ring_size)
		dedup_pop_oldest();
	e = hash_search(dedup_hash, key, HASH_ENTER, &found);
	e->seen = now;
	dedup_ring[(dedup_start + dedup_count) % dedup_ring_size] = *e;
	dedup_count++;
	tentative_key = *key;
	tentative = true;
	return false;
}

/*
 * The row being handled starts (listener_worker.c's handle_row): no key of
 * it remembered yet.
 */
void
me_remote_dedup_begin(void)
{
	tentative = false;
}

/*
 * The row's subtransaction rolled back: its key's record in
 * mqtt_emit.received_ids went with it, so memory forgets it too, and the
 * row's next attempt is not taken for a duplicate.  (Its entry in the ring
 * stays; popping it later removes nothing or, if the key came again
 * meanwhile, forgets that one early, which the persistent record covers.)
 */
void
me_remote_dedup_rollback(void)
{
	if (tentative && dedup_hash != NULL)
		hash_search(dedup_hash, &tentative_key, HASH_REMOVE, NULL);
	tentative = false;
}

static bool
looks_like_uuid(const char *s, int len)
{
	int			i;

	if (len != 36)
		return false;
	for (i = 0; i < 36; i++)
	{
		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (s[i] != '-')
				return false;
		}
		else if (!isxdigit((unsigned char) s[i]))
			return false;
	}
	return true;
}

static bool
valid_model_name(const char *s, int len)
{
	int			i;

	if (len == 0 || len > MQTT_EMIT_MAX_MODEL_LEN)
		return false;
	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c < 0x20 || c == '/' || c == '+' || c == '#' || c == 0x7f)
			return false;
	}
	return true;
}

/*
 * Optional string member of a received message: false (rejected) when it
 * is there with another type.
 */
static bool
optional_string(const MeRemoteMessage *m, Jsonb *jb, const char *key, const char **out)
{
	JsonbValue *v = me_json_field(jb, key);
	char		why[64];

	if (v == NULL)
		return true;
	if (v->type != jbvString)
	{
		snprintf(why, sizeof(why), "\"%s\" is not a string", key);
		reject(m, why);
		return false;
	}
	*out = me_jbv_string(v);
	return true;
}

/*
 * Optional object member (or null) of a received message.
 */
static bool
optional_object(const MeRemoteMessage *m, Jsonb *jb, const char *key, Jsonb **out)
{
	JsonbValue *v = me_json_field(jb, key);
	char		why[64];

	if (v != NULL && v->type != jbvNull &&
		!(v->type == jbvBinary && JsonContainerIsObject(v->val.binary.data)))
	{
		snprintf(why, sizeof(why), "\"%s\" is not an object", key);
		reject(m, why);
		return false;
	}
	*out = me_jbv_jsonb(v);
	return true;
}

/*
 * Scan a received JSON text for nesting depth and member count before it is
 * parsed, so that a hostile message costs no more than one pass over its
 * bytes.  Returns NULL when it is within the limits, else the problem.
 */
static const char *
json_shape_problem(const char *s, int len)
{
	int			depth = 0;
	long		keys = 0;
	bool		in_string = false;
	bool		escaped = false;
	int			i;

	for (i = 0; i < len; i++)
	{
		char		c = s[i];

		if (in_string)
		{
			if (escaped)
				escaped = false;
			else if (c == '\\')
				escaped = true;
			else if (c == '"')
				in_string = false;
			continue;
		}
		switch (c)
		{
			case '"':
				in_string = true;
				break;
			case '{':
			case '[':
				if (++depth > MAX_JSON_DEPTH)
					return "JSON nested deeper than 64 levels";
				break;
			case '}':
			case ']':
				depth--;
				break;
			case ':':
				if (++keys > MAX_JSON_KEYS)
					return "JSON with more than 10000 keys";
				break;
			default:
				break;
		}
	}
	return NULL;
}

/*
 * Handle one received message.  Called inside the worker's transaction.
 */
void
me_listeners_handle_remote(const MeRemoteMessage *m)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	Jsonb	   *jb = NULL;
	MeEvent		ev;
	JsonbValue *v;
	const char *tmodel = NULL;
	int			tmodel_len = 0;
	bool		strict;
	DedupKey	key;
	TimestampTz now = GetCurrentTimestamp();
	char	   *volatile model;	/* volatile: set before a PG_TRY (gcc 14 -Wclobbered) */
	const char *self = me_client_id();

	if (me_topic_is_state(m->topic, m->topic_len))
		return;
	me_count(ME_STAT_RECEIVED, 1);

	if (m->payload_len > mqtt_emit_max_payload)
	{
		reject(m, "payload larger than \"mqtt_emit.max_payload\"");
		return;
	}
	/*
	 * <prefix>/<model>/<leaf>, or what RabbitMQ makes of a topic with a "."
	 * (<prefix>/a/b/create for model "a.b"): that one is checked against
	 * the payload's model and operation below.
	 */
	strict = me_topic_split(m->topic, m->topic_len, &tmodel, &tmodel_len);
	if (!strict && !me_topic_mapped_plausible(m->topic, m->topic_len))
	{
		reject(m, "topic does not have the form <prefix>/<model>/<operation>");
		return;
	}
	if ((int) strlen(m->payload) != m->payload_len)
	{
		reject(m, "payload contains a NUL byte");
		return;
	}
	if (!pg_verifymbstr(m->payload, m->payload_len, true))
	{
		reject(m, "payload is not valid in the database encoding");
		return;
	}
	switch (me_check_signature(m->payload, m->payload_len))
	{
		case ME_SIG_BAD:
			reject(m, "signature does not match (check \"mqtt_emit.signing_key\")");
			return;
		case ME_SIG_NONE:
			if (mqtt_emit_require_signature)
			{
				reject(m, "message is not signed and \"mqtt_emit.require_signature\" is on");
				return;
			}
			break;
		case ME_SIG_OK:
			break;
	}
	{
		const char *problem = json_shape_problem(m->payload, m->payload_len);

		if (problem)
		{
			reject(m, problem);
			return;
		}
	}

	/* parse; a syntax error or a too deep document is a rejection */
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(m->payload)));
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		char		why[300];

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		snprintf(why, sizeof(why), "invalid JSON: %.250s", edata->message);
		FreeErrorData(edata);
		reject(m, why);
		return;
	}
	PG_END_TRY();

	if (!JB_ROOT_IS_OBJECT(jb) || JB_ROOT_IS_SCALAR(jb))
	{
		reject(m, "payload is not a JSON object");
		return;
	}

	memset(&ev, 0, sizeof(ev));
	ev.remote = true;
	ev.topic = m->topic;
	ev.payload = jb;
	ev.share_group = m->share_group;

	v = me_json_field(jb, "model");
	if (v == NULL || v->type != jbvString ||
		!valid_model_name(v->val.string.val, v->val.string.len))
	{
		reject(m, "\"model\" is missing, not a string, or not a valid model name");
		return;
	}
	model = me_jbv_string(v);
	ev.model = model;

	v = me_json_field(jb, "operation");
	if (v == NULL || v->type != jbvString || v->val.string.len == 0 ||
		v->val.string.len > 64)
	{
		reject(m, "\"operation\" is missing or not a string");
		return;
	}
	ev.operation = me_jbv_string(v);

	if (!(strict && me_topic_model_matches(tmodel, tmodel_len, model)) &&
		!me_topic_matches_mapped(m->topic, m->topic_len, model, ev.operation))
	{
		if (strict)
			reject(m, "\"model\" does not match the topic");
		else
			reject(m, "topic does not have the form <prefix>/<model>/<operation>");
		return;
	}

	if (!optional_string(m, jb, "eventId", &ev.event_id) ||
		!optional_string(m, jb, "origin", &ev.origin) ||
		!optional_object(m, jb, "args", &ev.args) ||
		!optional_object(m, jb, "result", &ev.result) ||
		!optional_object(m, jb, "old", &ev.old))
		return;

	v = me_json_field(jb, "timestamp");
	if (v != NULL && v->type != jbvString)
	{
		reject(m, "\"timestamp\" is not a string");
		return;
	}
	if (v != NULL)
	{
		char	   *ts = me_jbv_string(v);
		volatile bool ok = true;

		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(oldcxt);
		PG_TRY();
		{
			ev.emitted_at = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in,
																	CStringGetDatum(ts),
																	ObjectIdGetDatum(InvalidOid),
																	Int32GetDatum(-1)));
			ReleaseCurrentSubTransaction();
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(oldcxt);
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			ok = false;
		}
		PG_END_TRY();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (!ok)
		{
			reject(m, "\"timestamp\" is not a valid timestamp");
			return;
		}
		ev.has_emitted_at = true;
	}

	/*
	 * Our own message coming back; through a share group it is this node's
	 * share of the group's events, to run here.
	 */
	if (ev.origin != NULL && strcmp(ev.origin, self) == 0 && m->share_group == NULL)
	{
		me_count(ME_STAT_SELF_ECHO, 1);
		return;
	}

	if (!me_listeners_accept_remote(model, m->share_group))
	{
		reject(m, m->share_group ?
			   "no listener of its share group accepts remote events for this model" :
			   "no listener accepts remote events for this model");
		return;
	}

	/* dedup key: a pg_mqtt_emit event id, else the message bytes */
	if (ev.origin != NULL && ev.event_id != NULL &&
		looks_like_uuid(ev.event_id, strlen(ev.event_id)))
	{
		key.a = hash_bytes_extended((const unsigned char *) ev.event_id, 36, 1);
		key.b = hash_bytes_extended((const unsigned char *) ev.event_id, 36, 2);
	}
	else
	{
		key.a = hash_bytes_extended((const unsigned char *) m->payload, m->payload_len, 3);
		key.b = hash_bytes_extended((const unsigned char *) m->payload, m->payload_len, 4);
	}
	/* per path: a group's copy is another delivery than the plain one */
	if (m->share_group != NULL)
	{
		int			glen = strlen(m->share_group);

		key.a ^= hash_bytes_extended((const unsigned char *) m->share_group, glen, 5);
		key.b ^= hash_bytes_extended((const unsigned char *) m->share_group, glen, 6);
	}
	if (dedup_seen(&key, now))
	{
		me_count(ME_STAT_DEDUPLICATED, 1);
		return;
	}

	me_listeners_dispatch(&ev);
}
