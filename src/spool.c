/*-------------------------------------------------------------------------
 *
 * spool.c
 *		The subscriber's spool: received messages are written to a file
 *		before the worker keeps them in mqtt_emit.outbox, so that a worker
 *		that dies in between (kill -9, an immediate shutdown, a crash of
 *		another backend) loses none of them.
 *
 * paho acknowledges a QoS 1 message to the broker (PUBACK) before it hands
 * it to the application (MQTTProtocol_handlePublishes sends the PUBACK,
 * then Protocol_processPublication calls messageArrived), so once
 * messageArrived runs the broker has forgotten the message.  Our
 * messageArrived (broker_callbacks.c) therefore appends it to the spool
 * file at once, with one writev(), before it returns: from there it
 * survives the death of this process (the kernel keeps what was written;
 * an operating system crash can lose the last writes, which are not
 * fsync'ed).  The worker reads the file (me_spool_read), keeps each batch
 * as outbox rows, and records in the same transaction how far it got
 * (mqtt_emit.spool_position: generation and byte position).  A worker that
 * starts again takes every message after that position from the files,
 * so each message is kept exactly once.  What is lost is only what paho
 * acknowledged and the process did not get to write: the microseconds
 * between the PUBACK and the writev.
 *
 * Files: $PGDATA/pg_mqtt_emit/spool.<generation> (in a database other
 * than mqtt_emit.database: $PGDATA/pg_mqtt_emit/db<OID>/spool.<generation>), each a sequence of
 * records (a SpoolRecord header, the topic, the payload, the MQTT 5
 * properties as broker_callbacks.c copies them).  Each worker start writes
 * a new generation (a file the last one was writing may end in half a
 * record); older generations are read first, from the recorded position
 * in its generation and from the start in later ones, and removed once
 * done.  A generation that was read to its end and grew past SPOOL_ROTATE
 * bytes is replaced by a new one while the worker runs.
 *
 * Threads: me_spool_append runs on paho's threads: write(2), a pthread
 * mutex, no palloc, no elog.  The rest runs in the worker.  spool_mutex
 * protects fd, generation and written.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/spool.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "common/file_perm.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "pg_mqtt_emit.h"
#include "spool.h"

#define SPOOL_DIR		me_files_dir()	/* this database's (pg_mqtt_emit.c) */
#define SPOOL_MAGIC		0x4d455350	/* "MESP" */
#define SPOOL_ROTATE	(64 * 1024 * 1024)	/* a new file past this, when read */
#define SPOOL_MAX		((uint64) 1024 * 1024 * 1024)	/* unread bytes kept at most */
#define SPOOL_READ		(1024 * 1024)	/* bytes read at a time */
#define SPOOL_BATCH_BYTES (64 * 1024 * 1024)	/* bytes read for one batch, at most */

typedef struct SpoolRecord
{
	uint32		magic;
	uint32		topic_len;
	uint32		payload_len;
	uint32		props_len;
} SpoolRecord;

/* the file being written (paho's threads and the worker: spool_mutex) */
static pthread_mutex_t spool_mutex = PTHREAD_MUTEX_INITIALIZER;
static int	spool_fd = -1;
static int64 spool_gen = 0;
static uint64 spool_written = 0;	/* bytes written to it, whole records */
static uint64 spool_unread_base = 0;	/* the reader's position, for SPOOL_MAX */

/* the worker's reading: the generations to read, oldest first */
static int64 *read_gens = NULL;		/* TopMemoryContext */
static int	nread_gens = 0;
static int	maxread_gens = 0;
static int64 *done_gens = NULL;		/* read to their end: removed once the
									 * position after them is committed */
static int	ndone_gens = 0;
static int	read_fd = -1;			/* open on read_gens[0] */
static uint64 read_pos = 0;			/* in read_gens[0] */
static bool read_started = false;	/* the position was loaded */
static bool table_ok = false;		/* mqtt_emit.spool_position exists */
static char *readbuf = NULL;
static Size readbuf_len = 0;		/* bytes in readbuf, from readbuf_pos */
static uint64 readbuf_pos = 0;		/* file position of readbuf[0] */

static void
spool_path(char *buf, size_t len, int64 gen)
{
	snprintf(buf, len, "%s/spool." INT64_FORMAT, SPOOL_DIR, gen);
}

/* one more generation to read (and, done, to remove) */
static void
add_gen(int64 gen)
{
	if (nread_gens + 1 > maxread_gens)
	{
		int			newmax = Max(16, maxread_gens * 2);

		if (read_gens == NULL)
		{
			read_gens = MemoryContextAlloc(TopMemoryContext, sizeof(int64) * newmax);
			done_gens = MemoryContextAlloc(TopMemoryContext, sizeof(int64) * newmax);
		}
		else
		{
			read_gens = repalloc(read_gens, sizeof(int64) * newmax);
			done_gens = repalloc(done_gens, sizeof(int64) * newmax);
		}
		maxread_gens = newmax;
	}
	read_gens[nread_gens++] = gen;
}

/* remove the files of the generations read to their end */
static void
remove_done(void)
{
	int			i;

	for (i = 0; i < ndone_gens; i++)
	{
		char		path[MAXPGPATH];

		spool_path(path, sizeof(path), done_gens[i]);
		if (unlink(path) != 0 && errno != ENOENT)
			ereport(LOG,
					(errcode_for_file_access(),
					 errmsg("pg_mqtt_emit could not remove spool file \"%s\": %m", path)));
	}
	ndone_gens = 0;
}

/*
 * Worker start, before the clients are made: start a new generation, and
 * note the older ones, to be read first once the extension is seen.  A
 * spool that cannot be made is logged; received messages are then kept in
 * memory only (as without a spool).
 */
void
me_spool_open(void)
{
	DIR		   *dir;
	struct dirent *de;
	int64		maxgen = 0;
	char		path[MAXPGPATH];
	int			fd;
	int			i;

	nread_gens = 0;
	ndone_gens = 0;
	(void) MakePGDirectory("pg_mqtt_emit");	/* the parent of a database's */
	if (MakePGDirectory(SPOOL_DIR) < 0 && errno != EEXIST)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("pg_mqtt_emit could not create directory \"%s\": %m", SPOOL_DIR),
				 errdetail("Received messages are kept in memory only until they are stored; a worker that dies can lose some.")));
		return;
	}
	dir = AllocateDir(SPOOL_DIR);
	while ((de = ReadDir(dir, SPOOL_DIR)) != NULL)
	{
		int64		gen;
		char	   *end;

		if (strncmp(de->d_name, "spool.", 6) != 0)
			continue;
		gen = strtoi64(de->d_name + 6, &end, 10);
		if (*end != '\0' || gen <= 0)
			continue;
		maxgen = Max(maxgen, gen);
		add_gen(gen);
	}
	FreeDir(dir);

	/* oldest first */
	for (i = 1; i < nread_gens; i++)
	{
		int64		g = read_gens[i];
		int			j = i - 1;

		while (j >= 0 && read_gens[j] > g)
		{
			read_gens[j + 1] = read_gens[j];
			j--;
		}
		read_gens[j + 1] = g;
	}

	spool_path(path, sizeof(path), maxgen + 1);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, pg_file_create_mode);
	if (fd < 0)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("pg_mqtt_emit could not create spool file \"%s\": %m", path),
				 errdetail("Received messages are kept in memory only until they are stored; a worker that dies can lose some.")));
		nread_gens = 0;
		return;
	}
	pthread_mutex_lock(&spool_mutex);
	spool_fd = fd;
	spool_gen = maxgen + 1;
	spool_written = 0;
	spool_unread_base = 0;
	pthread_mutex_unlock(&spool_mutex);
	add_gen(maxgen + 1);
	read_started = false;
	read_fd = -1;
	readbuf_len = 0;
}

/*
 * paho's thread: append one received message.  Returns false when it was
 * not written (no spool, a write error, or SPOOL_MAX unread bytes): the
 * caller keeps it in memory instead.
 */
bool
me_spool_append(const char *topic, int topic_len, const char *payload, int payload_len,
				const char *props, int props_len)
{
	SpoolRecord rec;
	struct iovec iov[4];
	size_t		total = sizeof(rec) + topic_len + payload_len + props_len;
	ssize_t		n;
	bool		ok = false;

	rec.magic = SPOOL_MAGIC;
	rec.topic_len = (uint32) topic_len;
	rec.payload_len = (uint32) payload_len;
	rec.props_len = (uint32) props_len;
	iov[0].iov_base = &rec;
	iov[0].iov_len = sizeof(rec);
	iov[1].iov_base = (void *) topic;
	iov[1].iov_len = topic_len;
	iov[2].iov_base = (void *) payload;
	iov[2].iov_len = payload_len;
	iov[3].iov_base = (void *) props;
	iov[3].iov_len = props_len;

	pthread_mutex_lock(&spool_mutex);
	if (spool_fd >= 0 && spool_written - spool_unread_base + total <= SPOOL_MAX)
	{
		n = writev(spool_fd, iov, 4);
		if (n == (ssize_t) total)
		{
			spool_written += total;
			ok = true;
		}
		else if (n >= 0)
		{
			/* half a record: nothing more can follow it in this file */
			if (ftruncate(spool_fd, (off_t) spool_written) != 0)
				spool_fd = -1;	/* closed by the worker at exit */
		}
	}
	pthread_mutex_unlock(&spool_mutex);
	return ok;
}

/*
 * Read the recorded position (in the worker's transaction), once the
 * extension is there.  Generations older than the position's are done:
 * removed.
 */
static void
load_position(void)
{
	int64		gen = 0;
	int64		pos = 0;
	int			i,
				keep = 0;

	table_ok = me_extension_table_exists("spool_position");
	SPI_connect();
	if (table_ok &&
		SPI_execute("SELECT generation, position FROM mqtt_emit.spool_position",
					true, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		bool		isnull;

		gen = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		pos = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	}
	SPI_finish();

	/*
	 * Older generations than the recorded one are done.  So are all older
	 * ones when nothing can be recorded (an extension of before 0.2.0, whose
	 * positions were never kept: reading them again would keep their
	 * messages twice).  With nothing recorded yet (the first batch was not
	 * kept) they are all read.  A recorded generation this directory has
	 * not reached yet (a restored or promoted data directory) says nothing
	 * about these files: they are all read.
	 */
	for (i = 0; i < nread_gens; i++)
	{
		bool		done;

		if (i == nread_gens - 1)
			done = false;		/* the current one */
		else if (!table_ok)
			done = true;
		else if (gen == 0)
			done = false;		/* none recorded yet: read them all */
		else if (gen >= spool_gen)
			done = false;
		else
			done = read_gens[i] < gen;
		if (done)
		{
			char		path[MAXPGPATH];

			spool_path(path, sizeof(path), read_gens[i]);
			(void) unlink(path);
		}
		else
			read_gens[keep++] = read_gens[i];
	}
	nread_gens = keep;
	read_pos = (nread_gens > 1 && read_gens[0] == gen && gen < spool_gen) ? (uint64) pos : 0;
	read_started = true;
	if (nread_gens > 1)
		ereport(LOG,
				(errmsg("pg_mqtt_emit reads the received messages of %d earlier spool file(s) first",
						nread_gens - 1),
				 errdetail("Generation " INT64_FORMAT " from byte " UINT64_FORMAT ".",
						   read_gens[0], read_pos)));
}

/* bytes of read_gens[0] that can be read: to its end, or what was written */
static uint64
readable_end(bool *is_current)
{
	uint64		end;

	*is_current = (nread_gens == 1);
	if (*is_current)
	{
		pthread_mutex_lock(&spool_mutex);
		end = spool_written;
		pthread_mutex_unlock(&spool_mutex);
	}
	else
	{
		struct stat st;
		char		path[MAXPGPATH];

		spool_path(path, sizeof(path), read_gens[0]);
		end = stat(path, &st) == 0 ? (uint64) st.st_size : 0;
	}
	return end;
}

/* done with read_gens[0], an older generation: on to the next */
static void
next_generation(void)
{
	if (read_fd >= 0)
		close(read_fd);
	read_fd = -1;
	done_gens[ndone_gens++] = read_gens[0];
	memmove(read_gens, read_gens + 1, sizeof(int64) * (nread_gens - 1));
	nread_gens--;
	read_pos = 0;
	readbuf_len = 0;
}

/* copy one record's topic, payload (both with a terminator) and properties */
static void
take_record(MeIncoming *m, const SpoolRecord *rec, const char *p)
{
	m->topic = palloc(rec->topic_len + 1);
	memcpy(m->topic, p, rec->topic_len);
	m->topic[rec->topic_len] = '\0';
	m->payload = palloc(rec->payload_len + 1);
	memcpy(m->payload, p + rec->topic_len, rec->payload_len);
	m->payload[rec->payload_len] = '\0';
	m->props = NULL;
	if (rec->props_len)
	{
		m->props = palloc(rec->props_len);
		memcpy(m->props, p + rec->topic_len + rec->payload_len, rec->props_len);
	}
}

/*
 * Up to max messages from the spool, oldest first, as MeIncoming structs
 * in the current memory context, in out[]; *gen and *pos is the position
 * after the last one.  Returns how many.  In a transaction (the first call
 * reads the recorded position).  Returns -1 when there is no spool: then
 * received messages take the memory path.
 */
int
me_spool_read(MeIncoming *out, int max, int64 *gen, uint64 *pos)
{
	int			n = 0;
	Size		bytes = 0;

	if (nread_gens == 0)
		return -1;
	if (!read_started)
		load_position();

	while (n < max && nread_gens > 0 && bytes < SPOOL_BATCH_BYTES)
	{
		bool		is_current;
		uint64		end = readable_end(&is_current);
		SpoolRecord rec;
		Size		off;
		Size		total;

		if (read_pos >= end)
		{
			if (is_current)
				break;
			next_generation();
			continue;
		}
		if (read_fd < 0)
		{
			char		path[MAXPGPATH];

			spool_path(path, sizeof(path), read_gens[0]);
			read_fd = open(path, O_RDONLY | O_CLOEXEC);
			if (read_fd < 0)
			{
				ereport(LOG,
						(errcode_for_file_access(),
						 errmsg("pg_mqtt_emit could not open spool file \"%s\": %m", path)));
				if (is_current)
					break;
				next_generation();
				continue;
			}
			readbuf_len = 0;
		}

		/* the record at read_pos, in readbuf */
		if (read_pos < readbuf_pos || read_pos + sizeof(rec) > readbuf_pos + readbuf_len)
		{
			ssize_t		got;

			if (readbuf == NULL)
				readbuf = MemoryContextAlloc(TopMemoryContext, SPOOL_READ);
			got = pg_pread(read_fd, readbuf, SPOOL_READ, (off_t) read_pos);
			readbuf_pos = read_pos;
			readbuf_len = got > 0 ? (Size) Min((uint64) got, end - read_pos) : 0;
		}
		off = (Size) (read_pos - readbuf_pos);
		if (readbuf_len - off >= sizeof(rec))
			memcpy(&rec, readbuf + off, sizeof(rec));
		else
			rec.magic = 0;
		total = sizeof(rec) + (Size) rec.topic_len + rec.payload_len + rec.props_len;
		if (rec.magic != SPOOL_MAGIC || rec.topic_len > 65535 ||
			rec.payload_len > 268435455 || rec.props_len > 268435455 ||
			read_pos + total > end)
		{
			/* half a record at the end of an older file: the rest is lost */
			if (is_current)
				break;
			ereport(LOG,
					(errmsg("pg_mqtt_emit spool file of generation " INT64_FORMAT " ends in an incomplete record at byte " UINT64_FORMAT,
							read_gens[0], read_pos)));
			next_generation();
			continue;
		}
		if ((int64) rec.payload_len > mqtt_emit_max_payload)
		{
			/*
			 * Too large to be kept: its size is all the caller needs to say
			 * so, and the bytes are not read.
			 */
			SpoolRecord hdr = rec;
			char	   *topic = palloc(rec.topic_len + 1);

			if (pg_pread(read_fd, topic, rec.topic_len, (off_t) (read_pos + sizeof(rec))) != (ssize_t) rec.topic_len)
				memset(topic, '?', rec.topic_len);
			hdr.payload_len = 0;
			hdr.props_len = 0;
			take_record(&out[n], &hdr, topic);
			readbuf_len = 0;
		}
		else if (off + total > readbuf_len)
		{
			char	   *rec_buf = palloc(total);

			if (pg_pread(read_fd, rec_buf, total, (off_t) read_pos) != (ssize_t) total)
			{
				pfree(rec_buf);
				if (is_current)
					break;
				next_generation();
				continue;
			}
			readbuf_len = 0;
			take_record(&out[n], &rec, rec_buf + sizeof(rec));
		}
		else
			take_record(&out[n], &rec, readbuf + off + sizeof(rec));
		out[n].topic_len = (int) rec.topic_len;
		out[n].payload_len = (int) rec.payload_len;
		out[n].props_len = (int) rec.props_len;
		bytes += total;
		out[n].next = NULL;
		if (n > 0)
			out[n - 1].next = &out[n];
		n++;
		read_pos += total;
	}
	*gen = nread_gens > 0 ? read_gens[0] : spool_gen;
	*pos = read_pos;
	return n;
}

/* is there anything to read (or the position still to load)? */
bool
me_spool_has_unread(void)
{
	bool		unread;

	if (nread_gens == 0)
		return false;
	if (!read_started || nread_gens > 1)
		return true;
	pthread_mutex_lock(&spool_mutex);
	unread = read_pos < spool_written;
	pthread_mutex_unlock(&spool_mutex);
	return unread;
}

/*
 * Record the position after the messages just kept, in the transaction
 * that keeps them.
 */
void
me_spool_save_position(int64 gen, uint64 pos)
{
	Datum		args[2];
	Oid			types[2] = {INT8OID, INT8OID};

	/* an extension of before 0.2.0 has no table for it */
	if (!table_ok)
		return;
	args[0] = Int64GetDatum(gen);
	args[1] = Int64GetDatum((int64) pos);
	SPI_connect();
	if (SPI_execute_with_args("UPDATE mqtt_emit.spool_position SET generation = $1, position = $2",
							  2, types, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not record the spool position");
	/* its one row was deleted: make it again */
	if (SPI_processed == 0 &&
		SPI_execute_with_args("INSERT INTO mqtt_emit.spool_position VALUES ($1, $2)",
							  2, types, args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not record the spool position");
	SPI_finish();
}

/*
 * The transaction that recorded a position committed.  When everything of
 * the current file is kept and it is large, start a new one; messages that
 * arrive meanwhile go to the new one, which is read next.
 */
void
me_spool_committed(void)
{
	bool		rotate = false;
	char		path[MAXPGPATH];
	int			fd;

	/* the position after them is committed (and flushed): they can go */
	remove_done();
	if (nread_gens != 1 || !table_ok)
		return;
	pthread_mutex_lock(&spool_mutex);
	spool_unread_base = read_pos;
	if (spool_fd >= 0 && read_pos == spool_written && spool_written >= SPOOL_ROTATE)
		rotate = true;
	pthread_mutex_unlock(&spool_mutex);
	if (!rotate)
		return;

	spool_path(path, sizeof(path), spool_gen + 1);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, pg_file_create_mode);
	if (fd < 0)
		return;
	add_gen(spool_gen + 1);
	pthread_mutex_lock(&spool_mutex);
	/* the old file is read to its end: whatever came since is in it too */
	spool_gen++;
	close(spool_fd);
	spool_fd = fd;
	spool_written = 0;
	spool_unread_base = 0;
	/* what was written to the old file after the check above is read first */
	pthread_mutex_unlock(&spool_mutex);
}
