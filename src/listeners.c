/*-------------------------------------------------------------------------
 *
 * listeners.c
 *		Listener registry cache and listener calls.  Runs in the background
 *		worker only.
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
 * A listener with a share_group (it must accept remote events) runs only
 * for what arrives through its group's shared subscription (inbound.c,
 * topic.c): every event of its model published on the bus, this node's
 * own included, each given by the broker to one node of the group
 * (source 'remote').  It does not run for local events, nor for what
 * arrives through the plain subscription, which the listeners without a
 * group take.
 *
 * Each call runs as the role that registered the listener, with its
 * search_path as recorded then, as a security-restricted operation (no SET
 * ROLE back to the worker's superuser, no temporary objects shared between
 * roles), under mqtt_emit.listener_timeout, in a subtransaction of its own:
 * an error is logged with the listener and the event id, counted, and the
 * other listeners still run.
 *
 * A local event reaches a listener only if its role may SELECT the table
 * (all of its columns) and, under the table's row security, the row
 * (rowsec.c).
 *
 * Received messages are checked and deduplicated in remote.c, which hands
 * them to me_listeners_dispatch().
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
#include "catalog/pg_authid.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "portability/instr_time.h"
#include "storage/lmgr.h"
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
#include "rowsec.h"
#include "topic.h"

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
	char	   *share_group;	/* or NULL */
	Jsonb	   *filter;			/* or NULL */
	List	   *operations;		/* of char *, or NIL for all */
	Oid			owner;
	char	   *search_path;
	bool		skip_logged;	/* said once why a call was skipped */
} Listener;

/* a listener that does not run, and why, as said at the last load */
typedef struct SkipNote
{
	int64		id;
	char	   *why;
} SkipNote;

/* how long a worker waits for a lock on the registry, and then for a retry */
#define REGISTRY_LOCK_TIMEOUT_MS	100
#define RELOAD_RETRY_MS				1000

static MemoryContext reg_cxt = NULL;	/* the registry in use */
static MemoryContext load_cxt = NULL;	/* the registry being loaded */
static Listener *listeners = NULL;
static int	nlisteners = 0;
static TupleDesc event_desc = NULL;
static bool registry_ok = false;
static Oid	remote_right_fn = InvalidOid;	/* mqtt_emit.may_listen_remote() */
static SkipNote *notes = NULL;
static int	nnotes = 0;
static int	maxnotes = 0;
static bool report_skips = false;	/* LOG them (listener worker) */
static TimestampTz retry_after = 0;
static TimestampTz last_failure_log = 0;
static uint64 calls_made = 0;	/* listener calls by this process */
static int	hard_timeout = -1;	/* TimeoutId ending a listener that will not stop */

static char *
lower_dup(const char *s, int len)
{
	char	   *r = pnstrdup(s, len);

	me_ascii_lower(r, len);
	return r;
}

/*
 * The query that reads the registry (%s: the table, with a share_group
 * column of NULLs where it has none, as in 0.1.0).  It joins pg_proc and pg_roles so that
 * a row whose function or role is gone (a pg_temp function after its
 * session, DROP FUNCTION, DROP OWNED and DROP ROLE) is named, not looked up,
 * and it says why a row must not run (problem), without detoasting fields
 * that are larger than the registry allows.  may_remote: the owner may
 * receive remote events (EXECUTE on mqtt_emit.may_listen_remote(); where
 * that function does not exist yet, superusers only).
 */
#define REGISTRY_QUERY \
	"SELECT l.id, CASE WHEN pg_catalog.octet_length(l.model) <= 1000 THEN l.model END, l.listener::pg_catalog.oid, " \
	"       coalesce(p.oid::pg_catalog.regprocedure::pg_catalog.text, l.listener::pg_catalog.oid::pg_catalog.text), " \
	"       l.allow_remote, l.remote_only, " \
	"       CASE WHEN pg_catalog.pg_column_size(l.filter) <= " CppAsString2(ME_REGISTRY_MAX_FILTER_STORED) " THEN l.filter END, " \
	"       CASE WHEN pg_catalog.cardinality(l.operations) <= " CppAsString2(ME_REGISTRY_MAX_OPERATIONS) " THEN l.operations END, " \
	"       l.owner::pg_catalog.oid, " \
	"       CASE WHEN pg_catalog.octet_length(l.search_path) <= " CppAsString2(ME_REGISTRY_MAX_SEARCH_PATH) " THEN l.search_path END, " \
	"       CASE WHEN p.oid IS NULL THEN 'its function no longer exists' " \
	"            WHEN r.oid IS NULL THEN 'its role no longer exists' " \
	"            WHEN NOT r.rolcanlogin THEN 'its role cannot log in' " \
	"            WHEN pg_catalog.octet_length(l.model) > 1000 THEN 'its model name is too long' " \
	"            WHEN pg_catalog.pg_is_other_temp_schema(p.pronamespace) " \
	"              OR p.pronamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema() " \
	"                 THEN 'its function is a temporary one' " \
	"            WHEN pg_catalog.octet_length(l.search_path) > " CppAsString2(ME_REGISTRY_MAX_SEARCH_PATH) \
	"                 THEN 'its search_path is longer than " CppAsString2(ME_REGISTRY_MAX_SEARCH_PATH) " bytes' " \
	"            WHEN pg_catalog.pg_column_size(l.filter) > " CppAsString2(ME_REGISTRY_MAX_FILTER_STORED) \
	"                 THEN 'its filter is too large' " \
	"            WHEN pg_catalog.cardinality(l.operations) > " CppAsString2(ME_REGISTRY_MAX_OPERATIONS) \
	"                 THEN 'it lists too many operations' " \
	"            WHEN pg_catalog.row_number() OVER (PARTITION BY l.owner ORDER BY l.id) > " CppAsString2(ME_REGISTRY_MAX_PER_ROLE) \
	"                 THEN 'its role has more than " CppAsString2(ME_REGISTRY_MAX_PER_ROLE) " listeners' " \
	"            WHEN pg_catalog.row_number() OVER (ORDER BY l.id) > " CppAsString2(ME_REGISTRY_MAX_TOTAL) \
	"                 THEN 'the registry has more than " CppAsString2(ME_REGISTRY_MAX_TOTAL) " listeners' " \
	"            WHEN l.share_group IS NOT NULL AND NOT l.allow_remote " \
	"                 THEN 'it has a share group but does not accept remote events' " \
	"            WHEN pg_catalog.octet_length(l.share_group) > " CppAsString2(ME_SHARE_GROUP_MAX) \
	"                 THEN 'its share group name is too long' " \
	"       END AS problem, " \
	"       coalesce(pg_catalog.has_function_privilege(l.owner::pg_catalog.oid, " \
	"                    pg_catalog.to_regprocedure('mqtt_emit.may_listen_remote()'), 'EXECUTE'), " \
	"                r.rolsuper, false) AS may_remote, " \
	"       l.share_group " \
	"  FROM %s " \
	"  LEFT JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) l.listener::pg_catalog.oid " \
	"  LEFT JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) l.owner::pg_catalog.oid " \
	" ORDER BY l.id"

/*
 * Say once why a listener does not run (or runs for local events only):
 * LOG in the listener worker (the process that would run it), DEBUG1 in
 * the worker, and only when the reason is new since the previous load, so
 * that reloads do not repeat it.
 */
static void
note_skip(SkipNote *old_notes, int nold, int64 id, const char *fn_name,
		  Oid owner, const char *why, bool remote_only_lost)
{
	int			i;
	MemoryContext old;

	for (i = 0; i < nold; i++)
		if (old_notes[i].id == id && strcmp(old_notes[i].why, why) == 0)
			break;
	if (i == nold)
		ereport(report_skips ? LOG : DEBUG1,
				(errmsg("pg_mqtt_emit %s listener " INT64_FORMAT " (%s of role %u): %s",
						remote_only_lost ? "runs for local events only:" : "ignores",
						id, fn_name, owner, why),
				 remote_only_lost ?
				 errhint("Superusers may grant the right with GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() TO the role.") :
				 errhint("Remove it with mqtt_emit.unlisten(" INT64_FORMAT ").", id)));

	/* remember it, in the new registry's context */
	old = MemoryContextSwitchTo(load_cxt);
	if (nnotes == maxnotes)
	{
		maxnotes = Max(16, maxnotes * 2);
		notes = notes ? repalloc(notes, sizeof(SkipNote) * maxnotes) :
			palloc(sizeof(SkipNote) * maxnotes);
	}
	notes[nnotes].id = id;
	notes[nnotes].why = pstrdup(why);
	nnotes++;
	MemoryContextSwitchTo(old);
}

/*
 * Read the registry into load_cxt (listeners, nlisteners, event_desc,
 * notes).  Runs in a subtransaction of me_listeners_refresh(); may raise.
 * Returns false when the extension is not (yet) installed here.
 */
static bool
load_registry(SkipNote *old_notes, int nold)
{
	Oid			nsp;
	Oid			relid;
	Oid			typoid;
	int			ret;
	uint64		i;
	MemoryContext old;

	if (!OidIsValid(get_extension_oid(MQTT_EMIT_EXTENSION, true)))
		return false;
	nsp = get_namespace_oid(MQTT_EMIT_SCHEMA, true);
	if (!OidIsValid(nsp))
		return false;
	typoid = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
							 CStringGetDatum("event"), ObjectIdGetDatum(nsp));
	if (!OidIsValid(typoid))
		return false;

	old = MemoryContextSwitchTo(load_cxt);
	event_desc = lookup_rowtype_tupdesc_copy(typoid, -1);
	event_desc = BlessTupleDesc(event_desc);
	remote_right_fn = InvalidOid;
	{
		List	   *names = list_make2(makeString(MQTT_EMIT_SCHEMA),
									   makeString("may_listen_remote"));

		remote_right_fn = LookupFuncName(names, 0, NULL, true);
	}
	MemoryContextSwitchTo(old);

	/*
	 * The lock first: the query's text depends on the table's columns,
	 * which must not change (ALTER EXTENSION UPDATE) between looking and
	 * running it.  Under the lock_timeout of the caller.
	 */
	relid = get_relname_relid("listeners", nsp);
	if (!OidIsValid(relid))
		return false;
	LockRelationOid(relid, AccessShareLock);
	SPI_connect();
	ret = SPI_execute(psprintf(REGISTRY_QUERY,
							   get_attnum(relid, "share_group") != InvalidAttrNumber ?
							   "mqtt_emit.listeners l" :
							   "(SELECT l.*, NULL::pg_catalog.text AS share_group"
							   " FROM mqtt_emit.listeners l) l"),
					  true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "cannot read mqtt_emit.listeners: %s", SPI_result_code_string(ret));

	old = MemoryContextSwitchTo(load_cxt);
	listeners = palloc0(sizeof(Listener) * Max(SPI_processed, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		Listener   *l = &listeners[nlisteners];
		bool		isnull;
		Datum		d;
		char	   *model;
		char	   *problem;

		l->id = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
		model = SPI_getvalue(tup, td, 2);
		l->fn = DatumGetObjectId(SPI_getbinval(tup, td, 3, &isnull));
		l->fn_name = SPI_getvalue(tup, td, 4);
		l->owner = DatumGetObjectId(SPI_getbinval(tup, td, 9, &isnull));
		problem = SPI_getvalue(tup, td, 11);
		if (problem != NULL)
		{
			note_skip(old_notes, nold, l->id, l->fn_name, l->owner, problem, false);
			continue;
		}
		l->model = lower_dup(model, strlen(model));
		l->model_orig = model;
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
		l->search_path = SPI_getvalue(tup, td, 10);
		if (l->search_path == NULL)
			l->search_path = pstrdup("pg_catalog");
		l->share_group = SPI_getvalue(tup, td, 13);
		if (l->share_group &&
			me_share_group_problem(l->share_group, strlen(l->share_group)) != NULL)
		{
			note_skip(old_notes, nold, l->id, l->fn_name, l->owner,
					  "its share group name is not valid", false);
			continue;
		}

		/*
		 * A listener takes exactly one mqtt_emit.event, whoever wrote the
		 * row.  The query's snapshot may still see a function that a DROP
		 * FUNCTION committed since has taken out of the catalog caches: that
		 * row is one whose function no longer exists, not an error (which
		 * would keep the whole registry from loading).
		 */
		{
			HeapTuple	proctup;
			bool		one_event;

			proctup = SearchSysCache1(PROCOID, ObjectIdGetDatum(l->fn));
			if (!HeapTupleIsValid(proctup))
			{
				note_skip(old_notes, nold, l->id, l->fn_name, l->owner,
						  "its function no longer exists", false);
				continue;
			}
			{
				Form_pg_proc procform = (Form_pg_proc) GETSTRUCT(proctup);

				one_event = procform->pronargs == 1 &&
					procform->proargtypes.values[0] == typoid;
			}
			ReleaseSysCache(proctup);
			if (!one_event)
			{
				note_skip(old_notes, nold, l->id, l->fn_name, l->owner,
						  "it is not a function of one mqtt_emit.event", false);
				continue;
			}
		}

		/* receiving remote events is a right that superusers grant */
		if (l->allow_remote &&
			!DatumGetBool(SPI_getbinval(tup, td, 12, &isnull)))
		{
			/* a grouped listener runs for nothing else */
			if (l->remote_only || l->share_group)
			{
				note_skip(old_notes, nold, l->id, l->fn_name, l->owner,
						  "its role may not receive remote events", false);
				continue;
			}
			note_skip(old_notes, nold, l->id, l->fn_name, l->owner,
					  "its role may not receive remote events", true);
			l->allow_remote = false;
		}
		nlisteners++;
	}
	MemoryContextSwitchTo(old);
	SPI_finish();
	return true;
}

/*
 * Reload the registry.  Must run inside a transaction, which it leaves
 * usable whatever happens: the reading is done in a subtransaction, under
 * a short lock_timeout, so that nobody holding a lock on the registry can
 * make a worker wait, and no row, however broken, can make it fail.  When
 * it cannot be read, the copy loaded before stays in effect, the failure
 * is logged (at most once a minute) and the next call within
 * RELOAD_RETRY_MS returns ME_REGISTRY_KEPT without trying.
 */
MeRegistryLoad
me_listeners_refresh(void)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	TimestampTz now = GetCurrentTimestamp();
	SkipNote   *old_notes = notes;
	int			nold = nnotes;
	volatile MeRegistryLoad result = ME_REGISTRY_KEPT;

	if (now < retry_after)
		return ME_REGISTRY_KEPT;

	/* load into a context of its own; the current registry stays meanwhile */
	load_cxt = AllocSetContextCreate(TopMemoryContext, "pg_mqtt_emit listeners",
									 ALLOCSET_DEFAULT_SIZES);
	{
		Listener   *keep_listeners = listeners;
		int			keep_n = nlisteners;
		TupleDesc	keep_desc = event_desc;
		Oid			keep_right = remote_right_fn;

		listeners = NULL;
		nlisteners = 0;
		event_desc = NULL;
		notes = NULL;
		nnotes = 0;
		maxnotes = 0;

		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(oldcxt);
		PG_TRY();
		{
			int			nestlevel = NewGUCNestLevel();

			(void) set_config_option("lock_timeout", CppAsString2(REGISTRY_LOCK_TIMEOUT_MS),
									 PGC_SUSET, PGC_S_SESSION,
									 GUC_ACTION_SAVE, true, 0, false);
			result = load_registry(old_notes, nold) ?
				ME_REGISTRY_LOADED : ME_REGISTRY_ABSENT;
			AtEOXact_GUC(true, nestlevel);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcxt);
			CurrentResourceOwner = oldowner;
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(oldcxt);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcxt);
			CurrentResourceOwner = oldowner;

			if (now - last_failure_log >= 60 * USECS_PER_SEC)
			{
				ereport(LOG,
						(errmsg("pg_mqtt_emit could not read the listener registry: %s",
								edata->message),
						 errdetail("The listeners loaded before stay in effect; reading is tried again every %d ms.",
								   RELOAD_RETRY_MS),
						 edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE ?
						 errhint("Another session holds a lock on \"mqtt_emit.listeners\"; see pg_locks.") : 0));
				last_failure_log = now;
			}
			FreeErrorData(edata);
			result = ME_REGISTRY_KEPT;
		}
		PG_END_TRY();

		if (result == ME_REGISTRY_KEPT)
		{
			MemoryContextDelete(load_cxt);
			load_cxt = NULL;
			listeners = keep_listeners;
			nlisteners = keep_n;
			event_desc = keep_desc;
			remote_right_fn = keep_right;
			notes = old_notes;
			nnotes = nold;
			maxnotes = nold;
			retry_after = now + (TimestampTz) RELOAD_RETRY_MS * 1000;
			return result;
		}
	}

	if (last_failure_log != 0)
	{
		ereport(LOG,
				(errmsg("pg_mqtt_emit read the listener registry again")));
		last_failure_log = 0;
	}
	if (reg_cxt != NULL)
		MemoryContextDelete(reg_cxt);
	reg_cxt = load_cxt;
	load_cxt = NULL;
	retry_after = 0;
	registry_ok = (result == ME_REGISTRY_LOADED);
	return result;
}

/*
 * Called by the listener worker: it reports at LOG why listeners do not
 * run (the worker only at DEBUG1, so that each is said once).
 */
void
me_listeners_report_skips(void)
{
	report_skips = true;
}

static bool
model_matches(const Listener *l, const char *model, int len)
{
	int			i;

	for (i = 0; i < len; i++)
		if (l->model[i] != (char) pg_ascii_tolower((unsigned char) model[i]))
			return false;
	return l->model[len] == '\0';
}

/* Does the listener take local events? */
static bool
takes_local(const Listener *l)
{
	return !l->remote_only && l->share_group == NULL;
}

/* the same share group, or both none */
static bool
same_group(const char *a, const char *b)
{
	return a == NULL ? b == NULL : b != NULL && strcmp(a, b) == 0;
}

/* Does any listener take local events (of any model)? */
bool
me_listeners_any_local(void)
{
	int			i;

	for (i = 0; i < nlisteners; i++)
		if (takes_local(&listeners[i]))
			return true;
	return false;
}

bool
me_listeners_want_local(const char *model, int model_len)
{
	int			i;

	for (i = 0; i < nlisteners; i++)
		if (takes_local(&listeners[i]) &&
			model_matches(&listeners[i], model, model_len))
			return true;
	return false;
}

/*
 * The paths remote events are to arrive on: each model that some listener
 * accepts remote events for, with the share group of such a listener
 * (NULL: the plain subscription), once per distinct pair, palloc'd in the
 * current context.
 */
List *
me_listeners_remote_paths(void)
{
	List	   *r = NIL;
	int			i;

	for (i = 0; i < nlisteners; i++)
		if (listeners[i].allow_remote)
		{
			ListCell   *lc;
			bool		seen = false;
			MeRemotePath *p;

			foreach(lc, r)
			{
				p = (MeRemotePath *) lfirst(lc);
				if (strcmp(p->model, listeners[i].model_orig) == 0 &&
					same_group(p->group, listeners[i].share_group))
					seen = true;
			}
			if (seen)
				continue;
			p = palloc(sizeof(MeRemotePath));
			p->model = pstrdup(listeners[i].model_orig);
			p->group = listeners[i].share_group ? pstrdup(listeners[i].share_group) : NULL;
			r = lappend(r, p);
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
call_listener(Listener *l, Datum event, const MeEvent *ev)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	Oid			save_userid;
	int			save_sec;
	instr_time	start;
	instr_time	elapsed;

	me_count(ME_STAT_LISTENER_CALLS, 1);
	INSTR_TIME_SET_CURRENT(start);
	calls_made++;
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
		{
			enable_timeout_after(STATEMENT_TIMEOUT, mqtt_emit_listener_timeout);
			/* a listener that catches the cancel is ended a second later */
			if (hard_timeout >= 0)
				enable_timeout_after((TimeoutId) hard_timeout,
									 mqtt_emit_listener_timeout + 1000);
		}

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
		{
			disable_timeout(STATEMENT_TIMEOUT, false);
			if (hard_timeout >= 0)
				disable_timeout((TimeoutId) hard_timeout, false);
		}
		/* nothing the listener set outlives its call */
		AtEOXact_GUC(false, nestlevel);
		SetUserIdAndSecContext(save_userid, save_sec);

		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		INSTR_TIME_SET_CURRENT(elapsed);
		INSTR_TIME_SUBTRACT(elapsed, start);
		me_listener_stats_count(l->id, false, INSTR_TIME_GET_MILLISEC(elapsed));
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		if (mqtt_emit_listener_timeout > 0)
		{
			disable_timeout(STATEMENT_TIMEOUT, false);
			if (hard_timeout >= 0)
				disable_timeout((TimeoutId) hard_timeout, false);
		}
		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();

		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		SetUserIdAndSecContext(save_userid, save_sec);

		me_count(ME_STAT_LISTENER_ERRORS, 1);
		INSTR_TIME_SET_CURRENT(elapsed);
		INSTR_TIME_SUBTRACT(elapsed, start);
		me_listener_stats_count(l->id, true, INSTR_TIME_GET_MILLISEC(elapsed));
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
 * What the load checked, checked again before a call, from the caches:
 * the function, the role and its LOGIN may have gone since (a pg_temp
 * function's session ended, DROP ROLE, ALTER ROLE NOLOGIN, REVOKE), which
 * does not reload the registry.  The first skip of each listener is logged.
 */
static bool
listener_may_run(Listener *l, bool remote)
{
	HeapTuple	tup;
	const char *why = NULL;

	if (!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(l->fn)))
		why = "its function no longer exists";
	else if (!HeapTupleIsValid(tup = SearchSysCache1(AUTHOID, ObjectIdGetDatum(l->owner))))
		why = "its role no longer exists";
	else
	{
		bool		canlogin = ((Form_pg_authid) GETSTRUCT(tup))->rolcanlogin;

		ReleaseSysCache(tup);
		if (!canlogin)
			why = "its role cannot log in";
		else if (remote &&
				 !(OidIsValid(remote_right_fn) &&
				   SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(remote_right_fn)) ?
				   me_proc_aclcheck(remote_right_fn, l->owner, ACL_EXECUTE) == ACLCHECK_OK :
				   superuser_arg(l->owner)))
			why = "its role may not receive remote events";
	}
	if (why == NULL)
		return true;
	if (!l->skip_logged)
	{
		ereport(report_skips ? LOG : DEBUG1,
				(errmsg("pg_mqtt_emit skips listener " INT64_FORMAT " (%s of role %u): %s",
						l->id, l->fn_name, l->owner, why)));
		l->skip_logged = true;
	}
	return false;
}

/*
 * Run every listener that wants this event.
 */
void
me_listeners_dispatch(const MeEvent *ev)
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
		if (ev->remote ? !l->allow_remote || !same_group(l->share_group, ev->share_group) :
			!takes_local(l))
			continue;
		if (!listener_may_run(l, ev->remote))
			continue;

		/*
		 * A local event carries rows of a table: only roles that may read
		 * it (all of its columns) get them, so a listener cannot be used to
		 * read what its owner may not SELECT.
		 */
		if (!ev->remote && OidIsValid(ev->relid) &&
			!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(ev->relid)))
		{
			/*
			 * Dropped since: who may read its rows can no longer be checked,
			 * so only superusers' listeners get them.
			 */
			if (!superuser_arg(l->owner))
			{
				ereport(DEBUG1,
						(errmsg("pg_mqtt_emit listener %s skipped: table %u was dropped",
								l->fn_name, ev->relid)));
				continue;
			}
		}
		else if (!ev->remote && OidIsValid(ev->relid) &&
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

		/*
		 * Nor a row that the table's row security hides from the role
		 * (rowsec.c): the row as it is after the change, the old row for
		 * a delete.
		 */
		if (!ev->remote && OidIsValid(ev->relid) &&
			!me_rowsec_allows(ev->relid, l->owner, ev->result, l->fn_name))
		{
			ereport(DEBUG1,
					(errmsg("pg_mqtt_emit listener %s skipped: row security of table %u hides the row from role %u",
							l->fn_name, ev->relid, l->owner)));
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
JsonbValue *
me_json_field(Jsonb *jb, const char *key)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	return findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &k);
}

char *
me_jbv_string(JsonbValue *v)
{
	return pnstrdup(v->val.string.val, v->val.string.len);
}

Jsonb *
me_jbv_jsonb(JsonbValue *v)
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
	MeEvent	ev;
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
	if ((v = me_json_field(jb, "eventId")) != NULL && v->type == jbvString)
		ev.event_id = me_jbv_string(v);
	ev.result = me_jbv_jsonb(me_json_field(jb, "result"));
	ev.old = me_jbv_jsonb(me_json_field(jb, "old"));
	ev.args = me_jbv_jsonb(me_json_field(jb, "args"));
	if ((v = me_json_field(jb, "origin")) != NULL && v->type == jbvString)
		ev.origin = me_jbv_string(v);
	if ((v = me_json_field(jb, "timestamp")) != NULL && v->type == jbvString)
	{
		char	   *ts = me_jbv_string(v);

		ev.emitted_at = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in,
																CStringGetDatum(ts),
																ObjectIdGetDatum(InvalidOid),
																Int32GetDatum(-1)));
		ev.has_emitted_at = true;
	}
	me_listeners_dispatch(&ev);
}

/*
 * Does some listener accept remote events of this model that arrive
 * through this path (group NULL: the plain subscription)?
 */
bool
me_listeners_accept_remote(const char *model, const char *group)
{
	int			i;

	if (!registry_ok)
		return false;
	for (i = 0; i < nlisteners; i++)
		if (listeners[i].allow_remote &&
			same_group(listeners[i].share_group, group) &&
			model_matches(&listeners[i], model, strlen(model)))
			return true;
	return false;
}

/* How many listener calls this process has made. */
uint64
me_listeners_calls_made(void)
{
	return calls_made;
}

/*
 * The timeout (registered by the listener worker) that ends a listener
 * still running a second after mqtt_emit.listener_timeout cancelled it.
 */
void
me_listeners_set_hard_timeout(int timeout_id)
{
	hard_timeout = timeout_id;
}
