/*-------------------------------------------------------------------------
 *
 * listeners.h
 *		Listener registry cache and dispatch (listeners.c) and the checks
 *		of received messages (remote.c), used by the background worker only.
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
#include "utils/jsonb.h"

#include "pg_mqtt_emit.h"

/* A message received from the broker, as the subscriber hands it over. */
typedef struct MeRemoteMessage
{
	const char *topic;			/* NUL-terminated */
	const char *payload;		/* NUL-terminated after payload_len bytes */
	int			topic_len;
	int			payload_len;
	const char *share_group;	/* the group it came through, or NULL */
} MeRemoteMessage;

/* A path remote events arrive on: a model, and a share group or NULL. */
typedef struct MeRemotePath
{
	char	   *model;			/* as registered */
	char	   *group;
} MeRemotePath;

/* An event for the listeners, local or remote. */
typedef struct MeEvent
{
	const char *event_id;
	const char *model;
	const char *operation;
	bool		remote;
	Jsonb	   *result;
	Jsonb	   *old;
	Jsonb	   *args;
	const char *origin;
	bool		has_emitted_at;
	TimestampTz emitted_at;
	const char *topic;
	Jsonb	   *payload;
	Oid			relid;			/* local events: the changed table */
	const char *share_group;	/* remote events: the group it came through */
} MeEvent;

/*
 * Bounds of the registry.  The install script's _validate_listener() refuses
 * rows beyond them with the same numbers; a worker ignores rows written
 * past it (a restore with triggers disabled).  The stored size of a filter
 * (jsonb, perhaps compressed) is bounded loosely: _validate_listener()
 * bounds its text to ME_REGISTRY_MAX_FILTER bytes.
 */
#define ME_REGISTRY_MAX_TOTAL			5000
#define ME_REGISTRY_MAX_PER_ROLE		500
#define ME_REGISTRY_MAX_SEARCH_PATH		1024
#define ME_REGISTRY_MAX_FILTER			4096
#define ME_REGISTRY_MAX_FILTER_STORED	16384
#define ME_REGISTRY_MAX_OPERATIONS		16

/* what me_listeners_refresh() did */
typedef enum MeRegistryLoad
{
	ME_REGISTRY_ABSENT,			/* the extension is not installed here */
	ME_REGISTRY_LOADED,			/* the registry was read */
	ME_REGISTRY_KEPT			/* not read now; the copy loaded before stays */
} MeRegistryLoad;

/* listeners.c */
extern MeRegistryLoad me_listeners_refresh(void);
extern void me_listeners_report_skips(void);
extern bool me_listeners_want_local(const char *model, int model_len);
extern bool me_listeners_any_local(void);
extern List *me_listeners_remote_paths(void);
extern void me_listeners_run_local(const MqttEmitEventHeader *hdr,
								   const char *model, const char *payload,
								   const char *topic);
extern bool me_listeners_accept_remote(const char *model, const char *group);
extern uint64 me_listeners_calls_made(void);
extern void me_listeners_set_hard_timeout(int timeout_id);
extern void me_listeners_dispatch(const MeEvent *ev);
extern JsonbValue *me_json_field(Jsonb *jb, const char *key);
extern char *me_jbv_string(JsonbValue *v);
extern Jsonb *me_jbv_jsonb(JsonbValue *v);

/* remote.c */
extern void me_listeners_handle_remote(const MeRemoteMessage *m);
extern void me_remote_reject(const char *topic, int payload_len, const char *why);
extern void me_remote_prune(void);
extern void me_remote_forget_table(void);
extern void me_remote_dedup_begin(void);
extern void me_remote_dedup_rollback(void);

#endif							/* MQTT_EMIT_LISTENERS_H */
