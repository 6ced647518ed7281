-- setup: install, what the extension consists of, settings
\set VERBOSITY terse
CREATE EXTENSION pg_mqtt_emit;

-- objects of the extension
SELECT pg_describe_object(classid, objid, 0) AS object
  FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_mqtt_emit')
   AND deptype = 'e'
 ORDER BY 1;

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
SHOW mqtt_emit.password;
SHOW mqtt_emit.tls_key_file;
SHOW mqtt_emit.signing_key;
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

-- the extension lives in one database only
CREATE DATABASE regress_mqtt_other;
\c regress_mqtt_other
\set VERBOSITY default
CREATE EXTENSION pg_mqtt_emit;
\c contrib_regression
DROP DATABASE regress_mqtt_other;
