#!/usr/bin/perl
#
# 064_broker_failover.pl: mqtt_emit.broker_url lists two independent
# mosquitto brokers, A and B (README "Scaling out", "Broker failover").
#
# Node W watches table ev and writes a steady load: one row per transaction
# from a background session, until told to stop.  Node L, subscribed through
# the same list, runs a remote_only listener that records every run (event
# id, row id).  A mosquitto_sub on each broker collects what each broker got.
#
# Round 1: W and L are on A; A is stopped (SIGTERM) in the middle of the
# load; both must fail over to B, and stats must name B.  Round 2: A comes
# back, B is killed with SIGKILL in the middle of the load; both must move
# back to A.  In each round, counted over the rows W committed:
#   - the union of what the mosquitto_subs got holds every event id
#     (missing must be 0; duplicates across the switch are allowed and
#     reported: QoS 1 is at-least-once);
#   - L's listener ran exactly once for each event (L deduplicates by event
#     id), none missing.
# The fail-over time (the broker stopped until the first publish that the
# other broker acknowledged) is printed, never asserted.  Last, a reload to
# a list whose first broker is down must connect to the second.
#
# Why L misses nothing although the brokers are independent: a subscriber
# gets from a broker only what is published while its session exists
# there.  L's persistent session (mqtt_emit.session_expiry) is made on B
# first (broker_url B alone), then L is pointed at the list A, B: B keeps
# the session and queues for it what W publishes to B before L's subscriber
# reconnects there.  A saves its sessions when stopped (persistent), so L's
# session on A is back with A for round 2.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats log_since);
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes;

my $T     = 90;
my $MODEL = 'fo';
my $STEP  = 200;    # rows committed before the stop, and after the fail-over

my $brA = start_broker(name => 'a', persistent => 1, extra_conf => ['max_queued_messages 0']);
my $brB = start_broker(name => 'b', extra_conf => ['max_queued_messages 0']);
my $list = $brA->url . ', ' . $brB->url;

my $w = new_node(
	'writer',
	broker                    => $list,
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
$w->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE ev (id serial PRIMARY KEY, round int NOT NULL);
	CREATE TABLE stop_load (round int);
	SELECT mqtt_emit.watch('ev', model => '$MODEL');
	CREATE PROCEDURE load(r int) LANGUAGE plpgsql AS \$\$
	BEGIN
		LOOP
			EXIT WHEN EXISTS (SELECT FROM stop_load WHERE round = r);
			INSERT INTO ev (round) VALUES (r);
			COMMIT;
			PERFORM pg_sleep(0.002);
		END LOOP;
	END \$\$;
});

# L: first on B alone, so that its persistent session exists there
my $l = new_node(
	'listener',
	broker                    => $brB,
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
$l->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE runs (event_id text NOT NULL, id int NOT NULL);
	CREATE FUNCTION record(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS \$\$
	BEGIN
		INSERT INTO runs VALUES (e.event_id, (e.result->>'id')::int);
	END \$\$;
	SELECT mqtt_emit.listen('$MODEL', 'record(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
my $l_sub = $l->{mqtt_emit}{client_id} . '-subscriber';
my $filter = topic_prefix() . "/$MODEL/create";
my $l_filter = topic_prefix() . "/$MODEL/#";    # what L subscribes to
ok($brB->wait_for_subscription($l_sub, $l_filter, $T), 'L subscribed on B (its session there)');
$l->safe_psql('postgres', "ALTER SYSTEM SET mqtt_emit.broker_url = '$list'");
my $l_off = -s $l->logfile;
$l->reload;
ok(poll_until(sub { log_since($l, $l_off) =~ /subscriber connected to broker "\Q${\ $brA->url}\E"/ }, $T),
	'L moved to the first broker of the list, A');
ok($brA->wait_for_subscription($l_sub, $l_filter, $T), 'L subscribed on A');

ok(poll_until(sub { my $s = stats($w); $s && $s->{connected} }, $T), 'W connected');
my $s = stats($w);
is($s->{broker_url}, $brA->url, 'W: stats.broker_url names A, the first of the list');
ok(poll_until(sub { (stats($w)->{subscriber_broker_url} // '') eq $brA->url }, $T),
	'W: stats.subscriber_broker_url names A (the subscriber connects without remote listeners too)');
is(stats($l)->{subscriber_broker_url}, $brA->url, 'L: stats.subscriber_broker_url names A');
like(slurp_file($w->logfile), qr/publisher connected to broker "\Q${\ $brA->url}\E"/,
	'W: the log names the broker connected to');

my @subs = (start_subscriber($brA, $filter), start_subscriber($brB, $filter));

sub rows { return $w->safe_psql('postgres', "SELECT count(*) FROM ev WHERE round = $_[0]"); }

# one round: $down takes the current broker $from away under load; W and L
# must end up on $to with every event delivered
sub round
{
	my ($r, $what, $from, $to, $down) = @_;

	my ($out, $err) = ('', '');
	my $load = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $w->connstr('postgres'),
		  '-c', "CALL load($r)" ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(300));
	ok(poll_until(sub { rows($r) >= $STEP }, $T), "$what: load running");

	my $pub = stats($w)->{published};
	my $log_off = -s $w->logfile;
	my $t0 = Time::HiRes::time();
	$down->();
	my $t_ack;
	poll_until(
		sub {
			my $st = stats($w) or return 0;
			if (($st->{broker_url} // '') ne $to->url)
			{
				$pub = $st->{published};
				return 0;
			}
			return 0 unless $st->{published} > $pub;
			$t_ack = Time::HiRes::time();
			return 1;
		},
		$T, 0.02);
	ok(defined $t_ack, "$what: W publishes to " . $to->url . ' after the stop');
	diag(sprintf('%s: fail-over time (stop to the first publish acknowledged by the other broker) %s s',
		$what, defined $t_ack ? sprintf('%.2f', $t_ack - $t0) : 'never'));
	is(stats($w)->{broker_url}, $to->url, "$what: W's stats.broker_url names the other broker");
	like(log_since($w, $log_off), qr/publisher connected to broker "\Q${\ $to->url}\E"/,
		"$what: W's log names the new broker");
	ok(poll_until(sub { (stats($l)->{subscriber_broker_url} // '') eq $to->url }, $T),
		"$what: L's subscriber moved to the other broker");

	# the load goes on across the switch, then stops
	my $at = rows($r);
	ok(poll_until(sub { rows($r) >= $at + $STEP }, $T), "$what: the load goes on after the fail-over");
	$w->safe_psql('postgres', "INSERT INTO stop_load VALUES ($r)");
	$load->finish;
	is($load->result(0), 0, "$what: every write of the load succeeded") or diag($err);

	my @expected = split /\n/, $w->safe_psql('postgres', "SELECT id FROM ev WHERE round = $r ORDER BY id");
	my %want = map { $_ => 1 } @expected;
	note("$what: " . scalar(@expected) . ' rows written');
	ok(poll_until(sub { my $q = stats($w); $q && $q->{queued} == 0 && $q->{in_outbox} == 0 }, $T),
		"$what: W published everything");

	my @union;
	ok( poll_until(
			sub {
				@union = grep { $want{$_} } map { arrived_ids($_, $MODEL) } @subs;
				my %h = map { $_ => 1 } @union;
				!grep { !$h{$_} } @expected;
			},
			$T, 0.2),
		"$what: the brokers' subscribers got every event");
	my $t = tally("$what, subscribers of A and B", \@union, \@expected);
	is($t->{missing}, 0, "$what: union of both brokers' subscribers: 0 missing");
	diag("$what: $t->{duplicates} duplicates across the switch (allowed: QoS 1 is at-least-once)")
	  if $t->{duplicates};

	my ($first, $last) = ($expected[0], $expected[-1]);
	my $where = "id BETWEEN $first AND $last";
	poll_until(
		sub { $l->safe_psql('postgres', "SELECT count(DISTINCT id) FROM runs WHERE $where") >= @expected },
		$T, 0.2);
	my ($runs, $distinct) = split /\|/,
	  $l->safe_psql('postgres', "SELECT count(*), count(DISTINCT id) FROM runs WHERE $where");
	my $twice = $l->safe_psql('postgres',
		"SELECT count(*) FROM (SELECT event_id FROM runs WHERE $where GROUP BY event_id HAVING count(*) > 1) x");
	note("$what: L: sent " . scalar(@expected) . ", run $runs (distinct $distinct), run twice $twice");
	is($distinct, scalar(@expected), "$what: L's listener ran for every event (0 missing)");
	is($twice, 0, "$what: L's listener ran once per event id");
	is($runs, scalar(@expected), "$what: as many runs as events");
}

round(1, 'A stopped (SIGTERM)', $brA, $brB, sub { $brA->stop });

# A comes back (with L's session); the subscriber there is made anew
$brA->start;
$subs[0]->stop;
push @subs, start_subscriber($brA, $filter);
is(stats($w)->{broker_url}, $brB->url,
	'W stays on B while B works (no return to the first of the list by itself)');

round(2, 'B killed (SIGKILL)', $brB, $brA, sub { $brB->kill9 });

# a list whose first broker is down (B, killed above): a reload starts
# again with the first URL, which fails at once, and W connects to the next
my $off = -s $w->logfile;
$w->safe_psql('postgres', "ALTER SYSTEM SET mqtt_emit.broker_url = '" . $brB->url . ', ' . $brA->url . "'");
$w->reload;
ok( poll_until(
		sub { log_since($w, $off) =~ /publisher connected to broker "\Q${\ $brA->url}\E"/ }, $T),
	'first of the list down: W connects to the next one');
like(log_since($w, $off), qr/publisher cannot reach broker "\Q${\ $brB->url}\E"/,
	'first of the list down: the log names the broker that failed');
is(stats($w)->{broker_url}, $brA->url, 'first of the list down: stats.broker_url names the second');
$w->safe_psql('postgres', 'INSERT INTO ev (round) VALUES (3)');
my ($id3) = $w->safe_psql('postgres', 'SELECT id FROM ev WHERE round = 3');
ok(poll_until(sub { grep { $_ eq $id3 } arrived_ids($subs[-1], $MODEL) }, $T),
	'first of the list down: an event reaches the subscriber of the second');

$l->stop('fast');
$w->stop('fast');
done_testing();
