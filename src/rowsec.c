/*-------------------------------------------------------------------------
 *
 * rowsec.c
 *		Row-level security for local events: may a listener's role see the
 *		row an event carries?  Runs in the listener worker only.
 *
 * A local event carries a row of a table.  listeners.c checks the table
 * and column grants; this file checks the table's row security policies,
 * so that a listener receives only rows its role could SELECT.  The row is
 * gone or changed by the time the listener runs, so the policies are not
 * applied by a query of the table but evaluated against the event's row
 * image (its "result": the new row, the old row for a delete), as
 * PostgreSQL's own rules choose them (rowsecurity.c):
 *
 *	- check_enable_rls() says whether the role is subject to them at all
 *	  (not for superusers, BYPASSRLS roles, and the table's owner unless
 *	  FORCE ROW LEVEL SECURITY);
 *	- the policies for SELECT (polcmd 'r' or '*') whose roles include
 *	  PUBLIC or a role whose privileges the role has apply; permissive ones
 *	  are OR'ed, restrictive ones AND'ed, and without a permissive one
 *	  nothing is visible.
 *
 * For each (table, role) the applicable policies become one query,
 *
 *	SELECT EXISTS (SELECT 1 FROM pg_catalog.jsonb_populate_record(
 *		NULL::schema.tbl, $1) AS tbl WHERE (perm1 OR perm2) AND (restr1))
 *
 * with the expressions from pg_get_expr(), deparsed and run with an empty
 * search_path (so every name is qualified the same way in both), as the
 * listener's role, as a security-restricted operation, in a subtransaction.
 * Columns that the event does not carry (columns, exclude_columns) are NULL
 * there.  The query text is cached and dropped on relcache invalidation of
 * the table (CREATE, ALTER and DROP POLICY and ALTER TABLE ... ROW LEVEL
 * SECURITY send one) and on any change of roles or memberships.
 *
 * Fail closed: when the check cannot be evaluated (an error in a policy,
 * a row that does not fit the table's type any more), the listener does
 * not get the event and a LOG line says why; the worker goes on.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/rowsec.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/rls.h"
#include "utils/syscache.h"
#include "utils/timeout.h"

#include "pg_mqtt_emit.h"
#include "rowsec.h"

typedef struct RowsecKey
{
	Oid			relid;
	Oid			role;
} RowsecKey;

typedef struct RowsecEntry
{
	RowsecKey	key;			/* hash key */
	bool		valid;
	bool		deny_all;		/* no permissive policy applies */
	char	   *sql;			/* in rowsec_cxt, or NULL */
} RowsecEntry;

static HTAB *rowsec_cache = NULL;
static MemoryContext rowsec_cxt = NULL;

static void
rowsec_relcache_callback(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS status;
	RowsecEntry *entry;

	if (rowsec_cache == NULL)
		return;
	hash_seq_init(&status, rowsec_cache);
	while ((entry = hash_seq_search(&status)) != NULL)
		if (relid == InvalidOid || entry->key.relid == relid)
			entry->valid = false;
}

static void
rowsec_syscache_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	rowsec_relcache_callback(arg, InvalidOid);
}

/*
 * Build the query that decides whether role sees a row of relid.  Runs as
 * the worker's user, with search_path already empty.
 */
static void
build_query(RowsecEntry *entry)
{
	Oid			argtypes[2] = {OIDOID, OIDOID};
	Datum		args[2];
	StringInfoData perm;
	StringInfoData restr;
	StringInfoData q;
	char	   *relname = get_rel_name(entry->key.relid);
	char	   *nspname = get_namespace_name(get_rel_namespace(entry->key.relid));
	uint64		i;
	int			ret;

	if (relname == NULL || nspname == NULL)
		elog(ERROR, "cache lookup failed for relation %u", entry->key.relid);
	args[0] = ObjectIdGetDatum(entry->key.relid);
	args[1] = ObjectIdGetDatum(entry->key.role);
	/* in the caller's context: SPI_finish frees SPI's */
	initStringInfo(&perm);
	initStringInfo(&restr);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("SELECT p.polpermissive, pg_catalog.pg_get_expr(p.polqual, p.polrelid) "
								"FROM pg_catalog.pg_policy p "
								"WHERE p.polrelid OPERATOR(pg_catalog.=) $1 "
								"AND p.polcmd OPERATOR(pg_catalog.=) ANY ('{r,*}'::pg_catalog.\"char\"[]) "
								"AND p.polqual IS NOT NULL "
								"AND (0::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (p.polroles) "
								"     OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p.polroles) r "
								"                WHERE pg_catalog.pg_has_role($2, r, 'USAGE'))) "
								"ORDER BY p.polname",
								2, argtypes, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "cannot read pg_policy: %s", SPI_result_code_string(ret));

	for (i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		bool		permissive = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[i],
															SPI_tuptable->tupdesc, 1,
															&isnull));
		char	   *expr = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);

		if (expr == NULL)
			continue;
		if (permissive)
			appendStringInfo(&perm, "%s(%s)", perm.len > 0 ? " OR " : "", expr);
		else
			appendStringInfo(&restr, " AND (%s)", expr);
	}
	SPI_finish();

	entry->deny_all = (perm.len == 0);
	entry->sql = NULL;
	if (!entry->deny_all)
	{
		initStringInfo(&q);
		appendStringInfo(&q, "SELECT EXISTS (SELECT 1 FROM pg_catalog.jsonb_populate_record("
						 "NULL::%s, $1) AS %s WHERE (%s)%s)",
						 quote_qualified_identifier(nspname, relname),
						 quote_identifier(relname), perm.data, restr.data);
		entry->sql = MemoryContextStrdup(rowsec_cxt, q.data);
		pfree(q.data);
	}
	pfree(perm.data);
	pfree(restr.data);
}

/*
 * Evaluate the check in a subtransaction, as role.  Returns the answer;
 * raises what the check raised (the caller catches it).
 */
static bool
evaluate(RowsecEntry *entry, Jsonb *row)
{
	Oid			argtypes[1] = {JSONBOID};
	Datum		args[1];
	bool		isnull;
	bool		result;
	int			ret;

	args[0] = JsonbPGetDatum(row);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args(entry->sql, 1, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "row security check failed: %s", SPI_result_code_string(ret));
	result = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
										1, &isnull));
	SPI_finish();
	return !isnull && result;
}

/*
 * May role see row (a row image of table relid, as an event carries it)
 * under the table's row security?  Must run inside a transaction.  Never
 * raises for a check that cannot be evaluated: that is a "no", logged,
 * with listener (for the log line) named.
 */
bool
me_rowsec_allows(Oid relid, Oid role, Jsonb *row, const char *listener)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	RowsecKey	key;
	RowsecEntry *entry;
	bool		found;
	volatile bool allowed = false;
	Oid			save_userid;
	int			save_sec;

	if (check_enable_rls(relid, role, true) != RLS_ENABLED)
		return true;
	if (row == NULL)
		return false;

	if (rowsec_cache == NULL)
	{
		HASHCTL		ctl;

		rowsec_cxt = AllocSetContextCreate(TopMemoryContext, "pg_mqtt_emit row security",
										   ALLOCSET_SMALL_SIZES);
		ctl.keysize = sizeof(RowsecKey);
		ctl.entrysize = sizeof(RowsecEntry);
		ctl.hcxt = rowsec_cxt;
		rowsec_cache = hash_create("pg_mqtt_emit row security", 64, &ctl,
								   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		CacheRegisterRelcacheCallback(rowsec_relcache_callback, (Datum) 0);
		CacheRegisterSyscacheCallback(AUTHOID, rowsec_syscache_callback, (Datum) 0);
		CacheRegisterSyscacheCallback(AUTHMEMROLEMEM, rowsec_syscache_callback, (Datum) 0);
	}
	memset(&key, 0, sizeof(key));
	key.relid = relid;
	key.role = role;
	entry = hash_search(rowsec_cache, &key, HASH_ENTER, &found);
	if (!found)
	{
		entry->valid = false;
		entry->sql = NULL;
	}

	GetUserIdAndSecContext(&save_userid, &save_sec);
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		int			nestlevel = NewGUCNestLevel();

		/* deparsed and run with the same (empty) search_path */
		(void) set_config_option("search_path", "", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		if (!entry->valid)
		{
			if (entry->sql)
				pfree(entry->sql);
			entry->sql = NULL;
			build_query(entry);
			entry->valid = true;
		}
		if (!entry->deny_all)
		{
			SetUserIdAndSecContext(role, save_sec | SECURITY_LOCAL_USERID_CHANGE |
								   SECURITY_RESTRICTED_OPERATION);
			if (mqtt_emit_listener_timeout > 0)
				enable_timeout_after(STATEMENT_TIMEOUT, mqtt_emit_listener_timeout);
			allowed = evaluate(entry, row);
			if (mqtt_emit_listener_timeout > 0)
				disable_timeout(STATEMENT_TIMEOUT, false);
			SetUserIdAndSecContext(save_userid, save_sec);
		}
		AtEOXact_GUC(false, nestlevel);
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

		/* the query may be what failed: build it again next time */
		entry->valid = false;
		allowed = false;
		ereport(LOG,
				(errmsg("pg_mqtt_emit could not check row security of table %s for listener %s; the listener does not get the event: %s",
						get_rel_name(relid) ? get_rel_name(relid) : "(dropped)",
						listener, edata->message),
				 errcontext("SQLSTATE %s", unpack_sql_state(edata->sqlerrcode))));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return allowed;
}
