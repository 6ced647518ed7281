/*-------------------------------------------------------------------------
 *
 * outbox.c
 *		Every statement on mqtt_emit.outbox and mqtt_emit.dead_letters.
 *
 * The outbox holds events that cannot simply flow through the shared-memory
 * queue: those of durable transactions (written at PRE_COMMIT, in the
 * committing transaction), those of transactions that found the queue full
 * (spilled), and those the worker moved out of the queue while the broker
 * was away.  Each row has:
 *
 *	flags	ME_FLAG_PUBLISH (send it), ME_FLAG_LOCAL (its local listeners
 *			have not run yet), ME_FLAG_QUEUED (a durable event whose queue
 *			entry exists too: the queue's copy runs its listeners and is
 *			published; the row is the crash net), for ad-hoc publishes
 *			ME_FLAG_RETAIN and ME_FLAG_PROPS (its MQTT 5 properties lead
 *			the payload column, pubprops.c), ME_FLAG_HELD (its local
 *			listeners are due once the worker's local cursor reaches its
 *			place in the queue: me_outbox_release_batch and
 *			me_outbox_release_strays copy it then as a row with only
 *			ME_FLAG_LOCAL, so that local listeners run in the queue's
 *			order, which is the commit order); in the high byte
 *			(ME_DEPTH_SHIFT) the event's depth, how many listeners caused
 *			it, so that the limit of mqtt_emit.max_depth holds across the
 *			outbox and no new column is needed
 *	batch	the writing transaction's batch number (an event_seq value), so
 *			that its marker in the queue can find its rows; without a
 *			marker, -(the queue's tail when it was written + 1)
 *	marked	whether a marker for it was queued
 *	seq		its place in the publishing order, given by the worker (NULL
 *			until then); rows are published in seq order
 *
 * Committing backends call me_outbox_insert(); everything else here runs in
 * the worker, inside its transactions (see relay.c for when).  Rows are
 * deleted once the broker acknowledged them (me_outbox_row_done collects
 * them, me_outbox_delete_done deletes them in one statement).  Messages the
 * broker refuses for good move to mqtt_emit.dead_letters.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/outbox.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "nodes/makefuncs.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "compat.h"
#include "outbox.h"
#include "listeners.h"
#include "pubprops.h"
#include "topic.h"

/* the flags as SQL integer literals */
#define SQL_PUBLISH		CppAsString2(ME_FLAG_PUBLISH)
#define SQL_LOCAL		CppAsString2(ME_FLAG_LOCAL)
#define SQL_QUEUED		CppAsString2(ME_FLAG_QUEUED)
#define SQL_HELD		CppAsString2(ME_FLAG_HELD)

/*
 * A row written before the shared memory was set up ($2: its epoch_seq, $3:
 * its epoch_time): a marked row's batch is an event_seq value, a row
 * without a marker has only the time it was written to tell (its batch is
 * a queue position, and positions start again with the memory).
 */
#define SQL_OLD_EPOCH	"(CASE WHEN batch >= 0 THEN batch < $2 ELSE created_at < $3 END)"

/*
 * A row is finished when it need neither be published nor handed to the
 * local listeners.  The worker (publishing) and the listener worker (local
 * listeners) each clear their flag and then delete the row if it is
 * finished, in two statements: whichever of them commits second sees the
 * other's change (READ COMMITTED re-checks a row updated concurrently) and
 * deletes it.
 */
#define SQL_UNFINISHED	"(flags & (" SQL_PUBLISH " | " SQL_LOCAL " | " SQL_HELD "))"

/*
 * A row written without a marker carries -(queue position + 1) as its
 * batch (me_outbox_stray_batch), so that the highest batch is the lowest
 * position; rows of 0.1.0 have a positive batch and are placed at once.
 * The index outbox_stray_idx (batch) serves both queries.
 */

/* the columns row_from_tuple() reads, in its order */
#define ROW_COLUMNS		"id, kind, flags, op, qos, model, payload, created_at, relid, seq"

static SPIPlanPtr clear_plan = NULL;
static SPIPlanPtr delete_plan = NULL;
static SPIPlanPtr lock_plan = NULL;
static SPIPlanPtr busy_plan = NULL;
static SPIPlanPtr local_clear_plan = NULL;
static SPIPlanPtr local_delete_plan = NULL;
static SPIPlanPtr place_batch_plan = NULL;	/* per marker (spilled transaction) */
static SPIPlanPtr release_batch_plans[2] = {NULL, NULL};
static SPIPlanPtr backend_release_plans[2] = {NULL, NULL};	/* planned as_owner */

/* worker: the next place in the publishing order */
static int64 next_order = 1;

/* worker: rows done with (acknowledged, or not to be published) */
static int64 *done_rows = NULL;
static int	ndone_rows = 0;
static int	maxdone_rows = 0;
static TimestampTz done_since = 0;	/* when done_rows became non-empty */

static StringInfoData topicbuf;

/*
 * The columns of mqtt_emit.outbox that me_outbox_insert() fills, found by
 * name in the relation's descriptor (an upgraded installation may have
 * them in another order; dropped columns are NULL).
 */
typedef enum OutboxColumn
{
	OC_ID,
	OC_KIND,
	OC_FLAGS,
	OC_OP,
	OC_QOS,
	OC_MODEL,
	OC_PAYLOAD,
	OC_BATCH,
	OC_MARKED,
	OC_SEQ,
	OC_RELID,
	OC_CREATED_AT,
	OC_NUM
} OutboxColumn;

static const char *const outbox_column_names[OC_NUM] = {
	"id", "kind", "flags", "op", "qos", "model", "payload", "batch", "marked",
	"seq", "relid", "created_at"
};

/*
 * At most this many rows, or about this many bytes, go to the table in one
 * multi-insert (COPY FROM's limits, copyfrom.c).
 */
#define OUTBOX_BATCH_ROWS	1000
#define OUTBOX_BATCH_BYTES	65535

/*
 * Insert n queue entries into mqtt_emit.outbox, in the current
 * (sub)transaction, with their flags ANDed with flag_mask.  Used by
 * committing backends (at PRE_COMMIT, where an error still aborts cleanly,
 * and for big transactions while they run, pending.c) and by the worker
 * when it moves the queue into the outbox.  The new rows' ids go to ids[],
 * in the entries' order, and ascend in it.
 *
 * The rows are written without SPI, the way COPY FROM writes them: the
 * relation and its indexes are opened here, the tuples go to the table in
 * batches (table_multi_insert) and their index entries after each batch
 * (ExecInsertIndexTuples, which checks the primary key and evaluates the
 * partial indexes' predicates).  The row contents are exactly those of the
 * INSERT this replaced: id from the column's sequence, created_at
 * clock_timestamp(), seq first_order + i (NULL when first_order is 0).
 * Planning and executing an INSERT per call cost most of a durable
 * transaction's instructions, and the INSERT from arrays of a big
 * transaction kept several copies of its events in memory.  No privilege
 * is checked: the outbox is the extension's own table, which ordinary
 * roles cannot write but whose events it must hold; it has no triggers,
 * rules or row security.
 */
void
me_outbox_insert(char **entries, int n, uint8 flag_mask, int64 batch,
				 bool marked, int64 first_order, int64 *ids)
{
	Oid			nsp;
	Oid			relid;
	Oid			seqid;
	Relation	rel;
	TupleDesc	td;
	int			colno[OC_NUM];
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot **slots;
	int			nslots;
	BulkInsertState bistate = NULL;
	CommandId	cid = GetCurrentCommandId(true);
	MemoryContext batch_cxt;
	MemoryContext old;
	int			i;
	int			a;

	if (n <= 0)
		return;
	/* as the INSERT through SPI that this replaced refused */
	PreventCommandIfReadOnly("INSERT INTO mqtt_emit.outbox");
	nsp = get_namespace_oid("mqtt_emit", false);
	relid = get_relname_relid("outbox", nsp);
	seqid = get_relname_relid("outbox_id_seq", nsp);
	if (!OidIsValid(relid) || !OidIsValid(seqid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"mqtt_emit.outbox\" does not exist"),
				 errhint("Install the extension with CREATE EXTENSION pg_mqtt_emit.")));
	rel = table_open(relid, RowExclusiveLock);
	if (rel->rd_rel->relkind != RELKIND_RELATION)
		elog(ERROR, "\"mqtt_emit.outbox\" is not a table");
	td = RelationGetDescr(rel);
	for (i = 0; i < OC_NUM; i++)
		colno[i] = -1;
	for (a = 0; a < td->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(td, a);

		if (att->attisdropped)
			continue;
		for (i = 0; i < OC_NUM; i++)
			if (strcmp(NameStr(att->attname), outbox_column_names[i]) == 0)
				break;
		if (i == OC_NUM)
			elog(ERROR, "unexpected column \"%s\" in mqtt_emit.outbox",
				 NameStr(att->attname));
		colno[i] = a;
	}
	for (i = 0; i < OC_NUM; i++)
		if (colno[i] < 0)
			elog(ERROR, "column \"%s\" of mqtt_emit.outbox is missing",
				 outbox_column_names[i]);

	estate = CreateExecutorState();
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 1, NULL, 0);
	ExecOpenIndices(rri, false);

	nslots = Min(n, OUTBOX_BATCH_ROWS);
	slots = palloc(sizeof(TupleTableSlot *) * nslots);
	for (i = 0; i < nslots; i++)
		slots[i] = table_slot_create(rel, NULL);
	if (n > OUTBOX_BATCH_ROWS)
		bistate = GetBulkInsertState();
	batch_cxt = AllocSetContextCreate(CurrentMemoryContext,
									  "pg_mqtt_emit outbox insert",
									  ALLOCSET_DEFAULT_SIZES);

	i = 0;
	while (i < n)
	{
		int			k = 0;
		Size		bytes = 0;
		int			j;

		old = MemoryContextSwitchTo(batch_cxt);
		while (i + k < n && k < nslots && (k == 0 || bytes < OUTBOX_BATCH_BYTES))
		{
			MqttEmitEventHeader *hdr = (MqttEmitEventHeader *) entries[i + k];
			char	   *model = entries[i + k] + sizeof(MqttEmitEventHeader);
			TupleTableSlot *slot = slots[k];
			Datum	   *v = slot->tts_values;
			bool	   *nul = slot->tts_isnull;
			int64		id;

			ExecClearTuple(slot);
			memset(nul, true, sizeof(bool) * td->natts);
			id = nextval_internal(seqid, false);
			ids[i + k] = id;
			v[colno[OC_ID]] = Int64GetDatum(id);
			v[colno[OC_KIND]] = Int16GetDatum(hdr->kind);
			v[colno[OC_FLAGS]] =
				Int16GetDatum((int16) ((hdr->flags & flag_mask) |
									   (Min(hdr->depth, ME_MAX_DEPTH) << ME_DEPTH_SHIFT)));
			v[colno[OC_OP]] = Int16GetDatum(hdr->op);
			v[colno[OC_QOS]] = Int16GetDatum(hdr->qos);
			v[colno[OC_MODEL]] =
				PointerGetDatum(cstring_to_text_with_len(model, hdr->model_len));
			v[colno[OC_PAYLOAD]] =
				PointerGetDatum(cstring_to_text_with_len(model + hdr->model_len,
														 hdr->payload_len));
			v[colno[OC_BATCH]] = Int64GetDatum(batch);
			v[colno[OC_MARKED]] = BoolGetDatum(marked);
			v[colno[OC_SEQ]] = Int64GetDatum(first_order + i + k);
			v[colno[OC_RELID]] = ObjectIdGetDatum(hdr->relid);
			v[colno[OC_CREATED_AT]] = TimestampTzGetDatum(GetCurrentTimestamp());
			nul[colno[OC_ID]] = nul[colno[OC_KIND]] = nul[colno[OC_FLAGS]] = false;
			nul[colno[OC_OP]] = nul[colno[OC_QOS]] = nul[colno[OC_MODEL]] = false;
			nul[colno[OC_PAYLOAD]] = nul[colno[OC_BATCH]] = false;
			nul[colno[OC_MARKED]] = nul[colno[OC_RELID]] = false;
			nul[colno[OC_CREATED_AT]] = false;
			nul[colno[OC_SEQ]] = (first_order == 0);
			ExecStoreVirtualTuple(slot);
			bytes += hdr->total_len;
			k++;
		}
		table_multi_insert(rel, slots, k, cid, 0, bistate);
		for (j = 0; j < k; j++)
		{
			List	   *conflicts;

			conflicts = me_exec_insert_index_tuples(rri, slots[j], estate);
			list_free(conflicts);
		}
		ResetPerTupleExprContext(estate);
		MemoryContextSwitchTo(old);
		for (j = 0; j < k; j++)
			ExecClearTuple(slots[j]);
		MemoryContextReset(batch_cxt);
		i += k;
	}

	if (bistate)
	{
		table_finish_bulk_insert(rel, 0);
		FreeBulkInsertState(bistate);
	}
	for (i = 0; i < nslots; i++)
		ExecDropSingleTupleTableSlot(slots[i]);
	pfree(slots);
	MemoryContextDelete(batch_cxt);
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
	/* what follows in this transaction sees the rows, as after an INSERT */
	CommandCounterIncrement();
}

/*
 * An int8[] of n ids, for an SPI argument.
 */
static Datum
int8_array(const int64 *ids, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * n);
	int			i;

	for (i = 0; i < n; i++)
		elems[i] = Int64GetDatum(ids[i]);
	return PointerGetDatum(construct_array(elems, n, INT8OID, 8, FLOAT8PASSBYVAL,
										   TYPALIGN_DOUBLE));
}

static void check(int ret, int expected, const char *what);

/*
 * A committing backend's statements on the outbox run as the bootstrap
 * superuser (the table is not the user's: every right on it is revoked)
 * and with search_path pinned to pg_catalog, so that the operators of
 * statements written without OPERATOR(pg_catalog.x) cannot be the user's.
 * An error in between is undone by the transaction's abort.
 */
typedef struct AsOwner
{
	Oid			userid;
	int			sec;
	int			guc_level;
} AsOwner;

static void
as_owner_begin(AsOwner *save)
{
	GetUserIdAndSecContext(&save->userid, &save->sec);
	SetUserIdAndSecContext(BOOTSTRAP_SUPERUSERID,
						   save->sec | SECURITY_LOCAL_USERID_CHANGE);
	save->guc_level = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_SUSET,
							 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
}

static void
as_owner_end(AsOwner *save)
{
	AtEOXact_GUC(true, save->guc_level);
	SetUserIdAndSecContext(save->userid, save->sec);
}

/*
 * A committing transaction found no room for what it planned after writing
 * its rows (me_outbox_insert): clear clear_flags on them and give them
 * batch and marked, as the outbox's owner (as_owner_begin).
 */
void
me_outbox_reposition(const int64 *ids, int n, int clear_flags, int64 batch, bool marked)
{
	Datum		args[4];
	Oid			types[4] = {INT8ARRAYOID, INT2OID, INT8OID, BOOLOID};
	AsOwner		save;

	args[0] = int8_array(ids, n);
	args[1] = Int16GetDatum((int16) clear_flags);
	args[2] = Int64GetDatum(batch);
	args[3] = BoolGetDatum(marked);
	as_owner_begin(&save);
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	check(SPI_execute_with_args("UPDATE mqtt_emit.outbox"
								" SET flags = flags OPERATOR(pg_catalog.&) (OPERATOR(pg_catalog.~) $2),"
								"     batch = $3, marked = $4"
								" WHERE id OPERATOR(pg_catalog.=) ANY ($1)",
								4, types, args, NULL, false, 0),
		  SPI_OK_UPDATE, "place outbox rows");
	PopActiveSnapshot();
	SPI_finish();
	as_owner_end(&save);
}

/*
 * The same for the rows of a big transaction (pending.c wrote them in
 * chunks while it ran): those with ids from min_id to max_id and the
 * transaction's batch become rows without a marker, at new_batch.  An
 * index range instead of an array of a million ids.
 */
void
me_outbox_reposition_range(int64 min_id, int64 max_id, int64 batch, int64 new_batch)
{
	Datum		args[4];
	Oid			types[4] = {INT8OID, INT8OID, INT8OID, INT8OID};
	AsOwner		save;

	args[0] = Int64GetDatum(min_id);
	args[1] = Int64GetDatum(max_id);
	args[2] = Int64GetDatum(batch);
	args[3] = Int64GetDatum(new_batch);
	as_owner_begin(&save);
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	check(SPI_execute_with_args("UPDATE mqtt_emit.outbox SET batch = $4, marked = false"
								" WHERE id OPERATOR(pg_catalog.>=) $1"
								"   AND id OPERATOR(pg_catalog.<=) $2"
								"   AND batch OPERATOR(pg_catalog.=) $3",
								4, types, args, NULL, false, 0),
		  SPI_OK_UPDATE, "place outbox rows");
	PopActiveSnapshot();
	SPI_finish();
	as_owner_end(&save);
}

static int64
first_int8(int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
								  col, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

/*
 * An outbox row of the current SPI result (ROW_COLUMNS) as an event.
 */
static void
row_from_tuple(HeapTuple tup, TupleDesc td, MeOutboxRow *row)
{
	bool		isnull;
	text	   *model;
	text	   *payload;
	Datum		seq;
	int16		flags;

	memset(row, 0, sizeof(*row));
	row->id = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
	row->hdr.kind = (uint8) DatumGetInt16(SPI_getbinval(tup, td, 2, &isnull));
	flags = DatumGetInt16(SPI_getbinval(tup, td, 3, &isnull));
	row->hdr.flags = (uint8) (flags & 0xFF);
	row->hdr.depth = (uint8) ((flags >> ME_DEPTH_SHIFT) & 0x7F);
	row->hdr.op = (uint8) DatumGetInt16(SPI_getbinval(tup, td, 4, &isnull));
	row->hdr.qos = (uint8) DatumGetInt16(SPI_getbinval(tup, td, 5, &isnull));
	model = DatumGetTextPP(SPI_getbinval(tup, td, 6, &isnull));
	payload = DatumGetTextPP(SPI_getbinval(tup, td, 7, &isnull));
	row->created_at = DatumGetTimestampTz(SPI_getbinval(tup, td, 8, &isnull));
	row->hdr.relid = DatumGetObjectId(SPI_getbinval(tup, td, 9, &isnull));
	seq = SPI_getbinval(tup, td, 10, &isnull);
	row->order = isnull ? 0 : DatumGetInt64(seq);
	row->hdr.model_len = VARSIZE_ANY_EXHDR(model);
	row->hdr.payload_len = VARSIZE_ANY_EXHDR(payload);
	row->hdr.total_len = sizeof(MqttEmitEventHeader) + row->hdr.model_len +
		row->hdr.payload_len;
	row->hdr.row_id = 0;
	row->model = text_to_cstring(model);
	row->payload = text_to_cstring(payload);
}

static void
check(int ret, int expected, const char *what)
{
	if (ret != expected)
		elog(ERROR, "cannot %s: %s", what, SPI_result_code_string(ret));
}

/*
 * The worker starts (or sees the extension appear): count the rows, find
 * the next place in the publishing order.  With fresh (the first worker
 * since the shared memory was set up: after a start or a crash), the queue
 * is new: durable events that were in the old queue too run their local
 * listeners from their rows (their flag is still on, else they ran), and
 * rows still waiting for a marker of the old queue are placed now, in id
 * order.
 */
void
me_outbox_start(bool fresh)
{
	SPI_connect();
	check(SPI_execute("SELECT count(*), coalesce(max(seq), 0) FROM mqtt_emit.outbox",
					  true, 1), SPI_OK_SELECT, "count mqtt_emit.outbox");
	me_outbox_rows_set((uint64) first_int8(1));
	next_order = first_int8(2) + 1;
	if (fresh)
	{
		Datum		epoch = Int64GetDatum((int64) me_shmem_epoch_seq());
		Oid			type = INT8OID;

		check(SPI_execute_with_args("UPDATE mqtt_emit.outbox SET flags = flags & ~" SQL_QUEUED
									" WHERE (flags & " SQL_QUEUED ") <> 0 AND batch < $1",
									1, &type, &epoch, NULL, false, 0),
			  SPI_OK_UPDATE, "update mqtt_emit.outbox");
		me_outbox_place_strays(true, 0);
		me_outbox_release_strays(true, 0);
	}
	SPI_finish();
}

/*
 * Set the shared row count to the outbox's (the count is approximate: a
 * row that a backend commits while the worker counts can be counted twice).
 */
void
me_outbox_recount(void)
{
	SPI_connect();
	check(SPI_execute("SELECT count(*) FROM mqtt_emit.outbox", true, 1),
		  SPI_OK_SELECT, "count mqtt_emit.outbox");
	me_outbox_rows_set((uint64) first_int8(1));
	SPI_finish();
}

/*
 * The statements that number rows without a marker (place_strays:
 * row_number() over the rows, joined back to the table; place_batch needs
 * no join) run without nested loops: with statistics
 * taken while the outbox was empty the planner expects one row and may
 * rescan the numbering subquery for every row, which for a big
 * transaction's 120,000 rows kept the worker busy for more than 20
 * minutes (test 078).  A hash or merge join costs n log n whatever the
 * estimates.  (What was seen, once, in test 078: the worker busy, not
 * waiting, for more than 20 minutes in the transaction that places such a
 * batch; the plan itself was not captured, and an EXPLAIN of the same
 * statistics by hand chose a harmless nested loop, so this is a guard
 * against the likely cause rather than a proven fix.)  Returns the GUC
 * nest level for AtEOXact_GUC.
 */
static int
no_nestloop(void)
{
	int			level = NewGUCNestLevel();

	(void) set_config_option("enable_nestloop", "off", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	return level;
}

/*
 * Give the rows of a committed transaction's outbox batch (its marker came
 * out of the queue) their place in the publishing order: next_order plus
 * the row's distance from the batch's first id.  The places keep the ids'
 * order and are unique (the next batch starts past max_id's place), with
 * gaps where other transactions' ids fall inside the range, which nothing
 * minds (the publishing order is only compared).  One UPDATE of a primary
 * key range without a join: a numbering subquery joined back to the table
 * costs a nested loop over the whole batch when the planner misjudges it
 * (a 120,000-row batch kept the worker busy for more than 20 minutes, test
 * 078), and a hash or merge join instead scans the whole outbox for every
 * marker.
 */
void
me_outbox_place_batch(const MqttEmitMarker *mk)
{
	Datum		args[4];
	Oid			types[4] = {INT8OID, INT8OID, INT8OID, INT8OID};

	args[0] = Int64GetDatum(mk->batch);
	args[1] = Int64GetDatum(mk->min_id);
	args[2] = Int64GetDatum(mk->max_id);
	args[3] = Int64GetDatum(next_order);
	SPI_connect();
	if (place_batch_plan == NULL)
	{
		place_batch_plan = SPI_prepare("UPDATE mqtt_emit.outbox SET seq = $4 + (id - $2) "
									   "WHERE id BETWEEN $2 AND $3 AND batch = $1 AND seq IS NULL",
									   4, types);
		if (place_batch_plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(place_batch_plan);
	}
	check(SPI_execute_plan(place_batch_plan, args, NULL, false, 0),
		  SPI_OK_UPDATE, "order outbox rows");
	if (SPI_processed > 0)
		next_order += mk->max_id - mk->min_id + 1;
	SPI_finish();
}

/*
 * Give rows that no marker will place (written when not even a marker fit
 * in the queue) their place, in id order: those written when the queue's
 * tail was at or before upto (everything queued before them has been
 * placed or published).  With all, instead every row without a place that
 * was written before the shared memory was set up (after a crash: no
 * marker or queue entry can come for those; rows committed since have
 * theirs in the new queue).
 */
void
me_outbox_place_strays(bool all, uint64 upto)
{
	Datum		args[3];
	Oid			types[3] = {INT8OID, INT8OID, TIMESTAMPTZOID};
	int			guc_level;

	args[0] = Int64GetDatum(next_order);
	args[1] = Int64GetDatum(all ? (int64) me_shmem_epoch_seq() : (int64) upto);
	args[2] = TimestampTzGetDatum(me_shmem_epoch_time());
	SPI_connect();
	guc_level = no_nestloop();
	check(SPI_execute_with_args(all ?
								"UPDATE mqtt_emit.outbox o SET seq = $1 + s.n - 1 "
								"FROM (SELECT id, row_number() OVER (ORDER BY id) AS n "
								"      FROM mqtt_emit.outbox WHERE seq IS NULL AND " SQL_OLD_EPOCH
								"       AND (flags & " SQL_PUBLISH ") <> 0) s "
								"WHERE o.id = s.id" :
								"UPDATE mqtt_emit.outbox o SET seq = $1 + s.n - 1 "
								"FROM (SELECT id, row_number() OVER (ORDER BY id) AS n "
								"      FROM mqtt_emit.outbox WHERE seq IS NULL AND NOT marked"
								"       AND (flags & " SQL_PUBLISH ") <> 0"
								"       AND batch >= -$2 - 1) s "
								"WHERE o.id = s.id",
								all ? 3 : 2, types, args, NULL, false, 0),
		  SPI_OK_UPDATE, "order outbox rows");
	AtEOXact_GUC(true, guc_level);
	next_order += SPI_processed;
	SPI_finish();
}

/*
 * The local listeners of held rows are due now: copy them, in id order, as
 * rows with only ME_FLAG_LOCAL (the listener worker runs rows in id order,
 * so they run after everything handed to it before and before everything
 * handed after), clear their ME_FLAG_HELD and delete those that are done.
 * where: the SQL condition on the held rows, with args; plans: where the
 * two statements' plans are kept for a where that is used often (once per
 * spilled transaction), or NULL to plan them each time.  Returns how many
 * rows were copied.
 */
static uint64
release_held(const char *where, int nargs, Oid *types, Datum *args,
			 SPIPlanPtr *plans, bool copy_all)
{
	StringInfoData sql;
	SPIPlanPtr	copy_plan = plans ? plans[0] : NULL;
	SPIPlanPtr	del_plan = plans ? plans[1] : NULL;
	Oid			alltypes[4];
	Datum		allargs[4];
	bool		isnull;
	int64		cleared;
	uint64		copied;

	/*
	 * $N (after the where's own arguments): whether to copy at all.  With
	 * no listener that takes local events the held rows of a marker are
	 * only cleared (and deleted when done), as the queue path skips such
	 * events (wants_local_row, with the registry as read for the same
	 * round); this is most of what a spilled transaction costs the worker
	 * on a server that only publishes.  With copy_all every row is
	 * copied: rows without a marker (rare) are released at the end of a
	 * round for rows that may have been committed after the registry was
	 * read, and a backend (a big durable transaction at PRE_COMMIT) has no
	 * registry; the listener worker reads the registry again before it
	 * runs them.
	 */
	Assert(nargs < 4);
	memcpy(alltypes, types, sizeof(Oid) * nargs);
	memcpy(allargs, args, sizeof(Datum) * nargs);
	alltypes[nargs] = BOOLOID;
	allargs[nargs] = BoolGetDatum(copy_all || me_listeners_any_local());

	initStringInfo(&sql);
	if (copy_plan == NULL)
	{
		appendStringInfo(&sql,
						 "WITH h AS ("
						 " UPDATE mqtt_emit.outbox SET flags = flags & ~" SQL_HELD
						 " WHERE (flags & " SQL_HELD ") <> 0 AND %s"
						 " RETURNING id, kind, flags, op, qos, model, payload, relid, created_at),"
						 " c AS ("
						 " INSERT INTO mqtt_emit.outbox"
						 "  (kind, flags, op, qos, model, payload, batch, marked, relid, created_at)"
						 " SELECT kind, (flags & ~(" SQL_PUBLISH " | " SQL_QUEUED " | " SQL_HELD ")) | " SQL_LOCAL ","
						 "  op, qos, model, payload, 0, true, relid, created_at"
						 "  FROM h WHERE $%d ORDER BY id"
						 " RETURNING 1)"
						 " SELECT (SELECT count(*) FROM h), (SELECT count(*) FROM c)",
						 where, nargs + 1);
		if (plans)
		{
			/* one marker per spilled transaction: planned once (a round has many) */
			copy_plan = SPI_prepare(sql.data, nargs + 1, alltypes);
			if (copy_plan == NULL)
				elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
			SPI_keepplan(copy_plan);
			plans[0] = copy_plan;
		}
	}
	if (copy_plan)
		check(SPI_execute_plan(copy_plan, allargs, NULL, false, 0),
			  SPI_OK_SELECT, "release held outbox rows");
	else
		check(SPI_execute_with_args(sql.data, nargs + 1, alltypes, allargs, NULL, false, 0),
			  SPI_OK_SELECT, "release held outbox rows");
	cleared = first_int8(1);
	copied = (uint64) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
												  SPI_tuptable->tupdesc, 2, &isnull));
	if (copied > 0)
		me_outbox_rows_add(copied);
	if (cleared > 0)
	{
		resetStringInfo(&sql);
		appendStringInfo(&sql, "DELETE FROM mqtt_emit.outbox WHERE " SQL_UNFINISHED " = 0 AND %s", where);
		if (plans && del_plan == NULL)
		{
			del_plan = SPI_prepare(sql.data, nargs, types);
			if (del_plan == NULL)
				elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
			SPI_keepplan(del_plan);
			plans[1] = del_plan;
		}
		if (del_plan)
			check(SPI_execute_plan(del_plan, args, NULL, false, 0),
				  SPI_OK_DELETE, "delete from mqtt_emit.outbox");
		else
			check(SPI_execute_with_args(sql.data, nargs, types, args, NULL, false, 0),
				  SPI_OK_DELETE, "delete from mqtt_emit.outbox");
		me_outbox_rows_sub(SPI_processed);
	}
	pfree(sql.data);
	return copied;
}

/*
 * The local cursor reached a committed transaction's marker: its held rows'
 * local listeners are due.  by_registry: the caller is the worker, whose
 * listener registry (as read for this round) says whether any listener
 * takes local events; otherwise every held row is copied.  Returns how
 * many rows were handed over.
 */
uint64
me_outbox_release_batch(const MqttEmitMarker *mk, bool by_registry)
{
	Datum		args[3];
	Oid			types[3] = {INT8OID, INT8OID, INT8OID};
	uint64		n;
	AsOwner		save;

	args[0] = Int64GetDatum(mk->batch);
	args[1] = Int64GetDatum(mk->min_id);
	args[2] = Int64GetDatum(mk->max_id);
	if (!by_registry)
		as_owner_begin(&save);	/* a committing backend (pending.c) */
	SPI_connect();
	n = release_held("id BETWEEN $2 AND $3 AND batch = $1", 3, types, args,
					 by_registry ? release_batch_plans : backend_release_plans,
					 !by_registry);
	SPI_finish();
	if (!by_registry)
		as_owner_end(&save);
	return n;
}

/*
 * Held rows that no marker will release (see me_outbox_place_strays, whose
 * rules these follow): those written when the queue's tail was at or
 * before upto, the local cursor being there; with all, every held row
 * written before the shared memory was set up.  Returns how many rows were
 * handed over.
 */
uint64
me_outbox_release_strays(bool all, uint64 upto)
{
	Datum		args[3];
	Oid			types[3] = {INT8OID, INT8OID, TIMESTAMPTZOID};
	uint64		n;

	args[0] = Int64GetDatum((int64) upto);
	args[1] = Int64GetDatum((int64) me_shmem_epoch_seq());
	args[2] = TimestampTzGetDatum(me_shmem_epoch_time());
	SPI_connect();
	if (all)
		n = release_held(SQL_OLD_EPOCH, 3, types, args, NULL, true);
	else
		n = release_held("NOT marked AND batch < 0 AND batch >= -$1 - 1", 1, types, args, NULL, true);
	SPI_finish();
	return n;
}

/*
 * The lowest queue position at which a held row without a marker was
 * written, or -1 when there is none.  Scans the outbox: called only after
 * a backend wrote such rows (me_held_strays_version).
 */
int64
me_outbox_next_held_stray(void)
{
	int64		batch;
	bool		isnull;

	SPI_connect();
	check(SPI_execute("SELECT max(batch) FROM mqtt_emit.outbox"
					  " WHERE (flags & " SQL_HELD ") <> 0 AND NOT marked AND batch < 0",
					  false, 1),
		  SPI_OK_SELECT, "read mqtt_emit.outbox");
	batch = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return isnull ? -1 : -batch - 1;
}

/*
 * The lowest queue position at which a row still waiting for its place
 * without a marker was written, or -1 when there is none.
 */
int64
me_outbox_next_stray(void)
{
	int64		batch;
	bool		isnull;

	/* the highest batch is the lowest position (see SQL_STRAY_POS) */
	SPI_connect();
	/* not read-only: a new snapshot, which sees the rows placed just now */
	check(SPI_execute("SELECT max(batch) FROM mqtt_emit.outbox"
					  " WHERE seq IS NULL AND NOT marked AND (flags & " SQL_PUBLISH ") <> 0",
					  false, 1), SPI_OK_SELECT, "read mqtt_emit.outbox");
	(void) SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	batch = isnull ? 0 : first_int8(1);
	SPI_finish();
	if (isnull)
		return -1;
	return batch >= 0 ? 0 : -batch - 1;
}

/*
 * Give the rows of durable events that the queue holds too their place in
 * the publishing order, in the order of ids[]; they are published from the
 * outbox now.  Rows already placed (by an earlier worker) stay where they
 * are.
 */
static void
place_queued_rows(const int64 *ids, int n)
{
	Datum		args[2];
	Oid			types[2] = {INT8ARRAYOID, INT8OID};

	args[0] = int8_array(ids, n);
	args[1] = Int64GetDatum(next_order);
	SPI_connect();
	check(SPI_execute_with_args("UPDATE mqtt_emit.outbox o"
								" SET seq = $2 + s.n - 1,"
								"     flags = o.flags & ~" SQL_QUEUED
								" FROM unnest($1) WITH ORDINALITY AS s(id, n)"
								" WHERE o.id = s.id AND o.seq IS NULL",
								2, types, args, NULL, false, 0),
		  SPI_OK_UPDATE, "order outbox rows");
	SPI_finish();
}

/*
 * Move queue entries into the outbox, in their order, behind everything
 * placed so far: copy memory-mode events there, and place durable events'
 * rows, which are there already.  The queue forgets them when the
 * transaction commits, so it waits for its WAL flush.
 */
void
me_outbox_move(char **entries, int n)
{
	int64	   *ids;
	int			i = 0;

	if (n == 0)
		return;
	ids = palloc(sizeof(int64) * n);
	while (i < n)
	{
		bool		durable = ((MqttEmitEventHeader *) entries[i])->row_id != 0;
		int			j;

		for (j = i; j < n &&
			 (((MqttEmitEventHeader *) entries[j])->row_id != 0) == durable; j++)
			ids[j - i] = ((MqttEmitEventHeader *) entries[j])->row_id;
		if (durable)
			place_queued_rows(ids, j - i);
		else
		{
			me_outbox_insert(entries + i, j - i, (uint8) ~ME_FLAG_LOCAL, 0, true,
							 next_order, ids);
			me_outbox_rows_add(j - i);
			me_count(ME_STAT_OUTBOXED, j - i);
		}
		next_order += j - i;
		i = j;
	}
	ForceSyncCommit();
	pfree(ids);
}

/*
 * The place the next moved event will get in the publishing order.
 */
int64
me_outbox_next_order(void)
{
	return next_order;
}

/*
 * The row is done with (acknowledged, or not to be published): delete it
 * with the next batch.  No transaction needed.
 */
void
me_outbox_row_done(int64 id)
{
	if (ndone_rows >= maxdone_rows)
	{
		maxdone_rows = Max(1024, maxdone_rows * 2);
		if (done_rows == NULL)
			done_rows = MemoryContextAlloc(TopMemoryContext,
										   sizeof(int64) * maxdone_rows);
		else
			done_rows = repalloc(done_rows, sizeof(int64) * maxdone_rows);
	}
	if (ndone_rows == 0)
		done_since = GetCurrentTimestamp();
	done_rows[ndone_rows++] = id;
}

/*
 * How many rows wait to be deleted, and since when.
 */
int
me_outbox_rows_done(TimestampTz *since)
{
	if (since)
		*since = done_since;
	return ndone_rows;
}

/*
 * Clear the publish flag of the rows that are done with, and delete those
 * that are finished.
 *
 * Rows the listener worker has locked (it clears their local flag, in a
 * transaction that can last mqtt_emit.listener_batch_time and a listener
 * call) are left for the next round: waiting for them stopped publishing
 * behind a slow local listener, and the two workers' row locks, taken in
 * different orders, could deadlock (seen once in a durable-mode bench run:
 * "deadlock detected" between "deleting published outbox rows" and
 * "running listeners").  So the rows are locked first, in id order, with
 * SKIP LOCKED, and only those are changed.
 */
/* The int8 first column of the last SPI result into ids; their number. */
static int
spi_ids(int64 *ids)
{
	int			i;

	for (i = 0; i < (int) SPI_processed; i++)
	{
		bool		isnull;

		ids[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
											 SPI_tuptable->tupdesc, 1, &isnull));
	}
	return (int) SPI_processed;
}

void
me_outbox_delete_done(void)
{
	Datum		arg;
	int64	   *locked;
	int			nlocked;

	if (ndone_rows == 0)
		return;
	arg = int8_array(done_rows, ndone_rows);
	SPI_connect();
	if (lock_plan == NULL)
	{
		Oid			argtype = INT8ARRAYOID;
		Oid			argtypes2[2] = {INT8ARRAYOID, INT8ARRAYOID};

		lock_plan = SPI_prepare("SELECT id FROM mqtt_emit.outbox WHERE id = ANY ($1)"
								" ORDER BY id FOR UPDATE SKIP LOCKED", 1, &argtype);
		busy_plan = SPI_prepare("SELECT id FROM mqtt_emit.outbox"
								" WHERE id = ANY ($1) AND id <> ALL ($2)", 2, argtypes2);
		clear_plan = SPI_prepare("UPDATE mqtt_emit.outbox SET flags = flags & ~" SQL_PUBLISH
								 " WHERE id = ANY ($1) AND (flags & (" SQL_LOCAL " | " SQL_HELD ")) <> 0",
								 1, &argtype);
		delete_plan = SPI_prepare("DELETE FROM mqtt_emit.outbox"
								  " WHERE id = ANY ($1) AND " SQL_UNFINISHED " IN (0, " SQL_PUBLISH ")",
								  1, &argtype);
		if (lock_plan == NULL || busy_plan == NULL || clear_plan == NULL || delete_plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(lock_plan);
		SPI_keepplan(busy_plan);
		SPI_keepplan(clear_plan);
		SPI_keepplan(delete_plan);
	}
	check(SPI_execute_plan(lock_plan, &arg, NULL, false, 0),
		  SPI_OK_SELECT, "lock rows of mqtt_emit.outbox");
	locked = palloc(sizeof(int64) * Max((int) SPI_processed, 1));
	nlocked = spi_ids(locked);
	if (nlocked < ndone_rows)
	{
		/* which of the others still exist: locked by the listener worker */
		Datum		args2[2];

		args2[0] = arg;
		args2[1] = int8_array(locked, nlocked);
		check(SPI_execute_plan(busy_plan, args2, NULL, true, 0),
			  SPI_OK_SELECT, "read mqtt_emit.outbox");
		ndone_rows = spi_ids(done_rows);
	}
	else
		ndone_rows = 0;
	if (nlocked == 0)
	{
		SPI_finish();
		return;
	}
	arg = int8_array(locked, nlocked);
	check(SPI_execute_plan(clear_plan, &arg, NULL, false, 0),
		  SPI_OK_UPDATE, "update mqtt_emit.outbox");
	check(SPI_execute_plan(delete_plan, &arg, NULL, false, 0),
		  SPI_OK_DELETE, "delete from mqtt_emit.outbox");
	me_outbox_rows_sub(SPI_processed);
	SPI_finish();
}

static void
insert_dead_letter(const char *topic, text *payload, const char *reason,
				   TimestampTz created_at)
{
	Datum		args[4];
	Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID};

	args[0] = CStringGetTextDatum(topic);
	args[1] = PointerGetDatum(payload);
	args[2] = CStringGetTextDatum(reason);
	args[3] = TimestampTzGetDatum(created_at);
	check(SPI_execute_with_args("INSERT INTO mqtt_emit.dead_letters (topic, payload, reason, created_at) "
								"VALUES ($1, $2, $3, $4)", 4, types, args, NULL, false, 0),
		  SPI_OK_INSERT, "write to mqtt_emit.dead_letters");
	me_count(ME_STAT_DEAD_LETTERS, 1);
	ereport(LOG,
			(errmsg("pg_mqtt_emit moved a message on topic \"%s\" to mqtt_emit.dead_letters",
					topic),
			 errdetail("%s.", reason)));
}

static void
init_topicbuf(void)
{
	if (topicbuf.data == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		initStringInfo(&topicbuf);
		MemoryContextSwitchTo(old);
	}
}

/*
 * The message of an event as text: its payload without the MQTT 5
 * properties that an ad-hoc publish may carry in front (pubprops.c).
 */
static text *
message_text(const MqttEmitEventHeader *hdr, const char *payload)
{
	int			len = (int) hdr->payload_len;
	const char *props;
	int			props_len;

	if (hdr->kind == ME_KIND_PUBLISH && (hdr->flags & ME_FLAG_PROPS))
		(void) me_pubprops_split(&payload, &len, &props, &props_len);
	return cstring_to_text_with_len(payload, len);
}

/*
 * Move an outbox row that the broker keeps refusing to the dead letters.
 */
void
me_outbox_dead_letter_row(int64 id, const char *reason)
{
	Datum		arg = Int64GetDatum(id);
	Oid			argtype = INT8OID;
	MeOutboxRow row;

	init_topicbuf();
	SPI_connect();
	check(SPI_execute_with_args("SELECT " ROW_COLUMNS " FROM mqtt_emit.outbox WHERE id = $1",
								1, &argtype, &arg, NULL, false, 1),
		  SPI_OK_SELECT, "read mqtt_emit.outbox");
	if (SPI_processed == 1)
	{
		row_from_tuple(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, &row);
		me_build_dead_letter_topic(&topicbuf, &row.hdr, row.model);
		insert_dead_letter(topicbuf.data,
						   message_text(&row.hdr, row.payload),
						   reason, row.created_at);
		check(SPI_execute_with_args("UPDATE mqtt_emit.outbox SET flags = flags & ~" SQL_PUBLISH
									" WHERE id = $1",
									1, &argtype, &arg, NULL, false, 0),
			  SPI_OK_UPDATE, "update mqtt_emit.outbox");
		check(SPI_execute_with_args("DELETE FROM mqtt_emit.outbox WHERE id = $1"
									" AND " SQL_UNFINISHED " = 0",
									1, &argtype, &arg, NULL, false, 0),
			  SPI_OK_DELETE, "delete from mqtt_emit.outbox");
		me_outbox_rows_sub(SPI_processed);
		me_set_last_error("publisher: outbox row " INT64_FORMAT " moved to mqtt_emit.dead_letters", id);
	}
	SPI_finish();
}

/*
 * Keep a queue entry (header, model, payload) that the broker refused in
 * the dead letters.  Its queue entry is gone: wait for the WAL flush.
 */
void
me_outbox_dead_letter_entry(const MqttEmitEventHeader *hdr, const char *reason)
{
	const char *model = (const char *) hdr + sizeof(MqttEmitEventHeader);

	init_topicbuf();
	me_build_dead_letter_topic(&topicbuf, hdr, model);
	SPI_connect();
	insert_dead_letter(topicbuf.data,
					   message_text(hdr, model + hdr->model_len),
					   reason, GetCurrentTransactionStartTimestamp());
	SPI_finish();
	ForceSyncCommit();
}

/*
 * Note the oldest waiting row's age for mqtt_emit.stats: at once when none
 * is noted, else at most once a second.  The scan from the low end of the
 * primary key steps over the index entries of every row deleted since the
 * last vacuum (6 ms a call with 18,000 spilled events behind, bench), and
 * draining the outbox calls this every round.
 */
void
me_outbox_note_oldest(void)
{
	static TimestampTz last_noted = 0;
	bool		isnull = true;
	Datum		d = (Datum) 0;
	TimestampTz now = GetCurrentTimestamp();

	if (me_outbox_get_oldest() != 0 && now - last_noted < USECS_PER_SEC)
		return;
	last_noted = now;
	SPI_connect();
	check(SPI_execute("SELECT created_at FROM mqtt_emit.outbox ORDER BY id LIMIT 1", false, 1),
		  SPI_OK_SELECT, "read mqtt_emit.outbox");
	if (SPI_processed == 1)
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	me_outbox_set_oldest(isnull ? 0 : DatumGetTimestampTz(d));
	SPI_finish();
}

/*
 * The listener worker: up to limit rows whose local listeners have not
 * run, oldest first, copied into the caller's memory context.  Returns
 * how many.
 */
int
me_outbox_local_rows(int limit, MeOutboxRow **rows)
{
	MemoryContext outer = CurrentMemoryContext;
	Datum		arg = Int32GetDatum(limit);
	Oid			argtype = INT4OID;
	uint64		i;
	int			n;

	SPI_connect();
	check(SPI_execute_with_args("SELECT " ROW_COLUMNS " FROM mqtt_emit.outbox"
								" WHERE (flags & " SQL_LOCAL ") <> 0 ORDER BY id LIMIT $1",
								1, &argtype, &arg, NULL, true, 0),
		  SPI_OK_SELECT, "read mqtt_emit.outbox");
	n = (int) SPI_processed;
	MemoryContextSwitchTo(outer);
	*rows = palloc(sizeof(MeOutboxRow) * Max(n, 1));
	for (i = 0; i < (uint64) n; i++)
		row_from_tuple(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, &(*rows)[i]);
	SPI_finish();
	return n;
}

/*
 * The listener worker is done with these rows: clear their local flag and
 * delete those that are finished.
 */
void
me_outbox_local_done(const int64 *ids, int n)
{
	Datum		arg;

	if (n == 0)
		return;
	arg = int8_array(ids, n);
	SPI_connect();
	if (local_clear_plan == NULL)
	{
		Oid			argtype = INT8ARRAYOID;

		local_clear_plan = SPI_prepare("UPDATE mqtt_emit.outbox SET flags = flags & ~" SQL_LOCAL
									   " WHERE id = ANY ($1)",
									   1, &argtype);
		local_delete_plan = SPI_prepare("DELETE FROM mqtt_emit.outbox"
										" WHERE id = ANY ($1) AND " SQL_UNFINISHED " = 0",
										1, &argtype);
		if (local_clear_plan == NULL || local_delete_plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(local_clear_plan);
		SPI_keepplan(local_delete_plan);
	}
	check(SPI_execute_plan(local_clear_plan, &arg, NULL, false, 0),
		  SPI_OK_UPDATE, "update mqtt_emit.outbox");
	check(SPI_execute_plan(local_delete_plan, &arg, NULL, false, 0),
		  SPI_OK_DELETE, "delete from mqtt_emit.outbox");
	me_outbox_rows_sub(SPI_processed);
	SPI_finish();
}

/*
 * The listener worker gave up on a row: keep it in the dead letters with
 * the error, and be done with its local listeners.
 */
void
me_outbox_local_failed(const MeOutboxRow *row, const char *reason)
{
	init_topicbuf();
	me_build_dead_letter_topic(&topicbuf, &row->hdr, row->model);
	SPI_connect();
	insert_dead_letter(topicbuf.data,
					   cstring_to_text_with_len(row->payload, row->hdr.payload_len),
					   reason, row->created_at);
	SPI_finish();
	me_outbox_local_done(&row->id, 1);
}

/*
 * The batch of rows written without a marker: where in the queue they
 * belong (see me_outbox_place_strays).
 */
int64
me_outbox_stray_batch(uint64 queue_tail)
{
	return -(int64) queue_tail - 1;
}

/*
 * The worker keeps received messages as outbox rows of kind
 * ME_KIND_REMOTE (model: the topic) for the listener worker, in arrival
 * order.  Topics and payloads must be valid text.
 */
static void
insert_received(uint8 kind, const char **topics, const int *topic_lens,
				const char **payloads, const int *payload_lens, int n)
{
	char	  **entries = palloc(sizeof(char *) * n);
	int64	   *ids = palloc(sizeof(int64) * n);
	int			i;

	for (i = 0; i < n; i++)
	{
		MqttEmitEventHeader hdr;

		memset(&hdr, 0, sizeof(hdr));
		hdr.kind = kind;
		hdr.flags = ME_FLAG_LOCAL;
		hdr.op = ME_OP_OTHER;
		hdr.model_len = topic_lens[i];
		hdr.payload_len = payload_lens[i];
		hdr.total_len = sizeof(hdr) + topic_lens[i] + payload_lens[i];
		entries[i] = palloc(hdr.total_len);
		memcpy(entries[i], &hdr, sizeof(hdr));
		memcpy(entries[i] + sizeof(hdr), topics[i], topic_lens[i]);
		memcpy(entries[i] + sizeof(hdr) + topic_lens[i], payloads[i], payload_lens[i]);
	}
	me_outbox_insert(entries, n, 0xFF, 0, true, 0, ids);
	me_outbox_rows_add(n);
}

void
me_outbox_insert_received(const char **topics, const int *topic_lens,
						  const char **payloads, const int *payload_lens, int n)
{
	insert_received(ME_KIND_REMOTE, topics, topic_lens, payloads, payload_lens, n);
}

/*
 * Messages for handlers (mqtt_emit.subscribe), as rows of kind
 * ME_KIND_MESSAGE: model is the topic, payload the text of
 * me_handlers_encode().
 */
void
me_outbox_insert_messages(const char **topics, const int *topic_lens,
						  const char **payloads, const int *payload_lens, int n)
{
	insert_received(ME_KIND_MESSAGE, topics, topic_lens, payloads, payload_lens, n);
}

/*
 * A message a handler failed on for good: a dead letter with the topic and
 * the payload as bytea's text form ("\x" and hex; payload::bytea gives the
 * bytes back).  hex_len bytes of stored are that form.
 */
void
me_outbox_message_dead_letter(const char *topic, const char *stored, int hex_len,
							  const char *reason, TimestampTz created_at)
{
	SPI_connect();
	insert_dead_letter(topic, cstring_to_text_with_len(stored, hex_len),
					   reason, created_at);
	SPI_finish();
}

/*
 * Call fn for up to limit rows placed after the given place in the
 * publishing order, in that order, until it returns false.  Returns the
 * number of rows read.
 */
int
me_outbox_scan_publishable(int64 after, int limit, MeOutboxRowFn fn, void *arg)
{
	Datum		args[2];
	Oid			types[2] = {INT8OID, INT4OID};
	SPITupleTable *tt;
	uint64		nrows;
	uint64		i;

	args[0] = Int64GetDatum(after);
	args[1] = Int32GetDatum(limit);
	SPI_connect();
	check(SPI_execute_with_args("SELECT " ROW_COLUMNS " FROM mqtt_emit.outbox"
								" WHERE seq > $1 AND (flags & " SQL_PUBLISH ") <> 0"
								" ORDER BY seq LIMIT $2",
								2, types, args, NULL, false, 0),
		  SPI_OK_SELECT, "read mqtt_emit.outbox");
	tt = SPI_tuptable;
	nrows = SPI_processed;
	for (i = 0; i < nrows; i++)
	{
		MeOutboxRow row;

		row_from_tuple(tt->vals[i], tt->tupdesc, &row);
		if (!fn(&row, arg))
			break;
	}
	SPI_finish();
	return (int) nrows;
}

/*
 * Is nothing left to publish from the outbox?  Rows that are left wait
 * for their queue entry (a durable event in the queue, or a marker), which
 * is ahead of the publish cursor.  If so, set the shared row count to the
 * rows left and forget the oldest row's age.
 */
bool
me_outbox_drained(void)
{
	bool		drained;

	SPI_connect();
	check(SPI_execute("SELECT (SELECT count(*) FROM mqtt_emit.outbox)"
					  " WHERE NOT EXISTS (SELECT FROM mqtt_emit.outbox WHERE seq IS NOT NULL"
					  "                   AND (flags & " SQL_PUBLISH ") <> 0)"
					  "   AND NOT EXISTS (SELECT FROM mqtt_emit.outbox WHERE seq IS NULL AND NOT marked"
					  "                   AND (flags & " SQL_PUBLISH ") <> 0)",
					  false, 1),
		  SPI_OK_SELECT, "read mqtt_emit.outbox");
	drained = (SPI_processed == 1);
	if (drained)
	{
		me_outbox_rows_set((uint64) first_int8(1));
		me_outbox_set_oldest(0);
	}
	SPI_finish();
	return drained;
}
