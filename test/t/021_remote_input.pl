#!/usr/bin/perl
#
# 021_remote_input.pl: what a node does with the messages it receives
# (doc/DESIGN.md 4, 5.3, 5.4, 6): redelivered and re-published messages run
# listeners once; a node never runs remote listeners for its own events;
# messages of prisma-extension-emitter (colliding event ids) are accepted;
# malformed, oversized and hostile messages are dropped with a log line and
# a counter while the worker keeps working; a raising listener does not stop
# the others; listeners run as the role that registered them; unlisten of the
# last remote listener of a model removes its subscription.
#
# Two real clusters on one real mosquitto: node 1 writes (table "user"
# watched), node 2 receives. Messages "from outside" are published with
# mosquitto_pub. Every wait is a bounded poll on a counter or a row.
use strict;
use warnings;

use IPC::Run ();
use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

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

# Publish raw bytes (NUL bytes included: argv cannot carry them) from stdin.
sub pub_bytes
{
	my ($broker, $topic, $bytes) = @_;
	my ($out, $err) = ('', '');
	my $ok = eval {
		IPC::Run::run(
			[
				'mosquitto_pub', '-h', '127.0.0.1', '-p', $broker->port,
				'-q', 1, '-t', $topic, '-s'
			],
			'<', \$bytes, '>', \$out, '2>', \$err,
			IPC::Run::timeout(10));
	};
	diag("mosquitto_pub: $err $@") unless $ok;
	return $ok ? 1 : 0;
}

sub file_size
{
	my ($f) = @_;
	return (-s $f) // 0;
}

sub text_since
{
	my ($f, $offset) = @_;
	return '' unless -e $f;
	my $text = slurp_file($f);
	return length($text) > $offset ? substr($text, $offset) : '';
}

# Wait until $code->(stats($node)) is true.
sub wait_stats
{
	my ($node, $code, $timeout) = @_;
	return poll_until(sub { $code->(stats($node)) }, $timeout // $T);
}

sub wait_rows
{
	my ($node, $where, $n, $timeout) = @_;
	return poll_until(
		sub { sq($node, "SELECT count(*) FROM seen WHERE $where") >= $n },
		$timeout // $T);
}

sub wait_subscribed
{
	my ($node, $broker, $filter, $offset) = @_;
	my $cid = $node->{mqtt_emit}{client_id} . '-subscriber';
	return poll_until(
		sub {
			my $s = stats($node);
			return 0 unless $s->{subscriber_connected};
			return text_since($broker->log_file, $offset) =~
			  /^\S+: \Q$cid\E \d \Q$filter\E$/m;
		},
		$T);
}

# A good message in the format of prisma-extension-emitter (model "User",
# topic <prefix>/user/all, no origin, the seed's colliding event id).
my $SEED_EVENT_ID = 'eyJtb2RlbCI6IlVzZXIiLCJvcGVyYXRpb24iOiJjcmVhdGUiLCJhcmdzIjp7ImRh';

sub seed_message
{
	my ($id, %extra) = @_;
	my $result = join ',', qq{"id":"$id"}, map { qq{"$_":"$extra{$_}"} } sort keys %extra;
	return qq({"model":"User","operation":"create","args":{"data":{"id":"$id"}},)
	  . qq("result":{$result},"timestamp":"2026-11-28T00:28:07.386Z","eventId":"$SEED_EVENT_ID"});
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

my $broker = start_broker();
my %init   = (init => { extra => [ '--encoding=UTF8', '--locale=C' ] });
my $node1  = new_node('writer', broker => $broker, %init);
# A long dedup memory, so that the re-publishing below is well inside it
# however slow the machine is (the TTL itself is not what is tested here).
my $node2 = new_node('receiver', broker => $broker, 'mqtt_emit.dedup_ttl' => '60s', %init);
my $cid1  = $node1->{mqtt_emit}{client_id};
my $cid2  = $node2->{mqtt_emit}{client_id};
isnt($cid1, $cid2, 'distinct client ids');

my $listener_fn = sub {
	my ($name, $body) = @_;
	$body //= '';
	return qq{CREATE FUNCTION $name(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
	INSERT INTO seen VALUES ('$name', e.source, e.model, e.operation, e.event_id,
	                         e.result->>'id', e.origin, e.topic, current_user);
	$body
END \$\$;
};
};
my $common_sql = q{
CREATE EXTENSION pg_mqtt_emit;
CREATE TABLE seen(who text, source text, model text, operation text, event_id text,
                  id text, origin text, topic text, usr text);
CREATE TABLE secret(x int);
INSERT INTO secret VALUES (42);
CREATE TABLE role_seen(usr text, secret text, id text, source text);
CREATE ROLE alice LOGIN;
CREATE SCHEMA alice_s AUTHORIZATION alice;
GRANT INSERT ON role_seen TO alice;
SET ROLE alice;
CREATE FUNCTION alice_s.l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
DECLARE r text;
BEGIN
	BEGIN
		PERFORM x FROM public.secret;
		r := 'read';
	EXCEPTION WHEN insufficient_privilege THEN
		r := 'denied';
	END;
	INSERT INTO public.role_seen VALUES (current_user, r, e.result->>'id', e.source);
END $$;
RESET ROLE;
};

# node 1: the writer; an allow_remote listener (so it subscribes and sees
# its own events come back), a raising default listener between two others,
# and alice's listener for local events.
sq($node1,
	    $common_sql
	  . qq{CREATE TABLE "user"(id text PRIMARY KEY, name text);\n}
	  . qq{SELECT mqtt_emit.watch('"user"');\n}
	  . qq{GRANT SELECT ON "user" TO alice;  -- local rows reach only roles that may read them\n}
	  . qq{CREATE TABLE pct(id text PRIMARY KEY);\n}
	  . qq{SELECT mqtt_emit.watch('pct', model => 'pct%model');\n}
	  . $listener_fn->('rec')
	  . $listener_fn->('lboom',
		q{IF e.result->>'name' = 'boom' THEN RAISE EXCEPTION 'lboom raised for %', e.result->>'id'; END IF;})
	  . $listener_fn->('rec2')
	  . qq{SELECT mqtt_emit.listen('user', 'rec(mqtt_emit.event)', allow_remote => true);\n}
	  . qq{SELECT mqtt_emit.listen('user', 'lboom(mqtt_emit.event)');\n}
	  . qq{SELECT mqtt_emit.listen('user', 'rec2(mqtt_emit.event)');\n}
	  . qq{SET ROLE alice; SELECT mqtt_emit.listen('user', 'alice_s.l(mqtt_emit.event)'); RESET ROLE;\n});

# node 2: the receiver. For model user, in registration order: rec_a, boom
# (raises when result.boom = "yes"), rec_b, alice's listener, bob's listener;
# model marker: rec_m.
sq($node2,
	    $common_sql
	  . $listener_fn->('rec_a')
	  . $listener_fn->('boom',
		q{IF e.result->>'boom' = 'yes' THEN RAISE EXCEPTION 'boom listener raised for %', e.result->>'id'; END IF;})
	  . $listener_fn->('rec_b')
	  . $listener_fn->('rec_m')
	  . $listener_fn->('rec_pct')
	  . q{
CREATE ROLE bob LOGIN;
CREATE FUNCTION public.bob_l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.role_seen VALUES (current_user, 'bob', e.result->>'id', e.source);
END $$;
REVOKE EXECUTE ON FUNCTION public.bob_l(mqtt_emit.event) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.bob_l(mqtt_emit.event) TO bob;
GRANT INSERT ON role_seen TO bob;
-- allow_remote listeners are a right superusers grant (README, "Listeners")
GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() TO alice, bob;
});
my %lid;
$lid{$_} = sq($node2, "SELECT mqtt_emit.listen('user', '$_(mqtt_emit.event)', allow_remote => true)")
  for qw(rec_a boom rec_b);
$lid{alice} = sq($node2,
	"SET ROLE alice; SELECT mqtt_emit.listen('user', 'alice_s.l(mqtt_emit.event)', allow_remote => true)");
$lid{bob} = sq($node2,
	"SET ROLE bob; SELECT mqtt_emit.listen('user', 'public.bob_l(mqtt_emit.event)', allow_remote => true)");
$lid{rec_m} = sq($node2, "SELECT mqtt_emit.listen('marker', 'rec_m(mqtt_emit.event)', allow_remote => true)");
is(sq($node2, q{SELECT string_agg(owner::text, ',' ORDER BY id) FROM mqtt_emit.listeners WHERE model = 'user'}),
	'postgres,postgres,postgres,alice,bob', 'node 2: listeners recorded with the roles that registered them');

ok(wait_subscribed($node1, $broker, "$prefix/user/#", 0), 'node 1: subscribed to its own model');
ok(wait_subscribed($node2, $broker, "$prefix/user/#", 0), 'node 2: subscribed to user');
ok(wait_subscribed($node2, $broker, "$prefix/marker/#", 0), 'node 2: subscribed to marker');
ok(wait_stats($node1, sub { $_[0]{connected} }), 'node 1: publisher connected');
is(stats($node2)->{subscriptions}, 2, 'node 2: two subscriptions (user, marker)');

my $pid2 = stats($node2)->{worker_pid};
ok($pid2, "node 2: worker pid $pid2");

# ---------------------------------------------------------------------------
# 1. a captured message published again is deduplicated; self echo
# ---------------------------------------------------------------------------

my $sub = start_subscriber($broker, "$prefix/user/#");
sq($node1, q{INSERT INTO "user" VALUES ('1', 'alice')});
ok($sub->wait_for_count(1, $T), 'captured node 1\'s event from the broker');
my ($cap_topic, $cap_payload) = @{ ($sub->messages)[0] // [ '', '{}' ] };
is($cap_topic, "$prefix/user/create", 'captured topic');
my $cap = eval { JSON::PP::decode_json($cap_payload) } // {};
my $eid = $cap->{eventId} // '';
like($eid, qr/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i, "event id $eid is UUID-formatted");
is($cap->{origin}, $cid1, 'origin is node 1\'s client id');

ok(wait_rows($node2, "who = 'rec_b' AND id = '1'", 1), 'node 2: listeners ran for the event');
is( sq($node2, "SELECT string_agg(who || ':' || source || ':' || event_id || ':' || origin, ' ' ORDER BY who) FROM seen WHERE id = '1'"),
	join(' ', map { "$_:remote:$eid:$cid1" } qw(boom rec_a rec_b)),
	'node 2: each remote listener once, source remote, the wire\'s event id and origin');

my $s2   = stats($node2);
my $dedup0 = $s2->{deduplicated};
my $recv0  = $s2->{received};
ok(mqtt_pub($broker, $cap_topic, $cap_payload), 'published the captured bytes again by hand');
ok(wait_stats($node2, sub { $_[0]{deduplicated} >= $dedup0 + 1 }),
	'node 2: stats.deduplicated increased');
$s2 = stats($node2);
is($s2->{received}, $recv0 + 1, 'node 2: received it (one more message)');
is($s2->{deduplicated}, $dedup0 + 1, 'node 2: deduplicated exactly once');
is(sq($node2, "SELECT count(*) FROM seen WHERE event_id = '$eid'"), 3,
	'node 2: no listener ran again for the re-published message');

# node 1 got its own event back: self echo, no remote run. A foreign message
# published after it is a marker: once its row is there, the echo is handled.
ok(wait_stats($node1, sub { $_[0]{self_echo} >= 1 }), 'node 1: its own event came back (self_echo)');
ok(mqtt_pub($broker, "$prefix/user/all", seed_message('echo-marker')), 'marker for node 1');
ok(poll_until(sub { sq($node1, "SELECT count(*) FROM seen WHERE id = 'echo-marker'") >= 1 }, $T),
	'node 1: marker handled');
is( sq($node1, "SELECT string_agg(who || ':' || source, ' ' ORDER BY who) FROM seen WHERE id = '1'"),
	'lboom:local rec:local rec2:local',
	'node 1: its listeners ran once each for its own event, local only, never as remote');
is(sq($node1, "SELECT string_agg(source, ' ') FROM seen WHERE id = 'echo-marker'"),
	'remote', 'node 1: the foreign marker ran its allow_remote listener as remote');

# ---------------------------------------------------------------------------
# 2. listeners run as the role that registered them
# ---------------------------------------------------------------------------

is(sq($node2, 'SELECT count(*) FROM secret'), 1, 'node 2: the secret table is readable by its owner');
is(sq($node2, "SELECT usr || ':' || secret || ':' || source FROM role_seen WHERE id = '1' AND secret <> 'bob'"),
	'alice:denied:remote', 'node 2: alice\'s listener ran as alice and could not read the secret table');
is(sq($node2, "SELECT string_agg(usr, ',') FROM role_seen WHERE id = '1' AND secret = 'bob'"),
	'bob', 'node 2: bob\'s listener ran as bob');
is(sq($node2, "SELECT string_agg(DISTINCT usr, ',') FROM seen"), 'postgres',
	'node 2: the superuser\'s listeners ran as the superuser');
is(sq($node1, "SELECT usr || ':' || secret || ':' || source FROM role_seen WHERE id = '1'"),
	'alice:denied:local', 'node 1: alice\'s local listener ran as alice and could not read the secret table');

# ---------------------------------------------------------------------------
# 3. prisma-extension-emitter messages: colliding event ids, model "User"
# ---------------------------------------------------------------------------

# The real captured message of FIELD_NOTES, and a second one with the same
# eventId and another result.
my $m1 = q({"model":"User","operation":"create","args":{"data":{"email":"alice-mwzo8vrb@x.io","name":"Alice"}},"result":{"id":2,"email":"alice-mwzo8vrb@x.io","name":"Alice","status":"ACTIVE","createdAt":"2026-11-28T00:28:07.383Z"},"timestamp":"2026-11-28T00:28:07.386Z","eventId":"eyJtb2RlbCI6IlVzZXIiLCJvcGVyYXRpb24iOiJjcmVhdGUiLCJhcmdzIjp7ImRh"});
my $m2 = q({"model":"User","operation":"create","args":{"data":{"email":"bob-q1w2e3r4@x.io","name":"Bob"}},"result":{"id":3,"email":"bob-q1w2e3r4@x.io","name":"Bob","status":"ACTIVE","createdAt":"2026-11-28T00:28:07.391Z"},"timestamp":"2026-11-28T00:28:07.394Z","eventId":"eyJtb2RlbCI6IlVzZXIiLCJvcGVyYXRpb24iOiJjcmVhdGUiLCJhcmdzIjp7ImRh"});
my $seed_topic = lc "$prefix/user/all";
$dedup0 = stats($node2)->{deduplicated};
ok(mqtt_pub($broker, $seed_topic, $m1), 'published the seed\'s captured message');
ok(mqtt_pub($broker, $seed_topic, $m2), 'published a second one with the same eventId');
ok(wait_rows($node2, "who = 'rec_b' AND id IN ('2', '3')", 2), 'node 2: both ran listeners');
is( sq($node2,
		"SELECT string_agg(id || ':' || model || ':' || operation || ':' || source || ':' || event_id || ':' || coalesce(origin, '-') || ':' || topic, ' ' ORDER BY id) FROM seen WHERE who = 'rec_a' AND id IN ('2', '3')"),
	join(' ', map { "$_:User:create:remote:$SEED_EVENT_ID:-:$seed_topic" } 2, 3),
	'node 2: model "User" (case-insensitive match), the seed\'s id, no origin, the /all topic');
is(stats($node2)->{deduplicated}, $dedup0, 'node 2: neither was taken for a duplicate');
ok(mqtt_pub($broker, $seed_topic, $m1), 'published the captured seed message once more (a redelivery)');
ok(wait_stats($node2, sub { $_[0]{deduplicated} >= $dedup0 + 1 }),
	'node 2: the identical bytes were deduplicated');
is(sq($node2, "SELECT count(*) FROM seen WHERE who = 'rec_a' AND id = '2'"), 1,
	'node 2: and ran no listener again');

# ---------------------------------------------------------------------------
# 4. malformed, oversized and hostile messages
# ---------------------------------------------------------------------------

# mqtt_emit.max_payload = 4kB on the receiver.
{
	my $off = file_size($node2->logfile);
	sq($node2, "ALTER SYSTEM SET mqtt_emit.max_payload = '4kB'; SELECT pg_reload_conf()");
	ok(poll_until(sub { text_since($node2->logfile, $off) =~ /parameter "mqtt_emit\.max_payload" changed to "4kB"/ }, $T),
		'node 2: max_payload set to 4kB and reloaded');
	# a round trip through the worker after the reload signal
	ok(mqtt_pub($broker, "$prefix/marker/create", '{"model":"marker","operation":"create","result":{"id":"reload"}}'),
		'marker after the reload');
	ok(wait_rows($node2, "who = 'rec_m' AND id = 'reload'", 1), 'node 2: worker handled a message after the reload');
}

my $pad = 'x' x (100 * 1024);
my $near = 'y' x 3000;
my @bad = (
	[
		'malformed JSON', "$prefix/user/create",
		'{"model":"user","operation":"create","result":{"id":"bad-json"',
		'rejected', qr/invalid JSON/
	],
	[
		'"model": 5', "$prefix/user/create",
		'{"model":5,"operation":"create","result":{"id":"bad-model"}}',
		'rejected', qr/"model" is missing, not a string, or not a valid model name/
	],
	[
		'"result": "x"', "$prefix/user/create",
		'{"model":"user","operation":"create","result":"x","eventId":"bad-result"}',
		'rejected', qr/"result" is not an object/
	],
	[
		'"result": [1,2]', "$prefix/user/create",
		'{"model":"user","operation":"create","result":[1,2],"eventId":"bad-result-array"}',
		'rejected', qr/"result" is not an object/
	],
	[
		'"operation": 5', "$prefix/user/create",
		'{"model":"user","operation":5,"result":{"id":"bad-op"}}',
		'rejected', qr/"operation" is missing or not a string/
	],
	[
		'100kB message over max_payload 4kB', "$prefix/user/create",
		qq({"model":"user","operation":"create","result":{"id":"bad-huge","pad":"$pad"}}),
		'rejected', qr/payload larger than "mqtt_emit\.max_payload"/
	],
	[
		'a model no listener has (not the topic\'s)', "$prefix/user/create",
		'{"model":"ghost","operation":"create","result":{"id":"bad-ghost"}}',
		'rejected', qr/"model" does not match the topic/
	],
	[
		'topic with extra levels', "$prefix/user/create/extra",
		'{"model":"user","operation":"create","result":{"id":"bad-levels"}}',
		'rejected', qr/topic does not have the form/
	],
	[
		'topic without an operation level', "$prefix/user",
		'{"model":"user","operation":"create","result":{"id":"bad-nolevel"}}',
		'rejected', qr/topic does not have the form/
	],
	[
		'invalid UTF-8', "$prefix/user/create",
		qq({"model":"user","operation":"create","result":{"id":"bad-utf8","name":"\xff\xfe\xc3"}}),
		'rejected', qr/not valid in the database encoding/
	],
	[
		'a NUL byte', "$prefix/user/create",
		qq({"model":"user","operation":"create","result":{"id":"bad-nul","name":"a\0b"}}),
		'rejected', qr/contains a NUL byte/
	],
	[
		'origin = the receiver\'s own client id', "$prefix/user/create",
		qq({"model":"user","operation":"create","result":{"id":"bad-self"},"eventId":"0badc0de-0000-4000-8000-000000000001","origin":"$cid2"}),
		'self_echo', undef
	],
);

for my $case (@bad)
{
	my ($what, $topic, $bytes, $counter, $log_re) = @$case;
	my $before = stats($node2);
	my $off    = file_size($node2->logfile);
	ok(pub_bytes($broker, $topic, $bytes), "$what: published (" . length($bytes) . ' bytes)');
	# handled: either counted as it should be, or (wrongly) given to listeners
	wait_stats($node2,
		sub {
			$_[0]{$counter} > $before->{$counter}
			  || $_[0]{listener_calls} > $before->{listener_calls};
		});
	my $after   = stats($node2);
	my $counted = $after->{$counter} >= $before->{$counter} + 1;
	ok($counted, "$what: counted in stats.$counter");
	is($after->{received}, $before->{received} + 1, "$what: received once");
	for my $other (grep { $_ ne $counter } qw(rejected self_echo deduplicated listener_calls listener_errors))
	{
		is($after->{$other}, $before->{$other}, "$what: stats.$other unchanged");
	}
	if ($log_re)
	{
		my $re = qr/LOG:  pg_mqtt_emit rejected a message on topic "\Q$topic\E": .*$log_re/;
		ok(($counted ? poll_until(sub { text_since($node2->logfile, $off) =~ $re }, $T)
				: text_since($node2->logfile, $off) =~ $re),
			"$what: dropped with a log line");
	}
}
# the worker still works: same process, a good message runs its listeners,
# and one just under the limit is accepted
my $s = stats($node2);
is($s->{worker_pid}, $pid2, 'node 2: the worker was not restarted');
ok(mqtt_pub($broker, $seed_topic, seed_message('after-bad', pad => $near)),
	'a good message just under max_payload');
ok(wait_rows($node2, "who = 'rec_b' AND id = 'after-bad'", 1), 'node 2: it still runs its listeners');
is(stats($node2)->{rejected}, $s->{rejected}, 'node 2: and it was not rejected');
sq($node1, q{INSERT INTO "user" VALUES ('after-bad-2', 'carol')});
ok(wait_rows($node2, "who = 'rec_b' AND id = 'after-bad-2'", 1),
	'node 2: node 1\'s next event still runs its listeners');

# ---------------------------------------------------------------------------
# 5. a listener that raises does not stop the others
# ---------------------------------------------------------------------------

{
	my $before = stats($node2);
	my $off    = file_size($node2->logfile);
	ok(mqtt_pub($broker, $seed_topic, seed_message('boom-1', boom => 'yes')), 'message that makes boom raise');
	ok(wait_rows($node2, "who = 'rec_b' AND id = 'boom-1'", 1), 'node 2: the listener after it ran');
	is(sq($node2, "SELECT string_agg(who, ',' ORDER BY who) FROM seen WHERE id = 'boom-1'"),
		'rec_a,rec_b', 'node 2: the ones before and after ran; boom\'s own insert was rolled back');
	is(sq($node2, "SELECT count(*) FROM role_seen WHERE id = 'boom-1'"), 2,
		'node 2: alice\'s and bob\'s listeners (after it) ran too');
	is(stats($node2)->{listener_errors}, $before->{listener_errors} + 1, 'node 2: listener_errors counts it');
	ok( poll_until(
			sub {
				text_since($node2->logfile, $off) =~
				  /pg_mqtt_emit listener \S*boom\(mqtt_emit\.event\) \(id $lid{boom}\) failed for remote event .*boom listener raised for boom-1/;
			},
			$T),
		'node 2: logged with the listener and the error');
	is(stats($node2)->{worker_pid}, $pid2, 'node 2: same worker');

	# and locally, on node 1
	my $b1 = stats($node1);
	sq($node1, q{INSERT INTO "user" VALUES ('boom-2', 'boom')});
	ok(poll_until(sub { sq($node1, "SELECT count(*) FROM seen WHERE who = 'rec2' AND id = 'boom-2'") >= 1 }, $T),
		'node 1: the local listener after the raising one ran');
	is(sq($node1, "SELECT string_agg(who, ',' ORDER BY who) FROM seen WHERE id = 'boom-2'"),
		'rec,rec2', 'node 1: before and after ran, the raising one left nothing');
	is(stats($node1)->{listener_errors}, $b1->{listener_errors} + 1, 'node 1: listener_errors counts it');
}

# ---------------------------------------------------------------------------
# 6. EXECUTE is checked at call time, not only at listen()
# ---------------------------------------------------------------------------

sq($node2, 'REVOKE EXECUTE ON FUNCTION public.bob_l(mqtt_emit.event) FROM bob');
ok(mqtt_pub($broker, $seed_topic, seed_message('revoked-1')), 'message after bob lost EXECUTE on his listener');
ok(wait_rows($node2, "who = 'rec_b' AND id = 'revoked-1'", 1), 'node 2: handled');
is(sq($node2, "SELECT string_agg(usr, ',') FROM role_seen WHERE id = 'revoked-1' AND secret <> 'bob'"),
	'alice', 'node 2: alice\'s listener ran (same transaction as bob\'s would)');
is(sq($node2, "SELECT count(*) FROM role_seen WHERE id = 'revoked-1' AND usr = 'bob'"), 0,
	'node 2: bob\'s listener does not run once bob may no longer execute it');

# ---------------------------------------------------------------------------
# 7. a model whose name contains '%' (escaped as %25 in the topic)
# ---------------------------------------------------------------------------

{
	my $off = file_size($broker->log_file);
	my $lp  = sq($node2, "SELECT mqtt_emit.listen('pct%model', 'rec_pct(mqtt_emit.event)', allow_remote => true)");
	ok(wait_subscribed($node2, $broker, "$prefix/pct%25model/#", $off),
		'node 2: subscribed to <prefix>/pct%25model/#');
	my $before = stats($node2);
	sq($node1, q{INSERT INTO pct VALUES ('pct-1')});
	ok(wait_stats($node2, sub { $_[0]{received} >= $before->{received} + 1 }),
		'node 2: received node 1\'s event for model pct%model');
	ok(poll_until(sub { sq($node2, "SELECT count(*) FROM seen WHERE who = 'rec_pct'") >= 1 }, 10),
		'node 2: its listener for model pct%model ran');
	is(stats($node2)->{rejected}, $before->{rejected}, 'node 2: the event was not rejected');
	sq($node2, "SELECT mqtt_emit.unlisten($lp)");
	ok(wait_stats($node2, sub { $_[0]{subscriptions} == 2 }), 'node 2: back to two subscriptions');
}

# ---------------------------------------------------------------------------
# 8. unlisten of the last remote listener of a model removes its subscription
# ---------------------------------------------------------------------------

{
	my $off = file_size($broker->log_file);
	sq($node2, "SELECT mqtt_emit.unlisten($lid{$_})") for qw(rec_a boom rec_b alice bob);
	is(sq($node2, q{SELECT count(*) FROM mqtt_emit.listeners WHERE model = 'user'}), 0,
		'node 2: no listener for user left');
	ok(wait_stats($node2, sub { $_[0]{subscriptions} == 1 && $_[0]{subscriber_connected} }),
		'node 2: one subscription left (marker), subscriber still connected');
	is_deeply([ split /\n/, sq($node2, 'SELECT topic_filter FROM mqtt_emit.subscriptions ORDER BY 1') ],
		["$prefix/marker/#"], 'node 2: mqtt_emit.subscriptions shows marker only');
	my $sid = "$cid2-subscriber";
	ok( poll_until(
			sub { text_since($broker->log_file, $off) =~ /^\S+: \Q$sid\E \Q$prefix\E\/user\/#$/m },
			$T),
		'node 2: the broker saw the unsubscribe from <prefix>/user/#');

	# A message for user, then a marker; the broker delivers them in that
	# order, so once the marker ran, the user message would have arrived.
	my $before = stats($node2);
	ok(mqtt_pub($broker, "$prefix/user/create",
			'{"model":"user","operation":"create","result":{"id":"after-unlisten"}}'),
		'published a user message after the unlisten');
	ok(mqtt_pub($broker, "$prefix/marker/create",
			'{"model":"marker","operation":"create","result":{"id":"after-unlisten-marker"}}'),
		'then a marker message');
	ok(wait_rows($node2, "who = 'rec_m' AND id = 'after-unlisten-marker'", 1), 'node 2: marker handled');
	my $after = stats($node2);
	is($after->{received}, $before->{received} + 1, 'node 2: only the marker was received, not the user message');
	is($after->{rejected}, $before->{rejected}, 'node 2: nothing rejected');

	# the last remote listener of all: no subscription; the subscriber stays
	# connected, so that the next listen() is subscribed at once
	$off = file_size($broker->log_file);
	sq($node2, "SELECT mqtt_emit.unlisten($lid{rec_m})");
	ok(wait_stats($node2, sub { $_[0]{subscriptions} == 0 }),
		'node 2: stats.subscriptions = 0');
	is(sq($node2, 'SELECT count(*) FROM mqtt_emit.subscriptions'), 0, 'node 2: mqtt_emit.subscriptions is empty');
	ok( poll_until(
			sub { text_since($broker->log_file, $off) =~ /^\S+: \Q$sid\E \Q$prefix\E\/marker\/#$/m },
			$T),
		'node 2: the broker saw the unsubscribe from <prefix>/marker/#');
	ok(stats($node2)->{subscriber_connected}, 'node 2: the subscriber stays connected without filters');
	unlike(text_since($broker->log_file, $off), qr/Client \Q$sid\E (?:\[[^\]]*\] )?(?:disconnected|closed its connection)/,
		'node 2: the broker did not see the subscriber leave');
	is(stats($node2)->{worker_pid}, $pid2, 'node 2: same worker throughout');
}

$sub->stop;
$node1->stop;
$node2->stop;
done_testing();
