/*-------------------------------------------------------------------------
 *
 * pubprops.h
 *		MQTT 5 publish properties of mqtt_emit.publish(), as they travel
 *		through the queue and the outbox.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/pubprops.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_PUBPROPS_H
#define MQTT_EMIT_PUBPROPS_H

#include "lib/stringinfo.h"
#include "utils/jsonb.h"

/* limits checked by mqtt_emit.publish() */
#define ME_PROP_MAX_STRING	1024	/* bytes of each string property */
#define ME_PROP_MAX_USER	32		/* user property pairs */
#define ME_PROP_MAX_TOTAL	8192	/* bytes of all properties, encoded */

/* record tags of the encoded block */
#define ME_PROP_CONTENT_TYPE	'c'
#define ME_PROP_RESPONSE_TOPIC	'r'
#define ME_PROP_CORRELATION		'd'
#define ME_PROP_EXPIRY			'e'
#define ME_PROP_USER_NAME		'n'
#define ME_PROP_USER_VALUE		'v'

/* backend, at call time: validate and encode; false when there are none */
extern bool me_pubprops_encode(Jsonb *props, StringInfo out);

/* anywhere (no PostgreSQL state): split a payload that carries properties */
extern bool me_pubprops_split(const char **payload, int *len,
							  const char **props, int *props_len);

/* anywhere: the next record of a block; false at its end or when malformed */
extern bool me_pubprops_next(const char **pos, const char *end, char *tag,
							 const char **value, int *value_len);

#endif							/* MQTT_EMIT_PUBPROPS_H */
