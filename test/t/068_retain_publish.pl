#!/usr/bin/perl
#
# 068_retain_publish.pl: mqtt_emit.publish(..., retain, properties) and the
# event id of row events under MQTT 5 (issue 17, the "out" half), with a
# real mosquitto.
#
#  - publish() with retain: a subscriber that connects afterwards gets the
#    message, retained flag set; a message published without retain is not
#    kept (the later subscriber's probe comes back and it never came).
#  - every property (content_type, response_topic, correlation_data,
#    message_expiry, user_properties with a repeated name) read back with
#    mosquitto_sub -V 5 -F; the jsonb overload with properties, live.
#  - row events carry their event id as user property event-id, the same
#    as the payload's eventId.
#  - every bad input of properties fails at call time with its SQLSTATE;
#    with mqtt_emit.mqtt_version = 3.1.1, retain works and properties are
#    refused (0A000).
#  - a broker outage: retained publishes with properties committed while the
#    broker is down, in memory and in durable delivery, travel through the
#    queue and the outbox; after the broker returns a later subscriber gets
#    the last value of each topic, with its properties, and the dead letters
#    stay empty.
use strict;
use warnings;

use IPC::Run;
use JSON::PP qw(decode_json);
use MqttEmitTest qw(:DEFAULT stats role_fails role_works);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 60;    # seconds for one bounded wait
my $P = 'r68/' . $$;    # topic root of the ad-hoc publishes

my $broker = start_broker();
my $node = new_node(
	'retain5',
	broker                    => $broker,
	'mqtt_emit.mqtt_version'  => '5',
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
my $node3 = new_node('retain3', broker => $broker);
for my $n ($node, $node3)
{
	$n->safe_psql('postgres', 'CREATE EXTENSION pg_mqtt_emit');
	ok(poll_until(sub { my $s = stats($n); $s && $s->{connected} }, $T),
		$n->name . ': worker connected');
}

# ---------------------------------------------------------------------------
# an MQTT 5 subscriber that prints the properties: one line per message,
# fields separated by \x1f (none of the test's values has it)
# ---------------------------------------------------------------------------

my $subno = 0;

sub v5_subscriber
{
	my (@filters) = @_;
	$subno++;
	my $dir   = PostgreSQL::Test::Utils::tempdir();
	my $file  = "$dir/v5.out";
	my $probe = "$P/probe/$subno";
	my @cmd   = (
		'mosquitto_sub', '-h', '127.0.0.1', '-p', $broker->port,
		'-V', '5', '-q', '1', '-i', "v5sub-$$-$subno",
		'-F', join("\x1f", '%r', '%C', '%R', '%D', '%E', '%P', '%t', '%x'),
		(map { ('-t', $_) } @filters), '-t', $probe);
	my $h = IPC::Run::start(\@cmd, '<', \undef, '>', $file, '2>', "$file.err");
	my $self = { h => $h, file => $file, probe => $probe };
	my $ok = poll_until(
		sub {
			mqtt_pub($broker, $probe, 'probe');
			grep { $_->{topic} eq $probe } v5_records($self, 1);
		},
		$T, 0.3);
	die "MQTT 5 subscriber on @filters never got its probe" unless $ok;
	return $self;
}

# the messages so far as hash refs (probes left out unless $with_probes)
sub v5_records
{
	my ($s, $with_probes) = @_;
	my $text = -e $s->{file} ? slurp_file($s->{file}) : '';
	my @out;
	for my $line (split /\n/, $text)
	{
		my @f = split /\x1f/, $line, -1;
		next unless @f == 8;
		my %r;
		@r{qw(retain content_type response_topic correlation expiry user topic)} =
		  @f[ 0 .. 6 ];
		$r{payload} = pack('H*', $f[7]);
		next if !$with_probes && $r{topic} eq $s->{probe};
		push @out, \%r;
	}
	return @out;
}

sub v5_stop
{
	my ($s) = @_;
	$s->{h}->kill_kill;
}

# ---------------------------------------------------------------------------
# retain: a later subscriber gets it; without retain nothing is kept
# ---------------------------------------------------------------------------

$node->safe_psql(
	'postgres', qq{
	SELECT mqtt_emit.publish('$P/plain/kept', 'kept-1', 1, true);
	SELECT mqtt_emit.publish('$P/plain/gone', 'not retained');
	SELECT mqtt_emit.publish('$P/plain/kept2', '{"a": 1}'::jsonb, retain => true);
});
# published when the worker has them acknowledged
ok(poll_until(sub { my $s = stats($node); $s->{published} >= 3 && $s->{queued} == 0 }, $T),
	'three ad-hoc publishes acknowledged');
my $later = v5_subscriber("$P/plain/#");
my @got = sort { $a->{topic} cmp $b->{topic} } v5_records($later);
is(scalar(@got), 2, 'the later subscriber gets exactly the 2 retained messages');
is_deeply(
	[ map { [ $_->{topic}, $_->{payload}, $_->{retain} ] } @got ],
	[ [ "$P/plain/kept", 'kept-1', 1 ], [ "$P/plain/kept2", '{"a": 1}', 1 ] ],
	'topics, payloads and retained flags of both');
v5_stop($later);

# ---------------------------------------------------------------------------
# every property, retained; read by a later MQTT 5 subscriber
# ---------------------------------------------------------------------------

my $props = '{"content_type": "text/plain; charset=utf-8",'
  . ' "response_topic": "' . $P . '/reply/1",'
  . ' "correlation_data": "corr-42",'
  . ' "message_expiry": 3600,'
  . ' "user_properties": [["k", "v1"], ["k", "v2"], ["name with space", "é ü"]]}';
$node->safe_psql('postgres',
	"SELECT mqtt_emit.publish('$P/props/all', 'with properties', 1, true, '$props')");
ok(poll_until(sub { my $s = stats($node); $s->{published} >= 4 && $s->{queued} == 0 }, $T),
	'the publish with properties was acknowledged');
my $psub = v5_subscriber("$P/props/#");
my @p = v5_records($psub);
is(scalar(@p), 1, 'one retained message with properties');
my $m = $p[0] // {};
is($m->{payload},        'with properties',             'its payload, without the properties');
is($m->{retain},         1,                             'retained');
is($m->{content_type},   'text/plain; charset=utf-8',   'content_type');
is($m->{response_topic}, "$P/reply/1",                  'response_topic');
is($m->{correlation},    'corr-42',                     'correlation_data');
ok($m->{expiry} =~ /^\d+$/ && $m->{expiry} > 3500 && $m->{expiry} <= 3600,
	'message_expiry counts down from 3600')
  or diag("expiry: " . ($m->{expiry} // 'undef'));
note "user properties as mosquitto_sub prints them: " . ($m->{user} // 'undef');
my @user = ($m->{user} // '') =~ /(k:v\d|name with space:\S+ \S+)/g;
is_deeply(\@user, [ 'k:v1', 'k:v2', "name with space:\xc3\xa9 \xc3\xbc" ],
	'user properties in order, the repeated name twice');

# live, the jsonb overload, not retained: content_type only
$node->safe_psql('postgres',
	qq{SELECT mqtt_emit.publish('$P/props/live', '{"x": 2}'::jsonb, 0, false, '{"content_type": "application/json", "user_properties": []}')});
ok(poll_until(sub { scalar(v5_records($psub)) >= 2 }, $T), 'the live message arrived');
my ($live) = grep { $_->{topic} eq "$P/props/live" } v5_records($psub);
is($live->{payload},      '{"x": 2}',         'jsonb overload: payload');
is($live->{content_type}, 'application/json', 'jsonb overload: content_type');
is($live->{retain},       0,                  'not retained');
is($live->{user},         '',                 'an empty user_properties array adds none');
v5_stop($psub);

# ---------------------------------------------------------------------------
# row events carry their event id as user property event-id; the table has
# a column "eventId" of its own (in args, result and old), which must not be
# taken for it
# ---------------------------------------------------------------------------

$node->safe_psql(
	'postgres', q{
	CREATE TABLE ev (id int PRIMARY KEY, v text,
	                 "eventId" text DEFAULT 'ffffffff-ffff-7fff-bfff-ffffffffffff');
	SELECT mqtt_emit.watch('ev', model => 'ev68');
});
my $esub = v5_subscriber(topic_prefix() . '/ev68/#');
$node->safe_psql('postgres',
	'INSERT INTO ev SELECT g, $$row $$ || g FROM generate_series(1, 20) g;'
	. ' UPDATE ev SET v = $$changed$$ WHERE id <= 10');
ok(poll_until(sub { scalar(v5_records($esub)) >= 30 }, $T), '30 row events arrived');
my @ev = v5_records($esub);
is(scalar(@ev), 30, 'exactly 30 (20 creates, 10 updates)');
my $same = 0;
for my $e (@ev)
{
	my $id = eval { decode_json($e->{payload})->{eventId} } // 'none';
	$same++ if $e->{user} eq "event-id:$id" && $e->{content_type} eq 'application/json';
}
is($same, 30, 'each carries user property event-id = its eventId, and content type application/json');
v5_stop($esub);

# ---------------------------------------------------------------------------
# bad properties: each fails at call time with its SQLSTATE
# ---------------------------------------------------------------------------

my @bad = (
	[ q{'[]'},                                          '22023', 'not an object' ],
	[ q{'"x"'},                                         '22023', 'a scalar' ],
	[ q{'{"contenttype": "a"}'},                        '22023', 'an unknown key' ],
	[ q{'{"content_type": 5}'},                         '42804', 'content_type not a string' ],
	[ "'{\"content_type\": \"" . ('x' x 1025) . "\"}'", '22001', 'content_type of 1025 bytes' ],
	[ q{'{"content_type": "a\u0001b"}'},                '22023', 'a control character in content_type' ],
	[ q{'{"response_topic": "a/#"}'},                   '22023', 'response_topic with #' ],
	[ q{'{"response_topic": "a/+/b"}'},                 '22023', 'response_topic with +' ],
	[ q{'{"response_topic": ""}'},                      '22023', 'an empty response_topic' ],
	[ q{'{"correlation_data": ["a"]}'},                 '42804', 'correlation_data not a string' ],
	[ q{'{"message_expiry": 0}'},                       '22003', 'message_expiry 0' ],
	[ q{'{"message_expiry": -5}'},                      '22003', 'a negative message_expiry' ],
	[ q{'{"message_expiry": 1.5}'},                     '22003', 'a fractional message_expiry' ],
	[ q{'{"message_expiry": 4294967296}'},              '22003', 'message_expiry above 2^32-1' ],
	[ q{'{"message_expiry": "60"}'},                    '42804', 'message_expiry as a string' ],
	[ q{'{"user_properties": {"a": "b"}}'},             '42804', 'user_properties as an object' ],
	[ q{'{"user_properties": ["a"]}'},                  '42804', 'a user property that is no pair' ],
	[ q{'{"user_properties": [["a"]]}'},                '22023', 'a pair with one member' ],
	[ q{'{"user_properties": [["a", "b", "c"]]}'},      '22023', 'a pair with three members' ],
	[ q{'{"user_properties": [["a", 1]]}'},             '42804', 'a value that is no string' ],
	[ q{'{"user_properties": [["a\u0000", "b"]]}'},     '22P05', 'U+0000 in a name (jsonb refuses it)' ],
	[ "'{\"user_properties\": [" . join(',', map { "[\"n$_\", \"v\"]" } 1 .. 33) . "]}'",
		'54000', '33 user properties' ],
	[ "'{\"user_properties\": [" . join(',', map { "[\"n$_\", \"v\"]" } 1 .. 32) . "]}'",
		'0', '32 user properties are allowed' ],
	[ "'{\"content_type\": \"" . ('x' x 1024) . "\"}'", '0', 'content_type of 1024 bytes is allowed' ],
);
for my $case (@bad)
{
	my ($json, $state, $what) = @$case;
	if ($state eq '0')
	{
		role_works($node, 'postgres',
			"BEGIN; SELECT mqtt_emit.publish('$P/bad', 'x', 1, false, $json); ROLLBACK",
			"properties: $what");
		next;
	}
	role_fails($node, 'postgres', "SELECT mqtt_emit.publish('$P/bad', 'x', 1, false, $json)",
		$state, "properties: $what");
}
is($node->safe_psql('postgres',
	"SELECT count(*) FROM mqtt_emit.outbox"), 0, 'nothing of the bad calls waits in the outbox');

# MQTT 3.1.1: retain works, properties are refused, an empty object is none
role_fails($node3, 'postgres',
	qq{SELECT mqtt_emit.publish('$P/v3/x', 'x', 1, true, '{"content_type": "a"}')},
	'0A000', 'properties under MQTT 3.1.1', qr/MQTT properties need MQTT 5/);
role_works($node3, 'postgres',
	qq{SELECT mqtt_emit.publish('$P/v3/kept', 'v3 kept', 1, true, '{}');
	   SELECT mqtt_emit.publish('$P/v3/nulls', 'v3 nulls', 1, true, '{"content_type": null}')},
	'retain and empty properties under MQTT 3.1.1');
ok(poll_until(sub { my $s = stats($node3); $s->{published} >= 2 && $s->{queued} == 0 }, $T),
	'MQTT 3.1.1 node: both acknowledged');
my $v3sub = v5_subscriber("$P/v3/#");
@got = sort { $a->{topic} cmp $b->{topic} } v5_records($v3sub);
is_deeply([ map { [ $_->{topic}, $_->{payload}, $_->{retain}, $_->{content_type} ] } @got ],
	[ [ "$P/v3/kept", 'v3 kept', 1, '' ], [ "$P/v3/nulls", 'v3 nulls', 1, '' ] ],
	'MQTT 3.1.1 node: both retained, without properties');
v5_stop($v3sub);

# ---------------------------------------------------------------------------
# a broker outage: retained publishes with properties wait in the outbox
# ---------------------------------------------------------------------------

my $N = 30;    # values per topic, the last one must stay
$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, $T),
	'the node sees the broker gone');
for my $mode ('memory', 'durable')
{
	# one transaction per value, and one with all topics at once
	my $sql = "SET mqtt_emit.delivery = $mode;\n";
	for my $i (1 .. $N)
	{
		$sql .= "SELECT mqtt_emit.publish('$P/out/$mode/a', 'a$i', 1, true,"
		  . " '{\"user_properties\": [[\"i\", \"$i\"]], \"correlation_data\": \"$mode-a\"}');\n";
	}
	$sql .= "BEGIN;\n";
	for my $t ('b', 'c')
	{
		$sql .= "SELECT mqtt_emit.publish('$P/out/$mode/$t', '$t-first', 1, true);\n"
		  . "SELECT mqtt_emit.publish('$P/out/$mode/$t', '$t-last', 1, true,"
		  . " '{\"content_type\": \"$mode/$t\", \"message_expiry\": 86400}');\n";
	}
	$sql .= "COMMIT;\n";
	$node->safe_psql('postgres', $sql);
}
ok( poll_until(
		sub { my $s = stats($node); $s->{queued} == 0 && $s->{in_outbox} == 2 * ($N + 4) },
		$T),
	'all ' . 2 * ($N + 4) . ' publishes wait in the outbox')
  or diag(explain(stats($node)));
is($node->safe_psql('postgres',
	"SELECT count(*) FROM mqtt_emit.outbox WHERE (flags & 8) <> 0 AND kind = 2"),
	2 * ($N + 4), 'each outbox row is marked retained');
$broker->start;
ok(poll_until(sub { my $s = stats($node); $s->{connected} && $s->{in_outbox} == 0 }, $T),
	'after the broker returns the outbox is empty');
my $osub = v5_subscriber("$P/out/#");
my %last = map { $_->{topic} => $_ } v5_records($osub);
is(scalar(keys %last), 6, 'the later subscriber gets 6 retained topics');
is(scalar(my @all = v5_records($osub)), 6, 'one message per topic');
for my $mode ('memory', 'durable')
{
	my $ra = $last{"$P/out/$mode/a"} // {};
	is_deeply([ @$ra{qw(payload retain user correlation)} ], [ "a$N", 1, "i:$N", "$mode-a" ],
		"$mode: topic a holds its last value with its properties");
	for my $t ('b', 'c')
	{
		my $r = $last{"$P/out/$mode/$t"} // {};
		is_deeply([ @$r{qw(payload retain content_type)} ], [ "$t-last", 1, "$mode/$t" ],
			"$mode: topic $t holds the later of its two values in one transaction");
	}
}
v5_stop($osub);
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.dead_letters'), 0,
	'no dead letters');

done_testing();
