/*-------------------------------------------------------------------------
 *
 * pg_mqtt_emit.h
 *		Shared declarations of pg_mqtt_emit: GUC variables, the layout of
 *		queued events, and the functions each source file offers the others.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/pg_mqtt_emit.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef PG_MQTT_EMIT_H
#define PG_MQTT_EMIT_H

#include "datatype/timestamp.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "postmaster/bgworker.h"
#include "storage/s_lock.h"

#include "compat.h"

#define MQTT_EMIT_SCHEMA			"mqtt_emit"
#define MQTT_EMIT_EXTENSION			"pg_mqtt_emit"
#define MQTT_EMIT_MAX_ERROR_LEN		256

/* mqtt_emit.broker_url: at most this many brokers in the list */
#define MQTT_EMIT_MAX_BROKER_URLS	16

/* room for one broker URL in shared memory (mqtt_emit.stats) */
#define MQTT_EMIT_MAX_URL_LEN		256
#define MQTT_EMIT_EVENT_ID_LEN		36	/* UUID text form, without NUL */
#define MQTT_EMIT_MAX_MODEL_LEN		200

/* MQTT: a topic is a UTF-8 string of at most 65535 bytes */
#define ME_MAX_TOPIC_LEN			65535

/* Row operations, as the seed names them on the wire. */
typedef enum MqttEmitOp
{
	ME_OP_CREATE = 0,
	ME_OP_UPDATE,
	ME_OP_DELETE,
	ME_OP_OTHER					/* ad-hoc publish or a foreign operation */
} MqttEmitOp;

/* mqtt_emit.delivery */
typedef enum
{
	ME_DELIVERY_MEMORY,
	ME_DELIVERY_DURABLE
} MqttEmitDelivery;

/* mqtt_emit.topic_style */
typedef enum
{
	ME_TOPIC_OPERATION,			/* <prefix>/<model>/<operation> */
	ME_TOPIC_ALL,				/* <prefix>/<model>/all, lowercased (Node lib) */
	ME_TOPIC_BOTH
} MqttEmitTopicStyle;

/* mqtt_emit.json_profile: how column values are rendered */
typedef enum MqttEmitJsonProfile
{
	ME_JSON_PROFILE_POSTGRES,	/* as to_jsonb() */
	ME_JSON_PROFILE_PRISMA		/* as Prisma's client writes them */
} MqttEmitJsonProfile;

/* mqtt_emit.overflow */
typedef enum
{
	ME_OVERFLOW_SPILL,			/* write the events to the outbox table */
	ME_OVERFLOW_ERROR,
	ME_OVERFLOW_DROP
} MqttEmitOverflow;

/*
 * An event as it travels through the shared-memory queue.  The header is
 * followed by model_len bytes of model name (for ME_KIND_PUBLISH: the full
 * topic) and payload_len bytes of JSON payload, with no terminators.  Entries
 * are stored unaligned in a byte ring and always copied out with memcpy.
 */
typedef enum
{
	ME_KIND_ROW = 1,			/* a captured row change */
	ME_KIND_PUBLISH = 2,		/* mqtt_emit.publish(): explicit topic */
	ME_KIND_MARKER = 3,			/* a committed transaction's outbox rows */
	ME_KIND_REMOTE = 4,			/* outbox only: a message received from the
								 * broker, for the listener worker (model: its
								 * topic) */
	ME_KIND_MESSAGE = 5,		/* outbox only: a received message for
								 * handlers (handlers.c; model: its topic) */
	ME_KIND_SKIP = 6			/* queue only: the space a transaction had
								 * reserved and gave back (it aborted);
								 * total_len covers it, the rest is unused */
} MqttEmitKind;

/*
 * The payload of an ME_KIND_MARKER entry: a transaction that wrote its
 * events to the outbox marks its place in the commit order with it.  Its
 * rows have this batch number and ids between min_id and max_id.
 */
typedef struct MqttEmitMarker
{
	int64		batch;
	int64		min_id;
	int64		max_id;
} MqttEmitMarker;

#define ME_FLAG_PUBLISH		1	/* send it to the broker */
#define ME_FLAG_LOCAL		2	/* run local listeners for it */
#define ME_FLAG_QUEUED		4	/* outbox row whose event is in the queue too */
#define ME_FLAG_RETAIN		8	/* ME_KIND_PUBLISH: publish with retain set */
#define ME_FLAG_PROPS		16	/* ME_KIND_PUBLISH: MQTT 5 properties precede
								 * the payload (pubprops.c) */
#define ME_FLAG_HELD		32	/* outbox row whose local listeners wait for the
								 * relay to reach its place in the queue */
#define ME_FLAG_BATCH		64	/* pending only: a row event of a table watched
								 * with batch => true, published inside the
								 * transaction's batched message (pending.c),
								 * never in the queue or the outbox */

/*
 * The outbox keeps an event's depth in the high byte of its flags column
 * (int2), so that the library works with the 0.1.0 table too; the ME_FLAG_*
 * bits stay in the low byte.  Depths above ME_MAX_DEPTH cannot be stored.
 */
#define ME_DEPTH_SHIFT		8
#define ME_MAX_DEPTH		100

typedef struct MqttEmitEventHeader
{
	uint32		total_len;		/* header + model + payload */
	uint8		kind;			/* MqttEmitKind */
	uint8		flags;			/* ME_FLAG_* */
	uint8		op;				/* MqttEmitOp */
	uint8		qos;			/* for ME_KIND_PUBLISH; 255 = default */
	Oid			relid;			/* the changed table, or InvalidOid */
	uint32		model_len;
	uint32		payload_len;
	uint8		depth;			/* 0, or 1 + the depth of the event whose
								 * listener caused this one */
	int64		row_id;			/* durable: its outbox row (ME_FLAG_QUEUED), else 0 */
} MqttEmitEventHeader;

/* Counters kept in shared memory and shown by mqtt_emit.stats. */
typedef enum MqttEmitCounter
{
	ME_STAT_ENQUEUED = 0,		/* events that entered the queue */
	ME_STAT_DEQUEUED,			/* events that left it (done) */
	ME_STAT_PUBLISHED,			/* messages acknowledged by the broker */
	ME_STAT_PUBLISH_FAILED,		/* send attempts that failed */
	ME_STAT_RETRIED,			/* messages sent again after a failure */
	ME_STAT_DROPPED,			/* events lost by policy (counted) */
	ME_STAT_RECEIVED,			/* remote messages received */
	ME_STAT_DEDUPLICATED,		/* remote messages skipped as seen */
	ME_STAT_SELF_ECHO,			/* our own messages coming back */
	ME_STAT_REJECTED,			/* remote messages malformed/hostile */
	ME_STAT_LISTENER_CALLS,
	ME_STAT_LISTENER_ERRORS,
	ME_STAT_CONNECTS,			/* successful broker connections */
	ME_STAT_SPILLED,			/* events written to the outbox by backends */
	ME_STAT_OUTBOXED,			/* events moved to the outbox by the worker */
	ME_STAT_DEAD_LETTERS,		/* messages the broker refused for good */
	ME_STAT_DEPTH_EXCEEDED,		/* events not captured: mqtt_emit.max_depth */
	ME_STAT_ENQUEUED_DURABLE,	/* of ENQUEUED: durable (their rows survive) */
	ME_STAT_DEQUEUED_DURABLE,	/* of DEQUEUED: durable */
	ME_STAT_COUNT
} MqttEmitCounter;

/*
 * A consistent enough copy of the shared state for mqtt_emit.stats
 * (me_shared_snapshot); counters are read one by one.
 */
typedef struct MqttEmitSnapshot
{
	uint64		head;
	uint64		tail;
	Size		capacity;
	pid_t		worker_pid;
	bool		publisher_connected;
	bool		subscriber_connected;
	uint32		subscriptions;
	uint64		outbox_rows;
	TimestampTz outbox_oldest;	/* 0 when the outbox is empty */
	TimestampTz stats_reset;	/* when mqtt_emit.stats_reset() ran last */
	TimestampTz last_error_time;
	char		last_error[MQTT_EMIT_MAX_ERROR_LEN];
	char		broker_url[MQTT_EMIT_MAX_URL_LEN];	/* "" when not connected */
	char		subscriber_broker_url[MQTT_EMIT_MAX_URL_LEN];
} MqttEmitSnapshot;

/*
 * The state of one subscription of the subscriber, as the worker last saw
 * it (shmem.c keeps a copy for the mqtt_emit.subscriptions view).
 */
#define ME_SUBS_MAX				1024	/* subscriptions shown, at most */
#define ME_SUB_FILTER_LEN		512		/* longer filters are not shown */
#define ME_SUB_REASON_LEN		96

typedef enum MeSubState
{
	ME_SUB_PENDING = 0,			/* wanted, SUBSCRIBE not sent (not connected) */
	ME_SUB_REQUESTED,			/* SUBSCRIBE sent, no SUBACK yet */
	ME_SUB_ACKNOWLEDGED,		/* SUBACK granted granted_qos */
	ME_SUB_REFUSED				/* SUBACK refused: reason_code, reason */
} MeSubState;

typedef struct MeSubStatus
{
	char		filter[ME_SUB_FILTER_LEN];
	MeSubState	state;
	int			granted_qos;	/* ME_SUB_ACKNOWLEDGED, else -1 */
	int			reason_code;	/* ME_SUB_REFUSED (0x80..0xFF), else -1 */
	char		reason[ME_SUB_REASON_LEN];	/* ME_SUB_REFUSED, else "" */
	TimestampTz since;			/* when it got into this state */
} MeSubStatus;

/* GUC variables (pg_mqtt_emit.c) */
extern char *mqtt_emit_broker_url;
extern char *mqtt_emit_topic_prefix;
extern char *mqtt_emit_batch_topic_prefix;
extern int	mqtt_emit_batch_max_bytes;
extern char *mqtt_emit_client_id;
extern char *mqtt_emit_username;
extern char *mqtt_emit_password;
extern int	mqtt_emit_qos;
extern char *mqtt_emit_database;
extern int	mqtt_emit_max_databases;
extern int	mqtt_emit_queue_size;
extern int	mqtt_emit_delivery;
extern int	mqtt_emit_dedup_ttl;
extern int	mqtt_emit_dedup_keep;
extern int	mqtt_emit_dedup_max;
extern bool mqtt_emit_enabled;
extern bool mqtt_emit_emit_local;
extern bool mqtt_emit_emit_remote;
extern char *mqtt_emit_tls_ca_file;
extern char *mqtt_emit_tls_cert_file;
extern char *mqtt_emit_tls_key_file;
extern bool mqtt_emit_tls_verify;
extern int	mqtt_emit_keepalive;
extern int	mqtt_emit_reconnect_min;
extern int	mqtt_emit_reconnect_max;
extern bool mqtt_emit_clean_session;
extern int	mqtt_emit_session_expiry;
extern int	mqtt_emit_mqtt_version;
extern int	mqtt_emit_max_payload;
extern int	mqtt_emit_overflow;
extern int	mqtt_emit_listener_timeout;
extern int	mqtt_emit_listener_batch_time;
extern int	mqtt_emit_marker_wait;
extern int	mqtt_emit_topic_style;
extern int	mqtt_emit_json_profile;
extern int	mqtt_emit_max_inflight;
extern double mqtt_emit_batch_delay;
extern int	mqtt_emit_outbox_max;
extern char *mqtt_emit_signing_key;
extern bool mqtt_emit_require_signature;
extern int	mqtt_emit_max_depth;
extern int	mqtt_emit_max_transaction_events;

extern bool mqtt_emit_preloaded;

/* pg_mqtt_emit.c */
extern void me_check_preloaded(void);
extern const char *me_client_id(void);
extern void me_database_name_init(void);
extern const char *me_files_dir(void);
extern bool me_extension_table_exists(const char *relname);
extern int	me_broker_url_list(const char *value, char **urls, int max);

/* shmem.c: all shared state is read and written through these */
extern Size me_shmem_size(void);
extern void me_shmem_request(void);
extern void me_shmem_startup(void);
extern bool me_shmem_bind(bool create);
extern bool me_shmem_bound(void);
extern int	me_slot_count(void);
extern void me_slot_info(int i, Oid *dboid, pid_t *worker_pid, pid_t *listener_pid,
						 bool *retired);
extern int	me_slot_of(Oid dboid);
extern void me_slot_set_retired(bool retired);
extern bool me_slot_free(int i, Oid dboid);
extern int	me_slots_in_use_by_others(void);

/* launcher.c */
extern Size me_launcher_shmem_size(void);
extern void me_launcher_shmem_startup(void);
extern void me_launcher_register(void);
extern void me_launcher_start_workers(Oid dboid);
extern void me_launcher_request_probe(Oid dboid);
extern bool me_launcher_pause(Oid dboid);
extern void me_launcher_resume(Oid dboid);
extern void me_launcher_init_hooks(void);
extern bool me_extension_present(void);
PGDLLEXPORT void mqtt_emit_launcher_main(Datum main_arg);
PGDLLEXPORT void mqtt_emit_probe_main(Datum main_arg);

/* listener_stats.c */
extern Size me_listener_stats_size(void);
extern void me_listener_stats_request(void);
extern void me_listener_stats_startup(void);
extern void me_listener_stats_count(int64 id, bool failed, double elapsed_ms);
extern void me_listener_stats_reset(void);
extern void me_listener_stats_forget(Oid dboid);
extern bool me_shmem_ready(void);
/*
 * Queue space reserved by a committing transaction at PRE_COMMIT: its
 * place in the queue is fixed then (me_queue_reserve), its events are
 * written there at COMMIT (me_queue_push_reserved) or the space is given
 * back on abort (me_queue_unreserve).  len is 0 when nothing is reserved.
 */
typedef struct MeQueueSlot
{
	uint64		pos;			/* where the space starts */
	Size		len;			/* bytes reserved */
	uint64		ticket;			/* the reserving process's slot (shmem.c) */
} MeQueueSlot;

extern bool me_queue_reserve(Size len, bool marker, MeQueueSlot *slot);
extern bool me_queue_has_room(Size len);
extern void me_queue_unreserve(MeQueueSlot *slot);
extern void me_queue_push_reserved(char **entries, int nentries, MeQueueSlot *slot, int nevents);
extern uint64 me_queue_tail(void);
extern uint64 me_queue_end(void);
extern void me_queue_copy(uint64 pos, char *dst, Size len);
extern void me_queue_release(uint64 new_head, int nevents);
extern void me_count(MqttEmitCounter c, uint64 n);
extern uint64 me_counter(MqttEmitCounter c);
extern uint64 me_counter_since_reset(MqttEmitCounter c);
extern void me_stats_reset(void);
extern void me_set_last_error(const char *fmt,...) pg_attribute_printf(1, 2);
extern void me_wake_worker(void);
extern uint64 me_next_event_seq(void);
extern bool me_worker_claim(Latch *latch, uint64 *head, pid_t *other);
extern void me_worker_release(void);
extern bool me_worker_fresh(void);
extern void me_worker_fresh_done(void);
extern uint64 me_shmem_epoch_seq(void);
extern TimestampTz me_shmem_epoch_time(void);
extern void me_worker_set_napping(bool napping);
extern void me_set_connected(bool subscriber, bool connected);
extern void me_set_broker_url(bool subscriber, const char *url);
extern void me_set_subscriptions(uint32 n);
extern void me_subs_publish(const MeSubStatus *subs, int n);
extern int	me_subs_snapshot(MeSubStatus *out, int max);
extern uint32 me_listeners_version(void);
extern void me_listeners_version_bump(void);
extern uint32 me_outbox_version(void);
extern void me_outbox_version_bump(void);
extern uint32 me_held_strays_version(void);
extern uint64 me_local_done(void);
extern void me_local_done_set(uint64 pos);
extern void me_held_strays_version_bump(void);
extern uint64 me_outbox_rows(void);
extern void me_outbox_rows_add(uint64 n);
extern void me_outbox_rows_sub(uint64 n);
extern void me_outbox_rows_set(uint64 n);
extern void me_outbox_set_oldest(TimestampTz oldest);
extern TimestampTz me_outbox_get_oldest(void);
extern void me_shared_snapshot(MqttEmitSnapshot *snap);
extern bool me_listener_claim(Latch *latch, pid_t *other);
extern void me_listener_release(void);
extern void me_wake_listener(void);
extern int	me_attempt_begin(int kind, int64 id);
extern void me_attempt_end(void);

/* How payload.c renders one column type as JSON (see me_classify_type). */
typedef enum MqttEmitJsonCat
{
	ME_JSON_BOOL,
	ME_JSON_INT2,
	ME_JSON_INT4,
	ME_JSON_INT8,
	ME_JSON_NUMBER,				/* float, numeric: raw when a valid JSON number */
	ME_JSON_DATETIME,			/* date, timestamp, timestamptz */
	ME_JSON_JSON,
	ME_JSON_JSONB,
	ME_JSON_ARRAY,
	ME_JSON_COMPOSITE,
	ME_JSON_TEXT,				/* text, varchar, char(n): the bytes, quoted */
	ME_JSON_STRING				/* anything else: output function, quoted */
} MqttEmitJsonCat;

typedef struct MqttEmitColType
{
	MqttEmitJsonCat cat;
	Oid			typid;			/* base type, domains resolved */
	FmgrInfo	outfunc;
} MqttEmitColType;

/* payload.c */
extern void me_classify_type(Oid typid, MqttEmitColType *ct, MemoryContext cxt);
extern void me_json_value(StringInfo buf, MqttEmitColType *ct, Datum value, bool isnull);
extern void me_escape_json_len(StringInfo buf, const char *str, int len);
extern char *me_key_text(MqttEmitColType *ct, Datum value);
extern void me_json_event_tail(StringInfo buf, TimestampTz now);
extern void me_make_event_id(char *out, TimestampTz now);
extern void me_format_timestamp(char *out, TimestampTz ts);
extern const char *me_op_name(MqttEmitOp op);

/* result of me_check_signature() */
typedef enum
{
	ME_SIG_NONE,				/* the message carries no signature */
	ME_SIG_OK,
	ME_SIG_BAD
} MqttEmitSigCheck;

#define ME_SIGNATURE_SUFFIX_LEN	80	/* ,"signature":"<64 hex>"} */

extern bool me_sign_payload(StringInfo out, const char *payload, int len);
extern MqttEmitSigCheck me_check_signature(const char *payload, int len);

/* capture.c */
extern void me_capture_init(void);

/* pending.c */
extern void me_pending_init(void);
extern bool me_capture_add_event(MqttEmitKind kind, uint8 flags, MqttEmitOp op,
								 Oid relid, const char *model, int model_len,
								 const char *payload, int payload_len, int qos);
extern void me_capture_listeners_changed(void);
extern void me_capture_set_depth(int depth);

/* worker.c */
extern bool me_worker_connect(Datum main_arg);
extern void me_worker_session_settings(void);
extern void me_worker_start(Oid dboid, const char *function, const char *name,
							const char *type, BackgroundWorkerHandle **handle);
PGDLLEXPORT void mqtt_emit_worker_main(Datum main_arg);

/* listener_worker.c */
PGDLLEXPORT void mqtt_emit_listener_main(Datum main_arg);

#endif							/* PG_MQTT_EMIT_H */
