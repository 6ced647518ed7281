#!/usr/bin/perl
#
# 054_dump_restore.pl: pg_dump -Fc of a database that uses pg_mqtt_emit,
# pg_restore into a fresh cluster with the library preloaded, and the
# restored server must behave exactly as the original (DESIGN 10,
# "dump/restore restores exactly the same published columns and live
# listeners").
#
# The source has tables that once had a column dropped (so pg_dump writes
# them with other column numbers), with exclude_columns and columns, one
# whose excluded column was renamed before the dump, and a partitioned
# table whose partition numbers its columns differently, one watched with
# retain_last; a local listener and a remote one (events from a third node,
# "peer").
#
# After the restore, without a restart:
#   - the restored worker runs the listeners at once: it subscribes for the
#     remote listener and runs the local one (bounded polls),
#   - the same writes on source and restored server publish the same bytes
#     (but for eventId, timestamp and origin), secrets excluded on both;
#   - the retain_last table keeps the setting: the restored server sets
#     its rows' retained state.
use strict;
use warnings;

use IPC::Run ();
use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 30;
my $prefix = topic_prefix();
my $broker = start_broker();
my $src    = new_node('src', broker => $broker);
my $peer   = new_node('peer', broker => $broker);
my $sub    = start_subscriber($broker, "$prefix/#");

sub sq { my ($node, $sql) = @_; return $node->safe_psql('postgres', $sql); }

sq($_, 'CREATE EXTENSION pg_mqtt_emit') for ($src, $peer);
sq($peer, q{CREATE TABLE peer (id int PRIMARY KEY); SELECT mqtt_emit.watch('peer');});

sq($src, q{
CREATE TABLE "user" (id int PRIMARY KEY, gone text, name text, password_hash text, note text);
ALTER TABLE "user" DROP COLUMN gone;
SELECT mqtt_emit.watch('"user"', exclude_columns => '{password_hash}');
CREATE TABLE "order" (id int PRIMARY KEY, gone int, total numeric, note text);
ALTER TABLE "order" DROP COLUMN gone;
SELECT mqtt_emit.watch('"order"', columns => '{id,total}');
CREATE TABLE acct (id int PRIMARY KEY, gone int, login text, secret text);
ALTER TABLE acct DROP COLUMN gone;
SELECT mqtt_emit.watch('acct', exclude_columns => '{secret}');
ALTER TABLE acct RENAME COLUMN secret TO token;
CREATE TABLE ev (id int, secret text, v text) PARTITION BY RANGE (id);
CREATE TABLE ev_1 (junk int, v text, secret text, id int);
ALTER TABLE ev_1 DROP COLUMN junk;
ALTER TABLE ev ATTACH PARTITION ev_1 FOR VALUES FROM (0) TO (100);
SELECT mqtt_emit.watch('ev', model => 'event', exclude_columns => '{secret}');
CREATE TABLE st (id int PRIMARY KEY, gone int, v text, secret text);
ALTER TABLE st DROP COLUMN gone;
SELECT mqtt_emit.watch('st', exclude_columns => '{secret}', retain_last => true);

CREATE TABLE calls (n serial, who text, source text, model text, id text);
CREATE FUNCTION on_local(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, model, id) VALUES ('local', e.source, e.model, e.result->>'id'); END $$;
CREATE FUNCTION on_remote(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.calls (who, source, model, id) VALUES ('remote', e.source, e.model, e.result->>'id'); END $$;
SELECT mqtt_emit.listen('user', 'on_local(mqtt_emit.event)');
SELECT mqtt_emit.listen('event', 'on_local(mqtt_emit.event)', operations => '{create}');
SELECT mqtt_emit.listen('peer', 'on_remote(mqtt_emit.event)', allow_remote => true, remote_only => true);
});

# the same writes, on any node: six events
sub write_round
{
	my ($node, $id) = @_;
	sq($node, qq{
INSERT INTO "user" VALUES ($id, 'name$id', 'SECRET-HASH-$id', 'note$id');
INSERT INTO "order" VALUES ($id, $id.25, 'SECRET-NOTE-$id');
INSERT INTO acct VALUES ($id, 'login$id', 'SECRET-TOKEN-$id');
INSERT INTO ev VALUES ($id, 'SECRET-EV-$id', 'v$id');
UPDATE "user" SET name = 'renamed$id', password_hash = 'SECRET-NEW-$id' WHERE id = $id;
DELETE FROM "order" WHERE id = $id;});
}

# [topic, payload without eventId, timestamp, origin] of $node's events of round $id
sub round_messages
{
	my ($node, $id) = @_;
	my $cid = $node->{mqtt_emit}{client_id};
	my @out;
	for my $m ($sub->messages)
	{
		my $d = eval { JSON::PP::decode_json($m->[1]) } or next;
		next unless ($d->{origin} // '') eq $cid && ref $d->{result} eq 'HASH'
		  && ($d->{result}{id} // -1) == $id;
		(my $p = $m->[1]) =~ s/,"(?:timestamp|eventId|origin)":"(?:[^"\\]|\\.)*"//g;
		push @out, [ $m->[0], $p ];
	}
	return @out;
}

sub calls
{
	my ($node, $id) = @_;
	return sq($node, qq{SELECT coalesce(string_agg(c, ',' ORDER BY c), '')
  FROM (SELECT who || '/' || source || '/' || model AS c FROM calls WHERE id = '$id') x});
}

ok($broker->wait_for_subscription($src->{mqtt_emit}{client_id} . '-subscriber', "$prefix/peer/#", $T),
	'source: subscribed for its remote listener');
write_round($src, 1);
sq($peer, 'INSERT INTO peer VALUES (1)');
ok(poll_until(sub { round_messages($src, 1) == 6 }, $T), 'source: six events published');
ok(poll_until(sub { calls($src, 1) eq 'local/local/event,local/local/user,local/local/user,remote/remote/peer' }, $T),
	'source: local and remote listeners ran')
  or diag('calls: ' . calls($src, 1));

# ---------------------------------------------------------------------------
# dump, restore into a fresh cluster
# ---------------------------------------------------------------------------

my $dump = PostgreSQL::Test::Utils::tempdir() . '/src.dump';
command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $src->connstr('postgres') ], 'pg_dump -Fc');
my ($sql_text) = ('');
IPC::Run::run([ 'pg_restore', '-f', '-', $dump ], '>', \$sql_text);
like($sql_text, qr/mqtt_emit\.capture\('user', 'true', 'exclude_columns', 'password_hash'\)/,
	'the dump names the excluded column');
like($sql_text, qr/mqtt_emit\.capture\('acct', 'true', 'exclude_columns', 'token'\)/,
	'the dump names a renamed excluded column by its new name');
like($sql_text, qr/COPY mqtt_emit\.listeners /, 'the dump has the listener registry');
like($sql_text, qr/mqtt_emit\.capture\('st', 'retain_last', 'exclude_columns', 'secret'\)/,
	'the dump has the retain_last setting');

my $dst = new_node('dst', broker => $broker);
my $dst_sub_log = $broker->log_position;
command_ok([ 'pg_restore', '--exit-on-error', '-d', $dst->connstr('postgres'), $dump ],
	'pg_restore into a fresh cluster');

# live at once: the subscription, and the local listener
ok($broker->wait_for_subscription($dst->{mqtt_emit}{client_id} . '-subscriber', "$prefix/peer/#", 15,
		$dst_sub_log),
	'restored: the worker subscribed for the restored remote listener without a restart');
is(sq($dst, 'SELECT count(*) FROM mqtt_emit.listeners'), '3', 'restored: three listeners');
is( sq($dst, q{SELECT string_agg(table_name || ' ' || coalesce(columns::text, '-') || ' ' || coalesce(exclude_columns::text, '-') || ' ' || retain_last, '; ' ORDER BY table_name::text) FROM mqtt_emit.watched_tables}),
	sq($src, q{SELECT string_agg(table_name || ' ' || coalesce(columns::text, '-') || ' ' || coalesce(exclude_columns::text, '-') || ' ' || retain_last, '; ' ORDER BY table_name::text) FROM mqtt_emit.watched_tables}),
	'restored: the same watched tables, column lists and retain_last');
isnt(sq($dst, q{SELECT attnum FROM pg_attribute WHERE attrelid = '"user"'::regclass AND attname = 'password_hash'}),
	sq($src, q{SELECT attnum FROM pg_attribute WHERE attrelid = '"user"'::regclass AND attname = 'password_hash'}),
	'restored: the excluded column has another number (the case that needs names)');

# the same writes publish the same bytes
write_round($src, 2);
write_round($dst, 2);
ok(poll_until(sub { round_messages($src, 2) == 6 && round_messages($dst, 2) == 6 }, $T),
	'both: six events of the same writes');
my @s = round_messages($src, 2);
my @d = round_messages($dst, 2);
is_deeply(\@d, \@s, 'restored server publishes the same bytes as the source')
  or diag(join("\n", map { "src: $_->[0] $_->[1]" } @s), "\n",
	join("\n", map { "dst: $_->[0] $_->[1]" } @d));
ok(!grep({ $_->[1] =~ /SECRET/ } @d, @s), 'no excluded or unlisted value is published');
like(($d[0] // [ '', '' ])->[1], qr/"result":\{"id":2,"name":"name2","note":"note2"\}/,
	'restored: the user event has exactly the published columns');

ok(poll_until(sub { calls($dst, 2) eq 'local/local/event,local/local/user,local/local/user' }, $T),
	'restored: the local listeners ran')
  or diag('calls: ' . calls($dst, 2));
sq($peer, 'INSERT INTO peer VALUES (2)');
ok(poll_until(sub { calls($dst, 2) =~ m{remote/remote/peer} }, $T),
	'restored: the remote listener ran for an event of another node');
is(sq($dst, 'SELECT listener_errors FROM mqtt_emit.stats'), '0', 'restored: no listener errors');

# retain_last after the restore: the restored server sets and clears states
sq($dst, q{INSERT INTO st VALUES (5, 'five', 'SECRET-ST-5'), (6, 'six', 'SECRET-ST-6');
  DELETE FROM st WHERE id = 6});
ok(poll_until(sub { grep { $_->[0] eq "$prefix/st/state/6" && $_->[1] eq '' } $sub->messages }, $T),
	'restored: the state messages are published');
my $later = start_subscriber($broker, "$prefix/st/state/#");
is(join('; ', map { "$_->{topic} $_->{retain} $_->{payload}" } $later->records),
	"$prefix/st/state/5 1 {\"id\":5,\"v\":\"five\"}",
	'restored: a later subscriber gets the retained state of the remaining row, without the secret');
$later->stop;

done_testing();
