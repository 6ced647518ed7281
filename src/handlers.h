/*-------------------------------------------------------------------------
 *
 * handlers.h
 *		Subscriptions to any topic (mqtt_emit.subscribe): topic filter
 *		rules, the registry mqtt_emit.handlers, and handler calls.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/handlers.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_HANDLERS_H
#define MQTT_EMIT_HANDLERS_H

#include "lib/stringinfo.h"

#include "listeners.h"

#define ME_HANDLER_MAX_FILTER	1024	/* bytes of a handler's topic filter */

/* filter rules (any process) */
extern const char *me_filter_problem(const char *filter, int len);
extern bool me_filter_matches(const char *filter, const char *topic, int topic_len);
extern bool me_topic_is_event(const char *topic, int len);

/* both workers: the registry */
extern MeRegistryLoad me_handlers_refresh(void);
extern int	me_handlers_nfilters(void);
extern const char *me_handlers_filter(int i, int *qos, const char **group);
extern bool me_handlers_match(const char *topic, int topic_len);

/* the worker: what an outbox row of kind ME_KIND_MESSAGE holds */
extern void me_handlers_encode(StringInfo buf, const char *payload, int payload_len,
							   const char *props, int props_len);

/* the listener worker */
extern void me_handlers_run(const char *topic, int topic_len,
							const char *stored, int stored_len,
							TimestampTz created_at, int attempt, int attempts,
							const char *group, const char *group_filter);
extern int	me_handlers_payload_end(const char *stored, int stored_len);
extern uint64 me_handlers_calls_made(void);
extern void me_handlers_set_hard_timeout(int timeout_id);

#endif							/* MQTT_EMIT_HANDLERS_H */
