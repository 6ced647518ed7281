/*-------------------------------------------------------------------------
 *
 * capture.c
 *		The row-level capture trigger: a row change becomes an event, kept
 *		with the transaction's other events (pending.c) until it commits.
 *
 * mqtt_emit.capture() is an AFTER ... FOR EACH ROW trigger installed by
 * mqtt_emit.watch().  Its arguments carry the registration: the model name,
 * whether to publish, and which columns to include or exclude.  Since 0.2.0
 * the columns are named (mode "columns" or "exclude_columns"), so that what
 * pg_dump writes restores to the same columns whatever numbers they get
 * there; an event trigger of the extension rewrites the names when a column
 * is renamed.  The names are resolved against the relation's descriptor
 * when the cache entry below is built: a listed name that no longer exists
 * is simply not there (an included column drops out of the output, an
 * excluded one has nothing left to hide).  Triggers of 0.1.0 (modes
 * "include" and "exclude") carry attribute numbers; they still work until
 * ALTER EXTENSION ... UPDATE rewrites them.  The
 * trigger renders the event's JSON payload at once, while the row is at
 * hand and TOASTed values can still be fetched, and keeps it in
 * TopTransactionContext together with the subtransaction nesting level it
 * was made at.
 *
 * Per-relation facts needed for encoding (column names pre-escaped, type
 * categories, output functions, primary key) are cached per backend and
 * dropped on relcache invalidation.
 *
 * Model names are owned (README, "Security").  A capture trigger can be
 * written by hand, or restored by pg_dump, with any arguments, so the
 * trigger itself checks that its table may publish under its model: the
 * table's owner must have the privileges of a role that mqtt_emit.models
 * binds the model to (watch() maintains the bindings).  A table that may
 * not, and any temporary table, fails the statement that fires the trigger:
 * nothing is ever captured under a borrowed name, and the writer is told
 * why.  The answer is cached with the rest and dropped on relcache
 * invalidation (a new owner, a new trigger; a change of mqtt_emit.models
 * invalidates every relation) and on any change of roles or memberships.
 *
 * Retained state (watch(..., retain_last => true), trigger argument 2
 * "retain_last" where it is otherwise "true" or "false"): each published
 * event of a row is followed by an ad-hoc publish with the retained flag
 * (ME_KIND_PUBLISH, ME_FLAG_RETAIN, the path of mqtt_emit.publish(...,
 * retain => true)), so that it travels through the same queue and outbox,
 * in the same commit order, right after its event:
 *
 *	- insert, update: the new row (the event's "result", so only published
 *	  columns) on <prefix>/<model>/state/<key of the new row>;
 *	- delete: an empty message on the old row's topic, which clears the
 *	  broker's retained message;
 *	- an update that changes the key: first the empty message on the old
 *	  key's topic, then the new row on the new one.
 *
 * The key is the table's primary key, else its replica identity index
 * (REPLICA IDENTITY USING INDEX), its columns in the index's order; each
 * value's text (payload.c, me_key_text: the same under every setting) is
 * percent-encoded and the columns are joined by "," (topic.c).  Key
 * columns must be published, since the topic shows them.  watch() checks
 * all of this; should the table change later (its primary key dropped, a
 * key on an excluded column) a change fails (55000) rather than leave the
 * retained state wrong without a word, and so does a row whose state topic
 * would be longer than MQTT allows (65535 bytes; 54000).  State messages
 * go with the event: nothing when the event is not published (emit =>
 * false, mqtt_emit.emit_remote = off, a depth beyond max_depth).
 *
 * Batched tables (watch(..., batch => true), trigger argument 2 "batch"):
 * the event is built exactly as for any table and marked ME_FLAG_BATCH;
 * at commit pending.c publishes the table's events of the transaction
 * together, in one message on <batch_topic_prefix>/<model>/batch, instead
 * of one message each.  Local listeners get each event as always.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/capture.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/attmap.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_class.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "mb/pg_wchar.h"
#include "storage/latch.h"
#include "nodes/bitmapset.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "outbox.h"
#include "topic.h"

PG_FUNCTION_INFO_V1(mqtt_emit_capture);
PG_FUNCTION_INFO_V1(mqtt_emit_models_changed);

/* What the cache knows of one column. */
typedef struct CaptureColumn
{
	bool		include;		/* published at all */
	bool		is_pk;
	char	   *key;			/* "name": , escaped */
	int			keylen;
	MqttEmitColType type;
} CaptureColumn;

/* What the cache knows of one watched relation. */
typedef struct CaptureRel
{
	Oid			relid;			/* hash key */
	bool		valid;
	MemoryContext cxt;
	int			natts;
	CaptureColumn *cols;
	bool		has_pk;
	char	   *model;			/* raw model name */
	int			model_len;
	char	   *model_json;		/* "model":"<escaped>","operation": prefix */
	bool		emit;			/* publish to the broker */
	bool		retain_last;	/* and keep each row's state retained */
	bool		batch;			/* publish in the transaction's batched message */
	int			nkey;			/* retain_last: key columns, in index order */
	AttrNumber *key_attnums;
	const char *key_problem;	/* retain_last: why there is no usable key */
	bool		entitled;		/* the owner may publish under model */
	char	   *bound_to;		/* roles model is bound to, or NULL */
} CaptureRel;


static HTAB *capture_rels = NULL;
static CaptureRel *last_rel = NULL;	/* the entry of the last call (entries
									 * of a dynahash table never move) */

static MemoryContext capture_cxt = NULL;

static void capture_relcache_callback(Datum arg, Oid relid);
static void capture_syscache_callback(Datum arg, int cacheid, uint32 hashvalue);

/*
 * Install the callbacks; called from _PG_init in every process that loads
 * the library.
 */
void
me_capture_init(void)
{
	me_pending_init();
	CacheRegisterRelcacheCallback(capture_relcache_callback, (Datum) 0);
	/* who may publish under a model depends on roles and memberships */
	CacheRegisterSyscacheCallback(AUTHOID, capture_syscache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(AUTHMEMROLEMEM, capture_syscache_callback, (Datum) 0);
}

static void
capture_syscache_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	capture_relcache_callback(arg, InvalidOid);
}

static void
capture_relcache_callback(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS status;
	CaptureRel *entry;

	if (capture_rels == NULL)
		return;
	hash_seq_init(&status, capture_rels);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (relid == InvalidOid || entry->relid == relid)
			entry->valid = false;
	}
}

/*
 * A partition's copy of the capture trigger carries the column numbers of
 * the partitioned table that watch() was called on, and a partition may
 * number its columns differently (dropped columns, ATTACH PARTITION).
 * Translate them, by column name, into the partition's numbers.
 */
static void
map_to_partition(Relation rel, Trigger *trigger, AttrNumber *listed, int nlisted)
{
	List	   *ancestors = get_partition_ancestors(RelationGetRelid(rel));
	ListCell   *lc;

	foreach(lc, ancestors)
	{
		Relation	anc = relation_open(lfirst_oid(lc), AccessShareLock);
		TriggerDesc *td = anc->trigdesc;
		bool		owner = false;
		int			i;

		for (i = 0; td != NULL && i < td->numtriggers; i++)
			if (!td->triggers[i].tgisclone &&
				td->triggers[i].tgfoid == trigger->tgfoid &&
				strcmp(td->triggers[i].tgname, trigger->tgname) == 0)
				owner = true;
		if (owner)
		{
			AttrMap    *map = me_build_attrmap_by_name(RelationGetDescr(rel),
													   RelationGetDescr(anc));

			for (i = 0; i < nlisted; i++)
				listed[i] = (listed[i] > 0 && listed[i] <= map->maplen) ?
					map->attnums[listed[i] - 1] : InvalidAttrNumber;
			free_attrmap(map);
			relation_close(anc, AccessShareLock);
			return;
		}
		relation_close(anc, AccessShareLock);
	}
	ereport(ERROR,
			(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
			 errmsg("cannot find the partitioned table that trigger \"%s\" on \"%s\" was copied from",
					trigger->tgname, RelationGetRelationName(rel))));
}

/*
 * May the owner of rel publish under entry->model?  Sets entry->entitled
 * and entry->bound_to (allocated in entry->cxt).  The bindings are read
 * with SPI as the current user (mqtt_emit.models is readable by PUBLIC);
 * every name in the query is qualified, since the writer's search_path is
 * in effect.
 */
static void
check_model_binding(Relation rel, CaptureRel *entry)
{
	char	   *key = pstrdup(entry->model);
	Oid			argtypes[2] = {TEXTOID, OIDOID};
	Datum		args[2];
	int			ret;
	bool		isnull;
	Datum		d;
	Oid			nsp;

	/*
	 * Version 0.1.0 (before ALTER EXTENSION ... UPDATE) has no bindings and
	 * lets every table use any name, as it did.
	 */
	nsp = get_namespace_oid(MQTT_EMIT_SCHEMA, true);
	if (!OidIsValid(nsp) || !OidIsValid(get_relname_relid("models", nsp)))
	{
		entry->entitled = true;
		entry->bound_to = NULL;
		return;
	}

	me_ascii_lower(key, strlen(key));
	args[0] = CStringGetTextDatum(key);
	args[1] = ObjectIdGetDatum(rel->rd_rel->relowner);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("SELECT pg_catalog.bool_or(pg_catalog.pg_has_role($2, "
								"b.owner::pg_catalog.oid, 'USAGE')), "
								"pg_catalog.string_agg(b.owner::pg_catalog.text, ', ' "
								"ORDER BY b.owner::pg_catalog.text) "
								"FROM mqtt_emit.models b "
								"WHERE b.model OPERATOR(pg_catalog.=) $1",
								2, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cannot read mqtt_emit.models: %s", SPI_result_code_string(ret));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	entry->entitled = !isnull && DatumGetBool(d);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	entry->bound_to = isnull ? NULL :
		MemoryContextStrdup(entry->cxt, TextDatumGetCString(d));
	SPI_finish();
	pfree(key);
}

/*
 * The key of a retain_last table's rows: the columns of its primary key,
 * else of its replica identity index (REPLICA IDENTITY USING INDEX), in the
 * index's column order (INCLUDE columns are not part of it).  Sets
 * entry->nkey and entry->key_attnums, or entry->key_problem when there is
 * no key or a key column is not published (its value would be in the
 * topic).  Allocates in the current context (the entry's).
 */
static void
find_state_key(Relation rel, CaptureRel *entry)
{
	List	   *indexes = RelationGetIndexList(rel);
	ListCell   *lc;
	Oid			chosen = InvalidOid;
	bool		primary = false;
	HeapTuple	tup;
	Form_pg_index ind;
	int			i;

	entry->nkey = 0;
	entry->key_attnums = NULL;
	entry->key_problem = NULL;
	foreach(lc, indexes)
	{
		Oid			indexoid = lfirst_oid(lc);

		tup = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(indexoid));
		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for index %u", indexoid);
		ind = (Form_pg_index) GETSTRUCT(tup);
		if (ind->indisprimary)
		{
			chosen = indexoid;
			primary = true;
		}
		else if (!primary && ind->indisreplident &&
				 rel->rd_rel->relreplident == REPLICA_IDENTITY_INDEX)
			chosen = indexoid;
		ReleaseSysCache(tup);
	}
	list_free(indexes);
	if (!OidIsValid(chosen))
	{
		entry->key_problem = "The table has neither a primary key nor a replica identity index, which give each row's state topic its key.";
		return;
	}

	tup = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(chosen));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for index %u", chosen);
	ind = (Form_pg_index) GETSTRUCT(tup);
	entry->nkey = ind->indnkeyatts;
	entry->key_attnums = palloc(sizeof(AttrNumber) * Max(entry->nkey, 1));
	for (i = 0; i < entry->nkey; i++)
	{
		AttrNumber	attnum = ind->indkey.values[i];

		entry->key_attnums[i] = attnum;
		if (attnum <= 0 || attnum > entry->natts)
			entry->key_problem = "The table's key index has an expression.";
		else if (!entry->cols[attnum - 1].include)
			entry->key_problem = psprintf("Key column \"%s\" is not published, and each row's state topic would show its value.",
										  NameStr(TupleDescAttr(RelationGetDescr(rel), attnum - 1)->attname));
		if (entry->key_problem)
			break;
	}
	ReleaseSysCache(tup);
}

/*
 * Append the state topic of a row, <prefix>/<model>/state/<key> (file
 * header; the key's rules are topic.c's).  A topic longer than MQTT allows
 * fails the change: skipping it would leave an older state retained.
 */
static void
append_state_topic(StringInfo buf, Relation rel, CaptureRel *cr,
				   TupleDesc tupdesc, HeapTuple tuple)
{
	int			start;
	int			i;

	appendStringInfoString(buf, mqtt_emit_topic_prefix);
	appendStringInfoChar(buf, '/');
	me_append_topic_model(buf, cr->model, cr->model_len, false);
	appendBinaryStringInfo(buf, "/state/", 7);
	start = buf->len;
	for (i = 0; i < cr->nkey; i++)
	{
		AttrNumber	attnum = cr->key_attnums[i];
		bool		isnull;
		Datum		value = heap_getattr(tuple, attnum, tupdesc, &isnull);

		if (i > 0)
			appendStringInfoChar(buf, ',');
		if (isnull)
		{
			/*
			 * Key columns are NOT NULL (primary key and replica identity
			 * index alike); should one be null all the same, "%00" names it,
			 * which no value's text gives (text never holds a NUL byte).
			 */
			appendBinaryStringInfo(buf, "%00", 3);
		}
		else
		{
			char	   *text = me_key_text(&cr->cols[attnum - 1].type, value);
			int			len = strlen(text);
			char	   *utf8 = pg_server_to_any(text, len, PG_UTF8);

			me_append_topic_key(buf, utf8, strlen(utf8));
		}
		/* stop early: a key may be large */
		if (buf->len > ME_MAX_TOPIC_LEN)
			break;
	}
	if (buf->len > ME_MAX_TOPIC_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the state topic of a row of table \"%s\" is longer than MQTT allows",
						RelationGetRelationName(rel)),
				 errdetail("MQTT allows a topic of at most %d bytes; this one would have %s%d, %s%d of them its key, percent-encoded.",
						   ME_MAX_TOPIC_LEN, i < cr->nkey ? "more than " : "", buf->len,
						   i < cr->nkey ? "more than " : "", buf->len - start),
				 errhint("Use shorter key values, or call mqtt_emit.watch() again without retain_last.")));
}

/*
 * Build (or rebuild) the cache entry of a relation from its descriptor and
 * the trigger's arguments.
 */
static CaptureRel *
get_capture_rel(Relation rel, Trigger *trigger)
{
	Oid			relid = RelationGetRelid(rel);
	CaptureRel *entry;
	bool		found;
	TupleDesc	tupdesc = RelationGetDescr(rel);
	MemoryContext old;
	Bitmapset  *pkattrs;
	StringInfoData buf;
	int			i;
	const char *mode;
	int			nlisted;
	AttrNumber *listed;
	bool		by_name;
	bool		include_mode;

	if (capture_rels == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(CaptureRel);
		capture_rels = hash_create("pg_mqtt_emit capture relations", 64, &ctl,
								   HASH_ELEM | HASH_BLOBS);
	}

	/* a statement's rows are all of one relation: skip the hash lookup */
	if (last_rel != NULL && last_rel->relid == relid && last_rel->valid)
		return last_rel;
	entry = hash_search(capture_rels, &relid, HASH_ENTER, &found);
	if (found && entry->valid)
	{
		last_rel = entry;
		return entry;
	}
	if (found && entry->cxt)
		MemoryContextDelete(entry->cxt);
	entry->cxt = NULL;
	entry->valid = false;

	if (trigger->tgnargs < 3)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" on table \"%s\" has too few arguments",
						trigger->tgname, RelationGetRelationName(rel)),
				 errhint("Install the trigger with mqtt_emit.watch().")));
	mode = trigger->tgargs[2];
	if (strcmp(mode, "all") == 0)
		by_name = false;
	else if (strcmp(mode, "columns") == 0 || strcmp(mode, "exclude_columns") == 0)
		by_name = true;
	else if (strcmp(mode, "include") == 0 || strcmp(mode, "exclude") == 0)
		by_name = false;		/* 0.1.0: attribute numbers */
	else
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" on table \"%s\" has an invalid column mode \"%s\"",
						trigger->tgname, RelationGetRelationName(rel), mode),
				 errhint("Install the trigger with mqtt_emit.watch().")));

	/*
	 * A model name written into the trigger by hand, or restored by pg_dump
	 * from an older version, did not pass watch()'s checks: a name the
	 * broker refuses would make the publisher reconnect forever, so the
	 * change fails here instead.
	 */
	{
		char		hint[NAMEDATALEN * 2 + 128];

		snprintf(hint, sizeof(hint),
				 "Call mqtt_emit.watch('%s', model => ...) with a valid model name, or drop trigger \"%s\".",
				 RelationGetRelationName(rel), trigger->tgname);
		me_check_topic_text(trigger->tgargs[0], strlen(trigger->tgargs[0]),
							"model name of the capture trigger", hint);
	}

	entry->cxt = AllocSetContextCreate(CacheMemoryContext,
									   "pg_mqtt_emit capture relation",
									   ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(entry->cxt);

	entry->model = pstrdup(trigger->tgargs[0]);
	entry->model_len = strlen(entry->model);
	entry->retain_last = (strcmp(trigger->tgargs[1], "retain_last") == 0);
	entry->batch = (strcmp(trigger->tgargs[1], "batch") == 0);
	entry->emit = (entry->retain_last || entry->batch ||
				   strcmp(trigger->tgargs[1], "t") == 0 ||
				   strcmp(trigger->tgargs[1], "true") == 0);
	if (!entry->emit && strcmp(trigger->tgargs[1], "f") != 0 &&
		strcmp(trigger->tgargs[1], "false") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" on table \"%s\" has an invalid publish setting \"%s\"",
						trigger->tgname, RelationGetRelationName(rel), trigger->tgargs[1]),
				 errdetail("The second argument is \"true\", \"false\", \"retain_last\" or \"batch\"."),
				 errhint("Install the trigger with mqtt_emit.watch().")));

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"model\":");
	escape_json(&buf, entry->model);
	appendStringInfoString(&buf, ",\"operation\":");
	entry->model_json = pstrdup(buf.data);

	/*
	 * The listed columns as this relation's attribute numbers: by name (a
	 * partition has the same column names as its parent), or for 0.1.0
	 * triggers as numbers of the table watch() was called on.
	 */
	include_mode = (mode[0] == 'i' || mode[0] == 'c');
	nlisted = trigger->tgnargs - 3;
	listed = palloc(sizeof(AttrNumber) * Max(nlisted, 1));
	for (i = 0; i < nlisted; i++)
	{
		if (by_name)
		{
			int			j;

			listed[i] = InvalidAttrNumber;
			for (j = 0; j < tupdesc->natts; j++)
			{
				Form_pg_attribute att = TupleDescAttr(tupdesc, j);

				if (!att->attisdropped &&
					strcmp(NameStr(att->attname), trigger->tgargs[i + 3]) == 0)
					listed[i] = att->attnum;
			}
		}
		else
			listed[i] = (AttrNumber) atoi(trigger->tgargs[i + 3]);
	}
	if (!by_name && trigger->tgisclone && nlisted > 0)
		map_to_partition(rel, trigger, listed, nlisted);

	entry->natts = tupdesc->natts;
	entry->cols = palloc0(sizeof(CaptureColumn) * tupdesc->natts);
	pkattrs = RelationGetIndexAttrBitmap(rel, INDEX_ATTR_BITMAP_PRIMARY_KEY);
	if (pkattrs == NULL)
		pkattrs = RelationGetIndexAttrBitmap(rel, INDEX_ATTR_BITMAP_IDENTITY_KEY);
	entry->has_pk = false;

	for (i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);
		CaptureColumn *col = &entry->cols[i];
		int			j;
		bool		is_listed = false;

		if (att->attisdropped)
			continue;
		for (j = 0; j < nlisted; j++)
			if (listed[j] == att->attnum)
				is_listed = true;
		if (mode[0] == 'a')
			col->include = true;
		else if (include_mode)
			col->include = is_listed;
		else
			col->include = !is_listed;
		if (!col->include)
			continue;

		col->is_pk = bms_is_member(att->attnum - FirstLowInvalidHeapAttributeNumber,
								   pkattrs);
		if (col->is_pk)
			entry->has_pk = true;
		resetStringInfo(&buf);
		escape_json(&buf, NameStr(att->attname));
		appendStringInfoChar(&buf, ':');
		col->key = pstrdup(buf.data);
		col->keylen = buf.len;
		me_classify_type(att->atttypid, &col->type, entry->cxt);
	}
	pfree(buf.data);
	if (entry->retain_last)
		find_state_key(rel, entry);
	MemoryContextSwitchTo(old);
	check_model_binding(rel, entry);
	entry->valid = true;
	last_rel = entry;
	return entry;
}

/*
 * A tuple's columns, deformed once (heap_deform_tuple) for all the objects
 * made of it: heap_getattr() per column walks the tuple from its start
 * past the first variable-length column.
 */
typedef struct CaptureTuple
{
	Datum	   *values;
	bool	   *isnull;
} CaptureTuple;

static void
deform_tuple(CaptureTuple *ct, CaptureRel *cr, TupleDesc tupdesc, HeapTuple tuple)
{
	int			n = Max(tupdesc->natts, cr->natts);

	ct->values = palloc(sizeof(Datum) * n);
	ct->isnull = palloc(sizeof(bool) * n);
	heap_deform_tuple(tuple, tupdesc, ct->values, ct->isnull);
}

/*
 * Append a JSON object of the included columns of a tuple.  With only_pk,
 * only primary key columns; with changed_from, only columns whose value
 * differs from that tuple's.
 */
static void
append_row(StringInfo buf, CaptureRel *cr, TupleDesc tupdesc, CaptureTuple *tuple,
		   bool only_pk, CaptureTuple *changed_from)
{
	int			i;
	bool		first = true;

	appendStringInfoCharMacro(buf, '{');
	for (i = 0; i < cr->natts; i++)
	{
		CaptureColumn *col = &cr->cols[i];
		Datum		value;
		bool		isnull;

		if (!col->include || (only_pk && !col->is_pk))
			continue;
		value = tuple->values[i];
		isnull = tuple->isnull[i];
		if (changed_from != NULL)
		{
			Form_pg_attribute att = TupleDescAttr(tupdesc, i);
			bool		oldnull = changed_from->isnull[i];
			Datum		oldvalue = changed_from->values[i];

			if (isnull && oldnull)
				continue;
			if (!isnull && !oldnull &&
				datumIsEqual(value, oldvalue, att->attbyval, att->attlen))
				continue;
		}
		if (!first)
			appendStringInfoCharMacro(buf, ',');
		first = false;
		appendBinaryStringInfo(buf, col->key, col->keylen);
		me_json_value(buf, &col->type, value, isnull);
	}
	appendStringInfoCharMacro(buf, '}');
}

/*
 * The capture trigger.
 */
Datum
mqtt_emit_capture(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Relation	rel;
	TupleDesc	tupdesc;
	CaptureRel *cr;
	MqttEmitOp	op;
	uint8		flags = 0;
	StringInfoData buf;
	StringInfoData row;
	StringInfoData newstate;
	StringInfoData oldstate;
	bool		state;
	MemoryContext old;
	HeapTuple	newtup = NULL;
	HeapTuple	oldtup = NULL;
	CaptureTuple newrow;
	CaptureTuple oldrow;
	static char *origin_for = NULL;	/* a copy: a reload may reuse the address */
	static char *origin_json = NULL;
	static char no_state[1] = "";

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtt_emit.capture() was not called by trigger manager")));
	if (!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtt_emit.capture() must be fired AFTER ... FOR EACH ROW"),
				 errhint("Install the trigger with mqtt_emit.watch().")));
	me_check_preloaded();

	if (!mqtt_emit_enabled)
		return PointerGetDatum(NULL);

	rel = trigdata->tg_relation;
	tupdesc = RelationGetDescr(rel);
	cr = get_capture_rel(rel, trigdata->tg_trigger);

	if (cr->emit && mqtt_emit_emit_remote)
		flags |= ME_FLAG_PUBLISH;
	if (mqtt_emit_emit_local)
		flags |= ME_FLAG_LOCAL;
	if (flags == 0)
		return PointerGetDatum(NULL);

	/*
	 * Batched (watch(..., batch => true)): the event is published inside
	 * the transaction's batched message of the model, built at commit
	 * (pending.c); it must not reach the events' subscribers.
	 */
	if (cr->batch && (flags & ME_FLAG_PUBLISH))
	{
		me_check_batch_prefix();
		flags |= ME_FLAG_BATCH;
	}

	/* no event under a name the table is not entitled to (file header) */
	if (rel->rd_rel->relpersistence == RELPERSISTENCE_TEMP)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot capture changes of temporary table \"%s\"",
						RelationGetRelationName(rel)),
				 errhint("Drop trigger \"%s\"; only permanent tables can be watched.",
						 trigdata->tg_trigger->tgname)));
	if (!cr->entitled)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("table \"%s\" may not publish under model \"%s\"",
						RelationGetRelationName(rel), cr->model),
				 cr->bound_to ?
				 errdetail("The model is bound to role(s) %s, whose privileges the table's owner \"%s\" does not have.",
						   cr->bound_to, GetUserNameFromId(rel->rd_rel->relowner, true)) :
				 errdetail("The model is bound to no role."),
				 errhint("Watch the table with mqtt_emit.watch(), under a model name of its own, or drop trigger \"%s\".",
						 trigdata->tg_trigger->tgname)));

	/* retained state: see the file header */
	state = cr->retain_last && (flags & ME_FLAG_PUBLISH) != 0;
	if (state && cr->key_problem)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot keep the retained state of table \"%s\"",
						RelationGetRelationName(rel)),
				 errdetail("%s", cr->key_problem),
				 errhint("Give the table a primary key whose columns are published, or call mqtt_emit.watch() again without retain_last.")));

	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
	{
		op = ME_OP_CREATE;
		newtup = trigdata->tg_trigtuple;
	}
	else if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		op = ME_OP_UPDATE;
		oldtup = trigdata->tg_trigtuple;
		newtup = trigdata->tg_newtuple;
	}
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
	{
		op = ME_OP_DELETE;
		oldtup = trigdata->tg_trigtuple;
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtt_emit.capture() supports only INSERT, UPDATE and DELETE")));

	if (capture_cxt == NULL)
		capture_cxt = AllocSetContextCreate(TopMemoryContext,
											"pg_mqtt_emit capture",
											ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(capture_cxt);

	if (origin_json == NULL || strcmp(origin_for, me_client_id()) != 0)
	{
		StringInfoData o;

		initStringInfo(&o);
		appendStringInfoString(&o, ",\"origin\":");
		escape_json(&o, me_client_id());
		appendStringInfoChar(&o, '}');
		if (origin_json)
		{
			pfree(origin_json);
			pfree(origin_for);
		}
		origin_json = MemoryContextStrdup(TopMemoryContext, o.data);
		origin_for = MemoryContextStrdup(TopMemoryContext, me_client_id());
	}

	initStringInfo(&buf);
	initStringInfo(&row);
	/* the state topics: empty unless retained state is kept */
	newstate.data = oldstate.data = no_state;
	newstate.len = oldstate.len = 0;
	if (state && newtup)
	{
		initStringInfo(&newstate);
		append_state_topic(&newstate, rel, cr, tupdesc, newtup);
	}
	if (state && oldtup)
	{
		initStringInfo(&oldstate);
		append_state_topic(&oldstate, rel, cr, tupdesc, oldtup);
	}
	if (newtup)
		deform_tuple(&newrow, cr, tupdesc, newtup);
	if (oldtup)
		deform_tuple(&oldrow, cr, tupdesc, oldtup);
	/* room for the queue entry header, filled in below */
	appendBinaryStringInfo(&buf, (char *) &(MqttEmitEventHeader) {0},
						   sizeof(MqttEmitEventHeader));
	appendBinaryStringInfo(&buf, cr->model, cr->model_len);
	appendStringInfoString(&buf, cr->model_json);

	switch (op)
	{
		case ME_OP_CREATE:
			append_row(&row, cr, tupdesc, &newrow, false, NULL);
			appendStringInfoString(&buf, "\"create\",\"args\":{\"data\":");
			appendBinaryStringInfo(&buf, row.data, row.len);
			appendStringInfoString(&buf, "},\"result\":");
			appendBinaryStringInfo(&buf, row.data, row.len);
			me_json_event_tail(&buf, GetCurrentTimestamp());
			break;
		case ME_OP_UPDATE:
			appendStringInfoString(&buf, "\"update\",\"args\":{\"where\":");
			append_row(&buf, cr, tupdesc, &oldrow, cr->has_pk, NULL);
			appendStringInfoString(&buf, ",\"data\":");
			append_row(&buf, cr, tupdesc, &newrow, false, &oldrow);
			appendStringInfoString(&buf, "},\"result\":");
			append_row(&row, cr, tupdesc, &newrow, false, NULL);
			appendBinaryStringInfo(&buf, row.data, row.len);
			me_json_event_tail(&buf, GetCurrentTimestamp());
			appendStringInfoString(&buf, ",\"old\":");
			append_row(&buf, cr, tupdesc, &oldrow, false, NULL);
			break;
		case ME_OP_DELETE:
			append_row(&row, cr, tupdesc, &oldrow, false, NULL);
			appendStringInfoString(&buf, "\"delete\",\"args\":{\"where\":");
			append_row(&buf, cr, tupdesc, &oldrow, cr->has_pk, NULL);
			appendStringInfoString(&buf, "},\"result\":");
			appendBinaryStringInfo(&buf, row.data, row.len);
			me_json_event_tail(&buf, GetCurrentTimestamp());
			appendStringInfoString(&buf, ",\"old\":");
			appendBinaryStringInfo(&buf, row.data, row.len);
			break;
		default:
			break;
	}
	appendStringInfoString(&buf, origin_json);

	MemoryContextSwitchTo(old);

	if (me_capture_add_event(ME_KIND_ROW, flags, op, RelationGetRelid(rel),
							 buf.data + sizeof(MqttEmitEventHeader), cr->model_len,
							 buf.data + sizeof(MqttEmitEventHeader) + cr->model_len,
							 buf.len - sizeof(MqttEmitEventHeader) - cr->model_len,
							 255) && state)
	{
		/*
		 * After the event: clear the old key's retained message (a delete,
		 * or an update that changed the key), then set the new row's.
		 */
		if (oldstate.len > 0 &&
			(newstate.len == 0 || strcmp(oldstate.data, newstate.data) != 0))
			(void) me_capture_add_event(ME_KIND_PUBLISH, ME_FLAG_PUBLISH | ME_FLAG_RETAIN,
										ME_OP_OTHER, InvalidOid,
										oldstate.data, oldstate.len, "", 0, 255);
		if (newstate.len > 0)
			(void) me_capture_add_event(ME_KIND_PUBLISH, ME_FLAG_PUBLISH | ME_FLAG_RETAIN,
										ME_OP_OTHER, InvalidOid,
										newstate.data, newstate.len,
										row.data, row.len, 255);
	}
	MemoryContextReset(capture_cxt);

	return PointerGetDatum(NULL);
}

/*
 * Statement trigger on mqtt_emit.models: once the change commits, every
 * backend looks up again which tables may publish under which model.
 */
Datum
mqtt_emit_models_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtt_emit._models_changed() was not called by trigger manager")));
	CacheInvalidateRelcacheAll();
	return PointerGetDatum(NULL);
}
