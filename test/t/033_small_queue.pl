#!/usr/bin/perl
#
# 033_small_queue.pl: the smallest shared-memory queue (mqtt_emit.queue_size
# = 64 kB) under a burst of big events, and the three overflow policies
# (doc/DESIGN.md section 6: "shared-memory queue full: no committed event silently
# lost: overflow goes to the outbox, and the policy is a GUC"; README:
# "spill (default): the transaction writes its events to the outbox; error:
# the commit fails (54000); drop: WARNING and counted").
#
#   spill: 4 concurrent sessions commit 5000 events of about 4 kB each (a
#          2 kB column, which the payload carries twice: args.data and
#          result) in transactions of 5 rows, and every 25th of 20 rows
#          (about 80 kB, more than the whole queue: it must spill).  Every
#          event arrives, each session's in its commit order, and
#          stats.spilled counts at least the events that had to spill.
#   error: one transaction whose events exceed the queue fails at COMMIT with
#          SQLSTATE 54000 "event queue is full"; its rows are not committed
#          and none of its events is published.
#   drop:  the same transaction commits with a WARNING (54000); stats.dropped
#          grows by exactly its number of events, none of which is published.
#
# Absence is shown with a marker committed afterwards: once its event has
# arrived, everything committed before it has been published.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use POSIX ();
use PostgreSQL::Test::Utils;
use Test::More;

my $T        = 60;
my $SESSIONS = 4;
my $PER      = 1250;    # events per session
my $MODEL    = 'sq';

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# Runs $sql in psql with verbose errors; returns (exit code, stdout, stderr).
sub psql_verbose
{
	my ($node, $sql) = @_;
	return $node->psql('postgres', "\\set VERBOSITY verbose\n$sql");
}

my $marker_n = 0;

# Commits a marker row and waits for its event.
sub marker
{
	my ($node, $sub) = @_;
	my $id = 9_000_000 + ++$marker_n;
	$node->safe_psql('postgres', "INSERT INTO sq VALUES ($id, 'marker')");
	return poll_until(sub { grep { $_ eq $id } arrived_ids($sub, $MODEL) }, $T, 0.2)
	  ? $id : undef;
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

# mosquitto silently drops QoS 1 messages for a subscriber that falls more
# than max_queued_messages (default 1000) behind: lift the limit, so that a
# missing message is the extension's doing, and check the broker's log.
my $broker = start_broker(extra_conf => ['max_queued_messages 0']);
my $node   = new_node(
	'smallq',
	broker                => $broker,
	'mqtt_emit.queue_size' => '64kB');
$node->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE sq (id int PRIMARY KEY, v text NOT NULL);
	SELECT mqtt_emit.watch('sq', model => '$MODEL');
});
is($node->safe_psql('postgres', 'SHOW mqtt_emit.queue_size'), '64kB', 'queue_size = 64kB');
is($node->safe_psql('postgres', 'SHOW mqtt_emit.overflow'),   'spill', 'overflow defaults to spill');
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
	'worker connected to the broker');
is(stats($node)->{queue_capacity}, 65536, 'stats.queue_capacity is 64 kB');
my $sub = start_subscriber($broker, topic_prefix() . "/$MODEL/#");

# ---------------------------------------------------------------------------
# spill: 4 concurrent sessions, 5000 big events
# ---------------------------------------------------------------------------

# Transaction sizes of one session, as the DO block below makes them.
my @sizes;
{
	my ($n, $k) = (0, 0);
	while ($n < $PER)
	{
		$k++;
		my $sz = $k % 25 == 0 ? 20 : 5;
		$sz = $PER - $n if $sz > $PER - $n;
		push @sizes, $sz;
		$n += $sz;
	}
}
my $must_spill = $SESSIONS * 20 * scalar(grep { $_ == 20 } @sizes);

my $dir = $PostgreSQL::Test::Utils::tmp_check;
my @writers;
for my $s (1 .. $SESSIONS)
{
	my $base = $s * 100000;
	open my $fh, '>', "$dir/spill_$s.sql" or die $!;
	print $fh <<"SQL";
DO \$\$
DECLARE n int := 0; k int := 0; sz int;
BEGIN
  WHILE n < $PER LOOP
    k := k + 1;
    sz := least(CASE WHEN k % 25 = 0 THEN 20 ELSE 5 END, $PER - n);
    INSERT INTO sq SELECT $base + g, repeat(md5(g::text), 63)
      FROM generate_series(n + 1, n + sz) g;
    COMMIT;
    n := n + sz;
  END LOOP;
END \$\$;
SQL
	close $fh;
	push @writers,
	  MqttEmitTest::_spawn(
		[
			'psql', '-X', '-q', '-h', $node->host, '-p', $node->port,
			'-d', 'postgres', '-v', 'ON_ERROR_STOP=1', '-f', "$dir/spill_$s.sql"
		],
		"$dir/spill_$s.out", "$dir/spill_$s.err");
}
my %status;
ok( poll_until(
		sub {
			for my $pid (@writers)
			{
				next if exists $status{$pid};
				$status{$pid} = $? >> 8 if waitpid($pid, POSIX::WNOHANG()) == $pid;
			}
			return keys %status == @writers;
		},
		$T),
	"$SESSIONS concurrent writers finished");
is_deeply([ map { $status{$_} } @writers ], [ (0) x $SESSIONS ],
	'every writer committed all its transactions')
  or diag(join '', map { slurp_file("$dir/spill_$_.err") } 1 .. $SESSIONS);
is($node->safe_psql('postgres', 'SELECT count(*) FROM sq'),
	$SESSIONS * $PER, ($SESSIONS * $PER) . ' rows committed');

my @expected = map { my $b = $_ * 100000; map { $b + $_ } 1 .. $PER } 1 .. $SESSIONS;
my %want     = map { $_ => 1 } @expected;
ok( poll_until(
		sub {
			my %h = map { $_ => 1 } arrived_ids($sub, $MODEL);
			scalar(grep { $h{$_} } @expected) == @expected;
		},
		$T, 0.5),
	'every one of the ' . scalar(@expected) . ' events arrives');
ok( poll_until(
		sub { my $s = stats($node); $s && $s->{in_outbox} == 0 && $s->{queued} == 0 },
		15),
	'queue and outbox drained');
my $mk = marker($node, $sub);
ok($mk, 'marker after the burst arrives');
note 'spill: still in the outbox (outbox id, row id): '
  . $node->safe_psql('postgres',
	"SELECT string_agg(id || ' (' || (payload::jsonb #>> '{result,id}') || ')', ', ' ORDER BY id) FROM mqtt_emit.outbox");

my @arrived = grep { $want{$_} } arrived_ids($sub, $MODEL);
my $r = tally('spill, all sessions', \@arrived, \@expected);
is($r->{missing}, 0, 'spill: no committed event is missing');
for my $s (1 .. $SESSIONS)
{
	my $b = $s * 100000;
	my @exp = map { $b + $_ } 1 .. $PER;
	my @got = grep { $_ > $b && $_ <= $b + $PER } @arrived;
	my $rs = tally("spill, session $s", \@got, \@exp);
	is($rs->{disorder}, 0, "spill: session $s events arrived in its commit order");
}
my $after_spill = stats($node);
note sprintf('spill: spilled %d (at least %d had to), outboxed %d, enqueued %d, published %d, dropped %d, retried %d',
	$after_spill->{spilled}, $must_spill, @$after_spill{qw(outboxed enqueued published dropped retried)});
cmp_ok($after_spill->{spilled}, '>=', $must_spill,
	"stats.spilled >= $must_spill (the events of transactions bigger than the queue)");
is($after_spill->{dropped}, 0, 'spill: nothing dropped');
is($after_spill->{spilled} + $after_spill->{enqueued}, scalar(@expected) + 1,
	'spill: every event went through the queue or the outbox, exactly once (spilled + enqueued = events + marker)');

# ---------------------------------------------------------------------------
# a listener that hangs holds no event back from the broker
# ---------------------------------------------------------------------------
#
# Listeners run in the listener worker, not in the process that publishes.
# A local listener (of a model that is not published) waits for an
# advisory lock the test holds; meanwhile events keep being published.

$node->safe_psql(
	'postgres', q{
	CREATE TABLE gate (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('gate', emit => false);
	CREATE FUNCTION gate_listener(e mqtt_emit.event) RETURNS void
	  LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_advisory_xact_lock(4242); END $$;
	SELECT mqtt_emit.listen('gate', 'gate_listener(mqtt_emit.event)') > 0;
});
my $holder = $node->background_psql('postgres');
$holder->query_safe('SELECT pg_advisory_lock(4242)');
$node->safe_psql('postgres', 'INSERT INTO gate VALUES (1)');
ok( poll_until(
		sub {
			$node->safe_psql('postgres',
				"SELECT wait_event_type || ':' || wait_event FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit listeners'"
			) eq 'Lock:advisory';
		},
		$T),
	'hang: the listener worker is held in a local listener');
ok(marker($node, $sub), 'hang: events are published while a listener hangs');
$holder->query_safe('SELECT pg_advisory_unlock(4242)');
$holder->quit;
ok( poll_until(
		sub {
			$node->safe_psql('postgres',
				"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit listeners' AND wait_event = 'advisory'"
			) eq '0';
		},
		$T),
	'hang: the listener goes on once the lock is free');

# ---------------------------------------------------------------------------
# spill keeps commit order: a queued event committed before a spilled
# transaction is published before it
# ---------------------------------------------------------------------------
#
# The burst above mixes queued and spilled transactions at random; this
# makes the case deterministic.  The worker is stopped (SIGSTOP); meanwhile
# T1 (one small event) commits into the queue, then T2 (20 big events, more
# than the whole queue) spills into the outbox.  Once the worker goes on
# (SIGCONT), T1's event must reach the subscriber before T2's.

my $wpid = stats($node)->{worker_pid};
ok($wpid && kill('STOP', $wpid), 'order: the worker is stopped');
my $spilled0 = stats($node)->{spilled};
$node->safe_psql('postgres',
	"INSERT INTO sq VALUES (810001, repeat(md5('t1'), 63))");
$node->safe_psql('postgres',
	"INSERT INTO sq SELECT g, repeat(md5(g::text), 63) FROM generate_series(820001, 820020) g");
is(stats($node)->{spilled} - $spilled0, 20, 'order: T2 spilled its 20 events, T1 was queued');
kill('CONT', $wpid);
my @order = (810001, 820001 .. 820020);
ok( poll_until(
		sub {
			my %h = map { $_ => 1 } arrived_ids($sub, $MODEL);
			scalar(grep { $h{$_} } @order) == @order;
		},
		$T),
	'order: T1 and T2 arrive');
{
	my @seq = grep { $_ == 810001 || ($_ >= 820001 && $_ <= 820020) } arrived_ids($sub, $MODEL);
	my $r1 = tally('order (T1 queued, then T2 spilled)', \@seq, \@order);
	note 'order: arrival order ' . join(' ', map { $_ == 810001 ? 'T1' : 'T2' } @seq[0 .. ($#seq < 3 ? $#seq : 3)]) . ' ...';
	is($r1->{disorder}, 0, 'order: T1, committed first through the queue, arrives before T2 (spilled)');
}

# ---------------------------------------------------------------------------
# error: a transaction bigger than the queue fails at commit
# ---------------------------------------------------------------------------

my $before_err = stats($node);
my $big = 'INSERT INTO sq SELECT g, repeat(md5(g::text), 63) FROM generate_series(%d, %d) g';
my $cursor = scalar(my @all = arrived_ids($sub, $MODEL));

my ($rc, $out, $err) = psql_verbose($node,
	"SET mqtt_emit.overflow = error;\nBEGIN;\n" . sprintf($big, 700001, 700020) . ";\nCOMMIT;");
isnt($rc, 0, 'overflow = error: the commit fails');
like($err, qr/ERROR:\s+54000: event queue is full/,
	'overflow = error: SQLSTATE 54000 "event queue is full"');
note "error: $err";
is($node->safe_psql('postgres', 'SELECT count(*) FROM sq WHERE id BETWEEN 700001 AND 700020'),
	0, 'overflow = error: the failed transaction left no rows');

# a transaction that fits still commits under overflow = error
($rc, $out, $err) = psql_verbose($node,
	"SET mqtt_emit.overflow = error;\n" . sprintf($big, 710001, 710002) . ';');
is($rc, 0, 'overflow = error: a transaction that fits commits') or diag($err);

my $s_before = stats($node);
($rc, $out, $err) = psql_verbose($node,
	"SET mqtt_emit.overflow = drop;\nBEGIN;\n" . sprintf($big, 720001, 720020) . ";\nCOMMIT;");
is($rc, 0, 'overflow = drop: the transaction commits') or diag($err);
like($err, qr/WARNING:\s+54000: event queue is full, 20 events of this transaction are dropped/,
	'overflow = drop: WARNING 54000 names the 20 dropped events');
is($node->safe_psql('postgres', 'SELECT count(*) FROM sq WHERE id BETWEEN 720001 AND 720020'),
	20, 'overflow = drop: its rows are committed');
my $s_after = stats($node);
is($s_after->{dropped} - $s_before->{dropped}, 20, 'overflow = drop: stats.dropped grew by exactly 20');
is($s_after->{spilled}, $before_err->{spilled}, 'error and drop spilled nothing');

$mk = marker($node, $sub);
ok($mk, 'marker after error and drop arrives');
@all = arrived_ids($sub, $MODEL);
my @since = grep { $_ ne $mk } @all[ $cursor .. $#all ];
is_deeply([ sort { $a <=> $b } grep { $_ >= 700000 && $_ < 800000 } @since ], [ 710001, 710002 ],
	'only the events of the transaction that fitted arrived: none of the failed nor of the dropped one');

$sub->stop;
unlike($broker->log, qr/Outgoing messages are being dropped/,
	'the broker dropped no message for the subscriber');
done_testing();
