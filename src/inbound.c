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
 * Received messages are kept as rows of mqtt_emit.outbox (kind
 * ME_KIND_REMOTE), up to 1000 in one transaction, for the listener worker,
 * which checks them and runs their listeners (remote.c,
 * listener_worker.c): this process runs no listener code.  A message on
 * a topic outside <prefix>/ that matches a handler's filter is kept as a
 * row of kind ME_KIND_MESSAGE, whatever its bytes (handlers.c).
 *
 * The filter <prefix>/<model>/# also matches the retained state messages
 * of retain_last tables, <prefix>/<model>/state/<key> (capture.c), and the
 * broker sends every one of them at each SUBSCRIBE (every reconnection):
 * they are no events, and are dropped here (after the spool, which paho's
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

static void keep_spooled(void);
static bool keep_messages(MeIncoming *m, MeIncoming **rest, bool spooled,
						  int64 spool_gen, uint64 spool_pos);

/* a refused subscription is asked for again after 1 s, 2 s, ... 60 s */
#define SUB_RETRY_MIN_MS	1000
#define SUB_RETRY_MAX_MS	60000

/*
 * One topic filter the subscriber wants, and what the broker said to it.
 *
 * A SUBSCRIBE puts it into ME_SUB_REQUESTED, its SUBACK into
 * ME_SUB_ACKNOWLEDGED (with the QoS granted) or ME_SUB_REFUSED (with the
 * return or reason code).  A refused filter stays refused while it is
 * asked for again (with backoff, retry_at) until a SUBACK grants it; its
 * refusal is logged once per reason.  A SUBSCRIBE that was not answered
 * (the connection went) leaves it ME_SUB_PENDING: every (re)connection
 * subscribes to everything again.
 */
typedef struct InboundSub
{
	char	   *filter;			/* in TopMemoryContext */
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

static List *subscribed = NIL;	/* InboundSub *, in TopMemoryContext */
static bool states_changed = false; /* shmem's copy is out of date */
static StringInfoData msgbuf;	/* encoded messages for handlers */

/* the QoS to subscribe to a filter with: its handlers', else 1 (events) */
static int
filter_qos(const char *filter)
{
	int			i;
	int			qos;

	for (i = 0; i < me_handlers_nfilters(); i++)
		if (strcmp(me_handlers_filter(i, &qos), filter) == 0)
			return qos;
	return 1;
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
		if (s->state == ME_SUB_REFUSED)
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
 * Send SUBSCRIBE for s.  A refused filter stays refused until a SUBACK
 * grants it.  When paho does not take the request, try again later.
 */
static void
send_subscribe(MeBroker *sub, InboundSub *s)
{
	int			token = 0;
	int			qos = filter_qos(s->filter);
	int			rc = me_broker_subscribe_tracked(sub, s->filter, qos, &token);

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
			(errmsg("pg_mqtt_emit subscribing to \"%s\"", s->filter)));
	s->token = token;
	if (s->state != ME_SUB_REFUSED)
		set_state(s, ME_SUB_REQUESTED);
}

/*
 * Take the broker's answers to SUBSCRIBE.
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
 * Bring the broker's subscriptions in line with the listeners that accept
 * remote events.  With all, subscribe to everything again (after a
 * reconnect).
 */
void
me_inbound_sync(bool all)
{
	List	   *models = me_listeners_remote_models();
	List	   *want = NIL;
	List	   *keep = NIL;
	ListCell   *lc;
	MemoryContext old;
	MeBroker   *sub = me_client_broker(ME_CLIENT_SUBSCRIBER);
	bool		connected = me_client_connected(ME_CLIENT_SUBSCRIBER);

	foreach(lc, models)
	{
		StringInfoData f;

		initStringInfo(&f);
		me_topic_filter(&f, (char *) lfirst(lc), false);
		want = list_append_unique(want, makeString(pstrdup(f.data)));
		me_topic_filter(&f, (char *) lfirst(lc), true);
		want = list_append_unique(want, makeString(f.data));
	}
	{
		int			i;

		for (i = 0; i < me_handlers_nfilters(); i++)
			want = list_append_unique(want,
									  makeString(pstrdup(me_handlers_filter(i, NULL))));
	}

	/* unsubscribe what is no longer wanted */
	foreach(lc, subscribed)
	{
		InboundSub *s = (InboundSub *) lfirst(lc);
		ListCell   *wc;
		bool		wanted = false;

		foreach(wc, want)
		{
			if (strcmp(strVal(lfirst(wc)), s->filter) == 0)
			{
				wanted = true;
				break;
			}
		}
		if (wanted)
			keep = lappend(keep, s);
		else
		{
			if (connected)
				me_broker_unsubscribe(sub, s->filter);
			pfree(s->filter);
			pfree(s);
			states_changed = true;
		}
	}
	list_free(subscribed);
	subscribed = NIL;

	if (want == NIL)
	{
		/*
		 * Nobody listens for remote events: no subscription, but the
		 * connection stays, so that the next listen() is subscribed within
		 * milliseconds (a client made later waits up to 2 s for paho's
		 * receive thread).
		 */
		list_free(keep);
		me_set_subscriptions(0);
		states_changed = true;
		publish_states();
		return;
	}

	/* in the order wanted, new filters pending */
	old = MemoryContextSwitchTo(TopMemoryContext);
	foreach(lc, want)
	{
		InboundSub *s = NULL;
		ListCell   *kc;

		foreach(kc, keep)
		{
			if (strcmp(((InboundSub *) lfirst(kc))->filter, strVal(lfirst(lc))) == 0)
			{
				s = (InboundSub *) lfirst(kc);
				break;
			}
		}
		if (s == NULL)
		{
			s = palloc0(sizeof(InboundSub));
			s->filter = pstrdup(strVal(lfirst(lc)));
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
		else if (connected && s->qos >= 0 && s->qos != filter_qos(s->filter))
			s->token = -1;		/* a handler wants another QoS: again */
		subscribed = lappend(subscribed, s);
	}
	MemoryContextSwitchTo(old);
	list_free(keep);

	if (connected)
	{
		foreach(lc, subscribed)
		{
			InboundSub *s = (InboundSub *) lfirst(lc);

			if (all || s->token == -1)
				send_subscribe(sub, s);
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
	const char *topics[INBOX_BATCH];
	const char *payloads[INBOX_BATCH];
	int			topic_lens[INBOX_BATCH];
	int			payload_lens[INBOX_BATCH];
	const char *mtopics[INBOX_BATCH];
	const char *mpayloads[INBOX_BATCH];
	int			mtopic_lens[INBOX_BATCH];
	int			mpayload_lens[INBOX_BATCH];
	int			n = 0;
	int			nm = 0;

	while (m && n + nm < INBOX_BATCH)
	{
		const char *why = NULL;
		bool		is_event = me_topic_is_event(m->topic, m->topic_len);

		/*
		 * A prefix with a "." arrives from RabbitMQ with "/" there
		 * (topic.c): an event, unless a handler asked for that topic.
		 */
		if (!is_event && me_topic_is_mapped_event(m->topic, m->topic_len) &&
			!me_handlers_match(m->topic, m->topic_len))
			is_event = true;

		/*
		 * Not one of our topics: a message for handlers, any bytes.  The
		 * topic must be text here (MQTT requires UTF-8 anyway).
		 */
		if (!is_event)
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
			else if (me_handlers_match(m->topic, m->topic_len))
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
				mtopics[nm] = m->topic;
				mtopic_lens[nm] = m->topic_len;
				mpayloads[nm] = pnstrdup(msgbuf.data, msgbuf.len);
				mpayload_lens[nm] = msgbuf.len;
				nm++;
			}
			else
				ereport(DEBUG1,
						(errmsg("pg_mqtt_emit ignored a message on \"%.200s\": no handler's filter matches",
								m->topic)));
			m = m->next;
			continue;
		}
		/* a row's retained state (retain_last), no event: ignored */
		if (me_topic_is_state(m->topic, m->topic_len))
		{
			ereport(DEBUG1,
					(errmsg("pg_mqtt_emit ignored a state message on \"%.200s\"",
							m->topic)));
			m = m->next;
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
			topics[n] = m->topic;
			topic_lens[n] = m->topic_len;
			payloads[n] = m->payload;
			payload_lens[n] = m->payload_len;
			n++;
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
		me_worker_begin_tx("keeping received messages");
		me_worker_commit_async();
		if (n > 0)
			me_outbox_insert_received(topics, topic_lens, payloads, payload_lens, n);
		if (nm > 0)
			me_outbox_insert_messages(mtopics, mtopic_lens, mpayloads, mpayload_lens, nm);
		me_worker_end_tx();
	}
	return n > 0 || nm > 0;
}

