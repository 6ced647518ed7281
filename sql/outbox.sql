-- outbox: durable delivery writes events in the committing transaction
\set VERBOSITY terse
CREATE TABLE durable_t (id int PRIMARY KEY, v text);
SELECT mqtt_emit.watch('durable_t');
TRUNCATE seen;
SELECT mqtt_emit.listen('durable_t', 'record_event(mqtt_emit.event)') > 0 AS listening;

SET mqtt_emit.delivery = durable;
SELECT enqueued AS enqueued_before FROM mqtt_emit.stats \gset
BEGIN;
INSERT INTO durable_t VALUES (1, 'one'), (2, 'two');
ROLLBACK;
-- the rows are written at commit, in the committing transaction: a
-- rolled-back transaction leaves none
SELECT count(*) AS after_rollback FROM mqtt_emit.outbox;

BEGIN;
INSERT INTO durable_t VALUES (1, 'one'), (2, 'two');
UPDATE durable_t SET v = 'TWO' WHERE id = 2;
COMMIT;
-- local listeners run exactly once; the rows leave when the broker acknowledged them
SELECT wait_until('SELECT count(*) = 3 FROM seen') AS arrived;
SELECT wait_until('SELECT NOT EXISTS (SELECT 1 FROM mqtt_emit.outbox)') AS drained;
SELECT operation, result->>'id' AS id, result->>'v' AS v, source FROM seen ORDER BY n;
-- with room in the queue, durable events travel through it too (the worker
-- publishes them from there); the rows are what a crash cannot take
SELECT enqueued - :enqueued_before AS through_queue FROM mqtt_emit.stats;

-- an ordinary role's changes go to the outbox too, which it cannot read
CREATE TABLE plain_t (id int PRIMARY KEY);
ALTER TABLE plain_t OWNER TO regress_mqtt_plain;
SET ROLE regress_mqtt_plain;
SELECT mqtt_emit.watch('plain_t');
INSERT INTO plain_t VALUES (1);
SELECT try($$SELECT count(*) FROM mqtt_emit.outbox$$);
SELECT try($$DELETE FROM mqtt_emit.outbox$$);
SELECT try($$SELECT count(*) FROM mqtt_emit.dead_letters$$);
RESET ROLE;
SELECT wait_until('SELECT NOT EXISTS (SELECT 1 FROM mqtt_emit.outbox)') AS drained;
RESET mqtt_emit.delivery;

-- in_outbox is kept approximately (a count of rows being deleted can lag,
-- and the worker recounts when idle): wait for it, bounded
SELECT wait_until('SELECT in_outbox = 0 FROM mqtt_emit.stats') AS counted;
SELECT in_outbox, dead_letters FROM mqtt_emit.stats;
