#!/usr/bin/perl
#
# 036_local_order.pl: local listeners run in commit order, also when
# transactions spill to the outbox (issue 12: "Local listener order equal
# to commit order after spills"; README "Delivery semantics").
#
# Four sessions commit dependent transactions: each takes the next number
# from one counter row (UPDATE ... RETURNING, so the next transaction waits
# for this one's commit, which queues its events before it releases the
# row) and inserts 1 to 5 rows carrying that number; about every 12th
# inserts 60 rows of 1 kB, more than the 64 kB queue holds, so it spills
# to the outbox.  A local listener appends each event's number to a log in
# the order it runs.  Counted: events that ran, missing, run twice, and
# inversions (an event that ran after one of a later transaction, or
# before an earlier row of its own transaction).
#
# Three rounds: memory delivery with markers; durable delivery (rows that
# find the queue full are written like spilled ones); memory delivery with
# mqtt_emit.marker_wait = 0 and a queue kept full, where some spilled
# transactions get no marker.
#
# Transaction sizes are random: a fixed seed per round plus one fresh seed
# printed in the log (PG_MQTT_EMIT_SEED=N repeats a run).
#
# Last, a worker that exits and is started again (the queue stays) while
# the broker is frozen: the listeners of the events it had handed over do
# not run again.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use POSIX ();
use PostgreSQL::Test::Utils;
use Test::More;

my $T        = 120;
my $SESSIONS = 4;
my $TX       = 120;    # transactions per session and round

my $fresh = $ENV{PG_MQTT_EMIT_SEED} // (time() ^ $$) % 1_000_000_000;
note "fresh seed: $fresh (PG_MQTT_EMIT_SEED=$fresh repeats it)";

my $broker = start_broker();
END { kill 'CONT', $broker->pid if $broker && $broker->pid; }
my $node   = new_node(
	'lorder',
	broker                 => $broker,
	'mqtt_emit.queue_size' => '64kB');
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE counter (n int NOT NULL);
	INSERT INTO counter VALUES (0);
	CREATE TABLE lo (id bigserial PRIMARY KEY, n int NOT NULL, sess int NOT NULL, pad text NOT NULL);
	SELECT mqtt_emit.watch('lo');
	CREATE TABLE runlog (seq bigserial PRIMARY KEY, n int NOT NULL, id bigint NOT NULL);
	CREATE FUNCTION rec(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$
	  INSERT INTO runlog (n, id) VALUES ((e.result->>'n')::int, (e.result->>'id')::bigint)
	$$;
	SELECT mqtt_emit.listen('lo', 'rec(mqtt_emit.event)');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T), 'worker connected');

my $dir = $PostgreSQL::Test::Utils::tmp_check;

# one round: writers with the given session settings; returns nothing,
# asserts the counts
sub round
{
	my ($name, $seed, $settings) = @_;
	srand($seed);
	note "$name: seed $seed";
	my $spilled0 = stats($node)->{spilled};
	my $rows0    = $node->safe_psql('postgres', 'SELECT count(*) FROM lo');
	my $runs0    = $node->safe_psql('postgres', 'SELECT coalesce(max(seq), 0) FROM runlog');
	my $total    = 0;
	my @writers;
	for my $s (1 .. $SESSIONS)
	{
		open my $fh, '>', "$dir/lo_${name}_$s.sql" or die $!;
		print $fh "$settings\n";
		for my $k (1 .. $TX)
		{
			my $rows = int(rand(12)) == 0 ? 60 : 1 + int(rand(5));
			$total += $rows;
			print $fh "BEGIN;\nUPDATE counter SET n = n + 1 RETURNING n AS tx \\gset\n"
			  . "INSERT INTO lo (n, sess, pad) SELECT :tx, $s, repeat('x', 1000) FROM generate_series(1, $rows);\n"
			  . "COMMIT;\n";
		}
		close $fh;
		push @writers,
		  MqttEmitTest::_spawn(
			[
				'psql', '-X', '-q', '-h', $node->host, '-p', $node->port,
				'-d', 'postgres', '-v', 'ON_ERROR_STOP=1', '-o', '/dev/null',
				'-f', "$dir/lo_${name}_$s.sql"
			],
			"$dir/lo_${name}_$s.out", "$dir/lo_${name}_$s.err");
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
		"$name: $SESSIONS writers finished");
	is_deeply([ map { $status{$_} } @writers ], [ (0) x $SESSIONS ], "$name: every transaction committed")
	  or diag(join '', map { slurp_file("$dir/lo_${name}_$_.err") } 1 .. $SESSIONS);
	is($node->safe_psql('postgres', 'SELECT count(*) FROM lo') - $rows0, $total, "$name: $total rows committed");

	ok( poll_until(
			sub {
				$node->safe_psql('postgres', "SELECT count(*) FROM runlog WHERE seq > $runs0") >= $total;
			},
			$T, 0.5),
		"$name: the listener ran $total times")
	  or diag('ran ' . $node->safe_psql('postgres', "SELECT count(*) FROM runlog WHERE seq > $runs0")
		  . '; stats: ' . join(', ', map { "$_=" . (stats($node)->{$_} // '') } qw(in_outbox queued spilled)));
	my ($ran, $distinct, $missing) = split /\|/, $node->safe_psql(
		'postgres', qq{
		SELECT (SELECT count(*) FROM runlog WHERE seq > $runs0),
		       (SELECT count(DISTINCT id) FROM runlog WHERE seq > $runs0),
		       (SELECT count(*) FROM lo WHERE id > $rows0 AND id NOT IN (SELECT id FROM runlog WHERE seq > $runs0))});
	# lo's ids of this round are above the previous rounds' (one sequence)
	is($missing, 0, "$name: no event missing");
	is($ran - $distinct, 0, "$name: no event ran twice");
	my ($inv_tx, $inv_row, $first) = split /\|/, $node->safe_psql(
		'postgres', qq{
		WITH r AS (
		  SELECT seq, n, id,
		         max(n) OVER w AS prev_n,
		         lag(n) OVER (ORDER BY seq) AS lag_n, lag(id) OVER (ORDER BY seq) AS lag_id
		    FROM runlog WHERE seq > $runs0
		  WINDOW w AS (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING))
		SELECT count(*) FILTER (WHERE n < prev_n),
		       count(*) FILTER (WHERE n = lag_n AND id < lag_id),
		       coalesce(min(seq) FILTER (WHERE n < prev_n), 0)
		  FROM r});
	is($inv_tx, 0, "$name: local listeners ran in commit order (events that ran after a later transaction's)")
	  or diag("first inversion at runlog seq $first: "
		  . $node->safe_psql('postgres',
			"SELECT string_agg(seq || ':' || n, ' ' ORDER BY seq) FROM runlog WHERE seq BETWEEN $first - 5 AND $first + 5"));
	is($inv_row, 0, "$name: each transaction's rows ran in their order");
	my $spilled = stats($node)->{spilled} - $spilled0;
	note "$name: $spilled events spilled";
	# durable rows that find the queue full are not counted as spilled
	cmp_ok($spilled, '>', 0, "$name: events spilled to the outbox") unless $settings =~ /durable/;
}

round('memory', 3601, '');
round('durable', 3602, 'SET mqtt_emit.delivery = durable;');
round('nomarker', 3603, 'SET mqtt_emit.marker_wait = 0;');
round('fresh', $fresh, $fresh % 2 ? 'SET mqtt_emit.delivery = durable;' : 'SET mqtt_emit.marker_wait = 0;');

# A worker that exits (pg_terminate_backend: the postmaster starts it again,
# the queue stays) hands nothing to the listener worker twice.  The broker
# is frozen, so that no event is acknowledged and the queue's head stays
# before the events whose listeners ran.
{
	my $runs0 = $node->safe_psql('postgres', 'SELECT coalesce(max(seq), 0) FROM runlog');
	my $ids0  = $node->safe_psql('postgres', 'SELECT coalesce(max(id), 0) FROM lo');
	ok(kill('STOP', $broker->pid), 'broker frozen (SIGSTOP)');
	$node->safe_psql('postgres', "INSERT INTO lo (n, sess, pad) SELECT 0, 9, 'x' FROM generate_series(1, 50)");
	ok( poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM runlog WHERE seq > $runs0") >= 50 }, $T),
		'restart: the listener ran for the 50 events while the broker is frozen');
	my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit'");
	ok($node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)") eq 't', "worker $pid terminated");
	ok( poll_until(
			sub {
				my $p = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit'");
				$p ne '' && $p ne $pid;
			},
			$T),
		'the worker was started again');
	ok(kill('CONT', $broker->pid), 'broker thawed (SIGCONT)');
	$node->safe_psql('postgres', "INSERT INTO lo (n, sess, pad) VALUES (0, 10, 'end')");
	ok( poll_until(sub { $node->safe_psql('postgres', "SELECT count(*) FROM runlog r JOIN lo USING (id) WHERE r.seq > $runs0 AND lo.sess = 10") == 1 }, $T),
		'restart: an event committed afterwards ran');
	my ($ran, $distinct) = split /\|/, $node->safe_psql('postgres',
		"SELECT count(*), count(DISTINCT id) FROM runlog WHERE seq > $runs0 AND id > $ids0");
	is($distinct, 51, 'restart: every event ran');
	is($ran - $distinct, 0, 'restart: no event ran twice');
}

done_testing();
