#!/usr/bin/perl
#
# 075_broker_inflight_limit.pl: a broker with mosquitto's default limit of
# QoS 1 messages in flight per client (max_inflight_messages 20; the test
# brokers elsewhere run without one), while the worker keeps up to
# mqtt_emit.max_inflight (1000) in flight.  Under MQTT 5 the broker's CONNACK
# carries Receive Maximum 20, which paho honours; under 3.1.1 nothing tells
# the client, and mosquitto 2.1 logs "has exceeded its receive-maximum
# quota" (its source answers a PUBLISH over its limit with a PUBACK it does
# not keep when its quota is spent: reason 0x97 under MQTT 5, a plain
# PUBACK under 3.1.1).  This test does not reach the 0x97 path
# (broker_callbacks.c): paho keeps to Receive Maximum under MQTT 5, so
# mosquitto sends none; it checks that under MQTT 5 nothing failed.
#
# For each protocol: a burst of 20,000 events in one transaction and 2,000
# single-row commits from 4 pgbench clients.  Counted at a subscriber:
# missing 0 (duplicates are allowed: delivery is at least once), no dead
# letter.  Measured: 0 missing under both protocols, on mosquitto 2.0.11
# (Debian 12) and 2.1.2 (forky).
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T     = 180;
my $BURST = 20_000;
my $ROWS  = 2_000;

my $broker = start_broker(extra_conf => ['max_inflight_messages 20']);

for my $version ('3.1.1', '5')
{
	(my $tag = $version) =~ s/\W//g;
	my $model = "lim$tag";
	my $node = new_node("v$tag", broker => $broker, 'mqtt_emit.mqtt_version' => $version);
	$node->safe_psql(
		'postgres', qq{
		CREATE EXTENSION pg_mqtt_emit;
		CREATE TABLE $model (id int PRIMARY KEY, v text);
		CREATE SEQUENCE ${model}_single START 1000001;
		SELECT mqtt_emit.watch('$model', model => '$model');
	});
	ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
		"MQTT $version: worker connected");
	my $sub = start_subscriber($broker, topic_prefix() . "/$model/#");

	$node->safe_psql('postgres',
		"INSERT INTO $model SELECT g, repeat('x', 100) FROM generate_series(1, $BURST) g");
	my $script = $node->basedir . "/single_$tag.sql";
	open my $fh, '>', $script or die "$script: $!";
	print $fh "INSERT INTO $model VALUES (nextval('${model}_single'), 'single');\n";
	close $fh;
	$node->command_ok(
		[
			'pgbench', '-n', '-c', '4', '-j', '2', '-t', $ROWS / 4, '-f', $script,
			'-h', $node->host, '-p', $node->port, 'postgres'
		],
		"MQTT $version: $ROWS single-row commits from 4 clients");

	my @expected = ((1 .. $BURST), (1_000_001 .. 1_000_000 + $ROWS));
	ok( poll_until(
			sub {
				my $s = stats($node);
				$s && ($s->{queued} // 1) == 0 && ($s->{in_outbox} // 1) == 0;
			},
			$T),
		"MQTT $version: the worker has nothing left to publish");
	# bounded wait for the subscriber to have read everything that came
	poll_until(
		sub {
			my %got = map { $_ => 1 } arrived_ids($sub, $model);
			!grep { !$got{$_} } @expected;
		},
		30);
	my $r = tally("MQTT $version", [ arrived_ids($sub, $model) ], \@expected);
	is($r->{missing}, 0, "MQTT $version: no event missing at the subscriber ($r->{sent} sent)");
	is($r->{unexpected}, 0, "MQTT $version: nothing unexpected");
	my $s = stats($node);
	note "MQTT $version: stats published $s->{published}, retried $s->{retried}, "
	  . "failed $s->{failed}, dead_letters $s->{dead_letters}";
	is($s->{dead_letters}, 0, "MQTT $version: no dead letters");
	is($s->{failed}, 0, "MQTT $version: no failed publish (under MQTT 5 paho keeps to Receive Maximum)")
	  if $version eq '5';
	$sub->stop;
	$node->stop;
}

done_testing();
