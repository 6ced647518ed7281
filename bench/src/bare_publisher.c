/*
 * bare_publisher.c: the reference point for pg_mqtt_emit's publish
 * throughput.  A plain paho MQTTAsync client that publishes COUNT messages
 * of SIZE bytes, QoS 1 by default, with the same client settings the
 * extension's publisher uses (MQTT 3.1.1, maxInflight 65535,
 * maxBufferedMessages 65535, one malloc'd context and one onSuccess callback
 * per message), retrying when paho reports MQTTASYNC_MAX_BUFFERED_MESSAGES.
 *
 *   bare_publisher -u tcp://127.0.0.1:PORT -t TOPIC -n COUNT -s SIZE [-q QOS]
 *                  [-i CLIENT_ID] [-T TIMEOUT_S] [-w WINDOW] [-r RATE]
 *
 * WINDOW (default 0, none) keeps at most that many messages unacknowledged
 * in the program itself, as mqtt_emit.max_inflight does in the extension.
 * RATE (messages/s, default 0: as fast as possible) paces the sends evenly,
 * to measure paho's cost per message when messages do not come in bursts.
 *
 * Prints name=value lines: start_ns (wall clock before the first send),
 * sent_ns (after the last sendMessage returned), acked_ns (last
 * acknowledgement), count, acked, msgs_per_s (count / (acked - start)).
 * Exit status 0 when every message was acknowledged within the timeout.
 */
#include <errno.h>
#include <getopt.h>
#include <string.h>
#include <unistd.h>

#define PROGNAME "bare_publisher"
#include "common.h"

static long acked = 0;
static long failures = 0;
static int64_t last_ack_ns = 0;

typedef struct Ctx
{
	long		seq;
} Ctx;

static void
on_publish(void *context, MQTTAsync_successData *r)
{
	int64_t		t = now_ns();

	free(context);
	pthread_mutex_lock(&mu);
	acked++;
	last_ack_ns = t;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

static void
on_publish_failure(void *context, MQTTAsync_failureData *r)
{
	free(context);
	pthread_mutex_lock(&mu);
	failures++;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

int
main(int argc, char **argv)
{
	const char *url = NULL;
	const char *topic = "bench/bare";
	const char *cid = NULL;
	long		count = 100000;
	int			size = 200;
	int			qos = 1;
	int			timeout_s = 120;
	long		window = 0;
	double		rate = 0;
	int			opt;
	char		cidbuf[64];
	char	   *payload;
	MQTTAsync	client;
	MQTTAsync_createOptions copts = MQTTAsync_createOptions_initializer;
	MQTTAsync_connectOptions conn = MQTTAsync_connectOptions_initializer;
	int			rc;
	int64_t		start_ns,
				sent_ns;
	long		i;
	struct timespec dl;
	long		retries = 0;

	while ((opt = getopt(argc, argv, "u:t:n:s:q:i:T:w:r:")) != -1)
	{
		switch (opt)
		{
			case 'u': url = optarg; break;
			case 't': topic = optarg; break;
			case 'n': count = atol(optarg); break;
			case 's': size = atoi(optarg); break;
			case 'q': qos = atoi(optarg); break;
			case 'i': cid = optarg; break;
			case 'T': timeout_s = atoi(optarg); break;
			case 'w': window = atol(optarg); break;
			case 'r': rate = atof(optarg); break;
			default:
				fprintf(stderr, "usage: %s -u URL [-t TOPIC] [-n COUNT] [-s SIZE] [-q QOS] [-i CLIENT_ID] [-T TIMEOUT_S] [-w WINDOW] [-r RATE]\n", argv[0]);
				return 2;
		}
	}
	if (url == NULL || count <= 0 || size <= 0)
	{
		fprintf(stderr, "bare_publisher: -u URL, a positive -n and -s are required\n");
		return 2;
	}
	if (cid == NULL)
	{
		snprintf(cidbuf, sizeof(cidbuf), "bench-bare-%d", (int) getpid());
		cid = cidbuf;
	}

	/* a JSON-looking payload of exactly size bytes */
	payload = malloc(size + 1);
	memset(payload, 'x', size);
	if (size >= 8)
	{
		memcpy(payload, "{\"p\":\"", 6);
		payload[size - 2] = '"';
		payload[size - 1] = '}';
	}
	payload[size] = '\0';

	copts.sendWhileDisconnected = 0;
	copts.maxBufferedMessages = 65535;
	copts.MQTTVersion = MQTTVERSION_3_1_1;
	rc = MQTTAsync_createWithOptions(&client, url, cid, MQTTCLIENT_PERSISTENCE_NONE,
									 NULL, &copts);
	if (rc != MQTTASYNC_SUCCESS)
	{
		fprintf(stderr, "bare_publisher: create: %s\n", MQTTAsync_strerror(rc));
		return 1;
	}
	MQTTAsync_setConnectionLostCallback(client, NULL, on_lost);

	conn.keepAliveInterval = 30;
	conn.cleansession = 1;
	conn.maxInflight = 65535;
	conn.onSuccess = on_connect;
	conn.onFailure = on_failure;
	conn.MQTTVersion = MQTTVERSION_3_1_1;
	rc = MQTTAsync_connect(client, &conn);
	if (rc != MQTTASYNC_SUCCESS)
	{
		fprintf(stderr, "bare_publisher: connect: %s\n", MQTTAsync_strerror(rc));
		return 1;
	}
	dl = deadline_ms(10000);
	pthread_mutex_lock(&mu);
	while (!connected && !failed)
		if (pthread_cond_timedwait(&cv, &mu, &dl) == ETIMEDOUT)
			break;
	pthread_mutex_unlock(&mu);
	if (!connected)
	{
		fprintf(stderr, "bare_publisher: could not connect to %s\n", url);
		return 1;
	}

	start_ns = now_ns();
	for (i = 0; i < count; i++)
	{
		MQTTAsync_message msg = MQTTAsync_message_initializer;
		MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;

		if (rate > 0)
		{
			int64_t		due = start_ns + (int64_t) (i * 1e9 / rate);
			int64_t		now = now_ns();

			if (due > now)
			{
				struct timespec ts = {(due - now) / 1000000000, (due - now) % 1000000000};

				nanosleep(&ts, NULL);
			}
		}
		if (window > 0 && qos > 0)
		{
			/* keep at most window messages unacknowledged, as the extension does */
			pthread_mutex_lock(&mu);
			while (i - acked - failures >= window && !failed)
			{
				dl = deadline_ms(100);
				pthread_cond_timedwait(&cv, &mu, &dl);
			}
			pthread_mutex_unlock(&mu);
		}
		for (;;)
		{
			Ctx		   *ctx = malloc(sizeof(Ctx));

			ctx->seq = i;
			msg.payload = payload;
			msg.payloadlen = size;
			msg.qos = qos;
			msg.retained = 0;
			ro.onSuccess = on_publish;
			ro.onFailure = on_publish_failure;
			ro.context = ctx;
			rc = MQTTAsync_sendMessage(client, topic, &msg, &ro);
			if (rc == MQTTASYNC_SUCCESS)
				break;
			free(ctx);
			if (rc != MQTTASYNC_MAX_BUFFERED_MESSAGES)
			{
				fprintf(stderr, "bare_publisher: send: %s (%d)\n", MQTTAsync_strerror(rc), rc);
				return 1;
			}
			/* backpressure: wait for an acknowledgement, then retry */
			retries++;
			dl = deadline_ms(100);
			pthread_mutex_lock(&mu);
			{
				long		seen = acked;

				while (acked == seen && !failed)
					if (pthread_cond_timedwait(&cv, &mu, &dl) == ETIMEDOUT)
						break;
			}
			pthread_mutex_unlock(&mu);
			if (failed)
				return 1;
		}
	}
	sent_ns = now_ns();

	if (qos == 0)
	{
		/* QoS 0 has no acknowledgement: wait until paho's queue is empty */
		MQTTAsync_token *tokens = NULL;

		for (i = 0; i < (long) timeout_s * 1000; i++)
		{
			MQTTAsync_getPendingTokens(client, &tokens);
			if (tokens == NULL || tokens[0] == -1)
				break;
			MQTTAsync_free(tokens);
			tokens = NULL;
			usleep(1000);
		}
		if (tokens)
			MQTTAsync_free(tokens);
		pthread_mutex_lock(&mu);
		acked = count;
		last_ack_ns = now_ns();
		pthread_mutex_unlock(&mu);
	}

	dl = deadline_ms((long) timeout_s * 1000);
	pthread_mutex_lock(&mu);
	while (acked + failures < count && !failed)
		if (pthread_cond_timedwait(&cv, &mu, &dl) == ETIMEDOUT)
			break;
	pthread_mutex_unlock(&mu);

	printf("window=%ld\ncount=%ld\nsize=%d\nqos=%d\nacked=%ld\nfailures=%ld\nretries=%ld\n",
		   window, count, size, qos, acked, failures, retries);
	printf("start_ns=%lld\nsent_ns=%lld\nacked_ns=%lld\n",
		   (long long) start_ns, (long long) sent_ns, (long long) last_ack_ns);
	if (acked == count && last_ack_ns > start_ns)
		printf("msgs_per_s=%.0f\n", count / ((last_ack_ns - start_ns) / 1e9));
	fflush(stdout);

	{
		MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;

		d.timeout = 1000;
		MQTTAsync_disconnect(client, &d);
		usleep(100000);
	}
	MQTTAsync_destroy(&client);
	return acked == count ? 0 : 1;
}
