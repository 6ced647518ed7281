/*-------------------------------------------------------------------------
 *
 * worker.h
 *		What the parts of the background worker share: its transactions,
 *		and each part's interface.
 *
 * The worker is split by concern:
 *	worker.c	registration, main loop, signals, reload, shutdown, and the
 *				worker's transactions
 *	client.c	the two MQTT client slots: settings snapshot, connection
 *				supervision, backoff, problem reports
 *	inflight.c	published messages awaiting acknowledgement, the publish
 *				cursors, strikes and refusals
 *	relay.c		the queue's local cursor and head, direct or outbox mode,
 *				local listeners
 *	outbox.c	every statement on mqtt_emit.outbox and dead_letters
 *	inbound.c	the subscriber: subscriptions and received messages
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/worker.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_WORKER_H
#define MQTT_EMIT_WORKER_H

#include "broker.h"
#include "pg_mqtt_emit.h"

/* worker.c: the worker's transactions */
extern void me_worker_begin_tx(const char *what);
extern void me_worker_refresh_registry(void);
extern void me_worker_end_tx(void);
extern void me_worker_commit_async(void);

/* client.c */
typedef enum MeClientRole
{
	ME_CLIENT_PUBLISHER = 0,
	ME_CLIENT_SUBSCRIBER = 1
} MeClientRole;

extern void me_client_init(void);
extern bool me_client_settings_changed(void);
extern void me_client_restart(void);
extern void me_client_service(MeClientRole role, TimestampTz now, long *timeout);
extern MeBroker *me_client_broker(MeClientRole role);
extern bool me_client_connected(MeClientRole role);
extern uint64 me_client_connections(MeClientRole role);
extern bool me_client_poll(MeClientRole role, MeBrokerNews *news);
extern void me_client_lost(MeClientRole role, const char *why);
extern void me_client_disconnect_all(void);
extern bool me_client_wait_disconnected(MeClientRole role, int timeout_ms);
extern void me_client_destroy_all(void);

/* inflight.c */
extern void me_inflight_init(uint64 head);
extern bool me_inflight_send(const MqttEmitEventHeader *hdr, const char *model,
							 const char *payload, uint64 end_pos,
							 int64 outbox_row, int64 key);
extern void me_inflight_skip(uint64 end_pos);
extern bool me_inflight_window_open(void);
extern int	me_inflight_room(void);
extern void me_inflight_take_news(void);
extern void me_inflight_forget(bool always);
extern void me_inflight_flush_refused(bool can_keep);
extern int	me_inflight_count(void);
extern int	me_inflight_queued(void);
extern int	me_inflight_from_outbox(void);
extern uint64 me_inflight_pub_pos(void);
extern uint64 me_inflight_pub_done(void);
extern void me_inflight_published_to(uint64 end_pos);
extern void me_inflight_moved_to(uint64 end_pos);
extern int64 me_inflight_outbox_cursor(void);
extern void me_inflight_set_outbox_cursor(int64 order);
extern void me_inflight_key_moved(int64 old_key, int64 new_key);
extern int64 me_inflight_take_dead_letter(void);

/* relay.c */
extern void me_relay_init(uint64 head);
extern void me_relay_extension_changed(bool ready);
extern bool me_relay_ready(void);
extern void me_relay_committed(void);
extern bool me_relay_step(uint64 *tail, int *new_entries, long *timeout);
extern void me_relay_release_done(void);
extern void me_relay_note_fill(bool now);
extern void me_relay_report_lost(void);
extern void me_relay_delete_done(void);
extern void me_relay_keep_queue_at_exit(void);

/* inbound.c */
extern void me_inbound_sync(bool all);
extern void me_inbound_take_news(void);
extern void me_inbound_retry(TimestampTz now, long *timeout);

#endif							/* MQTT_EMIT_WORKER_H */
