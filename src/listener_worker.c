/*-------------------------------------------------------------------------
 *
 * listener_worker.c
 *		The listener worker: the process that runs listener code.
 *
 * The worker that owns the MQTT clients (worker.c) runs no user code.  It
 * hands this process two kinds of rows:
 *
 *	- local events, as rows of mqtt_emit.outbox with ME_FLAG_LOCAL: rows
 *	  the worker writes for queued events that some local listener wants,
 *	  and rows that committing backends wrote themselves (durable mode, a
 *	  full queue)
 *	- received messages, as outbox rows of kind ME_KIND_REMOTE (ME_FLAG_LOCAL
 *	  only; the model column holds the topic, after the path it came
 *	  through when that was a share group, see topic.c)
 *	- received messages for handlers (mqtt_emit.subscribe), as outbox rows
 *	  of kind ME_KIND_MESSAGE (handlers.c), the same way
 *
 * and this process runs their listeners, oldest first, and marks each row
 * done in the same transaction as the listeners' effects: a row's
 * listeners take effect once, also across a crash of either process.
 * Several rows share a transaction, which commits after
 * mqtt_emit.listener_batch_time or before the subtransactions of its
 * listener calls could overflow the subtransaction cache.
 *
 * Each row is handled in a subtransaction of its own (each listener call
 * in one more, see listeners.c): a listener that raises is logged and
 * counted and the others run, as before; an error outside the listener
 * calls (a payload that is valid json but not jsonb, a table dropped
 * meanwhile, anything else about this one event) rolls back that row's
 * work only.  The row is tried again, up to ME_ATTEMPTS times with a pause
 * between, then moved to mqtt_emit.dead_letters with the error, and the
 * rows behind it go on.  The attempts are counted in shared memory before
 * each one starts, so an event that makes this process exit (a listener
 * that ignores the cancel of mqtt_emit.listener_timeout is ended a second
 * later; pg_terminate_backend ends it at once) is not retried forever
 * either.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/listener_worker.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
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
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "handlers.h"
#include "listeners.h"
#include "outbox.h"
#include "topic.h"

#define ME_ATTEMPTS			3	/* tries of one event before it is a dead letter */
#define ROWS_PER_ROUND		100
#define MAX_SUBXACTS		48	/* stay clear of PGPROC_MAX_CACHED_SUBXIDS */


typedef enum
{
	ROW_DONE,					/* handled, or given up on */
	ROW_RETRY					/* failed; try again later */
} RowOutcome;

static bool extension_ready = false;
static uint32 listeners_version = 0;
static bool registry_kept = false;	/* the last load could not read it */
static TimestampTz last_extension_check = 0;
static TimestampTz retry_at = 0;	/* a failed row waits until then */
static StringInfoData topicbuf;
static MemoryContext round_cxt = NULL;	/* a round's rows, across its commits */
static int	row_attempt = 0;	/* attempts at the current row before this one */

static void listener_detach(int code, Datum arg);
static void hard_timeout_handler(void);
static bool run_round(void);

static void
listener_detach(int code, Datum arg)
{
	me_listener_release();
}

/*
 * A listener still runs a second after its statement timeout cancelled it
 * (it caught the cancel): end the process, which no exception handler can
 * catch.  The postmaster starts it again.
 */
static void
hard_timeout_handler(void)
{
	ProcDiePending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
}

void
mqtt_emit_listener_main(Datum main_arg)
{
	pid_t		other;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);		/* ends listener code wherever it is */
	BackgroundWorkerUnblockSignals();

	/* the launcher starts it for one database (launcher.c) */
	if (!me_worker_connect(main_arg))
		proc_exit(0);
	pgstat_report_appname("pg_mqtt_emit listeners");

	if (!me_listener_claim(MyLatch, &other))
	{
		ereport(LOG,
				(errmsg("pg_mqtt_emit listener worker already running with PID %d",
						(int) other)));
		proc_exit(0);
	}
	before_shmem_exit(listener_detach, (Datum) 0);
	me_listeners_set_hard_timeout((int) RegisterTimeout(USER_TIMEOUT,
														hard_timeout_handler));
	me_handlers_set_hard_timeout((int) RegisterTimeout(USER_TIMEOUT,
													   hard_timeout_handler));
	me_listeners_report_skips();
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		initStringInfo(&topicbuf);
		MemoryContextSwitchTo(old);
	}

	for (;;)
	{
		long		timeout = 1000;
		uint32		version;
		TimestampTz now;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		version = me_listeners_version();
		now = GetCurrentTimestamp();
		if (now - last_extension_check > 5 * USECS_PER_SEC)
		{
			/* reload while it seems absent; else only look whether it is */
			if (extension_ready)
			{
				StartTransactionCommand();
				if (!me_extension_present())
					listeners_version = 0;
				CommitTransactionCommand();
				last_extension_check = now;
			}
			else
				listeners_version = 0;
		}
		if (version != listeners_version)
		{
			MeRegistryLoad r;

			SetCurrentStatementStartTimestamp();
			StartTransactionCommand();
			PushActiveSnapshot(GetTransactionSnapshot());
			r = me_listeners_refresh();
			if (r == ME_REGISTRY_ABSENT && !me_extension_present())
			{
				/* DROP EXTENSION: exit for good (launcher.c) */
				PopActiveSnapshot();
				CommitTransactionCommand();
				me_slot_set_retired(true);
				ereport(LOG,
						(errmsg("pg_mqtt_emit listener worker: the extension is gone; exiting")));
				proc_exit(0);
			}
			/* the handlers too; not readable now: try both again */
			if (r == ME_REGISTRY_LOADED && me_handlers_refresh() == ME_REGISTRY_KEPT)
				r = ME_REGISTRY_KEPT;
			PopActiveSnapshot();
			CommitTransactionCommand();
			last_extension_check = now;
			registry_kept = (r == ME_REGISTRY_KEPT);
			/* not readable now: the old copy stays, try again next round */
			if (r != ME_REGISTRY_KEPT)
			{
				if (extension_ready != (r == ME_REGISTRY_LOADED))
					me_remote_forget_table();
				extension_ready = (r == ME_REGISTRY_LOADED);
				listeners_version = version;
			}
		}

		if (extension_ready && now >= retry_at && run_round())
			continue;
		if (retry_at > now)
			timeout = Min(timeout, (long) ((retry_at - now) / 1000) + 1);

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* the listeners of one outbox row: a local event or a received message */
static void
handle_local(void *arg)
{
	const MeOutboxRow *row = (const MeOutboxRow *) arg;

	/* what the listeners capture is one level deeper (see pending.c) */
	me_capture_set_depth(row->hdr.depth + 1);
	if (row->hdr.kind == ME_KIND_REMOTE)
	{
		MeRemoteMessage msg;
		MeInboxPath path;

		/* the path it came through, in front of the topic (topic.c) */
		me_inbox_split(row->model, row->hdr.model_len, &path);
		msg.topic = path.filter ? pnstrdup(path.topic, path.topic_len) : path.topic;
		msg.topic_len = path.topic_len;
		msg.payload = row->payload;
		msg.payload_len = row->hdr.payload_len;
		msg.share_group = path.group;
		me_listeners_handle_remote(&msg);
		return;
	}
	if (row->hdr.kind == ME_KIND_MESSAGE)
	{
		MeInboxPath path;

		me_inbox_split(row->model, row->hdr.model_len, &path);
		me_handlers_run(pnstrdup(path.topic, path.topic_len), path.topic_len,
						row->payload, row->hdr.payload_len, row->created_at,
						row_attempt, ME_ATTEMPTS, path.group, path.group_filter);
		return;
	}
	if (row->hdr.kind != ME_KIND_ROW ||
		!me_listeners_want_local(row->model, row->hdr.model_len))
		return;
	me_build_topic(&topicbuf, &row->hdr, row->model, false);
	me_listeners_run_local(&row->hdr, row->model, row->payload, topicbuf.data);
}

/*
 * Handle one row in a subtransaction.  On an error the row's work is
 * rolled back; after ME_ATTEMPTS the row goes to the dead letters
 * (give_up), else it is to be tried again.
 */
static RowOutcome
handle_row(int64 id, void (*handle) (void *), void *arg,
		   void (*give_up) (const void *arg, const char *reason))
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	int			before = me_attempt_begin(1, id);
	RowOutcome	outcome = ROW_DONE;

	if (before >= ME_ATTEMPTS)
	{
		/* the earlier attempts ended this process */
		give_up(arg, "the listener worker exited while handling this event, each time it tried");
		me_attempt_end();
		return ROW_DONE;
	}

	row_attempt = before;
	me_remote_dedup_begin();
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		handle(arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		me_remote_dedup_rollback();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;

		if (before + 1 >= ME_ATTEMPTS)
		{
			char		reason[1024];

			snprintf(reason, sizeof(reason), "%s (SQLSTATE %s, after %d attempts)",
					 edata->message, unpack_sql_state(edata->sqlerrcode), ME_ATTEMPTS);
			give_up(arg, reason);
		}
		else
		{
			ereport(LOG,
					(errmsg("pg_mqtt_emit could not hand outbox row " INT64_FORMAT " to its listeners: %s",
							id, edata->message),
					 errdetail("Attempt %d of %d; it is tried again in %d s.",
							   before + 1, ME_ATTEMPTS, before + 1)));
			me_set_last_error("listener worker: %s", edata->message);
			outcome = ROW_RETRY;
			retry_at = GetCurrentTimestamp() + (TimestampTz) (before + 1) * USECS_PER_SEC;
		}
		FreeErrorData(edata);
	}
	PG_END_TRY();
	me_capture_set_depth(0);
	if (outcome == ROW_DONE)
		me_attempt_end();
	return outcome;
}

static void
give_up_local(const void *arg, const char *reason)
{
	const MeOutboxRow *row = (const MeOutboxRow *) arg;

	if (row->hdr.kind == ME_KIND_REMOTE)
	{
		/* the dead letter holds the topic, not the path it came through */
		MeOutboxRow copy = *row;
		MeInboxPath path;

		me_inbox_split(row->model, row->hdr.model_len, &path);
		copy.model = pnstrdup(path.topic, path.topic_len);
		copy.hdr.model_len = path.topic_len;
		me_outbox_local_failed(&copy, reason);
		return;
	}
	if (row->hdr.kind == ME_KIND_MESSAGE)
	{
		/* the dead letter holds the payload's bytes, not the properties */
		MeInboxPath path;
		char	   *topic;

		me_inbox_split(row->model, row->hdr.model_len, &path);
		topic = pnstrdup(path.topic, path.topic_len);

		me_outbox_message_dead_letter(topic, row->payload,
									  me_handlers_payload_end(row->payload, row->hdr.payload_len),
									  reason, row->created_at);
		me_outbox_local_done(&row->id, 1);
		return;
	}
	me_outbox_local_failed(row, reason);
}


/*
 * Is it time to commit?  After listener_batch_time, or before the
 * subtransactions (one per row, one per listener call) could overflow
 * the cache of subtransaction ids that every snapshot reads.
 */
static bool
batch_full(TimestampTz start, int rows, uint64 calls_before)
{
	return rows + (int) (me_listeners_calls_made() + me_handlers_calls_made() - calls_before) >= MAX_SUBXACTS ||
		GetCurrentTimestamp() - start >= (TimestampTz) mqtt_emit_listener_batch_time * 1000;
}

/*
 * One round: up to ROWS_PER_ROUND rows, in transactions that commit when
 * batch_full() says.  Returns true when there may be more to do right
 * away.
 */
static bool
run_round(void)
{
	TimestampTz start;
	uint64		calls_before;
	MeOutboxRow *rows;
	int64	   *done;
	int			ndone = 0;
	int			n;
	int			i;
	int			in_tx_rows = 0;
	bool		stopped = false;

	if (round_cxt == NULL)
		round_cxt = AllocSetContextCreate(TopMemoryContext, "pg_mqtt_emit listener round",
										  ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(round_cxt);

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(round_cxt);
	pgstat_report_activity(STATE_RUNNING, "running listeners");
	n = me_outbox_local_rows(ROWS_PER_ROUND, &rows);
	me_remote_prune();

	/*
	 * A listener registered after the registry was loaded may be due for
	 * these rows (the worker wrote them for it): load it first.
	 */
	if (me_listeners_version() != listeners_version && !registry_kept)
	{
		PopActiveSnapshot();
		CommitTransactionCommand();
		MemoryContextSwitchTo(TopMemoryContext);
		pgstat_report_activity(STATE_IDLE, NULL);
		return true;
	}
	done = palloc(sizeof(int64) * Max(n, 1));
	start = GetCurrentTimestamp();
	calls_before = me_listeners_calls_made() + me_handlers_calls_made();
	for (i = 0; i < n && !stopped; i++)
	{
		/* each row sees what the rows before it did */
		if (in_tx_rows > 0)
		{
			PopActiveSnapshot();
			PushActiveSnapshot(GetTransactionSnapshot());
		}
		if (handle_row(rows[i].id, handle_local, &rows[i], give_up_local) == ROW_RETRY)
			stopped = true;
		else
			done[ndone++] = rows[i].id;
		in_tx_rows++;
		if (!stopped && i + 1 < n && batch_full(start, in_tx_rows, calls_before))
		{
			/* commit what is done, go on in a new transaction */
			me_outbox_local_done(done, ndone);
			ndone = 0;
			PopActiveSnapshot();
			CommitTransactionCommand();
			SetCurrentStatementStartTimestamp();
			StartTransactionCommand();
			PushActiveSnapshot(GetTransactionSnapshot());
			MemoryContextSwitchTo(round_cxt);
			start = GetCurrentTimestamp();
			calls_before = me_listeners_calls_made() + me_handlers_calls_made();
			in_tx_rows = 0;
		}
	}
	me_outbox_local_done(done, ndone);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(TopMemoryContext);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);

	if (retry_at > GetCurrentTimestamp())
		return false;
	return n == ROWS_PER_ROUND;
}
