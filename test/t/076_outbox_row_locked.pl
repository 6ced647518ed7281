#!/usr/bin/perl
#
# 076_outbox_row_locked.pl: a lock held on an outbox row does not stop
# publishing (durable delivery).  The listener worker locks outbox rows
# when it clears their local flags, and the publishing worker deletes the
# rows the broker acknowledged: it used to wait for such locks, which
# stopped publishing meanwhile, and the two workers' UPDATE and DELETE
# statements could deadlock ("deadlock detected" between "deleting
# published outbox rows" and "running listeners", seen in a durable-mode
# bench run, bench/README.md).  The worker now locks the acknowledged rows
# with SKIP LOCKED and leaves the others for a later round.
#
# Here a session holds the lock (SELECT ... FOR UPDATE in an open
# transaction) on the outbox row of event 1, committed while the broker was
# down.  The broker comes back; the worker publishes event 1 and gets its
# acknowledgement; events 2..30 commit.  Expected: all of them arrive while
# the lock is still held (on the code before, none did), and once the
# session commits, the outbox drains.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T     = 60;
my $MODEL = 'lockd';

my $broker = start_broker();
my $node = new_node(
	'lockd',
	broker                    => $broker,
	'mqtt_emit.delivery'      => 'durable',
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '500ms');
$node->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE $MODEL (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('$MODEL', model => '$MODEL');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T), 'worker connected');
# before the lock: a worker that finds the extension recovers the outbox,
# and that waits for the lock (CI, PG18 chroot: found 1.2 s after CREATE
# EXTENSION, after the lock was taken); this test is about the rows the
# broker acknowledged
ok(poll_until(sub { slurp_file($node->logfile) =~ /pg_mqtt_emit worker found the extension/ }, $T),
	'the worker found the extension');

$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, $T), 'broker down');
$node->safe_psql('postgres', "INSERT INTO $MODEL VALUES (1)");
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox'), '1', 'event 1 waits in the outbox');

# a session locks the row and keeps its transaction open
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
is($locker->query_safe('SELECT count(*) FROM (SELECT id FROM mqtt_emit.outbox FOR UPDATE) s'), '1',
	'a session holds the lock on the row of event 1');
my $locker_pid = $locker->query_safe('SELECT pg_backend_pid()');

my $published0 = stats($node)->{published};
$broker->start;
my $sub = start_subscriber($broker, topic_prefix() . "/$MODEL/#");
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} && $s->{published} > $published0 }, $T),
	'the worker is back and event 1 was acknowledged');
$node->safe_psql('postgres', "INSERT INTO $MODEL VALUES ($_)") for 2 .. 30;
my @want = (2 .. 30);
ok( poll_until(
		sub {
			my %got = map { $_ => 1 } arrived_ids($sub, $MODEL);
			!grep { !$got{$_} } @want;
		},
		$T),
	'events 2..30 were published');
is( $node->safe_psql('postgres',
		"SELECT state FROM pg_stat_activity WHERE pid = $locker_pid"),
	'idle in transaction', '... while the session still held the lock');
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox WHERE id = 1'), '1',
	'the locked row is still there');

$locker->query_safe('COMMIT');
$locker->quit;
ok(poll_until(sub { $node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox') eq '0' }, $T),
	'after the session committed, the outbox drained');
ok(poll_until(sub { my $s = stats($node); $s && $s->{in_outbox} == 0 }, $T), 'stats.in_outbox is 0');
unlike(slurp_file($node->logfile), qr/deadlock detected/, 'no deadlock in the log');

done_testing();
