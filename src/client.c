/*-------------------------------------------------------------------------
 *
 * client.c
 *		The worker's two MQTT client slots: the publisher (client id
 *		mqtt_emit.client_id) and the subscriber (<client_id>-subscriber).
 *
 * A slot creates its client when a connection is due, starts connecting,
 * and schedules the next attempt with exponential backoff between
 * mqtt_emit.reconnect_min and reconnect_max; paho's automatic reconnect is
 * not used.  The broker settings are read once into a snapshot, which is
 * what broker.c connects with (it reads no setting itself); after a reload
 * the worker compares the snapshot with the settings and, when they
 * differ, destroys both clients and takes a new snapshot.  Problems are
 * logged once at LOG while they repeat, then at DEBUG1.
 *
 * mqtt_emit.broker_url may list several brokers (the nodes of one cluster,
 * or a primary and a standby).  Each slot walks the list on its own: it
 * connects to one URL at a time, and when that connect fails or the
 * connection is lost it destroys the client and tries the next URL at
 * once; only after a whole round of the list failed does it wait out the
 * backoff.  A slot stays with a broker that works: it does not go back to
 * the first of the list by itself.  paho's own list (serverURIs) is not
 * used: it starts from the first URL at every connect and reports only the
 * last failure, and here the worker knows which broker each client is on
 * (mqtt_emit.stats shows it).  While no broker answers, events wait in the
 * queue and the outbox as for a single broker.
 *
 * A publisher whose connection is lost is destroyed at once: paho would
 * otherwise send what it still buffers ahead of the unacknowledged events
 * that are sent again from the oldest one, out of order.  So is a client
 * whose connection the watchdog gave up (broker.c): paho still takes it for
 * connected.
 *
 * The subscriber's persistent session (session_expiry > 0) lives on one
 * broker node in some clusters: RabbitMQ keeps it as a queue on the node
 * where it was made, and while that node is down it refuses the client id
 * on every other node (3.10 closes the connection at the SUBSCRIBE, 3.13
 * and 4.0 refuse the CONNECT with "server unavailable"), whether the
 * session is asked to be kept or not.  Without more, the subscriber would
 * reconnect to the other node for as long as the first one is away.  So
 * when the broker ends the connection in one of these ways twice in a row
 * (and never answered a SUBSCRIBE on it), the subscriber falls back: it
 * connects with a clean session as <client_id>-subscriber-fallback, which
 * any node accepts, and warns once.  While it is connected that way it
 * receives as usual; what is published while it is disconnected is not
 * kept for it, and what the old session held is given up.  When the
 * fallback connection ends, the subscriber comes back to its own client
 * id with a clean session first (ME_SESSION_DISCARD: the broker drops the
 * old session, whose queue got again, as a duplicate, everything published
 * since its node came back), then with its persistent session from the
 * next connection on (MQTT 5 does both in one connection).  If the own id
 * is still refused, it falls back again at once.  Which client id is
 * stale is kept in this process only: a worker that starts again tries
 * its own session first.
 *
 * Settings that cannot work are refused here, once, with a WARNING that
 * names the setting, and no connection is tried until they change (a
 * password without a user name: MQTT 3.1.1 forbids it, and the broker
 * would only close every connection).  A broker that does not support the
 * configured QoS (Maximum QoS in an MQTT 5 CONNACK, or a PUBACK for a QoS 2
 * message) is published to with the QoS it supports, with a WARNING, until
 * the broker settings change.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/client.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "worker.h"

/* The state of one MQTT client and its reconnection schedule. */
typedef struct ClientSlot
{
	MeBroker   *broker;
	bool		subscriber;
	TimestampTz next_attempt;
	int			backoff_ms;
	bool		was_connected;
	int			max_qos;		/* highest QoS the broker supports, as far as known */
	uint64		connections;	/* connections made so far */
	int			url_index;		/* the URL of config.urls tried or in use */
	int			failed_in_round;	/* URLs failed since the last connection */
	bool		same_url;		/* reconnect to the same URL (not a failure) */
	char		last_logged[MQTT_EMIT_MAX_BROKER_URLS][256];	/* per URL */

	/* the subscriber's session (see the top of this file) */
	MeSessionMode session;		/* what the next connection asks for */
	MeSessionMode conn_session; /* what the current one asked for */
	bool		conn_up;		/* the current connection was made */
	bool		conn_subacked;	/* ... and a SUBSCRIBE on it was answered */
	int			conn_connack;	/* the last connect's refusing CONNACK code, or 0 */
	int			strikes[MQTT_EMIT_MAX_BROKER_URLS]; /* own session refused in a row */
} ClientSlot;

/* the subscriber's own session may still hold what the fallback received */
static bool own_session_stale = false;

static void session_works(ClientSlot *slot);

static ClientSlot slots[2] = {{NULL, false}, {NULL, true}};

/* the settings the clients were made with; outlives them */
static MeBrokerConfig config;

/* the settings cannot work: connect to no broker until they change */
static bool config_refused = false;

static char *
dup_setting(char *old, const char *val)
{
	if (old)
		pfree(old);
	return MemoryContextStrdup(TopMemoryContext, val ? val : "");
}

/*
 * Split config.url into config.urls, in TopMemoryContext.  The setting's
 * check hook made sure that the list is short and every URL valid.
 */
static void
take_url_list(void)
{
	MemoryContext old;
	int			i;

	if (config.urls == NULL)
		config.urls = MemoryContextAllocZero(TopMemoryContext,
											 sizeof(char *) * MQTT_EMIT_MAX_BROKER_URLS);
	for (i = 0; i < config.nurls; i++)
		pfree(config.urls[i]);
	old = MemoryContextSwitchTo(TopMemoryContext);
	config.nurls = Min(me_broker_url_list(config.url, config.urls,
										  MQTT_EMIT_MAX_BROKER_URLS),
					   MQTT_EMIT_MAX_BROKER_URLS);
	MemoryContextSwitchTo(old);
}

static void
take_settings(void)
{
	config.url = dup_setting(config.url, mqtt_emit_broker_url);
	take_url_list();
	config.client_id = dup_setting(config.client_id, me_client_id());
	config.username = dup_setting(config.username, mqtt_emit_username);
	config.password = dup_setting(config.password, mqtt_emit_password);
	config.tls_ca_file = dup_setting(config.tls_ca_file, mqtt_emit_tls_ca_file);
	config.tls_cert_file = dup_setting(config.tls_cert_file, mqtt_emit_tls_cert_file);
	config.tls_key_file = dup_setting(config.tls_key_file, mqtt_emit_tls_key_file);
	config.tls_verify = mqtt_emit_tls_verify;
	config.mqtt_version = mqtt_emit_mqtt_version;
	config.keepalive = mqtt_emit_keepalive;
	config.clean_session = mqtt_emit_clean_session;
	config.session_expiry = mqtt_emit_session_expiry;

	/*
	 * MQTT 3.1.1 (3.1 [MQTT-3.1.2-22]) allows a password only together with
	 * a user name; MQTT 5 allows it alone.
	 */
	config_refused = false;
	if (config.password[0] != '\0' && config.username[0] == '\0' &&
		config.mqtt_version != 5)
	{
		config_refused = true;
		me_set_last_error("publisher: mqtt_emit.password is set but mqtt_emit.username is empty");
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("pg_mqtt_emit does not connect to the broker: \"mqtt_emit.password\" is set but \"mqtt_emit.username\" is empty"),
				 errdetail("MQTT 3.1.1 allows a password only together with a user name; the broker would close every connection."),
				 errhint("Set \"mqtt_emit.username\" and reload the configuration, or remove \"mqtt_emit.password\" and restart the server.")));
	}
}

static bool
differs(const char *snap, const char *val)
{
	return strcmp(snap, val ? val : "") != 0;
}

/*
 * Do the settings differ from the snapshot the clients were made with?
 */
bool
me_client_settings_changed(void)
{
	return differs(config.url, mqtt_emit_broker_url) ||
		differs(config.client_id, me_client_id()) ||
		differs(config.username, mqtt_emit_username) ||
		differs(config.password, mqtt_emit_password) ||
		differs(config.tls_ca_file, mqtt_emit_tls_ca_file) ||
		differs(config.tls_cert_file, mqtt_emit_tls_cert_file) ||
		differs(config.tls_key_file, mqtt_emit_tls_key_file) ||
		config.tls_verify != mqtt_emit_tls_verify ||
		config.mqtt_version != mqtt_emit_mqtt_version ||
		config.keepalive != mqtt_emit_keepalive ||
		config.clean_session != mqtt_emit_clean_session ||
		config.session_expiry != mqtt_emit_session_expiry;
}

static void
reset_schedule(ClientSlot *slot)
{
	memset(slot->last_logged, 0, sizeof(slot->last_logged));
	slot->url_index = 0;
	slot->failed_in_round = 0;
	slot->same_url = false;
	slot->next_attempt = 0;
	slot->backoff_ms = mqtt_emit_reconnect_min;
	slot->max_qos = 2;			/* a new broker: nothing known yet */
	memset(slot->strikes, 0, sizeof(slot->strikes));
	slot->session = own_session_stale ? ME_SESSION_DISCARD : ME_SESSION_OWN;
	slot->conn_session = slot->session;
	slot->conn_up = slot->conn_subacked = false;
	slot->conn_connack = 0;
}

void
me_client_init(void)
{
	take_settings();
	reset_schedule(&slots[ME_CLIENT_PUBLISHER]);
	reset_schedule(&slots[ME_CLIENT_SUBSCRIBER]);
}

/*
 * The broker settings changed: start over with new clients (the caller
 * forgets what was in flight).
 */
void
me_client_restart(void)
{
	ereport(LOG,
			(errmsg("pg_mqtt_emit broker settings changed, reconnecting to \"%s\"",
					mqtt_emit_broker_url)));
	me_client_destroy_all();
	take_settings();
	reset_schedule(&slots[ME_CLIENT_PUBLISHER]);
	reset_schedule(&slots[ME_CLIENT_SUBSCRIBER]);
}

/* the URL the slot tries or uses */
static const char *
slot_url(ClientSlot *slot)
{
	return config.nurls > 0 ? config.urls[slot->url_index] : config.url;
}

/*
 * The slot's broker failed (a connect failed, or the connection was lost):
 * with a list, drop the client, which is bound to its URL, and move on to
 * the next URL, at once unless the whole list failed in this round (then
 * the backoff already scheduled stands).
 */
static void
next_url(ClientSlot *slot)
{
	if (config.nurls <= 1)
		return;
	if (slot->same_url)
	{
		slot->same_url = false;
		return;
	}
	if (slot->broker)
	{
		me_broker_destroy(slot->broker);
		slot->broker = NULL;
	}
	slot->url_index = (slot->url_index + 1) % config.nurls;
	if (++slot->failed_in_round < config.nurls)
	{
		/* the loop may have computed its wait already: come back at once */
		slot->next_attempt = 0;
		SetLatch(MyLatch);
	}
	else
		slot->failed_in_round = 0;
}

/*
 * Log a broker problem: at LOG the first time it is seen, then at DEBUG1
 * while the same message repeats, so that an absent broker does not flood
 * the server log.
 */
static void
report_problem(ClientSlot *slot, const char *msg)
{
	const char *who = slot->subscriber ? "subscriber" : "publisher";
	char	   *logged = slot->last_logged[slot->url_index];

	me_set_last_error("%s: %s", who, msg);
	if (strcmp(logged, msg) != 0)
	{
		if (config.nurls > 1)
			ereport(LOG,
					(errmsg("pg_mqtt_emit %s cannot reach broker \"%s\": %s",
							who, slot_url(slot), msg),
					 errhint("The next broker of \"mqtt_emit.broker_url\" is tried; events wait in the queue until one answers.")));
		else
			ereport(LOG,
					(errmsg("pg_mqtt_emit %s cannot reach broker \"%s\": %s",
							who, slot_url(slot), msg),
					 errhint("Events wait in the queue and are published when the broker is back.")));
		strlcpy(logged, msg, sizeof(slot->last_logged[0]));
	}
	else
		ereport(DEBUG1,
				(errmsg("pg_mqtt_emit %s still cannot reach broker: %s", who, msg)));
}

/*
 * Create and connect the client when it is due; lower *timeout so that
 * the loop wakes up for the next attempt.
 */
void
me_client_service(MeClientRole role, TimestampTz now, long *timeout)
{
	ClientSlot *slot = &slots[role];
	char		err[256];

	/* connected (and watched), connecting, or its loss not taken yet */
	if (slot->broker && me_broker_watch(slot->broker, timeout))
		return;
	if (config_refused)
		return;

	if (now < slot->next_attempt)
	{
		long		wait = (long) ((slot->next_attempt - now) / 1000) + 1;

		*timeout = Min(*timeout, wait);
		return;
	}

	if (slot->broker == NULL)
	{
		char		cid[512];

		if (slot->subscriber && config.session_expiry > 0 &&
			slot->session == ME_SESSION_FALLBACK)
			snprintf(cid, sizeof(cid), "%s-subscriber-fallback", config.client_id);
		else if (slot->subscriber)
			snprintf(cid, sizeof(cid), "%s-subscriber", config.client_id);
		else
			strlcpy(cid, config.client_id, sizeof(cid));
		slot->broker = me_broker_create(&config, slot_url(slot), cid,
										slot->subscriber, MyLatch,
										slot->max_qos, err, sizeof(err));

		if (slot->broker == NULL)
		{
			report_problem(slot, err);
			slot->next_attempt = now + (TimestampTz) mqtt_emit_reconnect_max * 1000;
			*timeout = Min(*timeout, mqtt_emit_reconnect_max);
			next_url(slot);
			return;
		}
	}

	/* schedule the next attempt in case this one fails */
	slot->next_attempt = now + (TimestampTz) slot->backoff_ms * 1000;
	*timeout = Min(*timeout, slot->backoff_ms);
	slot->backoff_ms = Min(slot->backoff_ms * 2, mqtt_emit_reconnect_max);

	if (slot->subscriber && config.session_expiry > 0)
	{
		me_broker_set_session(slot->broker, slot->session);
		slot->conn_session = slot->session;
	}
	if (!me_broker_connect(slot->broker, err, sizeof(err)))
	{
		report_problem(slot, err);
		next_url(slot);
	}
}

MeBroker *
me_client_broker(MeClientRole role)
{
	return slots[role].broker;
}

/*
 * How many connections the client has made: a number that names the
 * current (or last) connection.
 */
uint64
me_client_connections(MeClientRole role)
{
	return slots[role].connections;
}

bool
me_client_connected(MeClientRole role)
{
	return slots[role].broker != NULL && me_broker_connected(slots[role].broker);
}

/*
 * Take the client's news; false when there is no client.  A new
 * connection is logged and shown in mqtt_emit.stats here; the caller acts
 * on the rest and reports a lost connection with me_client_lost().
 */
bool
me_client_poll(MeClientRole role, MeBrokerNews *news)
{
	ClientSlot *slot = &slots[role];

	if (slot->broker == NULL)
		return false;
	me_broker_poll(slot->broker, news);
	if (news->connected && me_broker_connected(slot->broker))
	{
		if (config.nurls > 1)
			ereport(LOG,
					(errmsg("pg_mqtt_emit %s connected to broker \"%s\"",
							slot->subscriber ? "subscriber" : "publisher",
							slot_url(slot)),
					 errdetail("Broker %d of %d in \"mqtt_emit.broker_url\".",
							   slot->url_index + 1, config.nurls)));
		else
			ereport(LOG,
					(errmsg("pg_mqtt_emit %s connected to broker \"%s\"",
							slot->subscriber ? "subscriber" : "publisher",
							slot_url(slot))));
		slot->backoff_ms = mqtt_emit_reconnect_min;
		slot->was_connected = true;
		slot->failed_in_round = 0;
		memset(slot->last_logged, 0, sizeof(slot->last_logged));
		me_count(ME_STAT_CONNECTS, 1);
		me_set_connected(slot->subscriber, true);
		me_set_broker_url(slot->subscriber, slot_url(slot));
		slot->connections++;
	}
	if (slot->subscriber)
	{
		int			i;

		if (news->connected)
		{
			/* up, and our SUBSCRIBEs go out now (unless it went already) */
			slot->conn_up = !news->lost;
			slot->conn_subacked = false;
		}
		slot->conn_connack = news->lost ? news->connack_code : 0;
		for (i = 0; i < news->nsubacks; i++)
		{
			if (news->subacks[i].granted >= 0 || news->subacks[i].code >= 0x80)
			{
				if (!slot->conn_subacked)
					session_works(slot);
				slot->conn_subacked = true;
				break;
			}
		}
		return true;
	}

	/* MQTT 5: the broker says in its CONNACK that it supports less */
	if (news->broker_max_qos >= 0 && news->broker_max_qos < slot->max_qos)
	{
		slot->max_qos = news->broker_max_qos;
		if (mqtt_emit_qos > slot->max_qos)
			ereport(WARNING,
					(errmsg("pg_mqtt_emit publishes with QoS %d: broker \"%s\" supports QoS %d at most",
							slot->max_qos, slot_url(slot), slot->max_qos),
					 errdetail("The broker's CONNACK says Maximum QoS %d; \"mqtt_emit.qos\" is %d.",
							   slot->max_qos, mqtt_emit_qos),
					 errhint("Set \"mqtt_emit.qos\" to %d, or use a broker that supports QoS %d.",
							 slot->max_qos, mqtt_emit_qos)));
	}

	/*
	 * A PUBACK for a QoS 2 message: paho keeps such messages in flight for
	 * good.  Start over with a new connection (which drops them; what was
	 * not acknowledged is sent again) and QoS 1.
	 */
	if (news->qos_downgraded && slot->max_qos > 1)
	{
		slot->max_qos = 1;
		ereport(WARNING,
				(errmsg("pg_mqtt_emit publishes with QoS 1: broker \"%s\" does not support QoS 2",
						slot_url(slot)),
				 errdetail("The broker acknowledged a QoS 2 message with PUBACK, as for QoS 1. The publisher reconnects and publishes with QoS 1 until the broker settings change."),
				 errhint("Set \"mqtt_emit.qos\" to 1, or use a broker that supports QoS 2.")));
		if (!news->lost)
		{
			/* the broker works: stay with it */
			slot->same_url = true;
			news->lost = true;
			strlcpy(news->error, "reconnecting to publish with QoS 1 (the broker does not support QoS 2)",
					sizeof(news->error));
		}
	}
	return true;
}

/*
 * The subscriber's broker answered a SUBSCRIBE on this connection: the
 * session it asked for works there.
 */
static void
session_works(ClientSlot *slot)
{
	if (config.session_expiry == 0)
		return;
	slot->strikes[slot->url_index] = 0;
	if (slot->conn_session == ME_SESSION_DISCARD)
	{
		/*
		 * The broker gave up the old session.  MQTT 5 started the new one
		 * persistent already; 3.1.1 gets it from the next connection on.
		 */
		own_session_stale = false;
		slot->session = ME_SESSION_OWN;
		ereport(LOG,
				(errmsg("pg_mqtt_emit subscriber is back on its own client id at broker \"%s\"",
						slot_url(slot)),
				 errdetail("The session the broker still kept for it was given up; %s",
						   config.mqtt_version == 5 ?
						   "the new one is persistent again." :
						   "the session is persistent again from the next connection on (MQTT 3.1.1 cannot make a clean session persistent).")));
	}
}

/*
 * Did the broker end the subscriber's connection in the way a cluster does
 * whose node holding the session is away (see the top of this file)?  A
 * CONNACK "server unavailable" (3.1.1 return code 3, MQTT 5 reason codes
 * 0x83 and 0x88), or a connection that was made but closed before any
 * SUBSCRIBE on it was answered.
 */
static bool
session_refused(ClientSlot *slot)
{
	int			c = slot->conn_connack;

	if (config.mqtt_version == 5 ? (c == 0x83 || c == 0x88) : c == 3)
		return true;
	return slot->conn_up && !slot->conn_subacked;
}

/*
 * The subscriber's connection ended: move between its own session and the
 * fallback (see the top of this file).
 */
static void
session_lost(ClientSlot *slot)
{
	bool		refused;
	bool		worked;

	if (config.session_expiry == 0)
		return;
	refused = session_refused(slot);
	worked = slot->conn_up && slot->conn_subacked;
	slot->conn_up = false;
	slot->conn_connack = 0;

	/*
	 * The broker answered, so it is up: try it again at once rather than
	 * walk the list (where the node it replaces is down).
	 */
	if (refused)
		slot->same_url = true;
	switch (slot->conn_session)
	{
		case ME_SESSION_OWN:
			if (!refused || ++slot->strikes[slot->url_index] < 2)
				return;
			slot->strikes[slot->url_index] = 0;
			own_session_stale = true;
			slot->session = ME_SESSION_FALLBACK;
			me_set_last_error("subscriber: broker \"%s\" cannot resume its session; subscribing with a clean session as \"%s-subscriber-fallback\"",
							  slot_url(slot), config.client_id);
			ereport(WARNING,
					(errmsg("pg_mqtt_emit subscriber cannot resume its session on broker \"%s\"",
							slot_url(slot)),
					 errdetail("The broker ended the subscriber's connection twice in a row before it answered a SUBSCRIBE (RabbitMQ does so while the cluster node that holds the session's queue is down). The subscriber goes on with a clean session as client \"%s-subscriber-fallback\": what is published while it is disconnected is not kept for it, and what the old session still holds is given up.",
							   config.client_id),
					 errhint("On RabbitMQ 3.x, mirror the queues \"mqtt-subscription-*\" to every node with a policy (see the README, \"Scaling out\"), so that the session survives the loss of a node.")));
			break;
		case ME_SESSION_DISCARD:
			/* the node with the old session is still away */
			if (refused)
				slot->session = ME_SESSION_FALLBACK;
			break;
		case ME_SESSION_FALLBACK:
			/* a working fallback connection ended: try the own id again */
			if (worked)
				slot->session = ME_SESSION_DISCARD;
			break;
	}

	/* a client connects with one client id: a new one for another id */
	if ((slot->session == ME_SESSION_FALLBACK) != (slot->conn_session == ME_SESSION_FALLBACK) &&
		slot->broker)
	{
		me_broker_destroy(slot->broker);
		slot->broker = NULL;
	}
}

/*
 * The connection was lost (or a connect failed): report it, try again
 * soon after losing a working connection, and start the publisher over
 * with a new client.
 */
void
me_client_lost(MeClientRole role, const char *why)
{
	ClientSlot *slot = &slots[role];

	me_set_connected(slot->subscriber, false);
	me_set_broker_url(slot->subscriber, NULL);
	report_problem(slot, why);
	if (slot->subscriber)
		session_lost(slot);
	if (slot->was_connected)
	{
		slot->was_connected = false;
		slot->next_attempt = GetCurrentTimestamp() +
			(TimestampTz) mqtt_emit_reconnect_min * 1000;
	}
	if (slot->broker &&
		(role == ME_CLIENT_PUBLISHER || me_broker_stale(slot->broker)))
	{
		me_broker_destroy(slot->broker);
		slot->broker = NULL;
	}
	next_url(slot);
}

/* at shutdown: say goodbye to the broker */
void
me_client_disconnect_all(void)
{
	if (slots[ME_CLIENT_PUBLISHER].broker)
		me_broker_disconnect(slots[ME_CLIENT_PUBLISHER].broker, 1000);
	if (slots[ME_CLIENT_SUBSCRIBER].broker)
		me_broker_disconnect(slots[ME_CLIENT_SUBSCRIBER].broker, 100);
}

/*
 * Wait (at most timeout_ms) until a disconnect started before has closed
 * the client's connection: from then on it receives, and acknowledges,
 * nothing more, so that what it received can be kept before it goes.
 */
bool
me_client_wait_disconnected(MeClientRole role, int timeout_ms)
{
	if (slots[role].broker == NULL)
		return true;
	return me_broker_wait_disconnected(slots[role].broker, timeout_ms);
}

void
me_client_destroy_all(void)
{
	int			i;

	for (i = 0; i < 2; i++)
	{
		if (slots[i].broker)
		{
			me_broker_destroy(slots[i].broker);
			slots[i].broker = NULL;
		}
		me_set_connected(slots[i].subscriber, false);
		me_set_broker_url(slots[i].subscriber, NULL);
	}
}
