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
 * are subscribed again (a clean session forgets them).
 *
 * Received messages are handed to listeners.c, up to 1000 in one
 * transaction.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/inbound.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "nodes/pg_list.h"
#include "nodes/value.h"
#include "utils/memutils.h"

#include "pg_mqtt_emit.h"
#include "listeners.h"
#include "topic.h"
#include "worker.h"

static List *subscribed = NIL;	/* topic filters (String), in TopMemoryContext */

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
				int			rc = me_broker_subscribe(sub, strVal(lfirst(lc)), 1);

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
	bool		in_tx = false;
	int			n = 0;

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

	m = news.incoming;
	while (m)
	{
		MeIncoming *next = m->next;
		MeRemoteMessage msg;

		if (!in_tx)
		{
			me_worker_begin_tx("running remote listeners");
			in_tx = true;
		}
		msg.topic = m->topic;
		msg.topic_len = m->topic_len;
		msg.payload = m->payload;
		msg.payload_len = m->payload_len;
		me_listeners_handle_remote(&msg);
		me_broker_free_message(m);
		m = next;
		/* commit now and then so that one long burst is not one transaction */
		if (++n % 1000 == 0)
		{
			me_worker_end_tx();
			in_tx = false;
		}
	}
	if (in_tx)
		me_worker_end_tx();
}
