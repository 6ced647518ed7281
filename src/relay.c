/*-------------------------------------------------------------------------
 *
 * relay.c
 *		From the shared-memory queue to the broker and the local listeners,
 *		directly or through the outbox.
 *
 * The worker reads the queue with two cursors: the local cursor (here)
 * runs the local listeners of each event, even while the broker is away;
 * the publish cursor (inflight.c) sends events to the broker while
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

#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "listeners.h"
#include "outbox.h"
#include "topic.h"
#include "worker.h"

#define BATCH_EVENTS		5000	/* events handled before looking around */

static uint64 head_pos;			/* what the queue's head is */
static uint64 local_pos;		/* local listeners done before this */

static bool extension_ready = false;	/* the outbox and registry exist */
static bool outbox_mode = true;
static uint32 outbox_seen_version = 0;
static bool strays_pending = false; /* backends wrote rows without a marker */
static uint64 strays_after = 0;	/* ... to be placed after this queue position */
static TimestampTz last_recount = 0;	/* of the outbox's rows, when idle */

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
	if (ready && !was_ready)
	{
		me_outbox_start(me_worker_take_fresh());
		set_outbox_mode(true);
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
 * Run the local listeners of a row event, if any want it.  Inside a
 * transaction; starts one when *in_tx is false.  True when some ran.
 */
static bool
run_local(const MqttEmitEventHeader *hdr, const char *model,
		  const char *payload, bool *in_tx)
{
	if (hdr->kind != ME_KIND_ROW || !me_listeners_want_local(model, hdr->model_len))
		return false;
	if (in_tx && !*in_tx)
	{
		me_worker_begin_tx("running local listeners");
		*in_tx = true;
	}
	me_build_topic(&topicbuf, hdr, model, false);
	me_listeners_run_local(hdr, model, payload, topicbuf.data);
	return true;
}

/*
 * Run local listeners of queued events, and publish them (or, in outbox
 * mode, move them into the outbox) as far as the broker and the in-flight
 * window allow.  Returns true when there is more to do right away.
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
	int64	   *local_rows = palloc(sizeof(int64) * BATCH_EVENTS);
	int			nlocal_rows = 0;

	can_publish = !outbox_mode && me_inflight_from_outbox() == 0 &&
		me_client_connected(ME_CLIENT_PUBLISHER);
	/* queue entries in flight go first, so that nothing overtakes them */
	moving = outbox_mode && me_inflight_queued() == 0;
	if (moving)
		moved = palloc(sizeof(char *) * BATCH_EVENTS);

	*new_entries = 0;
	pos = Min(local_pos, me_inflight_pub_pos());
	while (pos < tail && n < BATCH_EVENTS)
	{
		MqttEmitEventHeader hdr;
		bool		need_local = (pos >= local_pos);
		bool		need_pub = (pos >= me_inflight_pub_pos());
		uint64		end;

		me_queue_copy(pos, (char *) &hdr, sizeof(hdr));
		end = pos + hdr.total_len;

		if (need_pub && hdr.kind == ME_KIND_MARKER && !moving)
		{
			/* rows in the outbox come next: publish through the outbox */
			set_outbox_mode(true);
			can_publish = false;
			need_pub = false;
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
		if (need_pub && !moving && (!can_publish || !me_inflight_window_open()))
		{
			need_pub = false;
			if (!need_local)
				break;
		}

		if (need_local || need_pub)
		{
			MqttEmitEventHeader *h = read_entry(pos);
			const char *model = entrybuf + sizeof(MqttEmitEventHeader);

			if (need_local)
			{
				if ((h->flags & ME_FLAG_LOCAL) &&
					run_local(h, model, model + h->model_len, &in_tx))
				{
					h = read_entry(pos);	/* listeners may not keep entrybuf */
					model = entrybuf + sizeof(MqttEmitEventHeader);
					/* a durable event's row says so, in the same transaction */
					if (h->row_id != 0)
						local_rows[nlocal_rows++] = h->row_id;
				}
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
					/* keep it in the outbox; local listeners have run */
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
				else if (local_pos <= pos)
					break;
			}
		}
		pos = end;
		n++;
	}

	if (nmoved > 0)
	{
		if (!in_tx)
		{
			me_worker_begin_tx("moving events to the outbox");
			in_tx = true;
		}
		me_outbox_move(moved, nmoved);
	}
	if (nlocal_rows > 0)
		me_outbox_local_ran(local_rows, nlocal_rows);
	if (in_tx)
		me_worker_end_tx();
	if (moved_end > 0)
	{
		/* committed: the moved events are the outbox's now */
		me_inflight_moved_to(moved_end);
	}

	return n >= BATCH_EVENTS;
}

/* me_outbox_run_local's callback: the local listeners of one row */
static bool
row_run_local(const MeOutboxRow *row, void *arg)
{
	(void) run_local(&row->hdr, row->model, row->payload, NULL);
	return true;
}

/* me_outbox_scan_publishable's callback: publish one row, in order */
static bool
row_publish(const MeOutboxRow *row, void *arg)
{
	if (row->hdr.flags & ME_FLAG_LOCAL)
		return false;			/* its local listeners first */
	if ((row->hdr.flags & ME_FLAG_PUBLISH) &&
		!me_inflight_send(&row->hdr, row->model, row->payload, 0, row->id, row->order))
		return false;
	me_inflight_set_outbox_cursor(row->order);
	return true;
}

/*
 * Outbox mode: delete what the broker acknowledged, run local listeners of
 * rows that still need them, publish rows in order, and leave outbox mode
 * when the outbox has nothing left to publish.
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

	if (strays_pending && me_inflight_pub_pos() >= strays_after)
	{
		me_outbox_place_strays(false);
		strays_pending = false;
	}

	me_outbox_note_oldest();

	/* local listeners of rows written by committing backends */
	if (me_outbox_run_local(row_run_local, NULL) > 0)
		empty_batch = false;

	/* publish in order, after anything from the queue still in flight */
	if (connected && me_inflight_queued() == 0 && me_inflight_window_open() &&
		me_outbox_scan_publishable(me_inflight_outbox_cursor(),
								   mqtt_emit_max_inflight - me_inflight_count(),
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
	 * Read the outbox version before the queue's tail.  Rows that a backend
	 * wrote without a marker are placed in the publishing order only once
	 * everything queued before their commit has been moved or published: a
	 * session's earlier transactions are in the queue before its bump.
	 */
	version = me_outbox_version();
	*tail = me_queue_tail();
	if (version != outbox_seen_version)
	{
		outbox_seen_version = version;
		set_outbox_mode(true);
		strays_pending = true;
		strays_after = *tail;
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
	 * while we count can be counted twice.  Recount when idle, once a
	 * second.
	 */
	if (!more && !outbox_mode && extension_ready && me_inflight_count() == 0 &&
		me_outbox_rows_done(NULL) == 0 && head_pos == *tail &&
		me_outbox_rows() > 0 &&
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

	if (done <= head_pos)
		return;
	while (pos < done)
	{
		MqttEmitEventHeader hdr;

		me_queue_copy(pos, (char *) &hdr, sizeof(hdr));
		pos += hdr.total_len;
		if (hdr.kind != ME_KIND_MARKER)
			nevents++;
	}
	Assert(pos == done);
	me_queue_release(done, nevents);
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
