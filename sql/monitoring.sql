-- monitoring and the registry: stats_reset(), seconds, direct DML on the registry
\set VERBOSITY terse
-- the registry however it changes: a direct INSERT and DELETE reach the
-- worker at commit, as listen() and unlisten() do
CREATE TABLE direct_t (id int PRIMARY KEY);
SELECT mqtt_emit.watch('direct_t');
TRUNCATE seen;
CREATE TABLE mark_t (id int PRIMARY KEY);
SELECT mqtt_emit.watch('mark_t');
SELECT mqtt_emit.listen('mark_t', 'record_event(mqtt_emit.event)') AS marker_listener \gset
SELECT subscriptions AS subs_before FROM mqtt_emit.stats \gset
INSERT INTO mqtt_emit.listeners (model, listener, allow_remote)
VALUES ('Direct_T', 'record_event(mqtt_emit.event)', true);
-- Direct_T/# and direct_t/#
SELECT wait_until(format('SELECT subscriptions = %s + 2 FROM mqtt_emit.stats', :subs_before)) AS subscribed;
INSERT INTO direct_t VALUES (1);
SELECT wait_until('SELECT count(*) = 1 FROM seen') AS arrived;
DELETE FROM mqtt_emit.listeners WHERE model = 'Direct_T';
SELECT wait_until(format('SELECT subscriptions = %s FROM mqtt_emit.stats', :subs_before)) AS unsubscribed;
-- after the DELETE nothing runs for direct_t: a later event of a table
-- that still has a listener arrives alone
INSERT INTO direct_t VALUES (2);
INSERT INTO mark_t VALUES (1);
SELECT wait_until('SELECT count(*) = 2 FROM seen') AS arrived;
SELECT model, result->>'id' AS id FROM seen ORDER BY n;
SELECT mqtt_emit.unlisten(:marker_listener);
DROP TABLE direct_t, mark_t;

-- stats_reset(): counters start again from zero; the queue's own figures stay
SELECT wait_until('SELECT queued = 0 FROM mqtt_emit.stats') AS drained;
SELECT stats_reset AS reset_before, listener_calls > 0 AS had_calls FROM mqtt_emit.stats \gset
SELECT :'had_calls' AS had_calls;
SELECT mqtt_emit.stats_reset();
SELECT listener_calls, published, enqueued, queued, stats_reset > :'reset_before'::timestamptz AS reset_later
  FROM mqtt_emit.stats;
-- ages are seconds too: no outbox rows, no age
SELECT oldest_waiting_seconds IS NULL AS no_age, oldest_waiting_age IS NULL AS no_interval,
       pg_typeof(oldest_waiting_seconds) AS seconds_type, pg_typeof(stats_reset) AS reset_type
  FROM mqtt_emit.stats;
-- counting goes on after a reset
INSERT INTO durable_t VALUES (101, 'after reset');
-- (one event, and durable_t's listener of outbox.sql ran once)
SELECT wait_until('SELECT enqueued = 1 AND published = 1 AND listener_calls = 1 FROM mqtt_emit.stats') AS counted;
-- not for PUBLIC; a grant allows it
SET ROLE regress_mqtt_plain;
SELECT try($$SELECT mqtt_emit.stats_reset()$$);
RESET ROLE;
GRANT EXECUTE ON FUNCTION mqtt_emit.stats_reset() TO regress_mqtt_plain;
SET ROLE regress_mqtt_plain;
SELECT try($$SELECT mqtt_emit.stats_reset()$$);
RESET ROLE;
REVOKE EXECUTE ON FUNCTION mqtt_emit.stats_reset() FROM regress_mqtt_plain;
SELECT enqueued AS enqueued_after_reset FROM mqtt_emit.stats;
