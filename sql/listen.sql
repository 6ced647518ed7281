-- listen / unlisten: validation, kinds, filters, privileges, failures
\set VERBOSITY terse
CREATE TABLE item (id int PRIMARY KEY, status text, secret text);
SELECT mqtt_emit.watch('item');
CREATE TABLE calls (n serial, who text, source text, operation text, id text);
GRANT INSERT ON calls TO PUBLIC;
GRANT USAGE ON SEQUENCE calls_n_seq TO PUBLIC;

CREATE FUNCTION l_default(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, operation, id) VALUES ('default', e.source, e.operation, e.result->>'id'); END $$;
CREATE FUNCTION l_remote(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, operation, id) VALUES ('allow_remote', e.source, e.operation, e.result->>'id'); END $$;
CREATE FUNCTION l_remote_only(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, operation, id) VALUES ('remote_only', e.source, e.operation, e.result->>'id'); END $$;
CREATE FUNCTION l_filtered(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, operation, id) VALUES ('filtered', e.source, e.operation, e.result->>'id'); END $$;
CREATE FUNCTION l_deletes(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, operation, id) VALUES ('deletes', e.source, e.operation, e.result->>'id'); END $$;
CREATE FUNCTION l_fails(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'listener failure on purpose'; END $$;
CREATE FUNCTION l_slow(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(60); END $$;
CREATE FUNCTION not_a_listener(x int) RETURNS void LANGUAGE sql AS $$ SELECT $$;

SELECT mqtt_emit.listen('item', 'l_fails(mqtt_emit.event)') AS id_fails \gset
SELECT mqtt_emit.listen('item', 'l_slow(mqtt_emit.event)') AS id_slow \gset
SELECT mqtt_emit.listen('item', 'l_default(mqtt_emit.event)') > 0 AS ok;
SELECT mqtt_emit.listen('Item', 'l_remote(mqtt_emit.event)', allow_remote => true) > 0 AS ok;
SELECT mqtt_emit.listen('item', 'l_remote_only(mqtt_emit.event)', allow_remote => true, remote_only => true) > 0 AS ok;
SELECT mqtt_emit.listen('item', 'l_filtered(mqtt_emit.event)', filter => '{"status": "active"}') > 0 AS ok;
SELECT mqtt_emit.listen('item', 'l_deletes(mqtt_emit.event)', operations => '{delete}') > 0 AS ok;
SELECT model, listener, allow_remote, remote_only, filter, operations, owner
  FROM mqtt_emit.listeners ORDER BY id;
SELECT topic_filter LIKE 'test/regress-%/item/#' OR topic_filter LIKE 'test/regress-%/Item/#' AS filter_ok
  FROM mqtt_emit.subscriptions ORDER BY 1;
SELECT wait_until('SELECT subscriptions = 2 FROM mqtt_emit.stats') AS subscribed;
-- the broker acknowledged both, with QoS 1
SELECT wait_until($$SELECT count(*) = 2 FROM mqtt_emit.subscriptions
                    WHERE state = 'acknowledged' AND granted_qos = 1 AND reason IS NULL
                      AND since <= clock_timestamp()$$) AS acknowledged;

-- local events: default and allow_remote run, remote_only does not;
-- a failing and a timed-out listener do not stop the others
SELECT listener_errors AS errors_before FROM mqtt_emit.stats \gset
INSERT INTO item VALUES (1, 'active', 's1'), (2, 'inactive', 's2');
DELETE FROM item WHERE id = 2;
SELECT wait_until('SELECT count(*) = 8 FROM calls') AS arrived;
SELECT who, source, operation, id FROM calls ORDER BY who, id, operation;
SELECT wait_until(format('SELECT listener_errors = %s + 6 FROM mqtt_emit.stats', :errors_before)) AS errors_counted;
SELECT last_error LIKE 'listener %' AS last_error_names_listener FROM mqtt_emit.stats;
SELECT mqtt_emit.unlisten(:id_fails);
SELECT mqtt_emit.unlisten(:id_slow);
TRUNCATE calls;

-- validation
SELECT try($$SELECT mqtt_emit.listen('item', 'not_a_listener(int)')$$);
SELECT try($$SELECT mqtt_emit.listen('item', 'no_such_function(mqtt_emit.event)')$$);
SELECT try($$SELECT mqtt_emit.listen('item', 'l_default(mqtt_emit.event)', remote_only => true)$$);
SELECT try($$SELECT mqtt_emit.listen('item', 'l_default(mqtt_emit.event)', filter => '[1]')$$);
SELECT try($$SELECT mqtt_emit.listen('item', 'l_default(mqtt_emit.event)', operations => '{truncate}')$$);
SELECT try($$SELECT mqtt_emit.listen('item', 'l_default(mqtt_emit.event)', operations => '{}')$$);
SELECT try($$SELECT mqtt_emit.listen('a/b', 'l_default(mqtt_emit.event)')$$);
SELECT try($$SELECT mqtt_emit.listen('', 'l_default(mqtt_emit.event)')$$);
SELECT try($$SELECT mqtt_emit.unlisten(-1)$$);
SELECT try($$SELECT mqtt_emit.unlisten(NULL)$$);
CREATE FUNCTION pg_temp.l_temp(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$ SELECT $$;
SELECT regexp_replace(try($$SELECT mqtt_emit.listen('item', 'pg_temp.l_temp(mqtt_emit.event)')$$), 'pg_temp_[0-9]+', 'pg_temp_N') AS try;
SELECT try($$SELECT mqtt_emit.listen('item', 'l_default(mqtt_emit.event)', filter => jsonb_build_object('k', repeat('x', 5000)))$$);
SELECT try($$SELECT mqtt_emit.listen('item', 'l_default(mqtt_emit.event)', operations => array_fill('create'::text, ARRAY[17]))$$);
SELECT set_config('search_path', repeat('s,', 600) || 'public', false) IS NOT NULL AS long_path;
SELECT try($$SELECT mqtt_emit.listen('item', 'l_default(mqtt_emit.event)')$$);
RESET search_path;

-- privileges: a role needs EXECUTE, sees only its own listeners, and its
-- listener runs as itself
CREATE FUNCTION l_private(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who) VALUES ('private'); END $$;
REVOKE EXECUTE ON FUNCTION l_private(mqtt_emit.event) FROM PUBLIC;
CREATE TABLE secrets (v text);
INSERT INTO secrets VALUES ('top secret');
REVOKE ALL ON secrets FROM PUBLIC;
CREATE FUNCTION l_snoop(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, id) SELECT 'snoop:' || current_user, v FROM public.secrets; END $$;
CREATE FUNCTION l_whoami(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, id) VALUES ('whoami:' || (e.result->>'id'), current_user); END $$;

SET ROLE regress_mqtt_plain;
SELECT try($$SELECT mqtt_emit.listen('item', 'l_private(mqtt_emit.event)')$$);
SELECT count(*) AS visible_listeners FROM mqtt_emit.listeners;
SELECT mqtt_emit.listen('item', 'l_snoop(mqtt_emit.event)') AS id_snoop \gset
SELECT mqtt_emit.listen('item', 'l_whoami(mqtt_emit.event)') AS id_whoami \gset
SELECT count(*) AS visible_listeners FROM mqtt_emit.listeners;
-- the registry is written through listen() and unlisten() only
SELECT try($$INSERT INTO mqtt_emit.listeners (model, listener, owner) VALUES ('item', 'l_whoami(mqtt_emit.event)', 'postgres')$$);
SELECT try($$INSERT INTO mqtt_emit.listeners (model, listener) VALUES ('item', 'not_a_listener(int)')$$);
SELECT try($$UPDATE mqtt_emit.listeners SET listener = 'not_a_listener(int)'$$);
SELECT try($$DELETE FROM mqtt_emit.listeners WHERE owner <> current_user::regrole$$);
SELECT try($$LOCK TABLE mqtt_emit.listeners IN ACCESS EXCLUSIVE MODE$$);
SELECT try($$SELECT mqtt_emit._listeners_changed()$$);
SELECT try($$SELECT mqtt_emit.unlisten(1)$$);
-- allow_remote is a right superusers grant
SELECT try($$SELECT mqtt_emit.listen('item', 'l_whoami(mqtt_emit.event)', allow_remote => true)$$);
SELECT count(*) AS visible_subscriptions FROM mqtt_emit.subscriptions;
RESET ROLE;

-- the role may not read item: its listeners get none of item's rows
INSERT INTO item VALUES (3, 'active', 's3');
SELECT wait_until('SELECT count(*) = 1 FROM calls WHERE who = ''default'' AND id = ''3''') AS dispatched;
GRANT SELECT ON item TO regress_mqtt_plain;
INSERT INTO item VALUES (4, 'active', 's4');
SELECT wait_until('SELECT count(*) FILTER (WHERE who LIKE ''whoami%'') = 1 FROM calls') AS arrived;
SELECT who, id FROM calls WHERE who LIKE 'whoami%' OR who = 'private' OR who LIKE 'snoop%' ORDER BY who;
SELECT mqtt_emit.unlisten(:id_snoop);
SELECT mqtt_emit.unlisten(:id_whoami);

-- removing the last remote listeners removes the subscription
SELECT count(mqtt_emit.unlisten(id)) AS removed FROM mqtt_emit.listeners WHERE allow_remote;
SELECT wait_until('SELECT subscriptions = 0 FROM mqtt_emit.stats') AS unsubscribed;
SELECT count(*) AS subscriptions FROM mqtt_emit.subscriptions;
