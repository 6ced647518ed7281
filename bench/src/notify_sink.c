/*
 * notify_sink.c: LISTEN on a channel and consume every notification, as an
 * application built on pg_notify would; the consumer of the "notify_listened"
 * baseline of the trigger benchmark.
 *
 *   notify_sink CONNINFO CHANNEL
 *
 * Prints "ready" once it listens, and on SIGTERM or SIGINT the number of
 * notifications it received ("notifications: N") and exits 0.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>

#include <libpq-fe.h>

static volatile sig_atomic_t stop = 0;

static void
on_signal(int sig)
{
	stop = 1;
}

int
main(int argc, char **argv)
{
	PGconn	   *conn;
	PGresult   *res;
	char	   *ident;
	char		sql[256];
	long		count = 0;
	struct sigaction sa;

	if (argc != 3)
	{
		fprintf(stderr, "usage: %s CONNINFO CHANNEL\n", argv[0]);
		return 2;
	}
	conn = PQconnectdb(argv[1]);
	if (PQstatus(conn) != CONNECTION_OK)
	{
		fprintf(stderr, "notify_sink: %s", PQerrorMessage(conn));
		return 1;
	}
	ident = PQescapeIdentifier(conn, argv[2], strlen(argv[2]));
	snprintf(sql, sizeof(sql), "LISTEN %s", ident);
	PQfreemem(ident);
	res = PQexec(conn, sql);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
	{
		fprintf(stderr, "notify_sink: %s", PQerrorMessage(conn));
		return 1;
	}
	PQclear(res);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	printf("ready\n");
	fflush(stdout);

	while (!stop)
	{
		int			sock = PQsocket(conn);
		fd_set		rd;
		PGnotify   *n;

		FD_ZERO(&rd);
		FD_SET(sock, &rd);
		if (select(sock + 1, &rd, NULL, NULL, NULL) < 0)
		{
			if (errno == EINTR)
				continue;
			perror("notify_sink: select");
			return 1;
		}
		if (!PQconsumeInput(conn))
		{
			fprintf(stderr, "notify_sink: %s", PQerrorMessage(conn));
			return 1;
		}
		while ((n = PQnotifies(conn)) != NULL)
		{
			count++;
			PQfreemem(n);
		}
	}
	printf("notifications: %ld\n", count);
	PQfinish(conn);
	return 0;
}
