#!/usr/bin/perl
#
# 030_broker_outage.pl: the broker goes away while the application keeps
# committing (doc/DESIGN.md section 6: "broker down or unreachable: writes still
# succeed; events wait (outbox table) and are published, in order, when it
# returns").
#
# 3000 single-row transactions are committed while the broker is stopped;
# they must all succeed, the worker must move them into mqtt_emit.outbox and
# the stats must say so.  The broker is then started again on the same port
# and every one of the 3000 events must reach the subscriber, in commit order.
# At-least-once: duplicates are allowed (counted and reported), a missing
# event never is.
#
# Why the subscriber cannot miss what the node publishes right after the
# broker returns: starting a subscriber after the broker is back races with
# the worker's reconnect (mqtt_emit.reconnect_min is 100 ms), and with a clean
# session a message published before the subscription exists is gone.  So the
# subscriber holds a persistent session instead: mosquitto_sub -c with a fixed
# client id, subscribed (QoS 1) before the outage, on a broker that saves its
# state when stopped (persistence true, a persistence_location of our own, no
# per-client queue limit).  When the broker starts again it restores the
# session and its subscription before accepting any connection, and queues
# every QoS 1 message for the subscriber until mosquitto_sub has reconnected.
# The order in which the node and mosquitto_sub reconnect does not matter.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 120;     # seconds for one bounded wait
my $N      = 3000;    # events committed during the outage
my $PRE    = 10;      # events committed before it
my $MODEL  = 'outage';

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

my $broker = start_broker(persistent => 1, extra_conf => ['max_queued_messages 0']);
my $node = new_node(
	'outage',
	broker                     => $broker,
	'mqtt_emit.reconnect_min'  => '100ms',
	'mqtt_emit.reconnect_max'  => '1s');
$node->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE ev (id int PRIMARY KEY, v text NOT NULL);
	SELECT mqtt_emit.watch('ev', model => '$MODEL');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
	'worker connected to the broker');

# a persistent session (-c): it gets what was published while it was away
my $sub = start_subscriber($broker, topic_prefix() . "/$MODEL/#",
	clean_session => 0, client_id => "persist-$$");
ok($sub->pid, 'persistent subscriber started');

# a few events while everything is up
$node->safe_psql('postgres',
	"DO \$\$ BEGIN FOR i IN 1..$PRE LOOP INSERT INTO ev VALUES (i, 'pre'); COMMIT; END LOOP; END \$\$");
ok(poll_until(sub { scalar(my @a = arrived_ids($sub, $MODEL)) >= $PRE }, $T),
	"$PRE events arrive while the broker is up");
# every one acknowledged, so that nothing of these is sent again later
ok( poll_until(
		sub {
			my $s = stats($node);
			$s && $s->{queued} == 0 && $s->{published} >= $PRE && $s->{in_outbox} == 0;
		},
		$T),
	'queue empty and all acknowledged before the outage');
my $before = stats($node);

# ---------------------------------------------------------------------------
# outage
# ---------------------------------------------------------------------------

$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, $T),
	'stats.connected turns false when the broker stops');

# 3000 transactions, one row each, from one session: a DO block committing
# after every row.  Every commit must succeed with the broker away.
my $first = $PRE + 1;
my $last  = $PRE + $N;
my ($rc, $out, $err) = $node->psql('postgres',
	"DO \$\$ BEGIN FOR i IN $first..$last LOOP INSERT INTO ev VALUES (i, 'outage ' || i); COMMIT; END LOOP; END \$\$",
	timeout => $T);
is($rc, 0, "$N single-row commits succeed while the broker is down")
  or diag($err);
is($node->safe_psql('postgres', "SELECT count(*) FROM ev WHERE id BETWEEN $first AND $last"),
	$N, "$N rows committed");

# the worker moves them from the queue into the outbox
my $during;
ok( poll_until(
		sub {
			$during = stats($node);
			$during && $during->{queued} == 0
			  && $during->{outboxed} - $before->{outboxed} >= $N;
		},
		$T),
	'the worker moved the queued events into the outbox');
is($during->{outboxed} - $before->{outboxed}, $N, "stats.outboxed grew by exactly $N");
ok(!$during->{connected}, 'stats.connected is false during the outage');
is($during->{in_outbox}, $N, "stats.in_outbox = $N");
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox'),
	$N, "mqtt_emit.outbox holds $N rows");
is( $node->safe_psql(
		'postgres',
		"SELECT count(DISTINCT (payload::jsonb #>> '{result,id}')::int) FROM mqtt_emit.outbox "
		  . "WHERE (payload::jsonb #>> '{result,id}')::int BETWEEN $first AND $last"),
	$N,
	'the outbox holds each committed event once');
ok(defined $during->{oldest_waiting_age},
	'stats.oldest_waiting_age is set while events wait in the outbox')
  or diag('oldest_waiting_age is NULL with ' . $during->{in_outbox} . ' events waiting');
is(scalar(my @a = arrived_ids($sub, $MODEL)), $PRE,
	'nothing of the outage arrived (sanity: the broker is really down)');
note sprintf('during the outage: in_outbox %d, outboxed %d, spilled %d, retried %d, last_error %s',
	@$during{qw(in_outbox outboxed spilled retried)}, $during->{last_error} // 'none');

# ---------------------------------------------------------------------------
# the broker returns on the same port
# ---------------------------------------------------------------------------

my $port = $broker->port;
$broker->start;
is($broker->port, $port, 'broker back on the same port');

my @expected = (1 .. $last);
ok( poll_until(
		sub {
			my %h = map { $_ => 1 } arrived_ids($sub, $MODEL);
			scalar(grep { $h{$_} } @expected) == @expected;
		},
		$T, 0.5),
	"all $last events arrive after the broker returned");
ok( poll_until(
		sub {
			my $s = stats($node);
			$s && $s->{connected} && $s->{in_outbox} == 0 && $s->{queued} == 0;
		},
		$T),
	'stats.in_outbox returns to 0 and stats.connected to true');
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox'),
	0, 'mqtt_emit.outbox is empty');

# A marker committed now arrives after everything committed before it (one
# ordered stream to one QoS 1 subscriber): once it is here, nothing more of
# the outage is on its way.
my $marker = $last + 1;
$node->safe_psql('postgres', "INSERT INTO ev VALUES ($marker, 'marker')");
ok(poll_until(sub { grep { $_ eq $marker } arrived_ids($sub, $MODEL) }, $T),
	'marker after the outage arrives');

my @arrived = grep { $_ ne $marker } arrived_ids($sub, $MODEL);
my $r = tally('outage', \@arrived, \@expected);
is($r->{missing},    0, 'no committed event is missing');
is($r->{unexpected}, 0, 'no event that was not committed arrived');
is($r->{disorder},   0, 'events arrived in commit order (first deliveries, ids increasing)');
cmp_ok($r->{duplicates}, '>=', 0, "duplicates reported: $r->{duplicates} (at-least-once allows them)");

my $after = stats($node);
note sprintf('after: published %d, failed %d, retried %d, outboxed %d, connects %d, in_outbox %d',
	@$after{qw(published failed retried outboxed connects in_outbox)});
cmp_ok($after->{published} - $before->{published}, '>=', $N + 1,
	'stats.published counts at least every event sent after the outage');
ok($after->{connects} > $before->{connects}, 'stats.connects counts the reconnection');

$sub->stop;
unlike($broker->log, qr/Outgoing messages are being dropped/,
	'the broker dropped no message for the subscriber');
$broker->stop;
done_testing();
