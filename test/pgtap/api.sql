-- API contracts of pg_mqtt_emit: objects, signatures, privileges, errors.
BEGIN;
SELECT plan(93);

CREATE EXTENSION IF NOT EXISTS pg_mqtt_emit;

SELECT has_schema('mqtt_emit');
SELECT has_function('mqtt_emit', 'watch', ARRAY['regclass', 'boolean', 'text[]', 'text', 'text[]', 'text[]', 'boolean', 'boolean']);
SELECT has_function('mqtt_emit', 'unwatch', ARRAY['regclass']);
SELECT has_function('mqtt_emit', 'listen', ARRAY['text', 'regprocedure', 'boolean', 'boolean', 'jsonb', 'text[]', 'text']);
SELECT has_function('mqtt_emit', 'unlisten', ARRAY['bigint']);
SELECT has_function('mqtt_emit', 'publish', ARRAY['text', 'text', 'integer', 'boolean', 'jsonb']);
SELECT has_function('mqtt_emit', 'publish', ARRAY['text', 'jsonb', 'integer', 'boolean', 'jsonb']);
SELECT function_returns('mqtt_emit', 'listen', ARRAY['text', 'regprocedure', 'boolean', 'boolean', 'jsonb', 'text[]', 'text'], 'bigint');
SELECT has_type('mqtt_emit', 'event', 'type mqtt_emit.event exists');
SELECT columns_are('mqtt_emit', 'event', ARRAY['event_id', 'model', 'operation', 'source', 'result',
                                                'old', 'args', 'origin', 'emitted_at', 'topic', 'payload']);
SELECT has_view('mqtt_emit', 'stats', 'view mqtt_emit.stats exists');
SELECT has_view('mqtt_emit', 'watched_tables', 'view mqtt_emit.watched_tables exists');
SELECT has_view('mqtt_emit', 'subscriptions', 'view mqtt_emit.subscriptions exists');
SELECT columns_are('mqtt_emit', 'subscriptions',
                   ARRAY['topic_filter', 'state', 'granted_qos', 'reason', 'since']);
SELECT col_type_is('mqtt_emit', 'subscriptions', 'since', 'timestamp with time zone',
                   'subscriptions.since is a timestamptz');
SELECT has_table('mqtt_emit', 'listeners', 'table mqtt_emit.listeners exists');
SELECT has_table('mqtt_emit', 'outbox', 'table mqtt_emit.outbox exists');
SELECT has_table('mqtt_emit', 'dead_letters', 'table mqtt_emit.dead_letters exists');
SELECT has_column('mqtt_emit', 'stats', col, 'stats has ' || col)
  FROM unnest(ARRAY['connected', 'published', 'failed', 'queued', 'in_outbox', 'received',
                    'deduplicated', 'rejected', 'listener_calls', 'listener_errors', 'last_error',
                    'stats_reset', 'oldest_waiting_seconds']) AS col;
SELECT col_type_is('mqtt_emit', 'stats', 'oldest_waiting_seconds', 'double precision',
                   'ages are seconds (double precision)');
SELECT col_type_is('mqtt_emit', 'stats', 'stats_reset', 'timestamp with time zone',
                   'stats_reset is a timestamptz');
SELECT has_function('mqtt_emit', 'stats_reset', ARRAY[]::text[]);
SELECT function_returns('mqtt_emit', 'stats_reset', ARRAY[]::text[], 'void');
SELECT is((SELECT extversion FROM pg_extension WHERE extname = 'pg_mqtt_emit'), '0.2.0',
          'the default version is 0.2.0');
SELECT is((SELECT evtenabled::text || ' ' || evtevent || ' ' || evttags::text FROM pg_event_trigger
            WHERE evtname = 'mqtt_emit_follow_renames'), 'O ddl_command_end {"ALTER TABLE"}',
          'the rename-following event trigger fires at the end of ALTER TABLE');
SELECT trigger_is('mqtt_emit', 'listeners', 'registry_changed', 'mqtt_emit', '_registry_changed',
                  'every change of the registry notifies the worker');

-- privileges
CREATE ROLE tap_plain;
SELECT ok(NOT has_function_privilege('tap_plain', 'mqtt_emit.publish(text,text,integer,boolean,jsonb)', 'EXECUTE'),
          'publish(text) is not granted to PUBLIC');
SELECT ok(NOT has_function_privilege('tap_plain', 'mqtt_emit.publish(text,jsonb,integer,boolean,jsonb)', 'EXECUTE'),
          'publish(jsonb) is not granted to PUBLIC');
SELECT ok(NOT has_table_privilege('tap_plain', 'mqtt_emit.outbox', 'SELECT'), 'outbox is not readable by PUBLIC');
SELECT ok(NOT has_table_privilege('tap_plain', 'mqtt_emit.dead_letters', 'SELECT'), 'dead_letters is not readable by PUBLIC');
SELECT ok(NOT has_table_privilege('tap_plain', 'mqtt_emit.stats', 'SELECT'), 'stats is not readable by PUBLIC');
SELECT ok(has_table_privilege('pg_monitor', 'mqtt_emit.stats', 'SELECT'), 'stats is readable by pg_monitor');
SELECT ok(has_function_privilege('tap_plain', 'mqtt_emit._subscription_states(text[])', 'EXECUTE'),
          '_subscription_states(text[]) is callable by PUBLIC (the view runs it as the caller)');
SELECT ok(NOT has_function_privilege('tap_plain', 'mqtt_emit.stats_reset()', 'EXECUTE'),
          'stats_reset() is not granted to PUBLIC');
SELECT ok(has_function_privilege('tap_plain', 'mqtt_emit.listen(text,regprocedure,boolean,boolean,jsonb,text[],text)', 'EXECUTE'),
          'listen is callable by any role (it runs as the caller)');
SELECT ok((SELECT relrowsecurity FROM pg_class WHERE oid = 'mqtt_emit.listeners'::regclass),
          'row security on mqtt_emit.listeners');

-- errors with their SQLSTATEs
CREATE TABLE tap_t (id int PRIMARY KEY, secret text);
CREATE VIEW tap_v AS SELECT 1 AS x;
CREATE FUNCTION tap_listener(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION tap_not_listener(x int) RETURNS void LANGUAGE sql AS $$ SELECT $$;
SELECT throws_ok($$SELECT mqtt_emit.watch('tap_v')$$, '42809');
SELECT throws_ok($$SELECT mqtt_emit.watch('tap_t', operations => '{truncate}')$$, '22023');
SELECT throws_ok($$SELECT mqtt_emit.watch('tap_t', columns => '{nope}')$$, '42703');
SELECT throws_ok($$SELECT mqtt_emit.unwatch('tap_t')$$, '42704');
SELECT lives_ok($$SELECT mqtt_emit.watch('tap_t', exclude_columns => '{secret}')$$, 'owner can watch');
SELECT is((SELECT exclude_columns FROM mqtt_emit.watched_tables WHERE table_name = 'tap_t'::regclass),
          ARRAY['secret'], 'watched_tables shows the exclusion');
-- retain_last: a key is needed, published, with emit and all operations
CREATE TABLE tap_nokey (a int, b text);
SELECT throws_ok($$SELECT mqtt_emit.watch('tap_nokey', retain_last => true)$$, '55000',
                 'cannot keep the retained state of table public.tap_nokey', 'retain_last without a key: 55000');
SELECT throws_ok($$SELECT mqtt_emit.watch('tap_t', exclude_columns => '{id}', retain_last => true)$$, '22023',
                 'key column "id" of table public.tap_t is not published', 'retain_last with an excluded key column: 22023');
SELECT throws_ok($$SELECT mqtt_emit.watch('tap_t', emit => false, retain_last => true)$$, '22023',
                 'retain_last needs emit', 'retain_last without emit: 22023');
SELECT throws_ok($$SELECT mqtt_emit.watch('tap_t', operations => '{insert,update}', retain_last => true)$$, '22023',
                 'retain_last needs the operations insert, update and delete', 'retain_last without delete: 22023');
SELECT is((SELECT retain_last FROM mqtt_emit.watched_tables WHERE table_name = 'tap_t'::regclass),
          false, 'a failed watch() leaves the settings');
SELECT lives_ok($$SELECT mqtt_emit.watch('tap_t', exclude_columns => '{secret}', retain_last => true)$$,
                'watch with retain_last');
SELECT is((SELECT retain_last FROM mqtt_emit.watched_tables WHERE table_name = 'tap_t'::regclass),
          true, 'watched_tables shows retain_last');
SELECT col_type_is('mqtt_emit', 'watched_tables', 'retain_last', 'boolean', 'watched_tables.retain_last is boolean');
SELECT throws_ok($$SELECT mqtt_emit.listen('tap', 'tap_not_listener(int)')$$, '42P13');
SELECT throws_ok($$SELECT mqtt_emit.listen('tap', 'tap_listener(mqtt_emit.event)', remote_only => true)$$, '22023');
SELECT throws_ok($$SELECT mqtt_emit.listen('tap', 'tap_listener(mqtt_emit.event)', filter => '"x"')$$, '22023');
SELECT throws_ok($$SELECT mqtt_emit.unlisten(-42)$$, '42704');
SELECT throws_ok($$SELECT mqtt_emit.publish('a/#', 'x')$$, '22023');

GRANT ALL ON tap_t TO tap_plain;
SET LOCAL ROLE tap_plain;
SELECT throws_ok($$SELECT mqtt_emit.watch('tap_t')$$, '42501');
SELECT throws_ok($$SELECT mqtt_emit.publish('a/b', 'x')$$, '42501');
RESET ROLE;

-- subscriptions to any topic
SELECT has_function('mqtt_emit', 'subscribe', ARRAY['text', 'regprocedure', 'integer', 'text']);
SELECT has_function('mqtt_emit', 'unsubscribe', ARRAY['bigint']);
SELECT has_function('mqtt_emit', 'payload_text', ARRAY['bytea']);
SELECT has_function('mqtt_emit', 'payload_jsonb', ARRAY['bytea']);
SELECT function_returns('mqtt_emit', 'subscribe', ARRAY['text', 'regprocedure', 'integer', 'text'], 'bigint');
SELECT trigger_is('mqtt_emit', 'handlers', 'registry_changed', 'mqtt_emit', '_registry_changed',
                  'every change of the handler registry notifies the workers');
SELECT ok(has_function_privilege('tap_plain', 'mqtt_emit.subscribe(text,regprocedure,integer,text)', 'EXECUTE'),
          'subscribe is callable by any role (it checks the right itself)');
SELECT ok((SELECT relrowsecurity FROM pg_class WHERE oid = 'mqtt_emit.handlers'::regclass),
          'row security on mqtt_emit.handlers');
SELECT ok(NOT has_table_privilege('tap_plain', 'mqtt_emit.handlers', 'INSERT'),
          'mqtt_emit.handlers is not writable by PUBLIC');
CREATE FUNCTION tap_handler(topic text, payload bytea) RETURNS void LANGUAGE sql AS $$ SELECT $$;
SELECT throws_ok($$SELECT mqtt_emit.subscribe('a/b+', 'tap_handler(text, bytea)')$$, '22023');
SELECT throws_ok($$SELECT mqtt_emit.subscribe('#', 'tap_handler(text, bytea)')$$, '22023');
SELECT throws_ok($$SELECT mqtt_emit.subscribe('a/#', 'tap_listener(mqtt_emit.event)')$$, '42P13');
SELECT lives_ok($$SELECT mqtt_emit.subscribe('tap/+/x', 'tap_handler(text, bytea)')$$, 'superuser subscribes');
SELECT is(mqtt_emit.unsubscribe(-42), false, 'unsubscribe of no subscription');
SELECT throws_ok($$SELECT mqtt_emit.payload_text('\xff')$$, '22021');
SELECT is(mqtt_emit.payload_jsonb('{"a": 1}'::bytea), '{"a": 1}'::jsonb, 'payload_jsonb');
SET LOCAL ROLE tap_plain;
SELECT throws_ok($$SELECT mqtt_emit.subscribe('a/b', 'tap_handler(text, bytea)')$$, '42501');
RESET ROLE;

-- share groups (the regress and pgTAP clusters speak MQTT 3.1.1)
SELECT has_column('mqtt_emit', 'listeners', 'share_group', 'mqtt_emit.listeners.share_group');
SELECT has_column('mqtt_emit', 'handlers', 'share_group', 'mqtt_emit.handlers.share_group');
SELECT throws_ok($$SELECT mqtt_emit.listen('tap', 'tap_listener(mqtt_emit.event)', allow_remote => true, share_group => 'a/b')$$,
                 '22023', NULL, 'a share group name with "/" is refused');
SELECT throws_ok($$SELECT mqtt_emit.listen('tap', 'tap_listener(mqtt_emit.event)', share_group => 'pool')$$,
                 '22023', NULL, 'a share group needs allow_remote');
SELECT throws_ok($$SELECT mqtt_emit.listen('tap', 'tap_listener(mqtt_emit.event)', allow_remote => true, share_group => 'pool')$$,
                 '0A000', NULL, 'share groups need MQTT 5');
SELECT throws_ok($$SELECT mqtt_emit.subscribe('tap/#', 'tap_handler(text, bytea)', share_group => '')$$,
                 '22023', NULL, 'an empty share group name is refused');
SELECT throws_ok($$SELECT mqtt_emit.subscribe('tap/#', 'tap_handler(text, bytea)', share_group => 'pool')$$,
                 '0A000', NULL, 'share groups of handlers need MQTT 5');

SELECT * FROM finish();
ROLLBACK;
