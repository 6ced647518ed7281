/*-------------------------------------------------------------------------
 *
 * inbound.c
 *		The subscriber side of the worker: which topic filters it asks the
 *		broker for, and what it does with the messages that arrive.
 *
 * Subscriptions follow the listener registry: one filter <prefix>/<model>/#
 * per model that has a listener accepting remote events, in the spelling
 * registered and in lower case (where prisma-extension-emitter publishes),
 * however many listeners share it.  With no such listener there is no
 * subscriber connection at all.  After every (re)connection all filters
 * are subscribed again (a clean session forgets them).  The topic filters
 * of handlers (mqtt_emit.subscribe, handlers.c) are subscribed too, each
 * with the highest QoS its handlers ask for.
 *
 * Received messages are kept as rows of mqtt_emit.outbox (kind
 * ME_KIND_REMOTE), up to 1000 in one transaction, for the listener worker,
 * which checks them and runs their listeners (remote.c,
 * listener_worker.c): this process runs no listener code.  A message on
 * a topic outside <prefix>/ that matches a handler's filter is kept as a
 * row of kind ME_KIND_MESSAGE, whatever its bytes (handlers.c).
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/inbound.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"
#include "nodes/pg_list.h"
#include "nodes/value.h"
#include "utils/memutils.h"

#include "pg_mqtt_emit.h"
#include "handlers.h"
#include "listeners.h"
#include "outbox.h"
#include "topic.h"
#include "worker.h"

#define INBOX_BATCH		1000	/* received messages kept in one transaction */

static List *subscribed = NIL;	/* topic filters (String), in TopMemoryContext */
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

/* Does some listener want remote events (or is a subscriber still there)? */
bool
me_inbound_wanted(void)
{
	return subscribed != NIL || me_client_broker(ME_CLIENT_SUBSCRIBER) != NULL;
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

	old = MemoryContextSwitchTo(TopMemoryContext);
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
	MemoryContextSwitchTo(old);

	/* unsubscribe what is no longer wanted */
	foreach(lc, subscribed)
	{
		if (list_member(want, lfirst(lc)))
			keep = lappend(keep, lfirst(lc));
		else if (connected)
			me_broker_unsubscribe(sub, strVal(lfirst(lc)));
	}

	if (want == NIL)
	{
		/* nobody listens for remote events: no subscriber connection */
		me_client_drop(ME_CLIENT_SUBSCRIBER, 100);
		subscribed = NIL;
		me_set_subscriptions(0);
		return;
	}

	if (connected)
	{
		foreach(lc, want)
		{
			if (all || !list_member(keep, lfirst(lc)))
			{
				int			rc = me_broker_subscribe(sub, strVal(lfirst(lc)),
													 filter_qos(strVal(lfirst(lc))));

				if (rc != 0)
					ereport(LOG,
							(errmsg("pg_mqtt_emit cannot subscribe to \"%s\": %s",
									strVal(lfirst(lc)), me_broker_strerror(rc))));
				else
					ereport(DEBUG1,
							(errmsg("pg_mqtt_emit subscribed to \"%s\"", strVal(lfirst(lc)))));
			}
		}
	}
	subscribed = want;
	me_set_subscriptions(list_length(want));
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
		return;

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
	 * Keep what arrived in the outbox for the listener worker, up to
	 * INBOX_BATCH messages a transaction.  Messages larger than max_payload,
	 * or that are not valid text, are not kept.
	 */
	m = news.incoming;
	while (m)
	{
		const char *topics[INBOX_BATCH];
		const char *payloads[INBOX_BATCH];
		int			topic_lens[INBOX_BATCH];
		int			payload_lens[INBOX_BATCH];
		const char *mtopics[INBOX_BATCH];
		const char *mpayloads[INBOX_BATCH];
		int			mtopic_lens[INBOX_BATCH];
		int			mpayload_lens[INBOX_BATCH];
		MeIncoming *batch = m;
		int			n = 0;
		int			nm = 0;

		while (m && n + nm < INBOX_BATCH)
		{
			const char *why = NULL;

			/*
			 * Not one of our topics: a message for handlers, any bytes.  The
			 * topic must be text here (MQTT requires UTF-8 anyway).
			 */
			if (!me_topic_is_event(m->topic, m->topic_len))
			{
				if (m->payload_len > mqtt_emit_max_payload)
					why = "payload larger than \"mqtt_emit.max_payload\"";
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
		if (n > 0 || nm > 0)
		{
			me_worker_begin_tx("keeping received messages");
			me_worker_commit_async();
			if (n > 0)
				me_outbox_insert_received(topics, topic_lens, payloads, payload_lens, n);
			if (nm > 0)
				me_outbox_insert_messages(mtopics, mtopic_lens, mpayloads, mpayload_lens, nm);
			me_worker_end_tx();
			stored = true;
		}
		while (batch != m)
		{
			MeIncoming *next = batch->next;

			me_broker_free_message(batch);
			batch = next;
		}
	}
	if (stored)
		me_wake_listener();
}
