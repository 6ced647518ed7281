#!/usr/bin/perl
#
# 053_upgrade.pl: ALTER EXTENSION pg_mqtt_emit UPDATE from 0.1.0 (the
# released script, kept as shipped) to 0.2.0 on a cluster that is in use.
#
# Node "old" installs 0.1.0, watches two tables that once had a column
# dropped (one with exclude_columns, one with columns), registers a local
# and a remote listener, and writes; node "fresh" installs 0.2.0 and
# publishes the remote events. After the update on "old":
#   - the capture triggers name their columns (0.1.0 listed numbers),
#   - the same writes publish the same columns (payloads equal but for
#     eventId, timestamp and origin), local and remote listeners still run,
#   - what 0.2.0 adds works: renames are followed, a direct INSERT into the
#     registry reaches the worker, stats_reset() and the new stats columns,
#     watch(..., retain_last => true) on a table watched since 0.1.0 (the
#     upgrade recreated watch()),
#   - the extension's objects are the same as those of a fresh 0.2.0
#     install (a normalized catalog listing of both nodes, compared line by
#     line).
use strict;
use warnings;

use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 30;
my $prefix = topic_prefix();
my $broker = start_broker();
my $old    = new_node('old', broker => $broker);
my $fresh  = new_node('fresh', broker => $broker);

sub sq { my ($node, $sql) = @_; return $node->safe_psql('postgres', $sql); }

my $sub = start_subscriber($broker, "$prefix/#");

# A payload without the members that differ between two runs of the same
# write (eventId, timestamp, origin): the bytes that must be equal.
sub stable_bytes
{
	my ($payload) = @_;
	(my $p = $payload) =~ s/,"(?:timestamp|eventId|origin)":"(?:[^"\\]|\\.)*"//g;
	return $p;
}

# Published messages of $model from $node with result.id == $id.
sub published
{
	my ($node, $model, $id) = @_;
	my $cid = $node->{mqtt_emit}{client_id};
	return grep {
		my $d = eval { JSON::PP::decode_json($_->[1]) };
		$d && ($d->{origin} // '') eq $cid && $d->{model} eq $model
		  && ($d->{result}{id} // -1) == $id
	} $sub->messages;
}

sub wait_published
{
	my ($node, $model, $id) = @_;
	my @m;
	poll_until(sub { @m = published($node, $model, $id); scalar @m }, $T);
	return $m[0] ? $m[0][1] : undef;
}

# ---------------------------------------------------------------------------
# 0.1.0 in use
# ---------------------------------------------------------------------------

sq($old, q{CREATE EXTENSION pg_mqtt_emit VERSION '0.1.0'});
is(sq($old, q{SELECT extversion FROM pg_extension WHERE extname = 'pg_mqtt_emit'}),
	'0.1.0', 'old: 0.1.0 installed');
like(sq($old, 'SELECT connected, worker_pid IS NOT NULL FROM mqtt_emit.stats'), qr/^(t|f)\|t$/,
	'0.1.0 schema with the 0.2.0 library: mqtt_emit.stats still works');
sq($fresh, 'CREATE EXTENSION pg_mqtt_emit');
is(sq($fresh, q{SELECT extversion FROM pg_extension WHERE extname = 'pg_mqtt_emit'}),
	'0.2.0', 'fresh: the default version is 0.2.0');

sq($old, q{
CREATE TABLE "user" (id int PRIMARY KEY, gone text, name text, password_hash text);
ALTER TABLE "user" DROP COLUMN gone;
CREATE TABLE "order" (id int PRIMARY KEY, gone int, total numeric, note text);
ALTER TABLE "order" DROP COLUMN gone;
SELECT mqtt_emit.watch('"user"', exclude_columns => '{password_hash}');
SELECT mqtt_emit.watch('"order"', columns => '{id,total}');
CREATE TABLE calls (n serial, who text, source text, id text);
CREATE FUNCTION on_user(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, id) VALUES ('local', e.source, e.result->>'id'); END $$;
CREATE FUNCTION on_peer(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, id) VALUES ('remote', e.source, e.result->>'id'); END $$;
SELECT mqtt_emit.listen('user', 'on_user(mqtt_emit.event)');
SELECT mqtt_emit.listen('peer', 'on_peer(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
is( sq($old, q{SELECT string_agg(mqtt_emit._trigger_args(tgargs, tgnargs)::text, ' ' ORDER BY tgrelid::regclass::text)
  FROM pg_trigger WHERE tgname = 'mqtt_emit_capture'}),
	'{order,true,include,1,3} {user,true,exclude,4}',
	'0.1.0 triggers list column numbers');
sq($fresh, q{CREATE TABLE peer (id int PRIMARY KEY); SELECT mqtt_emit.watch('peer');});
ok($broker->wait_for_subscription($old->{mqtt_emit}{client_id} . '-subscriber', "$prefix/peer/#", $T),
	'old: subscribed for the remote listener');

sub write_round
{
	my ($id) = @_;
	sq($old, qq{INSERT INTO "user" VALUES ($id, 'name$id', 'SECRET-HASH-$id')});
	sq($old, qq{INSERT INTO "order" VALUES ($id, $id.5, 'note$id')});
	sq($old, qq{UPDATE "user" SET name = 'renamed$id', password_hash = 'NEW-$id' WHERE id = $id});
	sq($fresh, qq{INSERT INTO peer VALUES ($id)});
}

sub calls_for
{
	my ($id) = @_;
	return sq($old, qq{SELECT string_agg(who || '/' || source, ',' ORDER BY who) FROM calls WHERE id = '$id'});
}

write_round(1);
my $u1 = wait_published($old, 'user', 1);
my $o1 = wait_published($old, 'order', 1);
ok(defined $u1 && defined $o1, 'before the update: events published');
unlike($u1 // '', qr/SECRET|password_hash/, 'before: the excluded column is not published');
like($o1 // '', qr/"result":\{"id":1,"total":1.5\}/, 'before: only the listed columns');
ok(poll_until(sub { (calls_for(1) // '') eq 'local/local,local/local,remote/remote' }, $T),
	'before: local (create, update) and remote listeners ran')
  or diag('calls: ' . (calls_for(1) // ''));

# ---------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------

sq($old, 'ALTER EXTENSION pg_mqtt_emit UPDATE');
is(sq($old, q{SELECT extversion FROM pg_extension WHERE extname = 'pg_mqtt_emit'}),
	'0.2.0', 'old: updated to 0.2.0');
is( sq($old, q{SELECT string_agg(mqtt_emit._trigger_args(tgargs, tgnargs)::text, ' ' ORDER BY tgrelid::regclass::text)
  FROM pg_trigger WHERE tgname = 'mqtt_emit_capture'}),
	'{order,true,columns,id,total} {user,true,exclude_columns,password_hash}',
	'the update rewrote the triggers to name their columns');

write_round(2);
my $u2 = wait_published($old, 'user', 2);
my $o2 = wait_published($old, 'order', 2);
ok(defined $u2 && defined $o2, 'after the update: events published');
(my $u1_as_2 = stable_bytes($u1 // '')) =~ s/1/2/g;
(my $u2_stable = stable_bytes($u2 // ''));
is($u2_stable, $u1_as_2, 'after: the user event has the same bytes as before (but for ids and times)');
(my $o1_as_2 = stable_bytes($o1 // '')) =~ s/1/2/g;
is(stable_bytes($o2 // ''), $o1_as_2, 'after: the order event has the same bytes as before');
my @upd = grep { $_->[1] =~ /"operation":"update"/ } published($old, 'user', 2);
ok(@upd == 1 && $upd[0][1] !~ /SECRET|NEW-2|password_hash/,
	'after: the update event has no trace of the excluded column');
ok(poll_until(sub { (calls_for(2) // '') eq 'local/local,local/local,remote/remote' }, $T),
	'after: local and remote listeners run')
  or diag('calls: ' . (calls_for(2) // ''));

# what 0.2.0 adds
sq($old, q{ALTER TABLE "user" RENAME COLUMN password_hash TO pw});
is(sq($old, q{SELECT exclude_columns FROM mqtt_emit.watched_tables WHERE table_name = '"user"'::regclass}),
	'{pw}', 'a rename after the update is followed');
sq($old, q{INSERT INTO "user" VALUES (3, 'three', 'SECRET-3')});
my $u3 = wait_published($old, 'user', 3);
ok(defined $u3 && $u3 !~ /SECRET|"pw"/, 'the renamed column stays excluded');

sq($old, q{CREATE TABLE direct (id int PRIMARY KEY); SELECT mqtt_emit.watch('direct');
  INSERT INTO mqtt_emit.listeners (model, listener) VALUES ('direct', 'on_user(mqtt_emit.event)')});
sq($old, q{INSERT INTO direct VALUES (77)});
ok(poll_until(sub { (calls_for(77) // '') eq 'local/local' }, $T),
	'a listener inserted directly into the registry runs');

my $st = JSON::PP::decode_json(sq($old, 'SELECT row_to_json(s) FROM mqtt_emit.stats s'));
ok(exists $st->{stats_reset} && exists $st->{oldest_waiting_seconds}, 'stats has the 0.2.0 columns');
sq($old, 'SELECT mqtt_emit.stats_reset()');
is(sq($old, 'SELECT listener_calls FROM mqtt_emit.stats'), '0', 'stats_reset() works after the update');

# retain_last on a table watched since 0.1.0: its row's state is retained
sq($old, q{SELECT mqtt_emit.watch('"order"', columns => '{id,total}', retain_last => true)});
is(sq($old, q{SELECT retain_last || ' ' || columns::text FROM mqtt_emit.watched_tables WHERE table_name = '"order"'::regclass}),
	'true {id,total}', 'after the update: watch() takes retain_last, and the view shows it');
sq($old, q{INSERT INTO "order" VALUES (9, 9.5, 'SECRET-NOTE-9')});
ok(poll_until(sub { grep { $_->[0] eq "$prefix/order/state/9" } $sub->messages }, $T),
	'after the update: the state of the row is published');
my $later = start_subscriber($broker, "$prefix/order/state/#");
is(join(' ', map { "$_->{retain} $_->{payload}" } grep { $_->{topic} eq "$prefix/order/state/9" } $later->records),
	'1 {"id":9,"total":9.5}', 'a later subscriber gets it retained, with the listed columns only');
$later->stop;

# ---------------------------------------------------------------------------
# the updated schema is a fresh install's
# ---------------------------------------------------------------------------

my $catalog = q{
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'pg_mqtt_emit'),
nsp AS (SELECT oid FROM pg_namespace WHERE nspname = 'mqtt_emit'),
rels AS (SELECT c.* FROM pg_class c, nsp WHERE c.relnamespace = nsp.oid)
SELECT line FROM (
  SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid) AS line
    FROM pg_depend d, ext
   WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
  UNION ALL
  SELECT 'extension ' || e.extname || ' relocatable=' || e.extrelocatable
         || ' config=' || coalesce((SELECT string_agg(x::regclass::text, ',' ORDER BY x::regclass::text)
                                      FROM unnest(e.extconfig) x), '')
         || ' conditions=' || coalesce(array_to_string(e.extcondition, ','), '')
    FROM pg_extension e WHERE e.extname = 'pg_mqtt_emit'
  UNION ALL
  SELECT 'function ' || p.oid::regprocedure || ' -> ' || pg_get_function_result(p.oid)
         || ' args(' || pg_get_function_arguments(p.oid) || ')'
         || ' lang=' || l.lanname || ' kind=' || p.prokind::text || ' volatile=' || p.provolatile::text
         || ' strict=' || p.proisstrict || ' secdef=' || p.prosecdef || ' parallel=' || p.proparallel::text
         || ' config=' || coalesce(p.proconfig::text, '') || ' acl=' || coalesce(p.proacl::text, '')
         || ' src=' || md5(p.prosrc) || ' bin=' || coalesce(p.probin, '')
         || ' comment=' || coalesce(obj_description(p.oid, 'pg_proc'), '')
    FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang, nsp
   WHERE p.pronamespace = nsp.oid
  UNION ALL
  SELECT 'relation ' || c.relname || ' kind=' || c.relkind::text || ' acl=' || coalesce(c.relacl::text, '')
         || ' rls=' || c.relrowsecurity || '/' || c.relforcerowsecurity
         || ' options=' || coalesce(c.reloptions::text, '')
         || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '')
         || CASE WHEN c.relkind = 'v' THEN ' view=' || pg_get_viewdef(c.oid) ELSE '' END
    FROM rels c
  UNION ALL
  SELECT 'column ' || c.relname || '.' || a.attname || ' #' || a.attnum
         || ' ' || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull
         || ' default=' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '')
         || ' acl=' || coalesce(a.attacl::text, '')
    FROM rels c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
  UNION ALL
  SELECT 'type ' || t.typname || ' type=' || t.typtype::text
    FROM pg_type t, nsp WHERE t.typnamespace = nsp.oid
  UNION ALL
  SELECT 'constraint ' || c.relname || '.' || co.conname || ' ' || pg_get_constraintdef(co.oid)
    FROM rels c JOIN pg_constraint co ON co.conrelid = c.oid
  UNION ALL
  SELECT 'index ' || pg_get_indexdef(i.indexrelid)
    FROM rels c JOIN pg_index i ON i.indrelid = c.oid
  UNION ALL
  SELECT 'trigger ' || pg_get_triggerdef(tg.oid) || ' enabled=' || tg.tgenabled::text
    FROM rels c JOIN pg_trigger tg ON tg.tgrelid = c.oid
  UNION ALL
  SELECT 'policy ' || c.relname || '.' || po.polname || ' cmd=' || po.polcmd::text
         || ' permissive=' || po.polpermissive || ' roles=' || po.polroles::regrole[]::text
         || ' using=' || coalesce(pg_get_expr(po.polqual, po.polrelid), '')
         || ' check=' || coalesce(pg_get_expr(po.polwithcheck, po.polrelid), '')
    FROM rels c JOIN pg_policy po ON po.polrelid = c.oid
  UNION ALL
  SELECT 'sequence ' || c.relname || ' ' || s.seqtypid::regtype || ' ' || s.seqstart || ' '
         || s.seqincrement || ' ' || s.seqmax || ' ' || s.seqmin || ' ' || s.seqcache || ' ' || s.seqcycle
    FROM rels c JOIN pg_sequence s ON s.seqrelid = c.oid
  UNION ALL
  SELECT 'event trigger ' || et.evtname || ' on ' || et.evtevent || ' ' || et.evtfoid::regproc
         || ' tags=' || coalesce(et.evttags::text, '') || ' enabled=' || et.evtenabled::text
    FROM pg_event_trigger et
  UNION ALL
  SELECT 'schema ' || n.nspname || ' acl=' || coalesce(n.nspacl::text, '')
    FROM pg_namespace n, nsp WHERE n.oid = nsp.oid
) x ORDER BY line};

my @a = split /\n/, sq($old, $catalog);
my @b = split /\n/, sq($fresh, $catalog);
my %in_b = map { $_ => 1 } @b;
my %in_a = map { $_ => 1 } @a;
my @only_updated = grep { !$in_b{$_} } @a;
my @only_fresh   = grep { !$in_a{$_} } @b;
ok(@a > 100, 'the catalog listing covers the extension (' . scalar(@a) . ' lines)');
is(scalar(@only_updated) + scalar(@only_fresh), 0,
	'the updated extension equals a fresh 0.2.0 install')
  or diag(join("\n", (map { "only after the update: $_" } @only_updated),
		(map { "only in a fresh install: $_" } @only_fresh)));

done_testing();
