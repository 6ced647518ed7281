/*-------------------------------------------------------------------------
 *
 * listener_stats.c
 *		Calls, errors and time of each listener, in shared memory, for the
 *		views mqtt_emit.listener_stats and mqtt_emit.model_stats.
 *
 * The listener worker calls listener functions itself, so
 * pg_stat_user_functions knows nothing of them: it counts each call here,
 * keyed by the database and the listener's id (mqtt_emit.listeners.id;
 * each database numbers its listeners on its own).  The table is a
 * shared hash of fixed size, enough for the registry's bound in each of
 * mqtt_emit.max_databases databases; a listener beyond it is not counted.
 * Each database sees and resets its own listeners only.  Counts start again at zero with the server,
 * and with mqtt_emit.stats_reset().
 *
 * Lock: the named LWLock of this file protects the hash; the listener
 * worker takes it in exclusive mode once per call, readers in shared mode.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/listener_stats.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "pg_mqtt_emit.h"

/* more than the registry holds (5000 listeners) */
#define ME_LISTENER_STATS_MAX	6000

typedef struct MeListenerKey
{
	Oid			dboid;
	int64		id;				/* mqtt_emit.listeners.id */
} MeListenerKey;

typedef struct MeListenerStat
{
	MeListenerKey key;			/* hash key */
	int64		calls;
	int64		errors;
	double		total_ms;		/* time in the listener, milliseconds */
	TimestampTz last_call;
} MeListenerStat;

static HTAB *stats_hash = NULL;
static LWLock *stats_lock = NULL;

PG_FUNCTION_INFO_V1(mqtt_emit_listener_stats);

static long
stats_max(void)
{
	return (long) ME_LISTENER_STATS_MAX * mqtt_emit_max_databases;
}

Size
me_listener_stats_size(void)
{
	return hash_estimate_size(stats_max(), sizeof(MeListenerStat));
}

void
me_listener_stats_request(void)
{
	RequestAddinShmemSpace(me_listener_stats_size());
	RequestNamedLWLockTranche("pg_mqtt_emit listener stats", 1);
}

/* At shared memory startup, with AddinShmemInitLock held. */
void
me_listener_stats_startup(void)
{
	HASHCTL		info;

	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(MeListenerKey);
	info.entrysize = sizeof(MeListenerStat);
	stats_hash = ShmemInitHash("pg_mqtt_emit listener stats",
							   stats_max(), stats_max(),
							   &info, HASH_ELEM | HASH_BLOBS);
	stats_lock = &(GetNamedLWLockTranche("pg_mqtt_emit listener stats"))->lock;
}

/*
 * Count one call of listener id that took elapsed_ms and failed or not.
 */
void
me_listener_stats_count(int64 id, bool failed, double elapsed_ms)
{
	MeListenerStat *s;
	MeListenerKey key;
	bool		found;

	if (stats_hash == NULL)
		return;
	memset(&key, 0, sizeof(key));
	key.dboid = MyDatabaseId;
	key.id = id;
	LWLockAcquire(stats_lock, LW_EXCLUSIVE);
	s = (MeListenerStat *) hash_search(stats_hash, &key, HASH_ENTER_NULL, &found);
	if (s != NULL)
	{
		if (!found)
		{
			s->calls = 0;
			s->errors = 0;
			s->total_ms = 0;
		}
		s->calls++;
		if (failed)
			s->errors++;
		s->total_ms += elapsed_ms;
		s->last_call = GetCurrentTimestamp();
	}
	LWLockRelease(stats_lock);
}

/* mqtt_emit.stats_reset(): every listener's counts of this database start again */
void
me_listener_stats_reset(void)
{
	me_listener_stats_forget(MyDatabaseId);
}

/*
 * Forget the counts of database dboid: its stats were reset, or its slot
 * was given back (the database or its extension is gone), so that the
 * table's fixed room goes to databases that have listeners.
 */
void
me_listener_stats_forget(Oid dboid)
{
	HASH_SEQ_STATUS seq;
	MeListenerStat *s;

	if (stats_hash == NULL)
		return;
	LWLockAcquire(stats_lock, LW_EXCLUSIVE);
	hash_seq_init(&seq, stats_hash);
	while ((s = (MeListenerStat *) hash_seq_search(&seq)) != NULL)
		if (s->key.dboid == dboid)
			(void) hash_search(stats_hash, &s->key, HASH_REMOVE, NULL);
	LWLockRelease(stats_lock);
}

/*
 * mqtt_emit._listener_stats(): one row per listener called since the
 * server started (or the last reset): id, calls, errors, total_time (ms),
 * last_call.  The views join it with the registry.
 */
Datum
mqtt_emit_listener_stats(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	HASH_SEQ_STATUS seq;
	MeListenerStat *s;

	InitMaterializedSRF(fcinfo, 0);
	if (stats_hash == NULL)
		return (Datum) 0;
	LWLockAcquire(stats_lock, LW_SHARED);
	hash_seq_init(&seq, stats_hash);
	while ((s = (MeListenerStat *) hash_seq_search(&seq)) != NULL)
	{
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};

		if (s->key.dboid != MyDatabaseId)
			continue;
		values[0] = Int64GetDatum(s->key.id);
		values[1] = Int64GetDatum(s->calls);
		values[2] = Int64GetDatum(s->errors);
		values[3] = Float8GetDatum(s->total_ms);
		values[4] = TimestampTzGetDatum(s->last_call);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(stats_lock);
	return (Datum) 0;
}
