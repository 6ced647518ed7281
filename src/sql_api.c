/*-------------------------------------------------------------------------
 *
 * sql_api.c
 *		SQL-callable functions of pg_mqtt_emit written in C: the install
 *		check, mqtt_emit.publish() and the statistics.
 *
 * watch(), unwatch(), listen() and unlisten() are written in SQL in the
 * install script; they call mqtt_emit._listeners_changed() so that the
 * worker reloads the registry when their transaction commits.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/sql_api.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_class.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/spin.h"
#include "catalog/pg_type.h"
#include "nodes/parsenodes.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "tcop/deparse_utility.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "pubprops.h"
#include "topic.h"

PG_FUNCTION_INFO_V1(mqtt_emit_install_check);
PG_FUNCTION_INFO_V1(mqtt_emit_publish);
PG_FUNCTION_INFO_V1(mqtt_emit_stats);
PG_FUNCTION_INFO_V1(mqtt_emit_subscription_states);
PG_FUNCTION_INFO_V1(mqtt_emit_listeners_changed);
PG_FUNCTION_INFO_V1(mqtt_emit_trigger_args);
PG_FUNCTION_INFO_V1(mqtt_emit_stats_reset);
PG_FUNCTION_INFO_V1(mqtt_emit_renamed_column);
PG_FUNCTION_INFO_V1(mqtt_emit_listen);
PG_FUNCTION_INFO_V1(mqtt_emit_unlisten);
PG_FUNCTION_INFO_V1(mqtt_emit_subscribe);
PG_FUNCTION_INFO_V1(mqtt_emit_unsubscribe);

/*
 * Called by the install script (CREATE EXTENSION, in any database): claim
 * the database's share of shared memory and have the launcher start its
 * workers when the transaction commits (launcher.c).  Errors when no slot
 * is free or the server has too few background worker processes for one
 * more database; without preloading it can do nothing, and says so.
 */
Datum
mqtt_emit_install_check(PG_FUNCTION_ARGS)
{
	int			databases;

	if (!mqtt_emit_preloaded)
	{
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pg_mqtt_emit must be loaded via \"shared_preload_libraries\""),
				 errdetail("Its functions raise errors until the server is restarted with the library preloaded."),
				 errhint("Add pg_mqtt_emit to \"shared_preload_libraries\" and restart the server.")));
		PG_RETURN_VOID();
	}
	if (!me_shmem_ready())
		me_check_preloaded();
	databases = me_slots_in_use_by_others() + 1;
	if (max_worker_processes < 1 + 2 * databases)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("not enough background worker processes for pg_mqtt_emit in %d databases",
						databases),
				 errdetail("pg_mqtt_emit needs %d: 1 for its launcher and 2 for each database with the extension; \"max_worker_processes\" is %d.",
						   1 + 2 * databases, max_worker_processes),
				 errhint("Raise \"max_worker_processes\" (parallel queries and other extensions take from it too) and restart the server.")));
	me_check_preloaded();		/* claims the slot, or fails */
	me_launcher_start_workers(MyDatabaseId);
	PG_RETURN_VOID();
}

/*
 * mqtt_emit.publish(topic text, payload text, qos int, retain boolean,
 * properties jsonb): publish a message when the calling transaction
 * commits.  The 0.1.0 definition has the first three arguments only.
 */
Datum
mqtt_emit_publish(PG_FUNCTION_ARGS)
{
	text	   *topic_t;
	text	   *payload_t;
	int			qos = mqtt_emit_qos;
	char	   *topic;
	int			topic_len;
	uint8		flags = ME_FLAG_PUBLISH;
	const char *payload;
	int			payload_len;

	me_check_preloaded();
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("topic and payload must not be null")));
	topic_t = PG_GETARG_TEXT_PP(0);
	payload_t = PG_GETARG_TEXT_PP(1);
	payload = VARDATA_ANY(payload_t);
	payload_len = VARSIZE_ANY_EXHDR(payload_t);
	if (!PG_ARGISNULL(2))
	{
		qos = PG_GETARG_INT32(2);
		if (qos < 0 || qos > 2)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid MQTT QoS %d", qos),
					 errhint("QoS must be 0, 1 or 2.")));
	}
	topic = text_to_cstring(topic_t);
	topic_len = strlen(topic);
	if (topic_len == 0 || topic_len > 65535)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid MQTT topic \"%s\"", topic),
				 errdetail("A topic must have between 1 and 65535 bytes.")));
	if (strpbrk(topic, "+#") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid MQTT topic \"%s\"", topic),
				 errdetail("Topics used for publishing must not contain \"+\" or \"#\".")));
	me_check_topic_text(topic, topic_len, "topic",
						"Publish to a topic without this character.");

	if (PG_NARGS() > 3 && !PG_ARGISNULL(3) && PG_GETARG_BOOL(3))
		flags |= ME_FLAG_RETAIN;
	if (PG_NARGS() > 4 && !PG_ARGISNULL(4))
	{
		StringInfoData props;
		StringInfoData buf;

		initStringInfo(&props);
		if (me_pubprops_encode(PG_GETARG_JSONB_P(4), &props))
		{
			if (mqtt_emit_mqtt_version != 5)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("MQTT properties need MQTT 5"),
						 errdetail("\"mqtt_emit.mqtt_version\" is 3.1.1, which has no message properties."),
						 errhint("Set \"mqtt_emit.mqtt_version\" to 5, or publish without properties.")));
			/* "<n>:", the records, the payload (pubprops.c) */
			initStringInfo(&buf);
			appendStringInfo(&buf, "%d:", props.len);
			appendBinaryStringInfo(&buf, props.data, props.len);
			appendBinaryStringInfo(&buf, payload, payload_len);
			payload = buf.data;
			payload_len = buf.len;
			flags |= ME_FLAG_PROPS;
		}
	}

	me_capture_add_event(ME_KIND_PUBLISH, flags, ME_OP_OTHER,
						 InvalidOid, topic, topic_len,
						 payload, payload_len, qos);
	PG_RETURN_VOID();
}

/*
 * mqtt_emit._listeners_changed(): the worker reloads the listener registry
 * (and notices the extension itself) when the calling transaction commits.
 */
Datum
mqtt_emit_listeners_changed(PG_FUNCTION_ARGS)
{
	/* without the worker there is nobody to tell */
	if (mqtt_emit_preloaded && me_shmem_ready() && me_shmem_bind(true))
		me_capture_listeners_changed();
	PG_RETURN_VOID();
}

/*
 * mqtt_emit.stats(): one row of counters and state.
 */
Datum
mqtt_emit_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[40];
	bool		nulls[40];
	int			i = 0;
	uint64		enq,
				deq;
	MqttEmitSnapshot snap;
	TimestampTz now;
	double		oldest_seconds = -1;

	me_check_preloaded();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	me_shared_snapshot(&snap);
	enq = me_counter(ME_STAT_ENQUEUED);
	deq = me_counter(ME_STAT_DEQUEUED);

	memset(nulls, 0, sizeof(nulls));
	values[i++] = BoolGetDatum(snap.publisher_connected);
	values[i++] = BoolGetDatum(snap.subscriber_connected);
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_PUBLISHED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_PUBLISH_FAILED));
	values[i++] = Int64GetDatum((int64) (enq >= deq ? enq - deq : 0));
	values[i++] = Int64GetDatum((int64) (snap.tail - snap.head));
	values[i++] = Int64GetDatum((int64) snap.capacity);
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_ENQUEUED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_RETRIED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_DROPPED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_RECEIVED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_DEDUPLICATED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_SELF_ECHO));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_REJECTED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_LISTENER_CALLS));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_LISTENER_ERRORS));
	values[i++] = Int32GetDatum((int32) snap.subscriptions);
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_CONNECTS));
	values[i++] = Int64GetDatum((int64) snap.outbox_rows);
	now = GetCurrentTimestamp();
	if (snap.outbox_oldest != 0)
	{
		values[i++] = DirectFunctionCall2(timestamp_mi,
										  TimestampTzGetDatum(now),
										  TimestampTzGetDatum(snap.outbox_oldest));
		oldest_seconds = Max((double) (now - snap.outbox_oldest) / USECS_PER_SEC, 0);
	}
	else
		nulls[i++] = true;
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_SPILLED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_OUTBOXED));
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_DEAD_LETTERS));
	if (snap.last_error[0])
		values[i++] = CStringGetTextDatum(snap.last_error);
	else
		nulls[i++] = true;
	if (snap.last_error_time != 0)
		values[i++] = TimestampTzGetDatum(snap.last_error_time);
	else
		nulls[i++] = true;
	if (snap.worker_pid != 0)
		values[i++] = Int32GetDatum((int32) snap.worker_pid);
	else
		nulls[i++] = true;
	values[i++] = CStringGetTextDatum(me_client_id());
	/* 0.2.0: appended, so that the older columns keep their positions */
	values[i++] = TimestampTzGetDatum(snap.stats_reset);
	if (oldest_seconds >= 0)
		values[i++] = Float8GetDatum(oldest_seconds);
	else
		nulls[i++] = true;
	values[i++] = Int64GetDatum((int64) me_counter_since_reset(ME_STAT_DEPTH_EXCEEDED));
	/* the broker of each client, one URL of mqtt_emit.broker_url */
	if (snap.broker_url[0])
		values[i++] = CStringGetTextDatum(snap.broker_url);
	else
		nulls[i++] = true;
	if (snap.subscriber_broker_url[0])
		values[i++] = CStringGetTextDatum(snap.subscriber_broker_url);
	else
		nulls[i++] = true;

	/*
	 * The 0.1.0 definition of mqtt_emit._stats() has the first 27 columns
	 * only: it keeps working (without the newer ones) between installing
	 * this library and ALTER EXTENSION ... UPDATE.
	 */
	if (tupdesc->natts > i)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("mqtt_emit._stats() returns %d columns, the library has %d",
						tupdesc->natts, i),
				 errhint("Install the pg_mqtt_emit library that matches the extension's version, and restart the server.")));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * mqtt_emit._trigger_args(tgargs bytea, tgnargs int2): the arguments of a
 * trigger as text[], for the watched_tables view.
 */
Datum
mqtt_emit_trigger_args(PG_FUNCTION_ARGS)
{
	bytea	   *args = PG_GETARG_BYTEA_PP(0);
	int			nargs = PG_GETARG_INT16(1);
	const char *p = VARDATA_ANY(args);
	const char *end = p + VARSIZE_ANY_EXHDR(args);
	Datum	   *elems;
	int			n = 0;

	elems = palloc(sizeof(Datum) * Max(nargs, 1));
	while (n < nargs && p < end)
	{
		int			len = strnlen(p, end - p);

		elems[n++] = PointerGetDatum(cstring_to_text_with_len(p, len));
		p += len + 1;
	}
	PG_RETURN_ARRAYTYPE_P(construct_array(elems, n, TEXTOID, -1, false, TYPALIGN_INT));
}

/*
 * mqtt_emit.stats_reset(): counters of mqtt_emit.stats start again from
 * zero, and its stats_reset column records when.  Not granted to PUBLIC.
 */
Datum
mqtt_emit_stats_reset(PG_FUNCTION_ARGS)
{
	me_check_preloaded();
	me_stats_reset();
	me_listener_stats_reset();
	PG_RETURN_VOID();
}

/*
 * mqtt_emit._renamed_column(cmd pg_ddl_command): for a collected
 * ALTER TABLE ... RENAME COLUMN, the table, the old and the new name (one
 * row); no row for any other command.  The event trigger that keeps the
 * column names of capture triggers current calls it.
 */
Datum
mqtt_emit_renamed_column(PG_FUNCTION_ARGS)
{
	CollectedCommand *cmd = (CollectedCommand *) PG_GETARG_POINTER(0);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	RenameStmt *stmt;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	InitMaterializedSRF(fcinfo, 0);
	if (cmd == NULL || cmd->type != SCT_Simple || cmd->parsetree == NULL ||
		!IsA(cmd->parsetree, RenameStmt))
		PG_RETURN_VOID();
	stmt = (RenameStmt *) cmd->parsetree;
	if (stmt->renameType != OBJECT_COLUMN || stmt->subname == NULL ||
		stmt->newname == NULL || !OidIsValid(cmd->d.simple.address.objectId))
		PG_RETURN_VOID();
	values[0] = ObjectIdGetDatum(cmd->d.simple.address.objectId);
	values[1] = CStringGetTextDatum(stmt->subname);
	values[2] = CStringGetTextDatum(stmt->newname);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	PG_RETURN_VOID();
}

/*
 * Listeners run as the role that registers them, and the workers do not
 * run those of roles that cannot log in (a group role, or a role whose
 * LOGIN was taken away): refuse to register one.
 */
static void
check_may_own_listeners(Oid roleid)
{
	HeapTuple	tup = SearchSysCache1(AUTHOID, ObjectIdGetDatum(roleid));
	bool		canlogin;

	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for role %u", roleid);
	canlogin = ((Form_pg_authid) GETSTRUCT(tup))->rolcanlogin;
	ReleaseSysCache(tup);
	if (!canlogin)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" cannot own listeners", GetUserNameFromId(roleid, false)),
				 errdetail("A listener runs as the role that registers it, and listeners of roles without LOGIN do not run."),
				 errhint("Register the listener as a role with LOGIN (not after SET ROLE to a group role).")));
}

/*
 * Receiving remote events is a right: EXECUTE on
 * mqtt_emit.may_listen_remote() (superusers have it).  Where that function
 * does not exist yet (the 0.1.0 schema with this library), only superusers.
 */
static void
check_may_listen_remote(Oid roleid)
{
	Oid			fn = LookupFuncName(list_make2(makeString(MQTT_EMIT_SCHEMA),
											   makeString("may_listen_remote")),
									0, NULL, true);
	bool		ok;

	if (OidIsValid(fn))
		ok = (me_proc_aclcheck(fn, roleid, ACL_EXECUTE) == ACLCHECK_OK);
	else
		ok = superuser_arg(roleid);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to register a listener for remote events"),
				 errdetail("A listener with allow_remote receives every peer's rows of its model, whatever its role may read on this server."),
				 errhint("A superuser can give the right: GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() TO %s;",
						 quote_identifier(GetUserNameFromId(roleid, false)))));
}

/*
 * Become the owner of mqtt_emit.listeners, with a safe search_path, to
 * write the registry; end_as_registry_owner() undoes it (an error undoes it
 * too, at the end of the (sub)transaction).
 */
static int
begin_as_registry_owner(Oid *save_userid, int *save_sec)
{
	Oid			nsp = get_namespace_oid(MQTT_EMIT_SCHEMA, false);
	Oid			relid = get_relname_relid("listeners", nsp);
	HeapTuple	tup;
	Oid			owner;
	int			nestlevel;

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"%s.listeners\" does not exist", MQTT_EMIT_SCHEMA),
				 errhint("Reinstall the extension.")));
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);

	GetUserIdAndSecContext(save_userid, save_sec);
	SetUserIdAndSecContext(owner, *save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	return nestlevel;
}

static void
end_as_registry_owner(int nestlevel, Oid save_userid, int save_sec)
{
	SPI_finish();
	AtEOXact_GUC(true, nestlevel);
	SetUserIdAndSecContext(save_userid, save_sec);
}

/*
 * A share group (listen() or subscribe() with share_group): a valid name
 * (22023), on a server that speaks MQTT 5 (0A000): the worker tells a
 * group's copies of a message from the others by their Subscription
 * Identifiers, which MQTT 3.1.1 does not have.  what is "listener" or
 * "handler".
 */
static void
check_share_group(text *group, const char *what)
{
	me_check_share_group(VARDATA_ANY(group), VARSIZE_ANY_EXHDR(group));
	if (mqtt_emit_mqtt_version != 5)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("share groups need MQTT 5"),
				 errdetail("A node in a share group receives a message once through the group and once through each other subscription it matches; only MQTT 5 Subscription Identifiers tell those copies apart, and \"mqtt_emit.mqtt_version\" is '3.1.1'."),
				 errhint("Set \"mqtt_emit.mqtt_version\" to '5' (and reload) on every node of the group, then register the %s again.",
						 what)));
}

/*
 * mqtt_emit.listen(model, listener, allow_remote, remote_only, filter,
 * operations, share_group): register a listener that runs as the calling
 * role, with its current search_path; returns its id.  NULL arguments
 * reach the row trigger, which names them.  The definition of 0.1.0 has no
 * share_group.
 */
Datum
mqtt_emit_listen(PG_FUNCTION_ARGS)
{
	Oid			caller = GetUserId();
	Oid			argtypes[9] = {TEXTOID, REGPROCEDUREOID, BOOLOID, BOOLOID,
	JSONBOID, TEXTARRAYOID, REGROLEOID, TEXTOID, TEXTOID};
	Datum		values[9];
	char		nulls[9];
	Oid			save_userid;
	int			save_sec;
	int			nestlevel;
	int			ret;
	int			i;
	bool		isnull;
	int64		id;
	bool		grouped = PG_NARGS() > 6 && !PG_ARGISNULL(6);

	check_may_own_listeners(caller);
	if (grouped)
	{
		if (PG_ARGISNULL(2) || !PG_GETARG_BOOL(2))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("share_group requires allow_remote"),
					 errdetail("A share group shares the events of the bus among its nodes; a grouped listener runs for what its group gives this node, not for local events."),
					 errhint("Use allow_remote => true with share_group.")));
		check_share_group(PG_GETARG_TEXT_PP(6), "listener");
	}
	if (!PG_ARGISNULL(2) && PG_GETARG_BOOL(2))
		check_may_listen_remote(caller);

	for (i = 0; i < 6; i++)
	{
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
		values[i] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
	}
	values[6] = ObjectIdGetDatum(caller);
	nulls[6] = ' ';
	/* the caller's, read before switching to the registry owner's */
	values[7] = CStringGetTextDatum(namespace_search_path ? namespace_search_path : "");
	nulls[7] = ' ';
	values[8] = grouped ? PG_GETARG_DATUM(6) : (Datum) 0;
	nulls[8] = grouped ? ' ' : 'n';

	nestlevel = begin_as_registry_owner(&save_userid, &save_sec);
	if (grouped)
		ret = SPI_execute_with_args("INSERT INTO mqtt_emit.listeners "
									"(model, listener, allow_remote, remote_only, filter, operations, owner, search_path, share_group) "
									"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
									9, argtypes, values, nulls, false, 0);
	else
		ret = SPI_execute_with_args("INSERT INTO mqtt_emit.listeners "
									"(model, listener, allow_remote, remote_only, filter, operations, owner, search_path) "
									"VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
									8, argtypes, values, nulls, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "cannot register listener: %s", SPI_result_code_string(ret));
	id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	end_as_registry_owner(nestlevel, save_userid, save_sec);

	PG_RETURN_INT64(id);
}

/*
 * mqtt_emit.unlisten(id): remove a listener of the calling role (or of a
 * role it is a member of, as the row security of mqtt_emit.listeners shows
 * them).  Another role's listener "does not exist", as it is not visible.
 */
Datum
mqtt_emit_unlisten(PG_FUNCTION_ARGS)
{
	Oid			caller = GetUserId();
	Oid			argtypes[2] = {INT8OID, OIDOID};
	Datum		values[2];
	Oid			save_userid;
	int			save_sec;
	int			nestlevel;
	int			ret;
	int64		id;
	uint64		removed;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("listener id must not be null")));
	id = PG_GETARG_INT64(0);
	values[0] = Int64GetDatum(id);
	values[1] = ObjectIdGetDatum(caller);

	nestlevel = begin_as_registry_owner(&save_userid, &save_sec);
	ret = SPI_execute_with_args("DELETE FROM mqtt_emit.listeners l "
								"WHERE l.id OPERATOR(pg_catalog.=) $1 "
								"AND pg_catalog.pg_has_role($2, l.owner::pg_catalog.oid, 'MEMBER')",
								2, argtypes, values, NULL, false, 0);
	if (ret != SPI_OK_DELETE)
		elog(ERROR, "cannot remove listener: %s", SPI_result_code_string(ret));
	removed = SPI_processed;
	end_as_registry_owner(nestlevel, save_userid, save_sec);

	if (removed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("listener " INT64_FORMAT " does not exist", id),
				 errhint("Table mqtt_emit.listeners shows the listeners of the current role.")));
	PG_RETURN_VOID();
}

/*
 * Subscribing to any topic is the same right as receiving remote events
 * (EXECUTE on mqtt_emit.may_listen_remote()): a handler receives whatever
 * anyone on the bus publishes.
 */
static void
check_may_subscribe(Oid roleid)
{
	Oid			fn = LookupFuncName(list_make2(makeString(MQTT_EMIT_SCHEMA),
											   makeString("may_listen_remote")),
									0, NULL, true);
	bool		ok;
	HeapTuple	tup = SearchSysCache1(AUTHOID, ObjectIdGetDatum(roleid));
	bool		canlogin;

	/* handlers run as the role that subscribes: one that can log in */
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for role %u", roleid);
	canlogin = ((Form_pg_authid) GETSTRUCT(tup))->rolcanlogin;
	ReleaseSysCache(tup);
	if (!canlogin)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" cannot own subscriptions", GetUserNameFromId(roleid, false)),
				 errdetail("A handler runs as the role that subscribes, and handlers of roles without LOGIN do not run."),
				 errhint("Subscribe as a role with LOGIN (not after SET ROLE to a group role).")));

	if (OidIsValid(fn))
		ok = (me_proc_aclcheck(fn, roleid, ACL_EXECUTE) == ACLCHECK_OK);
	else
		ok = superuser_arg(roleid);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to subscribe to MQTT topics"),
				 errdetail("A handler receives whatever any client of the broker publishes on its topics."),
				 errhint("A superuser can give the right: GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() TO %s;",
						 quote_identifier(GetUserNameFromId(roleid, false)))));
}

/*
 * mqtt_emit.subscribe(topic_filter, handler, qos, share_group): register a
 * handler that runs as the calling role, with its current search_path,
 * for every message on the filter's topics (with a share group: for those
 * the group gives this node); returns its id.  The row trigger
 * (_validate_handler) checks the filter and the function.
 */
Datum
mqtt_emit_subscribe(PG_FUNCTION_ARGS)
{
	Oid			caller = GetUserId();
	Oid			argtypes[6] = {TEXTOID, REGPROCEDUREOID, INT2OID, REGROLEOID, TEXTOID, TEXTOID};
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', 'n'};
	bool		grouped = PG_NARGS() > 3 && !PG_ARGISNULL(3);
	Oid			save_userid;
	int			save_sec;
	int			nestlevel;
	int			ret;
	int			qos;
	bool		isnull;
	int64		id;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("topic_filter, handler and qos must not be null")));
	qos = PG_GETARG_INT32(2);
	if (qos < 0 || qos > 2)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid QoS %d", qos),
				 errhint("The QoS of a subscription is 0, 1 or 2.")));
	if (grouped)
		check_share_group(PG_GETARG_TEXT_PP(3), "handler");
	check_may_subscribe(caller);

	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);
	values[2] = Int16GetDatum((int16) qos);
	values[3] = ObjectIdGetDatum(caller);
	values[4] = CStringGetTextDatum(namespace_search_path ? namespace_search_path : "");
	if (grouped)
	{
		values[5] = PG_GETARG_DATUM(3);
		nulls[5] = ' ';
	}

	nestlevel = begin_as_registry_owner(&save_userid, &save_sec);
	ret = SPI_execute_with_args("INSERT INTO mqtt_emit.handlers "
								"(topic_filter, handler, qos, owner, search_path, share_group) "
								"VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
								6, argtypes, values, nulls, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "cannot register handler: %s", SPI_result_code_string(ret));
	id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	end_as_registry_owner(nestlevel, save_userid, save_sec);

	PG_RETURN_INT64(id);
}

/*
 * mqtt_emit.unsubscribe(id): remove a subscription of the calling role (or
 * of a role it is a member of); false when there is no such one to remove.
 */
Datum
mqtt_emit_unsubscribe(PG_FUNCTION_ARGS)
{
	Oid			argtypes[2] = {INT8OID, OIDOID};
	Datum		values[2];
	Oid			save_userid;
	int			save_sec;
	int			nestlevel;
	int			ret;
	uint64		removed;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("subscription id must not be null")));
	values[0] = PG_GETARG_DATUM(0);
	values[1] = ObjectIdGetDatum(GetUserId());

	nestlevel = begin_as_registry_owner(&save_userid, &save_sec);
	ret = SPI_execute_with_args("DELETE FROM mqtt_emit.handlers h "
								"WHERE h.id OPERATOR(pg_catalog.=) $1 "
								"AND pg_catalog.pg_has_role($2, h.owner::pg_catalog.oid, 'MEMBER')",
								2, argtypes, values, NULL, false, 0);
	if (ret != SPI_OK_DELETE)
		elog(ERROR, "cannot remove handler: %s", SPI_result_code_string(ret));
	removed = SPI_processed;
	end_as_registry_owner(nestlevel, save_userid, save_sec);
	PG_RETURN_BOOL(removed > 0);
}

/*
 * mqtt_emit._subscription_states(filters text[]): the states of those of
 * the subscriber's subscriptions that are named in filters, as the worker
 * last saw them (shmem.c): topic_filter, state, granted_qos, reason, since.
 * The view mqtt_emit.subscriptions passes the caller's own filters.  No
 * rows without the library preloaded, so that the view still shows them.
 */
Datum
mqtt_emit_subscription_states(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(0);
	static const char *const names[] = {"pending", "requested", "acknowledged", "refused"};
	Datum	   *elems;
	bool	   *elem_nulls;
	int			nelems;
	MeSubStatus *subs;
	int			n;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	if (!mqtt_emit_preloaded || !me_shmem_ready() || !me_shmem_bind(false))
		return (Datum) 0;
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &elem_nulls, &nelems);
	if (nelems == 0)
		return (Datum) 0;
	subs = palloc(sizeof(MeSubStatus) * ME_SUBS_MAX);
	n = me_subs_snapshot(subs, ME_SUBS_MAX);
	for (i = 0; i < n; i++)
	{
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};
		bool		named = false;
		int			j;

		for (j = 0; j < nelems && !named; j++)
		{
			char	   *f;

			if (elem_nulls[j])
				continue;
			f = TextDatumGetCString(elems[j]);
			named = (strcmp(f, subs[i].filter) == 0);
			pfree(f);
		}
		if (!named)
			continue;
		values[0] = CStringGetTextDatum(subs[i].filter);
		values[1] = CStringGetTextDatum(names[subs[i].state]);
		if (subs[i].granted_qos >= 0)
			values[2] = Int32GetDatum(subs[i].granted_qos);
		else
			nulls[2] = true;
		if (subs[i].reason[0])
			values[3] = CStringGetTextDatum(subs[i].reason);
		else
			nulls[3] = true;
		values[4] = TimestampTzGetDatum(subs[i].since);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	pfree(subs);
	return (Datum) 0;
}
