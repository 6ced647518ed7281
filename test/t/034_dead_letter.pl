#!/usr/bin/perl
#
# 034_dead_letter.pl: a message the broker refuses for good (README,
# "Delivery semantics": "message the broker refuses (it closes the connection
# 3 times in a row when it is sent): moved to mqtt_emit.dead_letters,
# counted").
#
# mosquitto with "max_packet_size 2000" closes the connection of a client
# that sends a larger packet ("disconnected due to oversize packet", 2.1:
# "[address] disconnected: oversize packet"; checked
# first with mosquitto_pub, so that a different broker behaviour shows up as
# such and not as an extension failure).  One transaction commits a small
# event, a 5 kB row (its event is about 10 kB: the row is in args.data and in
# result) and another small event; more small events follow.  Expected: the
# broker drops the worker's connection exactly 3 times, then the big event is
# in mqtt_emit.dead_letters (topic, payload, reason), stats.dead_letters = 1,
# it was never delivered, and every small event arrives, in commit order, the
# ones committed later included.
use strict;
use warnings;

use JSON::PP ();
use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T     = 60;
my $MODEL = 'dl';
my $JSON  = JSON::PP->new->utf8;

sub oversize_disconnects
{
	my ($broker, $client) = @_;
	my @l = grep { /disconnected(?: due to|:) oversize packet/ && /\Q$client\E/ }
	  split /\n/, $broker->log;
	return scalar @l;
}

my $broker = start_broker(extra_conf => [ 'max_packet_size 2000', 'max_queued_messages 0' ]);

# the broker does what this test assumes
ok(mqtt_pub($broker, topic_prefix() . '/probe/small', 'x' x 1500),
	'mosquitto accepts a 1500-byte message under max_packet_size 2000');
ok(!mqtt_pub($broker, topic_prefix() . '/probe/big', 'x' x 5000),
	'mosquitto refuses a 5000-byte message');
like($broker->log, qr/disconnected(?: due to|:) oversize packet/,
	'mosquitto closes the connection of a client that sends an oversize packet');

my $node = new_node(
	'dl',
	broker                    => $broker,
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
my $cid = $node->{mqtt_emit}{client_id};
$node->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE dl (id int PRIMARY KEY, v text NOT NULL);
	SELECT mqtt_emit.watch('dl', model => '$MODEL');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
	'worker connected to the broker');
# The strikes lead to a dead letter once the event is in the outbox, which
# the worker uses once it has found the extension (CI, PG18 chroot: it found
# it 5.4 s after CREATE EXTENSION, by its periodic check, and the broker
# had closed the connection 5 times by then).
ok(poll_until(sub { slurp_file($node->logfile) =~ /pg_mqtt_emit worker found the extension/ }, $T),
	'the worker found the extension');
my $sub = start_subscriber($broker, topic_prefix() . "/$MODEL/#");

$node->safe_psql('postgres', "INSERT INTO dl VALUES (1, 'small before')");
ok(poll_until(sub { grep { $_ eq '1' } arrived_ids($sub, $MODEL) }, $T),
	'a small event arrives');
my $before = stats($node);
is(oversize_disconnects($broker, $cid), 0, 'no oversize disconnect of the worker yet');

# small, big, small in one transaction; then more small ones
$node->safe_psql(
	'postgres', q{
	BEGIN;
	INSERT INTO dl VALUES (2, 'small, same transaction, before');
	INSERT INTO dl VALUES (3, repeat('B', 5000));
	INSERT INTO dl VALUES (4, 'small, same transaction, after');
	COMMIT;
	INSERT INTO dl VALUES (5, 'small, next transaction');
});
my $big_payload = $node->safe_psql('postgres', "SELECT length(v) FROM dl WHERE id = 3");
is($big_payload, 5000, 'the big row holds 5000 characters');

my $s;
ok( poll_until(
		sub { $s = stats($node); $s && $s->{dead_letters} >= 1 },
		$T),
	'the big event is moved to the dead letters');
is($s->{dead_letters} - $before->{dead_letters}, 1, 'stats.dead_letters = 1');
my $disconnects = oversize_disconnects($broker, $cid);
note "oversize disconnects of the worker: $disconnects; stats: retried "
  . ($s->{retried} - $before->{retried}) . ', connects '
  . ($s->{connects} - $before->{connects}) . ', failed '
  . ($s->{failed} - $before->{failed}) . ', last_error ' . ($s->{last_error} // 'none');
# 3 strikes with the big message as the oldest unacknowledged one.  One
# more when the first strike went to event 2: it precedes the big one in
# the same transaction, so both can reach mosquitto in one read, and
# mosquitto then closes the connection before it has written event 2's
# PUBACK (seen once in five runs here, on 2 busy cores).
ok($disconnects == 3 || $disconnects == 4,
	"the broker closed the connection 3 times (4 if event 2 lost its PUBACK with the first) before the message was given up: $disconnects");

my @dl = split /\n/, $node->safe_psql('postgres',
	'SELECT row_to_json(d) FROM mqtt_emit.dead_letters d ORDER BY id');
is(scalar @dl, 1, 'mqtt_emit.dead_letters holds one row');
my $row = $JSON->decode($dl[0] // '{}');
is($row->{topic}, topic_prefix() . "/$MODEL/create", 'dead letter: topic');
my $p = eval { $JSON->decode($row->{payload} // '') };
is(ref $p eq 'HASH' ? $p->{result}{id} : undef, 3, 'dead letter: payload is the big event (result.id 3)');
is(ref $p eq 'HASH' ? length($p->{result}{v}) : undef, 5000, 'dead letter: payload intact (5000 characters)');
is(ref $p eq 'HASH' ? $p->{operation} : undef, 'create', 'dead letter: operation create');
like($row->{reason} // '', qr/\S/, "dead letter: reason given ($row->{reason})");
ok(defined $row->{created_at} && defined $row->{failed_at}, 'dead letter: created_at and failed_at set');

# later events still flow
$node->safe_psql('postgres',
	q{DO $$ BEGIN FOR i IN 6..10 LOOP INSERT INTO dl VALUES (i, 'small after'); COMMIT; END LOOP; END $$});
my @small = (1, 2, 4, 5, 6 .. 10);
ok( poll_until(
		sub {
			my %h = map { $_ => 1 } arrived_ids($sub, $MODEL);
			scalar(grep { $h{$_} } @small) == @small;
		},
		$T),
	'every small event arrives, those committed after the dead letter too');
ok( poll_until(
		sub { my $st = stats($node); $st && $st->{connected} && $st->{in_outbox} == 0 && $st->{queued} == 0 },
		$T),
	'connected, queue and outbox empty');
$node->safe_psql('postgres', "INSERT INTO dl VALUES (11, 'marker')");
ok(poll_until(sub { grep { $_ eq '11' } arrived_ids($sub, $MODEL) }, $T), 'marker arrives');

my @got = grep { $_ ne '11' } arrived_ids($sub, $MODEL);
my %seen;
my @first = grep { !$seen{$_}++ } @got;
my $dups = @got - @first;
note sprintf('small events: sent %d, received %d (distinct %d), duplicates %d; big event delivered %d times',
	scalar @small, scalar(grep { $_ ne '3' } @got), scalar(grep { $_ ne '3' } @first), $dups,
	scalar(grep { $_ eq '3' } @got));
note 'small events: arrival order ' . join(' ', @got);
is_deeply(\@first, \@small, 'small events arrived once each at first, in commit order, and the big one never');
is(oversize_disconnects($broker, $cid), $disconnects, 'no further oversize disconnects after the dead letter');
is(stats($node)->{dead_letters} - $before->{dead_letters}, 1, 'still one dead letter');

# The same with delivery = durable: the event starts in the outbox.
my $disconnects0 = oversize_disconnects($broker, $cid);
$node->safe_psql('postgres', q{
	SET mqtt_emit.delivery = durable;
	INSERT INTO dl VALUES (20, repeat('D', 5000));
	INSERT INTO dl VALUES (21, 'small after durable big');
});
ok( poll_until(
		sub { $s = stats($node); $s && $s->{dead_letters} - $before->{dead_letters} >= 2 },
		$T),
	'durable: the big event is moved to the dead letters');
is($s->{dead_letters} - $before->{dead_letters}, 2, 'durable: stats.dead_letters = 2');
my $at_dead2 = oversize_disconnects($broker, $cid);
ok(poll_until(sub { grep { $_ eq '21' } arrived_ids($sub, $MODEL) }, $T),
	'durable: the small event after it arrives');
my $d2 = oversize_disconnects($broker, $cid) - $disconnects0;
note "durable: oversize disconnects of the worker: $d2";
is($d2, 3, 'durable: the broker closed the connection exactly 3 times');
is( $node->safe_psql('postgres',
		"SELECT payload::jsonb #>> '{result,id}' FROM mqtt_emit.dead_letters ORDER BY id"),
	"3\n20",
	'durable: dead letters hold the two big events');
ok(!grep({ $_ eq '20' } arrived_ids($sub, $MODEL)), 'durable: the big event was never delivered');
$node->safe_psql('postgres', "INSERT INTO dl VALUES (22, 'marker')");
ok(poll_until(sub { grep { $_ eq '22' } arrived_ids($sub, $MODEL) }, $T), 'durable: marker arrives');
is(oversize_disconnects($broker, $cid), $at_dead2,
	'durable: the dead letter is not sent again after it was moved');

# Durable again, with small events right before the big one in the same
# transaction: they are outbox rows sent together with it after each
# reconnection.  mosquitto 2.1 closes the connection before it writes the
# PUBACKs of messages that came in the same read as the oversize one; the
# struck event is sent alone after a strike, so the strikes go to the big
# one and no small one is ever a dead letter.  (On 2.1.2 the small ones
# took strikes in about half the connections before; whether this can
# fail depends on the broker's timing, not on a seed.)
my $disconnects3 = oversize_disconnects($broker, $cid);
$node->safe_psql('postgres', q{
	SET mqtt_emit.delivery = durable;
	BEGIN;
	INSERT INTO dl VALUES (30, 'small, durable, before');
	INSERT INTO dl VALUES (31, 'small, durable, before too');
	INSERT INTO dl VALUES (32, repeat('E', 5000));
	INSERT INTO dl VALUES (33, 'small, durable, after');
	COMMIT;
});
ok( poll_until(
		sub { $s = stats($node); $s && $s->{dead_letters} - $before->{dead_letters} >= 3 },
		$T),
	'durable, small ones first: the big event is moved to the dead letters');
ok(poll_until(sub { grep { $_ eq '33' } arrived_ids($sub, $MODEL) }, $T),
	'durable, small ones first: the small event after it arrives');
my $d3 = oversize_disconnects($broker, $cid) - $disconnects3;
note "durable, small ones first: oversize disconnects of the worker: $d3";
ok($d3 == 3 || $d3 == 4,
	"durable, small ones first: 3 disconnects (4 if the first went to a small one): $d3");
is( $node->safe_psql('postgres',
		"SELECT string_agg(payload::jsonb #>> '{result,id}', ' ' ORDER BY id) FROM mqtt_emit.dead_letters"),
	'3 20 32',
	'durable, small ones first: only the big event is a dead letter');
ok((grep { $_ eq '30' } arrived_ids($sub, $MODEL)) && (grep { $_ eq '31' } arrived_ids($sub, $MODEL)),
	'durable, small ones first: both small events before it arrived');

# A refused message followed by a burst: the events committed after it must
# still arrive in commit order, each at least once.
my $dl0 = stats($node)->{dead_letters};
$node->safe_psql('postgres', q{
	SET mqtt_emit.delivery = memory;
	BEGIN;
	INSERT INTO dl VALUES (100, repeat('C', 5000));
	INSERT INTO dl SELECT g, 'burst ' || g FROM generate_series(101, 400) g;
	COMMIT;
});
my @burst = (101 .. 400);
ok( poll_until(
		sub {
			my %h = map { $_ => 1 } arrived_ids($sub, $MODEL);
			scalar(grep { $h{$_} } @burst) == @burst;
		},
		$T),
	'burst behind a refused message: all 300 events arrive');
ok(poll_until(sub { stats($node)->{dead_letters} == $dl0 + 1 }, $T),
	'burst behind a refused message: the refused one is a dead letter');
{
	my @b = grep { $_ >= 101 && $_ <= 400 } arrived_ids($sub, $MODEL);
	my %s;
	my @f = grep { !$s{$_}++ } @b;
	my $inv = grep { $f[$_] < $f[ $_ - 1 ] } 1 .. $#f;
	note sprintf('burst behind a refused message: sent 300, received %d (distinct %d), duplicates %d, out of order %d; first 12 arrivals: %s',
		scalar @b, scalar @f, @b - @f, $inv, join(' ', @b[0 .. 11]));
	is($inv, 0, 'burst behind a refused message: first deliveries in commit order');
}

$sub->stop;
done_testing();
