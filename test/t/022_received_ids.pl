#!/usr/bin/perl
#
# 022_received_ids.pl: a remote event that comes again after its listeners
# ran does not run them twice, also when the listener worker was restarted
# in between and the in-memory deduplication (mqtt_emit.dedup_ttl) has
# forgotten it (issue 12: "the record of handled event ids committed in the
# same transaction as the listeners' effects (an inbox), kept for a bounded
# time"; README "Deduplication", mqtt_emit.dedup_keep).
#
# Node W publishes an event; node L's remote listener records each run.
# The exact message (as a subscriber received it) is published again by
# mosquitto_pub, the way a publisher that sends again after a crash would.
# L runs with mqtt_emit.dedup_ttl = 0, so only mqtt_emit.received_ids can
# tell it was handled; its listener worker is terminated before the copy.
# Then, with dedup_keep = 0, a copy of a new event runs the listener again:
# that the record is what prevents it.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 60;

my $broker = start_broker();
my $w = new_node('rid_w', broker => $broker);
$w->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE t (id int PRIMARY KEY);
	SELECT mqtt_emit.watch('t');
});
my $l = new_node('rid_l', broker => $broker, 'mqtt_emit.dedup_ttl' => '0');
$l->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE runs (event_id text NOT NULL, id int NOT NULL);
	CREATE FUNCTION record(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$
	  INSERT INTO runs VALUES (e.event_id, (e.result->>'id')::int)
	$$;
	SELECT mqtt_emit.listen('t', 'record(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
ok(poll_until(sub { my $s = stats($l); $s && $s->{subscriptions} >= 1 && $s->{subscriber_connected} }, $T),
	'L subscribed');
my $sub = start_subscriber($broker, topic_prefix() . '/t/#');

# an event reaches L (a new row each try until one runs)
my $id = 0;
sub runs_of { return $l->safe_psql('postgres', "SELECT count(*) FROM runs WHERE id = $_[0]") }
sub event
{
	my $first = $id + 1;
	ok( poll_until(
			sub {
				$id++;
				$w->safe_psql('postgres', "INSERT INTO t VALUES ($id)");
				runs_of($id) > 0;
			},
			$T, 0.5),
		"event $id ran L's listener");
	my $re = qr{"result":\{"id":$id\}};
	my ($msg) = grep { $_->[1] =~ $re } $sub->messages;
	ok(poll_until(sub { ($msg) = grep { $_->[1] =~ $re } $sub->messages; $msg }, $T), "the subscriber has event $id");
	return $msg;
}

my $msg = event();
my $id1 = $id;
is(runs_of($id1), 1, "event $id1 ran once");
is($l->safe_psql('postgres', 'SELECT count(*) > 0 FROM mqtt_emit.received_ids'), 't',
	'its key is in mqtt_emit.received_ids');

my $lw = $l->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit listeners'");
ok($lw =~ /^\d+$/, "listener worker $lw runs");
$l->safe_psql('postgres', "SELECT pg_terminate_backend($lw)");
ok( poll_until(
		sub {
			my $p = $l->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit listeners'");
			$p =~ /^\d+$/ && $p ne $lw;
		},
		$T),
	'the listener worker was started again');

my $d0 = stats($l)->{deduplicated};
ok(mqtt_pub($broker, $msg->[0], $msg->[1]), 'the same message published again');
ok(poll_until(sub { stats($l)->{deduplicated} > $d0 }, $T), 'L counted it as deduplicated');
# a marker event after it: once it ran, the copy was handled (one connection, in order)
event();
is(runs_of($id1), 1, "the copy of event $id1 did not run the listener again");

# without the record, the same copy runs again: it is what prevented it
$l->append_conf('postgresql.conf', "mqtt_emit.dedup_keep = 0\n");
$l->reload;
ok(poll_until(sub { $l->safe_psql('postgres', 'SHOW mqtt_emit.dedup_keep') eq '0' }, $T), 'dedup_keep = 0');
my $msg2 = event();
my ($id2) = $msg2->[1] =~ /"result":\{"id":(\d+)\}/;
ok(mqtt_pub($broker, $msg2->[0], $msg2->[1]), "event $id2 published again");
ok(poll_until(sub { runs_of($id2) == 2 }, $T), "with dedup_keep = 0 (and dedup_ttl = 0) the copy runs the listener again");

# the listener worker's own work (recording, pruning the record) never failed
unlike(slurp_file($l->logfile), qr/\bERROR:/, 'L logged no ERROR');

# A row whose handling fails outside its listeners is tried again, and the
# retry is not taken for a duplicate: node R keeps the in-memory dedup on
# (default dedup_ttl), and a trigger on mqtt_emit.received_ids fails the
# first recording (the error rolls back the row's subtransaction with its
# record).  The retry runs the listener, once.
my $r = new_node('rid_r', broker => $broker);
$r->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE runs (event_id text NOT NULL, id int NOT NULL);
	CREATE FUNCTION record(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$
	  INSERT INTO runs VALUES (e.event_id, (e.result->>'id')::int)
	$$;
	CREATE SEQUENCE fail_once;
	CREATE TABLE armed (on_id int);
	CREATE FUNCTION fail_first() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
	  IF EXISTS (SELECT FROM public.armed) THEN
	    IF nextval('public.fail_once') = 1 THEN
	      RAISE EXCEPTION 'recording fails once (test)';
	    END IF;
	  END IF;
	  RETURN NEW;
	END $$;
	CREATE TRIGGER fail_first BEFORE INSERT ON mqtt_emit.received_ids
	  FOR EACH ROW EXECUTE FUNCTION fail_first();
	SELECT mqtt_emit.listen('t', 'record(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
ok(poll_until(sub { my $s = stats($r); $s && $s->{subscriptions} >= 1 && $s->{subscriber_connected} }, $T),
	'R subscribed');
sub r_runs_of { return $r->safe_psql('postgres', "SELECT count(*) FROM runs WHERE id = $_[0]") }
# an event reaches R before the trigger is armed
my $before_id = $id + 1;
ok( poll_until(
		sub { $id++; $w->safe_psql('postgres', "INSERT INTO t VALUES ($id)"); r_runs_of($id) > 0 },
		$T, 0.5),
	"event $id ran R's listener");
$r->safe_psql('postgres', 'INSERT INTO armed VALUES (1)');
$id++;
my $rlog = -s $r->logfile;
$w->safe_psql('postgres', "INSERT INTO t VALUES ($id)");
ok( $r->wait_for_log(qr/could not hand outbox row \d+ to its listeners: recording fails once/, $rlog),
	"R's first attempt at event $id failed");
ok(poll_until(sub { r_runs_of($id) > 0 }, $T), "the retry of event $id ran R's listener");
is(r_runs_of($id), 1, "event $id ran R's listener exactly once");
is($r->safe_psql('postgres', "SELECT last_value FROM fail_once"), '2',
	'two recordings while armed: the one that failed and its retry');

done_testing();
