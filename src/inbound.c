/*-------------------------------------------------------------------------
 *
 * inbound.c
 *		The subscriber side of the worker: which topic filters it asks the
 *		broker for, and what it does with the messages that arrive.
 *
 * Subscriptions follow the listener registry: one filter <prefix>/<model>/#
 * per model that has a listener accepting remote events, in the spelling
 * registered and in lower case (where prisma-extension-emitter publishes),
 * however many listeners share it.  The subscriber connects when the worker
 * starts, together with the publisher (paho's one receive thread picks up
 * clients made together at once; a client made later waits up to 2 s), and
 * stays connected without any filter.  After every (re)connection all filters
 * are subscribed again (a clean session forgets them).  The topic filters
 * of handlers (mqtt_emit.subscribe, handlers.c) are subscribed too, each
 * with the highest QoS its handlers ask for.
 *
 * Each filter's state (pending, requested, acknowledged with the QoS
 * granted, refused with the broker's reason) follows the broker's SUBACKs
 * (paho's subscribe callbacks record them by token, broker_callbacks.c)
 * and is copied to shared memory for the mqtt_emit.subscriptions view.  A
 * refusal is logged once per reason and asked for again with backoff (1 s
 * doubling to 60 s), so a broker whose access rules are fixed later grants
 * it without a reconnection.
 *
 * Share groups (listeners and handlers with a share_group) subscribe
 * through MQTT 5 shared subscriptions, $share/<group>/<filter>, on the
 * same connection.  A node in a group that also has listeners (or
 * handlers) without one gets a message twice, once through each
 * subscription, and must run each path's listeners for its copy: the two
 * copies look the same but for the MQTT 5 Subscription Identifier that
 * the broker puts on each, the one given with the SUBSCRIBE.  So every
 * plain subscription has identifier ME_SUB_ID_PLAIN and every shared one a
 * hash of its filter (topic.c), and a received message is kept once for
 * each identifier it carries.  MQTT 3.1.1 has no identifiers: shared
 * subscriptions are then not made (refused, with the reason, in
 * mqtt_emit.subscriptions), nor when the broker's CONNACK says that it
 * supports neither.
 *
 * A shared subscription that this node no longer wants must be
 * unsubscribed, also when that is decided while the subscriber is
 * disconnected: in the persistent session it would stay a member of the
 * group, and the broker would go on giving it a share of the group's
 * messages that no listener here takes.  Filters dropped while
 * disconnected are unsubscribed at the next connection, those of the
 * worker that ran before this one too (as shared memory lists them).
 *
 * Received messages are kept as rows of mqtt_emit.outbox (kind
 * ME_KIND_REMOTE), up to 1000 in one transaction, for the listener worker,
 * which checks them and runs their listeners (remote.c,
 * listener_worker.c): this process runs no listener code.  A message on
 * a topic outside <prefix>/ that matches a handler's filter is kept as a
 * row of kind ME_KIND_MESSAGE, whatever its bytes (handlers.c).  One that
 * came through a share group has the path in front of its topic (topic.c).
 *
 * The filter <prefix>/<model>/# also matches the retained state messages
 * of retain_last tables, <prefix>/<model>/state/<key> (capture.c).  Under
 * MQTT 5 the events' filters are subscribed with Retain Handling 2, so the
 * broker does not send the retained ones at each SUBSCRIBE; under 3.1.1 it
 * sends every one of them at every reconnection.  Live or retained, they
 * are no events, and are dropped here (after the spool, which paho's
 * thread writes before any setting could be looked at), without a row, a
 * listener run or a count (rejected or received), at DEBUG1.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/inbound.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "mb/pg_wchar.h"
#include "nodes/pg_list.h"
#include "nodes/value.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "handlers.h"
#include "listeners.h"
#include "outbox.h"
#include "spool.h"
#include "topic.h"
#include "worker.h"

#define INBOX_BATCH		1000	/* received messages kept in one transaction */
#define MAX_PATHS		8		/* Subscription Identifiers taken from one message */

static void keep_spooled(void);
static bool keep_messages(MeIncoming *m, MeIncoming **rest, bool spooled,
						  int64 spool_gen, uint64 spool_pos);

/* a refused subscription is asked for again after 1 s, 2 s, ... 60 s */
#define SUB_RETRY_MIN_MS	1000
#define SUB_RETRY_MAX_MS	60000

/* the reason code of a shared subscription not made (MQTT 5's) */
#define SHARED_NOT_SUPPORTED	0x9E
#define SUB_IDS_NOT_SUPPORTED	0xA1

/*
 * One topic filter the subscriber wants, and what the broker said to it.
 *
 * A SUBSCRIBE puts it into ME_SUB_REQUESTED, its SUBACK into
 * ME_SUB_ACKNOWLEDGED (with the QoS granted) or ME_SUB_REFUSED (with the
 * return or reason code).  A refused filter stays refused while it is
 * asked for again (with backoff, retry_at) until a SUBACK grants it; its
 * refusal is logged once per reason.  A SUBSCRIBE that was not answered
 * (the connection went) leaves it ME_SUB_PENDING: every (re)connection
 * subscribes to everything again.  A shared subscription that cannot be
 * made here (MQTT 3.1.1, a broker without shared subscriptions or
 * Subscription Identifiers, an identifier taken by another filter) is
 * ME_SUB_REFUSED with local_reason, and no SUBSCRIBE is sent.
 */
typedef struct InboundSub
{
	char	   *filter;			/* in TopMemoryContext; $share/... for a group */
	const char *group_filter;	/* shared: the filter after the group, in filter */
	bool		shared;
	bool		for_handlers;	/* a handler filter, not one of events */
	uint32		sub_id;			/* shared: its Subscription Identifier */
	int			want_qos;		/* the QoS to ask for */
	const char *local_reason;	/* not subscribed here: why, or NULL */
	MeSubState	state;
	int			token;			/* paho token of the SUBSCRIBE out, or 0 */
	int			granted_qos;	/* acknowledged: the QoS granted */
	int			reason_code;	/* refused: the SUBACK's code */
	TimestampTz since;			/* when it got into this state */
	TimestampTz retry_at;		/* when to send SUBSCRIBE again, or 0 */
	int			backoff_ms;		/* the wait after the next refusal */
	int			logged_code;	/* the refusal last logged, or -1 */
	int			qos;			/* the QoS last asked for, or -1 */
} InboundSub;

/* a filter to unsubscribe from, and the UNSUBSCRIBE out for it */
typedef struct Unsub
{
	char	   *filter;			/* in TopMemoryContext */
	int			token;			/* 0: not sent yet */
} Unsub;

static List *subscribed = NIL;	/* InboundSub *, in TopMemoryContext */
static List *unsubs = NIL;		/* Unsub *: filters the session may still hold */
static bool seeded = false;		/* unsubs has the previous worker's filters */
static bool states_changed = false; /* shmem's copy is out of date */
static StringInfoData msgbuf;	/* encoded messages for handlers */
static StringInfoData pathbuf;	/* inbox model of a shared path's copy */
static TimestampTz unknown_log_at = 0;	/* last LOG of an unknown identifier */

/* the local reason of a shared filter whose identifier another one has */
static const char *const id_taken = "its Subscription Identifier is another share group's";


/* Does the broker keep the subscriber's session (and its subscriptions)? */
static bool
session_kept(void)
{
	return mqtt_emit_session_expiry > 0;
}

static void
set_state(InboundSub *s, MeSubState state)
{
	if (s->state != state)
	{
		s->state = state;
		s->since = GetCurrentTimestamp();
	}
	states_changed = true;
}

/*
 * Copy the states to shared memory for the mqtt_emit.subscriptions view,
 * if they changed.
 */
static void
publish_states(void)
{
	MeSubStatus *out;
	int			n = 0;
	ListCell   *lc;

	if (!states_changed)
		return;
	states_changed = false;
	out = palloc0(sizeof(MeSubStatus) * Max(Min(list_length(subscribed), ME_SUBS_MAX), 1));
	foreach(lc, subscribed)
	{
		InboundSub *s = (InboundSub *) lfirst(lc);
		MeSubStatus *o = &out[n];

		if (n >= ME_SUBS_MAX)
			break;
		if (strlen(s->filter) >= ME_SUB_FILTER_LEN)
			continue;			/* not shown: the view cannot match a prefix */
		strlcpy(o->filter, s->filter, sizeof(o->filter));
		o->state = s->state;
		o->granted_qos = s->state == ME_SUB_ACKNOWLEDGED ? s->granted_qos : -1;
		o->reason_code = s->state == ME_SUB_REFUSED ? s->reason_code : -1;
		if (s->state == ME_SUB_REFUSED && s->local_reason)
			snprintf(o->reason, sizeof(o->reason), "%s (0x%02X)",
					 s->local_reason, s->reason_code);
		else if (s->state == ME_SUB_REFUSED)
			snprintf(o->reason, sizeof(o->reason), "%s (0x%02X)",
					 me_client_broker(ME_CLIENT_SUBSCRIBER) ?
					 me_broker_reason_text(me_client_broker(ME_CLIENT_SUBSCRIBER),
										   s->reason_code) : "refused",
					 s->reason_code);
		o->since = s->since;
		n++;
	}
	me_subs_publish(out, n);
	pfree(out);
}

/*
 * A shared subscription that cannot be made here: refused with a reason of
 * ours, logged once per reason; no SUBSCRIBE is sent.
 */
static void
refuse_locally(InboundSub *s, int code, const char *why, const char *hint)
{
	if (s->state != ME_SUB_REFUSED || s->reason_code != code || s->local_reason != why)
	{
		s->state = ME_SUB_REFUSED;
		s->reason_code = code;
		s->since = GetCurrentTimestamp();
		states_changed = true;
	}
	s->local_reason = why;
	s->token = 0;
	s->retry_at = 0;
	if (s->logged_code != code)
		ereport(LOG,
				(errmsg("pg_mqtt_emit does not subscribe to \"%s\": %s",
						s->filter, why),
				 errhint("%s", hint)));
	s->logged_code = code;
}

/*
 * Can this shared subscription be made on this connection (sub: the
 * subscriber, or NULL when it is not connected)?  If not, refuse it
 * locally and return false.
 */
static bool
shared_possible(MeBroker *sub, InboundSub *s)
{
	bool		sub_ids = true;
	bool		shared = true;

	if (s->local_reason == id_taken)
		return false;			/* its identifier is another filter's */
	if (mqtt_emit_mqtt_version != 5)
	{
		refuse_locally(s, SHARED_NOT_SUPPORTED,
					   "share groups need MQTT 5 Subscription Identifiers",
					   "Set \"mqtt_emit.mqtt_version\" to '5' (the broker must support MQTT 5).");
		return false;
	}
	if (sub == NULL)
		return true;
	me_broker_features(sub, &sub_ids, &shared);
	if (!shared)
	{
		refuse_locally(s, SHARED_NOT_SUPPORTED,
					   "the broker does not support shared subscriptions",
					   "Its CONNACK says Shared Subscription Available 0; use a broker that supports MQTT 5 shared subscriptions.");
		return false;
	}
	if (!sub_ids)
	{
		refuse_locally(s, SUB_IDS_NOT_SUPPORTED,
					   "the broker does not support Subscription Identifiers",
					   "Its CONNACK says Subscription Identifiers Available 0; share groups need them to tell the paths of a message apart.");
		return false;
	}
	if (s->local_reason)
	{
		/* possible now (another broker, other settings) */
		s->local_reason = NULL;
		s->logged_code = -1;
		set_state(s, ME_SUB_PENDING);
	}
	return true;
}

/*
 * Send SUBSCRIBE for s.  A refused filter stays refused until a SUBACK
 * grants it.  When paho does not take the request, try again later.
 */
static void
send_subscribe(MeBroker *sub, InboundSub *s)
{
	int			token = 0;
	int			qos = s->want_qos;
	uint32		sub_id = 0;
	int			rc;

	if (s->shared)
	{
		if (!shared_possible(sub, s))
			return;
		sub_id = s->sub_id;
	}
	else
	{
		bool		sub_ids;
		bool		shared;

		/* a plain subscription's identifier, where the broker has them */
		me_broker_features(sub, &sub_ids, &shared);
		if (sub_ids)
			sub_id = ME_SUB_ID_PLAIN;
	}
	/* events' filters: no retained state messages of retain_last tables */
	rc = me_broker_subscribe_tracked(sub, s->filter, qos, sub_id, !s->for_handlers, &token);
	s->retry_at = 0;
	s->qos = qos;
	if (rc != 0)
	{
		ereport(LOG,
				(errmsg("pg_mqtt_emit cannot subscribe to \"%s\": %s",
						s->filter, me_broker_strerror(rc))));
		s->token = 0;
		if (s->state != ME_SUB_REFUSED)
			set_state(s, ME_SUB_PENDING);
		s->retry_at = GetCurrentTimestamp() + (int64) s->backoff_ms * 1000;
		s->backoff_ms = Min(s->backoff_ms * 2, SUB_RETRY_MAX_MS);
		return;
	}
	ereport(DEBUG1,
			(errmsg("pg_mqtt_emit subscribing to \"%s\" (Subscription Identifier %u)",
					s->filter, sub_id)));
	s->token = token;
	if (s->state != ME_SUB_REFUSED)
		set_state(s, ME_SUB_REQUESTED);
}

/*
 * Send UNSUBSCRIBE for the filters the session may still hold that are
 * not wanted (again); the answers come back through take_subacks().
 */
static void
send_unsubscribes(MeBroker *sub)
{
	ListCell   *lc;

	foreach(lc, unsubs)
	{
		Unsub	   *u = (Unsub *) lfirst(lc);
		int			rc;

		if (u->token != 0)
			continue;
		rc = me_broker_unsubscribe_tracked(sub, u->filter, &u->token);
		if (rc != 0)
		{
			ereport(LOG,
					(errmsg("pg_mqtt_emit cannot unsubscribe from \"%s\": %s",
							u->filter, me_broker_strerror(rc))));
			u->token = 0;
			continue;
		}
		ereport(DEBUG1,
				(errmsg("pg_mqtt_emit unsubscribing from \"%s\"", u->filter)));
	}
}

/* remember to unsubscribe from filter (once) */
static void
add_unsub(const char *filter)
{
	ListCell   *lc;
	MemoryContext old;
	Unsub	   *u;

	foreach(lc, unsubs)
		if (strcmp(((Unsub *) lfirst(lc))->filter, filter) == 0)
			return;
	old = MemoryContextSwitchTo(TopMemoryContext);
	u = palloc0(sizeof(Unsub));
	u->filter = pstrdup(filter);
	unsubs = lappend(unsubs, u);
	MemoryContextSwitchTo(old);
}

/* filter is wanted again: no UNSUBSCRIBE for it */
static void
drop_unsub(const char *filter)
{
	ListCell   *lc;

	foreach(lc, unsubs)
	{
		Unsub	   *u = (Unsub *) lfirst(lc);

		if (strcmp(u->filter, filter) == 0)
		{
			unsubs = foreach_delete_current(unsubs, lc);
			pfree(u->filter);
			pfree(u);
		}
	}
}

/*
 * Take the broker's answers to SUBSCRIBE and UNSUBSCRIBE.
 */
static void
take_subacks(MeBroker *sub, MeSubOutcome *acks, int n)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		InboundSub *s = NULL;
		ListCell   *lc;

		if (acks[i].token == 0)
			continue;
		if (acks[i].unsubscribe)
		{
			foreach(lc, unsubs)
			{
				Unsub	   *u = (Unsub *) lfirst(lc);

				if (u->token != acks[i].token)
					continue;
				if (acks[i].granted >= 0)
				{
					/* answered: the session no longer has it */
					ereport(DEBUG1,
							(errmsg("pg_mqtt_emit unsubscribed from \"%s\"", u->filter)));
					unsubs = foreach_delete_current(unsubs, lc);
					pfree(u->filter);
					pfree(u);
				}
				else
					u->token = 0;	/* not answered: at the next connection */
				break;
			}
			continue;
		}
		foreach(lc, subscribed)
		{
			if (((InboundSub *) lfirst(lc))->token == acks[i].token)
			{
				s = (InboundSub *) lfirst(lc);
				break;
			}
		}
		if (s == NULL)
			continue;			/* unsubscribed meanwhile */
		s->token = 0;
		if (acks[i].granted >= 0)
		{
			if (s->logged_code >= 0)
				ereport(LOG,
						(errmsg("pg_mqtt_emit subscription to \"%s\" acknowledged with QoS %d",
								s->filter, acks[i].granted)));
			s->granted_qos = acks[i].granted;
			s->logged_code = -1;
			s->backoff_ms = SUB_RETRY_MIN_MS;
			set_state(s, ME_SUB_ACKNOWLEDGED);
			ereport(DEBUG1,
					(errmsg("pg_mqtt_emit subscribed to \"%s\" with QoS %d",
							s->filter, acks[i].granted)));
		}
		else if (acks[i].code >= 0x80)
		{
			if (s->logged_code != acks[i].code)
				ereport(LOG,
						(errmsg("pg_mqtt_emit: the broker refused the subscription to \"%s\": %s (SUBACK code 0x%02X)",
								s->filter, me_broker_reason_text(sub, acks[i].code),
								acks[i].code),
						 errdetail("The subscription is requested again, with backoff up to %d s.",
								   SUB_RETRY_MAX_MS / 1000),
						 errhint("Check the broker's access control for the subscriber's user.")));
			s->logged_code = acks[i].code;
			/* since: the first refusal of this reason */
			if (s->state != ME_SUB_REFUSED || s->reason_code != acks[i].code)
			{
				s->state = ME_SUB_REFUSED;
				s->reason_code = acks[i].code;
				s->since = GetCurrentTimestamp();
				states_changed = true;
			}
			s->retry_at = GetCurrentTimestamp() + (int64) s->backoff_ms * 1000;
			s->backoff_ms = Min(s->backoff_ms * 2, SUB_RETRY_MAX_MS);
		}
		else if (s->state != ME_SUB_REFUSED)
		{
			/* not answered (the connection went): a reconnection repeats it */
			set_state(s, ME_SUB_PENDING);
		}
	}
}

/*
 * Add a wanted subscription to *want (palloc'd in the current context),
 * once; for a handler filter with the highest QoS asked for it.
 */
static List *
want_sub(List *want, const char *filter, const char *group, int qos,
		 bool for_handlers)
{
	InboundSub *w;
	ListCell   *lc;
	StringInfoData f;

	initStringInfo(&f);
	if (group)
		me_share_filter(&f, group, filter);
	else
		appendStringInfoString(&f, filter);
	foreach(lc, want)
	{
		w = (InboundSub *) lfirst(lc);
		if (strcmp(w->filter, f.data) == 0)
		{
			w->want_qos = Max(w->want_qos, qos);
			pfree(f.data);
			return want;
		}
	}
	w = palloc0(sizeof(InboundSub));
	w->filter = f.data;
	w->shared = (group != NULL);
	w->group_filter = group ? w->filter + 8 + strlen(group) : NULL;
	w->for_handlers = for_handlers;
	w->sub_id = group ? me_share_sub_id(w->filter) : ME_SUB_ID_PLAIN;
	w->want_qos = qos;
	return lappend(want, w);
}

/*
 * Bring the broker's subscriptions in line with the listeners that accept
 * remote events and the handlers.  With all, subscribe to everything again
 * (after a reconnect).
 */
void
me_inbound_sync(bool all)
{
	List	   *paths = me_listeners_remote_paths();
	List	   *want = NIL;
	List	   *keep = NIL;
	ListCell   *lc;
	MemoryContext old;
	MeBroker   *sub = me_client_broker(ME_CLIENT_SUBSCRIBER);
	bool		connected = me_client_connected(ME_CLIENT_SUBSCRIBER);
	int			i;

	/* events: <prefix>/<model>/# as registered and in lower case, per path */
	foreach(lc, paths)
	{
		MeRemotePath *p = (MeRemotePath *) lfirst(lc);
		StringInfoData f;

		initStringInfo(&f);
		me_topic_filter(&f, p->model, false);
		want = want_sub(want, f.data, p->group, 1, false);
		me_topic_filter(&f, p->model, true);
		want = want_sub(want, f.data, p->group, 1, false);
	}
	for (i = 0; i < me_handlers_nfilters(); i++)
	{
		int			qos;
		const char *group;
		const char *filter = me_handlers_filter(i, &qos, &group);

		want = want_sub(want, filter, group, qos, true);
	}

	/*
	 * What the worker before this one subscribed to (shared memory's
	 * list): the session may still hold it.
	 */
	if (!seeded)
	{
		MeSubStatus *prev = palloc(sizeof(MeSubStatus) * ME_SUBS_MAX);
		int			n = me_subs_snapshot(prev, ME_SUBS_MAX);

		seeded = true;
		if (session_kept())
			for (i = 0; i < n; i++)
				add_unsub(prev[i].filter);
		pfree(prev);
	}

	/* unsubscribe what is no longer wanted */
	foreach(lc, subscribed)
	{
		InboundSub *s = (InboundSub *) lfirst(lc);
		ListCell   *wc;
		bool		wanted = false;

		foreach(wc, want)
		{
			if (strcmp(((InboundSub *) lfirst(wc))->filter, s->filter) == 0)
			{
				wanted = true;
				break;
			}
		}
		if (wanted)
			keep = lappend(keep, s);
		else
		{
			/* a persistent session keeps it until it is unsubscribed */
			if (connected || session_kept())
				add_unsub(s->filter);
			pfree(s->filter);
			pfree(s);
			states_changed = true;
		}
	}
	list_free(subscribed);
	subscribed = NIL;
	foreach(lc, want)
		drop_unsub(((InboundSub *) lfirst(lc))->filter);
	if (connected)
		send_unsubscribes(sub);

	/* in the order wanted, new filters pending */
	old = MemoryContextSwitchTo(TopMemoryContext);
	foreach(lc, want)
	{
		InboundSub *w = (InboundSub *) lfirst(lc);
		InboundSub *s = NULL;
		ListCell   *kc;

		foreach(kc, keep)
		{
			if (strcmp(((InboundSub *) lfirst(kc))->filter, w->filter) == 0)
			{
				s = (InboundSub *) lfirst(kc);
				break;
			}
		}
		if (s == NULL)
		{
			s = palloc0(sizeof(InboundSub));
			s->filter = pstrdup(w->filter);
			s->shared = w->shared;
			s->for_handlers = w->for_handlers;
			s->sub_id = w->sub_id;
			s->group_filter = w->group_filter ? s->filter + (w->group_filter - w->filter) : NULL;
			s->state = ME_SUB_PENDING;
			s->since = GetCurrentTimestamp();
			s->backoff_ms = SUB_RETRY_MIN_MS;
			s->logged_code = -1;
			s->reason_code = -1;
			s->granted_qos = -1;
			s->qos = -1;
			states_changed = true;
			if (connected)
				s->token = -1;	/* new: subscribe below */
		}
		else if (connected && s->qos >= 0 && s->qos != w->want_qos)
			s->token = -1;		/* a handler wants another QoS: again */
		s->want_qos = w->want_qos;
		if (s->local_reason == id_taken)
		{
			/* checked again below */
			s->local_reason = NULL;
			s->logged_code = -1;
			set_state(s, ME_SUB_PENDING);
			if (connected)
				s->token = -1;
		}
		subscribed = lappend(subscribed, s);
	}
	MemoryContextSwitchTo(old);
	list_free(keep);

	/*
	 * Two shared filters with one identifier could not be told apart: the
	 * later one is not subscribed (a 1 in 134 million chance per pair).
	 */
	foreach(lc, subscribed)
	{
		InboundSub *s = (InboundSub *) lfirst(lc);
		ListCell   *ec;

		if (!s->shared)
			continue;
		foreach(ec, subscribed)
		{
			InboundSub *e = (InboundSub *) lfirst(ec);

			if (e == s)
				break;
			if (e->shared && e->sub_id == s->sub_id && e->local_reason != id_taken)
			{
				if (s->logged_code != SUB_IDS_NOT_SUPPORTED)
					ereport(LOG,
							(errmsg("pg_mqtt_emit does not subscribe to \"%s\": its Subscription Identifier %u is that of \"%s\"",
									s->filter, s->sub_id, e->filter),
							 errhint("Choose another share group name for one of them.")));
				s->local_reason = id_taken;
				s->reason_code = SUB_IDS_NOT_SUPPORTED;
				s->token = 0;
				s->logged_code = SUB_IDS_NOT_SUPPORTED;
				set_state(s, ME_SUB_REFUSED);
				break;
			}
		}
	}

	if (connected)
	{
		foreach(lc, subscribed)
		{
			InboundSub *s = (InboundSub *) lfirst(lc);

			if (all || s->token == -1)
				send_subscribe(sub, s);
		}
	}
	else
	{
		/* refusals known without a connection (the MQTT version) */
		foreach(lc, subscribed)
		{
			InboundSub *s = (InboundSub *) lfirst(lc);

			if (s->shared)
				(void) shared_possible(NULL, s);
		}
	}
	me_set_subscriptions(list_length(subscribed));
	publish_states();
}

/*
 * Ask again for the subscriptions whose time has come (refused ones, or
 * ones paho did not take), and lower *timeout to the next such time.
 */
void
me_inbound_retry(TimestampTz now, long *timeout)
{
	ListCell   *lc;
	MeBroker   *sub = me_client_broker(ME_CLIENT_SUBSCRIBER);

	if (!me_client_connected(ME_CLIENT_SUBSCRIBER))
		return;
	foreach(lc, subscribed)
	{
		InboundSub *s = (InboundSub *) lfirst(lc);

		if (s->retry_at == 0)
			continue;
		if (s->retry_at <= now)
			send_subscribe(sub, s);
		if (s->retry_at != 0)
			*timeout = Min(*timeout, (long) ((s->retry_at - now) / 1000) + 1);
	}
	publish_states();
}

/*
 * The Subscription Identifiers a received message carries: recorded among
 * its properties (ME_INPROP_SUB_ID, broker_callbacks.c), so that they
 * survive the spool too.  Returns how many (at most max).
 */
static int
message_sub_ids(const MeIncoming *m, uint32 *ids, int max)
{
	const char *p = m->props;
	const char *end = m->props ? m->props + m->props_len : NULL;
	int			n = 0;

	while (p && p + 1 + 2 * sizeof(int32) <= end && n < max)
	{
		int			code = (unsigned char) *p++;
		int32		len1,
					len2;

		memcpy(&len1, p, sizeof(int32));
		p += sizeof(int32);
		if (code == ME_INPROP_SUB_ID && len1 == sizeof(uint32) && p + len1 <= end)
			memcpy(&ids[n++], p, sizeof(uint32));
		p += len1;
		if (p + sizeof(int32) > end)
			break;
		memcpy(&len2, p, sizeof(int32));
		p += sizeof(int32) + len2;
	}
	return n;
}

/*
 * The paths a message came through, by the Subscription Identifiers it
 * carries: NULL for a plain subscription (also a message without any: MQTT
 * 3.1.1, or a subscription made without one), the shared subscription for
 * the others.  A shared subscription this node no longer has is counted
 * as rejected: its share of that group's messages runs nowhere.
 */
static int
message_paths(const MeIncoming *m, const InboundSub **paths)
{
	uint32		ids[MAX_PATHS];
	int			nids = message_sub_ids(m, ids, MAX_PATHS);
	int			n = 0;
	bool		plain = false;
	int			i;

	if (nids == 0)
	{
		paths[0] = NULL;
		return 1;
	}
	for (i = 0; i < nids; i++)
	{
		ListCell   *lc;
		const InboundSub *found = NULL;

		if (ids[i] == ME_SUB_ID_PLAIN)
		{
			if (!plain)
				paths[n++] = NULL;
			plain = true;
			continue;
		}
		foreach(lc, subscribed)
		{
			InboundSub *s = (InboundSub *) lfirst(lc);

			if (s->shared && s->sub_id == ids[i])
			{
				found = s;
				break;
			}
		}
		if (found)
		{
			paths[n++] = found;
			continue;
		}
		me_count(ME_STAT_RECEIVED, 1);
		me_count(ME_STAT_REJECTED, 1);
		if (GetCurrentTimestamp() - unknown_log_at >= 10 * USECS_PER_SEC)
		{
			unknown_log_at = GetCurrentTimestamp();
			ereport(LOG,
					(errmsg("pg_mqtt_emit dropped a message on \"%.200s\": it came through a shared subscription that this node no longer has (Subscription Identifier %u)",
							m->topic, ids[i]),
					 errdetail("The broker gave this node a share of a group it has left; no listener or handler here takes it."),
					 errhint("Leave a share group while the subscriber is connected, or set \"mqtt_emit.session_expiry\" so that the broker forgets the session.")));
		}
	}
	return n;
}

/* the model column of a copy: the topic, after the path when shared */
static void
copy_model(const InboundSub *path, const MeIncoming *m, const char **model, int *len)
{
	if (path == NULL)
	{
		*model = m->topic;
		*len = m->topic_len;
		return;
	}
	if (pathbuf.data == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		initStringInfo(&pathbuf);
		MemoryContextSwitchTo(old);
	}
	me_inbox_model(&pathbuf, path->filter, m->topic, m->topic_len);
	*model = pnstrdup(pathbuf.data, pathbuf.len);
	*len = pathbuf.len;
}

/*
 * Take the subscriber's news: connection changes and received messages.
 */
void
me_inbound_take_news(void)
{
	MeBrokerNews news;
	MeIncoming *m;
	bool		stored = false;

	if (!me_client_poll(ME_CLIENT_SUBSCRIBER, &news))
	{
		keep_spooled();
		return;
	}

	if (news.nsubacks > 0)
		take_subacks(me_client_broker(ME_CLIENT_SUBSCRIBER), news.subacks, news.nsubacks);
	if (news.lost)
	{
		ListCell   *lc;

		/* what was asked for is not answered now */
		foreach(lc, subscribed)
		{
			InboundSub *s = (InboundSub *) lfirst(lc);

			s->token = 0;
			s->retry_at = 0;
			if (s->state == ME_SUB_REQUESTED)
				set_state(s, ME_SUB_PENDING);
		}
	}
	publish_states();

	/* a clean session forgets subscriptions: make them all again */
	if (news.connected && me_client_connected(ME_CLIENT_SUBSCRIBER))
		me_inbound_sync(true);
	if (news.lost)
		me_client_lost(ME_CLIENT_SUBSCRIBER, news.error);
	if (news.incoming_dropped > 0)
	{
		me_count(ME_STAT_REJECTED, news.incoming_dropped);
		ereport(LOG,
				(errmsg("pg_mqtt_emit dropped " UINT64_FORMAT " received messages: receive buffer full",
						news.incoming_dropped)));
	}

	/*
	 * What arrived without the spool (it could not be written).  Without
	 * the extension there is nowhere to keep it (messages of an old
	 * persistent session's subscriptions).
	 */
	m = news.incoming;
	if (m && !me_relay_ready())
	{
		int			dropped = 0;

		while (m)
		{
			MeIncoming *next = m->next;

			me_broker_free_message(m);
			m = next;
			dropped++;
		}
		me_count(ME_STAT_REJECTED, dropped);
		ereport(LOG,
				(errmsg("pg_mqtt_emit dropped %d received messages: the extension is not there to keep them",
						dropped)));
	}
	while (m)
	{
		MeIncoming *batch = m;

		if (keep_messages(m, &m, false, 0, 0))
			stored = true;
		while (batch != m)
		{
			MeIncoming *next = batch->next;

			me_broker_free_message(batch);
			batch = next;
		}
	}
	if (stored)
		me_wake_listener();
	keep_spooled();
}

/*
 * Keep what the spool holds (spool.c), a batch a transaction, each with
 * the spool position after it, until it is read to its end.  Only once the
 * extension is there: until then it waits in the spool.
 */
static void
keep_spooled(void)
{
	bool		stored = false;
	int			rounds;

	if (!me_relay_ready() || !me_spool_has_unread())
		return;
	for (rounds = 0; rounds < 16; rounds++)
	{
		MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext,
												  "pg_mqtt_emit spool batch",
												  ALLOCSET_DEFAULT_SIZES);
		MemoryContext old;
		MeIncoming *msgs;
		MeIncoming *rest;
		int64		gen;
		uint64		pos;
		int			n;

		/*
		 * Not an asynchronous commit: the spool files read to their end are
		 * removed once the position after them is committed, which must
		 * then be on disk.  One flush per batch of up to INBOX_BATCH.
		 */
		me_worker_begin_tx("keeping received messages");
		/* whatever synchronous_commit says */
		ForceSyncCommit();
		old = MemoryContextSwitchTo(cxt);
		msgs = palloc(sizeof(MeIncoming) * INBOX_BATCH);
		n = me_spool_read(msgs, INBOX_BATCH, &gen, &pos);
		if (n > 0 && keep_messages(msgs, &rest, true, gen, pos))
			stored = true;
		MemoryContextSwitchTo(old);
		me_worker_end_tx();
		MemoryContextDelete(cxt);
		if (n != 0)
			me_spool_committed();
		if (n < INBOX_BATCH || !me_spool_has_unread())
			break;
	}
	if (stored)
		me_wake_listener();
}

/*
 * Keep up to INBOX_BATCH of the messages from m on in the outbox for the
 * listener worker, in one transaction (the caller's, for the spool, which
 * also records the position after them); *rest is the first message not
 * taken.  Messages larger than max_payload, or that are not valid text, are
 * not kept.  Returns true when rows were written.
 */
static bool
keep_messages(MeIncoming *m, MeIncoming **rest, bool spooled, int64 spool_gen,
			  uint64 spool_pos)
{
	/* a row per path: room for every path of INBOX_BATCH messages */
	int			cap = INBOX_BATCH * MAX_PATHS;
	const char **topics = palloc(sizeof(char *) * cap);
	const char **payloads = palloc(sizeof(char *) * cap);
	int		   *topic_lens = palloc(sizeof(int) * cap);
	int		   *payload_lens = palloc(sizeof(int) * cap);
	const char **mtopics = palloc(sizeof(char *) * cap);
	const char **mpayloads = palloc(sizeof(char *) * cap);
	int		   *mtopic_lens = palloc(sizeof(int) * cap);
	int		   *mpayload_lens = palloc(sizeof(int) * cap);
	int			n = 0;
	int			nm = 0;
	int			taken = 0;

	/* all of a spool batch (at most INBOX_BATCH): its position is after them */
	while (m && taken++ < INBOX_BATCH)
	{
		const InboundSub *paths[MAX_PATHS];
		int			npaths = message_paths(m, paths);
		int			pi;

		for (pi = 0; pi < npaths; pi++)
		{
			const InboundSub *path = paths[pi];
			const char *why = NULL;
			bool		event = me_topic_is_event(m->topic, m->topic_len);

			/*
			 * A prefix with a "." arrives from RabbitMQ with "/" there
			 * (topic.c): an event, unless a handler asked for that topic.
			 */
			if (!event && path == NULL &&
				me_topic_is_mapped_event(m->topic, m->topic_len) &&
				!me_handlers_match(m->topic, m->topic_len))
				event = true;

			if (path != NULL && path->for_handlers == event)
			{
				/* cannot be, as the filters are made; take no chances */
				me_count(ME_STAT_RECEIVED, 1);
				me_remote_reject(m->topic, m->payload_len,
								 "the topic does not belong to the shared subscription it came through");
				continue;
			}

			/*
			 * Not one of our topics: a message for handlers, any bytes.  The
			 * topic must be text here (MQTT requires UTF-8 anyway).
			 */
			if (!event)
			{
				if (m->payload_len + m->props_len > mqtt_emit_max_payload)
					why = "payload and properties larger than \"mqtt_emit.max_payload\"";
				else if ((int) strlen(m->topic) != m->topic_len ||
						 !pg_verifymbstr(m->topic, m->topic_len, true))
					why = "topic is not valid in the database encoding";
				if (why)
				{
					me_count(ME_STAT_RECEIVED, 1);
					me_remote_reject(m->topic, m->payload_len, why);
				}
				else if (path ? me_filter_matches(path->group_filter, m->topic, m->topic_len) :
						 me_handlers_match(m->topic, m->topic_len))
				{
					MemoryContext old;

					me_count(ME_STAT_RECEIVED, 1);
					if (msgbuf.data == NULL)
					{
						old = MemoryContextSwitchTo(TopMemoryContext);
						initStringInfo(&msgbuf);
						MemoryContextSwitchTo(old);
					}
					me_handlers_encode(&msgbuf, m->payload, m->payload_len,
									   m->props, m->props_len);
					copy_model(path, m, &mtopics[nm], &mtopic_lens[nm]);
					mpayloads[nm] = pnstrdup(msgbuf.data, msgbuf.len);
					mpayload_lens[nm] = msgbuf.len;
					nm++;
				}
				else
					ereport(DEBUG1,
							(errmsg("pg_mqtt_emit ignored a message on \"%.200s\": no handler's filter matches",
									m->topic)));
				continue;
			}
			/* a row's retained state (retain_last), no event: ignored */
			if (me_topic_is_state(m->topic, m->topic_len))
			{
				ereport(DEBUG1,
						(errmsg("pg_mqtt_emit ignored a state message on \"%.200s\"",
								m->topic)));
				continue;
			}
			/* what cannot be kept as text is dropped here */
			if (m->payload_len > mqtt_emit_max_payload)
				why = "payload larger than \"mqtt_emit.max_payload\"";
			else if ((int) strlen(m->payload) != m->payload_len)
				why = "payload contains a NUL byte";
			else if (!pg_verifymbstr(m->payload, m->payload_len, true) ||
					 (int) strlen(m->topic) != m->topic_len ||
					 !pg_verifymbstr(m->topic, m->topic_len, true))
				why = "payload or topic is not valid in the database encoding";
			if (why)
			{
				me_count(ME_STAT_RECEIVED, 1);
				me_remote_reject(m->topic, m->payload_len, why);
			}
			else
			{
				copy_model(path, m, &topics[n], &topic_lens[n]);
				payloads[n] = m->payload;
				payload_lens[n] = m->payload_len;
				n++;
			}
		}
		m = m->next;
	}
	*rest = m;
	if (spooled)
	{
		if (n > 0)
			me_outbox_insert_received(topics, topic_lens, payloads, payload_lens, n);
		if (nm > 0)
			me_outbox_insert_messages(mtopics, mtopic_lens, mpayloads, mpayload_lens, nm);
		me_spool_save_position(spool_gen, spool_pos);
	}
	else if (n > 0 || nm > 0)
	{
		/* not asynchronous: paho acknowledged these, the broker forgot them */
		me_worker_begin_tx("keeping received messages");
		if (n > 0)
			me_outbox_insert_received(topics, topic_lens, payloads, payload_lens, n);
		if (nm > 0)
			me_outbox_insert_messages(mtopics, mtopic_lens, mpayloads, mpayload_lens, nm);
		me_worker_end_tx();
	}
	pfree(topics);
	pfree(payloads);
	pfree(topic_lens);
	pfree(payload_lens);
	pfree(mtopics);
	pfree(mpayloads);
	pfree(mtopic_lens);
	pfree(mpayload_lens);
	return n > 0 || nm > 0;
}

