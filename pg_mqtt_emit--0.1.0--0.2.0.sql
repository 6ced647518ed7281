/* pg_mqtt_emit--0.1.0--0.2.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION pg_mqtt_emit UPDATE TO '0.2.0'" to load this file. \quit

------------------------------------------------------------------------
-- 0.2.0: the listener worker's inbox, topic rules from C
------------------------------------------------------------------------

-- Messages received from the bus, kept by the worker until the listener
-- worker has run their listeners (it deletes each row in the transaction
-- of its listeners' effects).
CREATE TABLE mqtt_emit.inbox (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE mqtt_emit.inbox IS
'Received messages waiting for the listener worker; internal, not readable by PUBLIC';
REVOKE ALL ON mqtt_emit.inbox FROM PUBLIC;
REVOKE ALL ON SEQUENCE mqtt_emit.inbox_id_seq FROM PUBLIC;

-- Rows written without a marker: the queue's tail when they were written
-- (they are placed in the publishing order once everything queued before
-- that is).
ALTER TABLE mqtt_emit.outbox ADD COLUMN queue_pos bigint;

-- The topic filter the worker subscribes to for a model (topic.c).
CREATE FUNCTION mqtt_emit._topic_filter(model text, lower boolean)
RETURNS text
LANGUAGE c STABLE STRICT
AS 'MODULE_PATHNAME', 'mqtt_emit_topic_filter';

CREATE OR REPLACE VIEW mqtt_emit.subscriptions AS
SELECT DISTINCT f.topic_filter
  FROM mqtt_emit.listeners l,
       LATERAL (VALUES (mqtt_emit._topic_filter(l.model, false)),
                       (mqtt_emit._topic_filter(l.model, true))) AS f(topic_filter)
 WHERE l.allow_remote;

-- tell the workers that the extension changed
SELECT mqtt_emit._listeners_changed();
