#!/usr/bin/perl
#
# 031_durable_crash.pl: mqtt_emit.delivery = durable across a crash
# (doc/DESIGN.md section 6: "PostgreSQL crash / immediate shutdown: in durable
# mode ... nothing committed is lost"; "transaction rolls back: nothing
# published").
#
#   1. With the broker stopped, a mix of work is committed and rolled back:
#      single-row commits, multi-row commits, whole-transaction rollbacks,
#      transactions aborted by an error, savepoints rolled back (also nested)
#      inside committed transactions, exception blocks, and commits by an
#      ordinary role.  The outbox must then hold exactly the committed events
#      (written by the committing transactions themselves) and none of the
#      rolled-back ones.
#   2. pg_ctl stop -m immediate (a crash: no shutdown work at all), broker and
#      node started again: every committed event arrives, in commit order, and
#      no rolled-back one ever does.
#   3. A crash while the worker is publishing (broker up): the same.
#   4. The outbox is not readable (nor writable) by an ordinary role, nor by a
#      pg_monitor member; an ordinary role cannot switch delivery back to
#      memory.
#
# The subscriber keeps a clean session: the node is down while the broker
# restarts, and it is started only after the subscriber has subscribed again
# (wait_ready), so nothing can be published before the subscription is live.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T     = 120;
my $MODEL = 'durable';

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# Runs $sql (a psql script) as $user; returns the SQLSTATE of the first
# error, or '' when it succeeded.
sub sqlstate_as
{
	my ($node, $user, $sql) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		extra_params => [ '-U', $user ]);
	return '' if $rc == 0;
	return $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : "rc $rc: $err";
}

# The result.id of every row in the outbox (superuser view).
sub outbox_ids
{
	my ($node) = @_;
	return split /\n/, $node->safe_psql('postgres',
		"SELECT payload::jsonb #>> '{result,id}' FROM mqtt_emit.outbox ORDER BY id");
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

# mosquitto silently drops QoS 1 messages for a subscriber that falls more
# than max_queued_messages (default 1000) behind: lift the limit, so that a
# missing message is the extension's doing, and check the broker's log.
my $broker = start_broker(extra_conf => ['max_queued_messages 0']);
my $node   = new_node(
	'durable',
	broker                    => $broker,
	# part 5 holds a commit with synchronous replication, which needs
	# wal senders (wal_level replica)
	init                      => { allows_streaming => 1 },
	'mqtt_emit.delivery'      => 'durable',
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
$node->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE ev (id int PRIMARY KEY, v text NOT NULL);
	SELECT mqtt_emit.watch('ev', model => '$MODEL');
	CREATE ROLE app LOGIN;
	GRANT SELECT, INSERT ON ev TO app;
	CREATE ROLE mon LOGIN IN ROLE pg_monitor;
});
is($node->safe_psql('postgres', 'SHOW mqtt_emit.delivery'), 'durable',
	'mqtt_emit.delivery = durable');
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
	'worker connected to the broker');
my $sub = start_subscriber($broker, topic_prefix() . "/$MODEL/#");

# one event end to end while everything is up
$node->safe_psql('postgres', "INSERT INTO ev VALUES (0, 'up')");
ok(poll_until(sub { grep { $_ eq '0' } arrived_ids($sub, $MODEL) }, $T),
	'an event arrives while the broker is up (durable mode)');
ok( poll_until(
		sub { $node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox') eq '0' },
		$T),
	'its outbox row is deleted once the broker acknowledged it');

# ---------------------------------------------------------------------------
# 4. privileges (checked first, with the broker up)
# ---------------------------------------------------------------------------

is(sqlstate_as($node, 'app', 'SELECT count(*) FROM mqtt_emit.outbox'),
	'42501', 'an ordinary role cannot read mqtt_emit.outbox');
is(sqlstate_as($node, 'app', 'SELECT id FROM mqtt_emit.outbox LIMIT 1'),
	'42501', 'nor select its ids');
is(sqlstate_as($node, 'app', 'DELETE FROM mqtt_emit.outbox'),
	'42501', 'nor delete from it');
is(sqlstate_as($node, 'app', "UPDATE mqtt_emit.outbox SET payload = 'x'"),
	'42501', 'nor update it');
is( sqlstate_as(
		$node, 'app',
		"INSERT INTO mqtt_emit.outbox (kind, flags, op, qos, model, payload) VALUES (1, 1, 0, 1, 'x', '{}')"),
	'42501',
	'nor insert into it');
is(sqlstate_as($node, 'app', 'TRUNCATE mqtt_emit.outbox'),
	'42501', 'nor truncate it');
is(sqlstate_as($node, 'app', "SELECT nextval('mqtt_emit.outbox_id_seq')"),
	'42501', 'nor use its sequence');
is(sqlstate_as($node, 'app', 'SELECT count(*) FROM mqtt_emit.dead_letters'),
	'42501', 'an ordinary role cannot read mqtt_emit.dead_letters');
is(sqlstate_as($node, 'app', 'SET mqtt_emit.delivery = memory'),
	'42501', 'an ordinary role cannot switch delivery to memory');
is(sqlstate_as($node, 'mon', 'SELECT count(*) FROM mqtt_emit.outbox'),
	'42501', 'a pg_monitor member cannot read mqtt_emit.outbox either');
is(sqlstate_as($node, 'mon', 'SELECT in_outbox FROM mqtt_emit.stats'),
	'', 'a pg_monitor member reads mqtt_emit.stats');

# ---------------------------------------------------------------------------
# 1. work committed and rolled back while the broker is down
# ---------------------------------------------------------------------------

$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, $T),
	'stats.connected turns false when the broker stops');

my @committed;    # ids, in commit order
my @rolledback;   # ids that must never be published

# a) 1000 single-row commits from one session
$node->safe_psql('postgres',
	q{DO $$ BEGIN FOR i IN 1..1000 LOOP INSERT INTO ev VALUES (i, 'single'); COMMIT; END LOOP; END $$});
push @committed, 1 .. 1000;

# b) 200 whole-transaction rollbacks
$node->safe_psql('postgres',
	q{DO $$ BEGIN FOR i IN 100001..100200 LOOP INSERT INTO ev VALUES (i, 'rolled back'); ROLLBACK; END LOOP; END $$});
push @rolledback, 100001 .. 100200;

# c) savepoints: 100 committed transactions, each with a rolled-back
#    savepoint, a nested savepoint rolled back inside a released one, and a
#    PL/pgSQL exception block (a subtransaction that aborts)
{
	my $script = '';
	for my $k (0 .. 99)
	{
		my ($a, $b, $c) = (1001 + 3 * $k, 1002 + 3 * $k, 1003 + 3 * $k);
		my ($r1, $r2, $r3) = (200001 + 3 * $k, 200002 + 3 * $k, 200003 + 3 * $k);
		$script .= <<"SQL";
BEGIN;
INSERT INTO ev VALUES ($a, 'kept before savepoint');
SAVEPOINT s1;
INSERT INTO ev VALUES ($r1, 'rolled back to s1');
ROLLBACK TO SAVEPOINT s1;
SAVEPOINT outer_sp;
INSERT INTO ev VALUES ($b, 'kept in released savepoint');
SAVEPOINT inner_sp;
INSERT INTO ev VALUES ($r2, 'rolled back to inner_sp');
ROLLBACK TO SAVEPOINT inner_sp;
RELEASE SAVEPOINT outer_sp;
DO \$\$ BEGIN INSERT INTO ev VALUES ($r3, 'exception block'); RAISE EXCEPTION 'undo'; EXCEPTION WHEN raise_exception THEN NULL; END \$\$;
INSERT INTO ev VALUES ($c, 'kept after savepoints');
COMMIT;
SQL
		push @committed,  $a,  $b,  $c;
		push @rolledback, $r1, $r2, $r3;
	}
	$node->safe_psql('postgres', $script);
}

# d) 50 transactions aborted by an error after inserting a row (a duplicate
#    key); psql goes on after each (ON_ERROR_STOP off)
{
	my $script = '';
	for my $k (0 .. 49)
	{
		my $r = 300001 + $k;
		$script .= "BEGIN;\nINSERT INTO ev VALUES ($r, 'aborted by error');\n"
		  . "INSERT INTO ev VALUES (1, 'duplicate');\nCOMMIT;\n";
		push @rolledback, $r;
	}
	my ($rc, $out, $err) = $node->psql('postgres', $script, on_error_stop => 0);
	my $n = () = $err =~ /duplicate key value/g;
	is($n, 50, '50 transactions failed on a duplicate key');
}

# e) 5 multi-row commits of 100 rows
$node->safe_psql('postgres',
	q{DO $$ BEGIN FOR b IN 0..4 LOOP INSERT INTO ev SELECT g, 'multi' FROM generate_series(2001 + 100 * b, 2100 + 100 * b) g; COMMIT; END LOOP; END $$});
push @committed, 2001 .. 2500;

# f) an ordinary role commits 50 rows (and rolls back 10)
{
	my ($rc, $out, $err) = $node->psql(
		'postgres',
		q{DO $$ BEGIN FOR i IN 3001..3050 LOOP INSERT INTO ev VALUES (i, 'app'); COMMIT; END LOOP;
		             FOR i IN 400001..400010 LOOP INSERT INTO ev VALUES (i, 'app rolled back'); ROLLBACK; END LOOP; END $$},
		extra_params => [ '-U', 'app' ]);
	is($rc, 0, 'an ordinary role commits in durable mode while the broker is down')
	  or diag($err);
	push @committed,  3001 .. 3050;
	push @rolledback, 400001 .. 400010;
}

my $ncommitted = scalar @committed;
is( $node->safe_psql('postgres', 'SELECT string_agg(id::text, \',\' ORDER BY id) FROM ev WHERE id > 0'),
	join(',', sort { $a <=> $b } @committed),
	"the table holds exactly the $ncommitted committed rows");

my @in_outbox = outbox_ids($node);
my %rb        = map { $_ => 1 } @rolledback;
is(scalar @in_outbox, $ncommitted,
	"the outbox holds exactly $ncommitted rows, one per committed event");
is_deeply(\@in_outbox, \@committed,
	'the outbox holds the committed events in commit order');
is(scalar(grep { $rb{$_} } @in_outbox), 0,
	'no rolled-back event is in the outbox');
# stats.in_outbox is approximate while commits come (a row committed while
# the worker counts); the idle worker recounts it
ok(poll_until(sub { my $st = stats($node); $st && $st->{in_outbox} == $ncommitted }, $T),
	"stats.in_outbox = $ncommitted")
  or diag('in_outbox: ' . (stats($node) // {})->{in_outbox});
# durable events go through the queue too when it has room; with the broker
# away the worker lets go of them (their rows are in the outbox): poll
ok(poll_until(sub { my $st = stats($node); $st && $st->{queued} == 0 }, $T),
	'nothing waits in the shared-memory queue in durable mode')
  or diag('queued: ' . (stats($node) // {})->{queued});
is(scalar(my @a = arrived_ids($sub, $MODEL)), 1,
	'nothing arrived during the outage (sanity: the broker is really down)');

# ---------------------------------------------------------------------------
# 2. crash (immediate shutdown), then broker and node back
# ---------------------------------------------------------------------------

$node->stop('immediate');
my $port = $broker->port;
$broker->start;
is($broker->port, $port, 'broker back on the same port');
ok($sub->wait_ready($T), 'subscriber subscribed again before the node starts');
$node->start;

my @expected = (0, @committed);
ok( poll_until(
		sub {
			my %h = map { $_ => 1 } arrived_ids($sub, $MODEL);
			scalar(grep { $h{$_} } @expected) == @expected;
		},
		$T, 0.5),
	"all $ncommitted events committed before the crash arrive after it");
ok( poll_until(
		sub {
			my $st = stats($node);
			$st && $st->{connected} && $st->{in_outbox} == 0;
		},
		$T),
	'stats.in_outbox returns to 0');
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox'),
	0, 'mqtt_emit.outbox is empty');

my $marker = 900001;
$node->safe_psql('postgres', "INSERT INTO ev VALUES ($marker, 'marker')");
ok(poll_until(sub { grep { $_ eq $marker } arrived_ids($sub, $MODEL) }, $T),
	'marker after the crash arrives');

my @arrived = grep { $_ ne $marker } arrived_ids($sub, $MODEL);
my $r = tally('durable crash', \@arrived, \@expected, \@rolledback);
is($r->{missing},   0, 'no committed event is missing after the crash');
is($r->{forbidden}, 0, 'no rolled-back event was ever published');
is($r->{unexpected}, 0, 'nothing but committed events arrived');
is($r->{disorder},  0, 'events arrived in commit order');
note "duplicates after the crash: $r->{duplicates} (allowed)";

# ---------------------------------------------------------------------------
# 3. crash while the worker is publishing (broker up)
# ---------------------------------------------------------------------------

my $cursor = scalar(my @all = arrived_ids($sub, $MODEL));
$node->safe_psql('postgres',
	q{DO $$ BEGIN FOR i IN 5001..7000 LOOP INSERT INTO ev VALUES (i, 'burst'); COMMIT; END LOOP; END $$});
my $at_crash = stats($node);
$node->stop('immediate');
my @burst = (5001 .. 7000);
my $before_crash = scalar(my @b = grep { $_ >= 5001 && $_ <= 7000 } arrived_ids($sub, $MODEL));
note sprintf('crash during publishing: %d of %d burst events had arrived, %s in the outbox at the crash',
	$before_crash, scalar @burst, $at_crash ? $at_crash->{in_outbox} : '?');
$node->start;
ok( poll_until(
		sub {
			my %h = map { $_ => 1 } arrived_ids($sub, $MODEL);
			scalar(grep { $h{$_} } @burst) == @burst;
		},
		$T, 0.5),
	'every event of a burst interrupted by a crash arrives');
ok( poll_until(
		sub { my $st = stats($node); $st && $st->{in_outbox} == 0 },
		$T),
	'stats.in_outbox returns to 0 after the second crash');
$marker = 900002;
$node->safe_psql('postgres', "INSERT INTO ev VALUES ($marker, 'marker')");
ok(poll_until(sub { grep { $_ eq $marker } arrived_ids($sub, $MODEL) }, $T),
	'marker after the second crash arrives');
@all = arrived_ids($sub, $MODEL);
@arrived = grep { $_ ne $marker } @all[ $cursor .. $#all ];
$r = tally('crash while publishing', \@arrived, \@burst, \@rolledback);
is($r->{missing},    0, 'no event of the burst is missing');
is($r->{unexpected}, 0, 'nothing else arrived');
is($r->{disorder},   0, 'burst events arrived in commit order');
note "duplicates after the second crash: $r->{duplicates} (allowed)";

# ---------------------------------------------------------------------------
# 5. a transaction that becomes visible after a later one
# ---------------------------------------------------------------------------
#
# A durable transaction takes its outbox ids and its place in the queue at
# PRE_COMMIT but becomes visible only when its commit completes.
# Synchronous replication to a standby that does not exist holds a commit
# in that window for as long as the test wants: session A commits with
# synchronous_commit = on and waits (its outbox row is written, not
# visible); session B commits (synchronous_commit = local).  B's place in
# the queue is after A's: B is held back while A waits (the worker goes
# through its loop and B's row stays unpublished), and once A's wait is
# cancelled both are published, A first:
#   a) with the broker up;
#   b) with the broker paused (SIGSTOP) when A is cancelled, so that both
#      are in flight at once, then continued (SIGCONT).

# bytes waiting in the receive queues of the broker's accepted connections
sub broker_rx_queued
{
	my ($port) = @_;
	my $hexport = sprintf('%04X', $port);
	open my $fh, '<', '/proc/net/tcp' or return 0;
	my $n = 0;
	while (my $l = <$fh>)
	{
		my @f = split ' ', $l;
		next unless @f > 4 && $f[1] =~ /:$hexport$/ && $f[3] eq '01';
		my (undef, $rx) = split /:/, $f[4];
		$n += hex $rx;
	}
	close $fh;
	return $n;
}

$node->append_conf('postgresql.conf',
	"synchronous_standby_names = 'no_such_standby'\nsynchronous_commit = local\n");
$node->reload;
ok( poll_until(
		sub {
			$node->safe_psql('postgres', 'SHOW synchronous_standby_names') eq 'no_such_standby';
		},
		$T),
	'late visibility: synchronous_standby_names names a missing standby');

sub late_visibility
{
	my ($label, $a_id, $b_id, $pause_broker) = @_;

	my $late = $node->background_psql('postgres', on_error_stop => 0);
	$late->query_safe('SET synchronous_commit = on');
	my ($late_pid) = $late->query_safe('SELECT pg_backend_pid()') =~ /(\d+)/;
	$late->query_until(qr/sent/, "\\echo sent\nINSERT INTO ev VALUES ($a_id, 'visible late');\n");
	ok( poll_until(
			sub {
				$node->safe_psql('postgres',
					"SELECT wait_event FROM pg_stat_activity WHERE pid = $late_pid") eq 'SyncRep';
			},
			$T),
		"$label: session A waits in its commit (outbox row written)");
	is($node->safe_psql('postgres', "SELECT count(*) FROM ev WHERE id = $a_id"), '0',
		"$label: A's row is not visible yet");

	$node->safe_psql('postgres', "INSERT INTO ev VALUES ($b_id, 'committed second')");
	is($node->safe_psql('postgres', "SELECT count(*) FROM ev WHERE id = $b_id"), '1',
		"$label: B is visible");
	# let the worker run through its loop with B committed
	my $t0 = $node->safe_psql('postgres', 'SELECT clock_timestamp()');
	ok( poll_until(
			sub {
				$node->safe_psql('postgres',
					"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit' AND state_change > '$t0'"
				) eq '1';
			},
			$T),
		"$label: the worker went through its loop with B committed");
	ok(!(grep { $_ eq $b_id } arrived_ids($sub, $MODEL)), "$label: B waits behind A's place in the queue");
	is($node->safe_psql('postgres', "SELECT count(*) FROM mqtt_emit.outbox WHERE payload::jsonb #>> '{result,id}' = '$b_id'"),
		'1', "$label: B's outbox row is kept");

	kill 'STOP', $broker->pid if $pause_broker;
	$node->safe_psql('postgres', "SELECT pg_cancel_backend($late_pid)");
	ok( poll_until(
			sub { $node->safe_psql('postgres', "SELECT count(*) FROM ev WHERE id = $a_id") eq '1' },
			$T),
		"$label: A becomes visible once its wait is cancelled");
	$late->quit;

	if ($pause_broker)
	{
		ok(poll_until(sub { broker_rx_queued($broker->port) > 0 }, $T),
			"$label: A and B are sent to the paused broker (unacknowledged)");
		kill 'CONT', $broker->pid;
	}

	my $ok = poll_until(sub { grep { $_ eq $a_id } arrived_ids($sub, $MODEL) }, 20);
	ok($ok, "$label: A's event, with the lower outbox id, is published");
	ok(poll_until(sub { grep { $_ eq $b_id } arrived_ids($sub, $MODEL) }, $T), "$label: B's event is published");
	my @ab = grep { $_ eq $a_id || $_ eq $b_id } arrived_ids($sub, $MODEL);
	is($ab[0], $a_id, "$label: A's event came first (its place in the queue)");
	if (!$ok)
	{
		note "$label: still in the outbox after 20 s (outbox id, row id): "
		  . $node->safe_psql('postgres',
			"SELECT string_agg(id || ' (' || (payload::jsonb #>> '{result,id}') || ')', ', ') FROM mqtt_emit.outbox");
	}
	ok(poll_until(sub { my $st = stats($node); $st && $st->{in_outbox} == 0 }, 5),
		"$label: the outbox drains");
}

late_visibility('late visibility (broker up)',     8001, 8002, 0);
late_visibility('late visibility (broker paused)', 8003, 8004, 1);

$node->append_conf('postgresql.conf', "synchronous_standby_names = ''\n");
$node->reload;

$sub->stop;
unlike($broker->log, qr/Outgoing messages are being dropped/,
	'the broker dropped no message for the subscriber');
done_testing();
