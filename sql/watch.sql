-- watch / unwatch: options, the registry view, errors
\set VERBOSITY terse
CREATE SCHEMA app;
CREATE TABLE "user" (id serial PRIMARY KEY, name text, password_hash text);
CREATE TABLE app."Order" (id int PRIMARY KEY, total numeric);
CREATE TABLE nopk (a int, b text);
CREATE VIEW user_view AS SELECT * FROM "user";

SELECT mqtt_emit.watch('"user"', exclude_columns => '{password_hash}');
SELECT mqtt_emit.watch('app."Order"', operations => '{create,delete}', model => 'order');
SELECT mqtt_emit.watch('nopk', emit => false, columns => '{b}');
SELECT * FROM mqtt_emit.watched_tables ORDER BY table_name::text;

-- watching again changes the settings
SELECT mqtt_emit.watch('nopk', operations => '{UPDATE}');
SELECT * FROM mqtt_emit.watched_tables WHERE table_name = 'nopk'::regclass;

-- a renamed excluded column stays excluded
ALTER TABLE "user" RENAME COLUMN password_hash TO pw;
SELECT exclude_columns FROM mqtt_emit.watched_tables WHERE table_name = '"user"'::regclass;

-- errors
SELECT try($$SELECT mqtt_emit.watch('user_view')$$);
SELECT try($$SELECT mqtt_emit.watch('no_such_table')$$);
SELECT try($$SELECT mqtt_emit.watch('"user"', operations => '{insert,truncate}')$$);
SELECT try($$SELECT mqtt_emit.watch('"user"', operations => '{}')$$);
SELECT try($$SELECT mqtt_emit.watch('"user"', columns => '{id,nope}')$$);
SELECT try($$SELECT mqtt_emit.watch('"user"', exclude_columns => '{nope}')$$);
SELECT try($$SELECT mqtt_emit.watch('"user"', columns => '{id}', exclude_columns => '{name}')$$);
SELECT try($$SELECT mqtt_emit.watch('"user"', model => '')$$);
SELECT try($$SELECT mqtt_emit.watch(NULL)$$);
SELECT try($$SELECT mqtt_emit.unwatch('user_view')$$);
SELECT try($$SELECT mqtt_emit.capture()$$);

-- only the owner may watch
CREATE ROLE regress_mqtt_other LOGIN;
GRANT USAGE, CREATE ON SCHEMA app TO regress_mqtt_other;
GRANT ALL ON "user" TO regress_mqtt_other;
SET ROLE regress_mqtt_other;
SELECT try($$SELECT mqtt_emit.watch('"user"')$$);
SELECT try($$SELECT mqtt_emit.unwatch('"user"')$$);
CREATE TABLE app.mine (id int PRIMARY KEY);
SELECT mqtt_emit.watch('app.mine');
SELECT table_name, model FROM mqtt_emit.watched_tables WHERE table_name = 'app.mine'::regclass;
SELECT mqtt_emit.unwatch('app.mine');
DROP TABLE app.mine;
RESET ROLE;

-- unwatch
SELECT mqtt_emit.unwatch('nopk');
SELECT try($$SELECT mqtt_emit.unwatch('nopk')$$);
SELECT table_name FROM mqtt_emit.watched_tables ORDER BY 1;

-- dropping a watched table drops its registration with it
DROP TABLE app."Order";
SELECT table_name FROM mqtt_emit.watched_tables ORDER BY 1;
