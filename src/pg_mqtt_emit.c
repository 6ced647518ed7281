/*-------------------------------------------------------------------------
 *
 * pg_mqtt_emit.c
 *		Module entry point: defines the mqtt_emit.* settings, requests shared
 *		memory and registers the launcher, which starts the background
 *		workers of each database with the extension (launcher.c).
 *
 * Everything that lives longer than one call starts here.  Settings that
 * size shared memory or are read at start (mqtt_emit.queue_size,
 * mqtt_emit.max_databases, mqtt_emit.database) exist only when the library
 * is preloaded; the rest are defined in every backend that
 * loads the library so that SET and SHOW work everywhere.  The SQL entry
 * points refuse to run unless the library was preloaded, because without the
 * worker and the queue no event could ever leave the server.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/pg_mqtt_emit.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#include "pg_mqtt_emit.h"
#include "topic.h"

PG_MODULE_MAGIC;

PGDLLEXPORT void _PG_init(void);

char	   *mqtt_emit_broker_url = NULL;
char	   *mqtt_emit_topic_prefix = NULL;
char	   *mqtt_emit_batch_topic_prefix = NULL;
int			mqtt_emit_batch_max_bytes = 256 * 1024;	/* bytes */
char	   *mqtt_emit_client_id = NULL;
char	   *mqtt_emit_username = NULL;
char	   *mqtt_emit_password = NULL;
int			mqtt_emit_qos = 1;
char	   *mqtt_emit_database = NULL;
int			mqtt_emit_max_databases = 4;
int			mqtt_emit_queue_size = 8192;	/* kB */
int			mqtt_emit_delivery = ME_DELIVERY_MEMORY;
int			mqtt_emit_dedup_ttl = 5000; /* ms */
int			mqtt_emit_dedup_keep = 600;	/* s */
int			mqtt_emit_dedup_max = 100000;
bool		mqtt_emit_enabled = true;
bool		mqtt_emit_emit_local = true;
bool		mqtt_emit_emit_remote = true;
char	   *mqtt_emit_tls_ca_file = NULL;
char	   *mqtt_emit_tls_cert_file = NULL;
char	   *mqtt_emit_tls_key_file = NULL;
bool		mqtt_emit_tls_verify = true;
int			mqtt_emit_keepalive = 30;	/* s */
int			mqtt_emit_reconnect_min = 100;	/* ms */
int			mqtt_emit_reconnect_max = 10000;	/* ms */
bool		mqtt_emit_clean_session = true;
int			mqtt_emit_session_expiry = 86400;	/* s */
int			mqtt_emit_mqtt_version = 4; /* 3.1.1 */
int			mqtt_emit_max_payload = 1024 * 1024;	/* bytes */
int			mqtt_emit_overflow = ME_OVERFLOW_SPILL;
int			mqtt_emit_listener_timeout = 10000; /* ms */
int			mqtt_emit_listener_batch_time = 1000;	/* ms */
int			mqtt_emit_marker_wait = 10;	/* ms */
int			mqtt_emit_topic_style = ME_TOPIC_OPERATION;
int			mqtt_emit_json_profile = ME_JSON_PROFILE_POSTGRES;
int			mqtt_emit_max_inflight = 1000;
double		mqtt_emit_batch_delay = 0.5;	/* ms */
int			mqtt_emit_outbox_max = 10000000;
char	   *mqtt_emit_signing_key = NULL;
bool		mqtt_emit_require_signature = false;
int			mqtt_emit_max_depth = 8;
int			mqtt_emit_max_transaction_events = 0;

bool		mqtt_emit_preloaded = false;

static const struct config_enum_entry delivery_options[] = {
	{"memory", ME_DELIVERY_MEMORY, false},
	{"durable", ME_DELIVERY_DURABLE, false},
	{NULL, 0, false}
};

static const struct config_enum_entry topic_style_options[] = {
	{"operation", ME_TOPIC_OPERATION, false},
	{"all", ME_TOPIC_ALL, false},
	{"both", ME_TOPIC_BOTH, false},
	{NULL, 0, false}
};

static const struct config_enum_entry json_profile_options[] = {
	{"postgres", ME_JSON_PROFILE_POSTGRES, false},
	{"prisma", ME_JSON_PROFILE_PRISMA, false},
	{NULL, 0, false}
};

static const struct config_enum_entry overflow_options[] = {
	{"spill", ME_OVERFLOW_SPILL, false},
	{"error", ME_OVERFLOW_ERROR, false},
	{"drop", ME_OVERFLOW_DROP, false},
	{NULL, 0, false}
};

static const struct config_enum_entry mqtt_version_options[] = {
	{"3.1.1", 4, false},
	{"5", 5, false},
	{NULL, 0, false}
};

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void mqtt_emit_shmem_request(void);
static void mqtt_emit_shmem_startup(void);
static bool check_topic_prefix(char **newval, void **extra, GucSource source);
static bool check_broker_url(char **newval, void **extra, GucSource source);
static const char *show_password(void);
static const char *show_signing_key(void);

/*
 * Module load callback.
 */
void
_PG_init(void)
{
	if (IsBinaryUpgrade)
		return;

	DefineCustomStringVariable("mqtt_emit.broker_url",
							   "Sets the URL of the MQTT broker, or a comma-separated list of brokers to fail over between.",
							   "Each URL: tcp://host:port or mqtt://host:port, ssl://host:port or mqtts://host:port (TLS), ws:// or wss://host:port/path (WebSocket).",
							   &mqtt_emit_broker_url,
							   "tcp://localhost:1883",
							   PGC_SIGHUP, 0,
							   check_broker_url, NULL, NULL);
	DefineCustomStringVariable("mqtt_emit.topic_prefix",
							   "Sets the first part of every MQTT topic.",
							   NULL,
							   &mqtt_emit_topic_prefix,
							   "prisma/events",
							   PGC_SIGHUP, 0,
							   check_topic_prefix, NULL, NULL);
	DefineCustomStringVariable("mqtt_emit.batch_topic_prefix",
							   "Sets the first part of the topics of batched messages.",
							   "Tables watched with batch => true publish one message per transaction to <prefix>/<model>/batch; the prefix must not be or lie under \"mqtt_emit.topic_prefix\", nor contain it.",
							   &mqtt_emit_batch_topic_prefix,
							   "prisma/batches",
							   PGC_SIGHUP, 0,
							   check_topic_prefix, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.batch_max_bytes",
							"Sets the largest payload of one part of a batched message.",
							"A transaction's events of a batched table that do not fit are sent in further parts; a part holds at least one event.",
							&mqtt_emit_batch_max_bytes,
							256 * 1024, 1024, 256 * 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_BYTE,
							NULL, NULL, NULL);
	DefineCustomStringVariable("mqtt_emit.client_id",
							   "Sets the MQTT client id of the publisher; the subscriber adds \"-subscriber\".",
							   "Empty means one derived from the cluster's system identifier.",
							   &mqtt_emit_client_id,
							   "",
							   PGC_SIGHUP, 0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("mqtt_emit.username",
							   "Sets the user name for the MQTT broker.",
							   NULL,
							   &mqtt_emit_username,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.qos",
							"Sets the MQTT quality of service used for publishing.",
							NULL,
							&mqtt_emit_qos,
							1, 0, 2,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	DefineCustomEnumVariable("mqtt_emit.delivery",
							 "Selects how committed events are kept until the broker has them.",
							 "\"memory\" uses the shared-memory queue; \"durable\" also writes them to the outbox table in the committing transaction.",
							 &mqtt_emit_delivery,
							 ME_DELIVERY_MEMORY, delivery_options,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.dedup_ttl",
							"Sets how long received event ids are remembered.",
							NULL,
							&mqtt_emit_dedup_ttl,
							5000, 0, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.dedup_keep",
							"Sets how long the ids of handled remote events are kept in mqtt_emit.received_ids.",
							"They are written in the transaction that runs the event's listeners, so that a copy that comes again (a publisher that sends again after a crash, a listener worker that was restarted) does not run them twice. 0 keeps them in memory only, for mqtt_emit.dedup_ttl.",
							&mqtt_emit_dedup_keep,
							600, 0, 7 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.dedup_max",
							"Sets the maximum number of event ids remembered for deduplication.",
							NULL,
							&mqtt_emit_dedup_max,
							100000, 100, 10000000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtt_emit.enabled",
							 "Captures changes of watched tables.",
							 "When off, watched tables produce no events.",
							 &mqtt_emit_enabled,
							 true,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtt_emit.emit_local",
							 "Runs local listeners for the events of this session.",
							 NULL,
							 &mqtt_emit_emit_local,
							 true,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtt_emit.emit_remote",
							 "Publishes the events of this session to the MQTT broker.",
							 NULL,
							 &mqtt_emit_emit_remote,
							 true,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
	DefineCustomStringVariable("mqtt_emit.tls_ca_file",
							   "Sets the file of trusted certificate authorities for TLS.",
							   NULL,
							   &mqtt_emit_tls_ca_file,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("mqtt_emit.tls_cert_file",
							   "Sets the client certificate file for TLS.",
							   NULL,
							   &mqtt_emit_tls_cert_file,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("mqtt_emit.tls_key_file",
							   "Sets the client private key file for TLS.",
							   NULL,
							   &mqtt_emit_tls_key_file,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtt_emit.tls_verify",
							 "Verifies the broker's certificate and host name.",
							 NULL,
							 &mqtt_emit_tls_verify,
							 true,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.keepalive",
							"Sets the MQTT keepalive interval.",
							NULL,
							&mqtt_emit_keepalive,
							30, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.reconnect_min",
							"Sets the first delay before reconnecting to the broker.",
							NULL,
							&mqtt_emit_reconnect_min,
							100, 10, 600000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.reconnect_max",
							"Sets the longest delay between reconnection attempts.",
							NULL,
							&mqtt_emit_reconnect_max,
							10000, 10, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtt_emit.clean_session",
							 "Starts the publisher's MQTT connections with a clean session.",
							 "The publisher sends again whatever the broker has not acknowledged, whatever its session.",
							 &mqtt_emit_clean_session,
							 true,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.session_expiry",
							"How long the broker keeps the subscriber's session while it is away.",
							"The broker queues the messages of the subscriptions meanwhile, so that a restarted server runs its remote listeners for them. 0 starts every subscriber connection with a clean session. MQTT 5 sends it as the Session Expiry Interval; an MQTT 3.1.1 broker keeps a session as its own settings say.",
							&mqtt_emit_session_expiry,
							86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomEnumVariable("mqtt_emit.mqtt_version",
							 "Selects the MQTT protocol version.",
							 NULL,
							 &mqtt_emit_mqtt_version,
							 4, mqtt_version_options,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.max_payload",
							"Sets the largest payload published or accepted.",
							NULL,
							&mqtt_emit_max_payload,
							1024 * 1024, 1024, 256 * 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_BYTE,
							NULL, NULL, NULL);
	DefineCustomEnumVariable("mqtt_emit.overflow",
							 "Selects what a commit does when the event queue is full.",
							 "\"spill\" writes them to the outbox table; \"error\" aborts the committing transaction; \"drop\" commits without its events and counts them.",
							 &mqtt_emit_overflow,
							 ME_OVERFLOW_SPILL, overflow_options,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.listener_timeout",
							"Sets the longest time one listener call may run.",
							"Zero disables the limit.",
							&mqtt_emit_listener_timeout,
							10000, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.listener_batch_time",
							"Sets how long one transaction of the listener worker may take before it commits.",
							"The listener worker commits after each event once this much time has passed in the transaction; one listener call can add up to mqtt_emit.listener_timeout.",
							&mqtt_emit_listener_batch_time,
							1000, 1, 60000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.marker_wait",
							"Sets how long a committing transaction that spills to the outbox waits for queue room for its marker.",
							"Without a marker its events are placed in the publishing order when the worker finds them, which may be after events that committed later.",
							&mqtt_emit_marker_wait,
							10, 0, 10000,
							PGC_SUSET, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomEnumVariable("mqtt_emit.json_profile",
							 "Selects how column values are rendered in events.",
							 "postgres: as to_jsonb() renders them. prisma: as Prisma's client writes them: bigint beyond 2^53 and numeric as strings, date, timestamp and timestamptz as UTC ISO 8601 with milliseconds and Z.",
							 &mqtt_emit_json_profile,
							 ME_JSON_PROFILE_POSTGRES, json_profile_options,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomEnumVariable("mqtt_emit.topic_style",
							 "Selects the topic form used for publishing.",
							 "\"operation\" is <prefix>/<model>/<operation>; \"all\" is <prefix>/<model>/all in lower case, as prisma-extension-emitter 2.x uses; \"both\" publishes both.",
							 &mqtt_emit_topic_style,
							 ME_TOPIC_OPERATION, topic_style_options,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.max_inflight",
							"Sets how many published messages may await acknowledgement.",
							"paho's cost per message grows with the number in flight.",
							&mqtt_emit_max_inflight,
							1000, 1, 65535,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomRealVariable("mqtt_emit.batch_delay",
							 "Sets how long the worker waits for more events after publishing some.",
							 "When commits come faster than the worker takes them one by one, it "
							 "naps this long between rounds instead of being woken by every "
							 "commit, and publishes what gathered meanwhile together.  Zero "
							 "wakes it at every commit.",
							 &mqtt_emit_batch_delay,
							 0.5, 0.0, 100.0,
							 PGC_SIGHUP, GUC_UNIT_MS,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("mqtt_emit.outbox_max",
							"Sets the largest number of events the outbox table may hold.",
							"A commit that would exceed it fails; zero means no limit.",
							&mqtt_emit_outbox_max,
							10000000, 0, INT_MAX,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("mqtt_emit.require_signature",
							 "Drops received messages without a valid signature.",
							 "Needs \"mqtt_emit.signing_key\".",
							 &mqtt_emit_require_signature,
							 false,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("mqtt_emit.max_depth",
							"Sets how deeply events caused by listeners may nest.",
							"An event captured while a listener runs for an event of depth d has depth d + 1 "
							"(changes made by sessions have depth 0); deeper events are not captured, with a "
							"warning, and counted in mqtt_emit.stats.depth_exceeded.",
							&mqtt_emit_max_depth,
							8, 0, ME_MAX_DEPTH,
							PGC_SUSET, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("mqtt_emit.max_transaction_events",
							"Sets the largest number of events one transaction may capture.",
							"A change that would capture more fails its transaction; zero means no limit.  "
							"Superusers can set it per role (ALTER ROLE ... SET), which the role cannot raise.",
							&mqtt_emit_max_transaction_events,
							0, 0, INT_MAX,
							PGC_SUSET, 0,
							NULL, NULL, NULL);

	if (process_shared_preload_libraries_in_progress)
	{
		DefineCustomStringVariable("mqtt_emit.database",
								   "Sets the database whose workers use the client id as it is.",
								   "The workers of other databases add \"-\" and the database's name to the client id.",
								   &mqtt_emit_database,
								   "postgres",
								   PGC_POSTMASTER, 0,
								   NULL, NULL, NULL);
		DefineCustomIntVariable("mqtt_emit.max_databases",
								"Sets the maximum number of databases that can have the extension.",
								"Each has its own share of shared memory (one event queue of \"mqtt_emit.queue_size\") and two background workers.",
								&mqtt_emit_max_databases,
								4, 1, 256,
								PGC_POSTMASTER, 0,
								NULL, NULL, NULL);
		DefineCustomStringVariable("mqtt_emit.password",
								   "Sets the password for the MQTT broker.",
								   "Changing it needs a restart: a reloaded value would be written to the server log.",
								   &mqtt_emit_password,
								   "",
								   PGC_POSTMASTER, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
								   NULL, NULL, show_password);
		DefineCustomStringVariable("mqtt_emit.signing_key",
								   "Sets the shared secret for signing published messages with HMAC-SHA256.",
								   "Empty means messages are not signed. Changing it needs a restart: a reloaded value would be written to the server log.",
								   &mqtt_emit_signing_key,
								   "",
								   PGC_POSTMASTER, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
								   NULL, NULL, show_signing_key);
		DefineCustomIntVariable("mqtt_emit.queue_size",
								"Sets the size of the shared-memory event queue.",
								NULL,
								&mqtt_emit_queue_size,
								8192, 64, INT_MAX / 1024,
								PGC_POSTMASTER, GUC_UNIT_KB,
								NULL, NULL, NULL);
	}

	MarkGUCPrefixReserved("mqtt_emit");

	me_capture_init();

	if (!process_shared_preload_libraries_in_progress)
		return;

	mqtt_emit_preloaded = true;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = mqtt_emit_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = mqtt_emit_shmem_startup;

	me_launcher_register();
	me_launcher_init_hooks();
}

static void
mqtt_emit_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	me_shmem_request();
	me_listener_stats_request();
	RequestAddinShmemSpace(me_launcher_shmem_size());
}

static void
mqtt_emit_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	me_shmem_startup();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	me_listener_stats_startup();
	me_launcher_shmem_startup();
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Raise the standard error when the library was not preloaded: without the
 * queue and the worker no event could leave the server.  Then bind to the
 * database's share of shared memory (an error when no slot is free).
 */
void
me_check_preloaded(void)
{
	if (!mqtt_emit_preloaded || !me_shmem_ready())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pg_mqtt_emit must be loaded via \"shared_preload_libraries\""),
				 errhint("Add pg_mqtt_emit to \"shared_preload_libraries\" and restart the server.")));
	(void) me_shmem_bind(true);
	me_database_name_init();
}

/* "" for mqtt_emit.database, else "-" and the encoded name; NULL: not known yet */
static char *client_id_suffix = NULL;

/*
 * Learn this process's database name, for the client id (me_client_id).
 * In a transaction; does nothing outside one or once known.  The name
 * cannot change while a process is connected (ALTER DATABASE RENAME needs
 * the database to have no other sessions).
 */
void
me_database_name_init(void)
{
	char	   *name;
	StringInfoData buf;
	const char *p;

	if (client_id_suffix != NULL || !IsTransactionState() || !OidIsValid(MyDatabaseId))
		return;
	name = get_database_name(MyDatabaseId);
	if (name == NULL)
		return;
	initStringInfo(&buf);
	if (mqtt_emit_database == NULL || strcmp(name, mqtt_emit_database) != 0)
	{
		/*
		 * A client id safe for any broker: other bytes as %XX, "-" too,
		 * after "-db_", so that no database's ids equal another's (with a
		 * plain "-<name>", a database named "subscriber" had the default
		 * database's subscriber id as its publisher id, and "x-subscriber"
		 * had database x's).
		 */
		appendStringInfoString(&buf, "-db_");
		for (p = name; *p; p++)
		{
			unsigned char c = (unsigned char) *p;

			if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
				(c >= '0' && c <= '9') || c == '_' || c == '.')
				appendStringInfoChar(&buf, (char) c);
			else
				appendStringInfo(&buf, "%%%02X", c);
		}
	}
	client_id_suffix = MemoryContextStrdup(TopMemoryContext, buf.data);
	pfree(buf.data);
	pfree(name);
}

/*
 * The directory (relative to the data directory) of this database's files
 * (the subscriber's spool, the queue fill): pg_mqtt_emit for
 * mqtt_emit.database, as before there were several, and
 * pg_mqtt_emit/db<OID> for the others (an OID: it survives a rename).
 * Known once me_database_name_init ran.
 */
const char *
me_files_dir(void)
{
	static char dir[64];

	me_database_name_init();
	if (client_id_suffix == NULL || client_id_suffix[0] == '\0')
		return "pg_mqtt_emit";
	if (dir[0] == '\0')
		snprintf(dir, sizeof(dir), "pg_mqtt_emit/db%u", MyDatabaseId);
	return dir;
}

/*
 * The effective publisher client id: mqtt_emit.client_id, or one derived
 * from the system identifier when that is empty.  In a database other than
 * mqtt_emit.database, "-" and the database's name follow (so that each
 * database has its own stable ids, and its own persistent subscriber
 * session).  The result is valid until the next configuration reload.
 */
const char *
me_client_id(void)
{
	static char derived[64];
	static char *composed = NULL;
	static char *composed_for = NULL;
	const char *base;

	if (mqtt_emit_client_id && mqtt_emit_client_id[0] != '\0')
		base = mqtt_emit_client_id;
	else
	{
		if (derived[0] == '\0')
			snprintf(derived, sizeof(derived), "pg-mqtt-emit-" UINT64_FORMAT,
					 GetSystemIdentifier());
		base = derived;
	}
	me_database_name_init();
	if (client_id_suffix == NULL || client_id_suffix[0] == '\0')
		return base;
	if (composed == NULL || strcmp(composed_for, base) != 0)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		if (composed)
		{
			pfree(composed);
			pfree(composed_for);
		}
		composed_for = pstrdup(base);
		composed = psprintf("%s%s", base, client_id_suffix);
		MemoryContextSwitchTo(old);
	}
	return composed;
}

/*
 * Is url one broker URL that paho can connect to: scheme://host[:port],
 * and a path for WebSocket?  If not, fill detail and hint.  This checks one
 * URL: a list of brokers is split first (me_broker_url_list) and each
 * element checked.
 */
static bool
broker_url_valid(const char *url, char *detail, char *hint, size_t len)
{
	static const char *const schemes[] = {"tcp", "mqtt", "ssl", "mqtts", "ws", "wss"};
	static const char *const scheme_hint =
		"Use tcp:// or mqtt:// (plain MQTT), ssl:// or mqtts:// (TLS), ws:// or wss:// (WebSocket), "
		"for example tcp://broker.example.com:1883.";
	const char *sep = strstr(url, "://");
	const char *p;
	const char *host;
	const char *host_end;
	bool		websocket = false;
	bool		known = false;
	bool		lower = false;
	int			i;

	if (strpbrk(url, " \t\r\n;") != NULL)
	{
		snprintf(detail, len, "A broker URL must not contain spaces or semicolons.");
		snprintf(hint, len, "Separate the brokers of a list with commas, for example tcp://a.example.com:1883, tcp://b.example.com:1883.");
		return false;
	}
	if (sep == NULL)
	{
		snprintf(detail, len, "The broker URL has no scheme.");
		snprintf(hint, len, "%s", scheme_hint);
		return false;
	}
	for (i = 0; i < lengthof(schemes); i++)
	{
		if (strlen(schemes[i]) == (size_t) (sep - url) &&
			pg_strncasecmp(url, schemes[i], sep - url) == 0)
		{
			known = true;
			lower = (strncmp(url, schemes[i], sep - url) == 0);
			websocket = (i >= 4);
		}
	}
	if (!known)
	{
		snprintf(detail, len, "Unknown scheme \"%.*s://\".", (int) Min(sep - url, 32), url);
		snprintf(hint, len, "%s", scheme_hint);
		return false;
	}
	if (!lower)
	{
		/* paho compares schemes case-sensitively */
		snprintf(detail, len, "The scheme must be written in lower case.");
		snprintf(hint, len, "%s", scheme_hint);
		return false;
	}

	host = sep + 3;
	if (strchr(host, '@') != NULL)
	{
		snprintf(detail, len, "The broker URL must not contain a user name or password.");
		snprintf(hint, len, "Set \"mqtt_emit.username\" and \"mqtt_emit.password\" instead.");
		return false;
	}
	if (*host == '[')
	{
		/* an IPv6 address */
		host_end = strchr(host, ']');
		if (host_end == NULL || host_end == host + 1 ||
			strspn(host + 1, "0123456789abcdefABCDEF:.") != (size_t) (host_end - host - 1))
		{
			snprintf(detail, len, "The IPv6 address in the broker URL is malformed.");
			snprintf(hint, len, "Write it in brackets, for example tcp://[::1]:1883.");
			return false;
		}
		p = host_end + 1;
	}
	else
	{
		p = host + strspn(host, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_");
		host_end = p;
		if (host_end == host)
		{
			snprintf(detail, len, "The broker URL has no host name.");
			snprintf(hint, len, "%s", scheme_hint);
			return false;
		}
	}
	if (*p == ':')
	{
		const char *digits = ++p;
		long		port = 0;

		while (*p >= '0' && *p <= '9' && port <= 65535)
			port = port * 10 + (*p++ - '0');
		if (p == digits || port < 1 || port > 65535 || (*p >= '0' && *p <= '9'))
		{
			snprintf(detail, len, "The port in the broker URL must be a number from 1 to 65535.");
			snprintf(hint, len, "For example tcp://broker.example.com:1883.");
			return false;
		}
	}
	if (*p == '/' && websocket)
		p += strlen(p);			/* a WebSocket path */
	if (*p != '\0')
	{
		snprintf(detail, len, "Unexpected \"%.32s\" after the host%s in the broker URL.",
				 p, websocket ? "" : " and port");
		snprintf(hint, len, "Write scheme://host:port%s, for example tcp://broker.example.com:1883.",
				 websocket ? "/path" : "");
		return false;
	}
	return true;
}

/*
 * Split the value of mqtt_emit.broker_url into its URLs: commas separate
 * them, spaces and tabs around each are dropped.  Fills urls (palloc'd in
 * the current memory context) with at most max elements and returns how
 * many the value has, which may be more than max.  An element may be empty
 * (",," or a comma at the end); the caller checks each.
 */
int
me_broker_url_list(const char *value, char **urls, int max)
{
	const char *p = value;
	int			n = 0;

	for (;;)
	{
		const char *end = strchr(p, ',');
		const char *stop = end ? end : p + strlen(p);

		while (p < stop && (*p == ' ' || *p == '\t'))
			p++;
		while (stop > p && (stop[-1] == ' ' || stop[-1] == '\t'))
			stop--;
		if (n < max)
			urls[n] = pnstrdup(p, stop - p);
		n++;
		if (end == NULL)
			break;
		p = end + 1;
	}
	return n;
}

/*
 * mqtt_emit.broker_url: one URL, or a list of at most
 * MQTT_EMIT_MAX_BROKER_URLS, each checked by broker_url_valid.  An error
 * in a list names the element.
 */
static bool
check_broker_url(char **newval, void **extra, GucSource source)
{
	char		detail[256];
	char		hint[256];
	char	   *urls[MQTT_EMIT_MAX_BROKER_URLS];
	int			n;
	int			i;
	bool		ok = true;

	if (*newval == NULL)
		return true;
	n = me_broker_url_list(*newval, urls, MQTT_EMIT_MAX_BROKER_URLS);
	if (n > MQTT_EMIT_MAX_BROKER_URLS)
	{
		GUC_check_errdetail("The list has %d broker URLs; at most %d are allowed.",
							n, MQTT_EMIT_MAX_BROKER_URLS);
		GUC_check_errhint("List the nodes of one broker cluster, or a primary and a standby broker.");
		ok = false;
	}
	for (i = 0; ok && i < n; i++)
	{
		if (n > 1 && urls[i][0] == '\0')
		{
			GUC_check_errdetail("Broker URL %d of the list is empty.", i + 1);
			GUC_check_errhint("Separate the brokers with single commas, with no comma at the start or the end.");
			ok = false;
		}
		else if (!broker_url_valid(urls[i], detail, hint, sizeof(detail)))
		{
			if (n > 1)
				GUC_check_errdetail("Broker URL %d of the list, \"%s\": %s",
									i + 1, urls[i], detail);
			else
				GUC_check_errdetail("%s", detail);
			GUC_check_errhint("%s", hint);
			ok = false;
		}
	}
	/* the postmaster runs this at every reload: leave nothing behind */
	for (i = 0; i < Min(n, MQTT_EMIT_MAX_BROKER_URLS); i++)
		pfree(urls[i]);
	return ok;
}

static bool
check_topic_prefix(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;
	int			pos = 0;
	pg_wchar	cp = 0;

	if (v == NULL)
		return true;
	if (strpbrk(v, "+#") != NULL)
	{
		GUC_check_errdetail("The topic prefix must not contain \"+\" or \"#\".");
		return false;
	}
	if (v[0] == '\0' || v[strlen(v) - 1] == '/')
	{
		GUC_check_errdetail("The topic prefix must not be empty or end with \"/\".");
		return false;
	}
	switch (me_topic_text_check(v, strlen(v), &pos, &cp))
	{
		case ME_TOPIC_TEXT_OK:
			break;
		case ME_TOPIC_TEXT_BAD_UTF8:
			GUC_check_errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE);
			GUC_check_errdetail("The topic prefix is not valid UTF-8 at byte %d.", pos);
			GUC_check_errhint("MQTT topics are UTF-8.");
			return false;
		case ME_TOPIC_TEXT_BAD_CHAR:
			GUC_check_errdetail("The topic prefix contains character U+%04X at position %d, which MQTT does not allow in topics.",
								(unsigned int) cp, pos);
			GUC_check_errhint("MQTT topics must not contain control characters, surrogates or noncharacters such as U+FFFF.");
			return false;
	}
	return true;
}

/*
 * What SHOW, current_setting() and pg_settings show of a secret.
 * GUC_SUPERUSER_ONLY still lets members of pg_read_all_settings (and so
 * pg_monitor) read a setting, so only superusers see the value; others see
 * whether it is set.  Outside a transaction the role cannot be looked up,
 * and the value is masked too.  The worker and the subscriber read the
 * variables themselves, never through this.
 */
static const char *
show_secret(const char *value)
{
	if (value == NULL || value[0] == '\0')
		return "";
	if (IsTransactionState() && superuser())
		return value;
	return "********";
}

static const char *
show_password(void)
{
	return show_secret(mqtt_emit_password);
}

static const char *
show_signing_key(void)
{
	return show_secret(mqtt_emit_signing_key);
}

/*
 * Does the extension's schema have this table?  (An extension of an older
 * version may lack it.)  In a transaction.
 */
bool
me_extension_table_exists(const char *relname)
{
	Oid			nsp = get_namespace_oid(MQTT_EMIT_SCHEMA, true);

	return OidIsValid(nsp) && OidIsValid(get_relname_relid(relname, nsp));
}
