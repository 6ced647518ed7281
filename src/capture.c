/*-------------------------------------------------------------------------
 *
 * capture.c
 *		The row-level capture trigger and the transaction callbacks that
 *		hand captured events to the shared-memory queue at commit.
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
 * Rolling back a subtransaction drops the events made inside it; releasing
 * one hands them to the parent.  At PRE_COMMIT the bytes needed for all
 * pending events are reserved in the queue: that may fail, and then the
 * transaction fails (or, with mqtt_emit.overflow = drop, commits without
 * its events, counted).  At COMMIT the events are copied into the reserved
 * space, which cannot fail.  PREPARE TRANSACTION with pending events is
 * refused, since a prepared transaction may commit in another session that
 * does not have them.
 *
 * Per-relation facts needed for encoding (column names pre-escaped, type
 * categories, output functions, primary key) are cached per backend and
 * dropped on relcache invalidation.
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
#include "catalog/partition.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "nodes/bitmapset.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "outbox.h"

PG_FUNCTION_INFO_V1(mqtt_emit_capture);

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
} CaptureRel;


static HTAB *capture_rels = NULL;

/*
 * Pending events of the current transaction, in TopTransactionContext:
 * each entry is a queue entry (header + model + payload), and its
 * subtransaction nesting level is kept beside it.
 */
static char **pending = NULL;
static int *pending_level = NULL;
static int	npending = 0;
static int	maxpending = 0;
static Size pending_bytes = 0;
static Size reserved_bytes = 0;
static int	outboxed = 0;			/* written to the outbox at PRE_COMMIT */
static bool marker_reserved = false;
static bool queued = false;		/* durable events reserved their queue room */
static MqttEmitMarker marker;

#define ME_MARKER_ENTRY_SIZE (sizeof(MqttEmitEventHeader) + sizeof(MqttEmitMarker))
static bool spilled = false;
static bool local_rows = false;		/* outbox rows for local listeners */
static bool listeners_changed = false;


static MemoryContext capture_cxt = NULL;

static void capture_xact_callback(XactEvent event, void *arg);
static void capture_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									 SubTransactionId parentSubid, void *arg);
static void capture_relcache_callback(Datum arg, Oid relid);
static void reset_pending(void);

/*
 * Install the callbacks; called from _PG_init in every process that loads
 * the library.
 */
void
me_capture_init(void)
{
	RegisterXactCallback(capture_xact_callback, NULL);
	RegisterSubXactCallback(capture_subxact_callback, NULL);
	CacheRegisterRelcacheCallback(capture_relcache_callback, (Datum) 0);
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

	entry = hash_search(capture_rels, &relid, HASH_ENTER, &found);
	if (found && entry->valid)
		return entry;
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

	entry->cxt = AllocSetContextCreate(CacheMemoryContext,
									   "pg_mqtt_emit capture relation",
									   ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(entry->cxt);

	entry->model = pstrdup(trigger->tgargs[0]);
	entry->model_len = strlen(entry->model);
	entry->emit = (strcmp(trigger->tgargs[1], "t") == 0 ||
				   strcmp(trigger->tgargs[1], "true") == 0);

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
	MemoryContextSwitchTo(old);
	entry->valid = true;
	return entry;
}

/*
 * Append a JSON object of the included columns of a tuple.  With only_pk,
 * only primary key columns; with changed_from, only columns whose value
 * differs from that tuple's.
 */
static void
append_row(StringInfo buf, CaptureRel *cr, TupleDesc tupdesc, HeapTuple tuple,
		   bool only_pk, HeapTuple changed_from)
{
	int			i;
	bool		first = true;

	appendStringInfoChar(buf, '{');
	for (i = 0; i < cr->natts; i++)
	{
		CaptureColumn *col = &cr->cols[i];
		Datum		value;
		bool		isnull;

		if (!col->include || (only_pk && !col->is_pk))
			continue;
		value = heap_getattr(tuple, i + 1, tupdesc, &isnull);
		if (changed_from != NULL)
		{
			Form_pg_attribute att = TupleDescAttr(tupdesc, i);
			bool		oldnull;
			Datum		oldvalue = heap_getattr(changed_from, i + 1, tupdesc, &oldnull);

			if (isnull && oldnull)
				continue;
			if (!isnull && !oldnull &&
				datumIsEqual(value, oldvalue, att->attbyval, att->attlen))
				continue;
		}
		if (!first)
			appendStringInfoChar(buf, ',');
		first = false;
		appendBinaryStringInfo(buf, col->key, col->keylen);
		me_json_value(buf, &col->type, value, isnull);
	}
	appendStringInfoChar(buf, '}');
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
	MemoryContext old;
	HeapTuple	newtup = NULL;
	HeapTuple	oldtup = NULL;
	static char *origin_for = NULL;	/* a copy: a reload may reuse the address */
	static char *origin_json = NULL;

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
	/* room for the queue entry header, filled in below */
	appendBinaryStringInfo(&buf, (char *) &(MqttEmitEventHeader) {0},
						   sizeof(MqttEmitEventHeader));
	appendBinaryStringInfo(&buf, cr->model, cr->model_len);
	appendStringInfoString(&buf, cr->model_json);

	switch (op)
	{
		case ME_OP_CREATE:
			append_row(&row, cr, tupdesc, newtup, false, NULL);
			appendStringInfoString(&buf, "\"create\",\"args\":{\"data\":");
			appendBinaryStringInfo(&buf, row.data, row.len);
			appendStringInfoString(&buf, "},\"result\":");
			appendBinaryStringInfo(&buf, row.data, row.len);
			me_json_event_tail(&buf, GetCurrentTimestamp());
			break;
		case ME_OP_UPDATE:
			appendStringInfoString(&buf, "\"update\",\"args\":{\"where\":");
			append_row(&buf, cr, tupdesc, oldtup, cr->has_pk, NULL);
			appendStringInfoString(&buf, ",\"data\":");
			append_row(&buf, cr, tupdesc, newtup, false, oldtup);
			appendStringInfoString(&buf, "},\"result\":");
			append_row(&buf, cr, tupdesc, newtup, false, NULL);
			me_json_event_tail(&buf, GetCurrentTimestamp());
			appendStringInfoString(&buf, ",\"old\":");
			append_row(&buf, cr, tupdesc, oldtup, false, NULL);
			break;
		case ME_OP_DELETE:
			append_row(&row, cr, tupdesc, oldtup, false, NULL);
			appendStringInfoString(&buf, "\"delete\",\"args\":{\"where\":");
			append_row(&buf, cr, tupdesc, oldtup, cr->has_pk, NULL);
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

	me_capture_add_event(ME_KIND_ROW, flags, op, RelationGetRelid(rel),
						 buf.data + sizeof(MqttEmitEventHeader), cr->model_len,
						 buf.data + sizeof(MqttEmitEventHeader) + cr->model_len,
						 buf.len - sizeof(MqttEmitEventHeader) - cr->model_len,
						 255);
	MemoryContextReset(capture_cxt);

	return PointerGetDatum(NULL);
}

/*
 * Keep one event until the end of the transaction.  The model (or topic)
 * and payload are copied; the caller keeps its buffers.
 */
void
me_capture_add_event(MqttEmitKind kind, uint8 flags, MqttEmitOp op,
					 Oid relid, const char *model, int model_len,
					 const char *payload, int payload_len, int qos)
{
	MqttEmitEventHeader hdr;
	Size		total = sizeof(MqttEmitEventHeader) + model_len + payload_len;
	char	   *entry;

	if (payload_len > mqtt_emit_max_payload)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("event payload of %d bytes exceeds \"mqtt_emit.max_payload\" (%d bytes)",
						payload_len, mqtt_emit_max_payload),
				 errhint("Exclude large columns with mqtt_emit.watch(..., exclude_columns => ...) or raise \"mqtt_emit.max_payload\".")));
	hdr.total_len = (uint32) total;
	hdr.kind = (uint8) kind;
	hdr.flags = flags;
	hdr.op = (uint8) op;
	hdr.qos = (uint8) qos;
	hdr.relid = relid;
	hdr.model_len = model_len;
	hdr.payload_len = payload_len;
	hdr.row_id = 0;

	entry = MemoryContextAlloc(TopTransactionContext, total);
	memcpy(entry, &hdr, sizeof(hdr));
	memcpy(entry + sizeof(hdr), model, model_len);
	memcpy(entry + sizeof(hdr) + model_len, payload, payload_len);

	if (npending >= maxpending)
	{
		int			newmax = maxpending == 0 ? 64 : maxpending * 2;

		if (pending == NULL)
		{
			pending = MemoryContextAlloc(TopTransactionContext,
										 sizeof(char *) * newmax);
			pending_level = MemoryContextAlloc(TopTransactionContext,
											   sizeof(int) * newmax);
		}
		else
		{
			pending = repalloc(pending, sizeof(char *) * newmax);
			pending_level = repalloc(pending_level, sizeof(int) * newmax);
		}
		maxpending = newmax;
	}
	pending_level[npending] = GetCurrentTransactionNestLevel();
	pending[npending] = entry;
	npending++;
	pending_bytes += total;
}

/*
 * mqtt_emit.listen() and unlisten() call this; the worker is told at commit.
 */
void
me_capture_listeners_changed(void)
{
	listeners_changed = true;
}

static void
reset_pending(void)
{
	/* the memory itself belongs to TopTransactionContext */
	pending = NULL;
	pending_level = NULL;
	npending = 0;
	maxpending = 0;
	pending_bytes = 0;
	reserved_bytes = 0;
	outboxed = 0;
	marker_reserved = false;
	queued = false;
	spilled = false;
	local_rows = false;
}

/*
 * Write all pending events of this transaction into the outbox.
 */
static void
write_outbox(void)
{
	uint64		rows = me_outbox_rows();
	int64	   *ids;
	int			i;

	if (mqtt_emit_outbox_max > 0 && rows + npending > (uint64) mqtt_emit_outbox_max)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("pg_mqtt_emit outbox is full"),
				 errdetail("The outbox holds about " UINT64_FORMAT " events; \"mqtt_emit.outbox_max\" is %d.",
						   rows, mqtt_emit_outbox_max),
				 errhint("Check that the broker is reachable (see mqtt_emit.stats), or raise \"mqtt_emit.outbox_max\".")));
	ids = palloc(sizeof(int64) * npending);
	for (i = 0; i < npending; i++)
		if (((MqttEmitEventHeader *) pending[i])->flags & ME_FLAG_LOCAL)
			local_rows = true;

	/*
	 * Durable delivery with room in the queue: the events go into the queue
	 * as well, marked with their rows' ids, and the worker publishes them
	 * from there and deletes each row once the broker has it.  The rows are
	 * what survives a crash.
	 */
	if (mqtt_emit_delivery == ME_DELIVERY_DURABLE &&
		me_queue_reserve(pending_bytes, false))
	{
		reserved_bytes = pending_bytes;
		queued = true;
		for (i = 0; i < npending; i++)
			((MqttEmitEventHeader *) pending[i])->flags |= ME_FLAG_QUEUED;
		me_outbox_insert(pending, npending, 0xFF, (int64) me_next_event_seq(),
						 true, 0, ids);
		for (i = 0; i < npending; i++)
			((MqttEmitEventHeader *) pending[i])->row_id = ids[i];
		outboxed = npending;
		return;
	}

	/*
	 * A marker in the queue will place these rows in the commit order.
	 * The last eighth of the queue is kept for markers; should even that be
	 * full, wait a little for the worker to take some (at most
	 * mqtt_emit.marker_wait), since rows without a marker can only be
	 * placed approximately.
	 */
	marker_reserved = me_queue_reserve(ME_MARKER_ENTRY_SIZE, true);
	for (i = 0; !marker_reserved && i < mqtt_emit_marker_wait; i++)
	{
		me_wake_worker();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		marker_reserved = me_queue_reserve(ME_MARKER_ENTRY_SIZE, true);
	}
	if (marker_reserved)
		reserved_bytes = ME_MARKER_ENTRY_SIZE;
	marker.batch = (int64) me_next_event_seq();
	/*
	 * Without a marker the rows are placed once everything queued before
	 * now is: what commits into the queue after this point cannot have
	 * been seen by this transaction, so it may as well come after it.
	 */
	me_outbox_insert(pending, npending, 0xFF,
					 marker_reserved ? marker.batch : me_outbox_stray_batch(me_queue_tail()),
					 marker_reserved, 0, ids);
	marker.min_id = ids[0];
	marker.max_id = ids[npending - 1];
	outboxed = npending;
}

static void
capture_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			if (npending == 0 || reserved_bytes > 0 || outboxed > 0)
				break;
			if (mqtt_emit_delivery == ME_DELIVERY_DURABLE)
				write_outbox();
			else if (me_queue_reserve(pending_bytes, false))
				reserved_bytes = pending_bytes;
			else if (mqtt_emit_overflow == ME_OVERFLOW_SPILL)
			{
				write_outbox();
				spilled = true;
			}
			else if (mqtt_emit_overflow == ME_OVERFLOW_DROP)
			{
				ereport(WARNING,
						(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
						 errmsg("event queue is full, %d events of this transaction are dropped",
								npending),
						 errhint("Raise \"mqtt_emit.queue_size\" or check that the broker is reachable.")));
				me_count(ME_STAT_DROPPED, npending);
				reset_pending();
			}
			else
				ereport(ERROR,
						(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
						 errmsg("event queue is full"),
						 errdetail("The transaction's %d events need %zu bytes.",
								   npending, pending_bytes),
						 errhint("Raise \"mqtt_emit.queue_size\" or check that the broker is reachable; \"mqtt_emit.overflow\" selects what happens then.")));
			break;

		case XACT_EVENT_COMMIT:
			if (outboxed > 0 && marker_reserved)
			{
				/* no allocation here: the entry is built on the stack */
				char		entry[ME_MARKER_ENTRY_SIZE];
				char	   *entries[1] = {entry};
				MqttEmitEventHeader hdr;

				memset(&hdr, 0, sizeof(hdr));
				hdr.total_len = ME_MARKER_ENTRY_SIZE;
				hdr.kind = ME_KIND_MARKER;
				hdr.payload_len = sizeof(MqttEmitMarker);
				memcpy(entry, &hdr, sizeof(hdr));
				memcpy(entry + sizeof(hdr), &marker, sizeof(marker));
				me_queue_push_reserved(entries, 1, reserved_bytes, 0);
			}
			if (npending > 0 && reserved_bytes > 0 && (outboxed == 0 || queued))
			{
				me_queue_push_reserved(pending, npending, reserved_bytes, npending);
				if (outboxed > 0)
					me_outbox_rows_add(outboxed);
			}
			else if (outboxed > 0)
			{
				me_outbox_rows_add(outboxed);
				me_outbox_version_bump();
				if (spilled)
					me_count(ME_STAT_SPILLED, outboxed);
				me_wake_worker();
			}
			/* rows in the outbox: their local listeners are due */
			if (outboxed > 0 && local_rows)
				me_wake_listener();
			reset_pending();
			if (listeners_changed)
			{
				listeners_changed = false;
				if (me_shmem_ready())
				{
					me_listeners_version_bump();
					me_wake_worker();
					me_wake_listener();
				}
			}
			break;

		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			if (reserved_bytes > 0)
				me_queue_unreserve(reserved_bytes);
			reset_pending();
			listeners_changed = false;
			break;

		case XACT_EVENT_PRE_PREPARE:
			if (npending > 0)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot prepare a transaction that has pending pg_mqtt_emit events"),
						 errdetail("The transaction has %d events waiting for commit.", npending),
						 errhint("Commit the transaction normally, or turn \"mqtt_emit.enabled\" off before the changes.")));
			if (listeners_changed)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot prepare a transaction that changed pg_mqtt_emit listeners")));
			break;

		case XACT_EVENT_PREPARE:
			reset_pending();
			break;

		default:
			break;
	}
}

static void
capture_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	int			level;

	if (npending == 0)
		return;
	level = GetCurrentTransactionNestLevel();

	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		/* events made at this level or deeper are a suffix of the list */
		while (npending > 0 && pending_level[npending - 1] >= level)
		{
			MqttEmitEventHeader *hdr = (MqttEmitEventHeader *) pending[npending - 1];

			pending_bytes -= hdr->total_len;
			pfree(pending[npending - 1]);
			npending--;
		}
	}
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		int			i;

		for (i = npending - 1; i >= 0 && pending_level[i] >= level; i--)
			pending_level[i] = level - 1;
	}
}
