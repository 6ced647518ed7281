#!/usr/bin/perl
#
# 035_durable_queue.pl: durable delivery through the queue (README, "Delivery
# semantics": durable mode writes each event to the outbox and, with room in
# the queue, into the queue too; the worker publishes it from there and
# deletes the row once the broker acknowledged it).
#
#   1. Broker up: single-row and multi-row durable commits arrive in commit
#      order; the events went through the queue (stats.enqueued), none was
#      copied into the outbox by the worker (stats.outboxed); the outbox
#      drains; a local listener ran exactly once per event.
#   2. Broker down: durable commits succeed; the worker places their rows in
#      the publishing order (seq set, the "also queued" flag 4 cleared) without
#      copying them, the queue empties, and the local listener has already run
#      once per event.
#   3. Broker back: everything arrives, in commit order; the outbox drains;
#      the local listener did not run again.
#   4. Broker down again, durable commits, the worker is terminated (it is
#      restarted at once): the new worker places the rows still queued; with
#      the broker back everything arrives in commit order.
#
# The subscriber keeps a persistent session on a broker with persistence, so
# that what is published while it reconnects waits for it.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T     = 120;
my $MODEL = 'dq';

my $broker = start_broker(persistent => 1, extra_conf => ['max_queued_messages 0']);
my $node = new_node(
	'dq',
	broker                    => $broker,
	'mqtt_emit.delivery'      => 'durable',
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
$node->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE dq (id int PRIMARY KEY, v text NOT NULL);
	SELECT mqtt_emit.watch('dq', model => '$MODEL');
	CREATE TABLE seen (id int NOT NULL, source text NOT NULL);
	CREATE FUNCTION record_local(e mqtt_emit.event) RETURNS void
	LANGUAGE sql AS \$\$ INSERT INTO seen VALUES ((e.result->>'id')::int, e.source) \$\$;
	SELECT mqtt_emit.listen('$MODEL', 'record_local(mqtt_emit.event)');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
	'worker connected to the broker');
is($node->safe_psql('postgres', 'SHOW mqtt_emit.delivery'), 'durable', 'delivery is durable');

my $sub = start_subscriber($broker, topic_prefix() . "/$MODEL/#",
	clean_session => 0, client_id => "dq-$$");

sub q1 { return $node->safe_psql('postgres', $_[0]); }

# n single-row commits (ids first..first+n-1) from one session
sub commit_rows
{
	my ($first, $n, $what) = @_;
	my $last = $first + $n - 1;
	my ($rc, $out, $err) = $node->psql('postgres',
		"DO \$\$ BEGIN FOR i IN $first..$last LOOP INSERT INTO dq VALUES (i, '$what'); COMMIT; END LOOP; END \$\$",
		timeout => $T);
	is($rc, 0, "$n durable single-row commits ($what) succeed") or diag($err);
	return $first .. $last;
}

# every expected id arrived, in order (first deliveries), none missing
sub check_arrivals
{
	my ($label, @expected) = @_;
	my %want = map { $_ => 1 } @expected;
	ok( poll_until(
			sub {
				my %h = map { $_ => 1 } arrived_ids($sub, $MODEL);
				scalar(grep { $h{$_} } @expected) == @expected;
			},
			$T, 0.2),
		"$label: all " . scalar(@expected) . ' events arrive');
	my @arrived = grep { $want{$_} } arrived_ids($sub, $MODEL);
	my $r = tally($label, \@arrived, \@expected);
	is($r->{missing},  0, "$label: nothing missing");
	is($r->{disorder}, 0, "$label: in commit order");
	return $r;
}

# the local listener ran exactly once for each of these ids
sub check_local_once
{
	my ($label, $first, $last) = @_;
	my $n = $last - $first + 1;
	ok( poll_until(
			sub { q1("SELECT count(DISTINCT id) FROM seen WHERE id BETWEEN $first AND $last") == $n },
			$T),
		"$label: the local listener ran for all $n events");
	is( q1("SELECT count(*) FROM seen WHERE id BETWEEN $first AND $last"),
		$n, "$label: ... once each");
	is(q1("SELECT count(*) FROM seen WHERE id BETWEEN $first AND $last AND source <> 'local'"),
		0, "$label: ... as local events");
}

sub outbox_drained
{
	my ($label) = @_;
	ok( poll_until(
			sub {
				my $s = stats($node);
				$s && $s->{queued} == 0 && $s->{in_outbox} == 0
				  && q1('SELECT count(*) FROM mqtt_emit.outbox') == 0;
			},
			$T),
		"$label: the outbox drains (rows deleted once acknowledged) and stats.in_outbox is 0");
}

# ---------------------------------------------------------------------------
# 1. broker up
# ---------------------------------------------------------------------------

my $s0 = stats($node);
my @up = commit_rows(1, 400, 'up');
q1(q{INSERT INTO dq SELECT g, 'multi' FROM generate_series(401, 450) g});
push @up, 401 .. 450;
check_arrivals('broker up', @up);
outbox_drained('broker up');
check_local_once('broker up', 1, 450);
my $s1 = stats($node);
is($s1->{enqueued} - $s0->{enqueued}, 450, 'broker up: the 450 events went through the queue');
is($s1->{outboxed} - $s0->{outboxed}, 0, 'broker up: the worker copied nothing into the outbox');
is($s1->{published} - $s0->{published}, 450, 'broker up: 450 acknowledged publishes');

# ---------------------------------------------------------------------------
# 2. broker down
# ---------------------------------------------------------------------------

$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, $T),
	'stats.connected turns false when the broker stops');
my @down = commit_rows(1001, 300, 'down');
ok( poll_until(
		sub {
			my $s = stats($node);
			$s && $s->{queued} == 0
			  && q1('SELECT count(*) FROM mqtt_emit.outbox WHERE seq IS NOT NULL') == 300;
		},
		$T),
	'broker down: the worker places the 300 rows in the publishing order and the queue empties');
is(q1('SELECT count(*) FROM mqtt_emit.outbox'), 300, 'broker down: the outbox holds exactly the 300 rows');
# the local flag goes when the listener worker has run them (it runs apart)
ok( poll_until(sub { q1('SELECT count(*) FROM mqtt_emit.outbox WHERE (flags & 4) <> 0 OR (flags & 2) <> 0') == 0 }, $T),
	'broker down: placed rows are no longer marked as queued, nor, once their local listeners ran, as needing them')
  or diag(q1('SELECT count(*) FILTER (WHERE (flags & 4) <> 0) || \' queued, \' || count(*) FILTER (WHERE (flags & 2) <> 0) || \' local\' FROM mqtt_emit.outbox'));
is( q1(
		"SELECT bool_and(a.seq < b.seq) FROM mqtt_emit.outbox a JOIN mqtt_emit.outbox b
		   ON (b.payload::jsonb #>> '{result,id}')::int = (a.payload::jsonb #>> '{result,id}')::int + 1"),
	't', 'broker down: seq follows the commit order');
is(stats($node)->{outboxed} - $s1->{outboxed}, 0, 'broker down: rows were placed, not copied');
check_local_once('broker down', 1001, 1300);

# ---------------------------------------------------------------------------
# 3. broker back
# ---------------------------------------------------------------------------

$broker->start;
check_arrivals('broker back', @up, @down);
outbox_drained('broker back');
check_local_once('broker back', 1001, 1300);

# ---------------------------------------------------------------------------
# 4. worker terminated while durable events wait in the queue
# ---------------------------------------------------------------------------

$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, $T),
	'stats.connected turns false again');
my $old_pid = stats($node)->{worker_pid};
my @more = commit_rows(2001, 200, 'restart');
q1("SELECT pg_terminate_backend($old_pid)");
ok( poll_until(
		sub {
			my $s = stats($node);
			$s && $s->{worker_pid} && $s->{worker_pid} != $old_pid;
		},
		$T),
	'a new worker runs');
my @after = commit_rows(2201, 50, 'after restart');
ok( poll_until(
		sub {
			my $s = stats($node);
			$s && $s->{queued} == 0
			  && q1('SELECT count(*) FROM mqtt_emit.outbox WHERE seq IS NOT NULL') == 250;
		},
		$T),
	'the new worker places the 250 rows');
$broker->start;
check_arrivals('after worker restart', @up, @down, @more, @after);
outbox_drained('after worker restart');
ok( poll_until(
		sub { q1('SELECT count(DISTINCT id) FROM seen WHERE id BETWEEN 2001 AND 2250') == 250 },
		$T),
	'after worker restart: the local listener ran for all 250 events (at least once)');

done_testing();
