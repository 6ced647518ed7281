/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The pg_mqtt_emit background worker.
 *
 * One worker per cluster, registered from _PG_init when the library is
 * preloaded, connected to mqtt_emit.database.  It owns both MQTT clients:
 * the publisher (client id mqtt_emit.client_id) and, while some listener
 * accepts remote events, the subscriber (<client_id>-subscriber).
 *
 * The worker reads the shared-memory queue with two cursors.  The local
 * cursor runs the local listeners of each event (even while the broker is
 * away); the publish cursor sends events to the broker while connected,
 * with up to mqtt_emit.max_inflight messages awaiting acknowledgement.  The
 * queue's head moves past an event only when both cursors are done with it
 * and the broker has acknowledged it, so a broker outage keeps events in the
 * queue, and a failed connection sends everything unacknowledged again from
 * the oldest unacknowledged event (at-least-once; receivers deduplicate by
 * event id).  Events of one transaction, and transactions, keep their
 * commit order.
 *
 * The outbox table takes over whenever events cannot simply flow: while the
 * publisher is not connected, the worker moves queued events into
 * mqtt_emit.outbox (so they survive a crash and do not fill the queue), and
 * backends write there themselves in durable mode or when the queue is
 * full.  While the outbox holds rows the worker is in "outbox mode": queued
 * events are appended to the outbox behind the older rows, and the outbox
 * is published in id order; a row is deleted when the broker has
 * acknowledged it.  When it is empty again, events flow straight from the
 * queue.  A message that makes the broker drop the connection three times
 * in a row is moved to mqtt_emit.dead_letters.
 *
 * paho's callbacks never run PostgreSQL code: broker.c keeps a mailbox that
 * this loop empties after every wake-up.  SIGHUP re-reads the settings and
 * reconnects when a broker setting changed; SIGTERM disconnects cleanly and
 * exits; an error exits with code 1 and the postmaster starts the worker
 * again, which resumes at the queue's head.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/worker.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "broker.h"
#include "listeners.h"

#define FIFO_SIZE			65536	/* > the largest mqtt_emit.max_inflight */
#define BATCH_EVENTS		5000	/* events handled before looking around */

/* One published event waiting for its acknowledgements. */
typedef struct InFlight
{
	uint64		start_pos;		/* queue entry: where it starts */
	uint64		end_pos;		/* queue entry: done up to here when acked */
	int64		outbox_id;		/* outbox row, or 0 for a queue entry */
	int64		row_id;			/* queue entry of a durable event: its row */
	int64		key;			/* outbox row: its seq; queue entry: -(start+1) */
	int			pending;		/* acknowledgements still missing */
} InFlight;

#define STRIKES_FOR_DEAD_LETTER	3

/* The state of one MQTT client and its reconnection schedule. */
typedef struct ClientSlot
{
	MeBroker   *broker;
	bool		subscriber;
	TimestampTz next_attempt;
	int			backoff_ms;
	bool		was_connected;
	char		last_logged[256];
} ClientSlot;

static volatile sig_atomic_t got_sigterm = false;

static ClientSlot publisher = {NULL, false};
static ClientSlot subscriber = {NULL, true};

/* queue cursors, logical byte positions */
static uint64 head_pos;			/* what the queue's head is */
static uint64 local_pos;		/* local listeners done before this */
static uint64 pub_pos;			/* sent (or skipped) before this */
static uint64 pub_done;			/* acknowledged before this */

static InFlight *fifo;
static int	fifo_start;
static int	fifo_count;
static uint64 fifo_first_seq;
static uint64 next_seq = 1;
static bool need_reset = false;
static bool napping = false;	/* worker_napping is set */
static int	round_new_entries = 0;	/* queue entries new in the last round */
static bool backpressure = false;
static int	ring_inflight = 0;	/* queue entries in the fifo */
static int	outbox_inflight = 0;	/* outbox rows in the fifo */

/* outbox state */
static bool extension_ready = false;
static bool outbox_mode = true;
static uint32 outbox_seen_version = 0;
static int64 ob_pub_cursor = 0; /* rows with seq <= this were sent */
static int64 ob_next_seq = 1;	/* the next publishing order number */
static int64 *ob_acked = NULL;	/* acknowledged rows to delete */
static int	ob_nacked = 0;
static int	ob_maxacked = 0;
static TimestampTz ob_acked_since = 0;	/* when ob_acked became non-empty */
static TimestampTz last_recount = 0;	/* of outbox_rows, when idle */
static int64 strike_key = 0;	/* oldest unacknowledged event at resets */
static int	strikes = 0;
static int64 dead_letter_id = 0;
static List *dead_queue_entries = NIL;	/* refused queue entries (copies) */
static List *dead_outbox_ids = NIL; /* refused outbox rows */
static bool strays_pending = false; /* backends wrote rows without a marker */
static uint64 strays_after = 0;	/* ... to be placed after this queue position */
static SPIPlanPtr plan_delete = NULL;

static uint32 listeners_version = 0;
static TimestampTz last_extension_check = 0;
static List *subscribed = NIL;	/* topic filters, in TopMemoryContext */

static char *conf_broker_url = NULL;
static char *conf_client_id = NULL;
static char *conf_username = NULL;
static char *conf_password = NULL;
static char *conf_tls = NULL;
static int	conf_version = 0;
static int	conf_keepalive = 0;
static bool conf_clean = true;

static MemoryContext loop_cxt = NULL;
static StringInfoData topicbuf;
static StringInfoData signbuf;
static char *entrybuf = NULL;
static Size entrybuf_size = 0;

static void worker_sigterm(SIGNAL_ARGS);
static void worker_detach(int code, Datum arg);
static void remember_settings(void);
static bool broker_settings_changed(void);
static void destroy_clients(void);
static void service_client(ClientSlot *slot, TimestampTz now, long *timeout);
static void handle_publisher_news(void);
static void handle_subscriber_news(void);
static bool process_queue(uint64 tail);
static void process_outbox(void);
static void count_outbox(void);
static void dead_letter(int64 id, const char *reason);
static void remember_dead_letter(InFlight *f);
static void flush_dead_letters(void);
static void move_queue_to_outbox_at_exit(void);
static void wait_for_acks_at_exit(void);
static void release_done(void);
static void row_done(int64 id);
static void recount_outbox(void);
static void delete_acked(void);
static void delete_acked_rows(void);
static void reset_inflight(void);
static void sync_subscriptions(bool all);
static void commit_async(void);
static void begin_tx(const char *what);
static void end_tx(void);

/*
 * Register the worker; called from _PG_init during preload.
 */
void
me_worker_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	strcpy(worker.bgw_library_name, "pg_mqtt_emit");
	strcpy(worker.bgw_function_name, "mqtt_emit_worker_main");
	strcpy(worker.bgw_name, "pg_mqtt_emit worker");
	strcpy(worker.bgw_type, "pg_mqtt_emit");
	RegisterBackgroundWorker(&worker);
}

static void
worker_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	got_sigterm = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

static void
worker_detach(int code, Datum arg)
{
	pg_atomic_write_u32(&me_shared->worker_napping, 0);
	pg_atomic_write_u32(&me_shared->publisher_connected, 0);
	pg_atomic_write_u32(&me_shared->subscriber_connected, 0);
	pg_atomic_write_u32(&me_shared->subscriptions, 0);
	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	if (me_shared->worker_pid == MyProcPid)
	{
		me_shared->worker_pid = 0;
		me_shared->worker_latch = NULL;
	}
	LWLockRelease(me_shared->lock);
}

static char *
dup_setting(char *old, const char *val)
{
	if (old)
		pfree(old);
	return MemoryContextStrdup(TopMemoryContext, val ? val : "");
}

/* The TLS settings as one string, to notice when any of them changes. */
static void
tls_settings(char *buf, Size len)
{
	snprintf(buf, len, "%s|%s|%s|%d",
			 mqtt_emit_tls_ca_file, mqtt_emit_tls_cert_file,
			 mqtt_emit_tls_key_file, (int) mqtt_emit_tls_verify);
}

static void
remember_settings(void)
{
	char		tls[3072];

	tls_settings(tls, sizeof(tls));
	conf_broker_url = dup_setting(conf_broker_url, mqtt_emit_broker_url);
	conf_client_id = dup_setting(conf_client_id, me_client_id());
	conf_username = dup_setting(conf_username, mqtt_emit_username);
	conf_password = dup_setting(conf_password, mqtt_emit_password);
	conf_tls = dup_setting(conf_tls, tls);
	conf_version = mqtt_emit_mqtt_version;
	conf_keepalive = mqtt_emit_keepalive;
	conf_clean = mqtt_emit_clean_session;
}

static bool
broker_settings_changed(void)
{
	char		tls[3072];

	tls_settings(tls, sizeof(tls));
	return strcmp(conf_broker_url, mqtt_emit_broker_url) != 0 ||
		strcmp(conf_client_id, me_client_id()) != 0 ||
		strcmp(conf_username, mqtt_emit_username) != 0 ||
		strcmp(conf_password, mqtt_emit_password) != 0 ||
		strcmp(conf_tls, tls) != 0 ||
		conf_version != mqtt_emit_mqtt_version ||
		conf_keepalive != mqtt_emit_keepalive ||
		conf_clean != mqtt_emit_clean_session;
}

/*
 * Entry point of the worker.
 */
void
mqtt_emit_worker_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, worker_sigterm);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(mqtt_emit_database, NULL, 0);
	pgstat_report_appname("pg_mqtt_emit");

	/* the worker's own SQL resolves names in pg_catalog only */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);

	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	if (me_shared->worker_pid != 0)
	{
		pid_t		other = me_shared->worker_pid;

		LWLockRelease(me_shared->lock);
		ereport(LOG,
				(errmsg("pg_mqtt_emit worker already running with PID %d", (int) other)));
		proc_exit(0);
	}
	me_shared->worker_pid = MyProcPid;
	me_shared->worker_latch = MyLatch;
	head_pos = me_shared->head;
	LWLockRelease(me_shared->lock);
	before_shmem_exit(worker_detach, (Datum) 0);

	local_pos = pub_pos = pub_done = head_pos;
	fifo = MemoryContextAllocHuge(TopMemoryContext, sizeof(InFlight) * FIFO_SIZE);
	fifo_start = fifo_count = 0;
	fifo_first_seq = next_seq;
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "pg_mqtt_emit worker loop",
									 ALLOCSET_DEFAULT_SIZES);
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		initStringInfo(&topicbuf);
		initStringInfo(&signbuf);
		MemoryContextSwitchTo(old);
	}
	remember_settings();
	publisher.next_attempt = 0;
	publisher.backoff_ms = mqtt_emit_reconnect_min;
	subscriber.next_attempt = 0;
	subscriber.backoff_ms = mqtt_emit_reconnect_min;

	ereport(LOG,
			(errmsg("pg_mqtt_emit worker started"),
			 errdetail("Broker \"%s\", client id \"%s\", database \"%s\".",
					   mqtt_emit_broker_url, me_client_id(), mqtt_emit_database)));

	while (!got_sigterm)
	{
		long		timeout = 1000;
		bool		more;
		TimestampTz now;
		uint32		version;
		uint64		tail;

		MemoryContextSwitchTo(loop_cxt);

		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (broker_settings_changed())
			{
				ereport(LOG,
						(errmsg("pg_mqtt_emit broker settings changed, reconnecting to \"%s\"",
								mqtt_emit_broker_url)));
				destroy_clients();
				remember_settings();
				publisher.last_logged[0] = subscriber.last_logged[0] = '\0';
				publisher.next_attempt = subscriber.next_attempt = 0;
				publisher.backoff_ms = subscriber.backoff_ms = mqtt_emit_reconnect_min;
			}
			listeners_version = 0;	/* prefix may have changed: resubscribe */
		}

		/*
		 * The listener registry changed: reload it and follow subscriptions.
		 * While the extension seems absent, look again now and then (it
		 * tells us when it is created, but a restore may not).
		 */
		version = pg_atomic_read_u32(&me_shared->listeners_version);
		if (!extension_ready &&
			GetCurrentTimestamp() - last_extension_check > 5 * USECS_PER_SEC)
			listeners_version = 0;
		if (version != listeners_version)
		{
			bool		was_ready = extension_ready;

			begin_tx("loading listeners");
			extension_ready = me_listeners_refresh();
			last_extension_check = GetCurrentTimestamp();
			if (extension_ready && !was_ready)
				count_outbox();
			end_tx();
			listeners_version = version;
			sync_subscriptions(false);
		}

		now = GetCurrentTimestamp();
		service_client(&publisher, now, &timeout);
		handle_publisher_news();
		flush_dead_letters();
		if (subscribed != NIL || subscriber.broker != NULL)
		{
			service_client(&subscriber, now, &timeout);
			handle_subscriber_news();
		}

		/*
		 * Read the outbox version before the queue's tail.  Rows that a
		 * backend wrote without a marker (not even a marker fitted in the
		 * queue) are placed in the publishing order only once everything
		 * queued before their commit has been moved or published: a
		 * session's earlier transactions are in the queue before its bump.
		 */
		version = pg_atomic_read_u32(&me_shared->outbox_version);
		tail = me_queue_tail();
		if (version != outbox_seen_version)
		{
			outbox_seen_version = version;
			outbox_mode = true;
			strays_pending = true;
			strays_after = tail;
		}
		if (extension_ready && !(publisher.broker && me_broker_connected(publisher.broker)))
			outbox_mode = true;
		if (!extension_ready)
			outbox_mode = false;

		more = process_queue(tail);
		if (outbox_mode)
			process_outbox();
		release_done();

		/* durable events published from the queue: delete their rows */
		if (!outbox_mode && ob_nacked > 0 && extension_ready &&
			(ob_nacked >= 256 ||
			 GetCurrentTimestamp() - ob_acked_since >= 10 * 1000))
			delete_acked_rows();
		if (ob_nacked > 0)
			timeout = Min(timeout, 10);

		/*
		 * outbox_rows is approximate: a row that a backend commits while we
		 * count can be counted twice.  Recount when idle, once a second.
		 */
		if (!more && !outbox_mode && extension_ready && fifo_count == 0 &&
			ob_nacked == 0 && head_pos == tail &&
			pg_atomic_read_u64(&me_shared->outbox_rows) > 0 &&
			GetCurrentTimestamp() - last_recount >= USECS_PER_SEC)
		{
			last_recount = GetCurrentTimestamp();
			recount_outbox();
		}

		MemoryContextReset(loop_cxt);
		if (got_sigterm)
			break;
		if (more)
			continue;

		/*
		 * Commits are coming faster than we take them (this round found
		 * more than one new queue entry): nap for batch_delay rather than
		 * sleep on the latch.  While worker_napping is set, committing
		 * backends do not signal us, and the next round takes together
		 * whatever arrived meanwhile (and its acknowledgements).  A quieter
		 * round ends the naps: clear the flag, then read the tail once more
		 * (a backend that saw the flag set has advanced the tail before it
		 * looked), and sleep until signalled.  At a few commits per
		 * millisecond or less, every commit still wakes us at once.
		 */
		if (round_new_entries > 1 && mqtt_emit_batch_delay > 0)
		{
			if (!napping)
			{
				pg_atomic_write_u32(&me_shared->worker_napping, 1);
				napping = true;
			}
			pg_usleep((long) (mqtt_emit_batch_delay * 1000.0));
			continue;
		}
		if (napping)
		{
			pg_atomic_write_u32(&me_shared->worker_napping, 0);
			napping = false;
			pg_memory_barrier();
			if (me_queue_tail() != tail)
				continue;
		}

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	/* SIGTERM: let acknowledgements on their way arrive, keep the rest */
	wait_for_acks_at_exit();
	if (ob_nacked > 0 && extension_ready)
		delete_acked_rows();
	move_queue_to_outbox_at_exit();
	if (publisher.broker)
		me_broker_disconnect(publisher.broker, 1000);
	if (subscriber.broker)
		me_broker_disconnect(subscriber.broker, 100);
	destroy_clients();
	ereport(LOG, (errmsg("pg_mqtt_emit worker shutting down")));

	/*
	 * Exit code 1: the postmaster starts the worker again unless the server
	 * is shutting down, so that pg_terminate_backend() does not stop
	 * publishing for good.
	 */
	proc_exit(1);
}

static void
destroy_clients(void)
{
	if (publisher.broker)
	{
		me_broker_destroy(publisher.broker);
		publisher.broker = NULL;
	}
	if (subscriber.broker)
	{
		me_broker_destroy(subscriber.broker);
		subscriber.broker = NULL;
	}
	pg_atomic_write_u32(&me_shared->publisher_connected, 0);
	pg_atomic_write_u32(&me_shared->subscriber_connected, 0);
	if (fifo_count > 0)
		need_reset = true;
	reset_inflight();
}

/*
 * Log a broker problem: at LOG the first time it is seen, then at DEBUG1
 * while the same message repeats, so that an absent broker does not flood
 * the server log.
 */
static void
report_broker_problem(ClientSlot *slot, const char *msg)
{
	const char *who = slot->subscriber ? "subscriber" : "publisher";

	me_set_last_error("%s: %s", who, msg);
	if (strcmp(slot->last_logged, msg) != 0)
	{
		ereport(LOG,
				(errmsg("pg_mqtt_emit %s cannot reach broker \"%s\": %s",
						who, mqtt_emit_broker_url, msg),
				 errhint("Events wait in the queue and are published when the broker is back.")));
		strlcpy(slot->last_logged, msg, sizeof(slot->last_logged));
	}
	else
		ereport(DEBUG1,
				(errmsg("pg_mqtt_emit %s still cannot reach broker: %s", who, msg)));
}

/*
 * Create and connect a client when it is due; lower *timeout so that the
 * loop wakes up for the next attempt.
 */
static void
service_client(ClientSlot *slot, TimestampTz now, long *timeout)
{
	char		err[256];

	if (slot->broker && (me_broker_connected(slot->broker) ||
						 me_broker_connecting(slot->broker)))
		return;

	if (now < slot->next_attempt)
	{
		long		wait = (long) ((slot->next_attempt - now) / 1000) + 1;

		*timeout = Min(*timeout, wait);
		return;
	}

	if (slot->broker == NULL)
	{
		char		cid[512];

		if (slot->subscriber)
			snprintf(cid, sizeof(cid), "%s-subscriber", me_client_id());
		else
			strlcpy(cid, me_client_id(), sizeof(cid));
		slot->broker = me_broker_create(cid, slot->subscriber, MyLatch,
										err, sizeof(err));
		if (slot->broker == NULL)
		{
			report_broker_problem(slot, err);
			slot->next_attempt = now + (TimestampTz) mqtt_emit_reconnect_max * 1000;
			*timeout = Min(*timeout, mqtt_emit_reconnect_max);
			return;
		}
	}

	if (!me_broker_connect(slot->broker, err, sizeof(err)))
		report_broker_problem(slot, err);

	/* schedule the next attempt in case this one fails */
	slot->next_attempt = now + (TimestampTz) slot->backoff_ms * 1000;
	*timeout = Min(*timeout, slot->backoff_ms);
	slot->backoff_ms = Min(slot->backoff_ms * 2, mqtt_emit_reconnect_max);
}

static void
note_connected(ClientSlot *slot)
{
	ereport(LOG,
			(errmsg("pg_mqtt_emit %s connected to broker \"%s\"",
					slot->subscriber ? "subscriber" : "publisher",
					mqtt_emit_broker_url)));
	slot->backoff_ms = mqtt_emit_reconnect_min;
	slot->was_connected = true;
	slot->last_logged[0] = '\0';
	me_count(ME_STAT_CONNECTS, 1);
}

/*
 * The broker refused the message of an in-flight event for good (an MQTT 5
 * PUBACK with a failure reason): note it for mqtt_emit.dead_letters.
 */
static void
remember_dead_letter(InFlight *f)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	if (f->outbox_id != 0)
	{
		int64	   *id = palloc(sizeof(int64));

		*id = f->outbox_id;
		dead_outbox_ids = lappend(dead_outbox_ids, id);
	}
	else
	{
		MqttEmitEventHeader hdr;
		char	   *copy;

		me_queue_copy(f->start_pos, (char *) &hdr, sizeof(hdr));
		copy = palloc(hdr.total_len);
		me_queue_copy(f->start_pos, copy, hdr.total_len);
		dead_queue_entries = lappend(dead_queue_entries, copy);
	}
	MemoryContextSwitchTo(old);
}

/*
 * Write what the broker refused into mqtt_emit.dead_letters.
 */
static void
flush_dead_letters(void)
{
	ListCell   *lc;

	if (dead_queue_entries == NIL && dead_outbox_ids == NIL)
		return;
	if (!extension_ready)
	{
		/* nowhere to keep them: count and log only */
		me_count(ME_STAT_DEAD_LETTERS,
				 list_length(dead_queue_entries) + list_length(dead_outbox_ids));
		ereport(LOG,
				(errmsg("pg_mqtt_emit: the broker refused %d messages for good",
						list_length(dead_queue_entries) + list_length(dead_outbox_ids))));
		list_free_deep(dead_queue_entries);
		list_free_deep(dead_outbox_ids);
		dead_queue_entries = dead_outbox_ids = NIL;
		return;
	}
	begin_tx("keeping dead letters");
	SPI_connect();
	foreach(lc, dead_outbox_ids)
		dead_letter(*(int64 *) lfirst(lc), "the broker refused the message");
	if (dead_queue_entries != NIL)
		ForceSyncCommit();		/* their queue entries are gone already */
	foreach(lc, dead_queue_entries)
	{
		MqttEmitEventHeader *hdr = (MqttEmitEventHeader *) lfirst(lc);
		char	   *model = (char *) hdr + sizeof(MqttEmitEventHeader);
		Datum		args[3];
		Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
		char	   *m = pnstrdup(model, hdr->model_len);

		if (hdr->kind == ME_KIND_PUBLISH)
		{
			resetStringInfo(&topicbuf);
			appendStringInfoString(&topicbuf, m);
		}
		else
			me_build_topic(&topicbuf, hdr, m, mqtt_emit_topic_style == ME_TOPIC_ALL);
		args[0] = CStringGetTextDatum(topicbuf.data);
		args[1] = PointerGetDatum(cstring_to_text_with_len(model + hdr->model_len,
														   hdr->payload_len));
		args[2] = CStringGetTextDatum("the broker refused the message");
		SPI_execute_with_args("INSERT INTO mqtt_emit.dead_letters (topic, payload, reason, created_at) "
							  "VALUES ($1, $2, $3, now())", 3, types, args, NULL, false, 0);
		me_count(ME_STAT_DEAD_LETTERS, 1);
		ereport(LOG,
				(errmsg("pg_mqtt_emit moved a message on topic \"%s\" to mqtt_emit.dead_letters",
						topicbuf.data),
				 errdetail("The broker refused it.")));
	}
	SPI_finish();
	end_tx();
	list_free_deep(dead_queue_entries);
	list_free_deep(dead_outbox_ids);
	dead_queue_entries = dead_outbox_ids = NIL;
}

/*
 * Take the publisher's mailbox: connection changes, acknowledgements and
 * failures.
 */
/*
 * The outbox row id is done with (acknowledged, or not to be published):
 * delete it with the next batch.
 */
static void
row_done(int64 id)
{
	if (ob_nacked >= ob_maxacked)
	{
		ob_maxacked = Max(1024, ob_maxacked * 2);
		if (ob_acked == NULL)
			ob_acked = MemoryContextAlloc(TopMemoryContext,
										  sizeof(int64) * ob_maxacked);
		else
			ob_acked = repalloc(ob_acked, sizeof(int64) * ob_maxacked);
	}
	if (ob_nacked == 0)
		ob_acked_since = GetCurrentTimestamp();
	ob_acked[ob_nacked++] = id;
}

static void
handle_publisher_news(void)
{
	MeBrokerNews news;
	int			i;

	if (publisher.broker == NULL)
		return;
	me_broker_poll(publisher.broker, &news);

	if (news.connected && me_broker_connected(publisher.broker))
	{
		note_connected(&publisher);
		pg_atomic_write_u32(&me_shared->publisher_connected, 1);
	}
	/* refused for good: keep a copy in the dead letters, do not resend */
	for (i = 0; i < news.nrejects; i++)
	{
		uint64		seq = news.rejects[i];
		InFlight   *f;

		if (seq < fifo_first_seq || seq >= fifo_first_seq + fifo_count)
			continue;
		f = &fifo[(fifo_start + (seq - fifo_first_seq)) % FIFO_SIZE];
		if (f->pending <= 0)
			continue;
		f->pending--;
		remember_dead_letter(f);
	}

	for (i = 0; i < news.nacks; i++)
	{
		uint64		seq = news.acks[i];
		InFlight   *f;

		if (seq < fifo_first_seq || seq >= fifo_first_seq + fifo_count)
			continue;			/* from before a reset */
		f = &fifo[(fifo_start + (seq - fifo_first_seq)) % FIFO_SIZE];
		if (f->pending > 0)
		{
			f->pending--;
			me_count(ME_STAT_PUBLISHED, 1);
		}
	}
	for (i = 0; i < news.nfailures; i++)
	{
		uint64		seq = news.failures[i];

		me_count(ME_STAT_PUBLISH_FAILED, 1);
		if (seq >= fifo_first_seq && seq < fifo_first_seq + fifo_count)
			need_reset = true;
	}
	if (news.nfailures > 0)
		me_set_last_error("publisher: %d messages were not acknowledged", news.nfailures);

	/* pop acknowledged events from the front */
	while (fifo_count > 0 && fifo[fifo_start].pending == 0)
	{
		InFlight   *f = &fifo[fifo_start];

		if (f->outbox_id != 0)
		{
			row_done(f->outbox_id);
			outbox_inflight--;
		}
		else
		{
			if (f->row_id != 0)
				row_done(f->row_id);
			pub_done = f->end_pos;
			ring_inflight--;
		}
		fifo_start = (fifo_start + 1) % FIFO_SIZE;
		fifo_count--;
		fifo_first_seq++;
		if (f->key == strike_key)
			strikes = 0;		/* the broker took the one it refused */
	}
	if (ring_inflight == 0)
		pub_done = pub_pos;
	/* after the acknowledgements that came before the loss */
	if (news.lost)
	{
		pg_atomic_write_u32(&me_shared->publisher_connected, 0);
		report_broker_problem(&publisher, news.error);
		if (fifo_count > 0)
			need_reset = true;
		if (publisher.was_connected)
		{
			/* first attempt soon after losing a working connection */
			publisher.was_connected = false;
			publisher.next_attempt = GetCurrentTimestamp() +
				(TimestampTz) mqtt_emit_reconnect_min * 1000;
		}

		/*
		 * Start over with a new client: paho would otherwise send what it
		 * still buffers ahead of the unacknowledged events resent from the
		 * oldest one, out of order.
		 */
		me_broker_destroy(publisher.broker);
		publisher.broker = NULL;
	}

	if (news.nacks > 0)
		backpressure = false;

	if (need_reset)
		reset_inflight();
}

/*
 * Forget what is in flight and send it again, starting at the oldest
 * unacknowledged event.
 */
static void
reset_inflight(void)
{
	if (!need_reset)
		return;
	need_reset = false;
	if (fifo_count > 0)
	{
		InFlight   *oldest = &fifo[fifo_start];

		me_count(ME_STAT_RETRIED, fifo_count);

		/*
		 * The same event failing again and again is refused for good.  An
		 * event keeps its strikes when it moves from the queue into the
		 * outbox (see process_queue).
		 */
		if (oldest->key == strike_key)
			strikes++;
		else
		{
			strike_key = oldest->key;
			strikes = 1;
		}
		if (oldest->outbox_id != 0 && strikes >= STRIKES_FOR_DEAD_LETTER)
			dead_letter_id = oldest->outbox_id;
	}
	fifo_start = 0;
	fifo_count = 0;
	fifo_first_seq = next_seq;
	ring_inflight = 0;
	outbox_inflight = 0;
	pub_pos = pub_done;
	ob_pub_cursor = 0;
	backpressure = false;
}

/*
 * Take the subscriber's mailbox: connection changes and received messages.
 */
static void
handle_subscriber_news(void)
{
	MeBrokerNews news;
	MeIncoming *m;
	bool		in_tx = false;
	int			n = 0;

	if (subscriber.broker == NULL)
		return;
	me_broker_poll(subscriber.broker, &news);

	if (news.connected && me_broker_connected(subscriber.broker))
	{
		note_connected(&subscriber);
		pg_atomic_write_u32(&me_shared->subscriber_connected, 1);
		/* a clean session forgets subscriptions: make them all again */
		sync_subscriptions(true);
	}
	if (news.lost)
	{
		pg_atomic_write_u32(&me_shared->subscriber_connected, 0);
		report_broker_problem(&subscriber, news.error);
		if (subscriber.was_connected)
		{
			subscriber.was_connected = false;
			subscriber.next_attempt = GetCurrentTimestamp() +
				(TimestampTz) mqtt_emit_reconnect_min * 1000;
		}
	}
	if (news.incoming_dropped > 0)
	{
		me_count(ME_STAT_REJECTED, news.incoming_dropped);
		ereport(LOG,
				(errmsg("pg_mqtt_emit dropped " UINT64_FORMAT " received messages: receive buffer full",
						news.incoming_dropped)));
	}

	m = news.incoming;
	while (m)
	{
		MeIncoming *next = m->next;

		if (!in_tx)
		{
			begin_tx("running remote listeners");
			in_tx = true;
		}
		me_listeners_handle_remote(m);
		me_broker_free_message(m);
		m = next;
		/* commit now and then so that one long burst is not one transaction */
		if (++n % 1000 == 0)
		{
			end_tx();
			in_tx = false;
		}
	}
	if (in_tx)
		end_tx();
}

/*
 * Bring the broker's subscriptions in line with the listeners that accept
 * remote events: one filter <prefix>/<model>/# per model (and its lower-case
 * form, which prisma-extension-emitter publishes to).  With all, subscribe
 * to everything again (after a reconnect).
 */
static void
sync_subscriptions(bool all)
{
	List	   *models = me_listeners_remote_models();
	List	   *want = NIL;
	List	   *keep = NIL;
	ListCell   *lc;
	MemoryContext old;
	bool		connected;

	old = MemoryContextSwitchTo(TopMemoryContext);
	foreach(lc, models)
	{
		char	   *model = (char *) lfirst(lc);
		StringInfoData f;
		char	   *lower;

		initStringInfo(&f);
		appendStringInfo(&f, "%s/", mqtt_emit_topic_prefix);
		me_append_topic_model(&f, model, strlen(model), false);
		appendStringInfoString(&f, "/#");
		want = list_append_unique(want, makeString(f.data));

		lower = pstrdup(f.data);
		for (char *p = lower; *p; p++)
			if (*p >= 'A' && *p <= 'Z')
				*p += 'a' - 'A';
		want = list_append_unique(want, makeString(lower));
	}
	MemoryContextSwitchTo(old);

	connected = subscriber.broker && me_broker_connected(subscriber.broker);

	/* unsubscribe what is no longer wanted */
	foreach(lc, subscribed)
	{
		if (list_member(want, lfirst(lc)))
			keep = lappend(keep, lfirst(lc));
		else if (connected)
			me_broker_unsubscribe(subscriber.broker, strVal(lfirst(lc)));
	}

	if (want == NIL)
	{
		/* nobody listens for remote events: no subscriber connection */
		if (subscriber.broker)
		{
			me_broker_disconnect(subscriber.broker, 100);
			me_broker_destroy(subscriber.broker);
			subscriber.broker = NULL;
			pg_atomic_write_u32(&me_shared->subscriber_connected, 0);
		}
		subscribed = NIL;
		pg_atomic_write_u32(&me_shared->subscriptions, 0);
		return;
	}

	if (connected)
	{
		foreach(lc, want)
		{
			if (all || !list_member(keep, lfirst(lc)))
			{
				int			rc = me_broker_subscribe(subscriber.broker,
													 strVal(lfirst(lc)), 1);

				if (rc != 0)
					ereport(LOG,
							(errmsg("pg_mqtt_emit cannot subscribe to \"%s\": %s",
									strVal(lfirst(lc)), me_broker_strerror(rc))));
				else
					ereport(DEBUG1,
							(errmsg("pg_mqtt_emit subscribed to \"%s\"", strVal(lfirst(lc)))));
			}
		}
	}
	subscribed = want;
	pg_atomic_write_u32(&me_shared->subscriptions, list_length(want));
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
 * Send one event (a queue entry, or an outbox row when outbox_id is set);
 * false when it could not be sent now.
 */
static bool
publish_event(const MqttEmitEventHeader *hdr, const char *model,
			  const char *payload, uint64 end_pos, int64 outbox_id, int64 key)
{
	int			qos = (hdr->qos <= 2) ? hdr->qos : mqtt_emit_qos;
	int			nmsgs = 0;
	int			rc = 0;
	int			pass;
	uint64		seq = next_seq;
	int			len = (int) hdr->payload_len;

	if (mqtt_emit_signing_key[0] != '\0' &&
		me_sign_payload(&signbuf, payload, len))
	{
		payload = signbuf.data;
		len = signbuf.len;
	}

	for (pass = 0; pass < 2; pass++)
	{
		if (hdr->kind == ME_KIND_PUBLISH)
		{
			if (pass == 1)
				break;
			resetStringInfo(&topicbuf);
			appendBinaryStringInfo(&topicbuf, model, hdr->model_len);
		}
		else
		{
			if (pass == 0 && mqtt_emit_topic_style == ME_TOPIC_ALL)
				continue;
			if (pass == 1 && mqtt_emit_topic_style == ME_TOPIC_OPERATION)
				break;
			me_build_topic(&topicbuf, hdr, model, pass == 1);
		}
		rc = me_broker_publish(publisher.broker, topicbuf.data, payload,
							   len, qos, hdr->kind == ME_KIND_ROW, seq);
		if (rc != 0)
			break;
		nmsgs++;
	}

	if (rc != 0 && nmsgs == 0)
	{
		if (rc == ME_BROKER_BACKPRESSURE)
			backpressure = true;
		else
		{
			me_count(ME_STAT_PUBLISH_FAILED, 1);
			me_set_last_error("publisher: send failed: %s (code %d)",
							  me_broker_strerror(rc), rc);
			need_reset = true;
		}
		return false;
	}

	/* track it; a partial "both" send still waits for what was sent */
	{
		InFlight   *f;

		if (fifo_count == 0)
			fifo_first_seq = seq;
		f = &fifo[(fifo_start + fifo_count) % FIFO_SIZE];
		f->start_pos = end_pos - hdr->total_len;
		f->end_pos = end_pos;
		f->outbox_id = outbox_id;
		f->row_id = (outbox_id == 0) ? hdr->outbox_id : 0;
		f->key = key;
		f->pending = nmsgs;
		fifo_count++;
		next_seq++;
		if (outbox_id != 0)
			outbox_inflight++;
		else
			ring_inflight++;
	}
	return true;
}

/*
 * Mark the queue entry ending at end as done for the publish cursor,
 * without sending it: once what is in flight before it is done.
 */
static void
skip_entry(uint64 end)
{
	if (ring_inflight == 0)
		pub_done = end;
	else
		fifo[(fifo_start + fifo_count - 1) % FIFO_SIZE].end_pos = end;
	pub_pos = end;
}

/*
 * Give the rows of a committed transaction's outbox batch their place in
 * the publishing order.  Inside a transaction, with SPI connected.
 */
static void
sequence_batch(const MqttEmitMarker *mk)
{
	Datum		args[4];
	Oid			types[4] = {INT8OID, INT8OID, INT8OID, INT8OID};
	int			ret;

	args[0] = Int64GetDatum(mk->batch);
	args[1] = Int64GetDatum(mk->min_id);
	args[2] = Int64GetDatum(mk->max_id);
	args[3] = Int64GetDatum(ob_next_seq);
	ret = SPI_execute_with_args("UPDATE mqtt_emit.outbox o SET seq = $4 + s.n - 1 "
								"FROM (SELECT id, row_number() OVER (ORDER BY id) AS n "
								"      FROM mqtt_emit.outbox "
								"      WHERE id BETWEEN $2 AND $3 AND batch = $1 AND seq IS NULL) s "
								"WHERE o.id = s.id",
								4, types, args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "cannot order outbox rows: %s", SPI_result_code_string(ret));
	ob_next_seq += SPI_processed;
}

/*
 * Give rows that no marker will place (written when not even a marker fit
 * in the queue, or whose marker a crash lost) their place, in id order.
 * With all, every row without a place that was written before the shared
 * memory was set up (after a crash: no marker or queue entry can come for
 * those; rows committed since have theirs in the new queue).
 */
static void
sequence_strays(bool all)
{
	Datum		args[2];
	Oid			types[2] = {INT8OID, INT8OID};
	int			ret;

	args[0] = Int64GetDatum(ob_next_seq);
	args[1] = Int64GetDatum((int64) me_shared->epoch_seq);
	ret = SPI_execute_with_args(all ?
								"UPDATE mqtt_emit.outbox o SET seq = $1 + s.n - 1 "
								"FROM (SELECT id, row_number() OVER (ORDER BY id) AS n "
								"      FROM mqtt_emit.outbox WHERE seq IS NULL AND batch < $2) s "
								"WHERE o.id = s.id" :
								"UPDATE mqtt_emit.outbox o SET seq = $1 + s.n - 1 "
								"FROM (SELECT id, row_number() OVER (ORDER BY id) AS n "
								"      FROM mqtt_emit.outbox WHERE seq IS NULL AND NOT marked) s "
								"WHERE o.id = s.id",
								all ? 2 : 1, types, args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "cannot order outbox rows: %s", SPI_result_code_string(ret));
	ob_next_seq += SPI_processed;
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

/*
 * Give the rows of durable events that the queue holds too their place in
 * the publishing order, after ob_next_seq, in the order of ids[].  Their
 * local listeners have run.  Rows already placed (by an earlier worker)
 * stay where they are.
 */
static void
place_queued_rows(int64 *ids, int n)
{
	Datum		args[2];
	Oid			types[2] = {INT8ARRAYOID, INT8OID};

	args[0] = int8_array(ids, n);
	args[1] = Int64GetDatum(ob_next_seq);
	SPI_connect();
	if (SPI_execute_with_args("UPDATE mqtt_emit.outbox o"
							  " SET seq = $2 + s.n - 1, flags = o.flags & ~6"
							  " FROM unnest($1) WITH ORDINALITY AS s(id, n)"
							  " WHERE o.id = s.id AND o.seq IS NULL",
							  2, types, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cannot order outbox rows");
	SPI_finish();
}

/*
 * Durable events whose local listeners ran in this transaction: their rows
 * must not run them again.
 */
static void
local_listeners_ran(int64 *ids, int n)
{
	Datum		arg = int8_array(ids, n);
	Oid			type = INT8ARRAYOID;

	SPI_connect();
	if (SPI_execute_with_args("UPDATE mqtt_emit.outbox SET flags = flags & ~2"
							  " WHERE id = ANY ($1) AND (flags & 2) <> 0",
							  1, &type, &arg, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "cannot update mqtt_emit.outbox");
	SPI_finish();
}

/*
 * Move the collected queue entries into the outbox, in their order: copy
 * memory-mode events there, and place durable events' rows, which are
 * there already.
 */
static void
flush_moved(char **moved, int *nmoved)
{
	int64	   *ids;
	int			i = 0;

	if (*nmoved == 0)
		return;
	ids = palloc(sizeof(int64) * *nmoved);
	while (i < *nmoved)
	{
		bool		durable = ((MqttEmitEventHeader *) moved[i])->outbox_id != 0;
		int			j;

		for (j = i; j < *nmoved &&
			 (((MqttEmitEventHeader *) moved[j])->outbox_id != 0) == durable; j++)
			ids[j - i] = ((MqttEmitEventHeader *) moved[j])->outbox_id;
		if (durable)
			place_queued_rows(ids, j - i);
		else
		{
			me_outbox_insert(moved + i, j - i, (uint8) ~ME_FLAG_LOCAL, 0, true,
							 ob_next_seq, ids);
			pg_atomic_fetch_add_u64(&me_shared->outbox_rows, j - i);
			me_count(ME_STAT_OUTBOXED, j - i);
		}
		ob_next_seq += j - i;
		i = j;
	}
	ForceSyncCommit();			/* the queue forgets them at our commit */
	*nmoved = 0;
}

/*
 * Run local listeners of queued events, and publish them (or, in outbox
 * mode, move them into the outbox) as far as the broker and the in-flight
 * window allow.  Markers of transactions that wrote the outbox place their
 * rows in the publishing order; in direct mode, one switches to outbox
 * mode, so that nothing behind it overtakes its rows.  Returns true when
 * there is more to do right away.
 */
static bool
process_queue(uint64 tail)
{
	uint64		pos;
	int			n = 0;
	bool		in_tx = false;
	bool		spi = false;
	bool		can_publish;
	bool		moving;
	char	  **moved = NULL;
	int			nmoved = 0;
	uint64		moved_end = 0;
	int64	   *local_rows = palloc(sizeof(int64) * BATCH_EVENTS);
	int			nlocal_rows = 0;

	can_publish = !outbox_mode && outbox_inflight == 0 &&
		publisher.broker && me_broker_connected(publisher.broker);
	/* queue entries in flight go first, so that nothing overtakes them */
	moving = outbox_mode && ring_inflight == 0;
	if (moving)
		moved = palloc(sizeof(char *) * BATCH_EVENTS);

	round_new_entries = 0;
	pos = Min(local_pos, pub_pos);
	while (pos < tail && n < BATCH_EVENTS)
	{
		MqttEmitEventHeader hdr;
		bool		need_local = (pos >= local_pos);
		bool		need_pub = (pos >= pub_pos);
		uint64		end;

		me_queue_copy(pos, (char *) &hdr, sizeof(hdr));
		end = pos + hdr.total_len;

		if (need_pub && hdr.kind == ME_KIND_MARKER && !moving)
		{
			/* rows in the outbox come next: publish through the outbox */
			outbox_mode = true;
			can_publish = false;
			need_pub = false;
			if (!need_local)
				break;
		}
		if (need_pub && !(hdr.flags & ME_FLAG_PUBLISH) &&
			hdr.kind != ME_KIND_MARKER)
		{
			/* not to be published; a durable one's row goes once done */
			if (hdr.outbox_id != 0)
				row_done(hdr.outbox_id);
			if (moving)
				moved_end = end;
			else
				skip_entry(end);
			need_pub = false;
		}
		if (need_pub && !moving &&
			(!can_publish || backpressure || need_reset ||
			 fifo_count >= mqtt_emit_max_inflight))
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
				if ((h->flags & ME_FLAG_LOCAL) && h->kind == ME_KIND_ROW &&
					me_listeners_want_local(model, h->model_len))
				{
					if (!in_tx)
					{
						begin_tx("running local listeners");
						in_tx = true;
					}
					me_build_topic(&topicbuf, h, model, false);
					me_listeners_run_local(h, model, model + h->model_len,
										   topicbuf.data);
					h = read_entry(pos);	/* listeners may not keep entrybuf */
					model = entrybuf + sizeof(MqttEmitEventHeader);
					/* a durable event's row says so, in the same transaction */
					if (h->outbox_id != 0)
						local_rows[nlocal_rows++] = h->outbox_id;
				}
				local_pos = end;
				round_new_entries++;
			}
			if (need_pub && moving)
			{
				if (!in_tx)
				{
					begin_tx("moving events to the outbox");
					in_tx = true;
				}
				if (h->kind == ME_KIND_MARKER)
				{
					MqttEmitMarker mk;

					memcpy(&mk, model, sizeof(mk));
					flush_moved(moved, &nmoved);
					if (!spi)
					{
						SPI_connect();
						spi = true;
						commit_async();
					}
					sequence_batch(&mk);
				}
				else
				{
					/* keep it in the outbox; local listeners have run */
					if (strike_key == -(int64) pos - 1)
						strike_key = ob_next_seq + nmoved;	/* its seq there */
					moved[nmoved] = palloc(h->total_len);
					memcpy(moved[nmoved], h, h->total_len);
					nmoved++;
				}
				moved_end = end;
			}
			else if (need_pub)
			{
				if (publish_event(h, model, model + h->model_len, end, 0,
								  -(int64) pos - 1))
					pub_pos = end;
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
			begin_tx("moving events to the outbox");
			in_tx = true;
		}
		flush_moved(moved, &nmoved);
	}
	if (nlocal_rows > 0)
		local_listeners_ran(local_rows, nlocal_rows);
	if (spi)
		SPI_finish();
	if (in_tx)
		end_tx();
	if (moved_end > 0)
	{
		/* committed: the moved events are the outbox's now */
		pub_pos = pub_done = moved_end;
	}

	return n >= BATCH_EVENTS;
}

/*
 * Count the outbox's rows (when the worker starts) for mqtt_emit.stats and
 * the mqtt_emit.outbox_max check.  Inside a transaction.
 */
static void
count_outbox(void)
{
	bool		isnull;

	bool		fresh;

	SPI_connect();
	if (SPI_execute("SELECT count(*), coalesce(max(seq), 0) FROM mqtt_emit.outbox",
					true, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		pg_atomic_write_u64(&me_shared->outbox_rows,
							(uint64) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
																 SPI_tuptable->tupdesc,
																 1, &isnull)));
		ob_next_seq = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
												  SPI_tuptable->tupdesc, 2, &isnull)) + 1;
	}

	/*
	 * After a crash the queue is new: markers it held are gone, so rows
	 * still waiting for theirs are placed now, in id order.
	 */
	LWLockAcquire(me_shared->lock, LW_EXCLUSIVE);
	fresh = me_shared->fresh;
	me_shared->fresh = false;
	LWLockRelease(me_shared->lock);
	if (fresh)
	{
		/*
		 * Durable events that were also in the queue: their local listeners
		 * did not run (else the flag would be off), so run them from here.
		 */
		Datum		epoch = Int64GetDatum((int64) me_shared->epoch_seq);
		Oid			type = INT8OID;

		if (SPI_execute_with_args("UPDATE mqtt_emit.outbox SET flags = flags & ~4"
								  " WHERE (flags & 4) <> 0 AND batch < $1",
								  1, &type, &epoch, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "cannot update mqtt_emit.outbox");
		sequence_strays(true);
	}
	SPI_finish();
	outbox_mode = true;
}

/*
 * Set outbox_rows to the outbox's row count.
 */
static void
recount_outbox(void)
{
	bool		isnull;

	begin_tx("counting the outbox");
	SPI_connect();
	if (SPI_execute("SELECT count(*) FROM mqtt_emit.outbox", true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
		pg_atomic_write_u64(&me_shared->outbox_rows,
							(uint64) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
																 SPI_tuptable->tupdesc,
																 1, &isnull)));
	SPI_finish();
	end_tx();
}

static void
outbox_rows_gone(uint64 n)
{
	uint64		cur = pg_atomic_read_u64(&me_shared->outbox_rows);

	/* approximate: never below zero */
	pg_atomic_write_u64(&me_shared->outbox_rows, cur > n ? cur - n : 0);
}

/*
 * Fill a header for an outbox row of the current SPI result.
 */
static void
row_to_event(HeapTuple tup, TupleDesc td, MqttEmitEventHeader *hdr,
			 int64 *id, text **model, text **payload, TimestampTz *created)
{
	bool		isnull;

	*id = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
	hdr->kind = (uint8) DatumGetInt16(SPI_getbinval(tup, td, 2, &isnull));
	hdr->flags = (uint8) DatumGetInt16(SPI_getbinval(tup, td, 3, &isnull));
	hdr->op = (uint8) DatumGetInt16(SPI_getbinval(tup, td, 4, &isnull));
	hdr->qos = (uint8) DatumGetInt16(SPI_getbinval(tup, td, 5, &isnull));
	*model = DatumGetTextPP(SPI_getbinval(tup, td, 6, &isnull));
	*payload = DatumGetTextPP(SPI_getbinval(tup, td, 7, &isnull));
	*created = DatumGetTimestampTz(SPI_getbinval(tup, td, 8, &isnull));
	hdr->model_len = VARSIZE_ANY_EXHDR(*model);
	hdr->payload_len = VARSIZE_ANY_EXHDR(*payload);
	hdr->total_len = sizeof(MqttEmitEventHeader) + hdr->model_len + hdr->payload_len;
	hdr->relid = DatumGetObjectId(SPI_getbinval(tup, td, 9, &isnull));
	hdr->outbox_id = 0;
}

/*
 * Move the row that the broker keeps refusing to mqtt_emit.dead_letters.
 */
static void
dead_letter(int64 id, const char *reason)
{
	Datum		arg = Int64GetDatum(id);
	Oid			argtype = INT8OID;

	if (SPI_execute_with_args("SELECT id, kind, flags, op, qos, model, payload, created_at, relid "
							  "FROM mqtt_emit.outbox WHERE id = $1",
							  1, &argtype, &arg, NULL, false, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		MqttEmitEventHeader hdr;
		int64		rid;
		text	   *model;
		text	   *payload;
		TimestampTz created;
		char	   *m;
		Datum		args[4];
		Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID};

		row_to_event(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, &hdr,
					 &rid, &model, &payload, &created);
		m = text_to_cstring(model);
		if (hdr.kind == ME_KIND_PUBLISH)
		{
			resetStringInfo(&topicbuf);
			appendStringInfoString(&topicbuf, m);
		}
		else
			me_build_topic(&topicbuf, &hdr, m, mqtt_emit_topic_style == ME_TOPIC_ALL);
		args[0] = CStringGetTextDatum(topicbuf.data);
		args[1] = PointerGetDatum(payload);
		args[2] = CStringGetTextDatum(reason);
		args[3] = TimestampTzGetDatum(created);
		SPI_execute_with_args("INSERT INTO mqtt_emit.dead_letters (topic, payload, reason, created_at) "
							  "VALUES ($1, $2, $3, $4)", 4, types, args, NULL, false, 0);
		SPI_execute_with_args("DELETE FROM mqtt_emit.outbox WHERE id = $1",
							  1, &argtype, &arg, NULL, false, 0);
		outbox_rows_gone(1);
		me_count(ME_STAT_DEAD_LETTERS, 1);
		me_set_last_error("publisher: outbox row " INT64_FORMAT " moved to mqtt_emit.dead_letters", id);
		ereport(LOG,
				(errmsg("pg_mqtt_emit moved a message on topic \"%s\" to mqtt_emit.dead_letters",
						topicbuf.data),
				 errdetail("%s.", reason)));
	}
}

/*
 * Delete the outbox rows that are done with (ob_acked).  Inside a
 * transaction, with SPI connected.
 */
static void
delete_acked(void)
{
	Datum		arg;
	Oid			argtype = INT8ARRAYOID;
	int			ret;

	if (ob_nacked == 0)
		return;
	arg = int8_array(ob_acked, ob_nacked);
	if (plan_delete == NULL)
	{
		plan_delete = SPI_prepare("DELETE FROM mqtt_emit.outbox WHERE id = ANY ($1)",
								  1, &argtype);
		if (plan_delete == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan_delete);
	}
	ret = SPI_execute_plan(plan_delete, &arg, NULL, false, 0);
	if (ret != SPI_OK_DELETE)
		elog(ERROR, "cannot delete from mqtt_emit.outbox: %s", SPI_result_code_string(ret));
	outbox_rows_gone(SPI_processed);
	ob_nacked = 0;
}

/*
 * Direct mode: delete the rows of durable events that the broker has, in
 * batches (every 256 rows or 10 ms), in a transaction of their own.
 */
static void
delete_acked_rows(void)
{
	begin_tx("deleting published outbox rows");
	commit_async();
	SPI_connect();
	delete_acked();
	SPI_finish();
	end_tx();
}

/*
 * Outbox mode: delete what the broker acknowledged, run local listeners of
 * rows that still need them, publish rows in id order, and leave outbox
 * mode when the outbox is empty.
 */
static void
process_outbox(void)
{
	bool		connected = publisher.broker && me_broker_connected(publisher.broker);
	int			ret;
	uint64		i;
	bool		empty_batch = true;

	begin_tx("draining the outbox");
	commit_async();
	SPI_connect();

	if (dead_letter_id != 0)
	{
		dead_letter(dead_letter_id,
					"the broker closed the connection each time this message was sent");
		dead_letter_id = 0;
		strikes = 0;
	}

	delete_acked();

	if (strays_pending && pub_pos >= strays_after)
	{
		sequence_strays(false);
		strays_pending = false;
	}

	/* the oldest waiting row, for mqtt_emit.stats */
	ret = SPI_execute("SELECT created_at FROM mqtt_emit.outbox ORDER BY id LIMIT 1", false, 1);
	if (ret == SPI_OK_SELECT)
	{
		bool		isnull = true;
		Datum		d = (SPI_processed == 1) ?
			SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull) : (Datum) 0;

		pg_atomic_write_u64(&me_shared->outbox_oldest,
							isnull ? 0 : (uint64) DatumGetTimestampTz(d));
	}

	/* local listeners of rows written by committing backends */
	ret = SPI_execute("SELECT id, kind, flags, op, qos, model, payload, created_at, relid "
					  "FROM mqtt_emit.outbox WHERE (flags & 6) = 2 ORDER BY id LIMIT 1000",
					  false, 0);
	if (ret == SPI_OK_SELECT && SPI_processed > 0)
	{
		SPITupleTable *tt = SPI_tuptable;
		uint64		nrows = SPI_processed;
		Datum	   *ids = palloc(sizeof(Datum) * nrows);
		Datum		arg;
		Oid			argtype = INT8ARRAYOID;

		for (i = 0; i < nrows; i++)
		{
			MqttEmitEventHeader hdr;
			int64		id;
			text	   *model;
			text	   *payload;
			TimestampTz created;
			char	   *m;

			row_to_event(tt->vals[i], tt->tupdesc, &hdr, &id, &model, &payload, &created);
			ids[i] = Int64GetDatum(id);
			m = text_to_cstring(model);
			if (hdr.kind == ME_KIND_ROW && me_listeners_want_local(m, hdr.model_len))
			{
				me_build_topic(&topicbuf, &hdr, m, false);
				me_listeners_run_local(&hdr, m, text_to_cstring(payload), topicbuf.data);
			}
		}
		arg = PointerGetDatum(construct_array(ids, nrows, INT8OID, 8, true, TYPALIGN_DOUBLE));
		SPI_execute_with_args("UPDATE mqtt_emit.outbox SET flags = flags & ~2 WHERE id = ANY ($1)",
							  1, &argtype, &arg, NULL, false, 0);
		SPI_execute_with_args("DELETE FROM mqtt_emit.outbox WHERE id = ANY ($1) AND flags = 0",
							  1, &argtype, &arg, NULL, false, 0);
		outbox_rows_gone(SPI_processed);
		empty_batch = false;
	}

	/* publish in id order, after anything from the queue still in flight */
	if (connected && ring_inflight == 0 && !need_reset && !backpressure &&
		fifo_count < mqtt_emit_max_inflight)
	{
		Datum		args[2];
		Oid			types[2] = {INT8OID, INT4OID};

		args[0] = Int64GetDatum(ob_pub_cursor);
		args[1] = Int32GetDatum(mqtt_emit_max_inflight - fifo_count);
		ret = SPI_execute_with_args("SELECT id, kind, flags, op, qos, model, payload, created_at, relid, seq "
									"FROM mqtt_emit.outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
									2, types, args, NULL, false, 0);
		if (ret == SPI_OK_SELECT && SPI_processed > 0)
		{
			SPITupleTable *tt = SPI_tuptable;
			uint64		nrows = SPI_processed;

			empty_batch = false;
			for (i = 0; i < nrows; i++)
			{
				MqttEmitEventHeader hdr;
				int64		id;
				text	   *model;
				text	   *payload;
				TimestampTz created;

				bool		isnull;
				int64		seq;

				row_to_event(tt->vals[i], tt->tupdesc, &hdr, &id, &model, &payload, &created);
				seq = DatumGetInt64(SPI_getbinval(tt->vals[i], tt->tupdesc, 10, &isnull));
				if (hdr.flags & ME_FLAG_LOCAL)
					break;		/* its local listeners first */
				if (!(hdr.flags & ME_FLAG_PUBLISH))
				{
					ob_pub_cursor = seq;
					continue;
				}
				if (!publish_event(&hdr, VARDATA_ANY(model), VARDATA_ANY(payload), 0, id, seq))
					break;
				ob_pub_cursor = seq;
			}
		}
	}

	/* nothing left and nothing in flight: back to the fast path */
	if (connected && empty_batch && outbox_inflight == 0 && ob_nacked == 0 &&
		ring_inflight == 0)
	{
		/*
		 * Rows that are left wait for their queue entry (a durable event
		 * in the queue, or a marker), which is ahead of the publish cursor.
		 */
		ret = SPI_execute("SELECT (SELECT count(*) FROM mqtt_emit.outbox)"
						  " WHERE NOT EXISTS (SELECT FROM mqtt_emit.outbox WHERE seq IS NOT NULL)"
						  "   AND NOT EXISTS (SELECT FROM mqtt_emit.outbox WHERE seq IS NULL AND NOT marked)",
						  false, 1);
		if (ret == SPI_OK_SELECT && SPI_processed == 1)
		{
			bool		isnull;

			outbox_mode = false;
			ob_pub_cursor = 0;
			pg_atomic_write_u64(&me_shared->outbox_rows,
								(uint64) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
																	 SPI_tuptable->tupdesc,
																	 1, &isnull)));
			pg_atomic_write_u64(&me_shared->outbox_oldest, 0);
		}
	}

	SPI_finish();
	end_tx();
}

/*
 * At shutdown, wait a little (at most a second) for acknowledgements of
 * messages already sent, so that fewer are sent again after the restart.
 */
static void
wait_for_acks_at_exit(void)
{
	int			i;

	for (i = 0; i < 20 && fifo_count > 0; i++)
	{
		if (publisher.broker == NULL || !me_broker_connected(publisher.broker))
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 50, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		handle_publisher_news();
	}
	release_done();
}

/*
 * At shutdown, move what the queue still holds unacknowledged into the
 * outbox, so that a clean stop loses nothing even with the broker away.
 */
static void
move_queue_to_outbox_at_exit(void)
{
	uint64		tail;
	int			rounds = 0;

	if (!extension_ready)
		return;
	tail = me_queue_tail();
	if (pub_done >= tail)
		return;
	need_reset = true;
	reset_inflight();
	outbox_mode = true;
	while (pub_pos < tail && rounds++ < 1000)
		(void) process_queue(tail);
	release_done();
	ereport(LOG,
			(errmsg("pg_mqtt_emit kept the unpublished events of the queue in mqtt_emit.outbox")));
}

/*
 * Move the queue's head past everything both cursors are done with.
 */
static void
release_done(void)
{
	uint64		done = Min(local_pos, pub_done);
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
 * Let the current transaction commit without waiting for its WAL flush.
 * For the outbox's bookkeeping only: losing such a transaction in a crash
 * publishes rows again (deletes), places them again (seq), or runs their
 * local listeners again together with the flag that says they ran.
 * Transactions that take events out of the shared-memory queue (moving
 * them into the outbox or dead_letters) call ForceSyncCommit(), which
 * overrides this: the queue forgets the events once they commit.
 */
static void
commit_async(void)
{
	(void) set_config_option("synchronous_commit", "off", PGC_SUSET,
							 PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
}

static void
begin_tx(const char *what)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, what);
}

static void
end_tx(void)
{
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(loop_cxt);
}
