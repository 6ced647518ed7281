/*-------------------------------------------------------------------------
 *
 * spool.h
 *		The subscriber's spool of received messages (spool.c).
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/spool.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ME_SPOOL_H
#define ME_SPOOL_H

#include "broker.h"

extern void me_spool_open(void);
extern bool me_spool_append(const char *topic, int topic_len,
							const char *payload, int payload_len,
							const char *props, int props_len);
extern int	me_spool_read(MeIncoming *out, int max, int64 *gen, uint64 *pos);
extern void me_spool_save_position(int64 gen, uint64 pos);
extern void me_spool_committed(void);
extern bool me_spool_has_unread(void);

#endif							/* ME_SPOOL_H */
