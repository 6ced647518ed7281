/*-------------------------------------------------------------------------
 *
 * broker.c
 *		A thin wrapper around one paho MQTTAsync client.
 *
 * paho runs its callbacks on threads of its own.  No PostgreSQL function
 * may run there: no palloc, no elog, no locks.  The callbacks (in
 * broker_callbacks.c) only record what happened in a mailbox (malloc'd
 * memory guarded by a pthread mutex) and set the worker's latch; the
 * worker's main loop empties the
 * mailbox with me_broker_poll() and acts on it.  Signals are blocked while
 * paho creates its threads, so that SIGTERM, SIGHUP and SIGURG (latches)
 * are always delivered to the main thread.
 *
 * paho notices a dead connection only through its keepalive, and only
 * when it has sent nothing for a whole keepalive interval: while the
 * worker publishes to a broker that stopped answering (a half-open
 * connection, a frozen broker), the writes keep succeeding into the socket
 * buffer and paho never pings.  Even when idle it needs up to 2.5 x
 * keepalive (a PINGREQ after one interval, then 1.5 intervals for the
 * PINGRESP).  So the worker watches the broker itself (me_broker_watch):
 * every answer from the broker (CONNACK, PUBACK/PUBCOMP, a received
 * message, UNSUBACK) counts as a sign of life; after half a keepalive
 * interval without one it sends a probe, an UNSUBSCRIBE of a filter it
 * never subscribed to (nothing is published, every broker answers with
 * UNSUBACK), and with no answer of any kind for a keepalive interval
 * after that, the connection counts as lost: at most 1.5 x keepalive
 * after the broker's last answer.
 *
 * Reconnection is driven by the worker, not by paho's automatic reconnect:
 * the worker knows when it wants to back off, resubscribe, or switch
 * brokers after a reload.  A client connects to one broker URL for its
 * whole life; failing over to the next broker of mqtt_emit.broker_url
 * means a new client (client.c), not paho's serverURIs, so that the worker
 * always knows which broker it is talking to.  This file touches no catalog and reads no
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
#include <time.h>

#include <MQTTAsync.h>

#include "miscadmin.h"
#include "storage/latch.h"

#include "pg_mqtt_emit.h"
#include "broker_int.h"
#include "pubprops.h"

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
 * Create a client of the broker at url (one of cfg->urls) for the current
 * settings.  Returns NULL and fills errbuf when paho refuses (for instance
 * a malformed URL).  A publisher publishes
 * with QoS max_qos at most (lowered by a broker that does not support
 * more).  latch is the worker's, the same for every client.
 */
MeBroker *
me_broker_create(const MeBrokerConfig *cfg, const char *broker_url,
				 const char *client_id, bool subscriber, Latch *latch, int max_qos,
				 char *errbuf, int errlen)
{
	MeBroker   *b = calloc(1, sizeof(MeBroker));
	MQTTAsync_createOptions copts = MQTTAsync_createOptions_initializer;
	sigset_t	old;
	int			rc;
	const char *url = broker_url;
	char		urlbuf[1024];

	if (b != NULL)
		b->url = strdup(broker_url);
	if (b == NULL || b->url == NULL)
	{
		free(b);
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

	if (me_worker_latch == NULL)
		me_worker_latch = latch;
	Assert(me_worker_latch == latch);

	b->subscriber = subscriber;
	b->cfg = cfg;
	b->max_qos = max_qos;
	b->connack_max_qos = -1;
	b->connack_sub_ids = -1;
	b->connack_shared = -1;
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
		rc = MQTTAsync_setCallbacks(b->client, b, me_cb_connection_lost,
									me_cb_message_arrived, NULL);
	else if (rc == MQTTASYNC_SUCCESS)
		rc = MQTTAsync_setConnectionLostCallback(b->client, b, me_cb_connection_lost);
	/* MQTT 5: a broker may say goodbye with a DISCONNECT (see the callback) */
	if (rc == MQTTASYNC_SUCCESS && b->version == MQTTVERSION_5)
		rc = MQTTAsync_setDisconnected(b->client, b, me_cb_disconnected5);
	restore_signals(&old);

	if (rc != MQTTASYNC_SUCCESS)
	{
		snprintf(errbuf, errlen, "cannot create MQTT client for \"%s\": %s",
				 b->url, MQTTAsync_strerror(rc));
		if (b->client)
			MQTTAsync_destroy(&b->client);
		pthread_mutex_destroy(&b->mutex);
		free(b->url);
		free(b);
		return NULL;
	}
	if (!subscriber)
	{
		pthread_mutex_lock(&me_publisher_mutex);
		me_current_publisher = b;
		pthread_mutex_unlock(&me_publisher_mutex);
	}
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
	MQTTProperties props = MQTTProperties_initializer;
	MQTTAsync_connectOptions *o;
	const MeBrokerConfig *cfg = b->cfg;
	sigset_t	old;
	int			rc;
	bool		clean;

	/*
	 * The subscriber keeps its session, so that the broker queues what is
	 * published while this server is away; the publisher sends again what
	 * was not acknowledged in any case.
	 */
	clean = b->subscriber ? cfg->session_expiry == 0 : cfg->clean_session;
	if (b->subscriber && b->session == ME_SESSION_FALLBACK)
		clean = true;
	if (b->version == MQTTVERSION_5)
	{
		o = &opts5;
		/* discard: a clean start, then the session expiry as usual */
		o->cleanstart = (clean || (b->subscriber && b->session == ME_SESSION_DISCARD)) ? 1 : 0;
		o->onSuccess5 = me_cb_connect_success5;
		o->onFailure5 = me_cb_connect_failure5;
		if (b->subscriber && !clean)
		{
			MQTTProperty prop;

			prop.identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL;
			prop.value.integer4 = (unsigned int) cfg->session_expiry;
			MQTTProperties_add(&props, &prop);
			o->connectProperties = &props;
		}
	}
	else
	{
		o = &opts;
		/* 3.1.1 has no clean start with a session: discard is clean */
		o->cleansession = (clean || (b->subscriber && b->session == ME_SESSION_DISCARD)) ? 1 : 0;
		o->onSuccess = me_cb_connect_success;
		o->onFailure = me_cb_connect_failure;
		o->MQTTVersion = MQTTVERSION_3_1_1;
	}
	o->context = b;
	o->keepAliveInterval = cfg->keepalive;
	o->connectTimeout = ME_CONNECT_TIMEOUT;
	o->automaticReconnect = 0;
	o->maxInflight = 65535;
	if (cfg->username && cfg->username[0])
		o->username = cfg->username;
	if (cfg->password && cfg->password[0])
		o->password = cfg->password;

	/* the same TLS settings for every broker of the list */
	if (strncmp(b->url, "ssl://", 6) == 0 ||
		strncmp(b->url, "mqtts://", 8) == 0 ||
		strncmp(b->url, "wss://", 6) == 0)
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
	if (props.count > 0)
		MQTTProperties_free(&props);	/* paho keeps a copy */

	if (rc != MQTTASYNC_SUCCESS)
	{
		pthread_mutex_lock(&b->mutex);
		b->state = BS_DISCONNECTED;
		pthread_mutex_unlock(&b->mutex);
		snprintf(errbuf, errlen, "cannot start connecting to \"%s\": %s (code %d)",
				 b->url, MQTTAsync_strerror(rc), rc);
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
 * An UNSUBSCRIBE of filter, its answer to the given callbacks (context b).
 * Returns paho's code; *token (when not NULL) gets the command's token, or 0.
 */
static int
unsubscribe_with(MeBroker *b, const char *filter,
				 MQTTAsync_onSuccess *ok, MQTTAsync_onSuccess5 *ok5,
				 MQTTAsync_onFailure *fail, MQTTAsync_onFailure5 *fail5, int *token)
{
	MQTTAsync_responseOptions ropts = MQTTAsync_responseOptions_initializer;
	int			rc;

	ropts.context = b;
	if (b->version == MQTTVERSION_5)
	{
		ropts.onSuccess5 = ok5;
		ropts.onFailure5 = fail5;
	}
	else
	{
		ropts.onSuccess = ok;
		ropts.onFailure = fail;
	}
	rc = MQTTAsync_unsubscribe(b->client, filter, &ropts);
	if (token)
		*token = (rc == MQTTASYNC_SUCCESS) ? ropts.token : 0;
	return rc;
}

/*
 * When the next nudge is due (see me_broker_watch()): ME_NUDGE_MS after the
 * last outcome or message, then every 5 x ME_NUDGE_MS.  Under b->mutex.
 */
static int64
nudge_due(MeBroker *b)
{
	int64		quiet = Max(b->last_outcome, b->last_submit);

	return (b->nudged_at < quiet) ? quiet + ME_NUDGE_MS :
		b->nudged_at + 5 * ME_NUDGE_MS;
}

/*
 * The watchdog (see the top of this file), called by the worker in every
 * round: sends a probe when the broker was quiet for half a keepalive
 * interval, and declares the connection lost (news lost, as if paho had
 * reported it) when nothing at all came for a keepalive interval after
 * that.  Lowers *timeout_ms to when it wants to look again.
 *
 * Returns true when the worker should leave the client alone: connected,
 * connecting, or its loss not yet taken with me_broker_poll().
 */
bool
me_broker_watch(MeBroker *b, long *timeout_ms)
{
	int64		k = (int64) b->cfg->keepalive * 1000;
	int64		now = me_broker_mono_ms();
	int64		next;
	bool		send_probe = false;
	bool		send_nudge = false;

	pthread_mutex_lock(&b->mutex);
	if (b->news_lost || b->state == BS_CONNECTING)
	{
		pthread_mutex_unlock(&b->mutex);
		return true;
	}
	if (b->state != BS_CONNECTED)
	{
		pthread_mutex_unlock(&b->mutex);
		return false;
	}
	if (b->probe_out)
	{
		/*
		 * Waiting since the probe was sent, or, when something else was
		 * heard after it (the probe still queued behind messages), since the
		 * broker went quiet again for half an interval.
		 */
		next = Max(b->probe_since, b->last_heard + k / 2) + k;
		if (now >= next)
		{
			b->state = BS_DISCONNECTED;
			b->news_lost = true;
			b->stale = true;
			snprintf(b->news_error, sizeof(b->news_error),
					 "no answer from the broker for %.1f s (mqtt_emit.keepalive is %d s): "
					 "connection considered lost",
					 (double) (now - b->last_heard) / 1000.0, b->cfg->keepalive);
			pthread_mutex_unlock(&b->mutex);
			return true;
		}
	}
	else if (now - b->last_heard >= k / 2)
	{
		/* mark it before sending: the answer may come at once */
		send_probe = true;
		b->probe_out = true;
		b->probe_since = now;
		next = now + k;
	}
	else
		next = b->last_heard + k / 2;

	/*
	 * The nudge.  paho's send thread writes the messages that the worker
	 * hands over; when a write is cut short by a full socket buffer,
	 * paho's receive thread finishes it once the socket drains, but does
	 * not wake the send thread (MQTTAsync_writeComplete, as read in paho
	 * 1.3.12 and 1.3.13), which then sleeps out its 1 s wait with messages
	 * queued behind the written one (batched messages of 256 kB did, see
	 * MAX_INFLIGHT_BYTES in inflight.c; single events can when the broker
	 * falls behind).  Any new command wakes the send thread: when
	 * messages are in paho's hands and nothing happened for ME_NUDGE_MS
	 * (no outcome, no new message), the worker sends an UNSUBSCRIBE of the
	 * probe filter (as the probe does).
	 * It is queued behind those messages, so its answer comes late; while
	 * the quiet lasts, another follows every 5 x ME_NUDGE_MS, at most
	 * ME_NUDGES_MAX unanswered (a frozen broker is the watchdog's case).
	 */
	if (!b->subscriber && b->submitted > b->completed &&
		b->nudges_out < ME_NUDGES_MAX)
	{
		int64		due = nudge_due(b);

		if (now >= due)
		{
			send_nudge = true;
			b->nudges_out++;
			b->nudged_at = now;
			due = now + 5 * ME_NUDGE_MS;
		}
		next = Min(next, due);
	}
	pthread_mutex_unlock(&b->mutex);

	if (send_nudge &&
		unsubscribe_with(b, ME_PROBE_FILTER, me_cb_nudge_done, me_cb_nudge_done5,
						 me_cb_nudge_failed, me_cb_nudge_failed5, NULL) != MQTTASYNC_SUCCESS)
	{
		pthread_mutex_lock(&b->mutex);
		b->nudges_out--;
		pthread_mutex_unlock(&b->mutex);
	}

	/*
	 * A probe not sent (paho refuses while it is disconnecting): the
	 * deadline stands, paho reports the loss first if it knows of it.
	 */
	if (send_probe)
		(void) unsubscribe_with(b, ME_PROBE_FILTER, me_cb_probe_success, me_cb_probe_success5,
								me_cb_probe_failure, me_cb_probe_failure5, NULL);

	*timeout_ms = Min(*timeout_ms, (long) Max(next - now, 0) + 1);
	return true;
}

/*
 * After the worker's round published: when messages wait in paho, look
 * again (me_broker_watch, the nudge) within ME_NUDGE_MS.
 */
void
me_broker_nudge_timeout(MeBroker *b, long *timeout_ms)
{
	int64		now;
	int64		due = -1;

	if (b->subscriber)
		return;
	now = me_broker_mono_ms();
	pthread_mutex_lock(&b->mutex);
	if (b->state == BS_CONNECTED && b->submitted > b->completed &&
		b->nudges_out < ME_NUDGES_MAX)
		due = nudge_due(b);
	pthread_mutex_unlock(&b->mutex);
	if (due >= 0)
		*timeout_ms = Min(*timeout_ms, (long) Max(due - now, 0) + 1);
}

/*
 * Was the connection given up by the watchdog?  paho still takes it for
 * connected: the client must be destroyed, not reconnected.
 */
bool
me_broker_stale(MeBroker *b)
{
	bool		r;

	pthread_mutex_lock(&b->mutex);
	r = b->stale;
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
	int			qos2_token;
	int			nsubs;
	MeSubOutcome *subs = NULL;

	memset(news, 0, sizeof(*news));
	news->broker_max_qos = -1;

	/* allocate outside the mutex, then copy inside */
	pthread_mutex_lock(&b->mutex);
	nacks = b->nacks;
	nfails = b->nfailures;
	nrejs = b->nrejects;
	nsubs = b->nsubacks;
	pthread_mutex_unlock(&b->mutex);
	if (nsubs > 0)
		subs = palloc(sizeof(MeSubOutcome) * (nsubs + 64));
	if (nacks > 0)
		acks = palloc(sizeof(uint64) * (nacks + 1024));
	if (nfails > 0)
		fails = palloc(sizeof(uint64) * (nfails + 1024));
	if (nrejs > 0)
		rejs = palloc(sizeof(uint64) * (nrejs + 1024));

	pthread_mutex_lock(&b->mutex);
	news->connected = b->news_connected;
	if (news->connected)
		news->broker_max_qos = b->connack_max_qos;
	news->lost = b->news_lost;
	strlcpy(news->error, b->news_error, sizeof(news->error));
	if (news->lost)
		news->connack_code = b->news_connack_code;
	b->news_connected = false;
	b->news_lost = false;
	b->news_connack_code = 0;

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
	news->nbusy = b->nbusy;
	b->nbusy = 0;
	if (rejs && b->nrejects > 0)
	{
		news->nrejects = Min(b->nrejects, nrejs + 1024);
		memcpy(rejs, b->rejects, sizeof(uint64) * news->nrejects);
		memmove(b->rejects, b->rejects + news->nrejects,
				sizeof(uint64) * (b->nrejects - news->nrejects));
		b->nrejects -= news->nrejects;
		news->rejects = rejs;
	}
	if (subs && b->nsubacks > 0)
	{
		news->nsubacks = Min(b->nsubacks, nsubs + 64);
		memcpy(subs, b->subacks, sizeof(MeSubOutcome) * news->nsubacks);
		memmove(b->subacks, b->subacks + news->nsubacks,
				sizeof(MeSubOutcome) * (b->nsubacks - news->nsubacks));
		b->nsubacks -= news->nsubacks;
		news->subacks = subs;
	}
	news->incoming = b->in_head;
	b->in_head = b->in_tail = NULL;
	b->in_bytes = 0;
	news->incoming_dropped = b->in_dropped;
	b->in_dropped = 0;
	qos2_token = b->qos2_token;
	b->qos2_token = 0;
	if (qos2_token != 0)
		b->qos2_checked = true;
	pthread_mutex_unlock(&b->mutex);

	/* a broker that supports less than QoS 2 says so in its CONNACK (MQTT 5) */
	if (news->broker_max_qos >= 0 && news->broker_max_qos < b->max_qos)
		b->max_qos = news->broker_max_qos;

	/*
	 * paho calls a QoS 2 message's onSuccess on its PUBCOMP, after it
	 * forgot the message.  A broker that does not support QoS 2 (RabbitMQ)
	 * answers with a PUBACK: paho calls onSuccess too, but keeps the
	 * message in flight for good, and publishing stops once paho's window
	 * is full of them.  So look once per connection whether paho still
	 * holds the first QoS 2 message acknowledged (this cannot be asked on
	 * paho's thread, which holds paho's lock in the callback).
	 */
	if (qos2_token != 0 &&
		MQTTAsync_isComplete(b->client, qos2_token) != MQTTASYNC_TRUE)
	{
		news->qos_downgraded = true;
		b->max_qos = Min(b->max_qos, 1);
	}

	/* someone may have been left with more; make sure we come back */
	if (news->nacks == nacks + 1024 || news->nfailures == nfails + 1024 ||
		(subs && news->nsubacks == nsubs + 64))
		me_broker_wake_worker();
}

/*
 * The MQTT 5 properties of an ad-hoc publish (records made by
 * pubprops.c, props_len bytes at props) added to props.  A record that
 * cannot be read ends the list.
 */
static void
add_publish_properties(MQTTProperties *mp, const char *props, int props_len)
{
	const char *pos = props;
	const char *end = props + props_len;
	char		tag;
	const char *value;
	int			value_len;
	const char *name = NULL;
	int			name_len = 0;

	while (me_pubprops_next(&pos, end, &tag, &value, &value_len))
	{
		MQTTProperty prop;

		memset(&prop, 0, sizeof(prop));
		switch (tag)
		{
			case ME_PROP_CONTENT_TYPE:
				prop.identifier = MQTTPROPERTY_CODE_CONTENT_TYPE;
				break;
			case ME_PROP_RESPONSE_TOPIC:
				prop.identifier = MQTTPROPERTY_CODE_RESPONSE_TOPIC;
				break;
			case ME_PROP_CORRELATION:
				prop.identifier = MQTTPROPERTY_CODE_CORRELATION_DATA;
				break;
			case ME_PROP_EXPIRY:
				{
					char		num[16];

					if (value_len >= (int) sizeof(num))
						continue;
					memcpy(num, value, value_len);
					num[value_len] = '\0';
					prop.identifier = MQTTPROPERTY_CODE_MESSAGE_EXPIRY_INTERVAL;
					prop.value.integer4 = (unsigned int) strtoul(num, NULL, 10);
					MQTTProperties_add(mp, &prop);
				}
				continue;
			case ME_PROP_USER_NAME:
				name = value;
				name_len = value_len;
				continue;
			case ME_PROP_USER_VALUE:
				if (name == NULL)
					continue;
				prop.identifier = MQTTPROPERTY_CODE_USER_PROPERTY;
				prop.value.data.data = (char *) name;
				prop.value.data.len = name_len;
				prop.value.value.data = (char *) value;
				prop.value.value.len = value_len;
				MQTTProperties_add(mp, &prop);
				name = NULL;
				continue;
			default:
				continue;
		}
		prop.value.data.data = (char *) value;
		prop.value.data.len = value_len;
		MQTTProperties_add(mp, &prop);
	}
}

/*
 * Publish one message; msgno comes back through me_broker_poll() as an ack or
 * a failure.  Returns 0, ME_BROKER_BACKPRESSURE when paho's buffer is full
 * (retry later), or another paho error code.  Under MQTT 5 a row event
 * (is_json) says that it is JSON and carries its event id (when event_id
 * is not empty) as the user property "event-id"; an ad-hoc publish carries
 * the properties encoded at props.  Under MQTT 3.1.1 there are none.
 */
int
me_broker_publish(MeBroker *b, const char *topic, const char *payload,
				  int len, int qos, bool retain, bool is_json,
				  const char *props, int props_len,
				  const char *event_id, uint64 msgno)
{
	MQTTAsync_responseOptions ropts = MQTTAsync_responseOptions_initializer;
	MQTTAsync_message msg = MQTTAsync_message_initializer;
	MQTTProperties mprops = MQTTProperties_initializer;
	int			rc;

	if (b->version == MQTTVERSION_5)
	{
		ropts.onSuccess5 = me_cb_publish_success5;
		ropts.onFailure5 = me_cb_publish_failure5;
	}
	else
	{
		ropts.onSuccess = me_cb_publish_success;
		ropts.onFailure = me_cb_publish_failure;
	}
	ropts.context = (void *) (uintptr_t) msgno;

	msg.payload = (void *) payload;
	msg.payloadlen = len;
	/*
	 * At most what the broker supports.  connack_max_qos is written before
	 * the state becomes connected, which the caller saw under the mutex.
	 */
	if (b->connack_max_qos >= 0)
		qos = Min(qos, b->connack_max_qos);
	msg.qos = Min(qos, b->max_qos);
	msg.retained = retain ? 1 : 0;

	/* MQTT 5: say what the payload is */
	if (b->version == MQTTVERSION_5 && is_json)
	{
		MQTTProperty prop;

		prop.identifier = MQTTPROPERTY_CODE_PAYLOAD_FORMAT_INDICATOR;
		prop.value.byte = 1;	/* UTF-8 */
		MQTTProperties_add(&mprops, &prop);
		prop.identifier = MQTTPROPERTY_CODE_CONTENT_TYPE;
		prop.value.data.data = "application/json";
		prop.value.data.len = 16;
		MQTTProperties_add(&mprops, &prop);
		if (event_id != NULL && event_id[0] != '\0')
		{
			prop.identifier = MQTTPROPERTY_CODE_USER_PROPERTY;
			prop.value.data.data = "event-id";
			prop.value.data.len = 8;
			prop.value.value.data = (char *) event_id;
			prop.value.value.len = strlen(event_id);
			MQTTProperties_add(&mprops, &prop);
		}
	}
	if (b->version == MQTTVERSION_5 && props != NULL && props_len > 0)
		add_publish_properties(&mprops, props, props_len);
	if (mprops.count > 0)
		msg.properties = mprops;

	rc = MQTTAsync_sendMessage(b->client, topic, &msg, &ropts);
	if (mprops.count > 0)
		MQTTProperties_free(&mprops);
	if (rc == MQTTASYNC_SUCCESS)
	{
		b->submitted++;
		b->last_submit = me_broker_mono_ms();
	}
	return rc;
}

int
me_broker_subscribe(MeBroker *b, const char *filter, int qos)
{
	MQTTAsync_responseOptions ropts = MQTTAsync_responseOptions_initializer;

	return MQTTAsync_subscribe(b->client, filter, qos, &ropts);
}

/*
 * Subscribe, and have the broker's answer come back through
 * me_broker_poll() (news->subacks) with *token, which this sets.  Under
 * MQTT 5 a sub_id other than 0 goes with it as the subscription's
 * Subscription Identifier, which the broker puts on every message it
 * sends through it.  With no_retained (MQTT 5 only) the broker sends no
 * retained messages when the subscription is made.  Returns 0 or paho's
 * error code (nothing comes back then).
 */
int
me_broker_subscribe_tracked(MeBroker *b, const char *filter, int qos, uint32 sub_id,
							bool no_retained, int *token)
{
	MQTTAsync_responseOptions ropts = MQTTAsync_responseOptions_initializer;
	int			rc;

	ropts.context = b;
	if (b->version == MQTTVERSION_5)
	{
		ropts.onSuccess5 = me_cb_subscribe_success5;
		ropts.onFailure5 = me_cb_subscribe_failure5;
		/* Retain Handling 2: no retained messages at the SUBSCRIBE */
		if (no_retained)
			ropts.subscribeOptions.retainHandling = 2;
		if (sub_id > 0)
		{
			MQTTProperty prop;

			prop.identifier = MQTTPROPERTY_CODE_SUBSCRIPTION_IDENTIFIER;
			prop.value.integer4 = sub_id;
			MQTTProperties_add(&ropts.properties, &prop);
		}
	}
	else
	{
		ropts.onSuccess = me_cb_subscribe_success;
		ropts.onFailure = me_cb_subscribe_failure;
	}
	rc = MQTTAsync_subscribe(b->client, filter, qos, &ropts);
	if (ropts.properties.count > 0)
		MQTTProperties_free(&ropts.properties);	/* paho keeps a copy */
	*token = (rc == MQTTASYNC_SUCCESS) ? ropts.token : 0;
	return rc;
}

/*
 * Unsubscribe, and have the broker's answer come back like a SUBSCRIBE's
 * (news->subacks, unsubscribe set) with *token.  Returns 0 or paho's error
 * code.
 */
int
me_broker_unsubscribe_tracked(MeBroker *b, const char *filter, int *token)
{
	return unsubscribe_with(b, filter, me_cb_unsubscribe_success, me_cb_unsubscribe_success5,
							me_cb_unsubscribe_failure, me_cb_unsubscribe_failure5, token);
}

/*
 * What the connected broker supports of what share groups need: MQTT 5
 * Subscription Identifiers and shared subscriptions.  An MQTT 5 broker
 * says in its CONNACK when it does not (absent means available); MQTT
 * 3.1.1 has no Subscription Identifiers.
 */
void
me_broker_features(MeBroker *b, bool *sub_ids, bool *shared)
{
	pthread_mutex_lock(&b->mutex);
	*sub_ids = b->version == MQTTVERSION_5 && b->connack_sub_ids != 0;
	*shared = b->version == MQTTVERSION_5 && b->connack_shared != 0;
	pthread_mutex_unlock(&b->mutex);
}

/*
 * What a refusing SUBACK code means: MQTT 5's reason codes by paho's
 * names, 3.1.1's only failure code 0x80 as the standard calls it.
 */
const char *
me_broker_reason_text(MeBroker *b, int code)
{
	const char *s;

	if (b->version != MQTTVERSION_5)
		return code == 0x80 ? "Failure" : "Unknown return code";
	s = MQTTReasonCode_toString((enum MQTTReasonCodes) code);
	return s ? s : "Unknown reason code";
}

/*
 * Start disconnecting: paho waits up to timeout_ms for messages in flight
 * to complete, then sends DISCONNECT and closes the socket; the client
 * counts as disconnected from then on (me_broker_wait_disconnected).
 */
void
me_broker_disconnect(MeBroker *b, int timeout_ms)
{
	MQTTAsync_disconnectOptions opts = MQTTAsync_disconnectOptions_initializer;
	MQTTAsync_disconnectOptions opts5 = MQTTAsync_disconnectOptions_initializer5;
	MQTTAsync_disconnectOptions *o;

	if (b->version == MQTTVERSION_5)
	{
		o = &opts5;
		o->onSuccess5 = me_cb_disconnect_done5;
		o->onFailure5 = me_cb_disconnect_failed5;
	}
	else
	{
		o = &opts;
		o->onSuccess = me_cb_disconnect_done;
		o->onFailure = me_cb_disconnect_failed;
	}
	o->context = b;
	o->timeout = timeout_ms;
	if (me_broker_connected(b) &&
		MQTTAsync_disconnect(b->client, o) != MQTTASYNC_SUCCESS)
	{
		/* paho refuses (already disconnecting): nothing will come */
		pthread_mutex_lock(&b->mutex);
		b->state = BS_DISCONNECTED;
		pthread_mutex_unlock(&b->mutex);
	}
}

/*
 * Wait up to timeout_ms for a disconnect started by me_broker_disconnect
 * (or a loss) to close the connection; true when it did.  After that paho
 * receives, and acknowledges, nothing more on this client.
 */
bool
me_broker_wait_disconnected(MeBroker *b, int timeout_ms)
{
	int64		deadline = me_broker_mono_ms() + timeout_ms;

	for (;;)
	{
		bool		done;

		pthread_mutex_lock(&b->mutex);
		done = (b->state != BS_CONNECTED);
		pthread_mutex_unlock(&b->mutex);
		if (done)
			return true;
		if (me_broker_mono_ms() >= deadline)
			return false;

		/*
		 * Not WaitLatch: this also runs after the postmaster died, when it
		 * returns at once; a bounded wait at exit.
		 */
		pg_usleep(5000L);
	}
}

/*
 * The session the subscriber's next connect asks for (ME_SESSION_OWN
 * unless set).
 */
void
me_broker_set_session(MeBroker *b, MeSessionMode mode)
{
	b->session = mode;
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
	/* publish completions that still come find no publisher */
	pthread_mutex_lock(&me_publisher_mutex);
	if (me_current_publisher == b)
		me_current_publisher = NULL;
	pthread_mutex_unlock(&me_publisher_mutex);
	MQTTAsync_destroy(&b->client);
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
	free(b->subacks);
	pthread_mutex_destroy(&b->mutex);
	free(b->url);
	free(b);
}

void
me_broker_free_message(MeIncoming *m)
{
	free(m);
}

/* the broker URL the client connects to */
const char *
me_broker_url(MeBroker *b)
{
	return b->url;
}

const char *
me_broker_strerror(int rc)
{
	return MQTTAsync_strerror(rc);
}
