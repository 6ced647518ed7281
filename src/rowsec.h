/*-------------------------------------------------------------------------
 *
 * rowsec.h
 *		Row-level security of the rows that local events carry.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/rowsec.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_ROWSEC_H
#define MQTT_EMIT_ROWSEC_H

#include "utils/jsonb.h"

extern bool me_rowsec_allows(Oid relid, Oid role, Jsonb *row, const char *listener);

#endif							/* MQTT_EMIT_ROWSEC_H */
