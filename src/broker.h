/*-------------------------------------------------------------------------
 *
 * broker.h
 *		The MQTT client wrapper used by the background worker.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/broker.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_BROKER_H
#define MQTT_EMIT_BROKER_H

typedef struct MeBroker MeBroker;

/*
 * The settings a client connects with (client.c takes them from the GUCs).
 * The strings must outlive every client made with them.
 */
typedef struct MeBrokerConfig
{
	char	   *url;			/* mqtt_emit.broker_url: one URL or a list */
	char	  **urls;			/* its URLs, each a client connects to */
	int			nurls;
	char	   *client_id;		/* the publisher's; the subscriber adds a suffix */
	char	   *username;
	char	   *password;
	char	   *tls_ca_file;
	char	   *tls_cert_file;
	char	   *tls_key_file;
	bool		tls_verify;
	int			mqtt_version;	/* 3 (3.1.1) or 5 */
	int			keepalive;		/* seconds */
	bool		clean_session;	/* the publisher's */
	int			session_expiry; /* the subscriber's, seconds; 0: clean */
} MeBrokerConfig;

/* A message received by a subscriber, malloc'd; free with me_broker_free_message */
typedef struct MeIncoming
{
	struct MeIncoming *next;
	char	   *topic;
	char	   *payload;
	int			payload_len;
	int			topic_len;
	char	   *props;			/* MQTT 5 properties (ME_INPROP_* records), or NULL */
	int			props_len;
} MeIncoming;

/*
 * The MQTT 5 properties of a received message that handlers get, as
 * records: a property code (1 byte), then for each of two fields a length
 * (4 bytes, host order) and that many bytes.  The second field is a user
 * property's value, empty otherwise; the payload format indicator is its
 * one byte.
 */
#define ME_INPROP_PAYLOAD_FORMAT	1	/* MQTTPROPERTY_CODE_PAYLOAD_FORMAT_INDICATOR */
#define ME_INPROP_CONTENT_TYPE	3
#define ME_INPROP_RESPONSE_TOPIC	8
#define ME_INPROP_CORRELATION		9
#define ME_INPROP_USER			38
#define ME_INPROP_SUB_ID		11	/* a Subscription Identifier, 4 bytes, host
									 * order (inbound.c; handlers do not get it) */

/*
 * The broker's answer to one SUBSCRIBE (me_broker_subscribe_tracked), by
 * the token that call returned.  granted is the QoS granted (0 to 2), or
 * -1: refused when code >= 0x80 (the SUBACK's return code in 3.1.1, 0x80,
 * or its reason code in MQTT 5), else not answered (the connection went;
 * code is paho's error code).  For an UNSUBSCRIBE
 * (me_broker_unsubscribe_tracked, unsubscribe set), granted is 0 when the
 * broker answered, -1 as for a SUBSCRIBE otherwise.
 */
typedef struct MeSubOutcome
{
	int			token;
	int			granted;
	int			code;
	bool		unsubscribe;
} MeSubOutcome;

/* What happened on the paho threads since the last me_broker_poll(). */
typedef struct MeBrokerNews
{
	bool		connected;		/* a connection was established */
	bool		lost;			/* the connection was lost, or a connect failed */
	char		error[256];		/* why, when lost */
	uint64	   *acks;			/* message numbers acknowledged (palloc'd) */
	int			nacks;			/* how many acknowledgements */
	uint64	   *failures;		/* message numbers that failed (palloc'd) */
	int			nfailures;
	int			nbusy;			/* the broker said "not now" (quota exceeded) */
	uint64	   *rejects;		/* refused by the broker for good (palloc'd) */
	int			nrejects;
	MeIncoming *incoming;		/* received messages, oldest first */
	uint64		incoming_dropped;	/* dropped for lack of buffer space */
	bool		qos_downgraded; /* a QoS 2 message was acknowledged with PUBACK */
	int			broker_max_qos; /* CONNACK Maximum QoS (MQTT 5), or -1 */
	MeSubOutcome *subacks;		/* answers to SUBSCRIBE (palloc'd) */
	int			nsubacks;
	int			connack_code;	/* a refusing CONNACK's return or reason code, or 0 */
} MeBrokerNews;

/*
 * The session a subscriber connects with (client.c): its own (persistent
 * when session_expiry > 0), a clean one that makes the broker give up what
 * it still keeps for the client id (MQTT 5: clean start with the session
 * expiry, so that the new session is persistent at once), or a clean one
 * for the fallback client id.
 */
typedef enum MeSessionMode
{
	ME_SESSION_OWN,
	ME_SESSION_DISCARD,
	ME_SESSION_FALLBACK
} MeSessionMode;

extern MeBroker *me_broker_create(const MeBrokerConfig *cfg, const char *url,
								  const char *client_id,
								  bool subscriber, Latch *latch, int max_qos,
								  char *errbuf, int errlen);
extern void me_broker_set_session(MeBroker *b, MeSessionMode mode);
extern void me_broker_destroy(MeBroker *b);
extern bool me_broker_connect(MeBroker *b, char *errbuf, int errlen);
extern bool me_broker_connected(MeBroker *b);
extern bool me_broker_connecting(MeBroker *b);
extern bool me_broker_watch(MeBroker *b, long *timeout_ms);
extern void me_broker_nudge_timeout(MeBroker *b, long *timeout_ms);
extern bool me_broker_stale(MeBroker *b);
extern void me_broker_poll(MeBroker *b, MeBrokerNews *news);
extern int	me_broker_publish(MeBroker *b, const char *topic, const char *payload,
							  int len, int qos, bool retain, bool is_json,
							  const char *props, int props_len,
							  const char *event_id, uint64 msgno);
extern int	me_broker_subscribe(MeBroker *b, const char *filter, int qos);
extern int	me_broker_subscribe_tracked(MeBroker *b, const char *filter, int qos,
										uint32 sub_id, bool no_retained, int *token);
extern int	me_broker_unsubscribe_tracked(MeBroker *b, const char *filter, int *token);
extern void me_broker_features(MeBroker *b, bool *sub_ids, bool *shared);
extern bool me_broker_wait_disconnected(MeBroker *b, int timeout_ms);
extern const char *me_broker_reason_text(MeBroker *b, int code);
extern void me_broker_disconnect(MeBroker *b, int timeout_ms);
extern void me_broker_free_message(MeIncoming *m);
extern const char *me_broker_strerror(int rc);
extern const char *me_broker_url(MeBroker *b);

#define ME_BROKER_BACKPRESSURE	(-12)	/* MQTTASYNC_MAX_BUFFERED_MESSAGES */

#endif							/* MQTT_EMIT_BROKER_H */
