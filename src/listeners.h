/*-------------------------------------------------------------------------
 *
 * listeners.h
 *		Listener registry cache, dispatch and remote message handling,
 *		used by the background worker only.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/listeners.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_LISTENERS_H
#define MQTT_EMIT_LISTENERS_H

#include "nodes/pg_list.h"

#include "broker.h"

extern bool me_listeners_refresh(void);
extern bool me_listeners_want_local(const char *model, int model_len);
extern List *me_listeners_remote_models(void);
extern void me_listeners_run_local(const MqttEmitEventHeader *hdr,
								   const char *model, const char *payload,
								   const char *topic);
extern void me_listeners_handle_remote(MeIncoming *m);

#endif							/* MQTT_EMIT_LISTENERS_H */
