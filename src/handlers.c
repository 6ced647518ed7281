/*-------------------------------------------------------------------------
 *
 * handlers.c
 *		Subscriptions to any topic: mqtt_emit.subscribe(filter, handler).
 *
 * A handler is a function f(topic text, payload bytea [, props jsonb]),
 * registered with a topic filter in mqtt_emit.handlers.  Both workers keep
 * a copy of that registry, reloaded when it changes (its statement trigger
 * bumps the same counter as the listener registry's):
 *
 *	- the worker subscribes to each distinct filter (inbound.c), with the
 *	  highest QoS asked for it, and keeps a received message whose topic is
 *	  not one of the extension's own (<prefix>/...) and matches some
 *	  filter as an outbox row of kind ME_KIND_MESSAGE: the payload's bytes
 *	  as "\x" and hex digits (bytea's text form), then, when the message
 *	  had MQTT 5 properties, a newline and the properties as JSON
 *	  (me_handlers_encode).  Any bytes are a valid payload here.
 *	- the listener worker runs, for each such row, every matching handler
 *	  in a subtransaction of its own, as its owner, with the owner's
 *	  search_path of subscribe() time, as a security-restricted operation,
 *	  under mqtt_emit.listener_timeout (me_handlers_run).  When a handler
 *	  raises, the row's work is rolled back and tried again (the listener
 *	  worker's attempts); on the last attempt the failing handlers' errors
 *	  become dead letters and the others' work commits.
 *
 * Filters that could match the extension's own topics are refused at
 * subscribe(), and skipped at load if the prefix changed since: those
 * messages are events, for listeners.
 *
 * A handler with a share_group is fed by the shared subscription
 * $share/<group>/<filter> (MQTT 5): the broker gives each message on its
 * topics to one of the nodes subscribed to that shared subscription.  A
 * message that came that way runs the handlers of that group and exactly
 * that filter (on another node, the same group with another filter is
 * another shared subscription, with members of its own), never the
 * handlers without a group, which get their own copy through the plain
 * subscription; so grouped filters are not folded into filters that cover
 * them.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/handlers.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "utils/timeout.h"

#include "pg_mqtt_emit.h"
#include "broker.h"
#include "compat.h"
#include "handlers.h"
#include "outbox.h"
#include "topic.h"

PG_FUNCTION_INFO_V1(mqtt_emit_check_topic_filter);

typedef struct Handler
{
	int64		id;
	char	   *filter;
	Oid			fn;
	char	   *fn_name;		/* for log lines */
	int			nargs;			/* 2 or 3 */
	char	   *share_group;	/* or NULL */
	Oid			owner;
	char	   *search_path;
	bool		skip_logged;	/* said once why a call was skipped */
} Handler;

/* a filter to subscribe to: a plain one, or a group's shared one */
typedef struct HandlerFilter
{
	char	   *filter;
	char	   *group;			/* share group, or NULL */
	int			qos;			/* the highest of its handlers' (and of the
								 * filters it covers) */
	bool		covered;		/* another plain filter matches all its topics */
} HandlerFilter;

/* %s: the share_group column, or NULL where the table has none */
#define HANDLERS_QUERY \
	"SELECT h.id, h.topic_filter, h.handler::pg_catalog.oid, h.handler::pg_catalog.text," \
	" h.qos, h.owner::pg_catalog.oid, h.search_path, %s" \
	" FROM mqtt_emit.handlers h ORDER BY h.id LIMIT 5000"

static MemoryContext reg_cxt = NULL;
static Handler *handlers = NULL;
static int	nhandlers = 0;
static HandlerFilter *filters = NULL;
static int	nfilters = 0;
static Oid	right_fn = InvalidOid;	/* mqtt_emit.may_listen_remote() */
static uint64 calls_made = 0;
static int	hard_timeout = -1;
static TimestampTz last_failure_log = 0;

/*
 * Why len bytes at filter are not a topic filter a handler may have, or
 * NULL: "+" and "#" only as whole levels, "#" only last, at most
 * ME_HANDLER_MAX_FILTER bytes, no shared subscription.
 */
const char *
me_filter_problem(const char *filter, int len)
{
	int			i;

	if (len == 0)
		return "A topic filter must not be empty";
	if (len > ME_HANDLER_MAX_FILTER)
		return "A handler's topic filter has at most 1024 bytes";
	if ((int) strnlen(filter, len) != len)
		return "A topic filter must not contain NUL";
	for (i = 0; i < len; i++)
	{
		char		c = filter[i];

		if (c == '+' &&
			((i > 0 && filter[i - 1] != '/') || (i + 1 < len && filter[i + 1] != '/')))
			return "The wildcard \"+\" must stand for a whole level, as in \"a/+/b\"";
		if (c == '#' && ((i > 0 && filter[i - 1] != '/') || i + 1 != len))
			return "The wildcard \"#\" must be the last level, on its own, as in \"a/#\"";
	}
	if (len >= 7 && strncmp(filter, "$share/", 7) == 0)
		return "Shared subscriptions ($share/...) cannot be handler filters";
	return NULL;
}

/*
 * Does the NUL-terminated filter match the topic (MQTT's rules: "+" is
 * one level, "#" the rest including the parent level; a topic starting
 * with "$" is not matched by a leading wildcard)?
 */
bool
me_filter_matches(const char *f, const char *t, int tlen)
{
	const char *tend = t + tlen;

	if (tlen > 0 && t[0] == '$' && (f[0] == '+' || f[0] == '#'))
		return false;
	for (;;)
	{
		const char *fe = strchr(f, '/');
		const char *te;

		if (fe == NULL)
			fe = f + strlen(f);
		if (fe - f == 1 && *f == '#')
			return true;
		if (t > tend)
			return false;		/* the topic has no more levels */
		te = memchr(t, '/', tend - t);
		if (te == NULL)
			te = tend;
		if (!((fe - f == 1 && *f == '+') ||
			  (fe - f == te - t && memcmp(f, t, te - t) == 0)))
			return false;
		t = te + 1;				/* past tend when that was the last level */
		if (*fe == '\0')
			return t > tend;
		f = fe + 1;
	}
}

/*
 * Does filter a match every topic that filter b matches?  Level by level:
 * "#" covers the rest, "+" any one level but "#", a name only itself; "a/#"
 * also covers "a".
 */
static bool
filter_covers(const char *a, const char *b)
{
	if (b[0] == '$' && (a[0] == '+' || a[0] == '#'))
		return false;
	for (;;)
	{
		const char *ae = strchr(a, '/');
		const char *be = strchr(b, '/');

		if (ae == NULL)
			ae = a + strlen(a);
		if (be == NULL)
			be = b + strlen(b);
		if (ae - a == 1 && *a == '#')
			return true;
		if (be - b == 1 && *b == '#')
			return false;
		if (!((ae - a == 1 && *a == '+') ||
			  (ae - a == be - b && memcmp(a, b, ae - a) == 0)))
			return false;
		if (*ae == '\0' || *be == '\0')
			return *ae == '\0' ? *be == '\0' : strcmp(ae + 1, "#") == 0;
		a = ae + 1;
		b = be + 1;
	}
}

/*
 * Could the filter match a topic under <prefix>/ (compared ignoring ASCII
 * case, as the Node library lower-cases its topics)?
 */
static bool
filter_overlaps_prefix(const char *f, int len)
{
	const char *p = mqtt_emit_topic_prefix ? mqtt_emit_topic_prefix : "";
	const char *q = f;
	const char *fend = f + len;

	for (;;)
	{
		const char *pe = strchr(p, '/');
		const char *qe;

		if (pe == NULL)
			pe = p + strlen(p);
		if (q > fend)
			return false;		/* the filter has fewer levels */
		qe = memchr(q, '/', fend - q);
		if (qe == NULL)
			qe = fend;
		if (qe - q == 1 && *q == '#')
			return true;
		if (!((qe - q == 1 && *q == '+') ||
			  (qe - q == pe - p && pg_strncasecmp(q, p, pe - p) == 0)))
			return false;
		q = qe + 1;
		if (*pe == '\0')
			break;
		p = pe + 1;
	}
	/* every level of the prefix matched: more levels match events */
	return q <= fend;
}

/* Is this topic one of the extension's own, <prefix>/... (any ASCII case)? */
bool
me_topic_is_event(const char *topic, int len)
{
	int			plen = strlen(mqtt_emit_topic_prefix);

	return len > plen && topic[plen] == '/' &&
		pg_strncasecmp(topic, mqtt_emit_topic_prefix, plen) == 0;
}

/*
 * mqtt_emit._check_topic_filter(filter): raise an error unless a handler
 * may subscribe to filter.
 */
Datum
mqtt_emit_check_topic_filter(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *f = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);
	char	   *shown = pnstrdup(f, Min(len, 200));
	const char *problem = me_filter_problem(f, len);

	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid MQTT topic filter \"%s\"", shown),
				 errdetail("%s.", problem),
				 errhint("A topic filter is a topic whose levels may be \"+\" (any one level) or, last, \"#\" (any number of levels).")));
	me_check_topic_text(f, len, "topic filter",
						"Choose a topic filter without this character.");
	if (filter_overlaps_prefix(f, len))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("topic filter \"%s\" overlaps the topics of pg_mqtt_emit events", shown),
				 errdetail("Topics under \"%s/\" (\"mqtt_emit.topic_prefix\") carry the events of pg_mqtt_emit nodes; they go to listeners, not to handlers.",
						   mqtt_emit_topic_prefix),
				 errhint("Choose a filter that matches no topic under \"%s/\", or receive those events with mqtt_emit.listen(model, listener, allow_remote => true).",
						 mqtt_emit_topic_prefix)));
	PG_RETURN_VOID();
}

/*
 * Read the registry into a new context.  Rows that the checks of
 * _validate_handler() would refuse now (the function's signature changed,
 * the prefix changed) are skipped with a LOG line.
 */
static bool
load_handlers(void)
{
	Oid			nsp;
	Oid			relid;
	int			ret;
	uint64		i;
	MemoryContext old;

	if (!OidIsValid(get_extension_oid(MQTT_EMIT_EXTENSION, true)))
		return false;
	nsp = get_namespace_oid(MQTT_EMIT_SCHEMA, true);
	if (!OidIsValid(nsp))
		return false;
	relid = get_relname_relid("handlers", nsp);
	if (!OidIsValid(relid))
		return true;			/* a schema before subscribe(): none */

	old = MemoryContextSwitchTo(reg_cxt);
	right_fn = LookupFuncName(list_make2(makeString(MQTT_EMIT_SCHEMA),
										 makeString("may_listen_remote")),
							  0, NULL, true);
	MemoryContextSwitchTo(old);

	/* the lock first, as in listeners.c: the query depends on the columns */
	LockRelationOid(relid, AccessShareLock);
	SPI_connect();
	ret = SPI_execute(psprintf(HANDLERS_QUERY,
							   get_attnum(relid, "share_group") != InvalidAttrNumber ?
							   "h.share_group" : "NULL::pg_catalog.text"),
					  true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "cannot read mqtt_emit.handlers: %s", SPI_result_code_string(ret));

	old = MemoryContextSwitchTo(reg_cxt);
	handlers = palloc0(sizeof(Handler) * Max(SPI_processed, 1));
	filters = palloc0(sizeof(HandlerFilter) * Max(SPI_processed, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		Handler    *h = &handlers[nhandlers];
		bool		isnull;
		HeapTuple	proctup;
		bool		sig_ok = false;
		int			qos;
		int			j;

		h->id = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
		h->filter = SPI_getvalue(tup, td, 2);
		h->fn = DatumGetObjectId(SPI_getbinval(tup, td, 3, &isnull));
		h->fn_name = SPI_getvalue(tup, td, 4);
		qos = DatumGetInt16(SPI_getbinval(tup, td, 5, &isnull));
		h->owner = DatumGetObjectId(SPI_getbinval(tup, td, 6, &isnull));
		h->search_path = SPI_getvalue(tup, td, 7);
		if (h->search_path == NULL)
			h->search_path = pstrdup("pg_catalog");
		h->share_group = SPI_getvalue(tup, td, 8);

		proctup = SearchSysCache1(PROCOID, ObjectIdGetDatum(h->fn));
		if (HeapTupleIsValid(proctup))
		{
			Form_pg_proc p = (Form_pg_proc) GETSTRUCT(proctup);

			h->nargs = p->pronargs;
			sig_ok = (p->pronargs == 2 || p->pronargs == 3) &&
				p->proargtypes.values[0] == TEXTOID &&
				p->proargtypes.values[1] == BYTEAOID &&
				(p->pronargs == 2 || p->proargtypes.values[2] == JSONBOID);
			ReleaseSysCache(proctup);
		}
		/* a handler of a role that is gone or cannot log in never runs */
		{
			HeapTuple	roletup = SearchSysCache1(AUTHOID, ObjectIdGetDatum(h->owner));
			bool		canlogin = false;

			if (HeapTupleIsValid(roletup))
			{
				canlogin = ((Form_pg_authid) GETSTRUCT(roletup))->rolcanlogin;
				ReleaseSysCache(roletup);
			}
			if (!canlogin)
			{
				ereport(LOG,
						(errmsg("pg_mqtt_emit skips handler " INT64_FORMAT " (%s on \"%s\"): its role %u no longer exists or cannot log in",
								h->id, h->fn_name, h->filter, h->owner),
						 errhint("Remove it with mqtt_emit.unsubscribe(" INT64_FORMAT ") as its role, or DELETE it as a superuser.", h->id)));
				continue;
			}
		}
		if (!sig_ok || me_filter_problem(h->filter, strlen(h->filter)) != NULL ||
			filter_overlaps_prefix(h->filter, strlen(h->filter)) ||
			(h->share_group &&
			 me_share_group_problem(h->share_group, strlen(h->share_group)) != NULL))
		{
			ereport(LOG,
					(errmsg("pg_mqtt_emit skips handler " INT64_FORMAT " (%s on \"%s\"): %s",
							h->id, h->fn_name, h->filter,
							!sig_ok ? "it is not a function f(text, bytea [, jsonb])" :
							h->share_group &&
							me_share_group_problem(h->share_group, strlen(h->share_group)) ?
							"its share group name is not valid" :
							"its topic filter is not valid, or overlaps \"mqtt_emit.topic_prefix\"")));
			continue;
		}
		nhandlers++;

		for (j = 0; j < nfilters; j++)
			if (strcmp(filters[j].filter, h->filter) == 0 &&
				(filters[j].group == NULL ? h->share_group == NULL :
				 h->share_group != NULL && strcmp(filters[j].group, h->share_group) == 0))
				break;
		if (j == nfilters)
		{
			filters[nfilters].filter = h->filter;
			filters[nfilters].group = h->share_group;
			filters[nfilters].qos = qos;
			nfilters++;
		}
		else
			filters[j].qos = Max(filters[j].qos, qos);
	}

	/*
	 * Subscribe only to plain filters no other plain filter covers: mosquitto
	 * sends a message once for each subscription it matches, and a message is
	 * to run each of its handlers once.  (Filters that overlap without one
	 * covering the other, like a/+/c and a/b/+, still get such a message
	 * twice; see README.)  A group's filters are each a shared subscription
	 * of its own: folding one into another would make this node a member of
	 * one subscription for the other's handlers.
	 */
	{
		int			a,
					b;

		for (b = 0; b < nfilters; b++)
			for (a = 0; a < nfilters; a++)
				if (a != b && !filters[a].covered &&
					filters[a].group == NULL && filters[b].group == NULL &&
					filter_covers(filters[a].filter, filters[b].filter))
				{
					filters[b].covered = true;
					filters[a].qos = Max(filters[a].qos, filters[b].qos);
					break;
				}
	}
	MemoryContextSwitchTo(old);
	SPI_finish();
	return true;
}

/*
 * Reload the handler registry; inside a transaction, which it leaves
 * usable.  It reads under a lock_timeout of 100 ms in a subtransaction;
 * when it cannot, the handlers loaded before stay and ME_REGISTRY_KEPT
 * says to try again.
 */
MeRegistryLoad
me_handlers_refresh(void)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	MemoryContext keep_cxt = reg_cxt;
	Handler    *keep_h = handlers;
	int			keep_nh = nhandlers;
	HandlerFilter *keep_f = filters;
	int			keep_nf = nfilters;
	Oid			keep_right = right_fn;
	volatile MeRegistryLoad result = ME_REGISTRY_KEPT;

	reg_cxt = AllocSetContextCreate(TopMemoryContext, "pg_mqtt_emit handlers",
									ALLOCSET_SMALL_SIZES);
	handlers = NULL;
	filters = NULL;
	nhandlers = nfilters = 0;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		int			nestlevel = NewGUCNestLevel();

		(void) set_config_option("lock_timeout", "100",
								 PGC_SUSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		result = load_handlers() ? ME_REGISTRY_LOADED : ME_REGISTRY_ABSENT;
		AtEOXact_GUC(true, nestlevel);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		TimestampTz now = GetCurrentTimestamp();

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (now - last_failure_log >= 60 * USECS_PER_SEC)
		{
			ereport(LOG,
					(errmsg("pg_mqtt_emit could not read the handler registry: %s",
							edata->message),
					 errdetail("The handlers loaded before stay in effect; reading is tried again.")));
			last_failure_log = now;
		}
		FreeErrorData(edata);
		result = ME_REGISTRY_KEPT;
	}
	PG_END_TRY();

	if (result == ME_REGISTRY_KEPT)
	{
		MemoryContextDelete(reg_cxt);
		reg_cxt = keep_cxt;
		handlers = keep_h;
		nhandlers = keep_nh;
		filters = keep_f;
		nfilters = keep_nf;
		right_fn = keep_right;
		return result;
	}
	if (keep_cxt != NULL)
		MemoryContextDelete(keep_cxt);
	return result;
}

/*
 * The topic filters to subscribe to, each with its QoS and share group
 * (NULL: a plain subscription): the distinct plain filters of the
 * handlers that no other one covers, and every group's filters.
 */
int
me_handlers_nfilters(void)
{
	int			i;
	int			n = 0;

	for (i = 0; i < nfilters; i++)
		if (!filters[i].covered)
			n++;
	return n;
}

const char *
me_handlers_filter(int i, int *qos, const char **group)
{
	int			j;

	for (j = 0; j < nfilters; j++)
	{
		if (filters[j].covered)
			continue;
		if (i-- == 0)
		{
			if (qos)
				*qos = filters[j].qos;
			if (group)
				*group = filters[j].group;
			return filters[j].filter;
		}
	}
	elog(ERROR, "no handler filter %d", i);
	return NULL;				/* keep compiler quiet */
}

/* Does the filter of some handler without a share group match this topic? */
bool
me_handlers_match(const char *topic, int topic_len)
{
	int			i;

	for (i = 0; i < nfilters; i++)
		if (filters[i].group == NULL &&
			me_filter_matches(filters[i].filter, topic, topic_len))
			return true;
	return false;
}

static void
append_json_bytes(StringInfo buf, const char *key, const char *data, int len, bool *first)
{
	char	   *s;

	/* what is not text here is left out (MQTT requires UTF-8 anyway) */
	if ((int) strnlen(data, len) != len || !pg_verifymbstr(data, len, true))
		return;
	s = pnstrdup(data, len);
	if (key)
	{
		if (!*first)
			appendStringInfoChar(buf, ',');
		*first = false;
		escape_json(buf, key);
		appendStringInfoChar(buf, ':');
	}
	escape_json(buf, s);
	pfree(s);
}

/*
 * The text of an ME_KIND_MESSAGE outbox row: "\x" and the payload in hex,
 * then, when there are properties (ME_INPROP_* records from broker.c), a
 * newline and a JSON object of them: content_type, response_topic,
 * correlation_data (hex), payload_format (0 or 1), user_properties (an
 * array of [name, value] pairs, in the order received).
 */
void
me_handlers_encode(StringInfo buf, const char *payload, int payload_len,
				   const char *props, int props_len)
{
	const char *p = props;
	const char *end = props + props_len;
	bool		first = true;
	bool		any_user = false;
	StringInfoData users;

	resetStringInfo(buf);
	appendStringInfoString(buf, "\\x");
	enlargeStringInfo(buf, payload_len * 2 + 1);
	buf->len += hex_encode(payload, payload_len, buf->data + buf->len);
	buf->data[buf->len] = '\0';
	if (props_len <= 0)
		return;

	initStringInfo(&users);
	appendStringInfoString(buf, "\n{");
	while (p + 1 + 2 * sizeof(int32) <= end)
	{
		int			code = (unsigned char) *p++;
		int32		len1,
					len2;
		const char *d1,
				   *d2;

		memcpy(&len1, p, sizeof(int32));
		p += sizeof(int32);
		d1 = p;
		p += len1;
		memcpy(&len2, p, sizeof(int32));
		p += sizeof(int32);
		d2 = p;
		p += len2;
		if (p > end)
			break;
		switch (code)
		{
			case ME_INPROP_PAYLOAD_FORMAT:
				if (!first)
					appendStringInfoChar(buf, ',');
				first = false;
				appendStringInfo(buf, "\"payload_format\":%d", len1 > 0 ? (unsigned char) d1[0] : 0);
				break;
			case ME_INPROP_CONTENT_TYPE:
				append_json_bytes(buf, "content_type", d1, len1, &first);
				break;
			case ME_INPROP_RESPONSE_TOPIC:
				append_json_bytes(buf, "response_topic", d1, len1, &first);
				break;
			case ME_INPROP_CORRELATION:
				{
					char	   *hex = palloc(len1 * 2 + 1);

					hex[hex_encode(d1, len1, hex)] = '\0';
					append_json_bytes(buf, "correlation_data", hex, strlen(hex), &first);
					pfree(hex);
				}
				break;
			case ME_INPROP_USER:
				if ((int) strnlen(d1, len1) == len1 && pg_verifymbstr(d1, len1, true) &&
					(int) strnlen(d2, len2) == len2 && pg_verifymbstr(d2, len2, true))
				{
					bool		f2 = true;

					appendStringInfoString(&users, any_user ? ",[" : "[");
					append_json_bytes(&users, NULL, d1, len1, &f2);
					appendStringInfoChar(&users, ',');
					append_json_bytes(&users, NULL, d2, len2, &f2);
					appendStringInfoChar(&users, ']');
					any_user = true;
				}
				break;
			default:
				break;
		}
	}
	if (any_user)
	{
		if (!first)
			appendStringInfoChar(buf, ',');
		appendStringInfo(buf, "\"user_properties\":[%s]", users.data);
	}
	appendStringInfoChar(buf, '}');
	pfree(users.data);
}

/* Where the payload's hex ends in an ME_KIND_MESSAGE row's text. */
int
me_handlers_payload_end(const char *stored, int stored_len)
{
	const char *nl = memchr(stored, '\n', stored_len);

	return nl ? (int) (nl - stored) : stored_len;
}

/*
 * What subscribe() checked, checked again before a call: the function,
 * the role and its LOGIN, and the right to receive from the bus may have
 * gone since.  The first skip of each handler is logged.
 */
static bool
handler_may_run(Handler *h)
{
	HeapTuple	tup;
	const char *why = NULL;

	if (!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(h->fn)))
		why = "its function no longer exists";
	else if (!HeapTupleIsValid(tup = SearchSysCache1(AUTHOID, ObjectIdGetDatum(h->owner))))
		why = "its role no longer exists";
	else
	{
		bool		canlogin = ((Form_pg_authid) GETSTRUCT(tup))->rolcanlogin;

		ReleaseSysCache(tup);
		if (!canlogin)
			why = "its role cannot log in";
		else if (!(OidIsValid(right_fn) &&
				   SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(right_fn)) ?
				   me_proc_aclcheck(right_fn, h->owner, ACL_EXECUTE) == ACLCHECK_OK :
				   superuser_arg(h->owner)))
			why = "its role may no longer subscribe (EXECUTE on mqtt_emit.may_listen_remote())";
	}
	if (why == NULL)
		return true;
	if (!h->skip_logged)
	{
		ereport(LOG,
				(errmsg("pg_mqtt_emit skips handler " INT64_FORMAT " (%s of role %u): %s",
						h->id, h->fn_name, h->owner, why)));
		h->skip_logged = true;
	}
	return false;
}

/*
 * Call one handler in a subtransaction of its own, as its owner.  Returns
 * NULL, or the error it raised (in the caller's memory context).
 */
/* call_handler's last call was cancelled by mqtt_emit.listener_timeout */
static bool last_call_timed_out = false;

static ErrorData *
call_handler(Handler *h, Datum topic, Datum payload, Datum props)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	Oid			save_userid;
	int			save_sec;
	ErrorData  *volatile result = NULL;
	TimestampTz start = GetCurrentTimestamp();

	last_call_timed_out = false;

	me_count(ME_STAT_LISTENER_CALLS, 1);
	calls_made++;
	GetUserIdAndSecContext(&save_userid, &save_sec);

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		int			nestlevel;
		FmgrInfo	flinfo;
		LOCAL_FCINFO(fcinfo, 3);

		SetUserIdAndSecContext(h->owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
							   SECURITY_RESTRICTED_OPERATION);
		nestlevel = NewGUCNestLevel();
		(void) set_config_option("search_path", h->search_path,
								 PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		if (me_proc_aclcheck(h->fn, h->owner, ACL_EXECUTE) != ACLCHECK_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied for function %s", h->fn_name),
					 errdetail("The handler runs as the role that subscribed, which may no longer execute it.")));
		if (mqtt_emit_listener_timeout > 0)
		{
			enable_timeout_after(STATEMENT_TIMEOUT, mqtt_emit_listener_timeout);
			if (hard_timeout >= 0)
				enable_timeout_after((TimeoutId) hard_timeout,
									 mqtt_emit_listener_timeout + 1000);
		}

		/* the result (void, NULL or anything) is ignored */
		fmgr_info(h->fn, &flinfo);
		InitFunctionCallInfoData(*fcinfo, &flinfo, h->nargs, InvalidOid, NULL, NULL);
		fcinfo->args[0].value = topic;
		fcinfo->args[0].isnull = false;
		fcinfo->args[1].value = payload;
		fcinfo->args[1].isnull = false;
		fcinfo->args[2].value = props;
		fcinfo->args[2].isnull = false;
		(void) FunctionCallInvoke(fcinfo);

		if (mqtt_emit_listener_timeout > 0)
		{
			disable_timeout(STATEMENT_TIMEOUT, false);
			if (hard_timeout >= 0)
				disable_timeout((TimeoutId) hard_timeout, false);
		}
		AtEOXact_GUC(false, nestlevel);
		SetUserIdAndSecContext(save_userid, save_sec);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		if (mqtt_emit_listener_timeout > 0)
		{
			disable_timeout(STATEMENT_TIMEOUT, false);
			if (hard_timeout >= 0)
				disable_timeout((TimeoutId) hard_timeout, false);
		}
		MemoryContextSwitchTo(oldcxt);
		result = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		SetUserIdAndSecContext(save_userid, save_sec);
		me_count(ME_STAT_LISTENER_ERRORS, 1);
		/* cancelled by mqtt_emit.listener_timeout: as slow the next time */
		if (result->sqlerrcode == ERRCODE_QUERY_CANCELED && mqtt_emit_listener_timeout > 0 &&
			TimestampDifferenceExceeds(start, GetCurrentTimestamp(),
									   mqtt_emit_listener_timeout - 1))
			last_call_timed_out = true;
	}
	PG_END_TRY();
	return result;
}

/*
 * Does handler h take a message that came through this path: the plain
 * subscriptions (group NULL), or the shared subscription of group to
 * group_filter?
 */
static bool
handler_on_path(const Handler *h, const char *group, const char *group_filter)
{
	if (group == NULL)
		return h->share_group == NULL;
	return h->share_group != NULL && strcmp(h->share_group, group) == 0 &&
		strcmp(h->filter, group_filter) == 0;
}

/*
 * May an error of a handler pass if the message is tried again a moment
 * later?  A serialization failure or deadlock (class 40), a lock not
 * available (55), a cancel or shutdown (57), out of resources (53), a
 * system or connection error (58, 08, HV for foreign data wrappers) may.
 * What the handler raised itself, a constraint it broke, bad data: no, and
 * retrying those only held up every message behind it, 1 s and 2 s each
 * (the listener worker keeps order), for anyone who can publish on a
 * handler's topic.  A handler cancelled by mqtt_emit.listener_timeout
 * (57014) is not tried again either: it would take as long again.
 */
static bool
error_may_pass(int sqlerrcode)
{
	switch (ERRCODE_TO_CATEGORY(sqlerrcode))
	{
		case ERRCODE_TRANSACTION_ROLLBACK:
		case ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE:
		case ERRCODE_OPERATOR_INTERVENTION:
		case ERRCODE_INSUFFICIENT_RESOURCES:
		case ERRCODE_SYSTEM_ERROR:
		case ERRCODE_CONNECTION_EXCEPTION:
		case ERRCODE_FDW_ERROR:
			return true;
		default:
			return false;
	}
}

/*
 * Run the handlers of one received message (an ME_KIND_MESSAGE row),
 * inside the listener worker's subtransaction for the row: those of the
 * path it came through (see handler_on_path) whose filter matches its
 * topic.  attempt counts from 0.  A handler that raises makes this raise
 * too (the row is rolled back and tried again), except on the last
 * attempt, where each failing handler's message becomes a dead letter and
 * the rest stays done.  An error that cannot pass (error_may_pass) makes
 * the dead letter at once.
 */
void
me_handlers_run(const char *topic, int topic_len, const char *stored, int stored_len,
				TimestampTz created_at, int attempt, int attempts,
				const char *group, const char *group_filter)
{
	int			pend = me_handlers_payload_end(stored, stored_len);
	bytea	   *payload;
	Jsonb	   *props;
	Datum		topic_d;
	int			failed = 0;
	char	   *first_error = NULL;
	bool		last = (attempt + 1 >= attempts);
	int			i;

	if (pend < 2 || stored[0] != '\\' || stored[1] != 'x' || (pend - 2) % 2 != 0)
		elog(ERROR, "outbox row of a received message is malformed");
	payload = palloc(VARHDRSZ + (pend - 2) / 2);
	SET_VARSIZE(payload, VARHDRSZ + hex_decode(stored + 2, pend - 2, VARDATA(payload)));
	props = DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
											   CStringGetDatum(pend < stored_len ?
															   pnstrdup(stored + pend + 1, stored_len - pend - 1) :
															   "{}")));
	topic_d = PointerGetDatum(cstring_to_text_with_len(topic, topic_len));

	for (i = 0; i < nhandlers; i++)
	{
		Handler    *h = &handlers[i];
		ErrorData  *err;
		bool		may_pass;

		if (!handler_on_path(h, group, group_filter) ||
			!me_filter_matches(h->filter, topic, topic_len) || !handler_may_run(h))
			continue;
		err = call_handler(h, topic_d, PointerGetDatum(payload), JsonbPGetDatum(props));
		if (err == NULL)
			continue;
		may_pass = error_may_pass(err->sqlerrcode) && !last_call_timed_out;
		me_set_last_error("handler %s failed for a message on \"%.100s\": %s",
						  h->fn_name, topic, err->message);
		ereport(LOG,
				(errmsg("pg_mqtt_emit handler %s (id " INT64_FORMAT ") failed for a message on topic \"%.200s\": %s",
						h->fn_name, h->id, topic, err->message),
				 may_pass ?
				 errdetail("Attempt %d of %d.", attempt + 1, attempts) :
				 errdetail("Not tried again for this error: it would not pass."),
				 errcontext("SQLSTATE %s", unpack_sql_state(err->sqlerrcode))));
		if (last || !may_pass)
		{
			char	   *reason;

			if (last)
				reason = psprintf("handler %s (id " INT64_FORMAT ") failed: %s (SQLSTATE %s, after %d attempts)",
								  h->fn_name, h->id, err->message,
								  unpack_sql_state(err->sqlerrcode), attempts);
			else
				reason = psprintf("handler %s (id " INT64_FORMAT ") failed: %s (SQLSTATE %s, not tried again for this error: it would not pass)",
								  h->fn_name, h->id, err->message,
								  unpack_sql_state(err->sqlerrcode));
			me_outbox_message_dead_letter(topic, stored, pend, reason, created_at);
		}
		else
		{
			failed++;
			if (first_error == NULL)
				first_error = pstrdup(err->message);
		}
		FreeErrorData(err);
	}
	if (failed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("%d handler(s) failed for a message on topic \"%.200s\": %s",
						failed, topic, first_error)));
}

/* How many handler calls this process has made. */
uint64
me_handlers_calls_made(void)
{
	return calls_made;
}

void
me_handlers_set_hard_timeout(int timeout_id)
{
	hard_timeout = timeout_id;
}
