/*-------------------------------------------------------------------------
 *
 * broker.c
 *		A thin wrapper around one paho MQTTAsync client.
 *
 * paho runs its callbacks on threads of its own.  No PostgreSQL function
 * may run there: no palloc, no elog, no locks.  The callbacks below only
 * record what happened in a mailbox (malloc'd memory guarded by a pthread
 * mutex) and set the worker's latch; the worker's main loop empties the
 * mailbox with me_broker_poll() and acts on it.  Signals are blocked while
 * paho creates its threads, so that SIGTERM, SIGHUP and SIGURG (latches)
 * are always delivered to the main thread.
 *
 * Reconnection is driven by the worker, not by paho's automatic reconnect:
 * the worker knows when it wants to back off, resubscribe, or switch
 * brokers after a reload.  This file touches no catalog and reads no
 * setting: the worker hands it a MeBrokerConfig (client.c).
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/broker.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <pthread.h>
#include <signal.h>

#include <MQTTAsync.h>

#include "miscadmin.h"
#include "storage/latch.h"

#include "pg_mqtt_emit.h"
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
 * number as their context (no allocation per message); there is one
 * publisher at a time, and callbacks of a destroyed client never run.
 */
static MeBroker *current_publisher = NULL;

struct MeBroker
{
	MQTTAsync	client;
	bool		subscriber;
	const MeBrokerConfig *cfg;
	int			version;		/* MQTTVERSION_3_1_1 or MQTTVERSION_5 */
	Latch	   *latch;

	/* everything below is shared with paho's threads, under mutex */
	pthread_mutex_t mutex;
	BrokerState state;
	bool		news_connected;
	bool		news_lost;
	char		news_error[256];
	uint64	   *acks;
	int			nacks;
	int			maxacks;
	uint64	   *failures;
	int			nfailures;
	int			maxfailures;
	uint64	   *rejects;
	int			nrejects;
	int			maxrejects;
	MeIncoming *in_head;
	MeIncoming *in_tail;
	size_t		in_bytes;
	uint64		in_dropped;
};

/* ----- callbacks: paho threads; malloc, mutex and SetLatch only ----- */

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
	SetLatch(b->latch);
}

static void
on_connection_lost(void *context, char *cause)
{
	record_lost((MeBroker *) context, cause ? cause : "connection lost");
}

static void
on_connect_success(void *context, MQTTAsync_successData *response)
{
	MeBroker   *b = (MeBroker *) context;

	pthread_mutex_lock(&b->mutex);
	b->state = BS_CONNECTED;
	b->news_connected = true;
	pthread_mutex_unlock(&b->mutex);
	SetLatch(b->latch);
}

static void
on_connect_success5(void *context, MQTTAsync_successData5 *response)
{
	on_connect_success(context, NULL);
}

static void
on_connect_failure(void *context, MQTTAsync_failureData *response)
{
	char		buf[256];

	snprintf(buf, sizeof(buf), "connect failed: %s (code %d)",
			 (response && response->message) ? response->message :
			 MQTTAsync_strerror(response ? response->code : 0),
			 response ? response->code : 0);
	record_lost((MeBroker *) context, buf);
}

static void
on_connect_failure5(void *context, MQTTAsync_failureData5 *response)
{
	char		buf[256];

	/* paho reports a refusing CONNACK's reason in code, not reasonCode */
	snprintf(buf, sizeof(buf), "connect failed: %s (code %d, reason %s)",
			 (response && response->message) ? response->message :
			 MQTTAsync_strerror(response ? response->code : 0),
			 response ? response->code : 0,
			 !response ? "" :
			 response->reasonCode != 0 ? MQTTReasonCode_toString(response->reasonCode) :
			 response->code > 0 ? MQTTReasonCode_toString(response->code) : "none");
	record_lost((MeBroker *) context, buf);
}

/* outcome: 1 acknowledged, 0 failed (send again), -1 refused for good */
static void
record_publish_outcome(void *context, int outcome)
{
	MeBroker   *b = current_publisher;
	uint64		seq = (uint64) (uintptr_t) context;

	if (b == NULL)
		return;
	pthread_mutex_lock(&b->mutex);
	if (outcome > 0)
		push_seq(&b->acks, &b->nacks, &b->maxacks, seq);
	else if (outcome < 0)
		push_seq(&b->rejects, &b->nrejects, &b->maxrejects, seq);
	else
		push_seq(&b->failures, &b->nfailures, &b->maxfailures, seq);
	pthread_mutex_unlock(&b->mutex);
	SetLatch(b->latch);
}

static void
on_publish_success(void *context, MQTTAsync_successData *response)
{
	record_publish_outcome(context, 1);
}

static void
on_publish_success5(void *context, MQTTAsync_successData5 *response)
{
	/* a PUBACK with a failure reason code: the broker refuses this message */
	record_publish_outcome(context, (response && response->reasonCode >= 0x80) ? -1 : 1);
}

static void
on_publish_failure(void *context, MQTTAsync_failureData *response)
{
	record_publish_outcome(context, 0);
}

static void
on_publish_failure5(void *context, MQTTAsync_failureData5 *response)
{
	/* paho reports a PUBACK with a failure reason code here */
	record_publish_outcome(context,
						   (response && response->reasonCode >= 0x80) ? -1 : 0);
}

static int
on_message_arrived(void *context, char *topicName, int topicLen,
				   MQTTAsync_message *message)
{
	MeBroker   *b = (MeBroker *) context;
	int			tlen = topicLen > 0 ? topicLen : (int) strlen(topicName);
	size_t		need = sizeof(MeIncoming) + tlen + 1 + message->payloadlen + 1;
	MeIncoming *m = NULL;

	pthread_mutex_lock(&b->mutex);
	if (b->in_bytes + need <= ME_INCOMING_MAX_BYTES)
		m = malloc(need);
	if (m == NULL)
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
		if (b->in_tail)
			b->in_tail->next = m;
		else
			b->in_head = m;
		b->in_tail = m;
		b->in_bytes += need;
	}
	pthread_mutex_unlock(&b->mutex);

	MQTTAsync_freeMessage(&message);
	MQTTAsync_free(topicName);
	SetLatch(b->latch);
	return 1;
}

/* ----- main thread API ----- */

static void
block_signals(sigset_t *old)
{
	sigset_t	all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, old);
}

static void
restore_signals(sigset_t *old)
{
	pthread_sigmask(SIG_SETMASK, old, NULL);
}

/*
 * Create a client for the current settings.  Returns NULL and fills errbuf
 * when paho refuses (for instance a malformed URL).
 */
MeBroker *
me_broker_create(const MeBrokerConfig *cfg, const char *client_id,
				 bool subscriber, Latch *latch, char *errbuf, int errlen)
{
	MeBroker   *b = calloc(1, sizeof(MeBroker));
	MQTTAsync_createOptions copts = MQTTAsync_createOptions_initializer;
	sigset_t	old;
	int			rc;
	const char *url = cfg->url;
	char		urlbuf[1024];

	if (b == NULL)
	{
		snprintf(errbuf, errlen, "out of memory");
		return NULL;
	}
	/* paho knows tcp:// and ssl://; accept the common mqtt:// spellings */
	if (strncmp(url, "mqtt://", 7) == 0)
	{
		snprintf(urlbuf, sizeof(urlbuf), "tcp://%s", url + 7);
		url = urlbuf;
	}
	else if (strncmp(url, "mqtts://", 8) == 0)
	{
		snprintf(urlbuf, sizeof(urlbuf), "ssl://%s", url + 8);
		url = urlbuf;
	}

	b->subscriber = subscriber;
	b->cfg = cfg;
	b->latch = latch;
	b->version = (cfg->mqtt_version == 5) ? MQTTVERSION_5 : MQTTVERSION_3_1_1;
	pthread_mutex_init(&b->mutex, NULL);
	b->state = BS_DISCONNECTED;

	copts.sendWhileDisconnected = 0;
	copts.maxBufferedMessages = 65535;
	copts.MQTTVersion = b->version;

	block_signals(&old);
	rc = MQTTAsync_createWithOptions(&b->client, url, client_id,
									 MQTTCLIENT_PERSISTENCE_NONE, NULL, &copts);
	if (rc == MQTTASYNC_SUCCESS && subscriber)
		rc = MQTTAsync_setCallbacks(b->client, b, on_connection_lost,
									on_message_arrived, NULL);
	else if (rc == MQTTASYNC_SUCCESS)
		rc = MQTTAsync_setConnectionLostCallback(b->client, b, on_connection_lost);
	restore_signals(&old);

	if (rc != MQTTASYNC_SUCCESS)
	{
		snprintf(errbuf, errlen, "cannot create MQTT client for \"%s\": %s",
				 cfg->url, MQTTAsync_strerror(rc));
		if (b->client)
			MQTTAsync_destroy(&b->client);
		pthread_mutex_destroy(&b->mutex);
		free(b);
		return NULL;
	}
	if (!subscriber)
		current_publisher = b;
	return b;
}

/*
 * Start connecting.  The outcome arrives later through me_broker_poll().
 */
bool
me_broker_connect(MeBroker *b, char *errbuf, int errlen)
{
	MQTTAsync_connectOptions opts = MQTTAsync_connectOptions_initializer;
	MQTTAsync_connectOptions opts5 = MQTTAsync_connectOptions_initializer5;
	MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
	MQTTAsync_connectOptions *o;
	const MeBrokerConfig *cfg = b->cfg;
	sigset_t	old;
	int			rc;

	if (b->version == MQTTVERSION_5)
	{
		o = &opts5;
		o->cleanstart = cfg->clean_session ? 1 : 0;
		o->onSuccess5 = on_connect_success5;
		o->onFailure5 = on_connect_failure5;
	}
	else
	{
		o = &opts;
		o->cleansession = cfg->clean_session ? 1 : 0;
		o->onSuccess = on_connect_success;
		o->onFailure = on_connect_failure;
		o->MQTTVersion = MQTTVERSION_3_1_1;
	}
	o->context = b;
	o->keepAliveInterval = cfg->keepalive;
	o->connectTimeout = 10;
	o->automaticReconnect = 0;
	o->maxInflight = 65535;
	if (cfg->username && cfg->username[0])
		o->username = cfg->username;
	if (cfg->password && cfg->password[0])
		o->password = cfg->password;

	if (strncmp(cfg->url, "ssl://", 6) == 0 ||
		strncmp(cfg->url, "mqtts://", 8) == 0 ||
		strncmp(cfg->url, "wss://", 6) == 0)
	{
		if (cfg->tls_ca_file && cfg->tls_ca_file[0])
			ssl.trustStore = cfg->tls_ca_file;
		if (cfg->tls_cert_file && cfg->tls_cert_file[0])
			ssl.keyStore = cfg->tls_cert_file;
		if (cfg->tls_key_file && cfg->tls_key_file[0])
			ssl.privateKey = cfg->tls_key_file;
		ssl.enableServerCertAuth = cfg->tls_verify ? 1 : 0;
		ssl.verify = cfg->tls_verify ? 1 : 0;
		o->ssl = &ssl;
	}

	pthread_mutex_lock(&b->mutex);
	b->state = BS_CONNECTING;
	pthread_mutex_unlock(&b->mutex);

	block_signals(&old);
	rc = MQTTAsync_connect(b->client, o);
	restore_signals(&old);

	if (rc != MQTTASYNC_SUCCESS)
	{
		pthread_mutex_lock(&b->mutex);
		b->state = BS_DISCONNECTED;
		pthread_mutex_unlock(&b->mutex);
		snprintf(errbuf, errlen, "cannot start connecting to \"%s\": %s (code %d)",
				 b->cfg->url, MQTTAsync_strerror(rc), rc);
		return false;
	}
	return true;
}

bool
me_broker_connected(MeBroker *b)
{
	bool		r;

	pthread_mutex_lock(&b->mutex);
	r = (b->state == BS_CONNECTED);
	pthread_mutex_unlock(&b->mutex);
	return r;
}

bool
me_broker_connecting(MeBroker *b)
{
	bool		r;

	pthread_mutex_lock(&b->mutex);
	r = (b->state == BS_CONNECTING);
	pthread_mutex_unlock(&b->mutex);
	return r;
}

/*
 * Take what the paho threads recorded.  The arrays are copied into palloc'd
 * memory of the current context; incoming messages stay malloc'd and the
 * caller frees each with me_broker_free_message().
 */
void
me_broker_poll(MeBroker *b, MeBrokerNews *news)
{
	uint64	   *acks = NULL;
	uint64	   *fails = NULL;
	uint64	   *rejs = NULL;
	int			nacks,
				nfails,
				nrejs;

	memset(news, 0, sizeof(*news));

	/* allocate outside the mutex, then copy inside */
	pthread_mutex_lock(&b->mutex);
	nacks = b->nacks;
	nfails = b->nfailures;
	nrejs = b->nrejects;
	pthread_mutex_unlock(&b->mutex);
	if (nacks > 0)
		acks = palloc(sizeof(uint64) * (nacks + 1024));
	if (nfails > 0)
		fails = palloc(sizeof(uint64) * (nfails + 1024));
	if (nrejs > 0)
		rejs = palloc(sizeof(uint64) * (nrejs + 1024));

	pthread_mutex_lock(&b->mutex);
	news->connected = b->news_connected;
	news->lost = b->news_lost;
	strlcpy(news->error, b->news_error, sizeof(news->error));
	b->news_connected = false;
	b->news_lost = false;

	if (acks && b->nacks > 0)
	{
		news->nacks = Min(b->nacks, nacks + 1024);
		memcpy(acks, b->acks, sizeof(uint64) * news->nacks);
		memmove(b->acks, b->acks + news->nacks,
				sizeof(uint64) * (b->nacks - news->nacks));
		b->nacks -= news->nacks;
		news->acks = acks;
	}
	if (fails && b->nfailures > 0)
	{
		news->nfailures = Min(b->nfailures, nfails + 1024);
		memcpy(fails, b->failures, sizeof(uint64) * news->nfailures);
		memmove(b->failures, b->failures + news->nfailures,
				sizeof(uint64) * (b->nfailures - news->nfailures));
		b->nfailures -= news->nfailures;
		news->failures = fails;
	}
	if (rejs && b->nrejects > 0)
	{
		news->nrejects = Min(b->nrejects, nrejs + 1024);
		memcpy(rejs, b->rejects, sizeof(uint64) * news->nrejects);
		memmove(b->rejects, b->rejects + news->nrejects,
				sizeof(uint64) * (b->nrejects - news->nrejects));
		b->nrejects -= news->nrejects;
		news->rejects = rejs;
	}
	news->incoming = b->in_head;
	b->in_head = b->in_tail = NULL;
	b->in_bytes = 0;
	news->incoming_dropped = b->in_dropped;
	b->in_dropped = 0;
	pthread_mutex_unlock(&b->mutex);

	/* someone may have been left with more; make sure we come back */
	if (news->nacks == nacks + 1024 || news->nfailures == nfails + 1024)
		SetLatch(b->latch);
}

/*
 * Publish one message; msgno comes back through me_broker_poll() as an ack or
 * a failure.  Returns 0, ME_BROKER_BACKPRESSURE when paho's buffer is full
 * (retry later), or another paho error code.
 */
int
me_broker_publish(MeBroker *b, const char *topic, const char *payload,
				  int len, int qos, bool is_json, uint64 msgno)
{
	MQTTAsync_responseOptions ropts = MQTTAsync_responseOptions_initializer;
	MQTTAsync_message msg = MQTTAsync_message_initializer;
	MQTTProperties props = MQTTProperties_initializer;
	int			rc;

	if (b->version == MQTTVERSION_5)
	{
		ropts.onSuccess5 = on_publish_success5;
		ropts.onFailure5 = on_publish_failure5;
	}
	else
	{
		ropts.onSuccess = on_publish_success;
		ropts.onFailure = on_publish_failure;
	}
	ropts.context = (void *) (uintptr_t) msgno;

	msg.payload = (void *) payload;
	msg.payloadlen = len;
	msg.qos = qos;
	msg.retained = 0;

	/* MQTT 5: say what the payload is */
	if (b->version == MQTTVERSION_5 && is_json)
	{
		MQTTProperty prop;

		prop.identifier = MQTTPROPERTY_CODE_PAYLOAD_FORMAT_INDICATOR;
		prop.value.byte = 1;	/* UTF-8 */
		MQTTProperties_add(&props, &prop);
		prop.identifier = MQTTPROPERTY_CODE_CONTENT_TYPE;
		prop.value.data.data = "application/json";
		prop.value.data.len = 16;
		MQTTProperties_add(&props, &prop);
		msg.properties = props;
	}

	rc = MQTTAsync_sendMessage(b->client, topic, &msg, &ropts);
	if (props.count > 0)
		MQTTProperties_free(&props);
	return rc;
}

int
me_broker_subscribe(MeBroker *b, const char *filter, int qos)
{
	MQTTAsync_responseOptions ropts = MQTTAsync_responseOptions_initializer;

	return MQTTAsync_subscribe(b->client, filter, qos, &ropts);
}

int
me_broker_unsubscribe(MeBroker *b, const char *filter)
{
	MQTTAsync_responseOptions ropts = MQTTAsync_responseOptions_initializer;

	return MQTTAsync_unsubscribe(b->client, filter, &ropts);
}

void
me_broker_disconnect(MeBroker *b, int timeout_ms)
{
	MQTTAsync_disconnectOptions opts = MQTTAsync_disconnectOptions_initializer;

	opts.timeout = timeout_ms;
	if (me_broker_connected(b))
		MQTTAsync_disconnect(b->client, &opts);
}

/*
 * Destroy the client and free everything it still holds.
 */
void
me_broker_destroy(MeBroker *b)
{
	MeIncoming *m;

	if (b == NULL)
		return;
	MQTTAsync_destroy(&b->client);
	if (current_publisher == b)
		current_publisher = NULL;
	pthread_mutex_lock(&b->mutex);
	m = b->in_head;
	b->in_head = b->in_tail = NULL;
	pthread_mutex_unlock(&b->mutex);
	while (m)
	{
		MeIncoming *next = m->next;

		free(m);
		m = next;
	}
	free(b->acks);
	free(b->failures);
	free(b->rejects);
	pthread_mutex_destroy(&b->mutex);
	free(b);
}

void
me_broker_free_message(MeIncoming *m)
{
	free(m);
}

const char *
me_broker_strerror(int rc)
{
	return MQTTAsync_strerror(rc);
}
