-- setup: install, what the extension consists of, settings
\set VERBOSITY terse
CREATE EXTENSION pg_mqtt_emit;

-- objects of the extension (the types that come with them are below)
CREATE VIEW members AS
SELECT classid, objid FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_mqtt_emit')
   AND deptype = 'e';
-- the types that come with an object: a table's or view's row type, arrays
CREATE VIEW dependent_types AS
SELECT c.reltype AS objid FROM members m JOIN pg_class c ON c.oid = m.objid
 WHERE m.classid = 'pg_class'::regclass AND c.reltype <> 0
UNION
SELECT t.typarray FROM pg_type t
 WHERE t.typarray <> 0
   AND (t.oid IN (SELECT objid FROM members WHERE classid = 'pg_type'::regclass)
        OR t.typrelid IN (SELECT objid FROM members WHERE classid = 'pg_class'::regclass));
SELECT pg_describe_object(classid, objid, 0) AS object
  FROM members
 WHERE NOT (classid = 'pg_type'::regclass AND objid IN (SELECT objid FROM dependent_types))
 ORDER BY 1;
-- PostgreSQL 17 lists those types as members too, 15 and 16 do not
SELECT count(*) AS dependent_types,
       bool_and((objid IN (SELECT objid FROM members WHERE classid = 'pg_type'::regclass))
                = (current_setting('server_version_num')::int >= 170000)) AS members_as_expected
  FROM dependent_types;
DROP VIEW dependent_types, members;

-- every function and view has a comment (internal _helpers excepted)
SELECT p.oid::regprocedure AS uncommented
  FROM pg_proc p
 WHERE p.pronamespace = 'mqtt_emit'::regnamespace
   AND p.proname NOT LIKE '\_%'
   AND obj_description(p.oid, 'pg_proc') IS NULL;
SELECT c.relname AS uncommented
  FROM pg_class c
 WHERE c.relnamespace = 'mqtt_emit'::regnamespace AND c.relkind IN ('r', 'v')
   AND obj_description(c.oid, 'pg_class') IS NULL;

-- settings and their defaults that do not depend on the test run
SELECT name, setting, context FROM pg_settings
 WHERE name LIKE 'mqtt_emit.%'
   AND name NOT IN ('mqtt_emit.broker_url', 'mqtt_emit.client_id',
                    'mqtt_emit.topic_prefix', 'mqtt_emit.database',
                    'mqtt_emit.listener_timeout')
 ORDER BY name;

-- errors are shown with their SQLSTATE, message, detail and hint
CREATE FUNCTION try(q text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE st text; msg text; det text; hnt text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    RETURN st || ' ' || msg || coalesce(' DETAIL: ' || nullif(det, ''), '')
           || coalesce(' HINT: ' || nullif(hnt, ''), '');
END $$;

-- bad values are refused
ALTER SYSTEM SET mqtt_emit.qos = 3;
SET mqtt_emit.delivery = 'sometimes';
ALTER SYSTEM SET mqtt_emit.topic_prefix = 'a/+/b';
ALTER SYSTEM SET mqtt_emit.broker_url = 'http://example.invalid';
SET mqtt_emit.no_such_setting = 1;

-- credentials are hidden from roles that are not superusers
CREATE ROLE regress_mqtt_plain LOGIN;
SET ROLE regress_mqtt_plain;
-- SQLSTATE only: PostgreSQL 16 reworded the message (42501 insufficient_privilege)
\set VERBOSITY sqlstate
SHOW mqtt_emit.password;
SHOW mqtt_emit.tls_key_file;
SHOW mqtt_emit.signing_key;
\set VERBOSITY terse
SELECT count(*) AS visible FROM pg_settings
 WHERE name IN ('mqtt_emit.password', 'mqtt_emit.username', 'mqtt_emit.tls_key_file',
                'mqtt_emit.tls_cert_file', 'mqtt_emit.tls_ca_file', 'mqtt_emit.signing_key');
SELECT try('SELECT * FROM mqtt_emit.stats');
RESET ROLE;

-- the worker is running and connected to the broker
CREATE FUNCTION wait_until(q text, timeout_s int DEFAULT 30) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE ok boolean;
BEGIN
    FOR i IN 1 .. timeout_s * 20 LOOP
        EXECUTE q INTO ok;
        IF ok THEN RETURN true; END IF;
        PERFORM pg_sleep(0.05);
        PERFORM pg_stat_clear_snapshot();
    END LOOP;
    RETURN false;
END $$;
SELECT wait_until('SELECT connected FROM mqtt_emit.stats') AS connected;
SELECT worker_pid IS NOT NULL AS worker_running, client_id LIKE 'regress-%' AS client_id_set
  FROM mqtt_emit.stats;
SELECT count(*) AS workers FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit';

-- the extension can be created in any database; each gets its own workers
-- and client id, and DROP DATABASE is not blocked by them
CREATE DATABASE regress_mqtt_other;
\c regress_mqtt_other
CREATE EXTENSION pg_mqtt_emit;
CREATE FUNCTION wait_until(q text, timeout_s int DEFAULT 30) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE ok boolean;
BEGIN
    FOR i IN 1 .. timeout_s * 20 LOOP
        EXECUTE q INTO ok;
        IF ok THEN RETURN true; END IF;
        PERFORM pg_sleep(0.05);
        PERFORM pg_stat_clear_snapshot();
    END LOOP;
    RETURN false;
END $$;
SELECT wait_until($$SELECT count(*) = 2 FROM pg_stat_activity
                   WHERE backend_type IN ('pg_mqtt_emit', 'pg_mqtt_emit listeners')
                     AND datname = current_database()$$) AS both_workers;
SELECT wait_until('SELECT connected FROM mqtt_emit.stats') AS connected;
SELECT client_id LIKE 'regress-%-db\_regress\_mqtt\_other' AS client_id_has_database
  FROM mqtt_emit.stats;
\c contrib_regression
DROP DATABASE regress_mqtt_other;
SELECT count(*) AS workers FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit';
