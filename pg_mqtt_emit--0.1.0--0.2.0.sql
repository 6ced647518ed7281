/* pg_mqtt_emit--0.1.0--0.2.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION pg_mqtt_emit UPDATE TO '0.2.0'" to load this file. \quit

------------------------------------------------------------------------
-- Column lists by name (they survive pg_dump and follow renames)
------------------------------------------------------------------------

-- Installs (or replaces) the capture trigger of a table; watch(), the
-- rename event trigger and the 0.1.0 upgrade go through here.  enabled is
-- pg_trigger.tgenabled ('O' as created, 'D' disabled, 'R' replica, 'A'
-- always), kept across the replacement.
CREATE FUNCTION mqtt_emit._set_capture_trigger(
    tbl regclass, ops text[], args text[], enabled "char" DEFAULT 'O')
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('CREATE OR REPLACE TRIGGER mqtt_emit_capture AFTER %s ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION mqtt_emit.capture(%s)',
                   (SELECT string_agg(upper(o), ' OR ') FROM unnest(ops) AS o),
                   tbl,
                   (SELECT string_agg(quote_literal(a), ', ' ORDER BY n)
                      FROM unnest(args) WITH ORDINALITY AS x(a, n)));
    IF enabled IS DISTINCT FROM 'O' THEN
        EXECUTE format('ALTER TABLE %s %s TRIGGER mqtt_emit_capture', tbl,
                       CASE enabled WHEN 'D' THEN 'DISABLE' WHEN 'R' THEN 'ENABLE REPLICA'
                                    ELSE 'ENABLE ALWAYS' END);
    END IF;
END
$$;

-- Model names are owned (README, "Security"): a model is bound to the
-- roles whose tables may publish under it.  watch() binds a free name to
-- the table's owner; the capture trigger checks, whoever wrote it, that
-- its table's owner has the privileges of a role bound to its model.
-- model is the name with ASCII letters in lower case (models match
-- case-insensitively).  An extension configuration table: pg_dump carries
-- the bindings along with the triggers.
CREATE TABLE mqtt_emit.models (
    model  text NOT NULL,
    owner  regrole NOT NULL,
    PRIMARY KEY (model, owner)
);
COMMENT ON TABLE mqtt_emit.models IS
'Model names and the roles whose tables may publish under them';
SELECT pg_catalog.pg_extension_config_dump('mqtt_emit.models', '');
REVOKE ALL ON mqtt_emit.models FROM PUBLIC;
GRANT SELECT ON mqtt_emit.models TO PUBLIC;

-- Backends cache what the capture trigger of a table may do; any change
-- of the bindings makes them look again (at commit).
CREATE FUNCTION mqtt_emit._models_changed()
RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'mqtt_emit_models_changed';
CREATE TRIGGER models_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON mqtt_emit.models
    FOR EACH STATEMENT EXECUTE FUNCTION mqtt_emit._models_changed();

-- Binds the model of a table's capture trigger to the table's owner, or
-- checks that it is bound to a role whose privileges the owner has.  A
-- binding lapses once no table watched under the model belongs to a role
-- with its privileges (the tables were unwatched or dropped); lapsed
-- bindings of the name are removed here.  Called by watch() after it has
-- checked that the caller may watch the table; SECURITY DEFINER since only
-- this function writes mqtt_emit.models for ordinary roles.  Whoever calls
-- it directly can bind only what a capture trigger already names, to the
-- owner of that trigger's table, as watch() would.
CREATE FUNCTION mqtt_emit._bind_model(tbl regclass)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m text;
    k text;
    towner oid;
    persistence "char";
    holder text;
BEGIN
    SELECT a[1], c.relowner, c.relpersistence INTO m, towner, persistence
      FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid,
           LATERAL mqtt_emit._trigger_args(t.tgargs, t.tgnargs) AS a
     WHERE t.tgrelid = tbl AND t.tgname = 'mqtt_emit_capture'
       AND t.tgfoid = 'mqtt_emit.capture()'::regprocedure;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not watched', tbl
            USING ERRCODE = 'undefined_object';
    END IF;
    IF persistence = 't' THEN
        RAISE EXCEPTION 'cannot watch temporary table %', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Watch a permanent table.';
    END IF;
    k := translate(m, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz');
    DELETE FROM mqtt_emit.models b
     WHERE b.model = k
       AND NOT EXISTS (
           SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid,
                  LATERAL mqtt_emit._trigger_args(t.tgargs, t.tgnargs) AS a
            WHERE t.tgfoid = 'mqtt_emit.capture()'::regprocedure
              AND NOT t.tgisinternal AND t.tgparentid = 0
              AND translate(a[1], 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') = k
              AND pg_has_role(c.relowner, b.owner, 'USAGE'));
    IF EXISTS (SELECT 1 FROM mqtt_emit.models b
                WHERE b.model = k AND pg_has_role(towner, b.owner, 'USAGE')) THEN
        RETURN;
    END IF;
    SELECT string_agg(b.owner::text, ', ' ORDER BY b.owner::text) INTO holder
      FROM mqtt_emit.models b WHERE b.model = k;
    IF holder IS NOT NULL THEN
        RAISE EXCEPTION 'model "%" belongs to another role', m
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('Tables of role %s are watched under this name; the owner of table %s, role %s, does not have its privileges.',
                                  holder, tbl, towner::regrole),
                  HINT = 'Watch the table under a model name of its own, or have a superuser watch it under this one.';
    END IF;
    INSERT INTO mqtt_emit.models VALUES (k, towner::regrole);
END
$$;
REVOKE ALL ON FUNCTION mqtt_emit._bind_model(regclass) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mqtt_emit._bind_model(regclass) TO PUBLIC;

-- 0.2.0 adds retain_last: a new signature, so the old function goes (and
-- with it any GRANT or REVOKE on it; PUBLIC may EXECUTE the new one).
DROP FUNCTION mqtt_emit.watch(regclass, boolean, text[], text, text[], text[]);
-- retain_last (README, "Retained state"): the table also keeps one retained
-- message per row on <prefix>/<model>/state/<key> (src/capture.c).  The
-- setting is kept in the capture trigger's second argument, 'retain_last'
-- where it is otherwise 'true' or 'false' (emit), so that pg_dump carries
-- it as it carries the other settings.  It needs emit, all three
-- operations (else the retained state would go stale), and a key: the
-- primary key, else the replica identity index, whose columns must be
-- published (the topic shows their values).
--
-- batch (README, "Batched messages"): instead of one message per row, the
-- table's events of a transaction go out as one message (in parts of at
-- most mqtt_emit.batch_max_bytes) on <batch_topic_prefix>/<model>/batch,
-- a topic no subscriber of the events receives (src/pending.c).  Kept as
-- 'batch' in the same second argument; it needs emit and excludes
-- retain_last, whose state messages follow each row's event.
CREATE FUNCTION mqtt_emit.watch(
    tbl regclass,
    emit boolean DEFAULT true,
    operations text[] DEFAULT '{insert,update,delete}',
    model text DEFAULT NULL,
    columns text[] DEFAULT NULL,
    exclude_columns text[] DEFAULT NULL,
    retain_last boolean DEFAULT false,
    batch boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    ops text[] := '{}';
    op text;
    col text;
    names text[] := '{}';
    mode text := 'all';
    m text;
    keyidx oid;
    keycol text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'table must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.relkind, c.relowner, c.relname, c.relpersistence, c.relreplident
      INTO r FROM pg_class c WHERE c.oid = tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'relation with OID % does not exist', tbl::oid
            USING ERRCODE = 'undefined_table';
    END IF;
    IF r.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cannot watch "%"', tbl
            USING ERRCODE = 'wrong_object_type',
                  DETAIL = format('"%s" is not a table.', tbl),
                  HINT = 'Only ordinary and partitioned tables can be watched.';
    END IF;
    IF NOT pg_has_role(current_user, r.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table %', tbl
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only the owner of a table (or a member of its owning role) can watch it.';
    END IF;
    -- a temporary table could publish under any name for the length of a
    -- session, and no other session can see it
    IF r.relpersistence = 't' THEN
        RAISE EXCEPTION 'cannot watch temporary table %', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Watch a permanent table.';
    END IF;

    IF operations IS NULL OR cardinality(operations) = 0 THEN
        RAISE EXCEPTION 'operations must name at least one operation'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use some of insert (or create), update and delete.';
    END IF;
    FOREACH op IN ARRAY operations LOOP
        op := lower(op);
        IF op = 'create' THEN op := 'insert'; END IF;
        IF op IS NULL OR op NOT IN ('insert', 'update', 'delete') THEN
            RAISE EXCEPTION 'unknown operation "%"', op
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Operations are insert (or create), update and delete.';
        END IF;
        IF NOT op = ANY (ops) THEN
            ops := ops || op;
        END IF;
    END LOOP;

    IF columns IS NOT NULL AND exclude_columns IS NOT NULL THEN
        RAISE EXCEPTION 'columns and exclude_columns cannot both be given'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Column lists are kept as names: pg_dump writes the trigger's
    -- arguments as they are, and a restored table may number its columns
    -- differently.  Renames are followed by mqtt_emit_follow_renames.
    IF columns IS NOT NULL OR exclude_columns IS NOT NULL THEN
        mode := CASE WHEN columns IS NOT NULL THEN 'columns' ELSE 'exclude_columns' END;
        FOREACH col IN ARRAY coalesce(columns, exclude_columns) LOOP
            IF col IS NULL OR NOT EXISTS (
                SELECT 1 FROM pg_attribute a
                 WHERE a.attrelid = tbl AND a.attname = col
                   AND a.attnum > 0 AND NOT a.attisdropped) THEN
                RAISE EXCEPTION 'column "%" of relation "%" does not exist', col, r.relname
                    USING ERRCODE = 'undefined_column';
            END IF;
            IF NOT col = ANY (names) THEN
                names := names || col;
            END IF;
        END LOOP;
    END IF;

    m := coalesce(model, r.relname::text);
    -- MQTT's rules for UTF-8 in topics: no control characters, surrogates
    -- or noncharacters such as U+FFFF (the error names the code point)
    PERFORM mqtt_emit._check_name(m, 'model name');
    IF m = '' OR length(m) > 200 OR m ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid model name "%"', m
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A model name has 1 to 200 characters and no control characters.';
    END IF;

    -- NULL is false, as for retain_last
    IF batch THEN
        IF emit IS NOT TRUE THEN
            RAISE EXCEPTION 'batch needs emit'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'With emit => false nothing is published, in batches neither.',
                      HINT = 'Leave emit at its default (true), or batch at false.';
        END IF;
        IF retain_last THEN
            RAISE EXCEPTION 'batch and retain_last cannot both be set'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'A row''s retained state message follows its event, which a batched table does not send alone.',
                      HINT = 'Watch the table with one of them.';
        END IF;
        -- batched messages must not reach the events' subscribers
        PERFORM mqtt_emit._check_batch_prefix();
    END IF;

    IF retain_last THEN
        IF emit IS NOT TRUE THEN
            RAISE EXCEPTION 'retain_last needs emit'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'With emit => false nothing is published, the retained state neither.',
                      HINT = 'Leave emit at its default (true), or retain_last at false.';
        END IF;
        IF NOT ops @> '{insert,update,delete}' THEN
            RAISE EXCEPTION 'retain_last needs the operations insert, update and delete'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'A row''s retained state is set by its inserts and updates and cleared by its delete; without one of them it would go stale.',
                      HINT = 'Leave operations at its default.';
        END IF;
        -- the key: the primary key, else the replica identity index
        SELECT i.indexrelid INTO keyidx
          FROM pg_index i
         WHERE i.indrelid = tbl
           AND (i.indisprimary OR (i.indisreplident AND r.relreplident = 'i'))
         ORDER BY i.indisprimary DESC
         LIMIT 1;
        IF keyidx IS NULL THEN
            RAISE EXCEPTION 'cannot keep the retained state of table %', tbl
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'retain_last needs a key for each row''s state topic: the table has neither a primary key nor a replica identity index.',
                      HINT = 'Add a primary key (ALTER TABLE ... ADD PRIMARY KEY), or a replica identity index (ALTER TABLE ... REPLICA IDENTITY USING INDEX ...), or watch the table without retain_last.';
        END IF;
        FOR keycol IN
            SELECT a.attname::text
              FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
              JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.attnum
             WHERE i.indexrelid = keyidx AND k.n <= i.indnkeyatts
             ORDER BY k.n
        LOOP
            IF (mode = 'columns' AND NOT keycol = ANY (names))
               OR (mode = 'exclude_columns' AND keycol = ANY (names)) THEN
                RAISE EXCEPTION 'key column "%" of table % is not published', keycol, tbl
                    USING ERRCODE = 'invalid_parameter_value',
                          DETAIL = 'With retain_last, each row''s state topic shows the values of its key columns.',
                          HINT = 'Publish the key columns, or watch the table without retain_last.';
            END IF;
        END LOOP;
    END IF;

    PERFORM mqtt_emit._set_capture_trigger(tbl, ops,
        ARRAY[m, CASE WHEN retain_last THEN 'retain_last' WHEN batch THEN 'batch' ELSE emit::text END, mode] || names);
    -- the model must be free or already the table owner's; a superuser may
    -- bind any table to any model
    IF (SELECT a.rolsuper FROM pg_roles a WHERE a.rolname = current_user) THEN
        INSERT INTO mqtt_emit.models
        SELECT translate(m, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'),
               r.relowner::regrole
         WHERE NOT EXISTS (
               SELECT 1 FROM mqtt_emit.models b
                WHERE b.model = translate(m, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
                  AND pg_has_role(r.relowner, b.owner, 'USAGE'));
    END IF;
    PERFORM mqtt_emit._bind_model(tbl);
END
$$;
COMMENT ON FUNCTION mqtt_emit.watch(regclass, boolean, text[], text, text[], text[], boolean, boolean) IS
'Starts (or changes) capturing row changes of a table as events';

-- The registry of watched tables is the capture triggers themselves, so it
-- follows the tables through pg_dump, renames and DROP TABLE.  Triggers
-- made by 0.1.0 (modes include/exclude) list column numbers.
CREATE OR REPLACE VIEW mqtt_emit.watched_tables AS
SELECT t.tgrelid::regclass AS table_name,
       a[1] AS model,
       a[2] IN ('t', 'true', 'retain_last', 'batch') AS emit,
       ARRAY(SELECT o FROM (VALUES (1, 'insert', 4), (2, 'update', 16), (3, 'delete', 8)) v(n, o, bit)
              WHERE t.tgtype & v.bit <> 0 ORDER BY n) AS operations,
       CASE a[3] WHEN 'columns' THEN a[4:]
                 WHEN 'include' THEN
            ARRAY(SELECT att.attname::text FROM unnest(a[4:]) WITH ORDINALITY AS x(num, ord)
                    JOIN pg_attribute att ON att.attrelid = t.tgrelid AND att.attnum = x.num::int2
                   WHERE NOT att.attisdropped ORDER BY x.ord) END AS columns,
       CASE a[3] WHEN 'exclude_columns' THEN a[4:]
                 WHEN 'exclude' THEN
            ARRAY(SELECT att.attname::text FROM unnest(a[4:]) WITH ORDINALITY AS x(num, ord)
                    JOIN pg_attribute att ON att.attrelid = t.tgrelid AND att.attnum = x.num::int2
                   WHERE NOT att.attisdropped ORDER BY x.ord) END AS exclude_columns,
       NOT (t.tgenabled = 'D') AS enabled,
       a[2] = 'retain_last' AS retain_last,
       a[2] = 'batch' AS batch
  FROM pg_catalog.pg_trigger t,
       LATERAL mqtt_emit._trigger_args(t.tgargs, t.tgnargs) AS a
 WHERE t.tgfoid = 'mqtt_emit.capture()'::regprocedure
   AND NOT t.tgisinternal
   AND t.tgparentid = 0
   -- only tables the current role owns (is a member of the owner) or may
   -- read; monitoring roles (pg_read_all_stats, so pg_monitor) see all
   AND (pg_catalog.pg_has_role(current_user,
            (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = t.tgrelid), 'USAGE')
        OR pg_catalog.has_table_privilege(t.tgrelid, 'SELECT')
        OR pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE'));

-- Renaming a listed column renames it in the capture trigger's arguments
-- too, so that the column stays included or excluded, and pg_dump writes
-- its current name.
CREATE FUNCTION mqtt_emit._renamed_column(cmd pg_ddl_command,
    OUT relid oid, OUT old_name text, OUT new_name text)
RETURNS SETOF record
LANGUAGE c VOLATILE STRICT
AS 'MODULE_PATHNAME', 'mqtt_emit_renamed_column';

CREATE FUNCTION mqtt_emit._follow_renames()
RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    t record;
BEGIN
    FOR r IN SELECT x.* FROM pg_event_trigger_ddl_commands() c,
                    LATERAL mqtt_emit._renamed_column(c.command) x LOOP
        FOR t IN SELECT tg.tgtype, tg.tgenabled, a
                   FROM pg_trigger tg,
                        LATERAL mqtt_emit._trigger_args(tg.tgargs, tg.tgnargs) AS a
                  WHERE tg.tgrelid = r.relid
                    AND tg.tgfoid = 'mqtt_emit.capture()'::regprocedure
                    AND NOT tg.tgisinternal AND tg.tgparentid = 0 LOOP
            IF t.a[3] IN ('columns', 'exclude_columns') AND r.old_name = ANY (t.a[4:]) THEN
                PERFORM mqtt_emit._set_capture_trigger(
                    r.relid,
                    ARRAY(SELECT o FROM (VALUES (1, 'insert', 4), (2, 'update', 16), (3, 'delete', 8)) v(n, o, bit)
                           WHERE t.tgtype & v.bit <> 0 ORDER BY n),
                    t.a[1:3] || ARRAY(SELECT CASE WHEN x = r.old_name THEN r.new_name ELSE x END
                                        FROM unnest(t.a[4:]) WITH ORDINALITY AS u(x, n) ORDER BY n),
                    t.tgenabled);
            END IF;
        END LOOP;
    END LOOP;
END
$$;
CREATE EVENT TRIGGER mqtt_emit_follow_renames ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION mqtt_emit._follow_renames();

-- Triggers made by 0.1.0 list column numbers: name the columns instead
-- (numbers of dropped columns were ignored already and are left out).
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT tg.tgrelid::regclass AS tbl, tg.tgtype, tg.tgenabled, a
               FROM pg_catalog.pg_trigger tg,
                    LATERAL mqtt_emit._trigger_args(tg.tgargs, tg.tgnargs) AS a
              WHERE tg.tgfoid = 'mqtt_emit.capture()'::pg_catalog.regprocedure
                AND NOT tg.tgisinternal AND tg.tgparentid = 0
                AND a[3] IN ('include', 'exclude') LOOP
        PERFORM mqtt_emit._set_capture_trigger(
            t.tbl,
            ARRAY(SELECT o FROM (VALUES (1, 'insert', 4), (2, 'update', 16), (3, 'delete', 8)) v(n, o, bit)
                   WHERE t.tgtype & v.bit <> 0 ORDER BY n),
            t.a[1:2] || CASE t.a[3] WHEN 'include' THEN 'columns' ELSE 'exclude_columns' END
                     || ARRAY(SELECT att.attname::text
                                FROM unnest(t.a[4:]) WITH ORDINALITY AS x(num, ord)
                                JOIN pg_catalog.pg_attribute att
                                  ON att.attrelid = t.tbl AND att.attnum = x.num::int2
                               WHERE NOT att.attisdropped ORDER BY x.ord),
            t.tgenabled);
    END LOOP;
END
$$;

-- Bind the models in use to the owners of their tables.  0.1.0 let any
-- table owner use any name: every owner keeps what it had (a superuser
-- should look at models with several owners, listed in a WARNING), except
-- for temporary tables, which 0.2.0 does not watch.
INSERT INTO mqtt_emit.models
SELECT DISTINCT translate(a[1], 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'),
       c.relowner::pg_catalog.regrole
  FROM pg_catalog.pg_trigger tg JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid,
       LATERAL mqtt_emit._trigger_args(tg.tgargs, tg.tgnargs) AS a
 WHERE tg.tgfoid = 'mqtt_emit.capture()'::pg_catalog.regprocedure
   AND NOT tg.tgisinternal AND tg.tgparentid = 0 AND c.relpersistence <> 't';
DO $$
DECLARE
    m record;
BEGIN
    FOR m IN SELECT b.model, string_agg(b.owner::text, ', ' ORDER BY b.owner::text) AS owners
               FROM mqtt_emit.models b GROUP BY b.model HAVING count(*) > 1 ORDER BY b.model LOOP
        RAISE WARNING 'model "%" is used by tables of several roles: %', m.model, m.owners
            USING HINT = 'Each of them may publish under it; delete the rows of mqtt_emit.models that should not.';
    END LOOP;
END
$$;

------------------------------------------------------------------------
-- The worker notices every change of the listener registry
------------------------------------------------------------------------

------------------------------------------------------------------------
-- The registry is the extension's: listen() and unlisten() write it, and
-- it is bounded; dropped functions take their listeners with them
------------------------------------------------------------------------

-- PUBLIC may read the registry (row security shows each role its own rows)
-- but not write or lock it, so nobody but the extension can hold a lock on
-- it that would make a worker wait.
REVOKE ALL ON mqtt_emit.listeners FROM PUBLIC;
GRANT SELECT ON mqtt_emit.listeners TO PUBLIC;
REVOKE ALL ON SEQUENCE mqtt_emit.listeners_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION mqtt_emit._listeners_changed() FROM PUBLIC;

-- Receiving remote events is a right: a remote listener gets every peer's
-- rows of its model, whatever its role may read here.  Superusers have it;
-- they give it with GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote()
-- TO <role> (members of that role have it too).  listen() checks it, and the
-- workers again at every load and call, so REVOKE takes effect.
CREATE FUNCTION mqtt_emit.may_listen_remote()
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT true $$;
COMMENT ON FUNCTION mqtt_emit.may_listen_remote() IS
'Whoever may execute this function may register allow_remote listeners; grant EXECUTE to give the right';
REVOKE ALL ON FUNCTION mqtt_emit.may_listen_remote() FROM PUBLIC;

-- Every row of the registry is checked, however it is written (listen(),
-- or a superuser's INSERT, UPDATE or COPY): the worker calls what the
-- registry names, and keeps all of it in memory, so it is bounded (the
-- same numbers as ME_REGISTRY_* in src/listeners.h).
CREATE OR REPLACE FUNCTION mqtt_emit._validate_listener()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p record;
    op text;
    ops text[];
BEGIN
    IF NEW.model IS NULL OR NEW.model = '' OR length(NEW.model) > 200
       OR NEW.model ~ '[[:cntrl:]/+#]' THEN
        RAISE EXCEPTION 'invalid model name "%"', left(NEW.model, 200)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A model name has 1 to 200 characters and no control characters, "/", "+" or "#".';
    END IF;
    IF NEW.listener IS NULL THEN
        RAISE EXCEPTION 'listener must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT pr.pronargs, pr.proargtypes, pr.proretset, pr.prokind, pr.pronamespace
      INTO p FROM pg_proc pr WHERE pr.oid = NEW.listener;
    IF NOT FOUND OR p.prokind <> 'f' OR p.pronargs <> 1
       OR p.proargtypes[0] <> 'mqtt_emit.event'::regtype OR p.proretset THEN
        RAISE EXCEPTION 'function % cannot be a listener', NEW.listener
            USING ERRCODE = 'invalid_function_definition',
                  HINT = 'A listener is a function f(event mqtt_emit.event) RETURNS void.';
    END IF;
    IF p.pronamespace = pg_my_temp_schema() OR pg_is_other_temp_schema(p.pronamespace) THEN
        RAISE EXCEPTION 'temporary function % cannot be a listener', NEW.listener
            USING ERRCODE = 'invalid_function_definition',
                  DETAIL = 'A temporary function is dropped when its session ends; its listener would not.',
                  HINT = 'Create the listener function in a permanent schema.';
    END IF;
    IF NOT has_function_privilege(NEW.owner, NEW.listener, 'EXECUTE') THEN
        RAISE EXCEPTION 'permission denied for function %', NEW.listener
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A listener runs as the role that registers it, which must be allowed to execute it.';
    END IF;
    IF NEW.allow_remote IS NULL OR NEW.remote_only IS NULL THEN
        RAISE EXCEPTION 'allow_remote and remote_only must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NEW.remote_only AND NOT NEW.allow_remote THEN
        RAISE EXCEPTION 'remote_only requires allow_remote'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use allow_remote => true, remote_only => true for a listener that runs for remote events only.';
    END IF;
    IF NEW.filter IS NOT NULL AND jsonb_typeof(NEW.filter) <> 'object' THEN
        RAISE EXCEPTION 'filter must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The filter is matched with @> against the event''s result row, e.g. ''{"status": "active"}''.';
    END IF;
    IF octet_length(NEW.filter::text) > 4096 THEN
        RAISE EXCEPTION 'filter is too long'
            USING ERRCODE = 'program_limit_exceeded',
                  DETAIL = format('It has %s bytes as text; a listener''s filter has at most 4096.',
                                  octet_length(NEW.filter::text)),
                  HINT = 'Match fewer keys in the filter, and test the rest in the listener function.';
    END IF;
    IF octet_length(NEW.search_path) > 1024 THEN
        RAISE EXCEPTION 'search_path is too long for a listener'
            USING ERRCODE = 'program_limit_exceeded',
                  DETAIL = format('It has %s bytes; a listener keeps at most 1024.', octet_length(NEW.search_path)),
                  HINT = 'The listener keeps the search_path in effect at listen(); set a shorter one before calling it.';
    END IF;
    IF NEW.operations IS NOT NULL THEN
        IF cardinality(NEW.operations) > 16 THEN
            RAISE EXCEPTION 'too many operations'
                USING ERRCODE = 'program_limit_exceeded',
                      DETAIL = format('%s are given; a listener lists at most 16.', cardinality(NEW.operations)),
                      HINT = 'Name each operation once, or use NULL for all operations.';
        END IF;
        ops := '{}';
        FOREACH op IN ARRAY NEW.operations LOOP
            op := CASE lower(op) WHEN 'insert' THEN 'create' ELSE op END;
            IF op IS NULL OR lower(op) NOT IN ('create', 'update', 'delete', 'createmany',
                                               'updatemany', 'deletemany', 'upsert') THEN
                RAISE EXCEPTION 'unknown operation "%"', op
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Operations are create (or insert), update and delete, and the seed''s createMany, updateMany, deleteMany and upsert.';
            END IF;
            ops := ops || op;
        END LOOP;
        IF cardinality(ops) = 0 THEN
            RAISE EXCEPTION 'operations must name at least one operation, or be null for all'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        NEW.operations := ops;
    END IF;
    IF TG_OP = 'INSERT' THEN
        -- one role's registrations at a time, so that the count holds
        PERFORM pg_advisory_xact_lock(hashtext('pg_mqtt_emit listeners'),
                                      (NEW.owner::oid::bigint - 2147483648)::int);
        IF (SELECT count(*) FROM mqtt_emit.listeners l WHERE l.owner = NEW.owner) >= 500 THEN
            RAISE EXCEPTION 'role % has too many listeners', NEW.owner
                USING ERRCODE = 'program_limit_exceeded',
                      DETAIL = 'A role may register at most 500 listeners.',
                      HINT = 'Remove listeners it no longer needs with mqtt_emit.unlisten(), or let one listener handle several models.';
        END IF;
        IF (SELECT count(*) FROM mqtt_emit.listeners) >= 5000 THEN
            RAISE EXCEPTION 'too many listeners'
                USING ERRCODE = 'program_limit_exceeded',
                      DETAIL = 'The registry holds at most 5000 listeners.',
                      HINT = 'Remove listeners that are no longer needed with mqtt_emit.unlisten().';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER validate_listener ON mqtt_emit.listeners;
CREATE TRIGGER validate_listener BEFORE INSERT OR UPDATE ON mqtt_emit.listeners
    FOR EACH ROW EXECUTE FUNCTION mqtt_emit._validate_listener();

-- However the registry changes (listen(), unlisten(), a superuser's DML,
-- COPY by pg_restore, the drop of a listener function), the worker reloads
-- it when the transaction commits.  SECURITY DEFINER: _listeners_changed()
-- is not PUBLIC's.
CREATE FUNCTION mqtt_emit._registry_changed()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM mqtt_emit._listeners_changed();
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION mqtt_emit._registry_changed() FROM PUBLIC;
CREATE TRIGGER registry_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON mqtt_emit.listeners
    FOR EACH STATEMENT EXECUTE FUNCTION mqtt_emit._registry_changed();

-- A dropped function takes its listeners with it (DROP FUNCTION, DROP
-- SCHEMA ... CASCADE, DROP OWNED).  The workers skip rows whose function or
-- role is gone anyway: a pg_temp function's session end and DROP ROLE fire
-- no event trigger.
CREATE FUNCTION mqtt_emit._drop_listeners()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- DROP EXTENSION drops the registry too
    IF to_regclass('mqtt_emit.listeners') IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM mqtt_emit.listeners l
     USING pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_proc'::regclass AND d.objid = l.listener::oid;
END
$$;
REVOKE ALL ON FUNCTION mqtt_emit._drop_listeners() FROM PUBLIC;
CREATE EVENT TRIGGER mqtt_emit_drop_listeners ON sql_drop
    EXECUTE FUNCTION mqtt_emit._drop_listeners();

-- listen() and unlisten() are written in C (sql_api.c): they take the
-- calling role (current_user) and its search_path themselves, check its
-- rights, and write the registry as its owner.  A SECURITY DEFINER SQL
-- function could not tell who called it, and one that is told would
-- believe whoever calls it directly.
CREATE OR REPLACE FUNCTION mqtt_emit.listen(
    model text,
    listener regprocedure,
    allow_remote boolean DEFAULT false,
    remote_only boolean DEFAULT false,
    filter jsonb DEFAULT NULL,
    operations text[] DEFAULT NULL)
RETURNS bigint
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_listen';
COMMENT ON FUNCTION mqtt_emit.listen(text, regprocedure, boolean, boolean, jsonb, text[]) IS
'Registers a listener function for the events of a model; returns its id';

CREATE OR REPLACE FUNCTION mqtt_emit.unlisten(id bigint)
RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_unlisten';
COMMENT ON FUNCTION mqtt_emit.unlisten(bigint) IS
'Removes a registered listener';


------------------------------------------------------------------------
-- Monitoring: stats_reset(), stats_reset and oldest_waiting_seconds
------------------------------------------------------------------------

DROP VIEW mqtt_emit.stats;
DROP FUNCTION mqtt_emit._stats();
CREATE FUNCTION mqtt_emit._stats(
    OUT connected boolean,
    OUT subscriber_connected boolean,
    OUT published bigint,
    OUT failed bigint,
    OUT queued bigint,
    OUT queue_bytes bigint,
    OUT queue_capacity bigint,
    OUT enqueued bigint,
    OUT retried bigint,
    OUT dropped bigint,
    OUT received bigint,
    OUT deduplicated bigint,
    OUT self_echo bigint,
    OUT rejected bigint,
    OUT listener_calls bigint,
    OUT listener_errors bigint,
    OUT subscriptions int,
    OUT connects bigint,
    OUT in_outbox bigint,
    OUT oldest_waiting_age interval,
    OUT spilled bigint,
    OUT outboxed bigint,
    OUT dead_letters bigint,
    OUT last_error text,
    OUT last_error_at timestamptz,
    OUT worker_pid int,
    OUT client_id text,
    OUT stats_reset timestamptz,
    OUT oldest_waiting_seconds double precision,
    OUT depth_exceeded bigint,
    OUT broker_url text,
    OUT subscriber_broker_url text)
RETURNS record
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_stats';
REVOKE ALL ON FUNCTION mqtt_emit._stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mqtt_emit._stats() TO pg_monitor;

CREATE VIEW mqtt_emit.stats AS SELECT * FROM mqtt_emit._stats();
COMMENT ON VIEW mqtt_emit.stats IS
'State and counters of the pg_mqtt_emit worker and queue';
REVOKE ALL ON mqtt_emit.stats FROM PUBLIC;
GRANT SELECT ON mqtt_emit.stats TO pg_monitor;

CREATE FUNCTION mqtt_emit.stats_reset()
RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_stats_reset';
COMMENT ON FUNCTION mqtt_emit.stats_reset() IS
'Sets the counters of mqtt_emit.stats back to zero and its stats_reset to now';
REVOKE ALL ON FUNCTION mqtt_emit.stats_reset() FROM PUBLIC;

-- Calls, errors and time (milliseconds) of each listener since the server
-- started or the last stats_reset(), and the same per model.  Each role
-- sees its own listeners; monitoring roles (pg_read_all_stats, so
-- pg_monitor) see all.
CREATE FUNCTION mqtt_emit._listener_stats(
    OUT id bigint, OUT calls bigint, OUT errors bigint,
    OUT total_time double precision, OUT last_call timestamptz)
RETURNS SETOF record
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_listener_stats';

CREATE VIEW mqtt_emit.listener_stats AS
SELECT l.id, l.model, l.listener, l.owner, l.allow_remote, l.remote_only,
       coalesce(s.calls, 0) AS calls,
       coalesce(s.errors, 0) AS errors,
       coalesce(s.total_time, 0) AS total_time,
       CASE WHEN s.calls > 0 THEN s.total_time / s.calls END AS mean_time,
       s.last_call
  FROM mqtt_emit.listeners l
  LEFT JOIN mqtt_emit._listener_stats() s ON s.id = l.id
 WHERE pg_catalog.pg_has_role(current_user, l.owner, 'MEMBER')
    OR pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE');
COMMENT ON VIEW mqtt_emit.listener_stats IS
'Calls, errors and time (ms) of each listener since the server started or mqtt_emit.stats_reset()';
GRANT SELECT ON mqtt_emit.listener_stats TO PUBLIC;

CREATE VIEW mqtt_emit.model_stats AS
SELECT model, count(*) AS listeners,
       sum(calls)::bigint AS calls,
       sum(errors)::bigint AS errors,
       sum(total_time) AS total_time
  FROM mqtt_emit.listener_stats
 GROUP BY model;
COMMENT ON VIEW mqtt_emit.model_stats IS
'Calls, errors and time (ms) of the listeners of each model, as mqtt_emit.listener_stats';
GRANT SELECT ON mqtt_emit.model_stats TO PUBLIC;

------------------------------------------------------------------------
-- 0.2.0: topic rules from C
------------------------------------------------------------------------

-- Rows written without a marker (batch < 0: where in the queue they belong)
-- are placed by batch.
CREATE INDEX outbox_stray_idx ON mqtt_emit.outbox (batch) WHERE seq IS NULL AND NOT marked;

-- Rows whose local listeners wait for the worker to reach their place in
-- the queue (flag 32), found by batch.
CREATE INDEX outbox_held_idx ON mqtt_emit.outbox (batch) WHERE (flags & 32) <> 0;

-- Rows whose listeners are due (flag 2), for the listener worker.
CREATE INDEX outbox_local_idx ON mqtt_emit.outbox (id) WHERE (flags & 2) <> 0;

-- The topic filter the worker subscribes to for a model (topic.c).
CREATE FUNCTION mqtt_emit._topic_filter(model text, lower boolean)
RETURNS text
LANGUAGE c STABLE STRICT
AS 'MODULE_PATHNAME', 'mqtt_emit_topic_filter';

-- Only the current role's own (and its roles') listeners, those that
-- receive remote events: whose function and LOGIN role exist and whose role
-- has the right (may_listen_remote()), as the worker decides.
CREATE OR REPLACE VIEW mqtt_emit.subscriptions AS
SELECT DISTINCT f.topic_filter
  FROM mqtt_emit.listeners l
  JOIN pg_catalog.pg_proc p ON p.oid = l.listener::oid
  JOIN pg_catalog.pg_roles r ON r.oid = l.owner::oid AND r.rolcanlogin,
       LATERAL (VALUES (mqtt_emit._topic_filter(l.model, false)),
                       (mqtt_emit._topic_filter(l.model, true))) AS f(topic_filter)
 WHERE l.allow_remote
   AND pg_catalog.pg_has_role(current_user, l.owner, 'MEMBER')
   AND pg_catalog.has_function_privilege(l.owner, 'mqtt_emit.may_listen_remote()'::regprocedure, 'EXECUTE');

-- Raises an error unless a name may be part of an MQTT topic: valid UTF-8
-- without U+0000, control characters, surrogates or noncharacters
-- (topic.c); what names it in the message.  The broker disconnects a
-- client that sends a topic breaking these rules.
CREATE FUNCTION mqtt_emit._check_name(name text, what text)
RETURNS void
LANGUAGE c IMMUTABLE STRICT
AS 'MODULE_PATHNAME', 'mqtt_emit_check_name';

-- Raises an error (22023) when mqtt_emit.batch_topic_prefix and
-- mqtt_emit.topic_prefix overlap, so that batched messages would reach
-- subscribers of the events (topic.c); for watch(..., batch => true).
CREATE FUNCTION mqtt_emit._check_batch_prefix()
RETURNS void
LANGUAGE c STABLE
AS 'MODULE_PATHNAME', 'mqtt_emit_check_batch_prefix';

-- Every model name in the registry follows those rules, however the row
-- comes (listen(), a direct INSERT, pg_restore); after validate_listener,
-- which fires first (triggers fire in name order).
CREATE FUNCTION mqtt_emit._validate_listener_model()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM mqtt_emit._check_name(NEW.model, 'model name');
    RETURN NEW;
END
$$;
CREATE TRIGGER validate_listener_model BEFORE INSERT OR UPDATE OF model ON mqtt_emit.listeners
    FOR EACH ROW EXECUTE FUNCTION mqtt_emit._validate_listener_model();

------------------------------------------------------------------------
-- Dead letters hold rows of any table: superusers only
------------------------------------------------------------------------

REVOKE SELECT ON mqtt_emit.dead_letters FROM pg_monitor;
COMMENT ON TABLE mqtt_emit.dead_letters IS
'Messages the broker refused for good; kept for inspection; superusers only';

------------------------------------------------------------------------
-- 0.2.0: subscriptions to any topic (mqtt_emit.subscribe)
------------------------------------------------------------------------

-- A handler is called for every message received on a topic that matches
-- its filter, outside the extension's own <prefix>/ topics: f(topic text,
-- payload bytea) or f(topic text, payload bytea, props jsonb).  The same
-- trust rules as mqtt_emit.listeners: it runs as the role that registered
-- it, with the search_path of then; rows are written through subscribe()
-- and unsubscribe() only, and each role sees its own.
CREATE TABLE mqtt_emit.handlers (
    id           bigserial PRIMARY KEY,
    topic_filter text NOT NULL,
    handler      regprocedure NOT NULL,
    qos          int2 NOT NULL DEFAULT 1,
    owner        regrole NOT NULL DEFAULT current_user::regrole,
    search_path  text NOT NULL DEFAULT current_setting('search_path'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (qos BETWEEN 0 AND 2)
);
COMMENT ON TABLE mqtt_emit.handlers IS
'Functions called for messages on any MQTT topic filter (subscribe()); each role sees its own';
SELECT pg_catalog.pg_extension_config_dump('mqtt_emit.handlers', '');
SELECT pg_catalog.pg_extension_config_dump('mqtt_emit.handlers_id_seq', '');
ALTER TABLE mqtt_emit.handlers ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_handlers ON mqtt_emit.handlers
    USING (pg_catalog.pg_has_role(current_user, owner, 'MEMBER'))
    WITH CHECK (owner = current_user::regrole);
REVOKE ALL ON mqtt_emit.handlers FROM PUBLIC;
GRANT SELECT ON mqtt_emit.handlers TO PUBLIC;
REVOKE ALL ON SEQUENCE mqtt_emit.handlers_id_seq FROM PUBLIC;

-- Raises an error unless filter is an MQTT topic filter that a handler may
-- have: wildcards at whole levels, # last, at most 1024 bytes, MQTT's
-- UTF-8 rules, not $share/..., and no overlap with <prefix>/ (handlers.c).
CREATE FUNCTION mqtt_emit._check_topic_filter(filter text)
RETURNS void
LANGUAGE c STABLE STRICT
AS 'MODULE_PATHNAME', 'mqtt_emit_check_topic_filter';

-- Every row is checked, however it is written (subscribe(), a superuser's
-- INSERT, pg_restore's COPY); the bounds are those of listeners.
CREATE FUNCTION mqtt_emit._validate_handler()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p record;
BEGIN
    IF NEW.topic_filter IS NULL OR NEW.handler IS NULL OR NEW.qos IS NULL THEN
        RAISE EXCEPTION 'topic_filter, handler and qos must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM mqtt_emit._check_topic_filter(NEW.topic_filter);
    SELECT pr.pronargs, pr.proargtypes, pr.proretset, pr.prokind, pr.pronamespace
      INTO p FROM pg_proc pr WHERE pr.oid = NEW.handler;
    IF NOT FOUND OR p.prokind <> 'f' OR p.proretset
       OR p.pronargs NOT IN (2, 3)
       OR p.proargtypes[0] <> 'text'::regtype OR p.proargtypes[1] <> 'bytea'::regtype
       OR (p.pronargs = 3 AND p.proargtypes[2] <> 'jsonb'::regtype) THEN
        RAISE EXCEPTION 'function % cannot be a message handler', NEW.handler
            USING ERRCODE = 'invalid_function_definition',
                  HINT = 'A handler is a function f(topic text, payload bytea) or f(topic text, payload bytea, props jsonb).';
    END IF;
    IF p.pronamespace = pg_my_temp_schema() OR pg_is_other_temp_schema(p.pronamespace) THEN
        RAISE EXCEPTION 'temporary function % cannot be a message handler', NEW.handler
            USING ERRCODE = 'invalid_function_definition',
                  DETAIL = 'A temporary function is dropped when its session ends; its subscription would not.',
                  HINT = 'Create the handler function in a permanent schema.';
    END IF;
    IF NOT has_function_privilege(NEW.owner, NEW.handler, 'EXECUTE') THEN
        RAISE EXCEPTION 'permission denied for function %', NEW.handler
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A handler runs as the role that subscribes, which must be allowed to execute it.';
    END IF;
    IF octet_length(NEW.search_path) > 1024 THEN
        RAISE EXCEPTION 'search_path is too long for a handler'
            USING ERRCODE = 'program_limit_exceeded',
                  DETAIL = format('It has %s bytes; a handler keeps at most 1024.', octet_length(NEW.search_path)),
                  HINT = 'The handler keeps the search_path in effect at subscribe(); set a shorter one before calling it.';
    END IF;
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_advisory_xact_lock(hashtext('pg_mqtt_emit handlers'),
                                      (NEW.owner::oid::bigint - 2147483648)::int);
        IF (SELECT count(*) FROM mqtt_emit.handlers h WHERE h.owner = NEW.owner) >= 500 THEN
            RAISE EXCEPTION 'role % has too many subscriptions', NEW.owner
                USING ERRCODE = 'program_limit_exceeded',
                      DETAIL = 'A role may subscribe at most 500 handlers.',
                      HINT = 'Remove subscriptions it no longer needs with mqtt_emit.unsubscribe(), or use a wildcard filter.';
        END IF;
        IF (SELECT count(*) FROM mqtt_emit.handlers) >= 5000 THEN
            RAISE EXCEPTION 'too many subscriptions'
                USING ERRCODE = 'program_limit_exceeded',
                      DETAIL = 'The registry holds at most 5000 handlers.',
                      HINT = 'Remove subscriptions that are no longer needed with mqtt_emit.unsubscribe().';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER validate_handler BEFORE INSERT OR UPDATE ON mqtt_emit.handlers
    FOR EACH ROW EXECUTE FUNCTION mqtt_emit._validate_handler();
CREATE TRIGGER registry_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON mqtt_emit.handlers
    FOR EACH STATEMENT EXECUTE FUNCTION mqtt_emit._registry_changed();

-- A dropped function takes its handlers with it, as it does its listeners.
CREATE FUNCTION mqtt_emit._drop_handlers()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF to_regclass('mqtt_emit.handlers') IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM mqtt_emit.handlers h
     USING pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_proc'::regclass AND d.objid = h.handler::oid;
END
$$;
REVOKE ALL ON FUNCTION mqtt_emit._drop_handlers() FROM PUBLIC;
CREATE EVENT TRIGGER mqtt_emit_drop_handlers ON sql_drop
    EXECUTE FUNCTION mqtt_emit._drop_handlers();

-- In C (sql_api.c), like listen(): they check LOGIN and the right
-- (EXECUTE on may_listen_remote()), then write the registry as its owner.
CREATE FUNCTION mqtt_emit.subscribe(topic_filter text, handler regprocedure, qos int DEFAULT 1)
RETURNS bigint
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_subscribe';
COMMENT ON FUNCTION mqtt_emit.subscribe(text, regprocedure, int) IS
'Calls handler(topic, payload [, props]) as the current role for every message on topic_filter; returns its id';
GRANT EXECUTE ON FUNCTION mqtt_emit.subscribe(text, regprocedure, int) TO PUBLIC;

CREATE FUNCTION mqtt_emit.unsubscribe(id bigint)
RETURNS boolean
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_unsubscribe';
COMMENT ON FUNCTION mqtt_emit.unsubscribe(bigint) IS
'Removes a subscription of the current role; false when there is none with that id';
GRANT EXECUTE ON FUNCTION mqtt_emit.unsubscribe(bigint) TO PUBLIC;

-- A message's payload as text (UTF-8; an error names the invalid bytes)
-- or as jsonb.
CREATE FUNCTION mqtt_emit.payload_text(payload bytea)
RETURNS text
LANGUAGE sql STABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.convert_from(payload, 'UTF8') $$;
COMMENT ON FUNCTION mqtt_emit.payload_text(bytea) IS
'A message payload as text; raises an error when it is not valid UTF-8';
GRANT EXECUTE ON FUNCTION mqtt_emit.payload_text(bytea) TO PUBLIC;

CREATE FUNCTION mqtt_emit.payload_jsonb(payload bytea)
RETURNS jsonb
LANGUAGE sql STABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.convert_from(payload, 'UTF8')::pg_catalog.jsonb $$;
COMMENT ON FUNCTION mqtt_emit.payload_jsonb(bytea) IS
'A message payload as jsonb; raises an error when it is not UTF-8 JSON';
GRANT EXECUTE ON FUNCTION mqtt_emit.payload_jsonb(bytea) TO PUBLIC;

------------------------------------------------------------------------
-- 0.2.0: the state of each subscription (SUBACK tracking)
------------------------------------------------------------------------

-- The states of the named subscription filters, as the worker last saw
-- them (shared memory): requested, acknowledged (granted_qos), refused
-- (reason); nothing for a filter it does not have.  PUBLIC may call it:
-- functions in a view run with the caller's rights, and the view passes
-- only the caller's own filters.  A role learns only about filters it
-- names (model names are not secret: mqtt_emit.models is readable by all).
CREATE FUNCTION mqtt_emit._subscription_states(
    filters text[],
    OUT topic_filter text,
    OUT state text,
    OUT granted_qos int,
    OUT reason text,
    OUT since timestamptz)
RETURNS SETOF record
LANGUAGE c VOLATILE STRICT
AS 'MODULE_PATHNAME', 'mqtt_emit_subscription_states';

-- The filters the registry asks for (as before), with their state;
-- 'pending' while the worker has not sent SUBSCRIBE (not connected, not
-- running, or the filter is longer than 511 bytes and not tracked).
CREATE OR REPLACE VIEW mqtt_emit.subscriptions AS
WITH w AS (
    SELECT DISTINCT f.topic_filter
      FROM mqtt_emit.listeners l
      JOIN pg_catalog.pg_proc p ON p.oid = l.listener::oid
      JOIN pg_catalog.pg_roles r ON r.oid = l.owner::oid AND r.rolcanlogin,
           LATERAL (VALUES (mqtt_emit._topic_filter(l.model, false)),
                           (mqtt_emit._topic_filter(l.model, true))) AS f(topic_filter)
     WHERE l.allow_remote
       AND pg_catalog.pg_has_role(current_user, l.owner, 'MEMBER')
       AND pg_catalog.has_function_privilege(l.owner, 'mqtt_emit.may_listen_remote()'::regprocedure, 'EXECUTE'))
SELECT w.topic_filter,
       COALESCE(s.state, 'pending') AS state,
       s.granted_qos,
       s.reason,
       s.since
  FROM w
  LEFT JOIN mqtt_emit._subscription_states(ARRAY(SELECT w.topic_filter FROM w)) s
         ON s.topic_filter OPERATOR(pg_catalog.=) w.topic_filter;
COMMENT ON VIEW mqtt_emit.subscriptions IS
'Topic filters the worker subscribes to (per model with a remote listener, as registered and in lower case), with their state: pending, requested, acknowledged (granted_qos) or refused (reason)';

SELECT mqtt_emit._listeners_changed();

-- publish() gains retain and MQTT 5 properties (issue 17).  A changed
-- signature is a new function: grants made on the old ones are not kept.
DROP FUNCTION mqtt_emit.publish(text, jsonb, int);
DROP FUNCTION mqtt_emit.publish(text, text, int);

CREATE FUNCTION mqtt_emit.publish(topic text, payload text, qos int DEFAULT NULL,
                                  retain boolean DEFAULT false,
                                  properties jsonb DEFAULT NULL)
RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_publish';
COMMENT ON FUNCTION mqtt_emit.publish(text, text, int, boolean, jsonb) IS
'Publishes a message on a topic when the transaction commits, retained or not, with MQTT 5 properties';
REVOKE ALL ON FUNCTION mqtt_emit.publish(text, text, int, boolean, jsonb) FROM PUBLIC;

CREATE FUNCTION mqtt_emit.publish(topic text, payload jsonb, qos int DEFAULT NULL,
                                  retain boolean DEFAULT false,
                                  properties jsonb DEFAULT NULL)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT mqtt_emit.publish(topic, payload::text, qos, retain, properties) $$;
COMMENT ON FUNCTION mqtt_emit.publish(text, jsonb, int, boolean, jsonb) IS
'Publishes a JSON message on a topic when the transaction commits, retained or not, with MQTT 5 properties';
REVOKE ALL ON FUNCTION mqtt_emit.publish(text, jsonb, int, boolean, jsonb) FROM PUBLIC;

------------------------------------------------------------------------
-- 0.2.0: the subscriber's spool position
------------------------------------------------------------------------

-- How far the worker has kept the received messages of its spool
-- (src/spool.c: files in $PGDATA/pg_mqtt_emit that messages are written
-- to as they arrive): updated in the transaction that keeps them, so that
-- a worker that dies in between takes the rest from the files.  One row.
CREATE TABLE mqtt_emit.spool_position (
    generation  bigint NOT NULL,
    position    bigint NOT NULL
);
INSERT INTO mqtt_emit.spool_position VALUES (0, 0);
COMMENT ON TABLE mqtt_emit.spool_position IS
'How far the received messages of the spool are kept; internal, not readable by PUBLIC';
REVOKE ALL ON mqtt_emit.spool_position FROM PUBLIC;

-- The ids of remote events whose listeners ran (src/remote.c: a 128-bit
-- key, the event id's or the message's hash), written in the transaction
-- that runs them, so that a copy that comes again does not run them twice;
-- kept for mqtt_emit.dedup_keep.
CREATE TABLE mqtt_emit.received_ids (
    a        bigint NOT NULL,
    b        bigint NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (a, b)
);
CREATE INDEX received_ids_seen_at_idx ON mqtt_emit.received_ids (seen_at);
COMMENT ON TABLE mqtt_emit.received_ids IS
'Keys of handled remote events, kept for mqtt_emit.dedup_keep; internal, not readable by PUBLIC';
REVOKE ALL ON mqtt_emit.received_ids FROM PUBLIC;

------------------------------------------------------------------------
-- 0.2.0: share groups (issues 15 and 17)
------------------------------------------------------------------------

-- A listener or a handler may join a share group: its node then receives
-- through the MQTT 5 shared subscription $share/<group>/<filter>, which
-- the broker delivers to one node of the group per message, while
-- listeners and handlers without a group still get every message
-- (src/inbound.c).  NULL: no group.
ALTER TABLE mqtt_emit.listeners ADD COLUMN share_group text;
ALTER TABLE mqtt_emit.listeners ADD CONSTRAINT listeners_share_group_check
    CHECK (share_group IS NULL OR allow_remote);
ALTER TABLE mqtt_emit.handlers ADD COLUMN share_group text;

-- Raises an error unless name is a share group name: 1 to 100 bytes, no
-- "/", "+" or "#" (MQTT 5's rule for a ShareName), MQTT's UTF-8 rules
-- (topic.c).
CREATE FUNCTION mqtt_emit._check_share_group(name text)
RETURNS void
LANGUAGE c IMMUTABLE STRICT
AS 'MODULE_PATHNAME', 'mqtt_emit_check_share_group';

-- Every row's group is checked, however it is written (listen(),
-- subscribe(), a superuser's INSERT, pg_restore's COPY); after the other
-- row triggers, which fire first (name order).
CREATE FUNCTION mqtt_emit._validate_share_group()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.share_group IS NOT NULL THEN
        PERFORM mqtt_emit._check_share_group(NEW.share_group);
        -- (nested: NEW of a handler has no allow_remote)
        IF TG_TABLE_NAME = 'listeners' THEN
            IF NOT NEW.allow_remote THEN
                RAISE EXCEPTION 'share_group requires allow_remote'
                    USING ERRCODE = 'invalid_parameter_value',
                          DETAIL = 'A grouped listener runs for what its group gives this node from the bus, not for local events.',
                          HINT = 'Use allow_remote => true with share_group.';
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER validate_share_group BEFORE INSERT OR UPDATE OF share_group, allow_remote
    ON mqtt_emit.listeners
    FOR EACH ROW EXECUTE FUNCTION mqtt_emit._validate_share_group();
CREATE TRIGGER validate_share_group BEFORE INSERT OR UPDATE OF share_group
    ON mqtt_emit.handlers
    FOR EACH ROW EXECUTE FUNCTION mqtt_emit._validate_share_group();

-- listen() and subscribe() take share_group.  A changed signature is a new
-- function: grants made on the old ones are not kept.
DROP FUNCTION mqtt_emit.listen(text, regprocedure, boolean, boolean, jsonb, text[]);
CREATE FUNCTION mqtt_emit.listen(
    model text,
    listener regprocedure,
    allow_remote boolean DEFAULT false,
    remote_only boolean DEFAULT false,
    filter jsonb DEFAULT NULL,
    operations text[] DEFAULT NULL,
    share_group text DEFAULT NULL)
RETURNS bigint
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_listen';
COMMENT ON FUNCTION mqtt_emit.listen(text, regprocedure, boolean, boolean, jsonb, text[], text) IS
'Registers a listener function for the events of a model, optionally in a share group; returns its id';

DROP FUNCTION mqtt_emit.subscribe(text, regprocedure, int);
CREATE FUNCTION mqtt_emit.subscribe(topic_filter text, handler regprocedure, qos int DEFAULT 1,
                                    share_group text DEFAULT NULL)
RETURNS bigint
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'mqtt_emit_subscribe';
COMMENT ON FUNCTION mqtt_emit.subscribe(text, regprocedure, int, text) IS
'Calls handler(topic, payload [, props]) as the current role for every message on topic_filter (with share_group: each message on one node of the group); returns its id';
GRANT EXECUTE ON FUNCTION mqtt_emit.subscribe(text, regprocedure, int, text) TO PUBLIC;

-- The filters the registries ask for, with their state: a grouped
-- listener's as $share/<group>/<filter>, and the shared filters of grouped
-- handlers (a plain handler filter may be covered by another one and not
-- subscribed itself, so those are not listed).
CREATE OR REPLACE VIEW mqtt_emit.subscriptions AS
WITH w AS (
    SELECT DISTINCT CASE WHEN l.share_group IS NULL THEN f.topic_filter
                         ELSE '$share/' || l.share_group || '/' || f.topic_filter END AS topic_filter
      FROM mqtt_emit.listeners l
      JOIN pg_catalog.pg_proc p ON p.oid = l.listener::oid
      JOIN pg_catalog.pg_roles r ON r.oid = l.owner::oid AND r.rolcanlogin,
           LATERAL (VALUES (mqtt_emit._topic_filter(l.model, false)),
                           (mqtt_emit._topic_filter(l.model, true))) AS f(topic_filter)
     WHERE l.allow_remote
       AND pg_catalog.pg_has_role(current_user, l.owner, 'MEMBER')
       AND pg_catalog.has_function_privilege(l.owner, 'mqtt_emit.may_listen_remote()'::regprocedure, 'EXECUTE')
    UNION
    SELECT '$share/' || h.share_group || '/' || h.topic_filter
      FROM mqtt_emit.handlers h
      JOIN pg_catalog.pg_proc p ON p.oid = h.handler::oid
      JOIN pg_catalog.pg_roles r ON r.oid = h.owner::oid AND r.rolcanlogin
     WHERE h.share_group IS NOT NULL
       AND pg_catalog.pg_has_role(current_user, h.owner, 'MEMBER')
       AND pg_catalog.has_function_privilege(h.owner, 'mqtt_emit.may_listen_remote()'::regprocedure, 'EXECUTE'))
SELECT w.topic_filter,
       COALESCE(s.state, 'pending') AS state,
       s.granted_qos,
       s.reason,
       s.since
  FROM w
  LEFT JOIN mqtt_emit._subscription_states(ARRAY(SELECT w.topic_filter FROM w)) s
         ON s.topic_filter OPERATOR(pg_catalog.=) w.topic_filter;
COMMENT ON VIEW mqtt_emit.subscriptions IS
'Topic filters the worker subscribes to (per model with a remote listener, as registered and in lower case, $share/<group>/... for a share group; and the shared filters of grouped handlers), with their state: pending, requested, acknowledged (granted_qos) or refused (reason)';
