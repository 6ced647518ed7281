#!/usr/bin/perl
#
# 039_memory_crash_count.pl: what a crash loses of memory delivery is
# counted and logged (issue 12: "Memory mode: say in the README ... what a
# crash can lose; count it where it can be known"; README "Delivery
# semantics").
#
# With the broker frozen (SIGSTOP) nothing is acknowledged, so committed
# memory-delivery events stay in the shared-memory queue; the worker notes
# the queue's fill once a second in $PGDATA/pg_mqtt_emit/queue_fill.  The
# worker is killed (SIGKILL: the postmaster restarts the server and the
# queue is gone); the first worker of the new shared memory logs a WARNING
# with the number and adds it to stats.dropped.  Durable events in the
# queue are not counted (their rows survive and are published).
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 120;

my $broker = start_broker();
END { kill 'CONT', $broker->pid if $broker && $broker->pid; }
# keepalive 60 s: the frozen broker is not noticed (which would move the
# queue to the outbox) before the worker is killed
my $node = new_node('memcrash', broker => $broker, restart_after_crash => 'on', 'mqtt_emit.keepalive' => '60s');
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE m (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('m');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T), 'worker connected');
my $sub = start_subscriber($broker, topic_prefix() . '/m/#');

ok(kill('STOP', $broker->pid), 'broker frozen');
$node->safe_psql('postgres', 'INSERT INTO m SELECT g FROM generate_series(1, 500) g');
$node->safe_psql('postgres', 'SET mqtt_emit.delivery = durable; INSERT INTO m SELECT g FROM generate_series(501, 530) g');
my $fill = $node->data_dir . '/pg_mqtt_emit/queue_fill';
ok( poll_until(sub { -r $fill && slurp_file($fill) =~ /^500$/m }, $T),
	'the worker noted 500 memory-delivery events in the queue (the 30 durable ones not)')
  or diag(-r $fill ? slurp_file($fill) : 'no file');

my $off = -s $node->logfile;
my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit'");
ok(kill('KILL', $pid), "worker $pid killed");
ok( poll_until(
		sub { substr(slurp_file($node->logfile), $off) =~ /WARNING:  pg_mqtt_emit: about 500 events of memory delivery were lost/ },
		$T),
	'the next worker logs that about 500 events were lost');
ok(poll_until(sub { my $s = eval { stats($node) }; $s && $s->{dropped} == 500 }, $T),
	'stats.dropped counts them');
ok(kill('CONT', $broker->pid), 'broker thawed');
ok( poll_until(sub { my %h = map { $_ => 1 } MqttEmitTest::arrived_ids($sub, 'm'); !grep { !$h{$_} } 501 .. 530 }, $T),
	'the 30 durable events are published after the crash');

# a clean restart loses nothing and reports nothing
$node->safe_psql('postgres', 'INSERT INTO m SELECT g FROM generate_series(1001, 1100) g');
$off = -s $node->logfile;
$node->restart;
ok(poll_until(sub { my $s = eval { stats($node) }; $s && $s->{connected} }, $T), 'worker connected after a clean restart');
unlike(substr(slurp_file($node->logfile), $off), qr/events of memory delivery were lost/,
	'a clean restart reports no loss');
is(stats($node)->{dropped}, 0, 'stats.dropped is 0 after the clean restart');

done_testing();
