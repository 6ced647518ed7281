#!/usr/bin/perl
#
# 042_hostile.pl: a corpus of hostile remote messages (doc/DESIGN.md 6: "malformed,
# oversized or hostile remote message: dropped with a log line and a
# counter; the worker keeps running"; README "Wire format": what received
# messages must look like).
#
# Node 2 has an allow_remote listener on model "user" that records every call.
# Each hostile message is published with mosquitto_pub (bytes through stdin,
# so that NUL bytes and invalid UTF-8 pass), followed by a good message from
# the same "peer". Once the good message's listener row is there, the hostile
# one has been handled (one subscriber connection delivers in order), and the
# counters must show exactly what it did: stats.rejected + 1 (or self_echo + 1
# for a forged origin), received + 2, listener_calls + 1; a rejection line
# naming its topic and reason in the server log; the same worker_pid. At the
# end a real event from node 1 still runs node 2's listener.
#
# Positive controls keep the limits honest: brackets, colons and escaped
# quotes inside strings do not count as nesting or keys, a message with 64
# levels is accepted, and so is a 100000-digit number (valid JSON within
# numeric's range and max_payload: no documented reason to drop it), while
# 1e999999 and a 200000-digit number (beyond numeric) are rejected.
use strict;
use warnings;

use IPC::Run ();
use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 60;
my $prefix = topic_prefix();
my $PEER   = 'hostile-peer';

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

sub sq
{
	my ($node, $sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

sub stats
{
	my ($node) = @_;
	return JSON::PP::decode_json(sq($node, 'SELECT row_to_json(s) FROM mqtt_emit.stats s'));
}

# the stats and the number of listener rows, in one query
sub snapshot
{
	my ($node) = @_;
	return JSON::PP::decode_json(sq($node,
		'SELECT to_jsonb(s) || jsonb_build_object(\'calls\', (SELECT count(*) FROM calls)) FROM mqtt_emit.stats s'));
}

sub log_size { return (-s $_[0]->logfile) // 0; }

sub log_since
{
	my ($node, $offset) = @_;
	my $text = slurp_file($node->logfile);
	return length($text) > $offset ? substr($text, $offset) : '';
}

# publish raw bytes from stdin (-n for an empty message: -s refuses one)
sub pub_bytes
{
	my ($broker, $topic, $bytes) = @_;
	my ($out, $err) = ('', '');
	my $ok = eval {
		IPC::Run::run(
			[ 'mosquitto_pub', '-h', '127.0.0.1', '-p', $broker->port, '-q', 1, '-t', $topic,
				length($bytes) ? '-s' : '-n' ],
			'<', \$bytes, '>', \$out, '2>', \$err, IPC::Run::timeout(60));
	};
	diag("mosquitto_pub to $topic failed: $err $@") unless $ok;
	return $ok ? 1 : 0;
}

my $uuid_n = 0;

sub uuid
{
	$uuid_n++;
	return sprintf('%08x-%04x-7%03x-8%03x-%012x', 0x11223344, $$ & 0xffff, $uuid_n & 0xfff,
		$uuid_n >> 12, $uuid_n);
}

# a well-formed message; %f overrides or adds raw JSON members
sub msg
{
	my (%f) = @_;
	my $id = delete $f{_id} // 'x';
	my @order = qw(model operation args result timestamp eventId origin);
	my %d = (
		model     => '"user"',
		operation => '"create"',
		args      => qq({"data":{"id":"$id"}}),
		result    => qq({"id":"$id"}),
		timestamp => '"2026-11-28T10:30:00.123Z"',
		eventId   => '"' . uuid() . '"',
		origin    => qq("$PEER"),
	);
	%d = (%d, %f);
	my @keys = ((grep { exists $d{$_} } @order), sort grep { my $k = $_; !grep { $_ eq $k } @order } keys %d);
	return '{' . join(',', map { defined $d{$_} ? qq("$_":$d{$_}) : () } @keys) . '}';
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

# the 10 MB case must reach the receiver: mosquitto 2.1 limits packets to
# 2,000,000 bytes by default (2.0: no limit); 268435455 is MQTT's maximum
my $broker = start_broker(extra_conf => ['max_packet_size 268435455']);
my %init   = (init => { extra => [ '--encoding=UTF8', '--locale=C' ] });
my $node1  = new_node('sender', broker => $broker, %init);
my $node2  = new_node(
	'receiver',
	broker                   => $broker,
	'mqtt_emit.max_payload'  => '1MB',
	'mqtt_emit.dedup_ttl'    => '60s',
	%init);
my $cid2 = $node2->{mqtt_emit}{client_id};

sq($node1, q{CREATE EXTENSION pg_mqtt_emit; CREATE TABLE "user"(id text PRIMARY KEY, name text); SELECT mqtt_emit.watch('"user"');});
sq($node2, q{
CREATE EXTENSION pg_mqtt_emit;
CREATE TABLE calls(n serial, id text, model text, operation text, event_id text, origin text,
                   topic text, args_type text, result_type text, emitted_at timestamptz, result_len int);
CREATE FUNCTION on_user(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO calls(id, model, operation, event_id, origin, topic, args_type, result_type, emitted_at, result_len)
	VALUES (e.result->>'id', e.model, e.operation, e.event_id, e.origin, e.topic,
	        jsonb_typeof(e.args), jsonb_typeof(e.result), e.emitted_at, length(e.result::text));
END $$;
SELECT mqtt_emit.listen('user', 'on_user(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
is(sq($node2, 'SHOW server_encoding'), 'UTF8', 'node 2: database encoding UTF8');
is(sq($node2, 'SHOW mqtt_emit.max_payload'), '1MB', 'node 2: max_payload 1MB (the default)');

ok(poll_until(sub { my $s = stats($node2); $s->{subscriber_connected} && $s->{subscriptions} >= 1 }, $T),
	'node 2: subscriber connected');
ok(poll_until(sub { $broker->log =~ /\Q$cid2\E-subscriber \d \Q$prefix\E\/user\/#/ }, $T),
	'node 2: subscribed to <prefix>/user/#');

my $pid2 = stats($node2)->{worker_pid};
ok($pid2, "node 2: worker pid $pid2");

# a good message runs the listener once
my $good_n = 0;

sub good_roundtrip
{
	my ($what) = @_;
	$good_n++;
	my $gid = "good-$good_n";
	pub_bytes($broker, "$prefix/user/create", msg(_id => $gid)) or return 0;
	return poll_until(sub { sq($node2, "SELECT count(*) FROM calls WHERE id = '$gid'") eq '1' }, $T);
}

ok(good_roundtrip('first'), 'a good message runs the listener');

# ---------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------

my $deep = '[' x 10000 . ']' x 10000;
my $many_keys = '{' . join(',', map { qq("k$_":$_) } 1 .. 20000) . '}';
my $ten_mb = '"' . ('A' x (10 * 1024 * 1024)) . '"';
my $digits = '9' x 100000;

# [ name, topic leaf or full topic, payload, expect ('rejected' | 'self_echo'), reason regex ]
my @corpus = (
	[ 'invalid UTF-8', 'c', msg(result => qq({"id":"bad-utf8","name":"\xff\xfe\xc3\x28"})),
		'rejected', qr/not valid in the database encoding/ ],
	[ 'invalid UTF-8 (overlong NUL, C0 80)', 'c', msg(result => qq({"id":"overlong","name":"a\xc0\x80b"})),
		'rejected', qr/not valid in the database encoding|NUL/ ],
	[ 'JSON nested 10000 levels', 'c', msg(result => qq({"id":"deep","d":$deep})),
		'rejected', qr/nested deeper than 64/ ],
	[ '10 MB payload', 'c', msg(result => qq({"id":"big","blob":$ten_mb})),
		'rejected', qr/larger than "mqtt_emit\.max_payload"/ ],
	[ 'number 1e999999', 'c', msg(result => '{"id":"huge-exp","n":1e999999}'),
		'rejected', qr/invalid JSON/ ],
	[ 'number with 200000 digits (beyond numeric)', 'c', msg(result => qq({"id":"huge-digits","n":$digits$digits})),
		'rejected', qr/invalid JSON/ ],
	[ 'NUL byte inside', 'c', msg(result => qq({"id":"nul","name":"a\0b"})),
		'rejected', qr/NUL byte/ ],
	[ 'NUL byte after the object', 'c', msg(_id => 'nul-after') . "\0garbage",
		'rejected', qr/NUL byte/ ],
	[ 'escaped NUL (\u0000) in a string', 'c', msg(result => '{"id":"u0000","name":"a\u0000b"}'),
		'rejected', qr/invalid JSON/ ],
	[ 'model is a number', 'c', msg(model => '42'),
		'rejected', qr/"model" is missing, not a string/ ],
	[ 'model missing', 'c', msg(model => undef),
		'rejected', qr/"model" is missing/ ],
	[ 'operation is an object', 'c', msg(operation => '{"op":"create"}'),
		'rejected', qr/"operation" is missing or not a string/ ],
	[ 'result is a string', 'c', msg(result => '"a string"'),
		'rejected', qr/"result" is not an object/ ],
	[ 'result is an array', 'c', msg(result => '[{"id":"arr-result"}]'),
		'rejected', qr/"result" is not an object/ ],
	[ 'args is an array', 'c', msg(_id => 'args-array', args => '[1,2,3]'),
		'rejected', qr/"args" is not an object/ ],
	[ 'old is an array', 'c', msg(_id => 'old-array', old => '["x"]'),
		'rejected', qr/"old" is not an object/ ],
	[ 'eventId is a number', 'c', msg(_id => 'eid-num', eventId => '12345'),
		'rejected', qr/"eventId" is not a string/ ],
	[ 'origin is a number', 'c', msg(_id => 'origin-num', origin => '7'),
		'rejected', qr/"origin" is not a string/ ],
	[ 'timestamp is a number', 'c', msg(_id => 'ts-num', timestamp => '1732789800123'),
		'rejected', qr/"timestamp" is not a string/ ],
	[ 'timestamp is not a date', 'c', msg(_id => 'ts-str', timestamp => '"not a date"'),
		'rejected', qr/"timestamp" is not a valid timestamp/ ],
	[ 'payload is a JSON array', 'c', '[' . msg(_id => 'in-array') . ']',
		'rejected', qr/not a JSON object/ ],
	[ 'payload is a JSON string', 'c', '"user"',
		'rejected', qr/not a JSON object/ ],
	[ 'truncated JSON', 'c', substr(msg(_id => 'trunc'), 0, 40),
		'rejected', qr/invalid JSON/ ],
	[ 'empty payload', 'c', '',
		'rejected', qr/invalid JSON|not a JSON object/ ],
	[ '20000 keys', 'c', msg(result => $many_keys),
		'rejected', qr/more than 10000 keys/ ],
	[ 'topic with an extra level', "$prefix/user/create/extra", msg(_id => 'extra-level'),
		'rejected', qr/topic does not have the form/ ],
	[ 'topic with an empty level', "$prefix/user//create", msg(_id => 'empty-level'),
		'rejected', qr/topic does not have the form/ ],
	[ 'topic with an empty leaf', "$prefix/user/", msg(_id => 'empty-leaf'),
		'rejected', qr/topic does not have the form/ ],
	[ 'topic without a leaf', "$prefix/user", msg(_id => 'no-leaf'),
		'rejected', qr/topic does not have the form/ ],
	[ 'payload model differs from the topic\'s', 'c', msg(_id => 'other-model', model => '"order"'),
		'rejected', qr/"model" does not match the topic/ ],
	[ 'payload model: full-width unicode look-alike', 'c', msg(_id => 'fullwidth', model => "\"\xef\xbd\x95\xef\xbd\x93\xef\xbd\x85\xef\xbd\x92\""),
		'rejected', qr/"model" does not match the topic/ ],
	[ 'payload model: percent-encoded look-alike', 'c', msg(_id => 'pct-model', model => '"us%65r"'),
		'rejected', qr/"model" does not match the topic/ ],
	[ 'payload model: "user/#"', 'c', msg(_id => 'wild-model', model => '"user/#"'),
		'rejected', qr/"model" is missing, not a string, or not a valid model name|does not match/ ],
	[ 'payload model: "+"', 'c', msg(_id => 'plus-model', model => '"+"'),
		'rejected', qr/not a valid model name|does not match/ ],
	[ 'payload model empty', 'c', msg(_id => 'empty-model', model => '""'),
		'rejected', qr/not a valid model name|does not match/ ],
	[ 'payload model with a control character', 'c', msg(_id => 'ctl-model', model => '"us\u0001er"'),
		'rejected', qr/not a valid model name|does not match/ ],
	[ 'forged origin: node 2\'s own client id', 'c', msg(_id => 'forged-origin', origin => qq("$cid2")),
		'self_echo', undef ],
);

my $case_n = 0;
for my $c (@corpus)
{
	my ($name, $where, $payload, $expect, $reason) = @$c;
	$case_n++;
	my $topic = $where eq 'c' ? "$prefix/user/case$case_n" : $where;
	my $before = snapshot($node2);
	my $off    = log_size($node2);

	subtest "case $case_n: $name" => sub {
		ok(pub_bytes($broker, $topic, $payload), 'published (' . length($payload) . ' bytes)');
		ok(good_roundtrip($name), 'the good message after it runs the listener');
		my $after = snapshot($node2);
		is($after->{worker_pid}, $pid2, 'same worker');
		is($after->{received} - $before->{received}, 2, 'received: +2 (it and the good one)');
		is($after->{rejected} - $before->{rejected}, $expect eq 'rejected' ? 1 : 0,
			'rejected: +' . ($expect eq 'rejected' ? 1 : 0));
		is($after->{self_echo} - $before->{self_echo}, $expect eq 'self_echo' ? 1 : 0,
			'self_echo: +' . ($expect eq 'self_echo' ? 1 : 0));
		is($after->{listener_calls} - $before->{listener_calls}, 1, 'listener_calls: +1 (the good one only)');
		is($after->{calls} - $before->{calls}, 1, 'one listener row (the good one)');
		if ($expect eq 'rejected')
		{
			my ($line) = log_since($node2, $off) =~
			  /^(.*pg_mqtt_emit rejected a message on topic "\Q$topic\E".*)$/m;
			ok(defined $line, 'a rejection line names the topic in the server log');
			like($line // '', $reason, 'the line gives the reason');
			note(substr($line // '', 0, 300));
		}
	};
}

my $after = stats($node2);
is($after->{worker_pid}, $pid2, 'after the corpus: still the same worker');
my $bad = sq($node2, q{SELECT string_agg(coalesce(id, '(null)'), ', ') FROM calls WHERE id IS NULL OR id NOT LIKE 'good-%'});
is($bad, '', 'no hostile message ever reached the listener');

# ---------------------------------------------------------------------------
# positive controls: the limits do not misfire on legitimate content
# ---------------------------------------------------------------------------

my $brackets = '[' x 200 . '{' x 200;
my $colons   = ':' x 20000;
my $nest64   = '{"a":' x 62 . '1' . '}' x 62;    # message, result, and 62: 64 levels
my @fine = (
	[ 'brackets inside a string', msg(_id => 'ok-brackets', result => qq({"id":"ok-brackets","s":"$brackets"})) ],
	[ 'escaped quotes before brackets', msg(_id => 'ok-escapes', result => qq({"id":"ok-escapes","s":"\\\\\\"$brackets\\\\"})) ],
	[ '20000 colons inside a string', msg(_id => 'ok-colons', result => qq({"id":"ok-colons","s":"$colons"})) ],
	[ 'objects nested 64 levels in all', msg(_id => 'ok-nest64', args => undef, result => qq({"id":"ok-nest64","n":$nest64})) ],
	[ 'unicode model case variant USER', msg(_id => 'ok-upper', model => '"USER"') ],
	# valid JSON, a numeric PostgreSQL holds (up to 131072 digits), inside
	# max_payload: none of the README's reasons to drop a message applies
	[ 'number with 100000 digits', msg(_id => 'ok-digits', result => qq({"id":"ok-digits","n":$digits})) ],
);
for my $f (@fine)
{
	my ($name, $payload) = @$f;
	my ($id) = $payload =~ /"id":"(ok-[a-z0-9]+)"/;
	my $topic = "$prefix/user/create";
	ok(eval { JSON::PP->new->decode($payload); 1 }, "control '$name' is valid JSON") or diag($@);
	ok(pub_bytes($broker, $topic, $payload), "control '$name' published");
	ok(poll_until(sub { sq($node2, "SELECT count(*) FROM calls WHERE id = '$id'") eq '1' }, $T),
		"control '$name': accepted, the listener ran");
}
is(sq($node2, q{SELECT result_len FROM calls WHERE id = 'ok-digits'}), length(qq({"id": "ok-digits", "n": $digits})),
	'the 100000-digit number reaches the listener intact');

# ---------------------------------------------------------------------------
# a real event from node 1
# ---------------------------------------------------------------------------

ok(poll_until(sub { stats($node1)->{connected} }, $T), 'node 1 connected');
sq($node1, q{INSERT INTO "user" VALUES ('real-1', 'Alice')});
ok(poll_until(sub { sq($node2, q{SELECT count(*) FROM calls WHERE id = 'real-1'}) eq '1' }, $T),
	'a real event from node 1 runs node 2\'s listener');
is(sq($node2, q{SELECT origin || ' ' || args_type || ' ' || result_type FROM calls WHERE id = 'real-1'}),
	"$node1->{mqtt_emit}{client_id} object object", 'with origin node 1, args and result objects');
is(stats($node2)->{worker_pid}, $pid2, 'node 2: the same worker from start to end');
my $restarts = () = slurp_file($node2->logfile) =~ /pg_mqtt_emit worker started/g;
is($restarts, 1, 'node 2: the worker started once (never restarted)');

$node1->stop;
$node2->stop;
done_testing();
