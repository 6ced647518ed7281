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

-- retain_last: one retained message per row key (topics: test/t/071)
CREATE TABLE st (id int, site text, secret text, v int, PRIMARY KEY (site, id));
CREATE TABLE st_ri (a int NOT NULL, b text);
CREATE UNIQUE INDEX st_ri_a ON st_ri (a);
ALTER TABLE st_ri REPLICA IDENTITY USING INDEX st_ri_a;
CREATE TABLE st_uq (a int NOT NULL UNIQUE, b text);
SELECT mqtt_emit.watch('st', exclude_columns => '{secret}', retain_last => true);
SELECT mqtt_emit.watch('st_ri', retain_last => true);
SELECT table_name, emit, operations, exclude_columns, retain_last
  FROM mqtt_emit.watched_tables WHERE table_name::text LIKE 'st%' ORDER BY 1::text;
-- kept in the trigger's arguments, which pg_dump writes
SELECT mqtt_emit._trigger_args(tgargs, tgnargs) FROM pg_trigger
 WHERE tgrelid = 'st'::regclass AND tgname = 'mqtt_emit_capture';
-- no key: neither a primary key nor a replica identity index (a unique
-- index alone is not a key; nor is REPLICA IDENTITY FULL)
SELECT try($$SELECT mqtt_emit.watch('nopk', retain_last => true)$$);
SELECT try($$SELECT mqtt_emit.watch('st_uq', retain_last => true)$$);
ALTER TABLE st_uq REPLICA IDENTITY FULL;
SELECT try($$SELECT mqtt_emit.watch('st_uq', retain_last => true)$$);
-- a key column must be published: the topic shows its value
SELECT try($$SELECT mqtt_emit.watch('st', exclude_columns => '{id}', retain_last => true)$$);
SELECT try($$SELECT mqtt_emit.watch('st', columns => '{id,v}', retain_last => true)$$);
SELECT try($$SELECT mqtt_emit.watch('st', columns => '{site,id}', retain_last => true)$$);
-- it needs emit and all three operations
SELECT try($$SELECT mqtt_emit.watch('st', emit => false, retain_last => true)$$);
SELECT try($$SELECT mqtt_emit.watch('st', operations => '{insert,update}', retain_last => true)$$);
-- watching again without it turns it off; NULL is false
SELECT mqtt_emit.watch('st_ri');
SELECT mqtt_emit.watch('st_uq', retain_last => NULL);
SELECT table_name, retain_last FROM mqtt_emit.watched_tables
 WHERE table_name::text LIKE 'st%' ORDER BY 1::text;
-- the key gone after watch(): a change fails rather than keep a wrong state
SELECT mqtt_emit.watch('st', exclude_columns => '{secret}', retain_last => true);
ALTER TABLE st DROP CONSTRAINT st_pkey;
SELECT try($$INSERT INTO st VALUES (1, 'north', 's', 1)$$);
-- ... unless nothing is published
SET mqtt_emit.emit_remote = off;
INSERT INTO st VALUES (1, 'north', 's', 1);
RESET mqtt_emit.emit_remote;
-- a key on an excluded column
ALTER TABLE st ADD PRIMARY KEY (secret);
SELECT try($$UPDATE st SET v = 2$$);
ALTER TABLE st DROP CONSTRAINT st_pkey, ADD PRIMARY KEY (site, id);
UPDATE st SET v = 2;
-- a capture trigger written by hand with an unknown publish setting
CREATE TABLE st_bad (id int PRIMARY KEY);
CREATE TRIGGER mqtt_emit_capture AFTER INSERT ON st_bad FOR EACH ROW
    EXECUTE FUNCTION mqtt_emit.capture('st_bad', 'retain', 'all');
SELECT try($$INSERT INTO st_bad VALUES (1)$$);
DROP TABLE st, st_ri, st_uq, st_bad;

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
