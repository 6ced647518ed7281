/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		Shared state of pg_mqtt_emit: the event queue and the counters.
 *
 * The queue is a byte ring in shared memory, sized by mqtt_emit.queue_size.
 * Positions (head, tail) are logical 64-bit byte offsets that only grow; the
 * physical offset is position % capacity, so an entry may wrap around the
 * end of the buffer and is always copied with me_queue_copy().
 *
 * Producers are committing backends.  At PRE_COMMIT a backend reserves the
 * bytes its events need (me_queue_reserve); that may fail, and the
 * transaction can still abort cleanly.  At COMMIT, when nothing may fail any
 * more, it writes its events into the reserved space (me_queue_push_reserved)
 * and wakes the worker.  A transaction that aborts after reserving gives the
 * space back (me_queue_unreserve).
 *
 * The only consumer is the background worker.  It reads entries between
 * head and tail without the lock (producers never write there), keeps its
 * own read position, and moves head forward only when the events before the
 * new head are finished, that is acknowledged by the broker and handed to
 * the local listeners.  Space is therefore freed only after delivery, and a
 * worker that exits with an error starts again at head.
 *
 * Locking:
 *	- lock (LWLock) in exclusive mode protects head, tail and reserved, and
 *	  the bytes between tail and tail + reserved being written at commit.
 *	  Producers hold it while they copy their events into the ring, which
 *	  keeps the queue in commit order; the worker holds it only to read tail
 *	  and to move head.
 *	- worker_pid, worker_latch and fresh are written by the worker under the
 *	  lock in exclusive mode and read under it in shared mode.
 *	- errlock (spinlock) protects last_error and last_error_time.
 *	- counters (and their reset base and time), event_seq,
 *	  listeners_version, worker_napping and the connection flags are
 *	  atomics and need no lock.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/shmem.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"

MqttEmitShared *me_shared = NULL;

/*
 * Size of the shared state, used both to request and to create it.
 */
Size
me_shmem_size(void)
{
	Size		size = offsetof(MqttEmitShared, data);

	size = add_size(size, mul_size((Size) mqtt_emit_queue_size, 1024));
	return MAXALIGN(size);
}

void
me_shmem_request(void)
{
	RequestAddinShmemSpace(me_shmem_size());
	RequestNamedLWLockTranche("pg_mqtt_emit", 1);
}

void
me_shmem_startup(void)
{
	bool		found;

	me_shared = NULL;
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	me_shared = ShmemInitStruct("pg_mqtt_emit", me_shmem_size(), &found);
	if (!found)
	{
		int			i;

		me_shared->lock = &(GetNamedLWLockTranche("pg_mqtt_emit"))->lock;
		me_shared->worker_pid = 0;
		me_shared->worker_latch = NULL;
		me_shared->capacity = (Size) mqtt_emit_queue_size * 1024;
		me_shared->head = 0;
		me_shared->tail = 0;
		me_shared->reserved = 0;
		for (i = 0; i < ME_STAT_COUNT; i++)
		{
			pg_atomic_init_u64(&me_shared->counters[i], 0);
			pg_atomic_init_u64(&me_shared->counter_base[i], 0);
		}
		pg_atomic_init_u64(&me_shared->stats_reset, (uint64) GetCurrentTimestamp());

		/*
		 * Event ids carry a sequence number.  Starting it at the current time
		 * in microseconds keeps ids of a restarted server from repeating
		 * those of its previous life.
		 */
		pg_atomic_init_u64(&me_shared->event_seq, (uint64) GetCurrentTimestamp());
		me_shared->epoch_seq = pg_atomic_read_u64(&me_shared->event_seq);
		pg_atomic_init_u32(&me_shared->listeners_version, 1);
		pg_atomic_init_u32(&me_shared->publisher_connected, 0);
		pg_atomic_init_u32(&me_shared->subscriber_connected, 0);
		pg_atomic_init_u32(&me_shared->subscriptions, 0);
		pg_atomic_init_u32(&me_shared->outbox_version, 0);
		pg_atomic_init_u64(&me_shared->outbox_rows, 0);
		pg_atomic_init_u64(&me_shared->outbox_oldest, 0);
		pg_atomic_init_u32(&me_shared->worker_napping, 0);
		me_shared->fresh = true;
		SpinLockInit(&me_shared->errlock);
		me_shared->last_error_time = 0;
		me_shared->last_error[0] = '\0';
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Reserve len bytes of queue space for a committing transaction (for its
 * events, or for a marker of its outbox rows).  Returns false when the
 * queue cannot hold them now.
 */
bool
me_queue_reserve(Size len, bool marker)
{
	bool		ok;
	Size		limit = me_shared->capacity;

	/*
	 * Events leave the last eighth of the queue (at most 64 kB) to markers,
	 * so that a transaction that spilled to the outbox because the queue
	 * was full can still mark its place in the commit order.
	 */
	if (!marker)
		limit -= Min(me_shared->capacity / 8, 64 * 1024);

	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	ok = (me_shared->tail - me_shared->head) + me_shared->reserved + len <= limit;
	if (ok)
		me_shared->reserved += len;
	LWLockRelease(me_shared->lock);
	return ok;
}

void
me_queue_unreserve(Size len)
{
	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	Assert(me_shared->reserved >= len);
	me_shared->reserved -= len;
	LWLockRelease(me_shared->lock);
}

/*
 * Copy len bytes from src into the ring at logical position pos.
 */
static void
ring_write(uint64 pos, const char *src, Size len)
{
	Size		cap = me_shared->capacity;
	Size		off = (Size) (pos % cap);
	Size		first = Min(len, cap - off);

	memcpy(me_shared->data + off, src, first);
	if (first < len)
		memcpy(me_shared->data, src + first, len - first);
}

/*
 * Copy len bytes at logical position pos out of the ring into dst.
 */
void
me_queue_copy(uint64 pos, char *dst, Size len)
{
	Size		cap = me_shared->capacity;
	Size		off = (Size) (pos % cap);
	Size		first = Min(len, cap - off);

	memcpy(dst, me_shared->data + off, first);
	if (first < len)
		memcpy(dst + first, me_shared->data, len - first);
}

/*
 * Write nentries entries (each starting with its MqttEmitEventHeader) into
 * space reserved earlier by me_queue_reserve(len), and wake the worker.
 * nevents of them are events (the others are markers, not counted).
 * Called after commit: it must not fail, and it does not allocate.
 */
void
me_queue_push_reserved(char **entries, int nentries, Size len, int nevents)
{
	int			i;
	Latch	   *latch;

	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < nentries; i++)
	{
		MqttEmitEventHeader *hdr = (MqttEmitEventHeader *) entries[i];

		ring_write(me_shared->tail, entries[i], hdr->total_len);
		me_shared->tail += hdr->total_len;
	}
	Assert(me_shared->reserved >= len);
	me_shared->reserved -= len;
	latch = me_shared->worker_latch;
	LWLockRelease(me_shared->lock);

	if (nevents > 0)
		pg_atomic_fetch_add_u64(&me_shared->counters[ME_STAT_ENQUEUED], nevents);

	/*
	 * A napping worker looks at the tail again by itself; signalling it
	 * costs a system call per commit.  The barrier orders our tail update
	 * before the read of worker_napping; the worker clears the flag before
	 * it reads the tail one last time and sleeps (see worker.c).
	 */
	pg_memory_barrier();
	if (latch && pg_atomic_read_u32(&me_shared->worker_napping) == 0)
		SetLatch(latch);
}

uint64
me_queue_tail(void)
{
	uint64		tail;

	LWLockAcquire(me_shared->lock, LW_SHARED);
	tail = me_shared->tail;
	LWLockRelease(me_shared->lock);
	return tail;
}

/*
 * The worker has finished every event before new_head; nevents of them are
 * leaving the queue now.
 */
void
me_queue_release(uint64 new_head, int nevents)
{
	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	Assert(new_head >= me_shared->head && new_head <= me_shared->tail);
	me_shared->head = new_head;
	LWLockRelease(me_shared->lock);
	pg_atomic_fetch_add_u64(&me_shared->counters[ME_STAT_DEQUEUED], nevents);
}

void
me_count(MqttEmitCounter c, uint64 n)
{
	if (me_shared)
		pg_atomic_fetch_add_u64(&me_shared->counters[c], n);
}

uint64
me_counter(MqttEmitCounter c)
{
	return pg_atomic_read_u64(&me_shared->counters[c]);
}

/*
 * What mqtt_emit.stats shows: the count since the last mqtt_emit.stats_reset().
 * A reset does not touch the counters themselves (the queue's own figures
 * are computed from them), it records their values as the new base.
 */
uint64
me_counter_since_reset(MqttEmitCounter c)
{
	uint64		base = pg_atomic_read_u64(&me_shared->counter_base[c]);
	uint64		value = pg_atomic_read_u64(&me_shared->counters[c]);

	return value >= base ? value - base : 0;
}

void
me_stats_reset(void)
{
	int			i;

	for (i = 0; i < ME_STAT_COUNT; i++)
		pg_atomic_write_u64(&me_shared->counter_base[i],
							pg_atomic_read_u64(&me_shared->counters[i]));
	pg_atomic_write_u64(&me_shared->stats_reset, (uint64) GetCurrentTimestamp());
}

uint64
me_next_event_seq(void)
{
	return pg_atomic_fetch_add_u64(&me_shared->event_seq, 1);
}

/*
 * Remember the most recent error for mqtt_emit.stats.
 */
void
me_set_last_error(const char *fmt,...)
{
	char		buf[MQTT_EMIT_MAX_ERROR_LEN];
	va_list		ap;
	TimestampTz now = GetCurrentTimestamp();

	if (me_shared == NULL)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);

	SpinLockAcquire(&me_shared->errlock);
	strlcpy(me_shared->last_error, buf, sizeof(me_shared->last_error));
	me_shared->last_error_time = now;
	SpinLockRelease(&me_shared->errlock);
}

/*
 * Wake the worker, if it runs.
 */
void
me_wake_worker(void)
{
	Latch	   *latch;

	if (me_shared == NULL)
		return;
	LWLockAcquire(me_shared->lock, LW_SHARED);
	latch = me_shared->worker_latch;
	LWLockRelease(me_shared->lock);
	if (latch)
		SetLatch(latch);
}
