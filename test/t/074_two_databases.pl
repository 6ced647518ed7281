#!/usr/bin/perl
#
# 074_two_databases.pl: the extension in several databases of one server
# (README "Scaling out", "Several databases of a server").
#
# One mosquitto; server S1 with mqtt_emit.max_databases = 3, server S2.
#   S1/postgres (mqtt_emit.database) watches "a"; its listener on "a" has
#     allow_remote, so it sees its own events once (local) and drops their
#     echo; it listens remotely for "b"
#   S1/db2 watches "b" (the same allow_remote listener on "b"), listens
#     remotely for "a"
#   S2/postgres listens remotely for "a" and "b"
# Events flow between the two databases of S1 through the broker exactly
# as between servers, with exact counts; each database's mqtt_emit.stats
# counts its own events; client ids are distinct and stable.  Then:
# CREATE EXTENSION in db3 starts its workers (bounded poll, time printed);
# a fourth database finds no free slot (53400); DROP EXTENSION in db3 stops
# its workers and frees the slot; ALTER DATABASE RENAME and DROP DATABASE
# (no FORCE) of a database whose workers run succeed; on S2, too few
# max_worker_processes for a fourth database is refused (53400), and a
# template with the extension gets no workers while a database created
# from it does; a restart of S1 brings the workers of every database back.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP ();
use Time::HiRes ();

my $T      = 60;
my $NA     = 100;    # events of a, in 10 transactions
my $NB     = 50;     # events of b, in 5 transactions
my $prefix = topic_prefix();
my $broker = start_broker();

my $S1 = new_node('s1', broker => $broker, 'mqtt_emit.max_databases' => '3',
	max_worker_processes => '12', max_prepared_transactions => '2');
my $S2 = new_node('s2', broker => $broker);
my $id1 = $S1->{mqtt_emit}{client_id};

sub q1 { my ($node, $db, $sql) = @_; return $node->safe_psql($db, $sql); }

sub dbstats
{
	my ($node, $db) = @_;
	my ($rc, $out) = $node->psql($db, 'SELECT row_to_json(s) FROM mqtt_emit.stats s');
	return undef if $rc != 0 || !defined $out || $out eq '';
	return JSON::PP->new->decode($out);
}

# our workers connected to database $db of $node
sub workers_in
{
	my ($node, $db) = @_;
	return q1($node, 'postgres', qq{SELECT count(*) FROM pg_stat_activity
	   WHERE backend_type IN ('pg_mqtt_emit', 'pg_mqtt_emit listeners') AND datname = '$db'});
}

my $setup = q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE runs (model text, id int, source text, origin text, event_id text);
	CREATE FUNCTION rec(e mqtt_emit.event) RETURNS void LANGUAGE sql AS
	  $$ INSERT INTO runs VALUES (e.model, (e.result->>'id')::int, e.source, e.origin, e.event_id) $$;
};
q1($S1, 'postgres', 'CREATE DATABASE db2');
q1($S1, 'postgres', $setup . q{
	CREATE TABLE a (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('a');
	SELECT mqtt_emit.listen('a', 'rec(mqtt_emit.event)', allow_remote => true);
	SELECT mqtt_emit.listen('b', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
q1($S1, 'db2', $setup . q{
	CREATE TABLE b (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('b');
	SELECT mqtt_emit.listen('b', 'rec(mqtt_emit.event)', allow_remote => true);
	SELECT mqtt_emit.listen('a', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
q1($S2, 'postgres', $setup . q{
	SELECT mqtt_emit.listen('a', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true);
	SELECT mqtt_emit.listen('b', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true);
});

sub acked
{
	my ($node, $db, @models) = @_;
	my $want = join("\n", map { "$prefix/$_/#|acknowledged" } sort @models);
	return poll_until(
		sub {
			q1($node, $db, 'SELECT topic_filter, state FROM mqtt_emit.subscriptions ORDER BY topic_filter COLLATE "C"')
			  eq $want;
		},
		$T);
}
ok(poll_until(sub { (dbstats($S1, 'postgres') // {})->{connected} }, $T), 'S1/postgres: publisher connected');
ok(poll_until(sub { (dbstats($S1, 'db2') // {})->{connected} }, $T), 'S1/db2: publisher connected');
ok(acked($S1, 'postgres', 'a', 'b'), 'S1/postgres: subscriptions to a and b acknowledged');
ok(acked($S1, 'db2', 'a', 'b'), 'S1/db2: subscriptions to a and b acknowledged');
ok(acked($S2, 'postgres', 'a', 'b'), 'S2: subscriptions to a and b acknowledged');
is(workers_in($S1, 'postgres'), '2', 'S1/postgres has its publisher and listener worker');
is(workers_in($S1, 'db2'), '2', 'S1/db2 has its publisher and listener worker');

my $cid1 = dbstats($S1, 'postgres')->{client_id};
my $cid2 = dbstats($S1, 'db2')->{client_id};
is($cid1, $id1, 'S1/postgres (mqtt_emit.database) keeps mqtt_emit.client_id as it is');
is($cid2, "$id1-db_db2", 'S1/db2: the client id has "-db_" and the database name appended');

# ---------------------------------------------------------------------------
# events between the databases and to S2
# ---------------------------------------------------------------------------

for my $i (1 .. 10)
{
	my $lo = ($i - 1) * 10 + 1;
	q1($S1, 'postgres', "INSERT INTO a SELECT generate_series($lo, $lo + 9)");
}
for my $i (1 .. 5)
{
	my $lo = ($i - 1) * 10 + 1;
	q1($S1, 'db2', "INSERT INTO b SELECT generate_series($lo, $lo + 9)");
}

sub runs
{
	my ($node, $db) = @_;
	return q1($node, $db,
		q{SELECT model || ':' || source || ':' || count(*) || ':' || count(DISTINCT id)
		    FROM runs GROUP BY model, source ORDER BY 1});
}
my %want = (
	'S1/postgres' => "a:local:$NA:$NA\nb:remote:$NB:$NB",
	'S1/db2'      => "a:remote:$NA:$NA\nb:local:$NB:$NB",
	'S2'          => "a:remote:$NA:$NA\nb:remote:$NB:$NB");
my %where = ('S1/postgres' => [ $S1, 'postgres' ], 'S1/db2' => [ $S1, 'db2' ], 'S2' => [ $S2, 'postgres' ]);
for my $k (sort keys %where)
{
	my ($node, $db) = @{ $where{$k} };
	ok(poll_until(sub { runs($node, $db) eq $want{$k} }, $T),
		"$k: every event ran its listener once (" . join(', ', split /\n/, $want{$k}) . ')')
	  or diag runs($node, $db);
}

# let late duplicates or echoes show up, then look again (bounded: wait for
# the self-echo counters, which come after the listeners' work)
ok(poll_until(sub { (dbstats($S1, 'postgres') // {})->{self_echo} == $NA
			&& (dbstats($S1, 'db2') // {})->{self_echo} == $NB }, $T),
	"each database dropped exactly its own events as echoes ($NA and $NB)");
for my $k (sort keys %where)
{
	my ($node, $db) = @{ $where{$k} };
	is(runs($node, $db), $want{$k}, "$k: still exactly once after the echoes came back");
}
is(q1($S1, 'db2', "SELECT DISTINCT origin FROM runs WHERE model = 'a'"), $cid1,
	"S1/db2: a's events carry S1/postgres's origin");
is(q1($S1, 'postgres', "SELECT DISTINCT origin FROM runs WHERE model = 'b'"), $cid2,
	"S1/postgres: b's events carry S1/db2's origin");

my $st1 = dbstats($S1, 'postgres');
my $st2 = dbstats($S1, 'db2');
is($st1->{published}, $NA, "S1/postgres stats: published $NA (its own events only)");
is($st2->{published}, $NB, "S1/db2 stats: published $NB (its own events only)");
is($st1->{enqueued}, $NA, "S1/postgres stats: enqueued $NA");
is($st2->{enqueued}, $NB, "S1/db2 stats: enqueued $NB");
is($st1->{listener_calls}, $NA + $NB, 'S1/postgres stats: listener calls of its own listeners ('
	  . ($NA + $NB) . ')');
is($st2->{listener_calls}, $NA + $NB, 'S1/db2 stats: listener calls of its own listeners');
isnt($st1->{worker_pid}, $st2->{worker_pid}, 'each database has its own worker');
is(q1($S1, 'db2', q{SELECT sum(calls) FROM mqtt_emit.listener_stats}), $NA + $NB,
	'S1/db2: listener_stats has its own listeners only');
q1($S1, 'db2', 'SELECT mqtt_emit.stats_reset()');
is(dbstats($S1, 'db2')->{published}, 0, 'stats_reset() in db2 resets db2');
is(dbstats($S1, 'postgres')->{published}, $NA, '... and not S1/postgres');

# ---------------------------------------------------------------------------
# CREATE EXTENSION in a third database, a fourth finds no slot
# ---------------------------------------------------------------------------

q1($S1, 'postgres', 'CREATE DATABASE db3');
q1($S1, 'postgres', 'CREATE DATABASE db4');
is(workers_in($S1, 'db3'), '0', 'db3 without the extension has no workers');
my $t0 = [Time::HiRes::gettimeofday];
q1($S1, 'db3', 'CREATE EXTENSION pg_mqtt_emit');
ok(poll_until(sub { (dbstats($S1, 'db3') // {})->{connected} }, 10),
	'CREATE EXTENSION in db3: its worker is connected within 10 s');
my $start_s = Time::HiRes::tv_interval($t0);
ok(poll_until(sub { workers_in($S1, 'db3') eq '2' }, 10), 'db3 has both workers');
diag(sprintf('CREATE EXTENSION to the worker connected: %.3f s', $start_s));

my ($rc, $out, $err) = $S1->psql('db4', 'CREATE EXTENSION pg_mqtt_emit',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
ok($rc != 0 && $err =~ /53400/ && $err =~ /no free pg_mqtt_emit database slot/
	  && $err =~ /HINT:.*mqtt_emit\.max_databases/,
	'a fourth database: no free slot (53400, with a hint)') or diag $err;

# S2 has max_worker_processes 8: room for the launcher and 3 databases
for my $db (qw(x2 x3 x4))
{
	q1($S2, 'postgres', "CREATE DATABASE $db");
}
q1($S2, 'x2', 'CREATE EXTENSION pg_mqtt_emit');
q1($S2, 'x3', 'CREATE EXTENSION pg_mqtt_emit');
($rc, $out, $err) = $S2->psql('x4', 'CREATE EXTENSION pg_mqtt_emit',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
ok($rc != 0 && $err =~ /53400/ && $err =~ /not enough background worker processes/
	  && $err =~ /needs 9/ && $err =~ /HINT:.*max_worker_processes/,
	'S2, a fourth database with max_worker_processes 8: refused (53400, with a hint)') or diag $err;
ok(poll_until(sub { workers_in($S2, 'x2') eq '2' && workers_in($S2, 'x3') eq '2' }, 10),
	'S2: x2 and x3 have their workers');
for my $db (qw(x2 x3 x4))
{
	($rc, $out, $err) = $S2->psql('postgres', "DROP DATABASE $db");
	is($rc, 0, "S2: DROP DATABASE $db succeeds") or diag $err;
}

# a template with the extension gets no workers (CREATE DATABASE would
# refuse it as a template with other sessions); a database made from it
# gets its workers when CREATE DATABASE commits
q1($S2, 'postgres', 'CREATE DATABASE tpl IS_TEMPLATE true');
q1($S2, 'tpl', 'CREATE EXTENSION pg_mqtt_emit');
($rc, $out, $err) = $S2->psql('postgres', 'CREATE DATABASE fromtpl TEMPLATE tpl');
is($rc, 0, 'S2: CREATE DATABASE from a template that has the extension succeeds') or diag $err;
ok(poll_until(sub { workers_in($S2, 'fromtpl') eq '2' }, 10),
	'S2: the database made from it has its workers');
is(workers_in($S2, 'tpl'), '0', 'S2: the template has none');
q1($S2, 'postgres', 'DROP DATABASE fromtpl');
q1($S2, 'postgres', 'ALTER DATABASE tpl IS_TEMPLATE false');
q1($S2, 'postgres', 'DROP DATABASE tpl');

# ---------------------------------------------------------------------------
# DROP EXTENSION stops the workers and frees the slot
# ---------------------------------------------------------------------------

my $db3oid = q1($S1, 'postgres', q{SELECT oid FROM pg_database WHERE datname = 'db3'});
my $db3dir = $S1->data_dir . "/pg_mqtt_emit/db$db3oid";
ok(-d $db3dir, "db3 keeps its files in pg_mqtt_emit/db$db3oid");
$t0 = [Time::HiRes::gettimeofday];
q1($S1, 'db3', 'DROP EXTENSION pg_mqtt_emit');
ok(poll_until(sub { workers_in($S1, 'db3') eq '0' }, 10), 'DROP EXTENSION in db3 stops its workers');
diag(sprintf('DROP EXTENSION to the workers gone: %.3f s', Time::HiRes::tv_interval($t0)));
ok(poll_until(sub { ($S1->psql('db4', 'CREATE EXTENSION pg_mqtt_emit'))[0] == 0 }, 10),
	"db3's slot is free again: CREATE EXTENSION in db4 works");
ok(poll_until(sub { workers_in($S1, 'db4') eq '2' }, 10), 'db4 has both workers');

# ---------------------------------------------------------------------------
# ALTER DATABASE RENAME and DROP DATABASE while the workers run
# ---------------------------------------------------------------------------

($rc, $out, $err) = $S1->psql('postgres', 'ALTER DATABASE db4 RENAME TO db4r');
is($rc, 0, 'ALTER DATABASE RENAME of a database with running workers succeeds') or diag $err;
ok(poll_until(sub { workers_in($S1, 'db4r') eq '2' }, 10), 'the renamed database has its workers again');
ok(poll_until(sub { ((dbstats($S1, 'db4r') // {})->{client_id} // '') eq "$id1-db_db4r" }, 10),
	'... with the new name in the client id');

ok(poll_until(sub { (dbstats($S1, 'db4r') // {})->{connected} }, 10), 'db4r: worker connected');
my $db4oid = q1($S1, 'postgres', q{SELECT oid FROM pg_database WHERE datname = 'db4r'});
my $db4dir = $S1->data_dir . "/pg_mqtt_emit/db$db4oid";
ok(-d $db4dir, "db4r keeps its files in pg_mqtt_emit/db$db4oid");
$t0 = [Time::HiRes::gettimeofday];
($rc, $out, $err) = $S1->psql('postgres', 'DROP DATABASE db4r');
is($rc, 0, 'DROP DATABASE of a database with running workers succeeds without FORCE') or diag $err;
diag(sprintf('DROP DATABASE took %.3f s', Time::HiRes::tv_interval($t0)));
ok(poll_until(sub { !-e $db4dir }, 10), "... and its directory pg_mqtt_emit/db$db4oid is removed");
ok(-d $S1->data_dir . '/pg_mqtt_emit', '... and pg_mqtt_emit itself (mqtt_emit.database\'s) is kept');
ok(-d $db3dir, "db3 without the extension keeps its directory");
q1($S1, 'postgres', 'DROP DATABASE db3');
ok(poll_until(sub { !-e $db3dir }, 30),
	"db3 dropped after its extension: its directory pg_mqtt_emit/db$db3oid is removed too");

# CREATE EXTENSION in a transaction to be prepared is refused (a prepared
# transaction's commit would start no workers), and leaves nothing behind
q1($S1, 'postgres', 'CREATE DATABASE dbp');
($rc, $out, $err) = $S1->psql('dbp', q{BEGIN; CREATE EXTENSION pg_mqtt_emit; PREPARE TRANSACTION 'cx'},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/0A000.*cannot prepare a transaction that changed pg_mqtt_emit listeners/,
	'dbp: PREPARE TRANSACTION after CREATE EXTENSION is refused (0A000)');
is(q1($S1, 'dbp', q{SELECT count(*) FROM pg_extension WHERE extname = 'pg_mqtt_emit'})
	  . q1($S1, 'dbp', 'SELECT count(*) FROM pg_prepared_xacts') . workers_in($S1, 'dbp'),
	'000', 'dbp: no extension, no prepared transaction, no workers');
q1($S1, 'postgres', 'DROP DATABASE dbp');
ok(poll_until(sub { ($S1->psql('db2', 'SELECT 1'))[0] == 0 }, 5), 'db2 is untouched');
is(runs($S1, 'db2'), $want{'S1/db2'}, 'db2 ran nothing more meanwhile');

# ---------------------------------------------------------------------------
# a restart brings every database's workers back
# ---------------------------------------------------------------------------

# a role that may not drop db2 does not stop its workers by trying: the
# pause for DROP DATABASE comes before PostgreSQL's own check
q1($S1, 'postgres', 'CREATE ROLE mallory LOGIN');
my $wpids = q{SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity
	WHERE datname = 'db2' AND backend_type LIKE 'pg_mqtt_emit%'};
my $pids0 = q1($S1, 'postgres', $wpids);
for my $sql ('DROP DATABASE db2', 'ALTER DATABASE db2 RENAME TO db2x', 'CREATE DATABASE db2copy TEMPLATE db2')
{
	my ($rc2, $o2, $e2) = $S1->psql('postgres', $sql, extra_params => [ '-U', 'mallory' ]);
	ok($rc2 != 0 && $e2 =~ /must be owner|permission denied/, "mallory: $sql is refused") or diag $e2;
}
is(q1($S1, 'postgres', $wpids), $pids0, "db2's workers ran on, the same processes ($pids0)");

$S1->restart;
ok(poll_until(sub { workers_in($S1, 'postgres') eq '2' && workers_in($S1, 'db2') eq '2' }, $T),
	'after a restart both databases have their workers again');
ok(poll_until(sub { (dbstats($S1, 'postgres') // {})->{connected} }, $T), 'S1/postgres connected again');
ok(acked($S1, 'db2', 'a', 'b'), 'S1/db2: subscriptions acknowledged again');
q1($S1, 'postgres', 'INSERT INTO a VALUES (1000)');
ok(poll_until(sub { q1($S1, 'db2', "SELECT count(*) FROM runs WHERE model = 'a' AND id = 1000") eq '1' }, $T),
	'an event of S1/postgres after the restart reaches S1/db2');
ok(poll_until(sub { q1($S2, 'postgres', "SELECT count(*) FROM runs WHERE model = 'a' AND id = 1000") eq '1' }, $T),
	'... and S2');
ok(poll_until(sub { q1($S1, 'postgres', "SELECT count(*) FROM runs WHERE model = 'a' AND id = 1000") > 0 }, $T),
	'... and ran the local listener of S1/postgres');
is(q1($S1, 'postgres', "SELECT count(*) FROM runs WHERE model = 'a' AND id = 1000"), '1',
	'... once');

done_testing();
