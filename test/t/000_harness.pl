#!/usr/bin/perl
#
# 000_harness.pl: the test harness itself (test/lib/MqttEmitTest.pm), without
# pg_mqtt_emit: brokers, restarts on the same port, subscribers, probes, plain
# clusters, and the configuration new_node() writes for preloaded ones.
use strict;
use warnings;

use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes ();

my $prefix = topic_prefix();
like($prefix, qr{^test/[0-9a-f]{12}$}, 'topic prefix is test/<random>');

# poll_until: returns the value, or false once the timeout passed.
is(poll_until(sub { 42 }, 1), 42, 'poll_until returns the true value');
my $t0 = Time::HiRes::time();
my $n  = 0;
ok(!poll_until(sub { $n++; 0 }, 0.3), 'poll_until gives up');
my $took = Time::HiRes::time() - $t0;
ok($took >= 0.3 && $took < 5 && $n > 1, "poll_until bounded ($took s, $n calls)");

# Broker.
my $broker = start_broker();
ok($broker->port > 0, 'broker port ' . $broker->port);
is($broker->url, 'tcp://127.0.0.1:' . $broker->port, 'broker url');
ok($broker->pid && kill(0, $broker->pid), 'broker running');
ok(mqtt_pub($broker, "$prefix/x", 'y'), 'mosquitto_pub to the broker works');
like(
	slurp_file($broker->conf_file),
	qr/^max_inflight_messages 0$/m,
	'broker config lifts the in-flight window');

my $broker2 = start_broker(extra_conf => ['max_packet_size 100000']);
isnt($broker2->port, $broker->port, 'second broker on another port');
like(slurp_file($broker2->conf_file), qr/^max_packet_size 100000$/m,
	'extra broker config');

# Subscriber.
my $logpos = $broker->log_position;
my $sub = start_subscriber($broker, "$prefix/harness/#");
ok($sub->pid, 'subscriber started');
ok($broker->wait_for_subscription($sub->client_id, "$prefix/harness/#", 10, $logpos),
	'broker log shows the subscription');
ok(!$broker->wait_for_subscription($sub->client_id, "$prefix/nothing/#", 0.2),
	'and not one that was not made');
is($sub->count, 0, 'probes are not messages');

ok(mqtt_pub($broker, "$prefix/harness/a", '{"id":1}'), 'publish a');
ok(mqtt_pub($broker, "$prefix/other/b",   'not for us'), 'publish outside the filter');
my $odd = "two words\nline\ttab \x01\xff";    # argv cannot carry NUL
ok(mqtt_pub($broker, "$prefix/harness/c", $odd), 'publish c (binary payload)');
ok(mqtt_pub($broker, "$prefix/harness/d", undef), 'publish d (empty payload)');
ok($sub->wait_for_count(3, 30), 'three messages arrive');
is_deeply(
	[ $sub->messages ],
	[
		[ "$prefix/harness/a", '{"id":1}' ],
		[ "$prefix/harness/c", $odd ],
		[ "$prefix/harness/d", '' ],
	],
	'messages in order, payloads intact, nothing outside the filter');
is(($sub->records)[0]{qos}, 1, 'QoS 1 end to end');
ok(!$sub->wait_for_count(4, 0.3), 'wait_for_count times out when nothing comes');
ok($sub->wait_for(sub { grep { $_->[0] =~ m{/d$} } @_ }, 5), 'wait_for');

# Broker restart on the same port.
my ($port, $pid) = ($broker->port, $broker->pid);
$broker->stop;
ok(!$broker->pid && !kill(0, $pid), 'broker stopped');
ok(!mqtt_pub($broker, "$prefix/harness/lost", 'x', timeout => 5),
	'publishing fails while the broker is down');
$broker->start;
is($broker->port, $port, 'broker restarted on the same port');
isnt($broker->pid, $pid, 'with a new pid');
ok($sub->wait_ready(60), 'subscriber reconnected and resubscribed');
ok(mqtt_pub($broker, "$prefix/harness/e", 'after restart'), 'publish e');
ok($sub->wait_for_count(4, 30), 'message after the restart arrives');
is_deeply(($sub->messages)[-1], [ "$prefix/harness/e", 'after restart' ],
	'last message');

# Crash (SIGKILL) and restart.
$broker->kill9;
ok(!$broker->pid, 'broker killed');
$broker->start;
is($broker->port, $port, 'broker back after a crash, same port');

# A persistent session gets what was published while it was away.
my $psub = start_subscriber($broker, "$prefix/persist/#",
	clean_session => 0, client_id => "persist-$$");
$psub->stop;
ok(mqtt_pub($broker, "$prefix/persist/a", 'while away'), 'publish while away');
$psub = start_subscriber($broker, "$prefix/persist/#",
	clean_session => 0, client_id => "persist-$$");
ok($psub->wait_for_count(1, 30), 'persistent session: queued message delivered');
$psub->stop;

my $sub_pid = $sub->pid;
$sub->stop;
ok(!$sub->pid && !kill(0, $sub_pid), 'subscriber stopped');
is($sub->count, 4, 'messages readable after stop');

# A plain cluster (no preload: the extension need not exist).
my $plain = new_node('plain', preload => 0);
is($plain->safe_psql('postgres', 'SELECT 1'), '1', 'plain cluster answers');
is($plain->safe_psql('postgres', 'SHOW shared_preload_libraries'),
	'', 'plain cluster preloads nothing');
is_deeply($plain->{mqtt_emit}, {}, 'no mqtt_emit settings recorded');
$plain->stop;

# A preloaded node's configuration (not started: the extension may not be
# installed yet).
my $node = new_node(
	'conf',
	broker                => $broker,
	start                 => 0,
	'mqtt_emit.qos'       => 0,
	'mqtt_emit.dedup_ttl' => "5s",
	extra_conf            => ["log_min_messages = 'debug1'"]);
my $conf = slurp_file($node->data_dir . '/postgresql.conf');
like($conf, qr/^shared_preload_libraries = 'pg_mqtt_emit'$/m, 'preload');
like($conf, qr/^mqtt_emit\.broker_url = 'tcp:\/\/127\.0\.0\.1:$port'$/m,
	'broker_url');
like($conf, qr/^mqtt_emit\.database = 'postgres'$/m, 'database');
like($conf, qr/^mqtt_emit\.topic_prefix = '\Q$prefix\E'$/m, 'topic_prefix');
like($conf, qr/^mqtt_emit\.client_id = 'conf-$$-\d+'$/m, 'client_id');
like($conf, qr/^mqtt_emit\.qos = '0'$/m, 'extra setting');
like($conf, qr/^log_min_messages = 'debug1'$/m, 'extra line');
like($node->{mqtt_emit}{client_id}, qr/^conf-$$-\d+$/, 'client id recorded');
is($node->{mqtt_emit}{broker_url}, $broker->url, 'broker url recorded');

my $node2 = new_node('conf2', broker => $broker, start => 0);
isnt($node2->{mqtt_emit}{client_id}, $node->{mqtt_emit}{client_id},
	'client ids differ between nodes');
is($node2->{mqtt_emit}{topic_prefix}, $prefix, 'nodes share the prefix');

ok(!eval { new_node('nobroker'); 1 }, 'broker required when preloading');

$broker2->stop;
done_testing();
