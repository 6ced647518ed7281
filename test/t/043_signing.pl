#!/usr/bin/perl
#
# 043_signing.pl: HMAC-SHA256 message signing (mqtt_emit.signing_key,
# mqtt_emit.require_signature; src/payload.c: a signed message ends in
# ,"signature":"<hex HMAC-SHA256, under the shared key, of the message up to
# that comma followed by '}'>"}).
#
# Two real clusters on one real mosquitto, both with the same signing key;
# node 2 has require_signature = on and an allow_remote listener that records
# its calls. Messages "from outside" are made here (Digest::SHA computes the
# HMAC independently of the extension) and published with mosquitto_pub.
#
# Checked: messages signed here with the shared key are accepted; a
# captured message with one byte of result changed (signature kept), a
# message signed with another key, an unsigned message, a signature in
# upper-case hex, cut short, moved to the front or followed by a space are
# all rejected (counted exactly, logged with the reason); node 1's events
# carry a signature that verifies under the key, run node 2's listener, and
# node 1 stays up while signing; with require_signature = off an unsigned
# message is accepted but a badly signed one is still rejected; a key
# rotation by restart takes effect (a node on the new key rejects the old
# key's signatures); the key is hidden from non-superusers and never written
# to a server log.
use strict;
use warnings;

use Digest::SHA qw(hmac_sha256_hex);
use IPC::Run ();
use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 30;
my $prefix = topic_prefix();
my $rand   = join '', map { sprintf '%02x', int(rand(256)) } 1 .. 6;
my $KEY    = "sign-key-$rand-A";
my $OTHER  = "sign-key-$rand-B";
my $KEY2   = "sign-key-$rand-C";    # after the rotation

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

sub sq
{
	my ($node, $sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

sub snapshot
{
	my ($node) = @_;
	return JSON::PP::decode_json(sq($node,
		q{SELECT to_jsonb(s) || jsonb_build_object('calls', (SELECT count(*) FROM calls)) FROM mqtt_emit.stats s}));
}

sub log_size { return (-s $_[0]->logfile) // 0; }

sub log_since
{
	my ($node, $offset) = @_;
	my $text = slurp_file($node->logfile);
	return length($text) > $offset ? substr($text, $offset) : '';
}

sub pub_bytes
{
	my ($broker, $topic, $bytes) = @_;
	my ($out, $err) = ('', '');
	my $ok = eval {
		IPC::Run::run(
			[ 'mosquitto_pub', '-h', '127.0.0.1', '-p', $broker->port, '-q', 1, '-t', $topic, '-s' ],
			'<', \$bytes, '>', \$out, '2>', \$err, IPC::Run::timeout(30));
	};
	diag("mosquitto_pub: $err $@") unless $ok;
	return $ok ? 1 : 0;
}

# The documented form: body = the message without its closing brace;
# signed = body . ',"signature":"' . hex(HMAC(key, body . '}')) . '"}'
sub sign
{
	my ($json, $key) = @_;
	die "not an object: $json" unless $json =~ /^\{.*\}$/s;
	my $body = substr($json, 0, -1);
	return $body . ',"signature":"' . hmac_sha256_hex($body . '}', $key) . '"}';
}

sub split_signed
{
	my ($msg) = @_;
	return $msg =~ /^(\{.*),"signature":"([0-9a-f]{64})"\}$/s ? ($1, $2) : ();
}

my $uuid_n = 0;

sub uuid
{
	$uuid_n++;
	return sprintf('%08x-%04x-7%03x-9%03x-%012x', 0x5151aa00, $$ & 0xffff, $uuid_n, $uuid_n, $uuid_n);
}

sub msg
{
	my ($id, %o) = @_;
	my $origin = $o{origin} // 'outside-peer';
	return qq({"model":"user","operation":"create","args":{"data":{"id":"$id"}},"result":{"id":"$id","name":"n-$id"},)
	  . qq("timestamp":"2026-11-28T10:30:00.123Z","eventId":") . uuid() . qq(","origin":"$origin"});
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

my $broker = start_broker();
my $node1 = new_node('signer', broker => $broker, 'mqtt_emit.signing_key' => $KEY);
my $node2 = new_node(
	'verifier',
	broker                        => $broker,
	'mqtt_emit.signing_key'       => $KEY,
	'mqtt_emit.require_signature' => 'on',
	'mqtt_emit.dedup_ttl'         => '60s');
my $cid1 = $node1->{mqtt_emit}{client_id};

sq($node1, q{CREATE EXTENSION pg_mqtt_emit; CREATE TABLE "user"(id text PRIMARY KEY, name text); SELECT mqtt_emit.watch('"user"'); CREATE TABLE calls(id text);});
sq($node2, q{
CREATE EXTENSION pg_mqtt_emit;
CREATE ROLE mallory LOGIN;
CREATE TABLE calls(id text, origin text, event_id text);
CREATE FUNCTION on_user(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO calls VALUES (e.result->>'id', e.origin, e.event_id);
END $$;
SELECT mqtt_emit.listen('user', 'on_user(mqtt_emit.event)', allow_remote => true, remote_only => true);
});
my $sub = start_subscriber($broker, "$prefix/user/#");
ok(poll_until(sub { snapshot($node2)->{subscriber_connected} }, $T), 'node 2: subscriber connected');
ok(poll_until(sub { $broker->log =~ /\Q$node2->{mqtt_emit}{client_id}\E-subscriber \d \Q$prefix\E\/user\/#/ }, $T),
	'node 2: subscribed');
ok(poll_until(sub { snapshot($node1)->{connected} }, $T), 'node 1: connected');
my $pid2 = snapshot($node2)->{worker_pid};

sub wait_call
{
	my ($id, $timeout) = @_;
	return poll_until(sub { sq($node2, "SELECT count(*) FROM calls WHERE id = '$id'") eq '1' }, $timeout // $T);
}

# A message that must be rejected: published, then a marker message (signed
# here with the current key) whose listener row proves the first one was
# handled; then exact counters and the log line.
my $marker_n = 0;
my $sign_key = $KEY;

sub expect_rejected
{
	my ($what, $topic, $payload, $reason) = @_;
	my $before = snapshot($node2);
	my $off    = log_size($node2);
	$marker_n++;
	my $mid = "marker-$marker_n";
	subtest $what => sub {
		ok(pub_bytes($broker, $topic, $payload), 'published');
		ok(pub_bytes($broker, "$prefix/user/create", sign(msg($mid), $sign_key)), 'marker published');
		ok(wait_call($mid), 'the marker after it ran the listener');
		my $after = snapshot($node2);
		is($after->{rejected} - $before->{rejected}, 1, 'rejected: +1');
		is($after->{calls} - $before->{calls}, 1, 'no listener call but the marker\'s');
		is($after->{worker_pid}, $pid2, 'same worker');
		my ($line) = log_since($node2, $off) =~ /^(.*pg_mqtt_emit rejected a message on topic "\Q$topic\E".*)$/m;
		like($line // '', $reason, 'rejection logged with the reason');
		note($line // '(no line)');
	};
	return;
}

# node 1 may not survive what it is asked to do: check before using it
sub node1_up
{
	return eval { sq($node1, 'SELECT 1') eq '1' } ? 1 : 0;
}

# ---------------------------------------------------------------------------
# 1. messages signed here, require_signature = on
# ---------------------------------------------------------------------------

ok(pub_bytes($broker, "$prefix/user/create", sign(msg('outside-signed'), $KEY)),
	'a message signed here with the shared key');
ok(wait_call('outside-signed'), 'require_signature = on: accepted, the listener ran');

# the same message as it went over the bus, captured, one byte of result
# changed, signature kept
my ($cap_topic, $cap) = @{ ($sub->messages)[0] // [ '', '' ] };
like($cap, qr/"id":"outside-signed"/, 'captured from the broker');
{
	my $t = $cap;
	ok($t =~ s/"name":"n-outside-signed"/"name":"n-outside-signee"/, 'one byte of result changed');
	expect_rejected('captured message, result altered, signature kept', $cap_topic, $t,
		qr/signature does not match/);
}
{
	my ($body) = split_signed($cap);
	my ($b2) = split_signed(sign(msg('other-body'), $KEY));
	expect_rejected('captured body with another message\'s signature', $cap_topic,
		$body . ',"signature":"' . hmac_sha256_hex($b2 . '}', $KEY) . '"}',
		qr/signature does not match/);
}
expect_rejected('signed with another key', "$prefix/user/create", sign(msg('other-key'), $OTHER),
	qr/signature does not match/);
expect_rejected('unsigned', "$prefix/user/create", msg('unsigned-1'), qr/not signed/);
{
	my $s = sign(msg('upper-hex'), $KEY);
	$s =~ s/"signature":"([0-9a-f]{64})"/'"signature":"' . uc($1) . '"'/e;
	expect_rejected('signature in upper-case hex', "$prefix/user/create", $s,
		qr/signature does not match|not signed/);
}
{
	my $s = sign(msg('short-sig'), $KEY);
	$s =~ s/"signature":"([0-9a-f]{64})"/'"signature":"' . substr($1, 0, 63) . '"'/e;
	expect_rejected('signature one digit short', "$prefix/user/create", $s,
		qr/signature does not match|not signed/);
}
{
	my ($b, $h) = split_signed(sign(msg('moved-sig'), $KEY));
	expect_rejected('signature moved to the front', "$prefix/user/create",
		'{"signature":"' . $h . '",' . substr($b, 1) . '}', qr/signature does not match|not signed/);
}
expect_rejected('signed message with a trailing space', "$prefix/user/create",
	sign(msg('trailing'), $KEY) . ' ', qr/signature does not match|not signed/);
is(snapshot($node2)->{worker_pid}, $pid2, 'node 2: same worker');

# ---------------------------------------------------------------------------
# 2. a signed event from node 1
# ---------------------------------------------------------------------------

my $node1_alive = 1;
sq($node1, q{INSERT INTO "user" VALUES ('u1', 'Alice')});
my $wire1 = '';
ok($sub->wait_for(sub { grep { $_->[1] =~ /"id":"u1"/ } @_ }, $T), 'node 1\'s event reached the broker');
$wire1 = (map { $_->[1] } grep { $_->[1] =~ /"id":"u1"/ } $sub->messages)[0] // '';
ok(poll_until(\&node1_up, 5) && !poll_until(sub { !node1_up() }, 2, 0.2),
	'node 1 is still up after publishing a signed event')
  or do
{
	$node1_alive = 0;
	my ($crash) = slurp_file($node1->logfile) =~ /^(.*terminated by signal.*)$/m;
	diag($crash // 'node 1 is down');
};
my ($body1, $sig1) = split_signed($wire1);
ok(defined $sig1, 'node 1\'s message ends in ,"signature":"<64 hex>"}') or diag($wire1);
is($sig1 // '', hmac_sha256_hex(($body1 // '') . '}', $KEY),
	'the signature is HMAC-SHA256 under the key of the message without it');
ok(eval { JSON::PP::decode_json($wire1); 1 }, 'the signed message is still one JSON object');
ok(wait_call('u1', $wire1 eq '' ? 1 : $T),
	'node 2 (require_signature = on) ran its listener for node 1\'s signed event');
is(sq($node2, q{SELECT origin FROM calls WHERE id = 'u1'}), $cid1, 'origin node 1');
SKIP:
{
	skip 'node 1 published no message', 1 if $wire1 eq '';
	(my $t = $wire1) =~ s/"name":"Alice"/"name":"Alicf"/;
	expect_rejected('node 1\'s message, result altered, signature kept', "$prefix/user/create", $t,
		qr/signature does not match/);
}

# ---------------------------------------------------------------------------
# 3. require_signature = off
# ---------------------------------------------------------------------------

$node2->append_conf('postgresql.conf', "mqtt_emit.require_signature = off\n");
$node2->reload;
ok(poll_until(sub { sq($node2, 'SHOW mqtt_emit.require_signature') eq 'off' }, $T), 'node 2: require_signature off');
# the worker takes the setting at its next loop: send unsigned messages until
# one is accepted (one not accepted yet is a rejection, checked no further)
my $unsigned_n = 0;
ok( poll_until(
		sub {
			$unsigned_n++;
			my $id = "unsigned-ok-$unsigned_n";
			pub_bytes($broker, "$prefix/user/create", msg($id));
			return wait_call($id, 2);
		},
		$T),
	'require_signature = off: an unsigned message is accepted');
expect_rejected('require_signature = off: signed with another key', "$prefix/user/create",
	sign(msg('off-other-key'), $OTHER), qr/signature does not match/);
{
	(my $t = $cap) =~ s/"name":"n-outside-signed"/"name":"n-outside-signee"/;
	expect_rejected('require_signature = off: captured message altered', $cap_topic, $t,
		qr/signature does not match/);
}
ok(pub_bytes($broker, "$prefix/user/create", sign(msg('off-signed'), $KEY)), 'a well signed message');
ok(wait_call('off-signed'), 'require_signature = off: a well signed message is accepted');

# ---------------------------------------------------------------------------
# 4. key rotation by restart (the key is restart-only, so that no reload
#    writes it to the server log)
# ---------------------------------------------------------------------------

$node2->append_conf('postgresql.conf',
	"mqtt_emit.require_signature = on\nmqtt_emit.signing_key = '$KEY2'\n");
$node2->restart;
# a new worker after the restart; the checks below follow that one
ok(poll_until(sub { ($pid2 = snapshot($node2)->{worker_pid} // '') ne '' }, $T),
	'node 2 restarted with the new key: its worker runs');
$sign_key = $KEY2;
my $rot_n = 0;
ok( poll_until(
		sub {
			$rot_n++;
			pub_bytes($broker, "$prefix/user/create", sign(msg("rot-$rot_n"), $KEY2));
			return wait_call("rot-$rot_n", 2);
		},
		$T),
	'node 2 on the new key: a message signed with it is accepted');
expect_rejected('node 2 on the new key: signed with the old key', "$prefix/user/create",
	sign(msg('old-key'), $KEY), qr/signature does not match/);

SKIP:
{
	skip 'node 1 is down', 3 unless $node1_alive && node1_up();
	# node 1 still on the old key: node 2 rejects its events
	my $r0 = snapshot($node2)->{rejected};
	sq($node1, q{INSERT INTO "user" VALUES ('old-from-1', 'x')});
	ok(poll_until(sub { snapshot($node2)->{rejected} > $r0 }, $T),
		'node 1 still on the old key: its event is rejected');
	$node1->append_conf('postgresql.conf', "mqtt_emit.signing_key = '$KEY2'\n");
	$node1->restart;
	my $m = 0;
	ok( poll_until(
			sub {
				$m++;
				sq($node1, "INSERT INTO \"user\" VALUES ('new-from-1-$m', 'r')");
				return wait_call("new-from-1-$m", 2);
			},
			$T),
		'both on the new key: node 1\'s events run node 2\'s listener');
	ok(!wait_call('old-from-1', 1), 'the event signed with the old key never ran');
}

# ---------------------------------------------------------------------------
# 5. the key is hidden
# ---------------------------------------------------------------------------

is(sq($node2, 'SHOW mqtt_emit.signing_key'), $KEY2, 'superuser: SHOW mqtt_emit.signing_key');
{
	my ($out, $err) = ('', '');
	$node2->psql('postgres', 'SHOW mqtt_emit.signing_key', stdout => \$out, stderr => \$err,
		extra_params => [ '-U', 'mallory', '-v', 'VERBOSITY=verbose' ]);
	like($err, qr/42501/, 'non-superuser: SHOW mqtt_emit.signing_key raises 42501');
	unlike($out . $err, qr/sign-key-/, 'non-superuser: SHOW leaks nothing');
	($out, $err) = ('', '');
	$node2->psql('postgres', q{SELECT current_setting('mqtt_emit.signing_key')}, stdout => \$out,
		stderr => \$err, extra_params => [ '-U', 'mallory', '-v', 'VERBOSITY=verbose' ]);
	like($err, qr/42501/, 'non-superuser: current_setting(\'mqtt_emit.signing_key\') raises 42501');
	($out, $err) = ('', '');
	$node2->psql('postgres', q{SELECT count(*) FROM pg_settings WHERE name = 'mqtt_emit.signing_key'},
		stdout => \$out, stderr => \$err, extra_params => [ '-U', 'mallory' ]);
	is($out, '0', 'non-superuser: not in pg_settings');
	($out, $err) = ('', '');
	$node2->psql('postgres', 'SHOW ALL', stdout => \$out, stderr => \$err, extra_params => [ '-U', 'mallory' ]);
	like($out, qr/mqtt_emit\.require_signature/, 'non-superuser: SHOW ALL works');
	unlike($out, qr/sign-key-|signing_key/, 'non-superuser: the key is not in SHOW ALL');
}
for my $n ([ 'node 1', $node1 ], [ 'node 2', $node2 ])
{
	my ($name, $node) = @$n;
	my $log = slurp_file($node->logfile);
	for my $k ($KEY, $OTHER, $KEY2)
	{
		my ($leak) = $log =~ /^(.*\Q$k\E.*)$/m;
		ok(!defined $leak, "$name: key ...${\ substr($k, -8)} is not in the server log")
		  or diag("leaked by: $leak");
	}
}
is(snapshot($node2)->{worker_pid}, $pid2, 'node 2: the same worker since the key rotation');

# a node whose postmaster is gone is told so, or the harness's END would bail out
if (node1_up()) { $node1->stop; }
else { $node1->stop('immediate', fail_ok => 1); }
$node2->stop;
done_testing();
