/*-------------------------------------------------------------------------
 *
 * outbox.h
 *		Every statement on mqtt_emit.outbox and mqtt_emit.dead_letters.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/outbox.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_OUTBOX_H
#define MQTT_EMIT_OUTBOX_H

#include "pg_mqtt_emit.h"

/*
 * An outbox row as the worker reads it: a header like a queue entry's,
 * with the row's id and its place in the publishing order.
 */
typedef struct MeOutboxRow
{
	MqttEmitEventHeader hdr;	/* row_id is 0: this is no queue entry */
	int64		id;
	int64		order;			/* the seq column, 0 when it has none */
	const char *model;			/* model_len bytes, NUL-terminated */
	const char *payload;		/* payload_len bytes, NUL-terminated */
	TimestampTz created_at;
} MeOutboxRow;

/* return false to stop the scan */
typedef bool (*MeOutboxRowFn) (const MeOutboxRow *row, void *arg);

/* committing backends and the worker */
extern void me_outbox_reposition(const int64 *ids, int n, int clear_flags,
								 int64 batch, bool marked);
extern void me_outbox_reposition_range(int64 min_id, int64 max_id,
									   int64 batch, int64 new_batch);
extern void me_outbox_insert(char **entries, int n, uint8 flag_mask,
							 int64 batch, bool marked, int64 first_order,
							 int64 *ids);
extern int64 me_outbox_stray_batch(uint64 queue_tail);

/* the worker, inside a transaction */
extern void me_outbox_start(bool fresh);
extern void me_outbox_recount(void);
extern void me_outbox_place_batch(const MqttEmitMarker *mk);
extern void me_outbox_place_strays(bool all, uint64 upto);
extern int64 me_outbox_next_stray(void);
extern uint64 me_outbox_release_batch(const MqttEmitMarker *mk, bool by_registry);
extern uint64 me_outbox_release_strays(bool all, uint64 upto);
extern int64 me_outbox_next_held_stray(void);
extern void me_outbox_move(char **entries, int n);
extern void me_outbox_row_done(int64 id);
extern int	me_outbox_rows_done(TimestampTz *since);
extern void me_outbox_delete_done(void);
extern void me_outbox_dead_letter_row(int64 id, const char *reason);
extern void me_outbox_dead_letter_entry(const MqttEmitEventHeader *hdr,
										const char *reason);
extern void me_outbox_note_oldest(void);

/* the worker: received messages */
extern void me_outbox_insert_received(const char **topics, const int *topic_lens,
									  const char **payloads, const int *payload_lens,
									  int n);
extern void me_outbox_insert_messages(const char **topics, const int *topic_lens,
									  const char **payloads, const int *payload_lens,
									  int n);

/* the listener worker, inside a transaction */
extern int	me_outbox_local_rows(int limit, MeOutboxRow **rows);
extern void me_outbox_local_done(const int64 *ids, int n);
extern void me_outbox_local_failed(const MeOutboxRow *row, const char *reason);
extern void me_outbox_message_dead_letter(const char *topic, const char *stored,
										  int hex_len, const char *reason,
										  TimestampTz created_at);
extern int	me_outbox_scan_publishable(int64 after, int limit,
									   MeOutboxRowFn fn, void *arg);
extern bool me_outbox_drained(void);
extern int64 me_outbox_next_order(void);

#endif							/* MQTT_EMIT_OUTBOX_H */
