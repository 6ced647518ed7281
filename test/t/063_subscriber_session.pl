#!/usr/bin/perl
#
# 063_subscriber_session.pl: a listener node that is down while another node
# writes runs its remote listeners for what was published meanwhile, once
# each (README "Delivery semantics": the subscriber keeps a persistent
# session, mqtt_emit.session_expiry).
#
# Node W watches table t; node L has a remote_only listener that records
# every run (event id, row id).  For each way of going away (pg_ctl stop -m
# fast, -m immediate, the worker killed with SIGKILL, and MQTT 5 with its
# Session Expiry Interval) L is taken down, W commits 300 rows and publishes
# them, L comes back, and every one of the 300 events must run L's listener
# exactly once: counted are sent, run, missing and run twice.  With
# mqtt_emit.session_expiry = 0 (a clean session) the events of the downtime
# are not delivered: that shows the setting is what keeps them.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 60;
my $N = 300;

my $broker = start_broker(extra_conf => ['max_queued_messages 0']);

my $w = new_node('writer', broker => $broker);
$w->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE t (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('t');
});

my $l = new_node('listener', broker => $broker, restart_after_crash => 'on');
$l->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE runs (event_id text NOT NULL, id int NOT NULL);
	CREATE FUNCTION record(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO runs VALUES (e.event_id, (e.result->>'id')::int);
	END $$;
	SELECT mqtt_emit.listen('t', 'record(mqtt_emit.event)', allow_remote => true, remote_only => true);
});

ok(poll_until(sub { my $s = stats($w); $s && $s->{connected} }, $T), 'writer connected');

# The listener node gets W's events: rows committed now run its listener
# (a new row each try: one committed before the subscription took effect
# is not delivered, as documented).
my $probe = 1_000_000;
sub reaches_listener
{
	my $from = $probe + 1;
	return poll_until(
		sub {
			$probe++;
			$w->safe_psql('postgres', "INSERT INTO t VALUES ($probe)");
			$l->safe_psql('postgres', "SELECT count(*) FROM runs WHERE id BETWEEN $from AND $probe") > 0;
		},
		$T, 0.5);
}
ok(reaches_listener(), 'the listener node runs its remote listener for the writer\'s events');

# Everything W committed has been acknowledged by the broker.
sub writer_published
{
	return poll_until(
		sub {
			my $s = stats($w);
			$s && $s->{connected} && $s->{queued} == 0 && $s->{in_outbox} == 0;
		},
		$T);
}

# Take L away with $down, write $N rows on W, bring L back with $up; count.
sub downtime
{
	my ($what, $first, $down, $up, %o) = @_;
	my @ids = ($first .. $first + $N - 1);

	$down->();
	$w->safe_psql('postgres',
		"INSERT INTO t SELECT g FROM generate_series($ids[0], $ids[-1]) g");
	ok(writer_published(), "$what: the writer published the $N events while the listener node was away");
	$up->();

	my $where = "id BETWEEN $ids[0] AND $ids[-1]";
	my $expect = $o{lost} ? 0 : $N;
	if ($o{lost})
	{
		# the listener node is back and gets what is published from now on
		ok(reaches_listener(), "$what: the listener node gets new events again");
	}
	else
	{
		poll_until(
			sub { $l->safe_psql('postgres', "SELECT count(DISTINCT id) FROM runs WHERE $where") >= $N },
			$T, 0.5);
	}
	my ($runs, $distinct) = split /\|/,
	  $l->safe_psql('postgres', "SELECT count(*), count(DISTINCT id) FROM runs WHERE $where");
	my $twice = $l->safe_psql('postgres',
		"SELECT count(*) FROM (SELECT event_id FROM runs WHERE $where GROUP BY event_id HAVING count(*) > 1) x");
	note "$what: sent $N, run $runs (distinct $distinct), missing " . ($N - $distinct)
	  . ", run twice $twice";
	if ($o{lost})
	{
		is($distinct, 0, "$what: the events of the downtime are not delivered (a clean session)");
	}
	else
	{
		is($distinct, $N, "$what: every event of the downtime runs the listener");
		is($twice,    0,  "$what: no event runs it twice");
		is($runs,     $N, "$what: $N runs for $N events");
	}
}

downtime('stop -m fast', 1, sub { $l->stop('fast') }, sub { $l->start });
downtime('stop -m immediate', 1001, sub { $l->stop('immediate') }, sub { $l->start });

# the worker killed with SIGKILL: the postmaster restarts the whole
# server (crash recovery), while the writer goes on
downtime(
	'worker SIGKILL', 2001,
	sub {
		my $pid = $l->safe_psql('postgres',
			"SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit'");
		ok($pid =~ /^\d+$/, 'worker SIGKILL: the worker runs') or diag $pid;
		kill 'KILL', $pid if $pid =~ /^\d+$/;
	},
	sub {
		ok( poll_until(
				sub {
					my $s = eval { stats($l) };
					$s && $s->{connected};
				},
				$T),
			'worker SIGKILL: the listener node is back');
	});

# MQTT 5: the session outlives the connection only by its expiry interval
$l->append_conf('postgresql.conf', "mqtt_emit.mqtt_version = 5\n");
$l->restart;
ok(reaches_listener(), 'MQTT 5: the listener node gets the writer\'s events');
downtime('MQTT 5, stop -m fast', 3001, sub { $l->stop('fast') }, sub { $l->start });

# a clean session forgets the subscriptions and what they would have queued
$l->append_conf('postgresql.conf', "mqtt_emit.session_expiry = 0\n");
$l->restart;
ok(reaches_listener(), 'session_expiry = 0: the listener node gets the writer\'s events');
downtime('session_expiry = 0, stop -m fast', 4001, sub { $l->stop('fast') }, sub { $l->start },
	lost => 1);

$l->stop('fast');
$w->stop('fast');
done_testing();
