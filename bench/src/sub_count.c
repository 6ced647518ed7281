/*
 * sub_count.c: a paho MQTTAsync subscriber that counts messages, for
 * bench/: it tells when the last of N expected messages arrived.
 *
 *   sub_count -u tcp://127.0.0.1:PORT -t FILTER -n EXPECTED [-q QOS]
 *             [-r READY_FILE] [-i CLIENT_ID] [-T TIMEOUT_S] [-b]
 *
 * Subscribes (clean session), creates READY_FILE once the broker has
 * acknowledged the subscription, then counts.  When EXPECTED messages have
 * arrived, or TIMEOUT_S passed, it prints name=value lines: count, bytes,
 * avg_payload, first_ns and last_ns (wall clock, CLOCK_REALTIME, at the
 * first and the EXPECTED-th message) and exits (0 if all arrived).
 *
 * -b: batched messages of pg_mqtt_emit (watch(..., batch => true)): each
 * message counts as the events it carries, its "count" field, so that
 * EXPECTED is the number of rows; messages=N tells how many messages
 * carried them.
 */
#include <errno.h>
#include <getopt.h>
#include <string.h>
#include <unistd.h>

#define PROGNAME "sub_count"
#include "common.h"

static int	subscribed = 0;
static long expected = 0;
static long count = 0;
static long long bytes = 0;
static int64_t first_ns = 0;
static int64_t last_ns = 0;
static int	batched = 0;
static long messages = 0;

/* the "count" field of a batched message's payload, or 1 */
static long
batch_count(const char *p, int len)
{
	static const char key[] = "\"count\":";
	int			i;

	for (i = 0; i + (int) sizeof(key) - 1 < len; i++)
		if (memcmp(p + i, key, sizeof(key) - 1) == 0)
			return atol(p + i + sizeof(key) - 1);
	return 1;
}

static void
on_subscribe(void *context, MQTTAsync_successData *r)
{
	set_flag(&subscribed);
}

static int
on_message(void *context, char *topic, int topicLen, MQTTAsync_message *m)
{
	int64_t		t = now_ns();

	pthread_mutex_lock(&mu);
	if (count == 0)
		first_ns = t;
	messages++;
	count += batched ? batch_count(m->payload, m->payloadlen) : 1;
	bytes += m->payloadlen;
	if (count >= expected && last_ns == 0)
	{
		last_ns = t;
		pthread_cond_broadcast(&cv);
	}
	pthread_mutex_unlock(&mu);
	MQTTAsync_freeMessage(&m);
	MQTTAsync_free(topic);
	return 1;
}

int
main(int argc, char **argv)
{
	const char *url = NULL;
	const char *filter = NULL;
	const char *ready = NULL;
	const char *cid = NULL;
	char		cidbuf[64];
	int			qos = 1;
	int			timeout_s = 120;
	int			opt;
	int			rc;
	MQTTAsync	client;
	MQTTAsync_createOptions copts = MQTTAsync_createOptions_initializer;
	MQTTAsync_connectOptions conn = MQTTAsync_connectOptions_initializer;
	MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
	struct timespec dl;
	int			ok;

	while ((opt = getopt(argc, argv, "u:t:n:q:r:i:T:b")) != -1)
	{
		switch (opt)
		{
			case 'u': url = optarg; break;
			case 't': filter = optarg; break;
			case 'n': expected = atol(optarg); break;
			case 'q': qos = atoi(optarg); break;
			case 'r': ready = optarg; break;
			case 'i': cid = optarg; break;
			case 'T': timeout_s = atoi(optarg); break;
			case 'b': batched = 1; break;
			default:
				fprintf(stderr, "usage: %s -u URL -t FILTER -n EXPECTED [-q QOS] [-r READY_FILE] [-i CLIENT_ID] [-T TIMEOUT_S] [-b]\n", argv[0]);
				return 2;
		}
	}
	if (url == NULL || filter == NULL || expected <= 0)
	{
		fprintf(stderr, "sub_count: -u, -t and a positive -n are required\n");
		return 2;
	}
	if (cid == NULL)
	{
		snprintf(cidbuf, sizeof(cidbuf), "bench-sub-%d", (int) getpid());
		cid = cidbuf;
	}

	copts.MQTTVersion = MQTTVERSION_3_1_1;
	rc = MQTTAsync_createWithOptions(&client, url, cid, MQTTCLIENT_PERSISTENCE_NONE,
									 NULL, &copts);
	if (rc != MQTTASYNC_SUCCESS)
	{
		fprintf(stderr, "sub_count: create: %s\n", MQTTAsync_strerror(rc));
		return 1;
	}
	MQTTAsync_setCallbacks(client, NULL, on_lost, on_message, NULL);

	conn.keepAliveInterval = 30;
	conn.cleansession = 1;
	conn.maxInflight = 65535;
	conn.onSuccess = on_connect;
	conn.onFailure = on_failure;
	conn.MQTTVersion = MQTTVERSION_3_1_1;
	if ((rc = MQTTAsync_connect(client, &conn)) != MQTTASYNC_SUCCESS)
	{
		fprintf(stderr, "sub_count: connect: %s\n", MQTTAsync_strerror(rc));
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
		fprintf(stderr, "sub_count: could not connect to %s\n", url);
		return 1;
	}

	ro.onSuccess = on_subscribe;
	ro.onFailure = on_failure;
	if ((rc = MQTTAsync_subscribe(client, filter, qos, &ro)) != MQTTASYNC_SUCCESS)
	{
		fprintf(stderr, "sub_count: subscribe: %s\n", MQTTAsync_strerror(rc));
		return 1;
	}
	dl = deadline_ms(10000);
	pthread_mutex_lock(&mu);
	while (!subscribed && !failed)
		if (pthread_cond_timedwait(&cv, &mu, &dl) == ETIMEDOUT)
			break;
	pthread_mutex_unlock(&mu);
	if (!subscribed)
	{
		fprintf(stderr, "sub_count: subscription to %s not acknowledged\n", filter);
		return 1;
	}
	if (ready)
	{
		FILE	   *f = fopen(ready, "w");

		if (f)
			fclose(f);
	}

	dl = deadline_ms((long) timeout_s * 1000);
	pthread_mutex_lock(&mu);
	while (count < expected && !failed)
		if (pthread_cond_timedwait(&cv, &mu, &dl) == ETIMEDOUT)
			break;
	ok = (count >= expected);
	printf("count=%ld\nexpected=%ld\nmessages=%ld\nbytes=%lld\navg_payload=%.1f\nfirst_ns=%lld\nlast_ns=%lld\n",
		   count, expected, messages, bytes, messages ? (double) bytes / messages : 0.0,
		   (long long) first_ns, (long long) last_ns);
	pthread_mutex_unlock(&mu);
	fflush(stdout);

	{
		MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;

		d.timeout = 500;
		MQTTAsync_disconnect(client, &d);
		usleep(50000);
	}
	MQTTAsync_destroy(&client);
	return ok ? 0 : 1;
}
