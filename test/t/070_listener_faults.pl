#!/usr/bin/perl
#
# 070_listener_faults.pl: listeners run in a worker of their own, and one
# event that cannot be handled costs that event only (README, "Listeners"
# and "Delivery semantics").
#
#   1. A poison event (a json value that is valid json but not jsonb) is
#      tried 3 times and moved to mqtt_emit.dead_letters with its error;
#      later events' listeners run once each; no worker exits.
#   2. A listener that catches the cancel of listener_timeout and loops is
#      ended a second later by ending the listener worker; after 3 attempts
#      its event is a dead letter; publishing never stopped meanwhile; the
#      other listeners of that event took no effect (rolled back), later
#      events' listeners run once.
#   3. pg_terminate_backend() on the listener worker while a listener waits
#      on a lock: it is restarted, and the event's listener takes effect
#      exactly once when the lock is free.
#   4. A watched table dropped while thousands of its events wait for a slow
#      listener: later events of another table flow; nothing wedges.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 120;

my $broker = start_broker(extra_conf => ['max_queued_messages 0']);
my $node   = new_node(
	'lf',
	broker                        => $broker,
	'mqtt_emit.listener_timeout'  => '1s');
my $pfx = $node->{mqtt_emit}{topic_prefix};
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE ran (model text, id int, listener text);
	CREATE FUNCTION rec(e mqtt_emit.event) RETURNS void LANGUAGE sql
	  AS $$ INSERT INTO ran VALUES (e.model, (e.result->>'id')::int, 'rec') $$;
	CREATE TABLE ev (id int PRIMARY KEY, j json);
	SELECT mqtt_emit.watch('ev');
	SELECT mqtt_emit.listen('ev', 'rec(mqtt_emit.event)') > 0;
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
	'worker connected');
my $sub = start_subscriber($broker, "$pfx/#");

sub q1 { return $node->safe_psql('postgres', $_[0]); }

sub listener_pid
{
	return q1("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit listeners'");
}

sub ran_count
{
	my ($model, $id, $listener) = @_;
	$listener //= 'rec';
	return q1("SELECT count(*) FROM ran WHERE model = '$model' AND id = $id AND listener = '$listener'");
}

# the ids of create events of $model that arrived
sub arrived
{
	my ($model) = @_;
	return grep { $_ ne '?' } arrived_ids($sub, $model);
}

my $worker_pid = stats($node)->{worker_pid};
ok($worker_pid, "the worker runs (PID $worker_pid)");
ok(listener_pid() =~ /^\d+$/, 'the listener worker runs');
my $starts0 = () = slurp_file($node->logfile) =~ /pg_mqtt_emit worker started/g;

# ---------------------------------------------------------------------------
# 1. a poison event
# ---------------------------------------------------------------------------

q1(q{INSERT INTO ev VALUES (1, '{"a":1e999999}')});
q1(q{INSERT INTO ev SELECT g, '{"a":1}' FROM generate_series(2, 50) g});
ok( poll_until(sub { q1("SELECT count(*) FROM ran WHERE model = 'ev'") == 49 }, $T),
	'poison: the 49 events behind the poison event ran their listener');
ok( poll_until(
		sub { q1(q{SELECT count(*) FROM mqtt_emit.dead_letters WHERE payload LIKE '%1e999999%'}) == 1 },
		$T),
	'poison: the poison event is in mqtt_emit.dead_letters');
like(q1(q{SELECT reason FROM mqtt_emit.dead_letters WHERE payload LIKE '%1e999999%'}),
	qr/value overflows numeric format.*SQLSTATE 22003.*3 attempts/,
	'poison: the dead letter says why (the error, its SQLSTATE, the attempts)');
is(q1("SELECT string_agg(c::text, ',') FROM (SELECT count(*) c FROM ran WHERE model = 'ev' GROUP BY id) s WHERE c <> 1"),
	'', 'poison: every other event ran its listener exactly once');
is(ran_count('ev', 1), 0, 'poison: the poison event took no effect');
is(scalar(grep { $_ eq '1' } arrived('ev')), 1, 'poison: the poison event itself was published');
is(stats($node)->{worker_pid}, $worker_pid, 'poison: the worker did not exit');
ok(poll_until(sub { stats($node)->{in_outbox} == 0 }, $T), 'poison: the outbox drains');

# ---------------------------------------------------------------------------
# 2. a listener that ignores cancels
# ---------------------------------------------------------------------------

q1(q{
	CREATE TABLE hang (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('hang');
	CREATE FUNCTION stubborn(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
	BEGIN
	  INSERT INTO ran VALUES (e.model, (e.result->>'id')::int, 'stubborn');
	  IF (e.result->>'id')::int = 1 THEN
	    LOOP
	      BEGIN PERFORM pg_sleep(0.2); EXCEPTION WHEN query_canceled THEN NULL; END;
	    END LOOP;
	  END IF;
	END $$;
	SELECT mqtt_emit.listen('hang', 'stubborn(mqtt_emit.event)') > 0;
	SELECT mqtt_emit.listen('hang', 'rec(mqtt_emit.event)') > 0;
});
my $lpid0 = listener_pid();
q1('INSERT INTO hang VALUES (1)');
ok( poll_until(
		sub {
			q1("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit listeners' AND wait_event = 'PgSleep'")
			  == 1;
		},
		$T),
	'stubborn: the listener worker runs the looping listener');
q1('INSERT INTO ev SELECT g, NULL FROM generate_series(1001, 1100) g');
ok(poll_until(sub { scalar(grep { $_ >= 1001 && $_ <= 1100 } arrived('ev')) == 100 }, $T),
	'stubborn: 100 events committed meanwhile are published');
ok( poll_until(
		sub { q1(q{SELECT count(*) FROM mqtt_emit.dead_letters WHERE topic LIKE '%/hang/create'}) == 1 },
		$T),
	'stubborn: after 3 attempts the event is a dead letter');
like(q1(q{SELECT reason FROM mqtt_emit.dead_letters WHERE topic LIKE '%/hang/create'}),
	qr/exited/, 'stubborn: the dead letter says the listener worker exited');
isnt(listener_pid(), $lpid0, 'stubborn: the listener worker was ended (and started again)');
q1('INSERT INTO hang VALUES (2)');
ok(poll_until(sub { ran_count('hang', 2) == 1 && ran_count('hang', 2, 'stubborn') == 1 }, $T),
	'stubborn: the next event runs both listeners');
is(ran_count('hang', 1) + ran_count('hang', 1, 'stubborn'), 0,
	'stubborn: the dead event took no effect at all (each attempt rolled back)');
ok(poll_until(sub { q1("SELECT count(*) FROM ran WHERE model = 'ev' AND id > 1000") == 100 }, $T),
	'stubborn: the 100 ev events ran their listener');
is(q1("SELECT count(*) FROM (SELECT id FROM ran WHERE model = 'ev' GROUP BY id HAVING count(*) <> 1) s"),
	0, 'stubborn: each exactly once');
is(stats($node)->{worker_pid}, $worker_pid, 'stubborn: the publishing worker never exited');

# ---------------------------------------------------------------------------
# 3. pg_terminate_backend() on the listener worker
# ---------------------------------------------------------------------------

q1(q{
	ALTER SYSTEM SET mqtt_emit.listener_timeout = 0;
	SELECT pg_reload_conf();
	CREATE TABLE gate (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('gate');
	CREATE FUNCTION wait_gate(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
	BEGIN
	  PERFORM pg_advisory_xact_lock(7070);
	  INSERT INTO ran VALUES (e.model, (e.result->>'id')::int, 'wait_gate');
	END $$;
	SELECT mqtt_emit.listen('gate', 'wait_gate(mqtt_emit.event)') > 0;
});
ok(poll_until(sub { q1('SHOW mqtt_emit.listener_timeout') eq '0' }, $T), 'terminate: listener_timeout off');
my $holder = $node->background_psql('postgres');
$holder->query_safe('SELECT pg_advisory_lock(7070)');
q1('INSERT INTO gate VALUES (1)');
my $wait_sql = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit listeners' AND wait_event = 'advisory'";
ok(poll_until(sub { q1($wait_sql) =~ /^\d+$/ }, $T), 'terminate: the listener waits on the lock');
my $lpid1 = q1($wait_sql);
is(q1("SELECT pg_terminate_backend($lpid1)"), 't', 'terminate: pg_terminate_backend() on the listener worker');
ok(poll_until(sub { my $p = q1($wait_sql); $p =~ /^\d+$/ && $p ne $lpid1 }, $T),
	'terminate: a new listener worker tries the event again');
$holder->query_safe('SELECT pg_advisory_unlock(7070)');
$holder->quit;
ok(poll_until(sub { ran_count('gate', 1, 'wait_gate') >= 1 }, $T), 'terminate: the listener ran once the lock was free');
ok(poll_until(sub { q1('SELECT count(*) FROM mqtt_emit.outbox') == 0 }, $T), 'terminate: the event is done');
is(ran_count('gate', 1, 'wait_gate'), 1, 'terminate: its effect is there exactly once');

# ---------------------------------------------------------------------------
# 4. a table dropped while its events wait for a slow listener
# ---------------------------------------------------------------------------

q1(q{
	CREATE TABLE big (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('big');
	CREATE FUNCTION slow(e mqtt_emit.event) RETURNS void LANGUAGE sql
	  AS $$ SELECT pg_sleep(0.002) $$;
	SELECT mqtt_emit.listen('big', 'slow(mqtt_emit.event)') > 0;
	INSERT INTO big SELECT generate_series(1, 3000);
	DROP TABLE big;
	INSERT INTO ev SELECT g, NULL FROM generate_series(2001, 2100) g;
});
ok(poll_until(sub { scalar(grep { $_ >= 2001 && $_ <= 2100 } arrived('ev')) == 100 }, $T),
	'drop: the events committed after the DROP TABLE are published');
ok(poll_until(sub { q1("SELECT count(*) FROM ran WHERE model = 'ev' AND id > 2000") == 100 }, $T),
	'drop: and run their listener');
ok(poll_until(sub { my $s = stats($node); $s->{queued} == 0 && $s->{in_outbox} == 0 }, $T),
	'drop: queue and outbox drain');
is(stats($node)->{worker_pid}, $worker_pid, 'drop: the worker did not exit');

my $starts = () = slurp_file($node->logfile) =~ /pg_mqtt_emit worker started/g;
is($starts - $starts0, 0, 'the publishing worker was never restarted');
unlike(slurp_file($node->logfile), qr/PANIC|server process .* was terminated by signal/,
	'no server process crashed');

$sub->stop;
done_testing();
