/*-------------------------------------------------------------------------
 *
 * broker_callbacks.c
 *		paho's callbacks: they run on paho's threads, so they only record
 *		what happened in the client's mailbox (malloc'd memory under a
 *		pthread mutex) and set the worker's latch.  No palloc, no elog, no
 *		locks of PostgreSQL's.  See broker.c for the rest.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/broker_callbacks.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <time.h>

#include "pg_mqtt_emit.h"
#include "broker_int.h"
#include "spool.h"

pthread_mutex_t me_publisher_mutex = PTHREAD_MUTEX_INITIALIZER;
MeBroker *me_current_publisher = NULL;
Latch *me_worker_latch = NULL;

/* ----- callbacks: paho threads; malloc, mutex and SetLatch only ----- */

/* milliseconds on the monotonic clock; safe on any thread */
int64
me_broker_mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void
me_broker_wake_worker(void)
{
	if (me_worker_latch)
		SetLatch(me_worker_latch);
}

static void
push_seq(uint64 **arr, int *n, int *max, uint64 seq)
{
	if (*n >= *max)
	{
		int			newmax = *max ? *max * 2 : 1024;
		uint64	   *p = realloc(*arr, sizeof(uint64) * newmax);

		if (p == NULL)
			return;				/* the worker resends on failure anyway */
		*arr = p;
		*max = newmax;
	}
	(*arr)[(*n)++] = seq;
}

static void
record_lost(MeBroker *b, const char *why)
{
	pthread_mutex_lock(&b->mutex);
	b->state = BS_DISCONNECTED;
	b->news_lost = true;
	strlcpy(b->news_error, why ? why : "connection lost", sizeof(b->news_error));
	pthread_mutex_unlock(&b->mutex);
	me_broker_wake_worker();
}

void
me_cb_connection_lost(void *context, char *cause)
{
	record_lost((MeBroker *) context, cause ? cause : "connection lost");
}

/*
 * MQTT 5: the broker sent DISCONNECT (mosquitto does when an administrator
 * changes a client's rights, or another client takes over its id).  paho
 * 1.3.12 calls only this, not connectionLost, and goes on taking the
 * connection for open: without this the watchdog noticed it 1.5 x
 * keepalive later.  Give the client up as the watchdog does (stale: the
 * worker destroys it and makes a new one).
 */
void
me_cb_disconnected5(void *context, MQTTProperties *properties,
					enum MQTTReasonCodes reasonCode)
{
	MeBroker   *b = (MeBroker *) context;
	const char *what = MQTTReasonCode_toString(reasonCode);

	pthread_mutex_lock(&b->mutex);
	b->state = BS_DISCONNECTED;
	b->news_lost = true;
	b->stale = true;
	snprintf(b->news_error, sizeof(b->news_error),
			 "the broker closed the connection: %s (DISCONNECT reason code %d)",
			 what ? what : "unknown reason", (int) reasonCode);
	pthread_mutex_unlock(&b->mutex);
	me_broker_wake_worker();
}

void
me_cb_connect_success(void *context, MQTTAsync_successData *response)
{
	MeBroker   *b = (MeBroker *) context;

	pthread_mutex_lock(&b->mutex);
	b->state = BS_CONNECTED;
	b->news_connected = true;
	b->last_heard = me_broker_mono_ms();
	b->probe_out = false;
	pthread_mutex_unlock(&b->mutex);
	me_broker_wake_worker();
}

void
me_cb_connect_success5(void *context, MQTTAsync_successData5 *response)
{
	MeBroker   *b = (MeBroker *) context;
	int			maxqos = -1;
	int			sub_ids = -1;
	int			shared = -1;

	/* what the broker says it does not support (absent: supported) */
	if (response)
	{
		MQTTProperties *p = &response->properties;

		if (MQTTProperties_hasProperty(p, MQTTPROPERTY_CODE_MAXIMUM_QOS))
			maxqos = MQTTProperties_getNumericValue(p, MQTTPROPERTY_CODE_MAXIMUM_QOS);
		if (MQTTProperties_hasProperty(p, MQTTPROPERTY_CODE_SUBSCRIPTION_IDENTIFIERS_AVAILABLE))
			sub_ids = MQTTProperties_getNumericValue(p, MQTTPROPERTY_CODE_SUBSCRIPTION_IDENTIFIERS_AVAILABLE);
		if (MQTTProperties_hasProperty(p, MQTTPROPERTY_CODE_SHARED_SUBSCRIPTION_AVAILABLE))
			shared = MQTTProperties_getNumericValue(p, MQTTPROPERTY_CODE_SHARED_SUBSCRIPTION_AVAILABLE);
	}
	pthread_mutex_lock(&b->mutex);
	if (maxqos >= 0)
		b->connack_max_qos = maxqos;
	b->connack_sub_ids = sub_ids;
	b->connack_shared = shared;
	pthread_mutex_unlock(&b->mutex);
	me_cb_connect_success(context, NULL);
}

/* what a CONNACK return code of MQTT 3.1.1 means */
static const char *
connack_return_code_text(int rc)
{
	switch (rc)
	{
		case 1:
			return "unacceptable protocol version";
		case 2:
			return "identifier rejected";
		case 3:
			return "server unavailable";
		case 4:
			return "bad user name or password";
		case 5:
			return "not authorized";
	}
	return "unknown return code";
}

/*
 * Say why a connection attempt failed.  paho reports a refusing CONNACK as
 * message "CONNACK return code" with the broker's return code (3.1.1) or
 * reason code (5) in code, and a broker that closes the connection before
 * it answers the CONNECT as "TCP connect completion failure", code -1.
 */
static void
describe_connect_failure(MeBroker *b, const char *message, int code,
						 char *buf, size_t len)
{
	bool		v5 = (b->version == MQTTVERSION_5);

	if (message && strcmp(message, "CONNACK return code") == 0 && code > 0)
	{
		if (v5)
			snprintf(buf, len, "the broker refused the connection: %s (CONNACK reason code %d)",
					 MQTTReasonCode_toString(code), code);
		else
			snprintf(buf, len, "the broker refused the connection: %s (CONNACK return code %d)",
					 connack_return_code_text(code), code);
	}
	else if (message && strcmp(message, "TCP connect completion failure") == 0)
	{
		if (v5)
			snprintf(buf, len, "the broker closed the connection during CONNECT; "
					 "if it does not support MQTT 5, set mqtt_emit.mqtt_version = '3.1.1'");
		else
			snprintf(buf, len, "the broker closed the connection during CONNECT "
					 "(see the broker's log: it may refuse the client id or the credentials)");
	}
	else if (message && strcmp(message, "TCP connect timeout") == 0)
		snprintf(buf, len, "no answer to CONNECT within %d s", ME_CONNECT_TIMEOUT);
	else
		snprintf(buf, len, "connect failed: %s (code %d)",
				 message ? message : MQTTAsync_strerror(code), code);
}

/* a refusing CONNACK: keep its code for the worker (client.c) */
static void
record_connack_code(MeBroker *b, const char *message, int code)
{
	if (message == NULL || strcmp(message, "CONNACK return code") != 0 || code <= 0)
		return;
	pthread_mutex_lock(&b->mutex);
	b->news_connack_code = code;
	pthread_mutex_unlock(&b->mutex);
}

void
me_cb_connect_failure(void *context, MQTTAsync_failureData *response)
{
	MeBroker   *b = (MeBroker *) context;
	char		buf[256];

	describe_connect_failure(b, response ? response->message : NULL,
							 response ? response->code : 0, buf, sizeof(buf));
	record_connack_code(b, response ? response->message : NULL,
						response ? response->code : 0);
	record_lost(b, buf);
}

void
me_cb_connect_failure5(void *context, MQTTAsync_failureData5 *response)
{
	MeBroker   *b = (MeBroker *) context;
	char		buf[256];

	/*
	 * paho 1.3.12 reports a refusing CONNACK's reason in code; 1.3.14
	 * (Debian 13 and later) in reasonCode, with code -1
	 */
	int			code = !response ? 0 :
		(response->reasonCode >= 0x80) ? (int) response->reasonCode : response->code;

	describe_connect_failure(b, response ? response->message : NULL, code,
							 buf, sizeof(buf));
	record_connack_code(b, response ? response->message : NULL, code);
	record_lost(b, buf);
}

/*
 * outcome: 1 acknowledged, 0 failed (send again), 2 failed because the
 * broker said "not now" (send again, later), -1 refused for good.
 * qos is the message's; token its paho token (its MQTT message id).
 */
static void
record_publish_outcome(void *context, int outcome, int qos, int token)
{
	MeBroker   *b;
	uint64		seq = (uint64) (uintptr_t) context;

	pthread_mutex_lock(&me_publisher_mutex);
	b = me_current_publisher;
	if (b != NULL)
	{
		pthread_mutex_lock(&b->mutex);
		if (outcome == 1)
			push_seq(&b->acks, &b->nacks, &b->maxacks, seq);
		else if (outcome < 0)
			push_seq(&b->rejects, &b->nrejects, &b->maxrejects, seq);
		else
			push_seq(&b->failures, &b->nfailures, &b->maxfailures, seq);
		if (outcome == 2)
			b->nbusy++;
		b->completed++;
		b->last_outcome = me_broker_mono_ms();
		/* paho "completes" a QoS 0 message when it wrote it: no answer */
		if (outcome != 0 && qos > 0)
			b->last_heard = me_broker_mono_ms();
		/* see me_broker_poll(): did the broker really complete QoS 2? */
		if (outcome == 1 && qos == 2 && !b->qos2_checked && b->qos2_token == 0)
			b->qos2_token = token;
		pthread_mutex_unlock(&b->mutex);
	}
	pthread_mutex_unlock(&me_publisher_mutex);
	if (b != NULL)
		me_broker_wake_worker();
}

void
me_cb_publish_success(void *context, MQTTAsync_successData *response)
{
	record_publish_outcome(context, 1,
						   response ? response->alt.pub.message.qos : 1,
						   response ? response->token : 0);
}

/*
 * The outcome of an MQTT 5 PUBACK's reason code.  Most failure codes refuse
 * the message for good (not authorized, topic name invalid, payload format
 * invalid).  Quota exceeded and packet identifier in use say "not now": the
 * message is sent again after a pause (inflight.c).
 */
static int
puback_outcome(int reason)
{
	if (reason < 0x80)
		return 1;
	if (reason == MQTTREASONCODE_QUOTA_EXCEEDED ||
		reason == MQTTREASONCODE_PACKET_IDENTIFIER_IN_USE)
		return 2;
	return -1;
}

void
me_cb_publish_success5(void *context, MQTTAsync_successData5 *response)
{
	record_publish_outcome(context, response ? puback_outcome(response->reasonCode) : 1,
						   response ? response->alt.pub.message.qos : 1,
						   response ? response->token : 0);
}

void
me_cb_publish_failure(void *context, MQTTAsync_failureData *response)
{
	record_publish_outcome(context, 0, 0, 0);
}

void
me_cb_publish_failure5(void *context, MQTTAsync_failureData5 *response)
{
	/* paho reports a PUBACK with a failure reason code here */
	if (response && response->reasonCode >= 0x80)
		record_publish_outcome(context, puback_outcome(response->reasonCode), 1, 0);
	else
		record_publish_outcome(context, 0, 0, 0);
}

/* the watchdog's probe: paho calls onSuccess for every UNSUBACK */
static void
probe_answered(MeBroker *b, bool answered)
{
	pthread_mutex_lock(&b->mutex);
	b->probe_out = false;
	if (answered)
		b->last_heard = me_broker_mono_ms();
	pthread_mutex_unlock(&b->mutex);
}

void
me_cb_probe_success(void *context, MQTTAsync_successData *response)
{
	probe_answered((MeBroker *) context, true);
}

void
me_cb_probe_success5(void *context, MQTTAsync_successData5 *response)
{
	probe_answered((MeBroker *) context, true);
}

/* the publisher's nudge (me_broker_watch): answered, or not sent */
static void
nudge_done(MeBroker *b, bool answered)
{
	pthread_mutex_lock(&b->mutex);
	b->nudges_out--;
	if (answered)
		b->last_heard = me_broker_mono_ms();
	pthread_mutex_unlock(&b->mutex);
}

void
me_cb_nudge_done(void *context, MQTTAsync_successData *response)
{
	nudge_done((MeBroker *) context, true);
}

void
me_cb_nudge_done5(void *context, MQTTAsync_successData5 *response)
{
	nudge_done((MeBroker *) context, true);
}

void
me_cb_nudge_failed(void *context, MQTTAsync_failureData *response)
{
	nudge_done((MeBroker *) context, false);
}

void
me_cb_nudge_failed5(void *context, MQTTAsync_failureData5 *response)
{
	nudge_done((MeBroker *) context, false);
}

/* not sent, or the connection went: no answer from the broker */
void
me_cb_probe_failure(void *context, MQTTAsync_failureData *response)
{
	probe_answered((MeBroker *) context, false);
}

void
me_cb_probe_failure5(void *context, MQTTAsync_failureData5 *response)
{
	probe_answered((MeBroker *) context, false);
}

/* is this one of the properties that handlers get (ME_INPROP_*)? */
static bool
prop_kept(const MQTTProperty *p)
{
	switch (p->identifier)
	{
		case MQTTPROPERTY_CODE_PAYLOAD_FORMAT_INDICATOR:
		case MQTTPROPERTY_CODE_CONTENT_TYPE:
		case MQTTPROPERTY_CODE_RESPONSE_TOPIC:
		case MQTTPROPERTY_CODE_CORRELATION_DATA:
		case MQTTPROPERTY_CODE_USER_PROPERTY:
		case MQTTPROPERTY_CODE_SUBSCRIPTION_IDENTIFIER:
			return true;
		default:
			return false;
	}
}

/* bytes the kept properties take as ME_INPROP_* records (0: none) */
static size_t
props_size(const MQTTProperties *props)
{
	size_t		n = 0;
	int			i;

	for (i = 0; i < props->count; i++)
	{
		const MQTTProperty *p = &props->array[i];

		if (!prop_kept(p))
			continue;
		n += 1 + 2 * sizeof(int32_t);
		if (p->identifier == MQTTPROPERTY_CODE_PAYLOAD_FORMAT_INDICATOR)
			n += 1;
		else if (p->identifier == MQTTPROPERTY_CODE_SUBSCRIPTION_IDENTIFIER)
			n += sizeof(uint32);
		else
			n += p->value.data.len +
				(p->identifier == MQTTPROPERTY_CODE_USER_PROPERTY ? p->value.value.len : 0);
	}
	return n;
}

static char *
put_field(char *dst, const char *data, int32_t len)
{
	memcpy(dst, &len, sizeof(len));
	dst += sizeof(len);
	if (len > 0)
		memcpy(dst, data, len);
	return dst + len;
}

/* write the kept properties to dst (props_size() bytes); returns the size */
static size_t
props_copy(const MQTTProperties *props, char *dst)
{
	char	   *start = dst;
	int			i;

	for (i = 0; i < props->count; i++)
	{
		const MQTTProperty *p = &props->array[i];

		if (!prop_kept(p))
			continue;
		*dst++ = (char) p->identifier;
		if (p->identifier == MQTTPROPERTY_CODE_PAYLOAD_FORMAT_INDICATOR)
		{
			char		byte = (char) p->value.byte;

			dst = put_field(dst, &byte, 1);
			dst = put_field(dst, NULL, 0);
		}
		else if (p->identifier == MQTTPROPERTY_CODE_SUBSCRIPTION_IDENTIFIER)
		{
			uint32		id = (uint32) p->value.integer4;

			dst = put_field(dst, (const char *) &id, sizeof(id));
			dst = put_field(dst, NULL, 0);
		}
		else
		{
			dst = put_field(dst, p->value.data.data, p->value.data.len);
			if (p->identifier == MQTTPROPERTY_CODE_USER_PROPERTY)
				dst = put_field(dst, p->value.value.data, p->value.value.len);
			else
				dst = put_field(dst, NULL, 0);
		}
	}
	return dst - start;
}

/*
 * The SUBACK of a tracked SUBSCRIBE (me_broker_subscribe_tracked), or its
 * failure: recorded by token for the worker, which knows the filter.  A
 * SUBACK is an answer from the broker, so it counts for the watchdog.
 */
static void
record_outcome(MeBroker *b, int token, int granted, int code, bool answered,
			   bool unsubscribe)
{
	pthread_mutex_lock(&b->mutex);
	if (b->nsubacks >= b->maxsubacks)
	{
		int			newmax = b->maxsubacks ? b->maxsubacks * 2 : 64;
		MeSubOutcome *p = realloc(b->subacks, sizeof(MeSubOutcome) * newmax);

		if (p != NULL)
		{
			b->subacks = p;
			b->maxsubacks = newmax;
		}
	}
	/* without memory the state stays "requested"; a reconnect repeats it */
	if (b->nsubacks < b->maxsubacks)
	{
		b->subacks[b->nsubacks].token = token;
		b->subacks[b->nsubacks].granted = granted;
		b->subacks[b->nsubacks].code = code;
		b->subacks[b->nsubacks].unsubscribe = unsubscribe;
		b->nsubacks++;
	}
	if (answered)
		b->last_heard = me_broker_mono_ms();
	pthread_mutex_unlock(&b->mutex);
	me_broker_wake_worker();
}

static void
record_subscribe_outcome(MeBroker *b, int token, int granted, int code, bool answered)
{
	record_outcome(b, token, granted, code, answered, false);
}

/* 3.1.1: paho calls onSuccess with the granted QoS... */
void
me_cb_subscribe_success(void *context, MQTTAsync_successData *response)
{
	int			qos = response ? response->alt.qos : 0;

	if (qos >= 0x80)
		record_subscribe_outcome((MeBroker *) context, response->token, -1, qos, true);
	else
		record_subscribe_outcome((MeBroker *) context, response ? response->token : 0,
								 qos, 0, true);
}

/*
 * ... and onFailure for a SUBACK of 0x80, with that in code (paho 1.3.12
 * sets only token and code then), or when the request was not answered.
 */
void
me_cb_subscribe_failure(void *context, MQTTAsync_failureData *response)
{
	int			code = response ? response->code : MQTTASYNC_FAILURE;

	record_subscribe_outcome((MeBroker *) context, response ? response->token : 0,
							 -1, code, code >= 0x80);
}

/*
 * MQTT 5: the SUBACK's reason code is the granted QoS (paho calls
 * onFailure5 for one >= 0x80, but take it here too).  For one filter paho
 * sets only reasonCode: alt.sub.reasonCodes is then not initialised.
 */
void
me_cb_subscribe_success5(void *context, MQTTAsync_successData5 *response)
{
	int			rc = response ? (int) response->reasonCode : 0;

	if (rc >= 0x80)
		record_subscribe_outcome((MeBroker *) context, response->token, -1, rc, true);
	else
		record_subscribe_outcome((MeBroker *) context, response ? response->token : 0,
								 rc, 0, true);
}

void
me_cb_subscribe_failure5(void *context, MQTTAsync_failureData5 *response)
{
	int			code = !response ? MQTTASYNC_FAILURE :
		((int) response->reasonCode >= 0x80) ? (int) response->reasonCode :
		response->code;

	record_subscribe_outcome((MeBroker *) context, response ? response->token : 0,
							 -1, code, code >= 0x80);
}

/*
 * The answer to a tracked UNSUBSCRIBE (me_broker_unsubscribe_tracked):
 * granted 0 when the broker answered (also "no subscription existed"),
 * else not answered.
 */
void
me_cb_unsubscribe_success(void *context, MQTTAsync_successData *response)
{
	record_outcome((MeBroker *) context, response ? response->token : 0, 0, 0, true, true);
}

void
me_cb_unsubscribe_success5(void *context, MQTTAsync_successData5 *response)
{
	record_outcome((MeBroker *) context, response ? response->token : 0, 0,
				   response ? (int) response->reasonCode : 0, true, true);
}

void
me_cb_unsubscribe_failure(void *context, MQTTAsync_failureData *response)
{
	int			code = response ? response->code : MQTTASYNC_FAILURE;

	record_outcome((MeBroker *) context, response ? response->token : 0,
				   code >= 0x80 ? 0 : -1, code, code >= 0x80, true);
}

void
me_cb_unsubscribe_failure5(void *context, MQTTAsync_failureData5 *response)
{
	int			code = !response ? MQTTASYNC_FAILURE :
		((int) response->reasonCode >= 0x80) ? (int) response->reasonCode :
		response->code;

	/* a refusing UNSUBACK is an answer too: nothing to send again */
	record_outcome((MeBroker *) context, response ? response->token : 0,
				   code >= 0x80 ? 0 : -1, code, code >= 0x80, true);
}

/*
 * A disconnect the worker asked for is done (or failed): paho closed the
 * socket, nothing more arrives (me_broker_wait_disconnected).
 */
static void
disconnect_done(MeBroker *b)
{
	pthread_mutex_lock(&b->mutex);
	b->state = BS_DISCONNECTED;
	pthread_mutex_unlock(&b->mutex);
	me_broker_wake_worker();
}

void
me_cb_disconnect_done(void *context, MQTTAsync_successData *response)
{
	disconnect_done((MeBroker *) context);
}

void
me_cb_disconnect_done5(void *context, MQTTAsync_successData5 *response)
{
	disconnect_done((MeBroker *) context);
}

void
me_cb_disconnect_failed(void *context, MQTTAsync_failureData *response)
{
	disconnect_done((MeBroker *) context);
}

void
me_cb_disconnect_failed5(void *context, MQTTAsync_failureData5 *response)
{
	disconnect_done((MeBroker *) context);
}

/*
 * A received message: into the spool (or the mailbox), with the properties
 * handlers get and the Subscription Identifiers that say which
 * subscriptions it came through (inbound.c), as ME_INPROP_* records.
 */
int
me_cb_message_arrived(void *context, char *topicName, int topicLen,
				   MQTTAsync_message *message)
{
	MeBroker   *b = (MeBroker *) context;
	int			tlen = topicLen > 0 ? topicLen : (int) strlen(topicName);
	size_t		plen = props_size(&message->properties);
	size_t		need = sizeof(MeIncoming) + tlen + 1 + message->payloadlen + 1 + plen;
	MeIncoming *m = NULL;
	bool		spooled;

	/*
	 * paho sent the PUBACK already: write the message to the spool before
	 * anything else (spool.c), where it survives this process.
	 */
	{
		char		pbuf[512];
		char	   *props = plen <= sizeof(pbuf) ? pbuf : malloc(plen);
		int			props_len = 0;

		if (props != NULL && plen > 0)
			props_len = (int) props_copy(&message->properties, props);
		spooled = props != NULL &&
			me_spool_append(topicName, tlen, message->payload, message->payloadlen,
							props_len > 0 ? props : NULL, props_len);
		if (props != pbuf)
			free(props);
	}

	pthread_mutex_lock(&b->mutex);
	if (!spooled && b->in_bytes + need <= ME_INCOMING_MAX_BYTES)
		m = malloc(need);
	if (spooled)
		;
	else if (m == NULL)
		b->in_dropped++;
	else
	{
		m->next = NULL;
		m->topic = (char *) (m + 1);
		memcpy(m->topic, topicName, tlen);
		m->topic[tlen] = '\0';
		m->topic_len = tlen;
		m->payload = m->topic + tlen + 1;
		memcpy(m->payload, message->payload, message->payloadlen);
		m->payload[message->payloadlen] = '\0';
		m->payload_len = message->payloadlen;
		m->props = NULL;
		m->props_len = 0;
		if (plen > 0)
		{
			m->props = m->payload + message->payloadlen + 1;
			m->props_len = (int) props_copy(&message->properties, m->props);
		}
		if (b->in_tail)
			b->in_tail->next = m;
		else
			b->in_head = m;
		b->in_tail = m;
		b->in_bytes += need;
	}
	b->last_heard = me_broker_mono_ms();
	pthread_mutex_unlock(&b->mutex);

	MQTTAsync_freeMessage(&message);
	MQTTAsync_free(topicName);
	me_broker_wake_worker();
	return 1;
}

