/*
 * sync_publisher.c: what paho's synchronous client (MQTTClient) publishes
 * per second at QoS 1 on this machine, beside bare_publisher's MQTTAsync:
 * issue 16's candidate for a faster publish path.
 *
 *   sync_publisher -u tcp://127.0.0.1:PORT -t TOPIC -n COUNT -s SIZE [-q QOS]
 *                  [-i CLIENT_ID] [-T TIMEOUT_S] [-w WINDOW]
 *
 * One thread publishes with MQTTClient_publish5() straight onto the socket
 * (MQTTClient writes in the caller's thread; there is no send thread);
 * paho's receive thread (started because callbacks are set) takes the
 * PUBACKs and calls deliveryComplete, which counts.  WINDOW (default 1000,
 * the extension's mqtt_emit.max_inflight) is both paho's
 * maxInflightMessages and the program's own limit: the program waits for
 * room before publishing, so that paho never blocks in MQTTClient_yield()
 * (100 ms) on a full window.
 *
 * Prints the same name=value lines as bare_publisher: start_ns, sent_ns,
 * acked_ns, count, acked, msgs_per_s, plus cpu_us_per_msg (the process's
 * user + system CPU per message).
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <MQTTClient.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long acked = 0;
static int	lost = 0;
static int64_t last_ack_ns = 0;

static int64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void
on_delivered(void *context, MQTTClient_deliveryToken dt)
{
	int64_t		t = now_ns();

	pthread_mutex_lock(&mu);
	acked++;
	last_ack_ns = t;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

static int
on_arrived(void *context, char *topic, int topicLen, MQTTClient_message *m)
{
	MQTTClient_freeMessage(&m);
	MQTTClient_free(topic);
	return 1;
}

static void
on_lost(void *context, char *cause)
{
	fprintf(stderr, "sync_publisher: connection lost: %s\n", cause ? cause : "?");
	pthread_mutex_lock(&mu);
	lost = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

int
main(int argc, char **argv)
{
	const char *url = NULL;
	const char *topic = "bench/sync";
	const char *client_id = "bench_sync_publisher";
	long		count = 10000;
	int			size = 200;
	int			qos = 1;
	int			timeout_s = 120;
	long		window = 1000;
	int			c;
	MQTTClient	client;
	MQTTClient_connectOptions opts = MQTTClient_connectOptions_initializer;
	char	   *payload;
	int64_t		start_ns,
				sent_ns;
	long		i;
	int			rc;
	struct rusage ru;
	double		cpu_us;

	while ((c = getopt(argc, argv, "u:t:n:s:q:i:T:w:")) != -1)
	{
		switch (c)
		{
			case 'u': url = optarg; break;
			case 't': topic = optarg; break;
			case 'n': count = atol(optarg); break;
			case 's': size = atoi(optarg); break;
			case 'q': qos = atoi(optarg); break;
			case 'i': client_id = optarg; break;
			case 'T': timeout_s = atoi(optarg); break;
			case 'w': window = atol(optarg); break;
			default:
				fprintf(stderr, "usage: sync_publisher -u URL [-t TOPIC] [-n COUNT] [-s SIZE] [-q QOS] [-i ID] [-T S] [-w WINDOW]\n");
				return 2;
		}
	}
	if (url == NULL || window < 1 || window > 65535)
	{
		fprintf(stderr, "sync_publisher: -u URL is required, -w is 1..65535\n");
		return 2;
	}

	payload = malloc(size);
	memset(payload, 'x', size);

	if ((rc = MQTTClient_create(&client, url, client_id,
								MQTTCLIENT_PERSISTENCE_NONE, NULL)) != MQTTCLIENT_SUCCESS)
	{
		fprintf(stderr, "sync_publisher: create: %d\n", rc);
		return 1;
	}
	MQTTClient_setCallbacks(client, NULL, on_lost, on_arrived, on_delivered);
	opts.keepAliveInterval = 60;
	opts.cleansession = 1;
	opts.maxInflightMessages = (int) window;
	if ((rc = MQTTClient_connect(client, &opts)) != MQTTCLIENT_SUCCESS)
	{
		fprintf(stderr, "sync_publisher: connect: %d\n", rc);
		return 1;
	}

	start_ns = now_ns();
	for (i = 0; i < count; i++)
	{
		MQTTClient_deliveryToken dt;

		if (qos > 0)
		{
			pthread_mutex_lock(&mu);
			while (!lost && i - acked >= window)
				pthread_cond_wait(&cv, &mu);
			pthread_mutex_unlock(&mu);
			if (lost)
				break;
		}
		rc = MQTTClient_publish(client, topic, size, payload, qos, 0, &dt);
		if (rc != MQTTCLIENT_SUCCESS)
		{
			fprintf(stderr, "sync_publisher: publish %ld: %d\n", i, rc);
			break;
		}
	}
	sent_ns = now_ns();

	if (qos > 0)
	{
		int64_t		limit = start_ns + (int64_t) timeout_s * 1000000000;

		pthread_mutex_lock(&mu);
		while (!lost && acked < i && now_ns() < limit)
		{
			struct timespec ts;

			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += 50 * 1000000L;
			if (ts.tv_nsec >= 1000000000L)
			{
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000L;
			}
			pthread_cond_timedwait(&cv, &mu, &ts);
		}
		pthread_mutex_unlock(&mu);
	}
	else
	{
		acked = i;
		last_ack_ns = sent_ns;
	}

	getrusage(RUSAGE_SELF, &ru);
	cpu_us = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
		ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;

	printf("start_ns=%lld\n", (long long) start_ns);
	printf("sent_ns=%lld\n", (long long) sent_ns);
	printf("acked_ns=%lld\n", (long long) last_ack_ns);
	printf("count=%ld\n", count);
	printf("acked=%ld\n", acked);
	printf("msgs_per_s=%.0f\n",
		   last_ack_ns > start_ns ? acked / ((last_ack_ns - start_ns) / 1e9) : 0.0);
	printf("cpu_us_per_msg=%.1f\n", acked > 0 ? cpu_us / acked : 0.0);

	MQTTClient_disconnect(client, 1000);
	MQTTClient_destroy(&client);
	return acked == count ? 0 : 1;
}
