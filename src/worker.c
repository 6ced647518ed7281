/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The pg_mqtt_emit background worker: registration, main loop,
 *		signals, reload and shutdown.
 *
 * One worker per database that has the extension, started by the launcher
 * (launcher.c) with the database's OID as its argument, and bound to that
 * database's share of shared memory.  It owns both MQTT clients
 * (client.c).  Each round of the main loop is a short list of steps:
 *
 *	1. reload the settings after SIGHUP (new clients if a broker setting
 *	   changed)
 *	2. reload the listener registry when it changed, and follow the
 *	   subscriptions (inbound.c)
 *	3. keep the publisher connected and take its news: acknowledgements,
 *	   failures, refusals (inflight.c)
 *	4. keep the subscriber connected while some listener wants remote
 *	   events, and run listeners for what it received (inbound.c)
 *	5. relay the queue: local listeners, publishing, the outbox (relay.c)
 *	6. sleep until woken, or nap while commits keep coming
 *
 * paho's callbacks never run PostgreSQL code: broker.c keeps a mailbox that
 * the loop empties after every wake-up.  SIGTERM lets acknowledgements on
 * their way arrive, keeps what the queue still holds in the outbox,
 * disconnects and exits; an error exits with code 1 and the postmaster
 * starts the worker again, which resumes at the queue's head.  When the
 * extension is gone from its database (DROP EXTENSION) the worker marks
 * its slot retired and exits for good (code 0); the launcher then asks a
 * probe whether to give the slot back.  When the
 * postmaster dies (kill -9 of it), the worker disconnects its subscriber
 * and keeps what it had received before it exits: paho acknowledged those
 * messages to the broker, which would not send them again.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/worker.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/xact.h"
#include "commands/dbcommands.h"
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
#include "handlers.h"
#include "listeners.h"
#include "outbox.h"
#include "worker.h"
#include "spool.h"

static volatile sig_atomic_t got_sigterm = false;
static bool postmaster_gone = false;

static MemoryContext loop_cxt = NULL;
static bool napping = false;	/* worker_napping is set */
static uint32 listeners_version = 0;
static TimestampTz last_extension_check = 0;
static bool retire = false;		/* the extension is gone: exit for good */
static char *db_name = NULL;	/* this process's database */

static void worker_sigterm(SIGNAL_ARGS);
static void worker_detach(int code, Datum arg);
static void reload_settings(void);
static void wait_for_work(bool more, int new_entries, uint64 tail, long timeout);
static void shut_down(void);
static void keep_received(void);
static const char *get_db_name(void);

/*
 * Start a background worker of this library for database dboid (the
 * launcher does, for each database with the extension): not restarted by
 * the postmaster (the launcher restarts it), and the launcher's latch is
 * set when it starts or stops.  *handle is NULL when no background worker
 * slot is free.
 */
void
me_worker_start(Oid dboid, const char *function, const char *name,
				const char *type, BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "pg_mqtt_emit", sizeof(worker.bgw_library_name));
	strlcpy(worker.bgw_function_name, function, sizeof(worker.bgw_function_name));
	strlcpy(worker.bgw_name, name, sizeof(worker.bgw_name));
	strlcpy(worker.bgw_type, type, sizeof(worker.bgw_type));
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, handle))
		*handle = NULL;
}

/*
 * Set, right after a background worker of the extension connected, what
 * its transactions need whatever the server, the database or the role sets
 * for client sessions (postgresql.conf, ALTER DATABASE/ROLE ... SET):
 * read-write, READ COMMITTED, not deferrable, waiting for locks without a
 * timeout, without exit_on_error or (PostgreSQL 17 and later)
 * transaction_timeout, and resolving names in pg_catalog only.  A server-wide
 * default_transaction_read_only = on made the worker and the listener
 * worker fail at their first UPDATE and restart every second; a
 * serializable, read-only, deferrable default can make a read wait for a
 * safe snapshot.  Listeners run inside these transactions, with their own
 * search_path (listeners.c), so always READ COMMITTED (they run in a
 * subtransaction and cannot raise it); they can SET LOCAL other settings.
 */
void
me_worker_session_settings(void)
{
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_read_only", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_isolation", "read committed", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_deferrable", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("lock_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
	/* would turn the errors caught on purpose (a failing listener) into FATAL */
	SetConfigOption("exit_on_error", "off", PGC_SUSET, PGC_S_OVERRIDE);
#if PG_VERSION_NUM >= 170000
	/* the listener worker's transactions run listener_batch_time and more */
	SetConfigOption("transaction_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
#endif
}

/*
 * Connect a worker to the database of its argument, and bind it to the
 * database's slot when the extension is there.  Returns false (the worker
 * is to exit for good) when it is not: then the slot, if the database has
 * one, is marked retired.
 */
bool
me_worker_connect(Datum main_arg)
{
	bool		present;

	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(main_arg), InvalidOid, 0);
	me_worker_session_settings();

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	present = me_extension_present();
	if (present)
	{
		(void) me_shmem_bind(true);
		me_slot_set_retired(false);
	}
	else if (me_shmem_bind(false))
		me_slot_set_retired(true);
	me_database_name_init();
	db_name = get_database_name(MyDatabaseId);
	if (db_name)
		db_name = MemoryContextStrdup(TopMemoryContext, db_name);
	CommitTransactionCommand();
	return present;
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
	me_worker_release();
}

/*
 * Entry point of the worker.
 */
void
mqtt_emit_worker_main(Datum main_arg)
{
	uint64		head;
	pid_t		other;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, worker_sigterm);
	BackgroundWorkerUnblockSignals();

	if (!me_worker_connect(main_arg))
		proc_exit(0);
	pgstat_report_appname("pg_mqtt_emit");

	if (!me_worker_claim(MyLatch, &head, &other))
	{
		ereport(LOG,
				(errmsg("pg_mqtt_emit worker already running with PID %d", (int) other)));
		proc_exit(0);
	}
	before_shmem_exit(worker_detach, (Datum) 0);

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "pg_mqtt_emit worker loop",
									 ALLOCSET_DEFAULT_SIZES);
	me_inflight_init(head);
	me_relay_init(head);
	/* before the subscriber exists: what it receives goes there first */
	me_spool_open();
	me_relay_report_lost();
	me_client_init();

	ereport(LOG,
			(errmsg("pg_mqtt_emit worker started"),
			 errdetail("Broker \"%s\", client id \"%s\", database \"%s\".",
					   mqtt_emit_broker_url, me_client_id(), get_db_name())));

	while (!got_sigterm && !postmaster_gone && !retire)
	{
		long		timeout = 1000;
		bool		more;
		int			new_entries;
		uint64		tail;
		TimestampTz now;

		MemoryContextSwitchTo(loop_cxt);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
			reload_settings();
		me_worker_refresh_registry();

		now = GetCurrentTimestamp();
		me_client_service(ME_CLIENT_PUBLISHER, now, &timeout);
		me_inflight_take_news();
		me_inflight_flush_refused(me_relay_ready());
		/* the subscriber is there from the start, with or without filters */
		me_client_service(ME_CLIENT_SUBSCRIBER, now, &timeout);
		me_inbound_take_news();
		me_inbound_retry(now, &timeout);

		more = me_relay_step(&tail, &new_entries, &timeout);
		me_relay_note_fill(false);
		if (me_client_broker(ME_CLIENT_PUBLISHER))
			me_broker_nudge_timeout(me_client_broker(ME_CLIENT_PUBLISHER), &timeout);

		MemoryContextReset(loop_cxt);
		if (got_sigterm)
			break;
		wait_for_work(more, new_entries, tail, timeout);
	}

	if (postmaster_gone)
	{
		keep_received();
		proc_exit(1);
	}
	shut_down();
	if (retire)
	{
		ereport(LOG,
				(errmsg("pg_mqtt_emit worker: the extension is gone from database \"%s\"; exiting",
						get_db_name())));
		proc_exit(0);
	}

	/*
	 * Exit code 1: the postmaster starts the worker again unless the server
	 * is shutting down, so that pg_terminate_backend() does not stop
	 * publishing for good.
	 */
	proc_exit(1);
}

/*
 * SIGHUP: re-read the settings; new clients when a broker setting changed,
 * and subscribe again in any case (the prefix may have changed).
 */
static void
reload_settings(void)
{
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	if (me_client_settings_changed())
	{
		me_client_restart();
		me_inflight_forget(false);
	}
	listeners_version = 0;
}

/*
 * The listener registry changed: reload it and follow subscriptions.
 * While the extension seems absent, look again now and then (it tells us
 * when it is created, but a restore may not).
 */
void
me_worker_refresh_registry(void)
{
	uint32		version = me_listeners_version();
	MeRegistryLoad r;
	bool		periodic = false;

	if (GetCurrentTimestamp() - last_extension_check > 5 * USECS_PER_SEC)
	{
		/* DROP EXTENSION tells us; DROP SCHEMA ... CASCADE may not */
		if (me_relay_ready())
		{
			me_worker_begin_tx("checking the extension");
			if (!me_extension_present())
				listeners_version = 0;
			me_worker_end_tx();
			last_extension_check = GetCurrentTimestamp();
		}
		else
		{
			listeners_version = 0;
			periodic = true;
		}
	}
	if (version == listeners_version)
		return;
	me_worker_begin_tx("loading listeners");
	r = me_listeners_refresh();
	if (r == ME_REGISTRY_ABSENT && !me_extension_present())
	{
		/* DROP EXTENSION: exit for good, the launcher gives the slot back */
		me_slot_set_retired(true);
		retire = true;
	}
	/* not readable now (a lock, say): keep going, try again later */
	if (r != ME_REGISTRY_KEPT)
		me_relay_extension_changed(r == ME_REGISTRY_LOADED);
	/* the handlers' filters too (handlers.c); not readable now: again later */
	if (r == ME_REGISTRY_LOADED && me_handlers_refresh() == ME_REGISTRY_KEPT)
		r = ME_REGISTRY_KEPT;
	last_extension_check = GetCurrentTimestamp();

	/*
	 * Told of a change but no extension: look again in 200 ms.  The
	 * signal comes from CREATE EXTENSION's commit callback, which runs
	 * before the committing backend sends its catalog invalidations, so
	 * this process's catalog cache can still say "no such schema" (seen
	 * in about one node of eight in CI, each of which then found the
	 * extension only at the 5 s check).
	 */
	if (r == ME_REGISTRY_ABSENT && !periodic)
		last_extension_check -= 5 * USECS_PER_SEC - 200 * 1000;
	me_worker_end_tx();
	me_relay_committed();
	if (r == ME_REGISTRY_KEPT)
		return;
	listeners_version = version;
	me_inbound_sync(false);
}

/*
 * Sleep until there is work, unless there is more to do at once.
 *
 * Commits are coming faster than we take them (this round found more than
 * one new queue entry): nap for batch_delay rather than sleep on the latch.
 * While worker_napping is set, committing backends do not signal us, and
 * the next round takes together whatever arrived meanwhile (and its
 * acknowledgements).  A quieter round ends the naps: clear the flag, then
 * read the tail once more (a backend that saw the flag set has advanced
 * the tail before it looked), and sleep until signalled.  At a few commits
 * per millisecond or less, every commit still wakes us at once.  A nap
 * ends early when the latch is set (an acknowledgement, a signal).
 */
static void
wait_for_work(bool more, int new_entries, uint64 tail, long timeout)
{
	if (more)
		return;
	if (new_entries > 1 && mqtt_emit_batch_delay > 0)
	{
		if (!napping)
		{
			me_worker_set_napping(true);
			napping = true;
		}

		/*
		 * The nap waits on the latch, so that signals and acknowledgements
		 * (which set it; committing backends do not while we nap) end it
		 * early; WaitLatch counts whole milliseconds.
		 */
		if (WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_POSTMASTER_DEATH,
					  Min((long) ceil(mqtt_emit_batch_delay), timeout),
					  PG_WAIT_EXTENSION) & WL_POSTMASTER_DEATH)
			postmaster_gone = true;
		ResetLatch(MyLatch);
		return;
	}
	if (napping)
	{
		me_worker_set_napping(false);
		napping = false;
		if (me_queue_tail() != tail)
			return;
	}
	if (WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_POSTMASTER_DEATH,
				  timeout, PG_WAIT_EXTENSION) & WL_POSTMASTER_DEATH)
		postmaster_gone = true;
	ResetLatch(MyLatch);
}

/*
 * The postmaster is gone (SIGKILL): keep what the subscriber received and
 * exit.  paho acknowledged those messages when they arrived, so the
 * broker's session no longer has them; stopping the subscriber first (a
 * disconnect without waiting for messages in flight, then waiting for the
 * socket to close) ends the acknowledgements, and one more transaction
 * stores what is in the mailbox, with its WAL flushed.  A new postmaster
 * cannot start while this process still holds the shared memory, and
 * recovery replays that WAL.  Nothing is published any more: the queue and
 * the outbox are left as they are.
 */
static void
keep_received(void)
{
	ereport(LOG,
			(errmsg("pg_mqtt_emit worker: the postmaster is gone; keeping what the subscriber received, then exiting")));
	if (me_client_broker(ME_CLIENT_SUBSCRIBER) != NULL)
	{
		me_broker_disconnect(me_client_broker(ME_CLIENT_SUBSCRIBER), 0);
		(void) me_client_wait_disconnected(ME_CLIENT_SUBSCRIBER, 1000);
		if (me_relay_ready())
			me_inbound_take_news();
	}
	me_client_destroy_all();
}

/*
 * SIGTERM: wait a little (at most a second) for acknowledgements of
 * messages already sent, so that fewer are sent again after the restart;
 * keep the rest of the queue in the outbox; disconnect.
 */
static void
shut_down(void)
{
	int			i;

	for (i = 0; i < 20 && me_inflight_count() > 0; i++)
	{
		if (!me_client_connected(ME_CLIENT_PUBLISHER))
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 50, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		me_inflight_take_news();
	}
	me_relay_release_done();
	if (me_outbox_rows_done(NULL) > 0 && me_relay_ready())
		me_relay_delete_done();
	me_relay_keep_queue_at_exit();
	me_relay_note_fill(true);
	me_client_disconnect_all();

	/*
	 * paho acknowledged what the subscriber received before it disconnected:
	 * keep it, or the broker's session would not have it either.  Once the
	 * socket is closed nothing more comes.
	 */
	(void) me_client_wait_disconnected(ME_CLIENT_SUBSCRIBER, 1000);
	if (me_relay_ready())
		me_inbound_take_news();
	me_client_destroy_all();
	me_inflight_forget(false);
	ereport(LOG, (errmsg("pg_mqtt_emit worker shutting down")));
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
void
me_worker_commit_async(void)
{
	(void) set_config_option("synchronous_commit", "off", PGC_SUSET,
							 PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
}

void
me_worker_begin_tx(const char *what)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, what);
}

void
me_worker_end_tx(void)
{
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(loop_cxt);
}

/* The worker's database name, known since me_worker_connect. */
static const char *
get_db_name(void)
{
	return db_name ? db_name : "?";
}
