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
 * transaction can still abort cleanly.  The reservation fixes the events'
 * place: it is taken at the tail, before the transaction becomes visible,
 * so a transaction that saw this one's changes reserves after it and is
 * published after it, however the two commits are scheduled from there.  At
 * COMMIT, when nothing may fail any more, the backend writes its events into
 * the reserved space (me_queue_push_reserved) and wakes the worker.  A
 * transaction that aborts after reserving fills the space with one
 * ME_KIND_SKIP entry (me_queue_unreserve).
 *
 * Open reservations are kept in an array of their own (MeReservations, one
 * slot per process: a transaction has at most one).  The bytes the worker
 * may read end at the oldest reservation not yet written (me_queue_tail); past it,
 * entries of later commits wait.  The time between PRE_COMMIT and COMMIT is
 * that of writing the commit record (and, with synchronous replication,
 * waiting for the standby): a commit that waits there holds back the events
 * queued after it.
 *
 * The only consumer is the background worker.  It reads entries between
 * head and the readable tail without the lock (producers never write there),
 * keeps its own read position, and moves head forward only when the events
 * before the new head are finished, that is acknowledged by the broker and
 * handed to the local listeners.  Space is therefore freed only after
 * delivery, and a worker that exits with an error starts again at head.
 *
 * Databases.  The extension may be created in several databases of a
 * server, each with its own publisher and listener worker (launcher.c).
 * Each database gets a share of its own: a slot, which holds what one
 * database had before (MqttEmitShared with its ring, the reservations, the
 * subscription table).  There are mqtt_emit.max_databases slots, created
 * with the server.  A process binds to the slot of MyDatabaseId
 * (me_shmem_bind) before it uses any of the functions below, which then
 * work on that slot only: a database's stats, queue and workers never see
 * another's.  A slot is claimed by the first process of its database that
 * needs it (CREATE EXTENSION, the launcher's probe, a backend that captures
 * an event) and given back (me_slot_free) when the database is dropped or
 * no longer has the extension, with no worker attached; its generation
 * changes then, so that a process still bound to it binds again.
 *
 * Every field of MqttEmitShared is private to this file; the other files
 * use the functions below.  The lock rule of each field is written beside
 * it in the struct:
 *	- The slot table (MeSlotCtl) is protected by the named LWLock
 *	  "pg_mqtt_emit slots": dboid is written under it in exclusive mode and
 *	  read under it in shared mode; generation and retired are atomics,
 *	  written under the lock, read without it.
 *	- lock (LWLock) in exclusive mode protects head, tail and the
 *	  reservations (MeReservations).  A producer holds it to reserve and to
 *	  mark its reservation written, not while it copies its events: the
 *	  reserved bytes are its own until then.  The worker holds it only to
 *	  read the readable tail and to move head.
 *	- worker_pid, worker_latch and fresh are written by the worker under the
 *	  lock in exclusive mode and read under it in shared mode;
 *	  listener_pid and listener_latch likewise by the listener worker.
 *	- attempt_lock (spinlock) protects attempt_id, attempt_kind and
 *	  attempt_count, written by the listener worker only.
 *	- capacity, epoch_seq and epoch_time are set when the memory is created and never
 *	  change: read without a lock.
 *	- errlock (spinlock) protects last_error and last_error_time.
 *	- urllock (spinlock) protects broker_url, the broker each of the
 *	  worker's two clients is connected to, written by the worker only.
 *	- counters (and their reset base and time), event_seq,
 *	  listeners_version, outbox_version, held_strays_version, local_done
 *	  (written by the worker only), outbox_rows,
 *	  outbox_oldest, worker_napping and the connection flags are atomics
 *	  and need no lock.
 *	  outbox_rows is approximate (see relay.c).
 *	- The subscription states (MeSubTable, a shared struct of its own) are
 *	  protected by the named LWLock "pg_mqtt_emit subscriptions": the worker
 *	  replaces the whole table under it in exclusive mode when a state
 *	  changes (rarely: a SUBSCRIBE, a SUBACK, a reconnection); the
 *	  mqtt_emit.subscriptions view copies it out in shared mode.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/shmem.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/twophase.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"

/*
 * The shared state.  Lock rules: see the file header.
 */
typedef struct MqttEmitShared
{
	LWLock	   *lock;
	pid_t		worker_pid;		/* lock: 0 when no worker runs */
	Latch	   *worker_latch;	/* lock */
	bool		fresh;			/* lock: no worker recovered the outbox since set up */
	pid_t		listener_pid;	/* lock: the listener worker, 0 when none */
	Latch	   *listener_latch; /* lock */

	/* the listener worker's current attempt (survives its restarts) */
	slock_t		attempt_lock;
	int64		attempt_id;		/* attempt_lock: the row being handled */
	int			attempt_kind;	/* attempt_lock: what attempt_id names (1: an outbox row) */
	int			attempt_count;	/* attempt_lock: attempts started */

	/* the ring; positions are logical and only grow */
	Size		capacity;		/* constant */
	uint64		head;			/* lock: oldest byte not yet done */
	uint64		tail;			/* lock: end of the reserved space */

	pg_atomic_uint64 counters[ME_STAT_COUNT];
	pg_atomic_uint64 counter_base[ME_STAT_COUNT];	/* values at the last reset */
	pg_atomic_uint64 stats_reset;	/* TimestampTz of the last reset */
	pg_atomic_uint64 event_seq; /* event id counter */
	uint64		epoch_seq;		/* constant: event_seq when this memory was set up */
	TimestampTz epoch_time;		/* constant: when this memory was set up */
	pg_atomic_uint32 listeners_version; /* bumped when the registry changes */
	pg_atomic_uint32 publisher_connected;
	pg_atomic_uint32 subscriber_connected;
	pg_atomic_uint32 subscriptions; /* topic filters wanted */
	pg_atomic_uint32 outbox_version;	/* bumped when backends add rows */
	pg_atomic_uint32 held_strays_version;	/* bumped when backends add held
											 * rows without a marker */
	pg_atomic_uint64 local_done;	/* queue position up to which the worker
									 * committed the hand-over to the listener
									 * worker */
	pg_atomic_uint64 outbox_rows;	/* rows in the outbox (approximate) */
	pg_atomic_uint64 outbox_oldest; /* created_at of the oldest row, or 0 */
	pg_atomic_uint32 worker_napping;	/* the worker will look again soon */

	slock_t		errlock;
	TimestampTz last_error_time;	/* errlock */
	char		last_error[MQTT_EMIT_MAX_ERROR_LEN];	/* errlock */

	slock_t		urllock;
	char		broker_url[2][MQTT_EMIT_MAX_URL_LEN];	/* urllock: publisher,
														 * subscriber; "" when
														 * not connected */

	char		data[FLEXIBLE_ARRAY_MEMBER];
} MqttEmitShared;

static MqttEmitShared *me_shared = NULL;	/* the bound slot's */

/*
 * The slot table: which database owns which share.  Lock rules: see the
 * file header.
 */
typedef struct MeSlotCtl
{
	LWLock	   *lock;
	int			nslots;			/* constant: mqtt_emit.max_databases */
	char	   *base;			/* constant: the first slot (this process's
								 * address; the postmaster sets it, backends
								 * inherit it) */
	Size		stride;			/* constant: bytes per slot */
	struct
	{
		Oid			dboid;		/* lock: InvalidOid when free */
		pg_atomic_uint32 generation;	/* bumped when claimed and freed */
		pg_atomic_uint32 retired;	/* a worker found no extension there */
	}			slot[FLEXIBLE_ARRAY_MEMBER];
} MeSlotCtl;

static MeSlotCtl *me_ctl = NULL;
static int	bound_slot = -1;
static uint32 bound_generation = 0;
static Oid	bound_db = InvalidOid;

/*
 * The reservations of committing processes not yet written: one slot per
 * process (a transaction has at most one reservation), indexed by its
 * PGPROC number.  All fields are protected by me_shared->lock; nslots is
 * constant.
 */
typedef struct MeReservations
{
	int			nslots;
	int			nopen;			/* slots with open set */
	uint64		oldest;			/* the smallest pos of them, when nopen > 0 */
	struct
	{
		bool		open;		/* reserved, not yet written */
		uint64		pos;		/* where its space starts */
	}			slot[FLEXIBLE_ARRAY_MEMBER];
} MeReservations;

static MeReservations *me_res = NULL;

static int
reservation_slots(void)
{
	return me_total_procs();
}

static Size
reservations_size(void)
{
	return add_size(offsetof(MeReservations, slot),
					mul_size(sizeof(((MeReservations *) NULL)->slot[0]),
							 reservation_slots()));
}

static void ring_write(uint64 pos, const char *src, Size len);


/* The subscriber's subscriptions, as the worker last saw them. */
typedef struct MeSubTable
{
	LWLock	   *lock;
	int			n;				/* lock: entries in use */
	MeSubStatus subs[ME_SUBS_MAX];	/* lock */
} MeSubTable;

static MeSubTable *me_subs = NULL;

/* Size of MqttEmitShared with its ring. */
static Size
queue_struct_size(void)
{
	Size		size = offsetof(MqttEmitShared, data);

	size = add_size(size, mul_size((Size) mqtt_emit_queue_size, 1024));
	return MAXALIGN(size);
}

/* Size of one database's slot: the queue, the subscriptions, the reservations. */
static Size
slot_size(void)
{
	return add_size(add_size(queue_struct_size(), MAXALIGN(sizeof(MeSubTable))),
					MAXALIGN(reservations_size()));
}

static Size
ctl_size(void)
{
	return MAXALIGN(add_size(offsetof(MeSlotCtl, slot),
							 mul_size(sizeof(((MeSlotCtl *) NULL)->slot[0]),
									  mqtt_emit_max_databases)));
}

/*
 * Size of the shared state, used both to request and to create it:
 * mqtt_emit.max_databases slots and their table.
 */
Size
me_shmem_size(void)
{
	return add_size(ctl_size(), mul_size(slot_size(), mqtt_emit_max_databases));
}

void
me_shmem_request(void)
{
	RequestAddinShmemSpace(me_shmem_size());
	RequestNamedLWLockTranche("pg_mqtt_emit", mqtt_emit_max_databases);
	RequestNamedLWLockTranche("pg_mqtt_emit subscriptions", mqtt_emit_max_databases);
	RequestNamedLWLockTranche("pg_mqtt_emit slots", 1);
}

/*
 * Point this process's pointers at slot i (without binding it to a
 * database).
 */
static void
point_at_slot(int i)
{
	char	   *base = me_ctl->base + me_ctl->stride * i;

	me_shared = (MqttEmitShared *) base;
	me_subs = (MeSubTable *) (base + queue_struct_size());
	me_res = (MeReservations *) (base + queue_struct_size() + MAXALIGN(sizeof(MeSubTable)));
}

/*
 * Set up slot i as new: an empty queue, zero counters, nothing connected.
 * At server start, and when a database claims a slot another had before
 * (no process is attached to it then).
 */
static void
init_slot(int i)
{
	int			j;

	point_at_slot(i);
	me_subs->lock = &(GetNamedLWLockTranche("pg_mqtt_emit subscriptions"))[i].lock;
	me_subs->n = 0;
	me_res->nslots = reservation_slots();
	me_res->nopen = 0;
	memset(me_res->slot, 0, sizeof(me_res->slot[0]) * me_res->nslots);

	me_shared->lock = &(GetNamedLWLockTranche("pg_mqtt_emit"))[i].lock;
	me_shared->worker_pid = 0;
	me_shared->worker_latch = NULL;
	me_shared->listener_pid = 0;
	me_shared->listener_latch = NULL;
	SpinLockInit(&me_shared->attempt_lock);
	me_shared->attempt_id = 0;
	me_shared->attempt_kind = 0;
	me_shared->attempt_count = 0;
	me_shared->capacity = (Size) mqtt_emit_queue_size * 1024;
	me_shared->head = 0;
	me_shared->tail = 0;
	for (j = 0; j < ME_STAT_COUNT; j++)
	{
		pg_atomic_init_u64(&me_shared->counters[j], 0);
		pg_atomic_init_u64(&me_shared->counter_base[j], 0);
	}
	pg_atomic_init_u64(&me_shared->stats_reset, (uint64) GetCurrentTimestamp());

	/*
	 * Event ids carry a sequence number.  Starting it at the current time
	 * in microseconds keeps ids of a restarted server from repeating those
	 * of its previous life.
	 */
	pg_atomic_init_u64(&me_shared->event_seq, (uint64) GetCurrentTimestamp());
	me_shared->epoch_seq = pg_atomic_read_u64(&me_shared->event_seq);
	me_shared->epoch_time = GetCurrentTimestamp();
	pg_atomic_init_u32(&me_shared->listeners_version, 1);
	pg_atomic_init_u32(&me_shared->publisher_connected, 0);
	pg_atomic_init_u32(&me_shared->subscriber_connected, 0);
	pg_atomic_init_u32(&me_shared->subscriptions, 0);
	pg_atomic_init_u32(&me_shared->outbox_version, 0);
	pg_atomic_init_u32(&me_shared->held_strays_version, 0);
	pg_atomic_init_u64(&me_shared->local_done, 0);
	pg_atomic_init_u64(&me_shared->outbox_rows, 0);
	pg_atomic_init_u64(&me_shared->outbox_oldest, 0);
	pg_atomic_init_u32(&me_shared->worker_napping, 0);
	me_shared->fresh = true;
	SpinLockInit(&me_shared->errlock);
	me_shared->last_error_time = 0;
	me_shared->last_error[0] = '\0';
	SpinLockInit(&me_shared->urllock);
	me_shared->broker_url[0][0] = '\0';
	me_shared->broker_url[1][0] = '\0';
	me_shared = NULL;
	me_subs = NULL;
	me_res = NULL;
}

void
me_shmem_startup(void)
{
	bool		found;
	char	   *slots;

	me_shared = NULL;
	me_subs = NULL;
	me_res = NULL;
	bound_slot = -1;
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	me_ctl = (MeSlotCtl *) ShmemInitStruct("pg_mqtt_emit slots", ctl_size(), &found);
	slots = ShmemInitStruct("pg_mqtt_emit", mul_size(slot_size(), mqtt_emit_max_databases),
							&found);
	if (!found)
	{
		int			i;

		me_ctl->lock = &(GetNamedLWLockTranche("pg_mqtt_emit slots"))->lock;
		me_ctl->nslots = mqtt_emit_max_databases;
		me_ctl->base = slots;
		me_ctl->stride = slot_size();
		for (i = 0; i < me_ctl->nslots; i++)
		{
			me_ctl->slot[i].dboid = InvalidOid;
			pg_atomic_init_u32(&me_ctl->slot[i].generation, 0);
			pg_atomic_init_u32(&me_ctl->slot[i].retired, 0);
			init_slot(i);
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Bind this process to the slot of its database (MyDatabaseId), claiming
 * a free one when the database has none and create is true.  Returns false
 * when there is none and create is false; raises an error when none is
 * free.  Cheap when already bound: one atomic read.  Must be called where
 * an error is allowed (not in a commit callback).
 */
bool
me_shmem_bind(bool create)
{
	int			i;
	int			free_slot = -1;
	int			in_use = 0;

	if (me_ctl == NULL || !OidIsValid(MyDatabaseId))
		return false;
	if (bound_slot >= 0 && bound_db == MyDatabaseId &&
		pg_atomic_read_u32(&me_ctl->slot[bound_slot].generation) == bound_generation)
		return true;

	me_shared = NULL;
	me_subs = NULL;
	me_res = NULL;
	bound_slot = -1;
	LWLockAcquire(me_ctl->lock, create ? LW_EXCLUSIVE : LW_SHARED);
	for (i = 0; i < me_ctl->nslots; i++)
	{
		if (me_ctl->slot[i].dboid == MyDatabaseId)
			break;
		if (!OidIsValid(me_ctl->slot[i].dboid))
		{
			if (free_slot < 0)
				free_slot = i;
		}
		else
			in_use++;
	}
	if (i == me_ctl->nslots)
	{
		if (!create || free_slot < 0)
		{
			LWLockRelease(me_ctl->lock);
			if (!create)
				return false;
			ereport(ERROR,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("no free pg_mqtt_emit database slot"),
					 errdetail("All %d slots of \"mqtt_emit.max_databases\" are taken by other databases with the extension.",
							   in_use),
					 errhint("Raise \"mqtt_emit.max_databases\" and restart the server, or drop the extension in a database that does not need it.")));
		}
		i = free_slot;
		init_slot(i);
		me_ctl->slot[i].dboid = MyDatabaseId;
		pg_atomic_write_u32(&me_ctl->slot[i].retired, 0);
		pg_atomic_fetch_add_u32(&me_ctl->slot[i].generation, 1);
	}
	bound_slot = i;
	bound_db = MyDatabaseId;
	bound_generation = pg_atomic_read_u32(&me_ctl->slot[i].generation);
	point_at_slot(i);
	LWLockRelease(me_ctl->lock);
	return true;
}

/* Is this process bound to its database's slot? */
bool
me_shmem_bound(void)
{
	return me_shared != NULL;
}

/* The number of slots (mqtt_emit.max_databases). */
int
me_slot_count(void)
{
	return me_ctl ? me_ctl->nslots : 0;
}

/*
 * What the launcher needs to know of slot i: its database (InvalidOid when
 * free), the PIDs of the workers attached to it (0 when none), and whether
 * a worker found the extension gone.
 */
void
me_slot_info(int i, Oid *dboid, pid_t *worker_pid, pid_t *listener_pid, bool *retired)
{
	MqttEmitShared *sh = (MqttEmitShared *) (me_ctl->base + me_ctl->stride * i);

	LWLockAcquire(me_ctl->lock, LW_SHARED);
	*dboid = me_ctl->slot[i].dboid;
	LWLockRelease(me_ctl->lock);
	LWLockAcquire(sh->lock, LW_SHARED);
	*worker_pid = sh->worker_pid;
	*listener_pid = sh->listener_pid;
	LWLockRelease(sh->lock);
	*retired = pg_atomic_read_u32(&me_ctl->slot[i].retired) != 0;
}

/*
 * The slot of database dboid, or -1.
 */
int
me_slot_of(Oid dboid)
{
	int			i;
	int			found = -1;

	if (me_ctl == NULL)
		return -1;
	LWLockAcquire(me_ctl->lock, LW_SHARED);
	for (i = 0; i < me_ctl->nslots && found < 0; i++)
		if (me_ctl->slot[i].dboid == dboid)
			found = i;
	LWLockRelease(me_ctl->lock);
	return found;
}

/*
 * A worker of the bound slot found the extension gone (DROP EXTENSION):
 * the launcher does not start workers for it again until a probe has
 * looked (launcher.c).
 */
void
me_slot_set_retired(bool retired)
{
	if (bound_slot >= 0)
		pg_atomic_write_u32(&me_ctl->slot[bound_slot].retired, retired ? 1 : 0);
}

/*
 * Give slot i back, if it still belongs to dboid and no worker is attached
 * to it: the database was dropped, or no longer has the extension.  What
 * its queue held is for a database or an extension that is gone, and so
 * are its listeners' counts.
 */
bool
me_slot_free(int i, Oid dboid)
{
	MqttEmitShared *sh = (MqttEmitShared *) (me_ctl->base + me_ctl->stride * i);
	bool		ok;

	LWLockAcquire(me_ctl->lock, LW_EXCLUSIVE);
	LWLockAcquire(sh->lock, LW_SHARED);
	ok = me_ctl->slot[i].dboid == dboid && sh->worker_pid == 0 && sh->listener_pid == 0;
	LWLockRelease(sh->lock);
	if (ok)
	{
		me_ctl->slot[i].dboid = InvalidOid;
		pg_atomic_write_u32(&me_ctl->slot[i].retired, 0);
		pg_atomic_fetch_add_u32(&me_ctl->slot[i].generation, 1);
	}
	LWLockRelease(me_ctl->lock);
	if (ok)
		me_listener_stats_forget(dboid);
	return ok;
}

/* How many slots are taken by databases other than MyDatabaseId. */
int
me_slots_in_use_by_others(void)
{
	int			i;
	int			n = 0;

	LWLockAcquire(me_ctl->lock, LW_SHARED);
	for (i = 0; i < me_ctl->nslots; i++)
		if (OidIsValid(me_ctl->slot[i].dboid) && me_ctl->slot[i].dboid != MyDatabaseId)
			n++;
	LWLockRelease(me_ctl->lock);
	return n;
}

/*
 * Reserve len bytes of queue space for a committing transaction (for its
 * events, or for a marker of its outbox rows), at the tail: this is the
 * place of its events in the queue.  Returns false when the queue cannot
 * hold them now.
 */
bool
me_queue_reserve(Size len, bool marker, MeQueueSlot *slot)
{
	bool		ok;
	Size		limit;

	Assert(len >= sizeof(MqttEmitEventHeader));

	/* at PRE_COMMIT: the slot may have been given back and claimed again */
	(void) me_shmem_bind(true);
	limit = me_shared->capacity;

	/*
	 * Events leave the last eighth of the queue to markers, so that a
	 * transaction that spilled to the outbox because the queue was full
	 * can still mark its place in the commit order.
	 */
	if (!marker)
		limit -= me_shared->capacity / 8;

	slot->ticket = (uint64) me_my_proc_number();
	Assert(slot->ticket < (uint64) me_res->nslots);
	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	Assert(!me_res->slot[slot->ticket].open);
	ok = (me_shared->tail - me_shared->head) + len <= limit;
	if (ok)
	{
		me_res->slot[slot->ticket].open = true;
		me_res->slot[slot->ticket].pos = me_shared->tail;
		/* later reservations lie after the open ones */
		if (me_res->nopen++ == 0)
			me_res->oldest = me_shared->tail;
		slot->pos = me_shared->tail;
		slot->len = len;
		me_shared->tail += len;
	}
	LWLockRelease(me_shared->lock);
	return ok;
}

/* Would len bytes of events fit in the queue now?  (No promise.) */
bool
me_queue_has_room(Size len)
{
	bool		ok;

	LWLockAcquire(me_shared->lock, LW_SHARED);
	ok = (me_shared->tail - me_shared->head) + len <=
		me_shared->capacity - me_shared->capacity / 8;
	LWLockRelease(me_shared->lock);
	return ok;
}

/* the start of the oldest open reservation, or the tail; with the lock */
static uint64
readable_tail(void)
{
	return me_res->nopen > 0 ? me_res->oldest : me_shared->tail;
}

/*
 * Mark a reservation written; returns true when that made more of the
 * queue readable (it was the oldest), and the worker's latch in *latch.
 * Called with the lock held.  Only the oldest's end makes a scan for the
 * next oldest.
 */
static bool
reservation_written(MeQueueSlot *slot, Latch **latch)
{
	bool		was_oldest;

	Assert(me_res->slot[slot->ticket].open);
	me_res->slot[slot->ticket].open = false;
	me_res->nopen--;
	*latch = me_shared->worker_latch;
	was_oldest = (me_res->slot[slot->ticket].pos == me_res->oldest);
	if (was_oldest && me_res->nopen > 0)
	{
		uint64		oldest = PG_UINT64_MAX;
		int			i,
					seen = 0;

		for (i = 0; seen < me_res->nopen && i < me_res->nslots; i++)
		{
			if (me_res->slot[i].open)
			{
				oldest = Min(oldest, me_res->slot[i].pos);
				seen++;
			}
		}
		me_res->oldest = oldest;
	}
	return was_oldest;
}

/*
 * Wake the worker after readable entries were added, unless it naps.  The
 * barrier orders the caller's update (under the lock just released) before
 * the read of worker_napping; the worker clears the flag before it reads
 * the tail one last time and sleeps (see worker.c, wait_for_work).
 */
static void
wake_unless_napping(Latch *latch)
{
	pg_memory_barrier();
	if (latch && pg_atomic_read_u32(&me_shared->worker_napping) == 0)
		SetLatch(latch);
}

/*
 * The transaction aborted: its reserved space becomes one entry that the
 * worker skips.  Must not fail.
 */
void
me_queue_unreserve(MeQueueSlot *slot)
{
	MqttEmitEventHeader hdr;
	Latch	   *latch;
	bool		more;

	if (slot->len == 0)
		return;
	memset(&hdr, 0, sizeof(hdr));
	hdr.total_len = (uint32) slot->len;
	hdr.kind = ME_KIND_SKIP;
	ring_write(slot->pos, (const char *) &hdr, sizeof(hdr));

	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	more = reservation_written(slot, &latch);
	LWLockRelease(me_shared->lock);
	slot->len = 0;
	if (more)
		wake_unless_napping(latch);
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
 * the space reserved earlier (me_queue_reserve), which they fill exactly,
 * and wake the worker.  nevents of them are events (the others are
 * markers, not counted).  Called after commit: it must not fail, and it
 * does not allocate.
 */
void
me_queue_push_reserved(char **entries, int nentries, MeQueueSlot *slot, int nevents)
{
	int			i;
	uint64		pos = slot->pos;
	Latch	   *latch;
	bool		more;

	/* the space is ours until it is marked written: no lock to copy */
	for (i = 0; i < nentries; i++)
	{
		MqttEmitEventHeader *hdr = (MqttEmitEventHeader *) entries[i];

		ring_write(pos, entries[i], hdr->total_len);
		pos += hdr->total_len;
	}
	Assert(pos == slot->pos + slot->len);

	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	more = reservation_written(slot, &latch);
	LWLockRelease(me_shared->lock);
	slot->len = 0;

	if (nevents > 0)
		pg_atomic_fetch_add_u64(&me_shared->counters[ME_STAT_ENQUEUED], nevents);

	/*
	 * A napping worker looks at the tail again by itself; signalling it
	 * costs a system call per commit.  Neither is needed while an older
	 * reservation holds these entries back: its commit wakes the worker.
	 */
	if (more)
		wake_unless_napping(latch);
}

/*
 * The end of what the worker may read: the oldest reservation not yet
 * written, or the tail.
 */
uint64
me_queue_tail(void)
{
	uint64		tail;

	LWLockAcquire(me_shared->lock, LW_SHARED);
	tail = readable_tail();
	LWLockRelease(me_shared->lock);
	return tail;
}

/*
 * The end of the reserved space: every transaction that became visible
 * before now has its place before it.
 */
uint64
me_queue_end(void)
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

/* Is the shared memory there (the library was preloaded)? */
bool
me_shmem_ready(void)
{
	return me_ctl != NULL;
}

/*
 * The worker registers itself: false, with the other's PID, when another
 * worker runs already.  *head is where the queue's unfinished part starts.
 */
bool
me_worker_claim(Latch *latch, uint64 *head, pid_t *other)
{
	bool		ok;

	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	*other = me_shared->worker_pid;
	ok = (*other == 0);
	if (ok)
	{
		me_shared->worker_pid = MyProcPid;
		me_shared->worker_latch = latch;
		*head = me_shared->head;
	}
	LWLockRelease(me_shared->lock);
	return ok;
}

/*
 * The worker is leaving: no one to wake, nothing connected.
 */
void
me_worker_release(void)
{
	pg_atomic_write_u32(&me_shared->worker_napping, 0);
	pg_atomic_write_u32(&me_shared->publisher_connected, 0);
	pg_atomic_write_u32(&me_shared->subscriber_connected, 0);
	pg_atomic_write_u32(&me_shared->subscriptions, 0);
	me_set_broker_url(false, NULL);
	me_set_broker_url(true, NULL);
	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	if (me_shared->worker_pid == MyProcPid)
	{
		me_shared->worker_pid = 0;
		me_shared->worker_latch = NULL;
	}
	LWLockRelease(me_shared->lock);
}

/*
 * True until a worker has committed its recovery of the outbox since the
 * shared memory was set up (after a start or a crash): the queue is new.
 * A worker that fails before its recovery commits leaves it set, so that
 * the next one recovers instead.
 */
bool
me_worker_fresh(void)
{
	bool		fresh;

	LWLockAcquire(me_shared->lock, LW_SHARED);
	fresh = me_shared->fresh;
	LWLockRelease(me_shared->lock);
	return fresh;
}

/* the outbox's recovery after a fresh start has committed */
void
me_worker_fresh_done(void)
{
	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	me_shared->fresh = false;
	LWLockRelease(me_shared->lock);
}

/* event_seq when this memory was set up: outbox batches below it are older */
uint64
me_shmem_epoch_seq(void)
{
	return me_shared->epoch_seq;
}

/* when this memory was set up: outbox rows written before are older */
TimestampTz
me_shmem_epoch_time(void)
{
	return me_shared->epoch_time;
}

/*
 * While the worker naps, committing backends need not set its latch (see
 * me_queue_push_reserved).
 */
void
me_worker_set_napping(bool napping)
{
	pg_atomic_write_u32(&me_shared->worker_napping, napping ? 1 : 0);
	if (!napping)
		pg_memory_barrier();
}

void
me_set_connected(bool subscriber, bool connected)
{
	pg_atomic_write_u32(subscriber ? &me_shared->subscriber_connected :
						&me_shared->publisher_connected, connected ? 1 : 0);
}

/*
 * The broker a client of the worker is connected to now (one URL of
 * mqtt_emit.broker_url), or NULL when it is not connected.
 */
void
me_set_broker_url(bool subscriber, const char *url)
{
	SpinLockAcquire(&me_shared->urllock);
	strlcpy(me_shared->broker_url[subscriber ? 1 : 0], url ? url : "",
			MQTT_EMIT_MAX_URL_LEN);
	SpinLockRelease(&me_shared->urllock);
}

void
me_set_subscriptions(uint32 n)
{
	pg_atomic_write_u32(&me_shared->subscriptions, n);
}

/*
 * The worker: the subscriptions are now subs[0..n-1] (those beyond
 * ME_SUBS_MAX are not shown).
 */
void
me_subs_publish(const MeSubStatus *subs, int n)
{
	n = Min(n, ME_SUBS_MAX);
	LWLockAcquire(me_subs->lock, LW_EXCLUSIVE);
	if (n > 0)
		memcpy(me_subs->subs, subs, sizeof(MeSubStatus) * n);
	me_subs->n = n;
	LWLockRelease(me_subs->lock);
}

/*
 * Copy up to max subscription states into out; returns how many.
 */
int
me_subs_snapshot(MeSubStatus *out, int max)
{
	int			n;

	LWLockAcquire(me_subs->lock, LW_SHARED);
	n = Min(me_subs->n, max);
	if (n > 0)
		memcpy(out, me_subs->subs, sizeof(MeSubStatus) * n);
	LWLockRelease(me_subs->lock);
	return n;
}

uint32
me_listeners_version(void)
{
	return pg_atomic_read_u32(&me_shared->listeners_version);
}

void
me_listeners_version_bump(void)
{
	if (me_shared)
		pg_atomic_fetch_add_u32(&me_shared->listeners_version, 1);
}

uint32
me_outbox_version(void)
{
	return pg_atomic_read_u32(&me_shared->outbox_version);
}

void
me_outbox_version_bump(void)
{
	pg_atomic_fetch_add_u32(&me_shared->outbox_version, 1);
}

uint64
me_local_done(void)
{
	return pg_atomic_read_u64(&me_shared->local_done);
}

void
me_local_done_set(uint64 pos)
{
	pg_atomic_write_u64(&me_shared->local_done, pos);
}

uint32
me_held_strays_version(void)
{
	return pg_atomic_read_u32(&me_shared->held_strays_version);
}

void
me_held_strays_version_bump(void)
{
	pg_atomic_fetch_add_u32(&me_shared->held_strays_version, 1);
}

uint64
me_outbox_rows(void)
{
	return pg_atomic_read_u64(&me_shared->outbox_rows);
}

void
me_outbox_rows_add(uint64 n)
{
	pg_atomic_fetch_add_u64(&me_shared->outbox_rows, n);
}

/* approximate: never below zero */
void
me_outbox_rows_sub(uint64 n)
{
	uint64		cur = pg_atomic_read_u64(&me_shared->outbox_rows);

	pg_atomic_write_u64(&me_shared->outbox_rows, cur > n ? cur - n : 0);
}

void
me_outbox_rows_set(uint64 n)
{
	pg_atomic_write_u64(&me_shared->outbox_rows, n);
}

void
me_outbox_set_oldest(TimestampTz oldest)
{
	pg_atomic_write_u64(&me_shared->outbox_oldest, (uint64) oldest);
}

/* created_at of the oldest outbox row as last noted, or 0 */
TimestampTz
me_outbox_get_oldest(void)
{
	return (TimestampTz) pg_atomic_read_u64(&me_shared->outbox_oldest);
}

/*
 * Copy the state that mqtt_emit.stats shows.
 */
void
me_shared_snapshot(MqttEmitSnapshot *snap)
{
	LWLockAcquire(me_shared->lock, LW_SHARED);
	snap->head = me_shared->head;
	snap->tail = me_shared->tail;
	snap->worker_pid = me_shared->worker_pid;
	LWLockRelease(me_shared->lock);
	snap->capacity = me_shared->capacity;
	snap->publisher_connected = pg_atomic_read_u32(&me_shared->publisher_connected) != 0;
	snap->subscriber_connected = pg_atomic_read_u32(&me_shared->subscriber_connected) != 0;
	snap->subscriptions = pg_atomic_read_u32(&me_shared->subscriptions);
	snap->outbox_rows = pg_atomic_read_u64(&me_shared->outbox_rows);
	snap->outbox_oldest = (TimestampTz) pg_atomic_read_u64(&me_shared->outbox_oldest);
	SpinLockAcquire(&me_shared->errlock);
	strlcpy(snap->last_error, me_shared->last_error, sizeof(snap->last_error));
	snap->last_error_time = me_shared->last_error_time;
	SpinLockRelease(&me_shared->errlock);
	SpinLockAcquire(&me_shared->urllock);
	strlcpy(snap->broker_url, me_shared->broker_url[0], sizeof(snap->broker_url));
	strlcpy(snap->subscriber_broker_url, me_shared->broker_url[1],
			sizeof(snap->subscriber_broker_url));
	SpinLockRelease(&me_shared->urllock);
	snap->stats_reset = (TimestampTz) pg_atomic_read_u64(&me_shared->stats_reset);
}

/*
 * The listener worker registers itself, as me_worker_claim.
 */
bool
me_listener_claim(Latch *latch, pid_t *other)
{
	bool		ok;

	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	*other = me_shared->listener_pid;
	ok = (*other == 0);
	if (ok)
	{
		me_shared->listener_pid = MyProcPid;
		me_shared->listener_latch = latch;
	}
	LWLockRelease(me_shared->lock);
	return ok;
}

void
me_listener_release(void)
{
	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	if (me_shared->listener_pid == MyProcPid)
	{
		me_shared->listener_pid = 0;
		me_shared->listener_latch = NULL;
	}
	LWLockRelease(me_shared->lock);
}

/*
 * Wake the listener worker, if it runs: there are rows for it.
 */
void
me_wake_listener(void)
{
	Latch	   *latch;

	if (me_shared == NULL)
		return;
	LWLockAcquire(me_shared->lock, LW_SHARED);
	latch = me_shared->listener_latch;
	LWLockRelease(me_shared->lock);
	if (latch)
		SetLatch(latch);
}

/*
 * The listener worker starts an attempt at handling a row: returns how
 * many attempts at this row were started before (by this process or one
 * that died meanwhile).
 */
int
me_attempt_begin(int kind, int64 id)
{
	int			before;

	SpinLockAcquire(&me_shared->attempt_lock);
	if (me_shared->attempt_kind != kind || me_shared->attempt_id != id)
	{
		me_shared->attempt_kind = kind;
		me_shared->attempt_id = id;
		me_shared->attempt_count = 0;
	}
	before = me_shared->attempt_count++;
	SpinLockRelease(&me_shared->attempt_lock);
	return before;
}

/* The row is handled (or dead-lettered): forget its attempts. */
void
me_attempt_end(void)
{
	SpinLockAcquire(&me_shared->attempt_lock);
	me_shared->attempt_kind = 0;
	me_shared->attempt_id = 0;
	me_shared->attempt_count = 0;
	SpinLockRelease(&me_shared->attempt_lock);
}
