/*-------------------------------------------------------------------------
 *
 * pending.c
 *		The events of the current transaction: kept until it ends, handed
 *		to the shared-memory queue (or the outbox) when it commits.
 *
 * Rolling back a subtransaction drops the events made inside it; releasing
 * one hands them to the parent.  At PRE_COMMIT the bytes needed for all
 * pending events are reserved in the queue: that may fail, and then the
 * transaction fails, spills to the outbox or (with mqtt_emit.overflow =
 * drop) commits without its events, counted.  At COMMIT the events are
 * copied into the reserved space, which cannot fail.  PREPARE TRANSACTION
 * with pending events is refused, since a prepared transaction may commit
 * in another session that does not have them.
 *
 * Two limits apply when an event is added.  An event captured while the
 * listener worker runs a listener for an event of depth d has depth d + 1
 * (me_capture_set_depth); beyond mqtt_emit.max_depth it is not kept, with a
 * warning and a counter, so that a listener whose changes feed its own
 * model cannot make events without end.  And a transaction may keep at most
 * mqtt_emit.max_transaction_events events, which a superuser can set per
 * role, so that one role cannot fill the queue and the outbox for all.
 *
 * Batched tables (watch(..., batch => true)).  Their events are captured
 * like any other, marked ME_FLAG_BATCH.  At PRE_COMMIT, before anything
 * is reserved, build_batches() takes the publishing away from each of
 * them (the event stays for its local listeners, unless emit_local was
 * off) and appends, after the transaction's other events, one message per
 * model: an ad-hoc publish (ME_KIND_PUBLISH) to
 * <batch_topic_prefix>/<model>/batch whose payload carries the model's
 * events of the transaction, as a JSON array of the very payloads they
 * would have been sent as, in capture order; split into parts of at most
 * mqtt_emit.batch_max_bytes, each naming the transaction and its number.
 * From there the parts are entries like any other: queue or outbox, the
 * commit order, acknowledgements, dead letters.  Rows of a rolled-back
 * savepoint are gone before; the parts do not count against
 * mqtt_emit.max_transaction_events (their rows did).
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/pending.c
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
#include "topic.h"

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
static MeQueueSlot reservation;	/* queue space reserved at PRE_COMMIT */
static int	outboxed = 0;			/* written to the outbox at PRE_COMMIT */
static bool marker_reserved = false;
static bool queued = false;		/* durable events reserved their queue room */
static MqttEmitMarker marker;

#define ME_MARKER_ENTRY_SIZE (sizeof(MqttEmitEventHeader) + sizeof(MqttEmitMarker))
static bool spilled = false;
static bool local_rows = false;		/* outbox rows for local listeners */
static bool held_rows = false;		/* ... that wait for the worker (relay.c) */
static bool listeners_changed = false;
static int	capture_depth = 0;		/* depth of the events captured now */
static bool batched = false;	/* some pending event has ME_FLAG_BATCH */

/*
 * A big transaction's events written to the outbox before it commits
 * (flush_chunk), one entry per write: the subtransaction level it was
 * written at (its rows roll back with that subtransaction) and the ids of
 * its rows.  marker.batch is fixed by the first write.
 */
typedef struct FlushedChunk
{
	int			level;
	int			n;
	int64		first_id;
	int64		last_id;
} FlushedChunk;

static FlushedChunk *chunks = NULL;
static int	nchunks = 0;
static int	maxchunks = 0;
static int	nflushed = 0;			/* rows of the chunks in chunks[] */
static bool batch_taken = false;	/* marker.batch is this transaction's */


static void capture_xact_callback(XactEvent event, void *arg);
static void capture_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									 SubTransactionId parentSubid, void *arg);
static void reset_pending(void);
static void keep_entry(char *entry, int level);
static void maybe_flush_chunk(void);

/*
 * Install the transaction callbacks; from me_capture_init().
 */
void
me_pending_init(void)
{
	RegisterXactCallback(capture_xact_callback, NULL);
	RegisterSubXactCallback(capture_subxact_callback, NULL);
}

/*
 * Keep one event until the end of the transaction.  The model (or topic)
 * and payload are copied; the caller keeps its buffers.  False when it is
 * not kept (deeper than mqtt_emit.max_depth: a warning, counted).
 */
bool
me_capture_add_event(MqttEmitKind kind, uint8 flags, MqttEmitOp op,
					 Oid relid, const char *model, int model_len,
					 const char *payload, int payload_len, int qos)
{
	MqttEmitEventHeader hdr;
	Size		total = sizeof(MqttEmitEventHeader) + model_len + payload_len;
	char	   *entry;

	if (capture_depth > mqtt_emit_max_depth)
	{
		ereport(WARNING,
				(errcode(ERRCODE_STATEMENT_TOO_COMPLEX),
				 errmsg("event on \"%.*s\" not captured: depth %d exceeds \"mqtt_emit.max_depth\" (%d)",
						Min(model_len, MQTT_EMIT_MAX_MODEL_LEN), model,
						capture_depth, mqtt_emit_max_depth),
				 errdetail("The change was made by a listener running for an event that listeners caused, %d levels deep.",
						   capture_depth - 1),
				 errhint("Check for listeners whose changes feed their own model, or raise \"mqtt_emit.max_depth\".")));
		me_count(ME_STAT_DEPTH_EXCEEDED, 1);
		return false;
	}
	/* the transaction's place and size in the queue are fixed already */
	if (reservation.len > 0 || outboxed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("cannot capture an event of \"%.*s\" after the transaction's events were handed over for commit",
						Min(model_len, MQTT_EMIT_MAX_MODEL_LEN), model),
				 errdetail("The change was made by a commit-time callback that runs after pg_mqtt_emit's."),
				 errhint("Make the change before COMMIT.")));
	if (mqtt_emit_max_transaction_events > 0 &&
		npending + nflushed >= mqtt_emit_max_transaction_events)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("transaction exceeds \"mqtt_emit.max_transaction_events\" (%d)",
						mqtt_emit_max_transaction_events),
				 errdetail("Each captured row change, each retained state message of a retain_last table and each mqtt_emit.publish() is one event; none of this transaction's events are kept."),
				 errhint("Split the work into smaller transactions, turn off \"mqtt_emit.enabled\" for bulk changes, or ask a superuser to raise \"mqtt_emit.max_transaction_events\" for this role.")));
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
	hdr.depth = (uint8) capture_depth;
	hdr.row_id = 0;

	entry = MemoryContextAlloc(TopTransactionContext, total);
	memcpy(entry, &hdr, sizeof(hdr));
	memcpy(entry + sizeof(hdr), model, model_len);
	memcpy(entry + sizeof(hdr) + model_len, payload, payload_len);
	if (flags & ME_FLAG_BATCH)
		batched = true;
	keep_entry(entry, GetCurrentTransactionNestLevel());
	maybe_flush_chunk();
	return true;
}

/*
 * Append a queue entry (in TopTransactionContext) to the pending list.
 */
static void
keep_entry(char *entry, int level)
{
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
	pending_level[npending] = level;
	pending[npending] = entry;
	npending++;
	pending_bytes += ((MqttEmitEventHeader *) entry)->total_len;
}

/*
 * The listener worker tells this before it runs the listeners of an event
 * of depth d (d + 1), and after (0): events captured meanwhile get that
 * depth.  At most ME_MAX_DEPTH + 1, which is never kept.
 */
void
me_capture_set_depth(int depth)
{
	capture_depth = Min(depth, ME_MAX_DEPTH + 1);
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
	reservation.len = 0;
	outboxed = 0;
	marker_reserved = false;
	queued = false;
	spilled = false;
	local_rows = false;
	held_rows = false;
	batched = false;
	chunks = NULL;
	nchunks = 0;
	maxchunks = 0;
	nflushed = 0;
	batch_taken = false;
}

/*
 * Refuse to write n more rows when the outbox holds mqtt_emit.outbox_max.
 */
static void
check_outbox_room(int n)
{
	uint64		rows = me_outbox_rows();

	if (mqtt_emit_outbox_max > 0 && rows + n > (uint64) mqtt_emit_outbox_max)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("pg_mqtt_emit outbox is full"),
				 errdetail("The outbox holds about " UINT64_FORMAT " events; \"mqtt_emit.outbox_max\" is %d.",
						   rows, mqtt_emit_outbox_max),
				 errhint("Check that the broker is reachable (see mqtt_emit.stats), or raise \"mqtt_emit.outbox_max\".")));
}

/*
 * The local listeners of events written in chunks before the commit
 * (maybe_flush_chunk) must not run from those rows in the order of their
 * ids, which were taken before the commit: the rows are written held, as
 * a spilled transaction's are (write_outbox), and get their local rows at
 * the marker (memory mode, relay.c) or at PRE_COMMIT (durable mode).
 * Turn ME_FLAG_LOCAL into ME_FLAG_HELD on entries[].
 */
static void
hold_local(char **entries, int n)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		MqttEmitEventHeader *h = (MqttEmitEventHeader *) entries[i];

		if (h->flags & ME_FLAG_LOCAL)
		{
			h->flags = (h->flags & ~ME_FLAG_LOCAL) | ME_FLAG_HELD;
			held_rows = true;
		}
	}
}

/*
 * Big transactions: once the pending events need more room than the queue
 * can ever give one transaction (its size less the eighth kept for
 * markers), they will go to the outbox at commit anyway, in durable mode
 * and with mqtt_emit.overflow = spill.  Write them there now, and every
 * time that much has gathered again, instead of keeping them all in
 * memory (a transaction of 1M events kept more than 2 GB): the backend's
 * memory stays bounded by about the queue's size, and the commit writes
 * only the rest.  The rows are written in the current subtransaction and
 * roll back with it.  Hence only when every pending event belongs to the
 * current subtransaction level: an event of an outer level written here
 * would be lost with a ROLLBACK TO SAVEPOINT that must keep it.  (Events
 * that a released savepoint handed to its parent wait until the parent
 * level captures again; the list is ordered by level, so checking the
 * first entry suffices.)  Nor once an event of a table watched with
 * batch => true is pending: those go into the batched message's parts at
 * PRE_COMMIT (build_batches), and a row written here would be published
 * as a single event; such a transaction keeps its events in memory.  The
 * rows get the transaction's batch and are marked; the marker queued at
 * COMMIT places them with the rest, in id order, which is the capture
 * order.
 */
static void
maybe_flush_chunk(void)
{
	Size		cap = (Size) mqtt_emit_queue_size * 1024;
	int			level = GetCurrentTransactionNestLevel();
	int64	   *ids;
	int			i;

	if (pending_bytes < cap - cap / 8 || npending == 0 ||
		pending_level[0] != level || batched ||
		(mqtt_emit_delivery != ME_DELIVERY_DURABLE &&
		 mqtt_emit_overflow != ME_OVERFLOW_SPILL) ||
		!me_shmem_ready())
		return;
	check_outbox_room(nflushed + npending);
	if (!batch_taken)
	{
		marker.batch = (int64) me_next_event_seq();
		batch_taken = true;
	}
	hold_local(pending, npending);
	ids = palloc(sizeof(int64) * npending);
	me_outbox_insert(pending, npending, 0xFF, marker.batch, true, 0, ids);

	/* written: from here on the rows, not the entries, hold these events */
	if (nchunks >= maxchunks)
	{
		int			newmax = maxchunks == 0 ? 16 : maxchunks * 2;

		if (chunks == NULL)
			chunks = MemoryContextAlloc(TopTransactionContext,
										sizeof(FlushedChunk) * newmax);
		else
			chunks = repalloc(chunks, sizeof(FlushedChunk) * newmax);
		maxchunks = newmax;
	}
	chunks[nchunks].level = level;
	chunks[nchunks].n = npending;
	chunks[nchunks].first_id = ids[0];
	chunks[nchunks].last_id = ids[npending - 1];
	nchunks++;
	nflushed += npending;
	pfree(ids);
	for (i = 0; i < npending; i++)
		pfree(pending[i]);
	npending = 0;
	pending_bytes = 0;
}

/*
 * Append one part of a batched message: events first .. first + count - 1
 * of evs (payloads of the model's events), part number part of parts.
 */
static void
add_batch_part(StringInfo buf, StringInfo topic, const char *xact_id,
			   const char *ts, char **evs, int first, int count, int total,
			   int part, int parts)
{
	const MqttEmitEventHeader *h0 = (MqttEmitEventHeader *) evs[first];
	const char *model = evs[first] + sizeof(MqttEmitEventHeader);
	MqttEmitEventHeader hdr;
	char	   *entry;
	int			i;

	resetStringInfo(buf);
	appendStringInfoString(buf, "{\"model\":");
	escape_json(buf, pnstrdup(model, h0->model_len));
	appendStringInfo(buf, ",\"transactionId\":\"%s\",\"part\":%d,\"parts\":%d,\"count\":%d,\"total\":%d,\"timestamp\":\"%s\",\"origin\":",
					 xact_id, part, parts, count, total, ts);
	escape_json(buf, me_client_id());
	appendStringInfoString(buf, ",\"events\":[");
	for (i = first; i < first + count; i++)
	{
		const MqttEmitEventHeader *h = (MqttEmitEventHeader *) evs[i];

		if (i > first)
			appendStringInfoCharMacro(buf, ',');
		appendBinaryStringInfo(buf, evs[i] + sizeof(MqttEmitEventHeader) + h->model_len,
							   h->payload_len);
	}
	appendStringInfoString(buf, "]}");

	memset(&hdr, 0, sizeof(hdr));
	hdr.total_len = sizeof(hdr) + topic->len + buf->len;
	hdr.kind = ME_KIND_PUBLISH;
	hdr.flags = ME_FLAG_PUBLISH;
	hdr.op = ME_OP_OTHER;
	hdr.qos = 255;
	hdr.relid = InvalidOid;
	hdr.model_len = topic->len;
	hdr.payload_len = buf->len;
	entry = MemoryContextAlloc(TopTransactionContext, hdr.total_len);
	memcpy(entry, &hdr, sizeof(hdr));
	memcpy(entry + sizeof(hdr), topic->data, topic->len);
	memcpy(entry + sizeof(hdr) + topic->len, buf->data, buf->len);
	keep_entry(entry, 1);
}

/*
 * Turn the publishing of the pending events of batched tables into their
 * batched messages (file header).  At PRE_COMMIT, before any reservation:
 * an error here still aborts the transaction cleanly.
 */
static void
build_batches(void)
{
	char	  **old = pending;
	int			nold = npending;
	char	  **models;			/* the first event of each model */
	int			nmodels = 0;
	bool	   *done;
	int			i,
				m;
	Size		limit;
	Size		overhead;
	char		xact_id[MQTT_EMIT_EVENT_ID_LEN + 1];
	char		ts[32];
	TimestampTz now = GetCurrentTimestamp();
	StringInfoData buf;
	StringInfoData topic;

	/* a batched message must not reach the events' subscribers */
	me_check_batch_prefix();

	/* the new list: every event but the batched ones without local listeners */
	pending = NULL;
	pending_level = NULL;
	npending = maxpending = 0;
	pending_bytes = 0;
	models = palloc(sizeof(char *) * nold);
	for (i = 0; i < nold; i++)
	{
		MqttEmitEventHeader *h = (MqttEmitEventHeader *) old[i];

		if (!(h->flags & ME_FLAG_BATCH))
		{
			keep_entry(old[i], 1);
			continue;
		}
		for (m = 0; m < nmodels; m++)
		{
			MqttEmitEventHeader *mh = (MqttEmitEventHeader *) models[m];

			if (mh->model_len == h->model_len &&
				memcmp(models[m] + sizeof(MqttEmitEventHeader),
					   old[i] + sizeof(MqttEmitEventHeader), h->model_len) == 0)
				break;
		}
		if (m == nmodels)
			models[nmodels++] = old[i];
		/* kept for its local listeners; published only in the batch */
		if (h->flags & ME_FLAG_LOCAL)
			keep_entry(old[i], 1);
	}

	/*
	 * One message per model, in the order the models first appear, split
	 * where a part would exceed the limit (but never below one event).  The
	 * envelope takes at most overhead bytes besides the events.
	 */
	me_make_event_id(xact_id, now);
	me_format_timestamp(ts, now);
	limit = Min(mqtt_emit_batch_max_bytes, mqtt_emit_max_payload);
	initStringInfo(&buf);
	initStringInfo(&topic);
	done = palloc0(sizeof(bool) * nold);
	for (m = 0; m < nmodels; m++)
	{
		MqttEmitEventHeader *mh = (MqttEmitEventHeader *) models[m];
		const char *model = models[m] + sizeof(MqttEmitEventHeader);
		char	  **mine = palloc(sizeof(char *) * nold);
		int			nmine = 0;
		int			parts = 0;
		int			part;
		int			first;
		int			j;

		for (i = 0; i < nold; i++)
		{
			MqttEmitEventHeader *h = (MqttEmitEventHeader *) old[i];

			if ((h->flags & ME_FLAG_BATCH) && !done[i] &&
				h->model_len == mh->model_len &&
				memcmp(old[i] + sizeof(MqttEmitEventHeader), model, mh->model_len) == 0)
			{
				mine[nmine++] = old[i];
				done[i] = true;
			}
		}
		/*
		 * The envelope's keys, numbers, id and timestamp take under 256
		 * bytes, a signature (mqtt_emit.signing_key) 80; every escaped byte
		 * of the model and the origin at most 6.
		 */
		overhead = 384 + 6 * (Size) mh->model_len + 6 * strlen(me_client_id());
		me_build_batch_topic(&topic, model, mh->model_len);

		/* count the parts first: each part names how many there are */
		for (j = 0; j < nmine;)
		{
			Size		size = overhead;
			int			k = j;

			do
			{
				size += ((MqttEmitEventHeader *) mine[k])->payload_len + 1;
				k++;
			} while (k < nmine &&
					 size + ((MqttEmitEventHeader *) mine[k])->payload_len + 1 <= limit);
			parts++;
			j = k;
		}
		for (j = 0, part = 1; j < nmine; part++)
		{
			Size		size = overhead;
			int			k = j;

			first = j;
			do
			{
				size += ((MqttEmitEventHeader *) mine[k])->payload_len + 1;
				k++;
			} while (k < nmine &&
					 size + ((MqttEmitEventHeader *) mine[k])->payload_len + 1 <= limit);
			add_batch_part(&buf, &topic, xact_id, ts, mine, first, k - first,
						   nmine, part, parts);
			j = k;
		}
		pfree(mine);
	}
	pfree(buf.data);
	pfree(topic.data);
	pfree(done);

	/* the batched events are in the parts now; locally they stay events */
	for (i = 0; i < nold; i++)
	{
		MqttEmitEventHeader *h = (MqttEmitEventHeader *) old[i];

		if (!(h->flags & ME_FLAG_BATCH))
			continue;
		if (h->flags & ME_FLAG_LOCAL)
			h->flags &= ~(ME_FLAG_PUBLISH | ME_FLAG_BATCH);
		else
			pfree(old[i]);
	}
	pfree(old);
	pfree(models);
	batched = false;
}

/*
 * Write all pending events of this transaction into the outbox.
 */
static void
write_outbox(void)
{
	int64	   *ids;
	int			i;

	check_outbox_room(npending + nflushed);
	ids = palloc(sizeof(int64) * Max(npending, 1));
	for (i = 0; i < npending; i++)
		if (((MqttEmitEventHeader *) pending[i])->flags & ME_FLAG_LOCAL)
			local_rows = true;

	/*
	 * The queue space (for the events themselves, or for a marker) is
	 * reserved only after the rows are written: from the reservation on, the
	 * worker reads nothing queued after this transaction until it commits,
	 * and writing many rows takes a while.  Any time before the transaction
	 * becomes visible fixes its place all the same.
	 *
	 * Durable delivery with room in the queue: the events go into the queue
	 * as well, marked with their rows' ids, and the worker publishes them
	 * from there and deletes each row once the broker has it.  The rows are
	 * what survives a crash.
	 */
	if (!batch_taken)
		marker.batch = (int64) me_next_event_seq();
	if (mqtt_emit_delivery == ME_DELIVERY_DURABLE && nflushed == 0 &&
		me_queue_has_room(pending_bytes))
	{
		for (i = 0; i < npending; i++)
			((MqttEmitEventHeader *) pending[i])->flags |= ME_FLAG_QUEUED;
		me_outbox_insert(pending, npending, 0xFF, marker.batch, true, 0, ids);
		for (i = 0; i < npending; i++)
			((MqttEmitEventHeader *) pending[i])->row_id = ids[i];
		outboxed = npending;
		if (me_queue_reserve(pending_bytes, false, &reservation))
		{
			queued = true;
			return;
		}
		/* the room went meanwhile: the rows are placed by a marker instead */
		for (i = 0; i < npending; i++)
			((MqttEmitEventHeader *) pending[i])->flags &= ~ME_FLAG_QUEUED;
		me_outbox_reposition(ids, npending, ME_FLAG_QUEUED, marker.batch, true);
		local_rows = false;		/* as for any durable rows placed by a marker */
	}
	else
	{
		/*
		 * Their local listeners wait too, until the worker reaches the
		 * marker (or, without one, the queue position of now): events queued
		 * before this commit run first, so local listeners see the commit
		 * order (relay.c).  Durable events need not: every one of them runs
		 * its local listeners from its row, in the order of the rows' ids,
		 * which were taken at PRE_COMMIT, after whatever this transaction
		 * waited for.
		 *
		 * A durable transaction that wrote chunks before (maybe_flush_chunk)
		 * took those rows' ids earlier, maybe before it waited for another
		 * transaction; they were written held.  Their local listeners get
		 * rows of their own now, in the rows' order (as the worker gives
		 * held rows when it reaches their marker), with ids taken here,
		 * ahead of the rest, which is written as durable rows always are.
		 */
		if (mqtt_emit_delivery == ME_DELIVERY_DURABLE && nflushed > 0)
		{
			MqttEmitMarker mk;

			mk.batch = marker.batch;
			mk.min_id = chunks[0].first_id;
			mk.max_id = chunks[nchunks - 1].last_id;
			/* SPI in a commit callback: no snapshot is active */
			PushActiveSnapshot(GetTransactionSnapshot());
			(void) me_outbox_release_batch(&mk, false);
			PopActiveSnapshot();
			held_rows = false;
		}
		if (mqtt_emit_delivery != ME_DELIVERY_DURABLE)
			hold_local(pending, npending);
		local_rows = false;
		if (npending > 0)
			me_outbox_insert(pending, npending, 0xFF, marker.batch, true, 0, ids);
		outboxed = npending + nflushed;
	}
	marker.min_id = nchunks > 0 ? chunks[0].first_id : ids[0];
	marker.max_id = npending > 0 ? ids[npending - 1] : chunks[nchunks - 1].last_id;

	/*
	 * A marker in the queue will place these rows in the commit order.
	 * The last eighth of the queue is kept for markers; should even that be
	 * full, wait a little for the worker to take some (at most
	 * mqtt_emit.marker_wait), since rows without a marker can only be
	 * placed approximately.
	 */
	marker_reserved = me_queue_reserve(ME_MARKER_ENTRY_SIZE, true, &reservation);
	for (i = 0; !marker_reserved && i < mqtt_emit_marker_wait; i++)
	{
		me_wake_worker();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		marker_reserved = me_queue_reserve(ME_MARKER_ENTRY_SIZE, true, &reservation);
	}

	/*
	 * Without a marker the rows are placed once everything queued before
	 * now is: what commits into the queue after this point cannot have
	 * been seen by this transaction, so it may as well come after it.
	 */
	if (!marker_reserved && nflushed > 0)
		me_outbox_reposition_range(marker.min_id, marker.max_id, marker.batch,
								   me_outbox_stray_batch(me_queue_end()));
	else if (!marker_reserved)
		me_outbox_reposition(ids, npending, 0,
							 me_outbox_stray_batch(me_queue_end()), false);
}

static void
capture_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			if ((npending == 0 && nflushed == 0) || reservation.len > 0 || outboxed > 0)
				break;
			/* the slot (shmem.c): a view may have left this process unbound */
			(void) me_shmem_bind(true);
			if (batched)
				build_batches();
			if (npending == 0 && nflushed == 0)
				break;
			if (nflushed > 0)
			{
				/* a big transaction, part of it in the outbox already */
				write_outbox();
				spilled = (mqtt_emit_delivery != ME_DELIVERY_DURABLE);
			}
			else if (mqtt_emit_delivery == ME_DELIVERY_DURABLE)
				write_outbox();
			else if (me_queue_reserve(pending_bytes, false, &reservation))
				;
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
				me_queue_push_reserved(entries, 1, &reservation, 0);
			}
			if (npending > 0 && reservation.len > 0 && (outboxed == 0 || queued))
			{
				me_queue_push_reserved(pending, npending, &reservation, npending);
				if (outboxed > 0)
				{
					me_outbox_rows_add(outboxed);
					me_count(ME_STAT_ENQUEUED_DURABLE, npending);
				}
			}
			else if (outboxed > 0)
			{
				me_outbox_rows_add(outboxed);
				me_outbox_version_bump();
				if (held_rows && !marker_reserved)
					me_held_strays_version_bump();
				if (spilled)
					me_count(ME_STAT_SPILLED, outboxed);
				me_wake_worker();
			}
			/* never leave a place in the queue open: it would hold back all */
			me_queue_unreserve(&reservation);
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
			me_queue_unreserve(&reservation);
			reset_pending();
			listeners_changed = false;
			break;

		case XACT_EVENT_PRE_PREPARE:
			if (npending > 0 || nflushed > 0)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot prepare a transaction that has pending pg_mqtt_emit events"),
						 errdetail("The transaction has %d events waiting for commit.", npending + nflushed),
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

	if (npending == 0 && nchunks == 0)
		return;
	level = GetCurrentTransactionNestLevel();

	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		/* the rows written at this level or deeper are gone with it */
		while (nchunks > 0 && chunks[nchunks - 1].level >= level)
		{
			nflushed -= chunks[nchunks - 1].n;
			nchunks--;
		}
		/* events made at this level or deeper are a suffix of the list */
		while (npending > 0 && pending_level[npending - 1] >= level)
		{
			MqttEmitEventHeader *hdr = (MqttEmitEventHeader *) pending[npending - 1];

			pending_bytes -= hdr->total_len;
			pfree(pending[npending - 1]);
			npending--;
		}
		/* batched events may have gone with it: chunks may be written again */
		if (batched)
		{
			int			i;

			batched = false;
			for (i = 0; i < npending && !batched; i++)
				if (((MqttEmitEventHeader *) pending[i])->flags & ME_FLAG_BATCH)
					batched = true;
		}
	}
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		int			i;

		for (i = npending - 1; i >= 0 && pending_level[i] >= level; i--)
			pending_level[i] = level - 1;
		for (i = nchunks - 1; i >= 0 && chunks[i].level >= level; i--)
			chunks[i].level = level - 1;
	}
}
