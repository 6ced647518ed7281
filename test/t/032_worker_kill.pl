#!/usr/bin/perl
#
# 032_worker_kill.pl: kill -9 of the worker in the middle of a large burst
# (doc/DESIGN.md section 6: "worker killed: restarted; events not yet
# acknowledged by the broker are published again"; "PostgreSQL crash: in
# durable mode nothing committed is lost; in memory mode what may be lost is
# documented").
#
# A background writer inserts 20000 rows in 1000 transactions of 20 rows
# (each also with a rolled-back exception block and a rolled-back
# transaction), while the test kills the worker with SIGKILL three times.
# A SIGKILLed server process makes the postmaster restart the whole cluster
# (every backend, the writer's included, is terminated and shared memory is
# initialised again), so the writer reconnects and resumes after the last
# batch that committed: the rows in the table are exactly what committed.
#
#   durable mode: every committed event arrives (duplicates allowed and
#                 reported), in commit order, and no rolled-back one.
#   memory mode:  the shared-memory queue may lose what it held at each
#                 crash (README: "Delivery semantics"): the loss is only
#                 reported; nothing rolled back or uncommitted may arrive,
#                 and what arrives keeps commit order.
#
# The broker and the subscriber stay up all along.  Once the writer is done,
# a marker row is committed; when the marker's event has arrived, everything
# committed before it has been published (one ordered stream), so the counts
# are final.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use POSIX ();
use PostgreSQL::Test::Utils;
use Test::More;

my $T       = 120;
my $ROWS    = 20000;
my $BATCH   = 20;
my @KILL_AT = (3000, 9000, 15000);    # rows committed when a kill is due

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# one value from the node, undef when it does not answer (crash restart)
sub query
{
	my ($node, $sql) = @_;
	my ($rc, $out) = $node->psql('postgres', $sql);
	return $rc == 0 ? $out : undef;
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

# mosquitto silently drops QoS 1 messages for a subscriber that falls more
# than max_queued_messages (default 1000) behind: lift the limit, so that a
# missing message is the extension's doing, and check the broker's log.
my $broker = start_broker(extra_conf => ['max_queued_messages 0']);
my $node   = new_node(
	'kill',
	broker                    => $broker,
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s',
	# keep crash restarts quick and the writer's reconnects cheap
	'restart_after_crash'     => 'on');
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE kd (id int PRIMARY KEY, v text NOT NULL, at timestamptz DEFAULT clock_timestamp());
	CREATE TABLE km (id int PRIMARY KEY, v text NOT NULL, at timestamptz DEFAULT clock_timestamp());
	SELECT mqtt_emit.watch('kd', model => 'kd');
	SELECT mqtt_emit.watch('km', model => 'km');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
	'worker connected to the broker');
my $sub = start_subscriber($broker, [ topic_prefix() . '/kd/#', topic_prefix() . '/km/#' ]);

# The writer: a shell loop around psql.  Each psql run sets the delivery
# mode and runs a DO block that continues after the last committed batch
# (max(id)), committing $BATCH rows per transaction; every batch also rolls
# back an exception block (id -(b+1)) and a whole transaction (id
# -(100000+b)).  When the cluster restarts under it, psql fails and the loop
# starts it again (bounded).
sub start_writer
{
	my ($table, $delivery) = @_;
	my $nb = $ROWS / $BATCH;
	my $do = <<"SQL";
DO \$\$
DECLARE b int;
BEGIN
  SELECT coalesce(max(id), 0) / $BATCH INTO b FROM $table;
  WHILE b < $nb LOOP
    INSERT INTO $table SELECT g, 'w' FROM generate_series(b * $BATCH + 1, b * $BATCH + $BATCH) g;
    BEGIN
      INSERT INTO $table VALUES (-(b + 1), 'exception block');
      RAISE EXCEPTION 'undo';
    EXCEPTION WHEN raise_exception THEN NULL;
    END;
    COMMIT;
    INSERT INTO $table VALUES (-(100000 + b), 'rolled back');
    ROLLBACK;
    -- pace the burst (about 10 s) so that the kills land in its middle
    PERFORM pg_sleep(0.008);
    b := b + 1;
  END LOOP;
END \$\$
SQL
	my $dir = $PostgreSQL::Test::Utils::tmp_check;
	open my $fh, '>', "$dir/writer_$table.sql" or die $!;
	print $fh "SET mqtt_emit.delivery = $delivery;\n$do;\n";
	close $fh;
	my $script = sprintf(
		'for attempt in $(seq 1 600); do '
		  . 'psql -X -q -h %s -p %d -d postgres -v ON_ERROR_STOP=1 -f %s && exit 0; '
		  . 'echo "writer: attempt $attempt failed" >&2; sleep 0.1; done; exit 1',
		$node->host, $node->port, "$dir/writer_$table.sql");
	return MqttEmitTest::_spawn([ 'bash', '-c', $script ],
		"$dir/writer_$table.out", "$dir/writer_$table.err");
}

# Exit statuses of writers that ended, by pid.
my %writer_status;

sub writer_alive
{
	my ($pid) = @_;
	return 0 if exists $writer_status{$pid};
	my $r = waitpid($pid, POSIX::WNOHANG());
	if ($r == $pid)
	{
		$writer_status{$pid} = $? >> 8;
		return 0;
	}
	return $r == 0;
}

# Waits for the writer to exit; returns its exit status (undef on timeout).
sub wait_writer
{
	my ($pid) = @_;
	poll_until(sub { !writer_alive($pid) }, $T);
	return $writer_status{$pid};
}

# Runs one burst with kills; returns the number of kills done while the
# writer was running.
sub burst_with_kills
{
	my ($table, $delivery) = @_;
	my $wpid = start_writer($table, $delivery);
	my $kills_mid = 0;
	for my $k (0 .. $#KILL_AT)
	{
		my ($n, $pid);
		poll_until(
			sub {
				# the worker's pid and the rows committed so far, in one
				# call, so that the kill follows at once
				my $out = query($node,
					"SELECT worker_pid, (SELECT count(*) FROM $table WHERE id > 0) FROM mqtt_emit.stats");
				($pid, $n) = defined $out ? split(/\|/, $out) : ();
				$pid = undef if defined $pid && $pid eq '';
				return (defined $n && $n >= $KILL_AT[$k] && defined $pid)
				  || !writer_alive($wpid);
			},
			$T, 0.02);
		my $writing = writer_alive($wpid);
		if (!defined $pid)
		{
			fail("$delivery: worker pid known before kill " . ($k + 1));
			next;
		}
		ok(kill('KILL', $pid), "$delivery: kill -9 worker $pid (kill " . ($k + 1) . ')');
		$kills_mid++ if $writing;
		note sprintf('%s: kill %d at about %s rows committed (writer %s), %d messages had arrived',
			$delivery, $k + 1, $n // "?", $writing ? "running" : "done", scalar(my @got = arrived_ids($sub, $table)));
		my $new;
		ok( poll_until(
				sub {
					my $st = stats($node);
					return 0 unless $st && defined $st->{worker_pid} && $st->{connected};
					$new = $st->{worker_pid};
					return $new != $pid;
				},
				$T),
			"$delivery: the worker is back and connected after kill " . ($k + 1));
		note "$delivery: new worker pid " . ($new // '?');
	}
	is(wait_writer($wpid), 0, "$delivery: the writer finished");
	my $err = slurp_file("$PostgreSQL::Test::Utils::tmp_check/writer_$table.err");
	my $restarts = () = $err =~ /attempt \d+ failed/g;
	note "$delivery: the writer was restarted $restarts times by crash restarts";
	return $kills_mid;
}

# Commits a marker and waits until its event arrived.
sub marker
{
	my ($table, $id) = @_;
	$node->safe_psql('postgres', "INSERT INTO $table VALUES ($id, 'marker')");
	return poll_until(sub { grep { $_ eq $id } arrived_ids($sub, $table) }, $T, 0.2);
}

# ---------------------------------------------------------------------------
# durable mode
# ---------------------------------------------------------------------------

my $mid = burst_with_kills('kd', 'durable');
is($mid, scalar @KILL_AT, "durable: all kills hit the burst while the writer was running");
is(query($node, 'SELECT count(*) FROM kd WHERE id > 0'), $ROWS,
	"durable: $ROWS rows committed in the end");
is(query($node, 'SELECT count(*) FROM kd WHERE id < 0'), 0,
	'durable: no rolled-back row committed');
my @committed = split /\n/, query($node, 'SELECT id FROM kd ORDER BY id');

ok( poll_until(
		sub {
			my %h = map { $_ => 1 } arrived_ids($sub, 'kd');
			scalar(grep { $h{$_} } @committed) == @committed;
		},
		$T, 0.5),
	'durable: every committed event arrives');
ok(poll_until(sub { my $s = stats($node); $s && $s->{in_outbox} == 0 && $s->{queued} == 0 }, $T),
	'durable: outbox drained')
  or diag('stats: ' . join(', ', map { "$_ " . (stats($node)->{$_} // 'NULL') } qw(in_outbox queued outboxed published))
	  . '; rows: ' . query($node, 'SELECT count(*) || \' (\' || count(seq) || \' placed, flags \' || coalesce(string_agg(DISTINCT flags::text, \'/\'), \'-\') || \')\' FROM mqtt_emit.outbox'));
ok(marker('kd', 999999), 'durable: marker arrives');
my @arrived = grep { $_ ne '999999' } arrived_ids($sub, 'kd');
my $r = tally('durable, worker killed', \@arrived, \@committed, sub { $_[0] =~ /^-/ });
is($r->{missing},    0, 'durable: no committed event is missing');
is($r->{forbidden},  0, 'durable: no rolled-back event arrived');
is($r->{unexpected}, 0, 'durable: nothing but committed events arrived');
is($r->{disorder},   0, 'durable: events arrived in commit order');
note "durable: $r->{duplicates} duplicates (at-least-once)";

# ---------------------------------------------------------------------------
# memory mode: loss is reported, not asserted
# ---------------------------------------------------------------------------

$mid = burst_with_kills('km', 'memory');
is($mid, scalar @KILL_AT, "memory: all kills hit the burst while the writer was running");
is(query($node, 'SELECT count(*) FROM km WHERE id > 0'), $ROWS,
	"memory: $ROWS rows committed in the end");
is(query($node, 'SELECT count(*) FROM km WHERE id < 0'), 0,
	'memory: no rolled-back row committed');
@committed = split /\n/, query($node, 'SELECT id FROM km ORDER BY id');
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} && $s->{in_outbox} == 0 && $s->{queued} == 0 }, $T),
	'memory: queue and outbox drained');
ok(marker('km', 999999), 'memory: marker arrives');
@arrived = grep { $_ ne '999999' } arrived_ids($sub, 'km');
$r = tally('memory, worker killed', \@arrived, \@committed, sub { $_[0] =~ /^-/ });
if ($r->{missing})
{
	my %h = map { $_ => 1 } @arrived;
	my @lost = grep { !$h{$_} } @committed;
	note 'memory: commit times of the first and last lost ids: '
	  . query($node, "SELECT string_agg(id || ' ' || at::time, ', ' ORDER BY id) FROM km WHERE id IN ($lost[0], $lost[-1])");
}
note "memory mode lost $r->{missing} of $r->{sent} committed events in 3 crash restarts (documented: the queue's content at a crash)";
is($r->{forbidden},  0, 'memory: no rolled-back event arrived');
is($r->{unexpected}, 0, 'memory: nothing but committed events arrived');
is($r->{disorder},   0, 'memory: what arrived, arrived in commit order');

$sub->stop;
unlike($broker->log, qr/Outgoing messages are being dropped/,
	'the broker dropped no message for the subscriber');
done_testing();
