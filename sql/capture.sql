-- capture: what a committed change carries, and what never leaves
\set VERBOSITY terse
CREATE TABLE seen (n serial PRIMARY KEY, source text, operation text, model text,
                   event_id text, result jsonb, old jsonb, args jsonb, payload jsonb,
                   topic text, emitted_at timestamptz);
CREATE FUNCTION record_event(e mqtt_emit.event) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen (source, operation, model, event_id, result, old, args, payload, topic, emitted_at)
    VALUES (e.source, e.operation, e.model, e.event_id, e.result, e.old, e.args, e.payload, e.topic, e.emitted_at);
END $$;

CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (x int, y text);
CREATE TABLE typed (
    id      int PRIMARY KEY,
    i2      int2, i8 int8, num numeric, f4 real, f8 float8,
    b       boolean, t text, vc varchar(10), ch char(3),
    d       date, ts timestamp, tstz timestamptz, tm time, iv interval,
    j       json, jb jsonb, arr int[], tarr text[], nested int[][],
    by      bytea, u uuid, e mood, dom posint, comp pair, big text
);
SELECT mqtt_emit.watch('typed');
SELECT mqtt_emit.listen('typed', 'record_event(mqtt_emit.event)') > 0 AS listening;

SET timezone = 'UTC';
INSERT INTO typed VALUES
 (1, -2, 9007199254740993, 12345678901234567890.123, 1.5, 'NaN',
  true, E'quote" backslash\\ newline\n tab\t \u00e9', 'vc', 'ab',
  '2026-11-13', '2026-11-13 10:30:00.123456', '2026-11-13 10:30:00.5+02', '10:30', '1 day 2 hours',
  '{"a": 1,  "b": [true, null]}', '{"z": 1, "a": {"b": 2}}', '{1,2,3}', '{"x y",NULL}', '{{1,2},{3,4}}',
  '\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', 7, ROW(1, 'one'), repeat('x', 100000)),
 (2, NULL, NULL, 'Infinity', '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, 'null', '{}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

SELECT wait_until('SELECT count(*) = 2 FROM seen') AS arrived;
-- the result is the row exactly as to_jsonb() renders it
SELECT s.result->>'id' AS id, s.result = to_jsonb(ty) AS same_as_to_jsonb
  FROM seen s JOIN typed ty ON ty.id = (s.result->>'id')::int ORDER BY 1;
SELECT length(result->>'big') AS toasted_length, result->'t' AS t, result->'j' AS j,
       result->'f8' AS nan, result->'tstz' AS tstz, result->'by' AS by, result->'comp' AS comp
  FROM seen WHERE result->>'id' = '1';

-- the envelope: the seed's keys first, in order, then ours
SELECT source, operation, model, topic LIKE '%/typed/create' AS topic_ok,
       event_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$' AS uuid_v7,
       args = jsonb_build_object('data', result) AS args_ok,
       payload->>'eventId' = event_id AS event_id_ok,
       payload->>'origin' = (SELECT client_id FROM mqtt_emit.stats) AS origin_ok,
       payload->>'timestamp' ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$' AS timestamp_ok,
       abs(extract(epoch FROM emitted_at - now())) < 600 AS recent
  FROM seen ORDER BY n;
TRUNCATE seen;

-- control characters, quotes and backslashes in text, varchar and char(n)
-- (their bytes are escaped directly), and a type rendered by its output
-- function: escaped as to_jsonb() does
INSERT INTO typed (id, t, vc, ch, e) VALUES
 (3, E'a\x01b\x1fc\bd\fe\rf"g\\h', E'\x02"\\', E'\t ', 'sad');
SELECT wait_until('SELECT count(*) = 1 FROM seen') AS arrived;
SELECT s.result = to_jsonb(ty) AS same_as_to_jsonb, s.result->'t' AS t,
       s.result->'vc' AS vc, s.result->'ch' AS ch, s.result->'e' AS e
  FROM seen s JOIN typed ty ON ty.id = 3;
TRUNCATE seen;

-- update: where = primary key of the old row, data = changed columns only
UPDATE typed SET t = 'changed', i2 = 5 WHERE id = 2;
-- delete: where = primary key, result = the old row
DELETE FROM typed WHERE id = 2;
SELECT wait_until('SELECT count(*) = 2 FROM seen') AS arrived;
SELECT operation, args, result->>'t' AS result_t, old->>'t' AS old_t,
       (SELECT array_agg(k ORDER BY o) FROM jsonb_object_keys(payload) WITH ORDINALITY AS x(k, o)) AS keys
  FROM seen ORDER BY n;
TRUNCATE seen;

-- rolled back transactions and savepoints produce nothing; order is statement order
CREATE TABLE ordered (id int PRIMARY KEY, v text);
SELECT mqtt_emit.watch('ordered');
SELECT mqtt_emit.listen('ordered', 'record_event(mqtt_emit.event)') > 0 AS listening;
BEGIN;
INSERT INTO ordered VALUES (1, 'rolled back');
ROLLBACK;
BEGIN;
INSERT INTO ordered VALUES (2, 'kept a');
SAVEPOINT s1;
INSERT INTO ordered VALUES (3, 'rolled back to savepoint');
SAVEPOINT s2;
INSERT INTO ordered VALUES (4, 'inner, rolled back with s1');
RELEASE s2;
ROLLBACK TO s1;
SAVEPOINT s3;
INSERT INTO ordered VALUES (5, 'kept b, released');
RELEASE s3;
DO $$ BEGIN INSERT INTO ordered VALUES (6, 'rolled back by exception'); RAISE EXCEPTION 'x'; EXCEPTION WHEN OTHERS THEN NULL; END $$;
INSERT INTO ordered SELECT g, 'multi ' || g FROM generate_series(7, 9) g;
UPDATE ordered SET v = v || '!' WHERE id IN (2, 5);
COMMIT;
SELECT wait_until('SELECT count(*) = 7 FROM seen') AS arrived;
SELECT n - min(n) OVER () + 1 AS seq, operation, result->>'id' AS id, result->>'v' AS v FROM seen ORDER BY n;
TRUNCATE seen;

-- switches: enabled, emit_local, emit_remote (set per transaction)
BEGIN;
SET LOCAL mqtt_emit.enabled = off;
INSERT INTO ordered VALUES (10, 'disabled');
COMMIT;
BEGIN;
SET LOCAL mqtt_emit.emit_local = off;
INSERT INTO ordered VALUES (11, 'no local listeners');
COMMIT;
BEGIN;
SET LOCAL mqtt_emit.emit_remote = off;
INSERT INTO ordered VALUES (12, 'local only');
COMMIT;
SELECT wait_until('SELECT count(*) = 1 FROM seen') AS arrived;
SELECT result->>'id' AS id FROM seen ORDER BY n;
TRUNCATE seen;

-- an ordinary role cannot switch capture off
SET ROLE regress_mqtt_plain;
SELECT try($$SET mqtt_emit.enabled = off$$);
SET mqtt_emit.emit_remote = off;
RESET mqtt_emit.emit_remote;
RESET ROLE;

-- PREPARE TRANSACTION with pending events is refused, without loss of the row
BEGIN;
INSERT INTO ordered VALUES (13, 'prepared?');
PREPARE TRANSACTION 'regress_mqtt_px';
SELECT count(*) AS rows_13 FROM ordered WHERE id = 13;
BEGIN;
SET LOCAL mqtt_emit.enabled = off;
INSERT INTO ordered VALUES (14, 'prepared without events');
PREPARE TRANSACTION 'regress_mqtt_px2';
COMMIT PREPARED 'regress_mqtt_px2';
SELECT count(*) AS rows_14 FROM ordered WHERE id = 14;

-- oversized events are refused before commit
SELECT try($$INSERT INTO ordered VALUES (15, repeat('y', 1100000))$$);

-- ad-hoc publish: needs a grant, validates the topic
SELECT mqtt_emit.publish('regress/adhoc', '{"hello": "world"}'::jsonb);
SELECT try($$SELECT mqtt_emit.publish('regress/+/bad', 'x')$$);
SELECT try($$SELECT mqtt_emit.publish('', 'x')$$);
SELECT try($$SELECT mqtt_emit.publish('regress/adhoc', 'x', 3)$$);
SET ROLE regress_mqtt_plain;
SELECT try($$SELECT mqtt_emit.publish('regress/adhoc', 'x')$$);
RESET ROLE;

-- everything committed left the queue
SELECT wait_until('SELECT queued = 0 FROM mqtt_emit.stats') AS drained;
SELECT failed, dropped, listener_errors FROM mqtt_emit.stats;
