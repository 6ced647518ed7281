/*
 * common.h: small helpers shared by the bench/ MQTT programs.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <MQTTAsync.h>

/*
 * State that paho's threads change and main() waits for: under mu, with cv
 * broadcast on every change.  PROGNAME names the program in messages.
 */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int	connected = 0;
static int	failed = 0;

/* set *flag under mu and wake main() */
static inline void
set_flag(int *flag)
{
	pthread_mutex_lock(&mu);
	*flag = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

/* paho callbacks: connected, connect (or subscribe) failed, connection lost */
static void
on_connect(void *context, MQTTAsync_successData *r)
{
	set_flag(&connected);
}

static void
on_failure(void *context, MQTTAsync_failureData *r)
{
	set_flag(&failed);
}

static void
on_lost(void *context, char *cause)
{
	fprintf(stderr, "%s: connection lost: %s\n", PROGNAME, cause ? cause : "?");
	set_flag(&failed);
}

/* wall clock in nanoseconds (CLOCK_REALTIME: comparable across processes) */
static inline int64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* add ms milliseconds to an absolute CLOCK_REALTIME timespec */
static inline struct timespec
deadline_ms(long ms)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L)
	{
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	return ts;
}

#endif
