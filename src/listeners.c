/*-------------------------------------------------------------------------
 *
 * listeners.c
 *		Listener registry cache, listener calls, and the handling of
 *		messages received from the bus.  Runs in the background worker only.
 *
 * The registry is the table mqtt_emit.listeners.  The worker keeps a copy,
 * reloaded whenever mqtt_emit.listen() or unlisten() commits (they bump a
 * counter in shared memory).  The rules are the seed's:
 *
 *		listener				local events		remote events
 *		default					runs ('local')		skipped
 *		allow_remote			runs				runs ('remote')
 *		allow_remote+remote_only skipped			runs
 *
 * and a listener's filter (jsonb containment against the event's result)
 * and operation list apply to both.  Models are matched case-insensitively.
 *
 * Each call runs as the role that registered the listener, with its
 * search_path as recorded then, as a security-restricted operation (no SET
 * ROLE back to the worker's superuser, no temporary objects shared between
 * roles), under mqtt_emit.listener_timeout, in a subtransaction of its own:
 * an error is logged with the listener and the event id, counted, and the
 * other listeners still run.
 *
 * Received messages are checked before anything runs: size, encoding, NUL
 * bytes, JSON syntax, field types, model name, and that the topic has the
 * form <prefix>/<model>/<something>.  A message that fails is dropped with a
 * log line (rate-limited) and counted as rejected.  Messages whose origin is
 * this node are our own echo and are skipped.  Others are deduplicated for
 * mqtt_emit.dedup_ttl by a key: the event id when the message comes from a
 * pg_mqtt_emit node (it has an origin and a UUID event id), otherwise a
 * 128-bit hash of the message bytes, because other publishers (the seed)
 * reuse event ids for different events.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/listeners.c
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

/* fields of mqtt_emit.event, in order */
enum
{
	EV_EVENT_ID = 0,
	EV_MODEL,
	EV_OPERATION,
	EV_SOURCE,
	EV_RESULT,
	EV_OLD,
	EV_ARGS,
	EV_ORIGIN,
	EV_EMITTED_AT,
	EV_TOPIC,
	EV_PAYLOAD,
	EV_NATTS
};

typedef struct Listener
{
	int64		id;
	char	   *model;			/* lower case */
	char	   *model_orig;		/* as registered, for subscriptions */
	Oid			fn;
	char	   *fn_name;		/* for log lines */
	bool		allow_remote;
	bool		remote_only;
	Jsonb	   *filter;			/* or NULL */
	List	   *operations;		/* of char *, or NIL for all */
	Oid			owner;
	char	   *search_path;
} Listener;

static MemoryContext reg_cxt = NULL;
static Listener *listeners = NULL;
static int	nlisteners = 0;
static TupleDesc event_desc = NULL;
static bool registry_ok = false;

/* dedup memory */
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

/* what a remote message may be at most */
#define MAX_JSON_DEPTH		64
#define MAX_JSON_KEYS		10000

/* rate limit for rejection log lines */
static TimestampTz reject_log_second = 0;
static int	reject_log_count = 0;

/* A parsed event, local or remote. */
typedef struct EventData
{
	const char *event_id;
	const char *model;
	const char *operation;
	bool		remote;
	Jsonb	   *result;
	Jsonb	   *old;
	Jsonb	   *args;
	const char *origin;
	bool		has_emitted_at;
	TimestampTz emitted_at;
	const char *topic;
	Jsonb	   *payload;
	Oid			relid;			/* local events: the changed table */
} EventData;

static char *
lower_dup(const char *s, int len)
{
	char	   *r = palloc(len + 1);
	int			i;

	for (i = 0; i < len; i++)
		r[i] = (s[i] >= 'A' && s[i] <= 'Z') ? s[i] + ('a' - 'A') : s[i];
	r[len] = '\0';
	return r;
}

/*
 * Reload the registry.  Must run inside a transaction.  Returns false when
 * the extension is not (yet) installed in this database.
 */
bool
me_listeners_refresh(void)
{
	Oid			nsp;
	Oid			typoid;
	int			ret;
	uint64		i;
	MemoryContext old;

	if (reg_cxt == NULL)
		reg_cxt = AllocSetContextCreate(TopMemoryContext, "pg_mqtt_emit listeners",
										ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(reg_cxt);
	listeners = NULL;
	nlisteners = 0;
	event_desc = NULL;
	registry_ok = false;

	if (!OidIsValid(get_extension_oid(MQTT_EMIT_EXTENSION, true)))
		return false;
	nsp = get_namespace_oid(MQTT_EMIT_SCHEMA, true);
	if (!OidIsValid(nsp))
		return false;
	typoid = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
							 CStringGetDatum("event"), ObjectIdGetDatum(nsp));
	if (!OidIsValid(typoid))
		return false;

	old = MemoryContextSwitchTo(reg_cxt);
	event_desc = lookup_rowtype_tupdesc_copy(typoid, -1);
	event_desc = BlessTupleDesc(event_desc);
	MemoryContextSwitchTo(old);

	SPI_connect();
	ret = SPI_execute("SELECT l.id, l.model, l.listener::oid, l.listener::text, "
					  "l.allow_remote, l.remote_only, l.filter, l.operations, "
					  "l.owner::oid, l.search_path "
					  "FROM mqtt_emit.listeners l ORDER BY l.id",
					  true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "cannot read mqtt_emit.listeners: %s", SPI_result_code_string(ret));

	old = MemoryContextSwitchTo(reg_cxt);
	listeners = palloc0(sizeof(Listener) * Max(SPI_processed, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		Listener   *l = &listeners[nlisteners];
		bool		isnull;
		Datum		d;
		char	   *model;

		l->id = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
		model = SPI_getvalue(tup, td, 2);
		l->model = lower_dup(model, strlen(model));
		l->model_orig = model;
		l->fn = DatumGetObjectId(SPI_getbinval(tup, td, 3, &isnull));
		l->fn_name = SPI_getvalue(tup, td, 4);
		l->allow_remote = DatumGetBool(SPI_getbinval(tup, td, 5, &isnull));
		l->remote_only = DatumGetBool(SPI_getbinval(tup, td, 6, &isnull));
		d = SPI_getbinval(tup, td, 7, &isnull);
		l->filter = isnull ? NULL : DatumGetJsonbPCopy(d);
		d = SPI_getbinval(tup, td, 8, &isnull);
		l->operations = NIL;
		if (!isnull)
		{
			ArrayType  *arr = DatumGetArrayTypeP(d);
			Datum	   *elems;
			bool	   *nulls;
			int			n,
						j;

			deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT,
							  &elems, &nulls, &n);
			for (j = 0; j < n; j++)
				if (!nulls[j])
					l->operations = lappend(l->operations,
											TextDatumGetCString(elems[j]));
		}
		l->owner = DatumGetObjectId(SPI_getbinval(tup, td, 9, &isnull));
		l->search_path = SPI_getvalue(tup, td, 10);
		if (l->search_path == NULL)
			l->search_path = pstrdup("pg_catalog");

		/* a listener takes exactly one mqtt_emit.event, whoever wrote the row */
		if (get_func_nargs(l->fn) != 1 || get_func_rettype(l->fn) == InvalidOid)
		{
			ereport(LOG,
					(errmsg("pg_mqtt_emit ignores listener " INT64_FORMAT ": %s is not a function of one mqtt_emit.event",
							l->id, l->fn_name)));
			continue;
		}
		{
			Oid		   *argtypes;
			int			nargs;
			HeapTuple	ftup = SearchSysCache1(PROCOID, ObjectIdGetDatum(l->fn));

			if (!HeapTupleIsValid(ftup))
				continue;
			get_func_signature(l->fn, &argtypes, &nargs);
			ReleaseSysCache(ftup);
			if (nargs != 1 || argtypes[0] != typoid)
			{
				ereport(LOG,
						(errmsg("pg_mqtt_emit ignores listener " INT64_FORMAT ": %s is not a function of one mqtt_emit.event",
								l->id, l->fn_name)));
				continue;
			}
		}
		nlisteners++;
	}
	MemoryContextSwitchTo(old);
	SPI_finish();
	registry_ok = true;
	return true;
}

static bool
model_matches(const Listener *l, const char *model, int len)
{
	int			i;

	for (i = 0; i < len; i++)
	{
		char		c = model[i];

		if (c >= 'A' && c <= 'Z')
			c += 'a' - 'A';
		if (l->model[i] != c)
			return false;
	}
	return l->model[len] == '\0';
}

bool
me_listeners_want_local(const char *model, int model_len)
{
	int			i;

	for (i = 0; i < nlisteners; i++)
		if (!listeners[i].remote_only &&
			model_matches(&listeners[i], model, model_len))
			return true;
	return false;
}

/*
 * Models that some listener accepts remote events for, palloc'd in the
 * current context.
 */
List *
me_listeners_remote_models(void)
{
	List	   *r = NIL;
	int			i;

	for (i = 0; i < nlisteners; i++)
		if (listeners[i].allow_remote)
		{
			ListCell   *lc;
			bool		seen = false;

			foreach(lc, r)
				if (strcmp((char *) lfirst(lc), listeners[i].model_orig) == 0)
					seen = true;
			if (!seen)
				r = lappend(r, pstrdup(listeners[i].model_orig));
		}
	return r;
}

static Datum
text_or_null(const char *s, bool *isnull)
{
	*isnull = (s == NULL);
	return s ? CStringGetTextDatum(s) : (Datum) 0;
}

/*
 * Call one listener in a subtransaction of its own, as its owner.
 */
static void
call_listener(Listener *l, Datum event, const EventData *ev)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	Oid			save_userid;
	int			save_sec;

	me_count(ME_STAT_LISTENER_CALLS, 1);
	GetUserIdAndSecContext(&save_userid, &save_sec);

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);

	PG_TRY();
	{
		int			nestlevel;

		SetUserIdAndSecContext(l->owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
							   SECURITY_RESTRICTED_OPERATION);
		nestlevel = NewGUCNestLevel();
		(void) set_config_option("search_path", l->search_path,
								 PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		/* the role may have lost the right since it registered */
		if (me_proc_aclcheck(l->fn, l->owner, ACL_EXECUTE) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied for function %s", l->fn_name),
					 errdetail("The listener runs as the role that registered it, which may no longer execute it.")));
		if (mqtt_emit_listener_timeout > 0)
			enable_timeout_after(STATEMENT_TIMEOUT, mqtt_emit_listener_timeout);

		{
			/*
			 * Not OidFunctionCall1: it rejects a NULL result, which is what
			 * a LANGUAGE sql function RETURNS void gives.  A listener's
			 * result is ignored, NULL or not.
			 */
			FmgrInfo	flinfo;
			LOCAL_FCINFO(fcinfo, 1);

			fmgr_info(l->fn, &flinfo);
			InitFunctionCallInfoData(*fcinfo, &flinfo, 1, InvalidOid, NULL, NULL);
			fcinfo->args[0].value = event;
			fcinfo->args[0].isnull = false;
			(void) FunctionCallInvoke(fcinfo);
		}

		if (mqtt_emit_listener_timeout > 0)
			disable_timeout(STATEMENT_TIMEOUT, false);
		/* nothing the listener set outlives its call */
		AtEOXact_GUC(false, nestlevel);
		SetUserIdAndSecContext(save_userid, save_sec);

		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		if (mqtt_emit_listener_timeout > 0)
			disable_timeout(STATEMENT_TIMEOUT, false);
		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();

		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		SetUserIdAndSecContext(save_userid, save_sec);

		me_count(ME_STAT_LISTENER_ERRORS, 1);
		me_set_last_error("listener %s failed for event %s: %s",
						  l->fn_name, ev->event_id ? ev->event_id : "(none)",
						  edata->message);
		ereport(LOG,
				(errmsg("pg_mqtt_emit listener %s (id " INT64_FORMAT ") failed for %s event %s on model \"%s\": %s",
						l->fn_name, l->id, ev->remote ? "remote" : "local",
						ev->event_id ? ev->event_id : "(none)", ev->model,
						edata->message),
				 edata->detail ? errdetail_internal("%s", edata->detail) : 0,
				 errcontext("SQLSTATE %s", unpack_sql_state(edata->sqlerrcode))));
		FreeErrorData(edata);
	}
	PG_END_TRY();
}

/*
 * Run every listener that wants this event.
 */
static void
dispatch(const EventData *ev)
{
	Datum		values[EV_NATTS];
	bool		nulls[EV_NATTS];
	HeapTuple	tup = NULL;
	Datum		event = (Datum) 0;
	int			i;
	int			mlen = strlen(ev->model);

	for (i = 0; i < nlisteners; i++)
	{
		Listener   *l = &listeners[i];

		if (!model_matches(l, ev->model, mlen))
			continue;
		if (ev->remote ? !l->allow_remote : l->remote_only)
			continue;

		/*
		 * A local event carries rows of a table: only roles that may read
		 * it (all of its columns) get them, so a listener cannot be used to
		 * read what its owner may not SELECT.
		 */
		if (!ev->remote && OidIsValid(ev->relid) &&
			pg_class_aclcheck(ev->relid, l->owner, ACL_SELECT) != ACLCHECK_OK &&
			pg_attribute_aclcheck_all(ev->relid, l->owner, ACL_SELECT,
									  ACLMASK_ALL) != ACLCHECK_OK)
		{
			ereport(DEBUG1,
					(errmsg("pg_mqtt_emit listener %s skipped: role %u may not read table %u",
							l->fn_name, l->owner, ev->relid)));
			continue;
		}
		if (l->operations != NIL)
		{
			ListCell   *lc;
			bool		found = false;

			foreach(lc, l->operations)
				if (pg_strcasecmp((char *) lfirst(lc), ev->operation) == 0)
					found = true;
			if (!found)
				continue;
		}
		if (l->filter != NULL)
		{
			if (ev->result == NULL ||
				!DatumGetBool(DirectFunctionCall2(jsonb_contains,
												  JsonbPGetDatum(ev->result),
												  JsonbPGetDatum(l->filter))))
				continue;
		}

		if (tup == NULL)
		{
			memset(nulls, 0, sizeof(nulls));
			values[EV_EVENT_ID] = text_or_null(ev->event_id, &nulls[EV_EVENT_ID]);
			values[EV_MODEL] = text_or_null(ev->model, &nulls[EV_MODEL]);
			values[EV_OPERATION] = text_or_null(ev->operation, &nulls[EV_OPERATION]);
			values[EV_SOURCE] = CStringGetTextDatum(ev->remote ? "remote" : "local");
			values[EV_RESULT] = JsonbPGetDatum(ev->result);
			nulls[EV_RESULT] = (ev->result == NULL);
			values[EV_OLD] = JsonbPGetDatum(ev->old);
			nulls[EV_OLD] = (ev->old == NULL);
			values[EV_ARGS] = JsonbPGetDatum(ev->args);
			nulls[EV_ARGS] = (ev->args == NULL);
			values[EV_ORIGIN] = text_or_null(ev->origin, &nulls[EV_ORIGIN]);
			values[EV_EMITTED_AT] = TimestampTzGetDatum(ev->emitted_at);
			nulls[EV_EMITTED_AT] = !ev->has_emitted_at;
			values[EV_TOPIC] = text_or_null(ev->topic, &nulls[EV_TOPIC]);
			values[EV_PAYLOAD] = JsonbPGetDatum(ev->payload);
			nulls[EV_PAYLOAD] = (ev->payload == NULL);
			if (event_desc->natts < EV_NATTS)
				elog(ERROR, "type mqtt_emit.event has %d attributes, expected %d",
					 event_desc->natts, EV_NATTS);
			tup = heap_form_tuple(event_desc, values, nulls);
			event = HeapTupleGetDatum(tup);
		}
		call_listener(l, event, ev);
	}
}

/* Find key in a jsonb object; NULL when absent. */
static JsonbValue *
get_field(Jsonb *jb, const char *key)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	return findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &k);
}

static char *
jbv_string(JsonbValue *v)
{
	return pnstrdup(v->val.string.val, v->val.string.len);
}

static Jsonb *
jbv_jsonb(JsonbValue *v)
{
	if (v == NULL || v->type == jbvNull)
		return NULL;
	return JsonbValueToJsonb(v);
}

/*
 * Run the local listeners of one queued event.  Called inside the worker's
 * transaction.
 */
void
me_listeners_run_local(const MqttEmitEventHeader *hdr, const char *model,
					   const char *payload, const char *topic)
{
	EventData	ev;
	char	   *text = pnstrdup(payload, hdr->payload_len);
	Jsonb	   *jb;
	JsonbValue *v;

	if (!registry_ok)
		return;
	jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(text)));

	memset(&ev, 0, sizeof(ev));
	ev.model = pnstrdup(model, hdr->model_len);
	ev.operation = me_op_name(hdr->op);
	ev.remote = false;
	ev.relid = hdr->relid;
	ev.topic = topic;
	ev.payload = jb;
	if ((v = get_field(jb, "eventId")) != NULL && v->type == jbvString)
		ev.event_id = jbv_string(v);
	ev.result = jbv_jsonb(get_field(jb, "result"));
	ev.old = jbv_jsonb(get_field(jb, "old"));
	ev.args = jbv_jsonb(get_field(jb, "args"));
	if ((v = get_field(jb, "origin")) != NULL && v->type == jbvString)
		ev.origin = jbv_string(v);
	if ((v = get_field(jb, "timestamp")) != NULL && v->type == jbvString)
	{
		char	   *ts = jbv_string(v);

		ev.emitted_at = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in,
																CStringGetDatum(ts),
																ObjectIdGetDatum(InvalidOid),
																Int32GetDatum(-1)));
		ev.has_emitted_at = true;
	}
	dispatch(&ev);
}

/* ----- remote messages ----- */

static void
reject(const MeIncoming *m, const char *why)
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
	me_set_last_error("rejected message on \"%.100s\": %s", m->topic, why);
	ereport(elevel,
			(errmsg("pg_mqtt_emit rejected a message on topic \"%.200s\": %s",
					m->topic, why),
			 errdetail("The message had %d bytes.", m->payload_len)));
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
 * True when key was seen within the TTL; otherwise remember it.
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
		return false;

	e = hash_search(dedup_hash, key, HASH_FIND, NULL);
	if (e != NULL)
		return true;

	if (dedup_count == dedup_ring_size)
		dedup_pop_oldest();
	e = hash_search(dedup_hash, key, HASH_ENTER, &found);
	e->seen = now;
	dedup_ring[(dedup_start + dedup_count) % dedup_ring_size] = *e;
	dedup_count++;
	return false;
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
 * Check that the topic is <prefix>/<model>/<leaf>, prefix compared without
 * regard to case (the seed lower-cases whole topics), and return the model
 * level's start and length.
 */
static bool
split_topic(const MeIncoming *m, const char **model, int *model_len)
{
	int			plen = strlen(mqtt_emit_topic_prefix);
	const char *rest;
	const char *slash;

	if (m->topic_len <= plen + 1 ||
		pg_strncasecmp(m->topic, mqtt_emit_topic_prefix, plen) != 0 ||
		m->topic[plen] != '/')
		return false;
	rest = m->topic + plen + 1;
	slash = strchr(rest, '/');
	if (slash == NULL || slash == rest || slash[1] == '\0' ||
		strchr(slash + 1, '/') != NULL)
		return false;
	*model = rest;
	*model_len = slash - rest;
	return true;
}

/*
 * Optional string member of a received message: false (rejected) when it
 * is there with another type.
 */
static bool
optional_string(const MeIncoming *m, Jsonb *jb, const char *key, const char **out)
{
	JsonbValue *v = get_field(jb, key);
	char		why[64];

	if (v == NULL)
		return true;
	if (v->type != jbvString)
	{
		snprintf(why, sizeof(why), "\"%s\" is not a string", key);
		reject(m, why);
		return false;
	}
	*out = jbv_string(v);
	return true;
}

/*
 * Optional object member (or null) of a received message.
 */
static bool
optional_object(const MeIncoming *m, Jsonb *jb, const char *key, Jsonb **out)
{
	JsonbValue *v = get_field(jb, key);
	char		why[64];

	if (v != NULL && v->type != jbvNull &&
		!(v->type == jbvBinary && JsonContainerIsObject(v->val.binary.data)))
	{
		snprintf(why, sizeof(why), "\"%s\" is not an object", key);
		reject(m, why);
		return false;
	}
	*out = jbv_jsonb(v);
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
me_listeners_handle_remote(MeIncoming *m)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	Jsonb	   *jb = NULL;
	EventData	ev;
	JsonbValue *v;
	const char *tmodel;
	int			tmodel_len;
	DedupKey	key;
	TimestampTz now = GetCurrentTimestamp();
	char	   *volatile model;	/* volatile: set before a PG_TRY (gcc 14 -Wclobbered) */
	int			i;
	bool		wanted = false;
	const char *self = me_client_id();

	me_count(ME_STAT_RECEIVED, 1);

	if (m->payload_len > mqtt_emit_max_payload)
	{
		reject(m, "payload larger than \"mqtt_emit.max_payload\"");
		return;
	}
	if (!split_topic(m, &tmodel, &tmodel_len))
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

	v = get_field(jb, "model");
	if (v == NULL || v->type != jbvString ||
		!valid_model_name(v->val.string.val, v->val.string.len))
	{
		reject(m, "\"model\" is missing, not a string, or not a valid model name");
		return;
	}
	model = jbv_string(v);
	ev.model = model;
	{
		/* the topic level is the model with "/", "+", "#", "%" encoded */
		StringInfoData enc;

		initStringInfo(&enc);
		me_append_topic_model(&enc, model, strlen(model), false);
		if (tmodel_len != enc.len || pg_strncasecmp(tmodel, enc.data, tmodel_len) != 0)
		{
			reject(m, "\"model\" does not match the topic");
			return;
		}
	}

	v = get_field(jb, "operation");
	if (v == NULL || v->type != jbvString || v->val.string.len == 0 ||
		v->val.string.len > 64)
	{
		reject(m, "\"operation\" is missing or not a string");
		return;
	}
	ev.operation = jbv_string(v);

	if (!optional_string(m, jb, "eventId", &ev.event_id) ||
		!optional_string(m, jb, "origin", &ev.origin) ||
		!optional_object(m, jb, "args", &ev.args) ||
		!optional_object(m, jb, "result", &ev.result) ||
		!optional_object(m, jb, "old", &ev.old))
		return;

	v = get_field(jb, "timestamp");
	if (v != NULL && v->type != jbvString)
	{
		reject(m, "\"timestamp\" is not a string");
		return;
	}
	if (v != NULL)
	{
		char	   *ts = jbv_string(v);
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

	/* our own message coming back */
	if (ev.origin != NULL && strcmp(ev.origin, self) == 0)
	{
		me_count(ME_STAT_SELF_ECHO, 1);
		return;
	}

	if (registry_ok)
		for (i = 0; i < nlisteners; i++)
			if (listeners[i].allow_remote &&
				model_matches(&listeners[i], model, strlen(model)))
				wanted = true;
	if (!wanted)
	{
		reject(m, "no listener accepts remote events for this model");
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
	if (dedup_seen(&key, now))
	{
		me_count(ME_STAT_DEDUPLICATED, 1);
		return;
	}

	dispatch(&ev);
}
