-- columns: column lists are names, through dropped columns, renames,
-- partitions with other column numbers, and 0.1.0's numbered triggers
\set VERBOSITY terse
CREATE TABLE acct (id int PRIMARY KEY, gone text, name text, password_hash text, note text);
ALTER TABLE acct DROP COLUMN gone;
SELECT mqtt_emit.watch('acct', exclude_columns => '{password_hash}');
CREATE TABLE ord (id int PRIMARY KEY, gone int, total numeric, note text);
ALTER TABLE ord DROP COLUMN gone;
SELECT mqtt_emit.watch('ord', columns => '{id,total}');
-- the trigger arguments name the columns: what pg_dump writes restores
-- to the same columns whatever numbers they get there
SELECT tgrelid::regclass AS tbl, mqtt_emit._trigger_args(tgargs, tgnargs) AS args
  FROM pg_trigger WHERE tgname = 'mqtt_emit_capture'
   AND tgrelid IN ('acct'::regclass, 'ord'::regclass) ORDER BY 1::text;
TRUNCATE seen;
SELECT mqtt_emit.listen('acct', 'record_event(mqtt_emit.event)') > 0 AS listening;
SELECT mqtt_emit.listen('ord', 'record_event(mqtt_emit.event)') > 0 AS listening;
INSERT INTO acct VALUES (1, 'alice', 'SECRET-HASH', 'n1');
INSERT INTO ord VALUES (1, 9.5, 'n1');
SELECT wait_until('SELECT count(*) = 2 FROM seen') AS arrived;
SELECT model, result FROM seen ORDER BY n;

-- a rename is followed: the arguments carry the new name
ALTER TABLE acct RENAME COLUMN password_hash TO pw;
ALTER TABLE ord RENAME COLUMN total TO amount;
SELECT table_name, columns, exclude_columns FROM mqtt_emit.watched_tables
 WHERE table_name IN ('acct'::regclass, 'ord'::regclass) ORDER BY 1::text;
-- renaming an unlisted column changes nothing; a disabled trigger stays disabled
ALTER TABLE ord RENAME COLUMN note TO remark;
ALTER TABLE ord DISABLE TRIGGER mqtt_emit_capture;
ALTER TABLE ord RENAME COLUMN amount TO total;
SELECT enabled, columns FROM mqtt_emit.watched_tables WHERE table_name = 'ord'::regclass;
ALTER TABLE ord ENABLE TRIGGER mqtt_emit_capture;
TRUNCATE seen;
INSERT INTO acct VALUES (2, 'bob', 'SECRET-2', 'n2');
INSERT INTO ord VALUES (2, 7, 'n2');
SELECT wait_until('SELECT count(*) = 2 FROM seen') AS arrived;
SELECT model, result FROM seen ORDER BY n;

-- a dropped included column leaves the output; a dropped excluded column
-- hides nothing; a new column of an excluded name is excluded
TRUNCATE seen;
ALTER TABLE ord DROP COLUMN total;
ALTER TABLE acct DROP COLUMN pw;
INSERT INTO ord VALUES (3, 'n3');
INSERT INTO acct VALUES (3, 'carol', 'n3');
ALTER TABLE acct ADD COLUMN pw text;
INSERT INTO acct VALUES (4, 'dave', 'n4', 'NEW-SECRET');
SELECT wait_until('SELECT count(*) = 3 FROM seen') AS arrived;
SELECT model, result FROM seen ORDER BY n;
SELECT table_name, columns, exclude_columns FROM mqtt_emit.watched_tables
 WHERE table_name IN ('acct'::regclass, 'ord'::regclass) ORDER BY 1::text;

-- a partition numbers its columns differently: names resolve in each
CREATE TABLE parted (id int, secret text, v text) PARTITION BY RANGE (id);
CREATE TABLE parted_1 (junk int, v text, secret text, id int);
ALTER TABLE parted_1 DROP COLUMN junk;
ALTER TABLE parted ATTACH PARTITION parted_1 FOR VALUES FROM (0) TO (100);
SELECT mqtt_emit.watch('parted', exclude_columns => '{secret}');
SELECT mqtt_emit.listen('parted', 'record_event(mqtt_emit.event)') > 0 AS listening;
TRUNCATE seen;
INSERT INTO parted VALUES (1, 's1', 'v1');
ALTER TABLE parted RENAME COLUMN secret TO hidden;
INSERT INTO parted VALUES (2, 's2', 'v2');
SELECT wait_until('SELECT count(*) = 2 FROM seen') AS arrived;
SELECT model, result FROM seen ORDER BY n;

-- a trigger made by 0.1.0 lists column numbers; it still works
CREATE TABLE legacy (id int PRIMARY KEY, gone int, secret text, v text);
ALTER TABLE legacy DROP COLUMN gone;
CREATE TRIGGER mqtt_emit_capture AFTER INSERT ON legacy FOR EACH ROW
    EXECUTE FUNCTION mqtt_emit.capture('legacy', 'true', 'exclude', '3');
-- a trigger made by hand captures only under a model bound to its table's owner
INSERT INTO mqtt_emit.models VALUES ('legacy', current_user::regrole);
SELECT exclude_columns FROM mqtt_emit.watched_tables WHERE table_name = 'legacy'::regclass;
SELECT mqtt_emit.listen('legacy', 'record_event(mqtt_emit.event)') > 0 AS listening;
TRUNCATE seen;
INSERT INTO legacy VALUES (1, 'hidden', 'shown');
SELECT wait_until('SELECT count(*) = 1 FROM seen') AS arrived;
SELECT model, result FROM seen ORDER BY n;

-- a trigger with an unknown column mode fails the statement
CREATE TABLE badmode (id int);
CREATE TRIGGER mqtt_emit_capture AFTER INSERT ON badmode FOR EACH ROW
    EXECUTE FUNCTION mqtt_emit.capture('badmode', 'true', 'sometimes', 'id');
SELECT try($$INSERT INTO badmode VALUES (1)$$);
DROP TABLE badmode, legacy, parted, acct, ord;
DELETE FROM mqtt_emit.listeners WHERE model IN ('acct', 'ord', 'parted', 'legacy');
