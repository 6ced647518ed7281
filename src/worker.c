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
	uint64		end_pos;		/* done up to here once acknowledged */
	int			pending;		/* acknowledgements still missing */
} InFlight;

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
static bool backpressure = false;

static uint32 listeners_version = 0;
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
static bool process_queue(void);
static void release_done(void);
static void reset_inflight(void);
static void sync_subscriptions(bool all);
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

static void
remember_settings(void)
{
	char		tls[3072];

	snprintf(tls, sizeof(tls), "%s|%s|%s|%d",
			 mqtt_emit_tls_ca_file, mqtt_emit_tls_cert_file,
			 mqtt_emit_tls_key_file, (int) mqtt_emit_tls_verify);
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

	snprintf(tls, sizeof(tls), "%s|%s|%s|%d",
			 mqtt_emit_tls_ca_file, mqtt_emit_tls_cert_file,
			 mqtt_emit_tls_key_file, (int) mqtt_emit_tls_verify);
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
				publisher.next_attempt = subscriber.next_attempt = 0;
				publisher.backoff_ms = subscriber.backoff_ms = mqtt_emit_reconnect_min;
			}
			listeners_version = 0;	/* prefix may have changed: resubscribe */
		}

		/* the listener registry changed: reload it and follow subscriptions */
		version = pg_atomic_read_u32(&me_shared->listeners_version);
		if (version != listeners_version)
		{
			begin_tx("loading listeners");
			me_listeners_refresh();
			end_tx();
			listeners_version = version;
			sync_subscriptions(false);
		}

		now = GetCurrentTimestamp();
		service_client(&publisher, now, &timeout);
		handle_publisher_news();
		if (subscribed != NIL || subscriber.broker != NULL)
		{
			service_client(&subscriber, now, &timeout);
			handle_subscriber_news();
		}

		more = process_queue();
		release_done();

		MemoryContextReset(loop_cxt);
		if (got_sigterm)
			break;
		if (more)
			continue;

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	/* SIGTERM: let in-flight messages finish briefly, then leave */
	if (publisher.broker)
		me_broker_disconnect(publisher.broker, 1000);
	if (subscriber.broker)
		me_broker_disconnect(subscriber.broker, 100);
	destroy_clients();
	ereport(LOG, (errmsg("pg_mqtt_emit worker shutting down")));
	proc_exit(0);
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
 * Take the publisher's mailbox: connection changes, acknowledgements and
 * failures.
 */
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
		pub_done = fifo[fifo_start].end_pos;
		fifo_start = (fifo_start + 1) % FIFO_SIZE;
		fifo_count--;
		fifo_first_seq++;
	}
	if (fifo_count == 0)
		pub_done = pub_pos;
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
		me_count(ME_STAT_RETRIED, fifo_count);
	fifo_start = 0;
	fifo_count = 0;
	fifo_first_seq = next_seq;
	pub_pos = pub_done;
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
 * Send one event; false when it could not be sent now.
 */
static bool
publish_entry(MqttEmitEventHeader *hdr, uint64 end_pos)
{
	const char *model = entrybuf + sizeof(MqttEmitEventHeader);
	const char *payload = model + hdr->model_len;
	int			qos = (hdr->qos <= 2) ? hdr->qos : mqtt_emit_qos;
	int			nmsgs = 0;
	int			rc = 0;
	int			pass;
	uint64		seq = next_seq;

	for (pass = 0; pass < 2; pass++)
	{
		bool		all_style;

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
			all_style = (pass == 1);
			me_build_topic(&topicbuf, hdr, model, all_style);
		}
		rc = me_broker_publish(publisher.broker, topicbuf.data, payload,
							   (int) hdr->payload_len, qos, seq);
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
		f->end_pos = end_pos;
		f->pending = nmsgs;
		fifo_count++;
		next_seq++;
	}
	return true;
}

/*
 * Run local listeners and publish what the queue holds, as far as the
 * broker and the in-flight window allow.  Returns true when there is more
 * to do right away.
 */
static bool
process_queue(void)
{
	uint64		tail = me_queue_tail();
	uint64		pos;
	int			n = 0;
	bool		in_tx = false;
	bool		can_publish;

	can_publish = publisher.broker && me_broker_connected(publisher.broker);

	pos = Min(local_pos, pub_pos);
	while (pos < tail && n < BATCH_EVENTS)
	{
		MqttEmitEventHeader hdr;
		bool		need_local = (pos >= local_pos);
		bool		need_pub = (pos >= pub_pos);
		uint64		end;

		me_queue_copy(pos, (char *) &hdr, sizeof(hdr));
		end = pos + hdr.total_len;

		if (need_pub && !(hdr.flags & ME_FLAG_PUBLISH))
		{
			/* nothing to send: done once what is before it is done */
			if (fifo_count == 0)
				pub_done = end;
			else
				fifo[(fifo_start + fifo_count - 1) % FIFO_SIZE].end_pos = end;
			pub_pos = end;
			need_pub = false;
		}
		if (need_pub &&
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

			if (need_local)
			{
				const char *model = entrybuf + sizeof(MqttEmitEventHeader);

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
				}
				local_pos = end;
			}
			if (need_pub)
			{
				if (publish_entry(h, end))
					pub_pos = end;
				else if (local_pos <= pos)
					break;
			}
		}
		pos = end;
		n++;
	}
	if (in_tx)
		end_tx();

	return n >= BATCH_EVENTS;
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
		nevents++;
	}
	Assert(pos == done);
	me_queue_release(done, nevents);
	head_pos = done;
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
