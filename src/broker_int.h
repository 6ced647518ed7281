/*-------------------------------------------------------------------------
 *
 * broker_int.h
 *		What the two halves of the paho wrapper share: broker.c (the
 *		worker's thread) and broker_callbacks.c (paho's threads).
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/broker_int.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_BROKER_INT_H
#define MQTT_EMIT_BROKER_INT_H

#include <pthread.h>

#include <MQTTAsync.h>

#include "storage/latch.h"

#include "broker.h"

/* Bytes of received messages kept waiting for the main loop, at most. */
#define ME_INCOMING_MAX_BYTES	(64 * 1024 * 1024)

typedef enum
{
	BS_DISCONNECTED,
	BS_CONNECTING,
	BS_CONNECTED
} BrokerState;

/*
 * The publisher.  Publish completions carry only the message's sequence
 * number as their context (no allocation per message), and find the
 * publisher here.  There is one publisher at a time; paho runs no callback
 * of a client after MQTTAsync_destroy() returned, and me_broker_destroy()
 * clears this before destroying, under me_publisher_mutex, which a callback
 * holds while it uses the publisher.
 */
extern pthread_mutex_t me_publisher_mutex;
extern MeBroker *me_current_publisher;

/*
 * The worker's latch (MyLatch, which does not change in the worker), set
 * by the first me_broker_create().  Callbacks set it after they released
 * the client's mutex: by then the worker may already have destroyed the
 * client, so they must not read the latch from it.
 */
extern Latch *me_worker_latch;

/* What the watchdog's probes unsubscribe from: nothing ever subscribes to it. */
#define ME_PROBE_FILTER		"$mqtt_emit/probe"

/*
 * The publisher's nudge (me_broker_watch): ms without an outcome or a new
 * message, with messages still in paho's hands, before the worker wakes
 * paho's send thread.
 */
#define ME_NUDGE_MS			20
#define ME_NUDGES_MAX		8

/* seconds paho waits for a CONNACK */
#define ME_CONNECT_TIMEOUT	10

struct MeBroker
{
	MQTTAsync	client;
	bool		subscriber;
	const MeBrokerConfig *cfg;
	uint64		submitted;		/* messages handed to paho (worker only) */
	int64		last_submit;	/* ms (monotonic): the last one (worker only) */
	int64		nudged_at;		/* ms (monotonic): the last nudge (worker only) */
	char	   *url;			/* the one URL of cfg's list it connects to */
	int			version;		/* MQTTVERSION_3_1_1 or MQTTVERSION_5 */
	int			max_qos;		/* highest QoS to publish with on this client */
	MeSessionMode session;		/* subscriber: the session it connects with */

	/* everything below is shared with paho's threads, under mutex */
	pthread_mutex_t mutex;
	BrokerState state;
	int64		last_heard;		/* ms (monotonic): the broker's last answer */
	bool		probe_out;		/* a probe awaits its UNSUBACK */
	int64		probe_since;	/* ms (monotonic): when it was sent */
	bool		stale;			/* given up by the watchdog, paho still connected */
	uint64		completed;		/* of the submitted: outcomes reported by paho */
	int64		last_outcome;	/* ms (monotonic): the last one */
	int			nudges_out;		/* nudges awaiting their UNSUBACK */
	int			connack_max_qos;	/* Maximum QoS in the CONNACK (MQTT 5), or -1 */
	int			connack_sub_ids;	/* Subscription Identifiers Available, or -1 */
	int			connack_shared; /* Shared Subscription Available, or -1 */
	bool		qos2_checked;	/* one QoS 2 acknowledgement was checked */
	int			qos2_token;		/* a QoS 2 acknowledgement to check, or 0 */
	bool		news_connected;
	bool		news_lost;
	char		news_error[256];
	int			news_connack_code;	/* a refusing CONNACK's code, or 0 */
	uint64	   *acks;
	int			nacks;
	int			maxacks;
	uint64	   *failures;
	int			nfailures;
	int			maxfailures;
	int			nbusy;			/* of the failures: PUBACK "not now" (MQTT 5) */
	uint64	   *rejects;
	int			nrejects;
	int			maxrejects;
	MeSubOutcome *subacks;		/* answers to SUBSCRIBE, oldest first */
	int			nsubacks;
	int			maxsubacks;
	MeIncoming *in_head;
	MeIncoming *in_tail;
	size_t		in_bytes;
	uint64		in_dropped;
};

/* broker_callbacks.c: run on paho's threads */
extern int64 me_broker_mono_ms(void);
extern void me_cb_connect_failure(void *context, MQTTAsync_failureData *response);
extern void me_cb_connect_failure5(void *context, MQTTAsync_failureData5 *response);
extern void me_cb_connect_success(void *context, MQTTAsync_successData *response);
extern void me_cb_connect_success5(void *context, MQTTAsync_successData5 *response);
extern void me_cb_connection_lost(void *context, char *cause);
extern void me_cb_disconnected5(void *context, MQTTProperties *properties,
								enum MQTTReasonCodes reasonCode);
extern int me_cb_message_arrived(void *context, char *topicName, int topicLen, MQTTAsync_message *message);
extern void me_cb_probe_failure(void *context, MQTTAsync_failureData *response);
extern void me_cb_probe_failure5(void *context, MQTTAsync_failureData5 *response);
extern void me_cb_probe_success(void *context, MQTTAsync_successData *response);
extern void me_cb_probe_success5(void *context, MQTTAsync_successData5 *response);
extern void me_cb_nudge_done(void *context, MQTTAsync_successData *response);
extern void me_cb_nudge_done5(void *context, MQTTAsync_successData5 *response);
extern void me_cb_nudge_failed(void *context, MQTTAsync_failureData *response);
extern void me_cb_nudge_failed5(void *context, MQTTAsync_failureData5 *response);
extern void me_cb_publish_failure(void *context, MQTTAsync_failureData *response);
extern void me_cb_publish_failure5(void *context, MQTTAsync_failureData5 *response);
extern void me_cb_publish_success(void *context, MQTTAsync_successData *response);
extern void me_cb_publish_success5(void *context, MQTTAsync_successData5 *response);
extern void me_cb_subscribe_failure(void *context, MQTTAsync_failureData *response);
extern void me_cb_subscribe_failure5(void *context, MQTTAsync_failureData5 *response);
extern void me_cb_subscribe_success(void *context, MQTTAsync_successData *response);
extern void me_cb_subscribe_success5(void *context, MQTTAsync_successData5 *response);
extern void me_cb_unsubscribe_failure(void *context, MQTTAsync_failureData *response);
extern void me_cb_unsubscribe_failure5(void *context, MQTTAsync_failureData5 *response);
extern void me_cb_unsubscribe_success(void *context, MQTTAsync_successData *response);
extern void me_cb_unsubscribe_success5(void *context, MQTTAsync_successData5 *response);
extern void me_cb_disconnect_done(void *context, MQTTAsync_successData *response);
extern void me_cb_disconnect_done5(void *context, MQTTAsync_successData5 *response);
extern void me_cb_disconnect_failed(void *context, MQTTAsync_failureData *response);
extern void me_cb_disconnect_failed5(void *context, MQTTAsync_failureData5 *response);
extern void me_broker_wake_worker(void);

#endif							/* MQTT_EMIT_BROKER_INT_H */
