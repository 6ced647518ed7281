-- drop: what DROP EXTENSION takes with it and what it leaves
\set VERBOSITY terse
SELECT count(*) AS capture_triggers FROM pg_trigger
 WHERE tgfoid = 'mqtt_emit.capture()'::regprocedure;
-- capture triggers and listener functions depend on the extension's objects
DROP EXTENSION pg_mqtt_emit;
SET client_min_messages = warning;
DROP EXTENSION pg_mqtt_emit CASCADE;
RESET client_min_messages;
SELECT count(*) AS capture_triggers FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
 WHERE p.proname = 'capture';
-- the schema named in the control file stays, empty
SELECT count(*) AS schema_left FROM pg_namespace WHERE nspname = 'mqtt_emit';
SELECT count(*) AS objects_left FROM pg_class WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = 'mqtt_emit');
-- the watched tables and their rows stay
SELECT count(*) AS ordered_rows FROM ordered;
-- and it can be created again
CREATE EXTENSION pg_mqtt_emit;
SELECT count(*) AS listeners FROM mqtt_emit.listeners;
SELECT count(*) AS watched FROM mqtt_emit.watched_tables;
