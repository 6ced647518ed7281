/*-------------------------------------------------------------------------
 *
 * inflight.c
 *		The window of published messages awaiting acknowledgement, and the
 *		publish cursors.
 *
 * Every message handed to the publisher gets a message number (msgno),
 * which paho hands back with its acknowledgement or failure.  The window
 * is a FIFO of the events in flight, oldest first; an event sent in "both"
 * topic styles is two messages and waits for both.  Acknowledged events
 * leave from the front only, so the publish cursors move in order:
 *
 *	pub_pos		queue position up to which entries were sent or skipped
 *	pub_done	queue position up to which everything is acknowledged
 *	outbox_cursor	place in the outbox's publishing order up to which rows
 *				were sent
 *
 * A failure, a lost connection or a send error resets the window: nothing
 * in flight counts any more, and publishing starts again at the oldest
 * unacknowledged event (pub_done; the outbox cursor from the start).  The
 * event at the front of the window at a reset gets a strike, at most one
 * per connection; after three in a row (the broker closes the connection
 * each time it gets it) an
 * outbox row goes to the dead letters.  A message the broker refuses in
 * its PUBACK (MQTT 5) is kept in the dead letters at once.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/inflight.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "nodes/pg_list.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "pg_mqtt_emit.h"
#include "outbox.h"
#include "pubprops.h"
#include "topic.h"
#include "worker.h"

#define WINDOW_SIZE			65536	/* > the largest mqtt_emit.max_inflight */
#define STRIKES_FOR_DEAD_LETTER	3

/*
 * Bytes of payload in flight, at most (but always one message): see
 * me_inflight_room().
 */
#define MAX_INFLIGHT_BYTES		(1024 * 1024)

/* One published event waiting for its acknowledgements. */
typedef struct InFlight
{
	uint64		start_pos;		/* queue entry: where it starts */
	uint64		end_pos;		/* queue entry: done up to here when acked */
	bool		from_outbox;	/* sent from an outbox row */
	int64		row_id;			/* its outbox row (sent from it, or durable), or 0 */
	int64		key;			/* outbox row: its order; queue entry: -(start+1) */
	int			pending;		/* acknowledgements still missing */
	int64		bytes;			/* payload bytes sent for it */
} InFlight;

static InFlight *window;
static int	window_start;
static int	window_count;
static int64 window_bytes;		/* of the events in the window */
static int64 last_bytes = 0;	/* of the last event sent */
static uint64 first_msgno;		/* msgno of window[window_start] */
static uint64 next_msgno = 1;
static int	queued_count = 0;	/* queue entries in the window */
static int	outbox_count = 0;	/* outbox rows in the window */
static bool need_reset = false;
static bool backpressure = false;	/* paho's buffer is full */

/* publish cursors */
static uint64 pub_pos;
static uint64 pub_done;
static int64 outbox_cursor = 0;

/* strikes */
static int64 strike_key = 0;	/* oldest unacknowledged event at resets */
static int	strikes = 0;
static uint64 strike_connection = 0;	/* the connection of the last strike */
static int64 dead_letter_row = 0;	/* struck out: to the dead letters */
static bool careful = false;	/* after a strike: one in flight until an ack */

/* the broker said "not now" (an MQTT 5 PUBACK, quota exceeded) */
static TimestampTz busy_until = 0;	/* send nothing before then */
static int	busy_ms = 0;		/* the pause, doubled each time up to 5 s */
static bool busy_reset = false; /* the next reset is for that: no strike */

/* refused by the broker, for the dead letters */
static List *refused_entries = NIL; /* copies of queue entries */
static List *refused_rows = NIL;	/* outbox row ids */

static StringInfoData topicbuf;
static StringInfoData signbuf;

static void reset(void);

void
me_inflight_init(uint64 head)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	window = MemoryContextAllocHuge(TopMemoryContext, sizeof(InFlight) * WINDOW_SIZE);
	window_start = window_count = 0;
	window_bytes = 0;
	first_msgno = next_msgno;
	pub_pos = pub_done = head;
	initStringInfo(&topicbuf);
	initStringInfo(&signbuf);
	MemoryContextSwitchTo(old);
}

static inline InFlight *
by_msgno(uint64 msgno)
{
	if (msgno < first_msgno || msgno >= first_msgno + window_count)
		return NULL;			/* from before a reset */
	return &window[(window_start + (msgno - first_msgno)) % WINDOW_SIZE];
}

/*
 * The event id of a row event's payload: the value of the top-level key
 * "eventId" (payload.c), which is followed by "old" rows and the origin,
 * and may be preceded by rows with keys of that name of their own, so the
 * scan follows the JSON's nesting (strings with their escapes, objects and
 * arrays) and looks at keys of the outer object only.  One pass over the
 * payload, stopping at the id.  out stays empty when there is none (a JSON
 * profile that writes no id).
 */
static void
find_event_id(const char *payload, int len, char *out)
{
	static const char key[] = "\"eventId\":\"";
	const int	keylen = sizeof(key) - 1;
	int			depth = 0;
	bool		expect_key = false;
	int			i = 0;

	while (i < len)
	{
		char		c = payload[i];

		if (c == '"')
		{
			if (depth == 1 && expect_key &&
				len - i >= keylen + MQTT_EMIT_EVENT_ID_LEN + 1 &&
				memcmp(payload + i, key, keylen) == 0 &&
				payload[i + keylen + MQTT_EMIT_EVENT_ID_LEN] == '"')
			{
				memcpy(out, payload + i + keylen, MQTT_EMIT_EVENT_ID_LEN);
				out[MQTT_EMIT_EVENT_ID_LEN] = '\0';
				return;
			}
			/* skip the string */
			for (i++; i < len && payload[i] != '"'; i++)
			{
				if (payload[i] == '\\')
					i++;
			}
			expect_key = false;
		}
		else if (c == '{' || c == '[')
		{
			depth++;
			expect_key = (c == '{' && depth == 1);
		}
		else if (c == '}' || c == ']')
			depth--;
		else if (c == ',')
			expect_key = (depth == 1);
		i++;
	}
}

/* paho refused a message (other than its buffer being full) */
static void
count_send_failure(int rc)
{
	me_count(ME_STAT_PUBLISH_FAILED, 1);
	me_set_last_error("publisher: send failed: %s (code %d)",
					  me_broker_strerror(rc), rc);
}

/*
 * Send one event (a queue entry ending at end_pos, or an outbox row when
 * outbox_row is set); false when it could not be sent now.  key names the
 * event for the strike count.
 */
bool
me_inflight_send(const MqttEmitEventHeader *hdr, const char *model,
				 const char *payload, uint64 end_pos, int64 outbox_row, int64 key)
{
	MeBroker   *pub = me_client_broker(ME_CLIENT_PUBLISHER);
	int			qos = (hdr->qos <= 2) ? hdr->qos : mqtt_emit_qos;
	int			nmsgs = 0;
	int			rc = 0;
	int			pass;
	uint64		msgno = next_msgno;
	int			len = (int) hdr->payload_len;
	const char *props = NULL;
	int			props_len = 0;
	char		event_id[MQTT_EMIT_EVENT_ID_LEN + 1];
	InFlight   *f;

	event_id[0] = '\0';
	if (hdr->kind == ME_KIND_PUBLISH && (hdr->flags & ME_FLAG_PROPS) &&
		!me_pubprops_split(&payload, &len, &props, &props_len))
		props = NULL;			/* malformed (cannot happen): publish it all */
	else if (hdr->kind == ME_KIND_ROW)
		find_event_id(payload, len, event_id);

	if (mqtt_emit_signing_key[0] != '\0' &&
		me_sign_payload(&signbuf, payload, len))
	{
		payload = signbuf.data;
		len = signbuf.len;
	}

	for (pass = 0; pass < 2; pass++)
	{
		if (hdr->kind == ME_KIND_PUBLISH)
		{
			if (pass == 1)
				break;
			resetStringInfo(&topicbuf);
			appendBinaryStringInfo(&topicbuf, model, hdr->model_len);
		}
		else
		{
			if (pass == 0 && mqtt_emit_topic_style == ME_TOPIC_ALL)
				continue;
			if (pass == 1 && mqtt_emit_topic_style == ME_TOPIC_OPERATION)
				break;
			me_build_topic(&topicbuf, hdr, model, pass == 1);
		}
		rc = me_broker_publish(pub, topicbuf.data, payload, len, qos,
							   (hdr->flags & ME_FLAG_RETAIN) != 0,
							   hdr->kind == ME_KIND_ROW, props, props_len,
							   event_id, msgno);
		if (rc != 0)
			break;
		nmsgs++;
	}

	if (rc != 0 && nmsgs == 0)
	{
		if (rc == ME_BROKER_BACKPRESSURE)
			backpressure = true;
		else
		{
			count_send_failure(rc);
			need_reset = true;
		}
		return false;
	}

	/*
	 * Track it; a partial "both" send is never done (its first topic's
	 * acknowledgement must not pop it: the reset would then start after
	 * it), and the window is sent again from its oldest event, this one's
	 * second topic with it (a message more than once rather than never).
	 */
	if (rc != 0)
	{
		if (rc != ME_BROKER_BACKPRESSURE)
			count_send_failure(rc);
		else
			busy_reset = true;	/* paho's buffer: no strike */
		need_reset = true;
	}
	if (window_count == 0)
		first_msgno = msgno;
	f = &window[(window_start + window_count) % WINDOW_SIZE];
	f->start_pos = end_pos - hdr->total_len;
	f->end_pos = end_pos;
	f->from_outbox = (outbox_row != 0);
	f->row_id = (outbox_row != 0) ? outbox_row : hdr->row_id;
	f->key = key;
	/* partial: one acknowledgement more than will come, never popped */
	f->pending = (rc != 0) ? nmsgs + 1 : nmsgs;
	f->bytes = (int64) len * nmsgs;
	window_count++;
	window_bytes += f->bytes;
	last_bytes = f->bytes;
	next_msgno++;
	if (f->from_outbox)
		outbox_count++;
	else
		queued_count++;
	return true;
}

/*
 * Mark the queue entry ending at end_pos as done for publishing, without
 * sending it: once what is in flight before it is done.
 */
void
me_inflight_skip(uint64 end_pos)
{
	if (queued_count == 0)
		pub_done = end_pos;
	else
		window[(window_start + window_count - 1) % WINDOW_SIZE].end_pos = end_pos;
	pub_pos = end_pos;
}

/* May another message be sent now? */
bool
me_inflight_window_open(void)
{
	return me_inflight_room() > 0;
}

/*
 * How many more messages may be sent now: none while paho's buffer is
 * full, a reset is due or the broker asked for a pause; one in flight at a
 * time after a strike (see reset()); else up to mqtt_emit.max_inflight,
 * and none while MAX_INFLIGHT_BYTES of payload are unacknowledged (what
 * fits besides is estimated; me_inflight_window_open() before each send
 * keeps to the limit).
 *
 * The byte limit is for paho: when its write of a message is cut short
 * because the socket buffer is full (the broker has not read what came
 * before), paho writes the rest only when its receive thread wakes up
 * again, which it does when something arrives or after 1 s
 * (Socket_getReadySocket waits for input only).  With a window of batched
 * messages (256 kB each, hundreds of them) that was a stall of about 1 s
 * after every few messages; keeping no more than 1 MB unacknowledged keeps
 * the socket buffers from filling.
 */
int
me_inflight_room(void)
{
	int			limit = careful ? 1 : mqtt_emit_max_inflight;

	if (backpressure || need_reset || window_count >= limit)
		return 0;
	if (window_count > 0 && window_bytes >= MAX_INFLIGHT_BYTES)
		return 0;
	if (busy_until != 0)
	{
		if (GetCurrentTimestamp() < busy_until)
			return 0;
		busy_until = 0;
	}
	if (last_bytes > 0)
	{
		/*
		 * Estimated from the sizes in flight (or the last one's): callers
		 * read that many outbox rows, payloads included.
		 */
		int64		each = window_count > 0 ? window_bytes / window_count : last_bytes;
		int64		fit = (MAX_INFLIGHT_BYTES - window_bytes) / Max(each, 1) + 1;

		if (fit < limit - window_count)
			return (int) fit;
	}
	return limit - window_count;
}

/*
 * The broker refused the message of an in-flight event for good (an MQTT 5
 * PUBACK with a failure reason): note it for the dead letters.
 */
static void
remember_refused(InFlight *f)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	if (f->from_outbox)
	{
		int64	   *id = palloc(sizeof(int64));

		*id = f->row_id;
		refused_rows = lappend(refused_rows, id);
	}
	else
	{
		MqttEmitEventHeader hdr;
		char	   *copy;

		me_queue_copy(f->start_pos, (char *) &hdr, sizeof(hdr));
		copy = palloc(hdr.total_len);
		me_queue_copy(f->start_pos, copy, hdr.total_len);
		refused_entries = lappend(refused_entries, copy);
	}
	MemoryContextSwitchTo(old);
}

/*
 * Write what the broker refused into the dead letters; without can_keep
 * (no extension, no table), count and log only.
 */
void
me_inflight_flush_refused(bool can_keep)
{
	ListCell   *lc;
	int			n = list_length(refused_entries) + list_length(refused_rows);

	if (n == 0)
		return;
	if (!can_keep)
	{
		me_count(ME_STAT_DEAD_LETTERS, n);
		ereport(LOG,
				(errmsg("pg_mqtt_emit: the broker refused %d messages for good", n)));
	}
	else
	{
		me_worker_begin_tx("keeping dead letters");
		foreach(lc, refused_rows)
			me_outbox_dead_letter_row(*(int64 *) lfirst(lc), "the broker refused the message");
		foreach(lc, refused_entries)
			me_outbox_dead_letter_entry((MqttEmitEventHeader *) lfirst(lc),
										"the broker refused the message");
		me_worker_end_tx();
	}
	list_free_deep(refused_entries);
	list_free_deep(refused_rows);
	refused_entries = refused_rows = NIL;
}

/*
 * Take the publisher's news: connection changes, acknowledgements,
 * refusals and failures.  Acknowledgements that came before a lost
 * connection count before the window is reset.
 */
void
me_inflight_take_news(void)
{
	MeBrokerNews news;
	int			i;

	if (!me_client_poll(ME_CLIENT_PUBLISHER, &news))
		return;

	/* refused for good: keep a copy in the dead letters, do not resend */
	for (i = 0; i < news.nrejects; i++)
	{
		InFlight   *f = by_msgno(news.rejects[i]);

		if (f == NULL || f->pending <= 0)
			continue;
		f->pending--;
		remember_refused(f);
	}
	for (i = 0; i < news.nacks; i++)
	{
		InFlight   *f = by_msgno(news.acks[i]);

		if (f != NULL && f->pending > 0)
		{
			f->pending--;
			me_count(ME_STAT_PUBLISHED, 1);
		}
	}
	for (i = 0; i < news.nfailures; i++)
	{
		me_count(ME_STAT_PUBLISH_FAILED, 1);
		if (by_msgno(news.failures[i]) != NULL)
			need_reset = true;
	}
	if (news.nfailures > 0)
		me_set_last_error("publisher: %d messages were not acknowledged", news.nfailures);

	/* pop acknowledged events from the front */
	while (window_count > 0 && window[window_start].pending == 0)
	{
		InFlight   *f = &window[window_start];

		if (f->row_id != 0)
			me_outbox_row_done(f->row_id);
		if (f->from_outbox)
			outbox_count--;
		else
		{
			pub_done = f->end_pos;
			queued_count--;
		}
		window_start = (window_start + 1) % WINDOW_SIZE;
		window_count--;
		window_bytes -= f->bytes;
		first_msgno++;
		if (f->key == strike_key)
			strikes = 0;		/* the broker took the one it refused */
		careful = false;
		busy_ms = 0;
	}
	if (queued_count == 0)
		pub_done = pub_pos;

	if (news.lost)
	{
		if (window_count > 0)
			need_reset = true;
		me_client_lost(ME_CLIENT_PUBLISHER, news.error);
	}
	if (news.nacks > 0)
		backpressure = false;
	if (news.nbusy > 0)
	{
		/* not the message's fault: a pause, no strike */
		busy_ms = (busy_ms == 0) ? 100 : Min(busy_ms * 2, 5000);
		busy_until = GetCurrentTimestamp() + (TimestampTz) busy_ms * 1000;
		busy_reset = true;
		me_set_last_error("publisher: the broker's quota is exceeded; publishing again in %d ms",
						  busy_ms);
	}
	if (need_reset)
		reset();
	busy_reset = false;			/* only for the reset of this news */
}

/*
 * Forget what is in flight and send it again, starting at the oldest
 * unacknowledged event.
 */
static void
reset(void)
{
	need_reset = false;
	if (window_count > 0)
	{
		InFlight   *oldest = &window[window_start];
		uint64		conn = me_client_connections(ME_CLIENT_PUBLISHER);

		me_count(ME_STAT_RETRIED, window_count);

		/*
		 * The same event failing again and again is refused for good.  An
		 * event keeps its strikes when it moves from the queue into the
		 * outbox (me_inflight_key_moved).  One strike per connection: a
		 * connection that failed can report it more than once (a failed
		 * delivery, then a failed send).  A broker that said "not now"
		 * (busy_reset) gives no strike.
		 */
		if (!busy_reset)
		{
			if (oldest->key != strike_key)
			{
				strike_key = oldest->key;
				strikes = 1;
			}
			else if (conn != strike_connection)
				strikes++;
			strike_connection = conn;
			if (oldest->from_outbox && strikes >= STRIKES_FOR_DEAD_LETTER)
				dead_letter_row = oldest->row_id;
		}

		/*
		 * Send the struck event alone until the broker acknowledges
		 * something: a broker that closes the connection for one message
		 * can close it before it has written the acknowledgements of the
		 * messages that came before it in the same read (mosquitto 2.1
		 * often does), and the strike would then go to an innocent event.
		 * Alone, the next loss is the struck event's own doing.
		 */
		careful = true;
	}
	window_start = 0;
	window_count = 0;
	window_bytes = 0;
	first_msgno = next_msgno;
	queued_count = 0;
	outbox_count = 0;
	pub_pos = pub_done;
	outbox_cursor = 0;
	backpressure = false;
	busy_reset = false;
}

/*
 * The clients are gone (destroyed, settings changed): whatever is in
 * flight will be sent again.  With always (shutting down, the queue goes
 * into the outbox), start over from the oldest unacknowledged event even
 * with nothing in flight.
 */
void
me_inflight_forget(bool always)
{
	if (always || window_count > 0 || need_reset)
		reset();
}

int
me_inflight_count(void)
{
	return window_count;
}

int
me_inflight_queued(void)
{
	return queued_count;
}

int
me_inflight_from_outbox(void)
{
	return outbox_count;
}

uint64
me_inflight_pub_pos(void)
{
	return pub_pos;
}

uint64
me_inflight_pub_done(void)
{
	return pub_done;
}

/* the queue entry ending at end_pos was sent */
void
me_inflight_published_to(uint64 end_pos)
{
	pub_pos = end_pos;
}

/* the queue up to end_pos now lives in the outbox (committed) */
void
me_inflight_moved_to(uint64 end_pos)
{
	pub_pos = pub_done = end_pos;
}

int64
me_inflight_outbox_cursor(void)
{
	return outbox_cursor;
}

void
me_inflight_set_outbox_cursor(int64 order)
{
	outbox_cursor = order;
}

/*
 * A queue entry moved into the outbox: it keeps its strikes under its new
 * key (its place in the publishing order).
 */
void
me_inflight_key_moved(int64 old_key, int64 new_key)
{
	if (strike_key == old_key)
		strike_key = new_key;
}

/*
 * The outbox row that struck out, to be moved to the dead letters, or 0.
 */
int64
me_inflight_take_dead_letter(void)
{
	int64		id = dead_letter_row;

	if (id != 0)
	{
		dead_letter_row = 0;
		strikes = 0;
	}
	return id;
}
