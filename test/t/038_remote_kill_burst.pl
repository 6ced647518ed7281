#!/usr/bin/perl
#
# 038_remote_kill_burst.pl: a listener node killed in the middle of a
# burst of remote events runs each of them exactly once (issue 12: "a
# remote listener node killed (-9 of the worker, -m immediate, -m fast) in
# the middle of a 20,000-event burst: 0 events missing, 0 run twice";
# README "Delivery semantics", the subscriber's spool, src/spool.c).
#
# Node W commits 20,000 rows (20 transactions of 1,000) while node L, with
# a remote_only listener that records every run, is taken down once it has
# run some of them and brought back: its worker killed with SIGKILL (the
# postmaster restarts the server), pg_ctl stop -m immediate, pg_ctl stop -m
# fast.  paho acknowledges each message to the broker before the worker
# sees it, so what the worker had received and not yet kept would be lost
# without the spool; what the broker had not yet sent, it sends again
# (persistent session).  Counted per round: sent, run, missing, run twice.
#
# Last, L is down for a minute (pg_ctl stop -m fast, start 60 s later;
# PG_MQTT_EMIT_038_DOWN=S changes it) while W commits a row every 10 ms:
# every one of them runs L's listener once when it is back.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use POSIX ();
use PostgreSQL::Test::Utils;
use Test::More;

my $T     = 180;
my $N     = 20_000;
my $TX    = 20;
my $KILL_AT = 2_000;    # L is taken down once it ran this many of a round

my $broker = start_broker(extra_conf => ['max_queued_messages 0']);

my $w = new_node('burst_w', broker => $broker);
$w->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE t (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('t');
});

my $l = new_node('burst_l', broker => $broker, restart_after_crash => 'on');
$l->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE runs (event_id text NOT NULL, id int NOT NULL);
	CREATE FUNCTION record(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$
	  INSERT INTO runs VALUES (e.event_id, (e.result->>'id')::int)
	$$;
	SELECT mqtt_emit.listen('t', 'record(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
ok(poll_until(sub { my $s = stats($w); $s && $s->{connected} }, $T), 'writer connected');

# L gets W's events (a new row each try until one runs)
my $probe = 1_000_000;
sub reaches_listener
{
	my $from = $probe + 1;
	return poll_until(
		sub {
			$probe++;
			$w->safe_psql('postgres', "INSERT INTO t VALUES ($probe)");
			($l->psql('postgres', "SELECT count(*) FROM runs WHERE id BETWEEN $from AND $probe"))[1] > 0;
		},
		$T, 0.5);
}
ok(reaches_listener(), 'the listener node runs its remote listener for the writer\'s events');

my $dir = $PostgreSQL::Test::Utils::tmp_check;

sub burst
{
	my ($what, $first, $down, $up) = @_;
	my $last = $first + $N - 1;
	my $per  = $N / $TX;
	my $where = "id BETWEEN $first AND $last";

	open my $fh, '>', "$dir/burst_$first.sql" or die $!;
	for my $k (0 .. $TX - 1)
	{
		my $a = $first + $k * $per;
		my $b = $a + $per - 1;
		print $fh "INSERT INTO t SELECT g FROM generate_series($a, $b) g;\n";
	}
	close $fh;
	my $pid = MqttEmitTest::_spawn(
		[
			'psql', '-X', '-q', '-h', $w->host, '-p', $w->port, '-d', 'postgres',
			'-v', 'ON_ERROR_STOP=1', '-f', "$dir/burst_$first.sql"
		],
		"$dir/burst_$first.out", "$dir/burst_$first.err");

	ok( poll_until(
			sub { ($l->psql('postgres', "SELECT count(*) FROM runs WHERE $where"))[1] >= $KILL_AT },
			$T, 0.05),
		"$what: the listener node ran $KILL_AT of the burst");
	my $at = ($l->psql('postgres', "SELECT count(*) FROM runs WHERE $where"))[1];
	$down->();
	note "$what: taken down after $at runs";
	ok( poll_until(sub { waitpid($pid, POSIX::WNOHANG()) == $pid }, $T),
		"$what: the writer committed the burst");
	is($? >> 8, 0, "$what: the burst's transactions committed") or diag slurp_file("$dir/burst_$first.err");
	$up->();

	poll_until(
		sub { ($l->psql('postgres', "SELECT count(DISTINCT id) FROM runs WHERE $where"))[1] >= $N },
		$T, 0.5);
	my ($runs, $distinct) = split /\|/,
	  $l->safe_psql('postgres', "SELECT count(*), count(DISTINCT id) FROM runs WHERE $where");
	my $twice = $l->safe_psql('postgres',
		"SELECT count(*) FROM (SELECT event_id FROM runs WHERE $where GROUP BY event_id HAVING count(*) > 1) x");
	note "$what: sent $N, run $runs (distinct $distinct), missing " . ($N - $distinct) . ", run twice $twice";
	is($distinct, $N, "$what: every event of the burst ran the listener (0 missing)");
	is($twice,    0,  "$what: no event ran it twice");
	is($runs,     $N, "$what: $N runs for $N events");
}

sub back
{
	my ($what) = @_;
	return sub {
		ok( poll_until(
				sub {
					my $s = eval { stats($l) };
					$s && $s->{subscriber_connected};
				},
				$T),
			"$what: the listener node is back");
	};
}

burst(
	'worker SIGKILL', 1,
	sub {
		my $pid = $l->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit'");
		ok($pid =~ /^\d+$/, 'worker SIGKILL: the worker runs') or diag $pid;
		kill 'KILL', $pid if $pid =~ /^\d+$/;
	},
	back('worker SIGKILL'));
burst('stop -m immediate', 100_001, sub { $l->stop('immediate') }, sub { $l->start; back('stop -m immediate')->() });
burst('stop -m fast',      200_001, sub { $l->stop('fast') },      sub { $l->start; back('stop -m fast')->() });

# down for a minute while the writer goes on
{
	my $down  = $ENV{PG_MQTT_EMIT_038_DOWN} // 60;
	my $first = 300_001;
	# the writer's rows only: not the probe rows of reaches_listener()
	# (ids above 1,000,000; an early one may have been published before L
	# subscribed)
	my $where = "id >= $first AND id < 1000000";
	$l->stop('fast');
	my $t0 = time();
	my $pid = MqttEmitTest::_spawn(
		[
			'psql', '-X', '-q', '-h', $w->host, '-p', $w->port, '-d', 'postgres', '-v', 'ON_ERROR_STOP=1',
			'-c', "DO \$\$ BEGIN FOR i IN $first .. $first + 100 * $down - 1 LOOP INSERT INTO t VALUES (i); COMMIT; PERFORM pg_sleep(0.01); END LOOP; END \$\$"
		],
		"$dir/down.out", "$dir/down.err");
	ok(poll_until(sub { waitpid($pid, POSIX::WNOHANG()) == $pid }, $down * 4 + $T), 'down: the writer committed its rows');
	is($? >> 8, 0, 'down: every row committed') or diag slurp_file("$dir/down.err");
	my $n = $w->safe_psql('postgres', "SELECT count(*) FROM t WHERE $where");
	note sprintf('down: %d rows committed in %d s while the listener node was down', $n, time() - $t0);
	$l->start;
	back('down')->();
	poll_until(sub { ($l->psql('postgres', "SELECT count(DISTINCT id) FROM runs WHERE $where"))[1] >= $n }, $T, 0.5);
	my ($runs, $distinct) = split /\|/,
	  $l->safe_psql('postgres', "SELECT count(*), count(DISTINCT id) FROM runs WHERE $where");
	note "down: sent $n, run $runs (distinct $distinct), missing " . ($n - $distinct);
	is($distinct, $n, 'down: every event of the downtime ran the listener (0 missing)');
	is($runs,     $n, 'down: none ran twice');
}

my @files = glob($l->data_dir . '/pg_mqtt_emit/spool.*');
cmp_ok(scalar @files, '>=', 1, 'the listener node keeps its spool in $PGDATA/pg_mqtt_emit');
cmp_ok(scalar @files, '<=', 2, 'the files of earlier starts were removed once read');

$l->stop('fast');
$w->stop('fast');
done_testing();
