#!/usr/bin/perl
#
# 020_listeners_three_nodes.pl: the seed's listener table on three real
# clusters sharing one real mosquitto broker (doc/DESIGN.md 2, 4, 5.3).
#
# Node 1 watches table "user"; nodes 1, 2 and 3 each register, for model
# 'user', a default listener, an allow_remote listener and an
# allow_remote + remote_only listener (plus a filtered and a delete-only
# allow_remote listener), each of which records what it saw in a table
# seen(node, who, source, operation, event_id, id). After six writes on
# node 1 the recorded rows must be exactly the seed's table:
#
#   node 1:    default and allow_remote once per event, source 'local';
#              remote_only never (its own events come back from the broker
#              and must be recognised as its own)
#   nodes 2,3: allow_remote and remote_only once per event, source 'remote';
#              default never
#
# and no listener runs twice for one event. Then listen()/unlisten() must
# take effect without a restart, within a bounded wait.
#
# Every wait is a bounded poll. "Everything has arrived" is established with
# a trailing marker: a foreign (prisma-extension-emitter style) message
# published after the broker is known to hold all of node 1's events; MQTT
# delivers one broker's messages to one subscriber in order, so when the
# marker's listener row is visible on a node, every earlier message has been
# handled there (and its listener rows committed).
use strict;
use warnings;

use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes ();

my $T      = 30;               # seconds any one expected effect may take
my $prefix = topic_prefix();

# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

sub sq
{
	my ($node, $sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

sub stats
{
	my ($node) = @_;
	return JSON::PP::decode_json(
		sq($node, 'SELECT row_to_json(s) FROM mqtt_emit.stats s'));
}

sub broker_log_size
{
	my ($broker) = @_;
	return -s $broker->log_file // 0;
}

sub broker_log_since
{
	my ($broker, $offset) = @_;
	return '' unless -e $broker->log_file;
	my $text = slurp_file($broker->log_file);
	return length($text) > $offset ? substr($text, $offset) : '';
}

# Wait until $node's worker has a live subscriber, stats.subscriptions is at
# least $n, and the broker logged the subscription of $filter by the node's
# subscriber client (after byte $offset of the broker log): then messages
# published from now on reach the node.
sub wait_subscribed
{
	my ($node, $broker, $filter, $n, $offset) = @_;
	my $cid = $node->{mqtt_emit}{client_id} . '-subscriber';
	return poll_until(
		sub {
			my $s = stats($node);
			return 0 unless $s->{subscriber_connected} && $s->{subscriptions} >= $n;
			return broker_log_since($broker, $offset) =~
			  /^\S+: \Q$cid\E \d \Q$filter\E$/m;
		},
		$T);
}

# A message in the format of prisma-extension-emitter (no origin), published
# from outside: every node treats it as remote.
sub foreign_message
{
	my ($id, $status) = @_;
	return JSON::PP->new->canonical(0)->encode(
		{
			model     => 'User',
			operation => 'create',
			args      => { data => { id => $id } },
			result    => { id => $id, status => $status },
			timestamp => '2026-11-28T00:28:07.386Z',
			eventId   => "marker-$id",
		});
}

# ---------------------------------------------------------------------------
# three nodes, one broker
# ---------------------------------------------------------------------------

my $broker = start_broker();
my %nodes;
for my $n (1 .. 3)
{
	$nodes{$n} = new_node("n$n",
		broker => $broker,
		init   => { extra => [ '--encoding=UTF8', '--locale=C' ] });
}
my @clients = map { $nodes{$_}{mqtt_emit}{client_id} } 1 .. 3;
is(scalar(keys %{ { map { $_ => 1 } @clients } }), 3, 'three distinct client ids');
is(scalar(keys %{ { map { $nodes{$_}{mqtt_emit}{topic_prefix} => 1 } 1 .. 3 } }),
	1, 'one topic prefix for all nodes');

# listener kinds: name => listen() options
my @kinds = (
	[ default     => '' ],
	[ remote      => ', allow_remote => true' ],
	[ remote_only => ', allow_remote => true, remote_only => true' ],
	[ filtered    => q{, allow_remote => true, filter => '{"status":"active"}'} ],
	[ deletes     => q{, allow_remote => true, operations => '{delete}'} ],
);

my %lid;    # $lid{$n}{$who} = listener id
my $blog0 = broker_log_size($broker);
for my $n (1 .. 3)
{
	my $node = $nodes{$n};
	my $sql  = "CREATE EXTENSION pg_mqtt_emit;\n"
	  . "CREATE TABLE seen(node text, who text, source text, operation text, event_id text, id text);\n";
	for my $who ((map { $_->[0] } @kinds), 'late')
	{
		$sql .= "CREATE FUNCTION l_$who(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS \$\$\n"
		  . "BEGIN INSERT INTO seen VALUES ('n$n', '$who', e.source, e.operation, e.event_id, e.result->>'id'); END\n"
		  . "\$\$;\n";
	}
	if ($n == 1)
	{
		$sql .= qq{CREATE TABLE "user"(id int PRIMARY KEY, name text, status text);\n}
		  . qq{SELECT mqtt_emit.watch('"user"');\n};
	}
	sq($node, $sql);
	for my $k (@kinds)
	{
		my ($who, $opts) = @$k;
		$lid{$n}{$who} =
		  sq($node, "SELECT mqtt_emit.listen('user', 'l_$who(mqtt_emit.event)'$opts)");
	}
	is( sq($node, 'SELECT count(*) FROM mqtt_emit.listeners'),
		scalar(@kinds), "node $n: " . scalar(@kinds) . ' listeners registered');
}
is(sq($nodes{1}, 'SELECT model FROM mqtt_emit.watched_tables'),
	'user', 'node 1 watches "user" as model user');

# Subscriptions must be live on every node before anything is written.
for my $n (1 .. 3)
{
	ok(wait_subscribed($nodes{$n}, $broker, "$prefix/user/#", 1, $blog0),
		"node $n: subscriber connected and subscribed to $prefix/user/#");
	is_deeply(
		[ split /\n/, sq($nodes{$n}, 'SELECT topic_filter FROM mqtt_emit.subscriptions ORDER BY 1') ],
		["$prefix/user/#"],
		"node $n: mqtt_emit.subscriptions shows the one filter");
}
ok(poll_until(sub { stats($nodes{1})->{connected} }, $T), 'node 1: publisher connected');

# Our own view of the bus, to know when the broker holds all of node 1's events.
my $sub = start_subscriber($broker, "$prefix/user/#");

# ---------------------------------------------------------------------------
# six writes on node 1
# ---------------------------------------------------------------------------
#   E1 create id 1 active     E2 create id 2 inactive
#   E3 update id 2 -> active  E4 update id 1 -> inactive
#   E5 delete id 2 (active)   E6 delete id 1 (inactive)
sq($nodes{1}, $_) for (
	q{INSERT INTO "user" VALUES (1, 'alice', 'active')},
	q{INSERT INTO "user" VALUES (2, 'bob', 'inactive')},
	q{UPDATE "user" SET status = 'active' WHERE id = 2},
	q{UPDATE "user" SET status = 'inactive' WHERE id = 1},
	q{DELETE FROM "user" WHERE id = 2},
	q{DELETE FROM "user" WHERE id = 1});

ok($sub->wait_for_count(6, $T), 'the broker carried six events from node 1');
my @msgs = $sub->messages;
is_deeply(
	[ map { (split m{/}, $_->[0])[-1] } @msgs ],
	[qw(create create update update delete delete)],
	'topics <prefix>/user/<operation>, in commit order');
my @wire_ids = map { JSON::PP::decode_json($_->[1])->{eventId} // '' } @msgs;
is(scalar(keys %{ { map { $_ => 1 } @wire_ids } }), 6, 'six distinct event ids on the wire');
is( scalar(grep { JSON::PP::decode_json($_->[1])->{origin} // '' eq $clients[0] } @msgs),
	6, 'every event carries origin = node 1\'s client id');

# Trailing marker: once its remote_only row is visible on a node, everything
# before it has been handled there.
ok(mqtt_pub($broker, "$prefix/user/all", foreign_message('marker-1', 'marker')),
	'marker published after the six events');
for my $n (1 .. 3)
{
	ok( poll_until(
			sub {
				sq($nodes{$n},
					"SELECT count(*) FROM seen WHERE who = 'remote_only' AND id = 'marker-1'")
				  >= 1;
			},
			$T),
		"node $n: marker handled (everything before it is done)");
}

# ---------------------------------------------------------------------------
# the seed's table
# ---------------------------------------------------------------------------

my $summary_sql = q{
	SELECT who || '|' || source || '|' || count(*) || '|' || count(DISTINCT event_id)
	  FROM seen WHERE id IS DISTINCT FROM 'marker-1'
	 GROUP BY who, source ORDER BY who, source};
my %expected = (
	1 => [
		'default|local|6|6',  'deletes|local|2|2',
		'filtered|local|3|3', 'remote|local|6|6',
	],
	2 => [
		'deletes|remote|2|2', 'filtered|remote|3|3',
		'remote|remote|6|6',  'remote_only|remote|6|6',
	],
);
$expected{3} = $expected{2};
for my $n (1 .. 3)
{
	is_deeply([ split /\n/, sq($nodes{$n}, $summary_sql) ],
		$expected{$n}, "node $n: listener kind | source | calls | events, as in the seed's table");
	is( sq($nodes{$n},
			"SELECT count(*) FROM seen WHERE id IS DISTINCT FROM 'marker-1' AND event_id IS NULL"),
		0, "node $n: every call had an event id");
	is( sq($nodes{$n},
			q{SELECT coalesce(string_agg(who || ' ' || event_id || ' x' || c, ', '), '')
			    FROM (SELECT who, event_id, count(*) c FROM seen
			           GROUP BY who, event_id HAVING count(*) > 1) d}),
		'', "node $n: no listener ran twice for one event");
}
is(sq($nodes{1}, "SELECT count(*) FROM seen WHERE who = 'remote_only' AND id IS DISTINCT FROM 'marker-1'"),
	0, 'node 1: remote_only never ran for its own events');
for my $n (2, 3)
{
	is(sq($nodes{$n}, "SELECT count(*) FROM seen WHERE who = 'default'"),
		0, "node $n: default listener never ran for remote events");
}

# The same six events everywhere, with the ids that were on the wire.
my $ids_sql = q{SELECT string_agg(DISTINCT event_id, ',' ORDER BY event_id)
                  FROM seen WHERE who = 'remote' AND id IS DISTINCT FROM 'marker-1'};
my $wire = join ',', sort @wire_ids;
is(sq($nodes{$_}, $ids_sql), $wire, "node $_: listeners saw the event ids that were on the wire")
  for 1 .. 3;

# Operations as seen by the listeners, in order of the writes.
my $ops_sql = q{SELECT string_agg(operation || ':' || id, ' ' ORDER BY ctid)
                  FROM seen WHERE who = 'remote' AND id IS DISTINCT FROM 'marker-1'};
is(sq($nodes{$_}, $ops_sql), 'create:1 create:2 update:2 update:1 delete:2 delete:1',
	"node $_: operations and rows (result is the old row for delete)")
  for 1 .. 3;

# filter => '{"status":"active"}': only where result @> filter, local and remote.
my $filtered_sql = q{SELECT string_agg(operation || ':' || id, ' ' ORDER BY ctid)
                       FROM seen WHERE who = 'filtered'};
is(sq($nodes{$_}, $filtered_sql), 'create:1 update:2 delete:2',
	"node $_: filtered listener only for rows with status active")
  for 1 .. 3;

# operations => '{delete}': deletes only, local and remote.
my $deletes_sql = q{SELECT string_agg(operation || ':' || id, ' ' ORDER BY ctid)
                      FROM seen WHERE who = 'deletes'};
is(sq($nodes{$_}, $deletes_sql), 'delete:2 delete:1',
	"node $_: operations => '{delete}' listener only for deletes")
  for 1 .. 3;

# Node 1 did receive its own events (else the check above proves nothing).
my $s1 = stats($nodes{1});
cmp_ok($s1->{self_echo}, '>=', 6, "node 1: its own six events came back and were recognised (self_echo $s1->{self_echo})");
for my $n (1 .. 3)
{
	my $s = stats($nodes{$n});
	is($s->{listener_errors}, 0, "node $n: no listener errors");
	is($s->{rejected}, 0, "node $n: nothing rejected");
}
for my $n (2, 3)
{
	my $s = stats($nodes{$n});
	cmp_ok($s->{received}, '>=', 7, "node $n: received the six events and the marker ($s->{received})");
	is($s->{self_echo}, 0, "node $n: no self echo (it published nothing)");
}

# ---------------------------------------------------------------------------
# listen() / unlisten() take effect without a restart
# ---------------------------------------------------------------------------

my %pids = map { $_ => stats($nodes{$_})->{worker_pid} } 1 .. 3;

sq($nodes{1}, "SELECT mqtt_emit.listen('user', 'l_late(mqtt_emit.event)')");
sq($nodes{2}, "SELECT mqtt_emit.listen('user', 'l_late(mqtt_emit.event)', allow_remote => true)");
sq($nodes{3}, "SELECT mqtt_emit.unlisten($lid{3}{remote_only})");
is(sq($nodes{3}, "SELECT count(*) FROM mqtt_emit.listeners WHERE id = $lid{3}{remote_only}"),
	0, 'node 3: remote_only listener removed from the registry');

# Write a probe row, wait until every node has handled it (its allow_remote
# listener ran), and see whether the changes apply; repeat, bounded, in case
# a probe overtook the worker's reload.
sub probe_applied
{
	my ($id) = @_;
	sq($nodes{1}, qq{INSERT INTO "user" VALUES ($id, 'probe', 'probe')});
	for my $n (1 .. 3)
	{
		return 'not handled'
		  unless poll_until(
			sub { sq($nodes{$n}, "SELECT count(*) FROM seen WHERE who = 'remote' AND id = '$id'") >= 1 },
			$T);
	}
	my $late1 = sq($nodes{1}, "SELECT string_agg(source, ',') FROM seen WHERE who = 'late' AND id = '$id'");
	my $late2 = sq($nodes{2}, "SELECT string_agg(source, ',') FROM seen WHERE who = 'late' AND id = '$id'");
	my $ro3   = sq($nodes{3}, "SELECT count(*) FROM seen WHERE who = 'remote_only' AND id = '$id'");
	return "late on node 1: '$late1', late on node 2: '$late2', remote_only on node 3: $ro3";
}

my $want  = "late on node 1: 'local', late on node 2: 'remote', remote_only on node 3: 0";
my $t0    = Time::HiRes::time();
my $id    = 100;
my $state = '';
while (Time::HiRes::time() - $t0 < $T)
{
	$id++;
	$state = probe_applied($id);
	last if $state eq $want || $state eq 'not handled';
}
my $took = Time::HiRes::time() - $t0;
is($state, $want, 'listen on nodes 1 and 2, unlisten on node 3 took effect without a restart');
cmp_ok($took, '<', $T, sprintf('within a bounded wait (%.2f s, %d probe(s))', $took, $id - 100));
is(probe_applied(200), $want, 'and they stay in effect for the next event');
is_deeply({ map { $_ => stats($nodes{$_})->{worker_pid} } 1 .. 3 },
	\%pids, 'no worker was restarted');

# unlisten the last remote listeners on node 3: its subscription goes away
my $blog1 = broker_log_size($broker);
sq($nodes{3}, "SELECT mqtt_emit.unlisten(id) FROM mqtt_emit.listeners WHERE allow_remote");
my $cid3 = $clients[2] . '-subscriber';
ok( poll_until(
		sub {
			my $s = stats($nodes{3});
			return $s->{subscriptions} == 0 && $s->{subscriber_connected};
		},
		$T),
	'node 3: no remote listener left, no subscription, the subscriber stays connected');
unlike(broker_log_since($broker, $blog1), qr/Client \Q$cid3\E (?:\[[^\]]*\] )?(?:disconnected|closed its connection)/,
	'node 3: the broker did not see its subscriber leave');
is(sq($nodes{3}, 'SELECT count(*) FROM mqtt_emit.subscriptions'), 0,
	'node 3: mqtt_emit.subscriptions is empty');

# and listen again: subscribed again, remote events run again
my $blog2 = broker_log_size($broker);
sq($nodes{3}, "SELECT mqtt_emit.listen('user', 'l_remote_only(mqtt_emit.event)', allow_remote => true, remote_only => true)");
ok(wait_subscribed($nodes{3}, $broker, "$prefix/user/#", 1, $blog2),
	'node 3: a new remote listener subscribes again without a restart');
sq($nodes{1}, q{INSERT INTO "user" VALUES (300, 'again', 'active')});
ok( poll_until(
		sub { sq($nodes{3}, "SELECT count(*) FROM seen WHERE who = 'remote_only' AND id = '300'") >= 1 },
		$T),
	'node 3: the new remote_only listener runs for node 1\'s next event');
is(sq($nodes{3}, "SELECT count(*) FROM seen WHERE who = 'remote' AND id = '300'"), 0,
	'node 3: the unlistened allow_remote listener does not');

$sub->stop;
$_->stop for values %nodes;
done_testing();
