/*-------------------------------------------------------------------------
 *
 * topic.h
 *		Every rule about MQTT topics in one place: how a model name becomes
 *		a topic level, the topics events are published to, the filters the
 *		subscriber asks for, and how a received topic is taken apart.
 *
 * Copyright (c) 2026, pg_mqtt_emit developers
 *
 * IDENTIFICATION
 *		src/topic.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTT_EMIT_TOPIC_H
#define MQTT_EMIT_TOPIC_H

#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"

#include "pg_mqtt_emit.h"

typedef enum MeTopicTextResult
{
	ME_TOPIC_TEXT_OK,
	ME_TOPIC_TEXT_BAD_UTF8,		/* not valid UTF-8 */
	ME_TOPIC_TEXT_BAD_CHAR		/* a code point MQTT does not allow */
} MeTopicTextResult;

extern MeTopicTextResult me_topic_text_check(const char *s, int len, int *pos,
											 pg_wchar *cp);
extern void me_check_topic_text(const char *s, int len, const char *what,
								const char *hint);
extern void me_ascii_lower(char *s, int len);
extern void me_append_topic_model(StringInfo buf, const char *model, int len,
								  bool lower);
extern void me_append_topic_key(StringInfo buf, const char *s, int len);
extern bool me_topic_is_state(const char *topic, int topic_len);
extern void me_build_topic(StringInfo buf, const MqttEmitEventHeader *hdr,
						   const char *model, bool all_style);
extern void me_build_dead_letter_topic(StringInfo buf, const MqttEmitEventHeader *hdr,
									   const char *model);
extern const char *me_batch_prefix_problem(void);
extern void me_check_batch_prefix(void);
extern void me_build_batch_topic(StringInfo buf, const char *model, int len);
extern void me_topic_filter(StringInfo buf, const char *model, bool lower);
extern bool me_topic_split(const char *topic, int topic_len,
						   const char **model, int *model_len);
extern bool me_topic_model_matches(const char *level, int level_len,
								   const char *model);
extern bool me_topic_is_mapped_event(const char *topic, int len);
extern bool me_topic_mapped_plausible(const char *topic, int topic_len);
extern bool me_topic_matches_mapped(const char *topic, int topic_len,
									const char *model, const char *operation);

/*
 * Share groups: $share/<group>/<filter>.  Subscription Identifiers:
 * ME_SUB_ID_PLAIN for every subscription without a group, a hash of the
 * filter for a shared one (me_share_sub_id).
 */
#define ME_SHARE_GROUP_MAX	100		/* bytes of a share group name */
#define ME_SUB_ID_PLAIN		1
#define ME_SUB_ID_MAX		268435455	/* the largest MQTT 5 allows */

/* An inbox row's delivery path and topic (me_inbox_split). */
typedef struct MeInboxPath
{
	const char *topic;			/* the message's topic, topic_len bytes */
	int			topic_len;
	char	   *filter;			/* "$share/<group>/<filter>", or NULL */
	char	   *group;			/* the group's name, or NULL */
	const char *group_filter;	/* the filter after the group, or NULL */
} MeInboxPath;

extern const char *me_share_group_problem(const char *s, int len);
extern void me_check_share_group(const char *s, int len);
extern void me_share_filter(StringInfo buf, const char *group, const char *filter);
extern uint32 me_share_sub_id(const char *filter);
extern void me_inbox_model(StringInfo buf, const char *filter, const char *topic,
						   int topic_len);
extern void me_inbox_split(const char *model, int len, MeInboxPath *path);

#endif							/* MQTT_EMIT_TOPIC_H */
