/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		The launcher: one set of workers per database that has the
 *		extension.
 *
 * The extension can be created in any number of databases of a server (up
 * to mqtt_emit.max_databases).  Each such database has a publisher worker
 * (worker.c) and a listener worker (listener_worker.c), and a share of
 * shared memory of its own (a slot, shmem.c).  The launcher, a static
 * background worker connected to no database (it reads pg_database only),
 * starts them as dynamic background workers and starts them again a second
 * after they exit, as the postmaster did for the single worker before.
 *
 * How it learns which databases have the extension:
 *	- at its start (server start, crash restart) it runs a short-lived
 *	  probe (mqtt_emit_probe_main) in every database that allows
 *	  connections and is not a template, one at a time; a probe that finds
 *	  the extension claims the database's slot and exits, and the launcher
 *	  starts the workers of every claimed slot;
 *	- CREATE EXTENSION claims the slot itself (mqtt_emit._install_check)
 *	  and, at commit, asks for a probe and sets the launcher's latch, so the
 *	  workers start at once;
 *	- CREATE DATABASE asks for a probe of the new database (its template
 *	  may have had the extension).
 * A worker that finds the extension gone (DROP EXTENSION, which tells it at
 * commit) marks its slot retired and exits for good; the launcher stops
 * the other worker and runs a probe, which gives the slot back when the
 * extension is still absent.  The slot of a database that no longer
 * exists, or became a template or closed to connections, is given back by
 * the launcher (templates get no workers: CREATE DATABASE refuses a
 * template that has other sessions).
 *
 * Commands that need a database without other sessions (DROP DATABASE,
 * ALTER DATABASE RENAME and SET TABLESPACE, CREATE DATABASE from it as a
 * template) must not be blocked by our workers: the ProcessUtility hook
 * below, which every backend has since the library is preloaded, pauses
 * the database first: the launcher stops its workers (and a probe in it)
 * and starts none there until the command is over, and the hook waits
 * (at most ME_PAUSE_WAIT_MS) until they are gone.
 *
 * Locking: mutex (a spinlock) protects every field of MeLauncherShared;
 * it is held only to copy or change a few fields, never across a call.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/launcher.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <signal.h>
#include <sys/stat.h>

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "tcop/utility.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "compat.h"

#define ME_MAX_REQUESTS		32	/* probes asked for; more: probe all */
#define ME_MAX_PAUSED		16	/* databases paused at once */
#define ME_PAUSE_WAIT_MS	10000	/* how long a command waits for our workers */
#define ME_RESTART_MS		1000	/* a worker that stopped starts again after */

/* The launcher's shared state.  Lock: mutex, see the file header. */
typedef struct MeLauncherShared
{
	slock_t		mutex;
	pid_t		pid;			/* the launcher, 0 when none runs */
	Latch	   *latch;
	bool		probe_all;		/* probe every database */
	int			nrequests;
	Oid			requests[ME_MAX_REQUESTS];	/* databases to probe */
	int			npaused;
	struct
	{
		Oid			dboid;
		int			refs;		/* commands that paused it */
		bool		idle;		/* the launcher saw none of ours there */
	}			paused[ME_MAX_PAUSED];
} MeLauncherShared;

static MeLauncherShared *me_launcher = NULL;

/* the launcher's own view of what it started, per slot (launcher only) */
typedef struct SlotProcs
{
	Oid			dboid;			/* the database these belong to */
	BackgroundWorkerHandle *handle[2];	/* publisher, listener worker */
	TimestampTz started[2];
	bool		warned[2];		/* no background worker slot: said so */
	TimestampTz probed;			/* retired: when a probe was started */
} SlotProcs;

static const char *const kind_function[2] = {"mqtt_emit_worker_main", "mqtt_emit_listener_main"};
static const char *const kind_name[2] = {"pg_mqtt_emit worker", "pg_mqtt_emit listener worker"};
static const char *const kind_type[2] = {"pg_mqtt_emit", "pg_mqtt_emit listeners"};

static ProcessUtility_hook_type prev_process_utility_hook = NULL;

/*
 * What this backend's transaction is to tell the launcher when it ends:
 * databases to probe (at commit) and databases it paused (at commit or
 * abort).  Commands that pause cannot run in a transaction block, so there
 * are few.
 */
#define ME_XACT_MAX			8
static Oid	xact_probe[ME_XACT_MAX];
static int	n_xact_probe = 0;
static Oid	xact_paused[ME_XACT_MAX];
static int	n_xact_paused = 0;

static void launcher_detach(int code, Datum arg);
static void launcher_xact_callback(XactEvent event, void *arg);

Size
me_launcher_shmem_size(void)
{
	return MAXALIGN(sizeof(MeLauncherShared));
}

/* At shared memory startup, with AddinShmemInitLock held. */
void
me_launcher_shmem_startup(void)
{
	bool		found;

	me_launcher = (MeLauncherShared *) ShmemInitStruct("pg_mqtt_emit launcher",
													   sizeof(MeLauncherShared), &found);
	if (!found)
	{
		memset(me_launcher, 0, sizeof(MeLauncherShared));
		SpinLockInit(&me_launcher->mutex);
	}
}

/*
 * Register the launcher; from _PG_init during preload.  Restarted a second
 * after it fails; its workers run on meanwhile (the new launcher finds them
 * through their slots).
 */
void
me_launcher_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	strlcpy(worker.bgw_library_name, "pg_mqtt_emit", sizeof(worker.bgw_library_name));
	strlcpy(worker.bgw_function_name, "mqtt_emit_launcher_main", sizeof(worker.bgw_function_name));
	strlcpy(worker.bgw_name, "pg_mqtt_emit launcher", sizeof(worker.bgw_name));
	strlcpy(worker.bgw_type, "pg_mqtt_emit launcher", sizeof(worker.bgw_type));
	RegisterBackgroundWorker(&worker);
}

/* Wake the launcher, if it runs.  Must not fail (commit callbacks call it). */
static void
wake_launcher(void)
{
	Latch	   *latch;

	if (me_launcher == NULL)
		return;
	SpinLockAcquire(&me_launcher->mutex);
	latch = me_launcher->latch;
	SpinLockRelease(&me_launcher->mutex);
	if (latch)
		SetLatch(latch);
}

/*
 * Ask the launcher to probe database dboid (does it have the extension?)
 * and wake it.  Must not fail.
 */
void
me_launcher_request_probe(Oid dboid)
{
	int			i;

	if (me_launcher == NULL)
		return;
	SpinLockAcquire(&me_launcher->mutex);
	for (i = 0; i < me_launcher->nrequests; i++)
		if (me_launcher->requests[i] == dboid)
			break;
	if (i == me_launcher->nrequests)
	{
		if (me_launcher->nrequests < ME_MAX_REQUESTS)
			me_launcher->requests[me_launcher->nrequests++] = dboid;
		else
			me_launcher->probe_all = true;
	}
	SpinLockRelease(&me_launcher->mutex);
	wake_launcher();
}

/*
 * CREATE EXTENSION: the workers of this database are to start when the
 * transaction commits.
 */
void
me_launcher_start_workers(Oid dboid)
{
	int			i;

	for (i = 0; i < n_xact_probe; i++)
		if (xact_probe[i] == dboid)
			return;
	if (n_xact_probe < ME_XACT_MAX)
		xact_probe[n_xact_probe++] = dboid;
}

static void
launcher_xact_callback(XactEvent event, void *arg)
{
	int			i;

	switch (event)
	{
		case XACT_EVENT_COMMIT:
			for (i = 0; i < n_xact_probe; i++)
				me_launcher_request_probe(xact_probe[i]);
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			for (i = 0; i < n_xact_paused; i++)
				me_launcher_resume(xact_paused[i]);
			n_xact_paused = 0;
			n_xact_probe = 0;
			break;
		default:
			break;
	}
}

/* Is the extension in this process's database?  In a transaction. */
bool
me_extension_present(void)
{
	return OidIsValid(get_extension_oid(MQTT_EMIT_EXTENSION, true));
}

/*
 * Pause database dboid: the launcher stops our processes there and starts
 * none until me_launcher_resume.  Waits (at most ME_PAUSE_WAIT_MS) until
 * the launcher saw them gone; afterwards the command itself waits a little
 * more for sessions that are ending, as it does for any other session.
 */
bool
me_launcher_pause(Oid dboid)
{
	int			i;
	int			waited;
	bool		added = false;

	SpinLockAcquire(&me_launcher->mutex);
	for (i = 0; i < me_launcher->npaused; i++)
		if (me_launcher->paused[i].dboid == dboid)
			break;
	if (i < me_launcher->npaused)
	{
		me_launcher->paused[i].refs++;
		added = true;
	}
	else if (i < ME_MAX_PAUSED)
	{
		me_launcher->paused[i].dboid = dboid;
		me_launcher->paused[i].refs = 1;
		me_launcher->paused[i].idle = false;
		me_launcher->npaused++;
		added = true;
	}
	SpinLockRelease(&me_launcher->mutex);
	if (!added)
		return false;
	wake_launcher();

	for (waited = 0; waited < ME_PAUSE_WAIT_MS; waited += 10)
	{
		bool		idle = false;
		pid_t		launcher_pid;

		SpinLockAcquire(&me_launcher->mutex);
		launcher_pid = me_launcher->pid;
		for (i = 0; i < me_launcher->npaused; i++)
			if (me_launcher->paused[i].dboid == dboid)
				idle = me_launcher->paused[i].idle;
		SpinLockRelease(&me_launcher->mutex);
		if (idle)
			break;
		if (launcher_pid == 0)
		{
			/* no launcher to ask: stop what the slot says runs there */
			int			slot = me_slot_of(dboid);
			Oid			db;
			pid_t		w,
						l;
			bool		retired;

			if (slot < 0)
				break;
			me_slot_info(slot, &db, &w, &l, &retired);
			if (w == 0 && l == 0)
				break;
			if (w != 0)
				(void) kill(w, SIGTERM);
			if (l != 0)
				(void) kill(l, SIGTERM);
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	return true;
}

/*
 * The transaction of the command that paused dboid is over (committed or
 * not): the launcher looks at the database again (gives its slot back if
 * it is gone).  Must not fail: it runs in the transaction callback.
 */
void
me_launcher_resume(Oid dboid)
{
	int			i;
	bool		found = false;

	SpinLockAcquire(&me_launcher->mutex);
	for (i = 0; i < me_launcher->npaused; i++)
	{
		if (me_launcher->paused[i].dboid == dboid)
		{
			found = true;
			if (--me_launcher->paused[i].refs <= 0)
			{
				me_launcher->paused[i] = me_launcher->paused[me_launcher->npaused - 1];
				me_launcher->npaused--;
			}
			break;
		}
	}
	SpinLockRelease(&me_launcher->mutex);
	if (found)
		me_launcher_request_probe(dboid);
}

/* ------------------------------------------------------------------------
 * The launcher process
 * ------------------------------------------------------------------------
 */

typedef struct DbInfo
{
	Oid			oid;
	bool		probe;			/* connectable and not a template */
} DbInfo;

/* Every database of pg_database (a shared catalog: no connection needed). */
static DbInfo *
load_databases(int *n)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	DbInfo	   *dbs;
	int			max = 16;

	*n = 0;
	dbs = palloc(sizeof(DbInfo) * max);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (HeapTupleIsValid(tup = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (*n == max)
		{
			max *= 2;
			dbs = repalloc(dbs, sizeof(DbInfo) * max);
		}
		dbs[*n].oid = db->oid;
		/* a template would refuse CREATE DATABASE while our workers are in it */
		dbs[*n].probe = db->datallowconn && !db->datistemplate &&
			db->datconnlimit != -2;	/* DATCONNLIMIT_INVALID_DB (PG 16.1+) */
		(*n)++;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return dbs;
}

static bool
db_exists(DbInfo *dbs, int n, Oid oid, bool *probe)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		if (dbs[i].oid == oid)
		{
			if (probe)
				*probe = dbs[i].probe;
			return true;
		}
	}
	return false;
}

/*
 * Remove $PGDATA/pg_mqtt_emit/db<OID> of every database that no longer
 * exists and holds no slot: the spool of messages received for it and its
 * queue fill, which nothing reads any more (a database created later with
 * the same OID would read a stale spool).  The files of mqtt_emit.database
 * are in pg_mqtt_emit itself and are never removed.  A directory is made
 * only by a database's workers, which need its slot, so one that is being
 * made is not taken for a dropped database's.
 */
static void
remove_dropped_dirs(DbInfo *dbs, int ndbs)
{
	DIR		   *dir;
	struct dirent *de;

	dir = AllocateDir("pg_mqtt_emit");
	if (dir == NULL)
		return;					/* none yet */
	while ((de = ReadDirExtended(dir, "pg_mqtt_emit", LOG)) != NULL)
	{
		char		path[MAXPGPATH];
		char	   *end;
		unsigned long oid;
		struct stat st;

		if (strncmp(de->d_name, "db", 2) != 0 || !isdigit((unsigned char) de->d_name[2]))
			continue;
		errno = 0;
		oid = strtoul(de->d_name + 2, &end, 10);
		if (errno != 0 || *end != '\0' || oid == 0 || oid > PG_UINT32_MAX)
			continue;
		if (db_exists(dbs, ndbs, (Oid) oid, NULL) || me_slot_of((Oid) oid) >= 0)
			continue;
		snprintf(path, sizeof(path), "pg_mqtt_emit/%s", de->d_name);
		if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
			continue;
		if (rmtree(path, true))
			ereport(LOG,
					(errmsg("pg_mqtt_emit removed the files of dropped database %lu", oid),
					 errdetail("Directory \"%s\".", path)));
		else
			ereport(WARNING,
					(errmsg("pg_mqtt_emit could not remove the files of dropped database %lu", oid),
					 errdetail("Directory \"%s\".", path),
					 errhint("Remove the directory by hand; nothing reads it any more.")));
	}
	FreeDir(dir);
}

/* Is the worker of handle *h still there (starting or running)?  Forgets it if not. */
static bool
handle_running(BackgroundWorkerHandle **h)
{
	pid_t		pid;
	BgwHandleStatus st;

	if (*h == NULL)
		return false;
	st = GetBackgroundWorkerPid(*h, &pid);
	if (st == BGWH_STARTED || st == BGWH_NOT_YET_STARTED)
		return true;
	pfree(*h);
	*h = NULL;
	return false;
}

static void
launcher_detach(int code, Datum arg)
{
	SpinLockAcquire(&me_launcher->mutex);
	if (me_launcher->pid == MyProcPid)
	{
		me_launcher->pid = 0;
		me_launcher->latch = NULL;
	}
	SpinLockRelease(&me_launcher->mutex);
}

/* Start the worker of kind k (0 publisher, 1 listener) for slot p's database. */
static void
start_worker(SlotProcs *p, int k, TimestampTz now)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	me_worker_start(p->dboid, kind_function[k], kind_name[k], kind_type[k], &p->handle[k]);
	MemoryContextSwitchTo(old);
	p->started[k] = now;
	if (p->handle[k] == NULL)
	{
		if (!p->warned[k])
			ereport(WARNING,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("pg_mqtt_emit cannot start the %s of database %u: no background worker slot is free",
							kind_name[k], p->dboid),
					 errdetail("pg_mqtt_emit needs 1 background worker for its launcher and 2 for each database with the extension."),
					 errhint("Raise \"max_worker_processes\" and restart the server.")));
		p->warned[k] = true;
	}
	else
		p->warned[k] = false;
}

void
mqtt_emit_launcher_main(Datum main_arg)
{
	int			nslots;
	SlotProcs  *procs;
	BackgroundWorkerHandle *probe = NULL;
	Oid			probe_db = InvalidOid;
	Oid		   *queue;
	int			nqueue = 0;
	int			maxqueue = 64;
	TimestampTz last_sweep = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	me_worker_session_settings();
	pgstat_report_appname("pg_mqtt_emit launcher");

	nslots = me_slot_count();
	procs = MemoryContextAllocZero(TopMemoryContext, sizeof(SlotProcs) * nslots);
	queue = MemoryContextAlloc(TopMemoryContext, sizeof(Oid) * maxqueue);

	SpinLockAcquire(&me_launcher->mutex);
	me_launcher->pid = MyProcPid;
	me_launcher->latch = MyLatch;
	me_launcher->probe_all = true;
	SpinLockRelease(&me_launcher->mutex);
	before_shmem_exit(launcher_detach, (Datum) 0);

	ereport(LOG,
			(errmsg("pg_mqtt_emit launcher started"),
			 errdetail("Up to %d databases (\"mqtt_emit.max_databases\").", nslots)));

	for (;;)
	{
		bool		probe_all;
		Oid			requests[ME_MAX_REQUESTS];
		int			nrequests;
		int			npaused;
		Oid			paused[ME_MAX_PAUSED];
		bool		idle[ME_MAX_PAUSED];
		DbInfo	   *dbs;
		int			ndbs;
		int			i,
					j,
					k;
		long		timeout = 1000;
		bool		freed = false;
		TimestampTz now;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		SpinLockAcquire(&me_launcher->mutex);
		probe_all = me_launcher->probe_all;
		me_launcher->probe_all = false;
		nrequests = me_launcher->nrequests;
		memcpy(requests, me_launcher->requests, sizeof(Oid) * nrequests);
		me_launcher->nrequests = 0;
		npaused = me_launcher->npaused;
		for (i = 0; i < npaused; i++)
			paused[i] = me_launcher->paused[i].dboid;
		SpinLockRelease(&me_launcher->mutex);

		dbs = load_databases(&ndbs);
		now = GetCurrentTimestamp();

		/* what is to be probed: all databases without a slot, or those asked for */
		for (i = 0; i < ndbs + nrequests; i++)
		{
			Oid			db;
			bool		probe_ok = false;

			if (i < ndbs)
			{
				if (!probe_all || !dbs[i].probe || me_slot_of(dbs[i].oid) >= 0)
					continue;
				db = dbs[i].oid;
			}
			else
			{
				db = requests[i - ndbs];
				if (!db_exists(dbs, ndbs, db, &probe_ok) || !probe_ok)
					continue;
			}
			for (j = 0; j < nqueue; j++)
				if (queue[j] == db)
					break;
			if (j < nqueue)
				continue;
			if (nqueue == maxqueue)
			{
				maxqueue *= 2;
				queue = repalloc(queue, sizeof(Oid) * maxqueue);
			}
			queue[nqueue++] = db;
		}

		for (i = 0; i < npaused; i++)
			idle[i] = true;

		/* each slot: its workers run, unless paused, retired or gone */
		for (i = 0; i < nslots; i++)
		{
			SlotProcs  *p = &procs[i];
			Oid			db;
			pid_t		pid[2];
			bool		retired;
			bool		running[2];
			bool		is_paused = false;
			bool		exists;
			bool		present;
			bool		eligible = false;
			int			pi = -1;

			me_slot_info(i, &db, &pid[0], &pid[1], &retired);
			if (p->dboid != db)
			{
				/* handles of a database whose slot was given back */
				for (k = 0; k < 2; k++)
					(void) handle_running(&p->handle[k]);
				if (p->handle[0] == NULL && p->handle[1] == NULL)
				{
					memset(p, 0, sizeof(*p));
					p->dboid = db;
				}
				else
					continue;
			}
			if (!OidIsValid(db))
				continue;
			for (k = 0; k < 2; k++)
				running[k] = handle_running(&p->handle[k]) || pid[k] != 0;
			for (j = 0; j < npaused; j++)
				if (paused[j] == db)
					pi = j;
			is_paused = (pi >= 0);

			/*
			 * A template or a database closed to connections gets no
			 * workers, but keeps its slot while it exists: sessions still
			 * connected there (ALTER DATABASE ... ALLOW_CONNECTIONS false
			 * leaves them) go on queueing into it, and a slot given back
			 * and claimed again would lose what they queued.  Their events
			 * wait, spill to the outbox when the queue is full, and are
			 * published when the database is open again.
			 */
			present = db_exists(dbs, ndbs, db, &eligible);
			exists = present && eligible;
			if (!exists || is_paused || retired)
			{
				/* stop what runs there */
				for (k = 0; k < 2; k++)
				{
					if (!running[k])
						continue;
					if (is_paused)
						idle[pi] = false;
					if (p->handle[k])
						TerminateBackgroundWorker(p->handle[k]);
					else if (pid[k] != 0)
						(void) kill(pid[k], SIGTERM);
				}
				if (running[0] || running[1] || is_paused)
					continue;
				if (!present)
				{
					if (me_slot_free(i, db))
						freed = true;
				}
				else if (!exists)
					;			/* closed or a template: keep the slot */
				else if (now - p->probed >= ME_RESTART_MS * 1000L)
				{
					/* retired: does the database still have the extension? */
					p->probed = now;
					for (j = 0; j < nqueue; j++)
						if (queue[j] == db)
							break;
					if (j == nqueue)
					{
						if (nqueue == maxqueue)
						{
							maxqueue *= 2;
							queue = repalloc(queue, sizeof(Oid) * maxqueue);
						}
						queue[nqueue++] = db;
					}
				}
				continue;
			}

			for (k = 0; k < 2; k++)
			{
				long		wait_ms;

				if (running[k])
					continue;
				wait_ms = ME_RESTART_MS - (long) ((now - p->started[k]) / 1000);
				if (p->started[k] == 0 || wait_ms <= 0)
					start_worker(p, k, now);
				else
					timeout = Min(timeout, wait_ms);
			}
		}

		/* one probe at a time; none in a paused database */
		if (probe != NULL && !handle_running(&probe))
			probe_db = InvalidOid;
		for (j = 0; j < npaused; j++)
		{
			if (probe != NULL && probe_db == paused[j])
			{
				idle[j] = false;
				TerminateBackgroundWorker(probe);
			}
		}
		while (probe == NULL && nqueue > 0)
		{
			Oid			db = queue[0];
			bool		skip = !db_exists(dbs, ndbs, db, NULL);

			for (j = 0; j < npaused; j++)
				if (paused[j] == db)
					skip = true;
			memmove(queue, queue + 1, sizeof(Oid) * (nqueue - 1));
			nqueue--;
			if (skip)
				continue;
			{
				MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

				me_worker_start(db, "mqtt_emit_probe_main", "pg_mqtt_emit probe",
								"pg_mqtt_emit probe", &probe);
				MemoryContextSwitchTo(old);
			}
			if (probe == NULL)
			{
				/* no background worker slot now: later */
				queue[nqueue++] = db;
				timeout = Min(timeout, ME_RESTART_MS);
				break;
			}
			probe_db = db;
		}

		/* tell the commands that paused a database whether ours are gone */
		SpinLockAcquire(&me_launcher->mutex);
		for (i = 0; i < me_launcher->npaused; i++)
			for (j = 0; j < npaused; j++)
				if (me_launcher->paused[i].dboid == paused[j])
					me_launcher->paused[i].idle = idle[j];
		SpinLockRelease(&me_launcher->mutex);
		for (j = 0; j < npaused; j++)
			if (!idle[j])
				timeout = Min(timeout, 10);

		/*
		 * The files of dropped databases: at start, when a slot was given
		 * back, and every 10 s (a database can be dropped after its
		 * extension, or while the server was down).
		 */
		if (freed || last_sweep == 0 || now - last_sweep >= 10 * USECS_PER_SEC)
		{
			remove_dropped_dirs(dbs, ndbs);
			last_sweep = now;
		}

		pfree(dbs);
		pgstat_report_stat(false);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * A probe: does the database of its argument have the extension?  If it
 * does, claim the database's slot (the launcher then starts its workers);
 * if not, give back a slot the database still holds (its workers found
 * the extension gone).  Then exit.
 */
void
mqtt_emit_probe_main(Datum main_arg)
{
	bool		present;

	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(main_arg), InvalidOid, 0);
	me_worker_session_settings();
	pgstat_report_appname("pg_mqtt_emit probe");

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	present = me_extension_present();
	if (present)
	{
		/* an error here (no free slot) is the log's news */
		(void) me_shmem_bind(true);
		me_slot_set_retired(false);
	}
	else
	{
		int			slot = me_slot_of(MyDatabaseId);

		if (slot >= 0)
			(void) me_slot_free(slot, MyDatabaseId);
	}
	CommitTransactionCommand();
	wake_launcher();
	proc_exit(0);
}

/* ------------------------------------------------------------------------
 * The ProcessUtility hook
 * ------------------------------------------------------------------------
 */

/* Does the statement list option name among its DefElems? */
static DefElem *
find_option(List *options, const char *name)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *d = (DefElem *) lfirst(lc);

		if (strcmp(d->defname, name) == 0)
			return d;
	}
	return NULL;
}

/*
 * Would PostgreSQL itself let the current role run a command that needs
 * database db to itself?  DROP, RENAME and SET TABLESPACE need its owner;
 * CREATE DATABASE ... TEMPLATE needs CREATEDB and a template that is one
 * (datistemplate) or is the role's own.  A role that would be refused
 * must not pause another database's workers by trying (the pause comes
 * before PostgreSQL's checks).
 */
static bool
may_pause(Oid db, bool as_template)
{
	Oid			role = GetUserId();

	if (superuser())
		return true;
	if (!as_template)
		return me_database_ownercheck(db, role);
	if (!have_createdb_privilege())
		return false;
	if (me_database_ownercheck(db, role))
		return true;
	{
		HeapTuple	tup = SearchSysCache1(DATABASEOID, ObjectIdGetDatum(db));
		bool		is_template = false;

		if (HeapTupleIsValid(tup))
		{
			is_template = ((Form_pg_database) GETSTRUCT(tup))->datistemplate;
			ReleaseSysCache(tup);
		}
		return is_template;
	}
}

/*
 * Commands that need a database without other sessions pause our workers
 * there while they run; DROP EXTENSION tells the workers at commit;
 * CREATE DATABASE has the new database probed.
 */
static void
me_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				   ProcessUtilityContext context, ParamListInfo params,
				   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;
	Oid			pause_db = InvalidOid;
	bool		as_template = false;
	const char *created = NULL;
	bool		drops_extension = false;

	if (me_shmem_ready() && me_launcher != NULL)
	{
		switch (nodeTag(parsetree))
		{
			case T_DropdbStmt:
				pause_db = get_database_oid(((DropdbStmt *) parsetree)->dbname, true);
				break;
			case T_RenameStmt:
				if (((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
					pause_db = get_database_oid(((RenameStmt *) parsetree)->subname, true);
				break;
			case T_AlterDatabaseStmt:
				if (find_option(((AlterDatabaseStmt *) parsetree)->options, "tablespace"))
					pause_db = get_database_oid(((AlterDatabaseStmt *) parsetree)->dbname, true);
				break;
			case T_CreatedbStmt:
				{
					CreatedbStmt *stmt = (CreatedbStmt *) parsetree;
					DefElem    *t = find_option(stmt->options, "template");

					created = stmt->dbname;
					if (t && t->arg)
					{
						pause_db = get_database_oid(defGetString(t), true);
						as_template = true;
					}
				}
				break;
			case T_DropStmt:
				{
					DropStmt   *stmt = (DropStmt *) parsetree;
					ListCell   *lc;

					if (stmt->removeType == OBJECT_EXTENSION)
						foreach(lc, stmt->objects)
							if (strcmp(strVal(lfirst(lc)), MQTT_EMIT_EXTENSION) == 0)
								drops_extension = true;
				}
				break;
			default:
				break;
		}
	}
	/*
	 * DROP, RENAME and SET TABLESPACE refuse the current database anyway;
	 * CREATE DATABASE copies it (CountOtherDBBackends leaves this session
	 * out), so our workers there must stop too.
	 */
	if (pause_db == MyDatabaseId && !as_template)
		pause_db = InvalidOid;
	if (OidIsValid(pause_db) && !may_pause(pause_db, as_template))
		pause_db = InvalidOid;	/* PostgreSQL refuses the command */

	/* until the transaction ends, whatever becomes of the command */
	/*
	 * Noted first, so that an error while waiting still resumes it; taken
	 * back when the pause table was full (resuming would then end another
	 * command's pause).
	 */
	if (OidIsValid(pause_db) && n_xact_paused < ME_XACT_MAX)
	{
		xact_paused[n_xact_paused++] = pause_db;
		if (!me_launcher_pause(pause_db))
			n_xact_paused--;
	}

	if (prev_process_utility_hook)
		prev_process_utility_hook(pstmt, queryString, readOnlyTree, context,
								  params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);

	if (created)
	{
		Oid			db = get_database_oid(created, true);

		/* at commit: its template may have had the extension */
		if (OidIsValid(db))
			me_launcher_start_workers(db);
	}
	/* the workers reload at commit, find the extension gone and exit */
	if (drops_extension && me_shmem_bind(false))
		me_capture_listeners_changed();
}

/* From _PG_init during preload. */
void
me_launcher_init_hooks(void)
{
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = me_process_utility;
	RegisterXactCallback(launcher_xact_callback, NULL);
}
