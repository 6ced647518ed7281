/*-------------------------------------------------------------------------
 *
 * compat.h
 *		Differences between the PostgreSQL major versions pg_mqtt_emit
 *		builds against (15 to 18), behind PG_VERSION_NUM, in one place.
 *		The source files call the me_* names below instead of the server
 *		functions whose signatures changed.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/compat.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef PG_MQTT_EMIT_COMPAT_H
#define PG_MQTT_EMIT_COMPAT_H

#include "access/attmap.h"
#include "catalog/pg_proc.h"
#include "utils/acl.h"

#if PG_VERSION_NUM < 150000
#error "pg_mqtt_emit needs PostgreSQL 15 or later"
#endif

/* PostgreSQL 16 folded the pg_*_ownercheck() functions into one */
#if PG_VERSION_NUM >= 160000
#define me_database_ownercheck(dboid, roleid) \
	object_ownercheck(DatabaseRelationId, (dboid), (roleid))
#else
#define me_database_ownercheck(dboid, roleid) \
	pg_database_ownercheck((dboid), (roleid))
#endif

/* PostgreSQL 16 moved VARDATA_ANY() and friends out of postgres.h */
#if PG_VERSION_NUM >= 160000
#include "varatt.h"
#endif

/*
 * PostgreSQL 16 added build_attrmap_by_name()'s missing_ok;
 * false keeps 15's behaviour: an error if a column has no counterpart.
 */
#if PG_VERSION_NUM >= 160000
#define me_build_attrmap_by_name(indesc, outdesc) \
	build_attrmap_by_name((indesc), (outdesc), false)
#else
#define me_build_attrmap_by_name(indesc, outdesc) \
	build_attrmap_by_name((indesc), (outdesc))
#endif

/*
 * PostgreSQL 16 replaced the per-catalog pg_*_aclcheck()
 * functions with object_aclcheck(classid, ...).
 */
#if PG_VERSION_NUM >= 160000
#define me_proc_aclcheck(fn, roleid, mode) \
	object_aclcheck(ProcedureRelationId, (fn), (roleid), (mode))
#else
#define me_proc_aclcheck(fn, roleid, mode) \
	pg_proc_aclcheck((fn), (roleid), (mode))
#endif

/* this process's number among all PGPROCs, and how many there are */
#if PG_VERSION_NUM >= 170000
#define me_my_proc_number()		((int) MyProcNumber)
#else
#define me_my_proc_number()		(MyProc->pgprocno)
#endif
#define me_total_procs()		(MaxBackends + NUM_AUXILIARY_PROCS + max_prepared_xacts)

/*
 * PostgreSQL 16 added ExecInsertIndexTuples()'s onlySummarizing; false
 * inserts into every index, as 15 does.
 */
#if PG_VERSION_NUM >= 160000
#define me_exec_insert_index_tuples(rri, slot, estate) \
	ExecInsertIndexTuples((rri), (slot), (estate), false, false, NULL, NIL, false)
#else
#define me_exec_insert_index_tuples(rri, slot, estate) \
	ExecInsertIndexTuples((rri), (slot), (estate), false, false, NULL, NIL)
#endif

#endif							/* PG_MQTT_EMIT_COMPAT_H */
