/*-------------------------------------------------------------------------
 *
 * relay.c
 *		From the shared-memory queue to the broker and the local listeners,
 *		directly or through the outbox.
 *
 * The worker reads the queue with two cursors: the local cursor (here)
 * hands each event that a local listener wants to the listener worker, as
 * a row of the outbox with only ME_FLAG_LOCAL (listener_worker.c runs
 * them; this process runs no listener code), even while the broker is
 * away; the publish cursor (inflight.c) sends events to the broker while
 * connected.  The queue's head moves past an event only when both are done
 * with it and the broker has acknowledged it, so a broker outage keeps
 * events in the queue, and a failed connection sends everything
 * unacknowledged again from the oldest unacknowledged event
 * (at-least-once; receivers deduplicate by event id).
 *
 * The relay is in one of two modes.  In direct mode events flow from the
 * queue to the broker.  In outbox mode, entered whenever events cannot
 * simply flow (the publisher is not connected, backends wrote rows to the
 * outbox, the worker just started), queued events are moved behind the
 * outbox's rows (outbox.c) and the outbox is published in its order; the
 * relay goes back to direct mode when the outbox has nothing left to
 * publish.  Markers that committing backends put in the queue place their
 * outbox rows in the publishing order; in direct mode one switches to
 * outbox mode, so that nothing behind it overtakes its rows.  Rows written
 * without a marker (not even a marker fitted) are placed only once
 * everything queued before their commit is moved or published.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/relay.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "access/xact.h"
#include "common/file_perm.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "listeners.h"
#include "outbox.h"
#include "topic.h"
#include "worker.h"

#define BATCH_EVENTS		5000	/* events handled before looking around */
#define ROUND_TIME_MS		500		/* ... or milliseconds in one transaction */
#define RECOUNT_MAX			1000000 /* outbox rows counted when idle, at most */

static uint64 head_pos;			/* what the queue's head is */
static uint64 local_pos;		/* local listeners done before this */

static bool extension_ready = false;	/* the outbox and registry exist */
static bool outbox_mode = true;
static uint32 outbox_seen_version = 0;
static TimestampTz last_recount = 0;	/* of the outbox's rows, when idle */
static uint32 held_seen_version = 0;	/* me_held_strays_version looked at */
static bool held_probe = true;	/* look for held rows without a marker */
static int64 next_held = -1;	/* the lowest queue position of those */
static bool fresh_pending = false;	/* recovered a fresh start, not committed */

static StringInfoData topicbuf;
static char *entrybuf = NULL;
static Size entrybuf_size = 0;

/*
 * The one place where the mode changes.
 */
static void
set_outbox_mode(bool on)
{
	outbox_mode = on;
}

void
me_relay_init(uint64 head)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	head_pos = local_pos = head;

	/*
	 * A worker that exited (not a crash: the queue is the same) handed the
	 * events before local_done to the listener worker already, in committed
	 * transactions: they would run twice.
	 */
	if (me_local_done() > head)
		local_pos = me_local_done();
	initStringInfo(&topicbuf);
	MemoryContextSwitchTo(old);
}

/*
 * The extension appeared or went (the listener registry was reloaded).
 * When it appears, count the outbox and publish through it first.  Inside
 * a transaction.
 */
void
me_relay_extension_changed(bool ready)
{
	bool		was_ready = extension_ready;

	extension_ready = ready;
	/* held rows are looked for anew in whatever outbox there is now */
	next_held = -1;
	held_probe = true;
	if (ready && !was_ready)
	{
		ereport(LOG,
				(errmsg("pg_mqtt_emit worker found the extension; %s",
						me_worker_fresh() ? "recovering the outbox of before the start" :
						"publishing through the outbox first")));
		fresh_pending = me_worker_fresh();
		me_outbox_start(fresh_pending);
		set_outbox_mode(true);
	}
}

/*
 * The transaction of me_relay_extension_changed() committed: a fresh
 * start's recovery of the outbox is done for good.
 */
void
me_relay_committed(void)
{
	if (fresh_pending)
	{
		me_worker_fresh_done();
		fresh_pending = false;
	}
}

bool
me_relay_ready(void)
{
	return extension_ready;
}

/*
 * Copy the entry at pos (header and body) into entrybuf.
 */
static MqttEmitEventHeader *
read_entry(uint64 pos)
{
	MqttEmitEventHeader hdr;

	me_queue_copy(pos, (char *) &hdr, sizeof(hdr));
	if (hdr.total_len > entrybuf_size)
	{
		if (entrybuf)
			pfree(entrybuf);
		entrybuf_size = Max(hdr.total_len, 64 * 1024);
		entrybuf = MemoryContextAlloc(TopMemoryContext, entrybuf_size + 1);
	}
	me_queue_copy(pos, entrybuf, hdr.total_len);
	return (MqttEmitEventHeader *) entrybuf;
}

/*
 * Does a queued entry need its local listeners run, from a row of its own
 * in the outbox?  Durable events have their row already.
 */
static bool
wants_local_row(const MqttEmitEventHeader *hdr, const char *model)
{
	return (hdr->flags & ME_FLAG_LOCAL) && hdr->kind == ME_KIND_ROW &&
		hdr->row_id == 0 && me_listeners_want_local(model, hdr->model_len);
}

/*
 * Place the rows written without a marker at or before queue position
 * pos; returns the next such position, or -1.
 */
static int64
place_strays(uint64 pos)
{
	me_worker_commit_async();
	me_outbox_place_strays(false, pos);
	return me_outbox_next_stray();
}

/*
 * Hand the local rows collected so far to the listener worker (inside the
 * caller's transaction).
 */
static void
flush_local(char **local, int *nlocal, bool *handed)
{
	if (*nlocal > 0)
	{
		int64	   *ids = palloc(sizeof(int64) * *nlocal);

		me_outbox_insert(local, *nlocal, ME_FLAG_LOCAL, 0, true, 0, ids);
		me_outbox_rows_add(*nlocal);
		pfree(ids);
		*nlocal = 0;
		*handed = true;
	}
}

/*
 * Hand queued events to the local listeners (the listener worker runs
 * them from rows of the outbox that carry only ME_FLAG_LOCAL), and publish
 * them (or, in outbox mode, move them into the outbox) as far as the
 * broker and the in-flight window allow.  Returns true when there is more
 * to do right away.
 */
static bool
process_queue(uint64 tail, int *new_entries)
{
	uint64		pos;
	int			n = 0;
	bool		in_tx = false;
	bool		can_publish;
	bool		moving;
	char	  **moved = NULL;
	int			nmoved = 0;
	uint64		moved_end = 0;
	char	  **local = palloc(sizeof(char *) * BATCH_EVENTS);
	int			nlocal = 0;
	int64		next_stray = -1;
	bool		cut_short = false;
	bool		pub_blocked = false;	/* publishing stopped in this round */
	bool		handed = false; /* rows for the listener worker written */
	uint32		held_version = me_held_strays_version();

	can_publish = !outbox_mode && me_inflight_from_outbox() == 0 &&
		me_client_connected(ME_CLIENT_PUBLISHER);
	/* queue entries in flight go first, so that nothing overtakes them */
	moving = outbox_mode && me_inflight_queued() == 0;
	if (moving)
		moved = palloc(sizeof(char *) * BATCH_EVENTS);

	/*
	 * Rows written without a marker go in when the queue position at which
	 * they were written comes up.  Look for them in every round that moves
	 * (an index probe): whether a backend wrote some is not worth tracking.
	 */
	if (moving)
	{
		me_worker_begin_tx("moving events to the outbox");
		in_tx = true;
		next_stray = me_outbox_next_stray();
	}

	/*
	 * Held rows without a marker (see me_outbox_release_strays): look for
	 * them only after a backend wrote some.
	 */
	if (extension_ready && (held_probe || held_version != held_seen_version))
	{
		if (!in_tx)
		{
			me_worker_begin_tx("handing events to the local listeners");
			me_worker_commit_async();
			in_tx = true;
		}
		held_seen_version = held_version;
		held_probe = false;
		next_held = me_outbox_next_held_stray();
	}

	*new_entries = 0;
	pos = Min(local_pos, me_inflight_pub_pos());
	while (pos < tail && n < BATCH_EVENTS)
	{
		MqttEmitEventHeader hdr;
		bool		need_local = (pos >= local_pos);
		bool		need_pub = (!pub_blocked && pos >= me_inflight_pub_pos());
		uint64		end;

		/* a transaction of the worker stays short: the rest next round */
		if (in_tx && n > 0 && n % 64 == 0 &&
			GetCurrentTimestamp() - GetCurrentTransactionStartTimestamp() >=
			(TimestampTz) ROUND_TIME_MS * 1000)
		{
			cut_short = true;
			break;
		}

		me_queue_copy(pos, (char *) &hdr, sizeof(hdr));
		end = pos + hdr.total_len;

		if (need_pub && hdr.kind == ME_KIND_MARKER && !moving)
		{
			/* rows in the outbox come next: publish through the outbox */
			set_outbox_mode(true);
			can_publish = false;
			need_pub = false;
			pub_blocked = true;
			if (!need_local)
				break;
		}
		if (need_pub && !(hdr.flags & ME_FLAG_PUBLISH) &&
			hdr.kind != ME_KIND_MARKER)
		{
			/* not to be published; a durable one's row goes once done */
			if (hdr.row_id != 0)
				me_outbox_row_done(hdr.row_id);
			if (moving)
				moved_end = end;
			else
				me_inflight_skip(end);
			need_pub = false;
		}
		if (hdr.kind == ME_KIND_SKIP)
		{
			/* space an aborted transaction gave back: nothing in it */
			if (need_local)
			{
				local_pos = end;
				(*new_entries)++;
			}
			pos = end;
			n++;
			continue;
		}
		if (need_pub && !moving && (!can_publish || !me_inflight_window_open()))
		{
			need_pub = false;
			pub_blocked = true;
			if (!need_local)
				break;
		}

		if (need_local || need_pub)
		{
			MqttEmitEventHeader *h = read_entry(pos);
			const char *model = entrybuf + sizeof(MqttEmitEventHeader);

			if (need_local && next_held >= 0 && (uint64) next_held <= pos &&
				extension_ready)
			{
				/* everything queued before they were written is handed */
				if (!in_tx)
				{
					me_worker_begin_tx("handing events to the local listeners");
					me_worker_commit_async();
					in_tx = true;
				}
				flush_local(local, &nlocal, &handed);
				if (me_outbox_release_strays(false, pos) > 0)
					handed = true;
				next_held = me_outbox_next_held_stray();
			}
			/*
			 * A marker before the worker knows the extension (it was just
			 * created): its rows' local listeners wait, and so does the
			 * local cursor, until the registry is read.
			 */
			if (need_local && h->kind == ME_KIND_MARKER && !extension_ready)
				break;
			if (need_local && h->kind == ME_KIND_MARKER)
			{
				MqttEmitMarker mk;

				/* a spilled transaction's local listeners come here */
				memcpy(&mk, model, sizeof(mk));
				if (!in_tx)
				{
					me_worker_begin_tx("handing events to the local listeners");
					me_worker_commit_async();
					in_tx = true;
				}
				flush_local(local, &nlocal, &handed);
				if (me_outbox_release_batch(&mk, true) > 0)
					handed = true;
			}
			else if (need_local && wants_local_row(h, model))
			{
				local[nlocal] = palloc(h->total_len);
				memcpy(local[nlocal], h, h->total_len);
				nlocal++;
			}
			if (need_local)
			{
				local_pos = end;
				(*new_entries)++;
			}
			if (need_pub && moving)
			{
				if (!in_tx)
				{
					me_worker_begin_tx("moving events to the outbox");
					in_tx = true;
				}
				if (next_stray >= 0 && (uint64) next_stray <= pos)
				{
					me_outbox_move(moved, nmoved);
					nmoved = 0;
					next_stray = place_strays(pos);
				}
				if (h->kind == ME_KIND_MARKER)
				{
					MqttEmitMarker mk;

					memcpy(&mk, model, sizeof(mk));
					me_outbox_move(moved, nmoved);
					nmoved = 0;
					me_worker_commit_async();
					me_outbox_place_batch(&mk);
				}
				else
				{
					/* keep it in the outbox; its local row is made apart */
					me_inflight_key_moved(-(int64) pos - 1,
										  me_outbox_next_order() + nmoved);
					moved[nmoved] = palloc(h->total_len);
					memcpy(moved[nmoved], h, h->total_len);
					nmoved++;
				}
				moved_end = end;
			}
			else if (need_pub)
			{
				if (me_inflight_send(h, model, model + h->model_len, end, 0,
									 -(int64) pos - 1))
					me_inflight_published_to(end);
				else
				{
					pub_blocked = true;
					if (local_pos <= pos)
						break;
				}
			}
		}
		pos = end;
		n++;
	}

	if (next_stray >= 0 && (uint64) next_stray <= pos)
	{
		me_outbox_move(moved, nmoved);
		nmoved = 0;
		next_stray = place_strays(pos);
	}
	if (!extension_ready)
		next_held = -1;
	if (nmoved > 0 || nlocal > 0 ||
		(next_held >= 0 && (uint64) next_held <= local_pos))
	{
		if (!in_tx)
		{
			me_worker_begin_tx(nmoved > 0 ? "moving events to the outbox" :
							   "handing events to the local listeners");
			in_tx = true;
			if (nmoved == 0)
				me_worker_commit_async();
		}
		me_outbox_move(moved, nmoved);
		flush_local(local, &nlocal, &handed);
		if (next_held >= 0 && (uint64) next_held <= local_pos)
		{
			if (me_outbox_release_strays(false, local_pos) > 0)
				handed = true;
			next_held = me_outbox_next_held_stray();
		}
	}
	if (in_tx)
		me_worker_end_tx();
	me_local_done_set(local_pos);
	if (handed)
		me_wake_listener();
	if (moved_end > 0)
	{
		/* committed: the moved events are the outbox's now */
		me_inflight_moved_to(moved_end);
	}

	return n >= BATCH_EVENTS || cut_short;
}

/* me_outbox_scan_publishable's callback: publish one row, in order */
static bool
row_publish(const MeOutboxRow *row, void *arg)
{
	if ((row->hdr.flags & ME_FLAG_PUBLISH) &&
		(!me_inflight_window_open() ||
		 !me_inflight_send(&row->hdr, row->model, row->payload, 0, row->id, row->order)))
		return false;
	me_inflight_set_outbox_cursor(row->order);
	return true;
}

/*
 * Outbox mode: delete what the broker acknowledged, publish rows in order,
 * and leave outbox mode when the outbox has nothing left to publish.
 */
static void
process_outbox(void)
{
	bool		connected = me_client_connected(ME_CLIENT_PUBLISHER);
	bool		empty_batch = true;
	int64		dead;

	me_worker_begin_tx("draining the outbox");
	me_worker_commit_async();

	dead = me_inflight_take_dead_letter();
	if (dead != 0)
		me_outbox_dead_letter_row(dead,
								  "the broker closed the connection each time this message was sent");

	me_outbox_delete_done();

	me_outbox_note_oldest();

	/* publish in order, after anything from the queue still in flight */
	if (connected && me_inflight_queued() == 0 && me_inflight_window_open() &&
		me_outbox_scan_publishable(me_inflight_outbox_cursor(),
								   me_inflight_room(),
								   row_publish, NULL) > 0)
		empty_batch = false;

	/* nothing left and nothing in flight: back to the fast path */
	if (connected && empty_batch && me_inflight_count() == 0 &&
		me_outbox_rows_done(NULL) == 0 && me_outbox_drained())
	{
		set_outbox_mode(false);
		me_inflight_set_outbox_cursor(0);
	}

	me_worker_end_tx();
}

/*
 * Direct mode: delete the rows of durable events that the broker has, in
 * a transaction of their own.
 */
void
me_relay_delete_done(void)
{
	me_worker_begin_tx("deleting published outbox rows");
	me_worker_commit_async();
	me_outbox_delete_done();
	me_worker_end_tx();
}

/*
 * One round: follow the outbox's version and the publisher's state into a
 * mode, run local listeners and publish what can be, release what is
 * done.  *tail is the queue's tail this round saw, *new_entries how many
 * new entries it took; *timeout is lowered when something is due soon.
 * Returns true when there is more to do right away.
 */
bool
me_relay_step(uint64 *tail, int *new_entries, long *timeout)
{
	uint32		version;
	bool		more;
	TimestampTz done_since;
	int			ndone;

	/*
	 * Read the queue's tail before the outbox version.  A backend bumps the
	 * version when it committed rows without a marker, before its session
	 * can commit anything else: whatever this round takes from the queue,
	 * the rows its sessions wrote earlier are seen, and placed at the
	 * queue position they were written at (process_queue).
	 */
	*tail = me_queue_tail();
	pg_memory_barrier();

	/*
	 * A listener registered before an event in the queue committed must
	 * get it: listen() bumped the registry's version before that commit,
	 * so a registry as new as the version read now covers every entry
	 * before the tail just read.
	 */
	me_worker_refresh_registry();
	version = me_outbox_version();
	if (version != outbox_seen_version)
	{
		outbox_seen_version = version;
		set_outbox_mode(true);
	}
	if (extension_ready && !me_client_connected(ME_CLIENT_PUBLISHER))
		set_outbox_mode(true);
	if (!extension_ready)
		set_outbox_mode(false);

	more = process_queue(*tail, new_entries);
	if (outbox_mode)
		process_outbox();
	me_relay_release_done();

	/* durable events published from the queue: delete their rows */
	ndone = me_outbox_rows_done(&done_since);
	if (!outbox_mode && ndone > 0 && extension_ready &&
		(ndone >= 256 || GetCurrentTimestamp() - done_since >= 10 * 1000))
		me_relay_delete_done();
	if (me_outbox_rows_done(NULL) > 0)
		*timeout = Min(*timeout, 10);

	/*
	 * The shared row count is approximate: a row that a backend commits
	 * while we count can be counted twice, or not at all.  Recount when
	 * idle, once a second, while counting is cheap.
	 */
	if (!more && extension_ready && me_inflight_count() == 0 &&
		me_outbox_rows_done(NULL) == 0 && head_pos == *tail &&
		me_outbox_rows() > 0 && me_outbox_rows() < RECOUNT_MAX &&
		GetCurrentTimestamp() - last_recount >= USECS_PER_SEC)
	{
		last_recount = GetCurrentTimestamp();
		me_worker_begin_tx("counting the outbox");
		me_outbox_recount();
		me_worker_end_tx();
	}
	return more;
}

/*
 * Move the queue's head past everything both cursors are done with.
 */
void
me_relay_release_done(void)
{
	uint64		done = Min(local_pos, me_inflight_pub_done());
	uint64		pos = head_pos;
	int			nevents = 0;
	int			ndurable = 0;

	if (done <= head_pos)
		return;
	while (pos < done)
	{
		MqttEmitEventHeader hdr;

		me_queue_copy(pos, (char *) &hdr, sizeof(hdr));
		pos += hdr.total_len;
		if (hdr.kind != ME_KIND_MARKER && hdr.kind != ME_KIND_SKIP)
			nevents++;
		if (hdr.flags & ME_FLAG_QUEUED)
			ndurable++;
	}
	Assert(pos == done);
	me_queue_release(done, nevents);
	if (ndurable > 0)
		me_count(ME_STAT_DEQUEUED_DURABLE, ndurable);
	head_pos = done;
}

/*
 * At shutdown, move what the queue still holds unacknowledged into the
 * outbox, so that a clean stop loses nothing even with the broker away.
 */
void
me_relay_keep_queue_at_exit(void)
{
	uint64		tail;
	int			rounds = 0;
	int			new_entries;

	if (!extension_ready)
		return;

	/*
	 * Commits that hold an earlier place in the queue (between their commit
	 * record and their COMMIT callback) hide the events queued after them:
	 * give them up to a second to finish.
	 */
	for (rounds = 0; rounds < 1000 && me_queue_tail() != me_queue_end(); rounds++)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	rounds = 0;
	tail = me_queue_tail();
	if (me_inflight_pub_done() >= tail)
		return;
	me_inflight_forget(true);
	set_outbox_mode(true);
	while (me_inflight_pub_pos() < tail && rounds++ < 1000)
		(void) process_queue(tail, &new_entries);
	me_relay_release_done();
	ereport(LOG,
			(errmsg("pg_mqtt_emit kept the unpublished events of the queue in mqtt_emit.outbox")));
}

/*
 * What a crash of memory delivery loses can be known only afterwards: the
 * queue goes with the shared memory.  The worker writes, once a second,
 * how many memory-delivery events the queue holds (its fill, less the
 * durable events whose rows survive) to a small file beside the spool;
 * the first worker of new shared memory reads it and counts what it says
 * as dropped, with a WARNING.  A clean shutdown keeps the queue in the
 * outbox first and leaves 0.
 */
#define FILL_FILE	fill_file()

/* this database's file (pg_mqtt_emit.c, me_files_dir) */
static const char *
fill_file(void)
{
	static char path[MAXPGPATH];

	if (path[0] == '\0')
		snprintf(path, sizeof(path), "%s/queue_fill", me_files_dir());
	return path;
}

static uint64
memory_events_queued(void)
{
	uint64		n = me_counter(ME_STAT_ENQUEUED) - me_counter(ME_STAT_DEQUEUED);
	uint64		d = me_counter(ME_STAT_ENQUEUED_DURABLE) - me_counter(ME_STAT_DEQUEUED_DURABLE);

	return n > d ? n - d : 0;
}

static void
write_fill(uint64 n)
{
	int			fd = open(FILL_FILE, O_WRONLY | O_CREAT | O_CLOEXEC, pg_file_create_mode);
	char		buf[32];
	int			len;

	if (fd < 0)
		return;
	len = snprintf(buf, sizeof(buf), UINT64_FORMAT "\n", n);
	/* a fixed width would leave no stale digits; ftruncate does the same */
	if (ftruncate(fd, 0) == 0 && write(fd, buf, len) != len)
	{
		/* nothing to do: the next round writes it again */
	}
	close(fd);
}

/* once a second from the worker's loop, and at a clean exit */
void
me_relay_note_fill(bool now)
{
	static TimestampTz last = 0;
	static uint64 last_n = PG_UINT64_MAX;
	TimestampTz t = GetCurrentTimestamp();
	uint64		n;

	if (!now && t - last < USECS_PER_SEC)
		return;
	last = t;
	n = memory_events_queued();
	if (n != last_n)
		write_fill(n);
	last_n = n;
}

/* the first worker of new shared memory: what did the last one leave? */
void
me_relay_report_lost(void)
{
	FILE	   *f;
	unsigned long long n = 0;

	if (!me_worker_fresh())
		return;
	f = fopen(FILL_FILE, "r");
	if (f == NULL)
		return;
	if (fscanf(f, "%llu", &n) != 1)
		n = 0;
	fclose(f);
	if (n > 0)
	{
		ereport(WARNING,
				(errmsg("pg_mqtt_emit: about %llu events of memory delivery were lost with the shared-memory queue",
						n),
				 errdetail("The queue held that many committed events not yet acknowledged by the broker up to a second before the server stopped without a clean shutdown."),
				 errhint("Use mqtt_emit.delivery = durable for events that must not be lost.")));
		me_count(ME_STAT_DROPPED, (uint64) n);
	}
	write_fill(0);
}
