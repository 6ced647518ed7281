#!/usr/bin/perl
#
# 069_subscribe_any.pl: mqtt_emit.subscribe(topic_filter, handler) hands
# messages on any topic outside <prefix>/ to SQL functions (README
# "Subscribing to any topic").
#
# One node (MQTT 5) with handlers that record every call in a table; plain
# mosquitto_pub clients publish.  Checked, each counted exactly:
#  - payloads of all 256 byte values, text, JSON and empty arrive with their
#    exact bytes; payload_text()/payload_jsonb() read them;
#  - sensors/# and sensors/+/temp match exactly the topics they should;
#  - a handler with props gets MQTT 5 properties, {} for a 3.1.1 message;
#  - a handler that raises: after its 3 attempts the message is in
#    mqtt_emit.dead_letters, the other handler of the same message ran
#    once, and the next messages ran;
#  - a role without the right cannot subscribe (42501); with it, not to
#    the extension's own prefix or '#' (22023), not with a bad filter
#    (22023) or a wrong function (42P13, 42883); its handler runs as itself;
#  - unsubscribe() stops delivery;
#  - pg_ctl restart -m fast while messages are published at QoS 1: none is
#    lost (the subscriber's persistent session), and the test counts how
#    many ran twice.
use strict;
use warnings;

use File::Temp qw(tempdir);
use IPC::Run;
use MqttEmitTest qw(:DEFAULT stats role_fails role_works log_since);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 60;
my $broker = start_broker(extra_conf => ['max_queued_messages 0']);
my $prefix = topic_prefix();

my $node = new_node('sub', broker => $broker, start => 0);
$node->append_conf('postgresql.conf', "mqtt_emit.mqtt_version = 5\n");
$node->start;
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE public.got (n bigserial, tag text, topic text, payload bytea,
	                         props jsonb, who text DEFAULT current_user);
	CREATE FUNCTION public.h_hash(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload) VALUES ('hash', topic, payload) $$;
	CREATE FUNCTION public.h_plus(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload) VALUES ('plus', topic, payload) $$;
	CREATE FUNCTION public.h_data(topic text, payload bytea, props jsonb) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload, props) VALUES ('data', topic, payload, props) $$;
	CREATE SEQUENCE public.bad_calls;
	CREATE SEQUENCE public.flaky_calls;
	CREATE SEQUENCE public.slow_calls;
	CREATE FUNCTION public.h_fail(topic text, payload bytea) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO public.got (tag, topic, payload) VALUES ('fail', topic, payload);
		IF payload = 'bad'::bytea THEN
			PERFORM nextval('public.bad_calls');
			RAISE EXCEPTION 'cannot take %', topic;
		END IF;
		IF payload = 'slow'::bytea THEN
			PERFORM nextval('public.slow_calls');
			PERFORM pg_sleep(30);
		END IF;
		IF payload = 'flaky'::bytea AND nextval('public.flaky_calls') < 3 THEN
			RAISE EXCEPTION 'flaky % (test)', topic USING ERRCODE = 'serialization_failure';
		END IF;
	END $$;
	CREATE FUNCTION public.h_ok(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload) VALUES ('ok', topic, payload) $$;
	CREATE FUNCTION public.h_load(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload) VALUES ('load', topic, payload) $$;
	SELECT mqtt_emit.subscribe('sensors/#', 'public.h_hash(text, bytea)');
	SELECT mqtt_emit.subscribe('sensors/+/temp', 'public.h_plus(text, bytea)');
	SELECT mqtt_emit.subscribe('data/#', 'public.h_data(text, bytea, jsonb)', qos => 1);
	SELECT mqtt_emit.subscribe('fail/#', 'public.h_fail(text, bytea)');
	SELECT mqtt_emit.subscribe('fail/#', 'public.h_ok(text, bytea)');
	SELECT mqtt_emit.subscribe('load/#', 'public.h_load(text, bytea)', qos => 1);
});

sub sqlq { return $node->safe_psql('postgres', $_[0]); }

# A filter is in effect once a probe message on a topic it matches reaches
# its handler (the broker's SUBACK comes after subscribe() commits).
sub probe
{
	my ($topic, $tag) = @_;
	return poll_until(
		sub {
			mqtt_pub($broker, $topic, 'probe');
			sqlq("SELECT count(*) FROM got WHERE tag = '$tag' AND topic = '$topic'") > 0;
		},
		$T, 0.5);
}
ok(probe('sensors/probe/temp', 'hash'), 'sensors/# is in effect');
ok(probe('sensors/probe/temp', 'plus'), 'sensors/+/temp is in effect');
ok(probe('data/probe', 'data'), 'data/# is in effect');
ok(probe('fail/probe', 'ok'), 'fail/# is in effect');
ok(probe('load/probe', 'load'), 'load/# is in effect');
sqlq("DELETE FROM got");

# ---- payloads: exact bytes ----
my $dir = tempdir(CLEANUP => 1);
open(my $fh, '>:raw', "$dir/bin") or die;
print $fh join('', map { chr } 0 .. 255);
close $fh;
my $hex = join('', map { sprintf '%02x', $_ } 0 .. 255);
my $text = "h\x{e9}llo w\x{f6}rld \x{2603}";
utf8::encode(my $text_bytes = $text);

ok(mqtt_pub($broker, 'data/bin', undef, file => "$dir/bin"), 'published 256 byte values');
ok(mqtt_pub($broker, 'data/text', $text_bytes), 'published UTF-8 text');
ok(mqtt_pub($broker, 'data/json', '{"a": [1, 2], "b": "x"}'), 'published JSON');
ok(mqtt_pub($broker, 'data/empty', undef), 'published an empty payload');
ok( mqtt_pub(
		$broker, 'data/props', 'with props',
		args => [
			'-V', '5',
			'-D', 'publish', 'user-property', 'k', 'v',
			'-D', 'publish', 'user-property', 'k2', 'v 2',
			'-D', 'publish', 'content-type', 'text/plain',
			'-D', 'publish', 'response-topic', 'resp/here',
			'-D', 'publish', 'correlation-data', 'abc',
			'-D', 'publish', 'payload-format-indicator', '1'
		]),
	'published with MQTT 5 properties');
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE tag = 'data'") >= 5 }, $T),
	'five data messages arrived');
is(sqlq("SELECT count(*) FROM got WHERE tag = 'data'"), 5, 'exactly five data calls');
is(sqlq("SELECT encode(payload, 'hex') FROM got WHERE topic = 'data/bin'"), $hex,
	'binary payload: all 256 byte values, exact');
is(sqlq("SELECT encode(payload, 'hex') FROM got WHERE topic = 'data/text'"), unpack('H*', $text_bytes),
	'text payload: exact bytes');
is(sqlq("SELECT mqtt_emit.payload_text(payload) = convert_from('\\x" . unpack('H*', $text_bytes) . "', 'UTF8') FROM got WHERE topic = 'data/text'"),
	't', 'text payload: payload_text() gives the text');
is(sqlq("SELECT mqtt_emit.payload_jsonb(payload) = '{\"a\": [1, 2], \"b\": \"x\"}'::jsonb FROM got WHERE topic = 'data/json'"),
	't', 'JSON payload: payload_jsonb()');
is(sqlq("SELECT octet_length(payload) FROM got WHERE topic = 'data/empty'"), '0', 'empty payload');
is(sqlq("SELECT props FROM got WHERE topic = 'data/bin'"), '{}', 'a 3.1.1 message has empty props');
is( sqlq("SELECT props FROM got WHERE topic = 'data/props'"),
	'{"content_type": "text/plain", "payload_format": 1, "response_topic": "resp/here", "user_properties": [["k", "v"], ["k2", "v 2"]], "correlation_data": "616263"}',
	'MQTT 5 properties: content type, format, response topic, user properties, correlation data (hex)');
my ($rc, $out, $err) = ('', '', '');
$rc = $node->psql('postgres', "SELECT mqtt_emit.payload_text(payload) FROM got WHERE topic = 'data/bin'",
	stdout => \$out, stderr => \$err);
ok($rc != 0 && $err =~ /invalid byte sequence for encoding "UTF8"/, 'payload_text() of binary data raises an error')
  or diag $err;

# ---- wildcards ----
my @topics = qw(sensors/a/temp sensors/b/temp sensors/a/humidity sensors/a/temp/x
  sensors other/a/temp sensorsX/a/temp sensors/temp);
ok(mqtt_pub($broker, $_, "m $_"), "published on $_") for @topics;
ok(mqtt_pub($broker, 'sensors/end/temp', 'end'), 'published the end mark');
ok( poll_until(
		sub {
			sqlq("SELECT count(*) FROM got WHERE topic = 'sensors/end/temp'") >= 2;
		},
		$T),
	'the end mark reached both sensor handlers');
is( sqlq("SELECT string_agg(topic, ' ' ORDER BY n) FROM got WHERE tag = 'hash'"),
	'sensors/a/temp sensors/b/temp sensors/a/humidity sensors/a/temp/x sensors sensors/temp sensors/end/temp',
	'sensors/# matched exactly sensors and everything below it, once each');
is( sqlq("SELECT string_agg(topic, ' ' ORDER BY n) FROM got WHERE tag = 'plus'"),
	'sensors/a/temp sensors/b/temp sensors/end/temp',
	'sensors/+/temp matched exactly sensors/<one level>/temp, once each');
is(sqlq("SELECT count(*) FROM got WHERE topic IN ('other/a/temp', 'sensorsX/a/temp')"), '0',
	'other topics reached no handler');

# ---- filters that overlap without one covering the other (README) ----
sqlq(q{
	CREATE FUNCTION public.h_ov1(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload) VALUES ('ov1', topic, payload) $$;
	CREATE FUNCTION public.h_ov2(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload) VALUES ('ov2', topic, payload) $$;
	SELECT mqtt_emit.subscribe('ov/+/c', 'public.h_ov1(text, bytea)');
	SELECT mqtt_emit.subscribe('ov/b/+', 'public.h_ov2(text, bytea)');
});
ok(probe('ov/x/c', 'ov1'), 'ov/+/c is in effect');
ok(probe('ov/b/x', 'ov2'), 'ov/b/+ is in effect');
ok(mqtt_pub($broker, 'ov/b/c', 'both'), 'published on ov/b/c, which both match');
ok(mqtt_pub($broker, 'ov/end/c', 'end'), 'published an end mark for ov/+/c');
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE topic = 'ov/end/c'") > 0 }, $T),
	'the end mark arrived');
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE topic = 'ov/b/c'") >= 4 }, $T),
	'ov/b/c arrived as two copies');
is( sqlq("SELECT string_agg(tag, ' ' ORDER BY n) FROM got WHERE topic = 'ov/b/c'"),
	'ov1 ov2 ov1 ov2',
	'as documented: partly overlapping filters get a message twice, and each handler runs twice');

# ---- a handler that raises ----
my $dl0 = sqlq("SELECT count(*) FROM mqtt_emit.dead_letters");
ok(mqtt_pub($broker, 'fail/1', 'ok1'), 'published fail/1');
ok(mqtt_pub($broker, 'fail/2', 'bad'), 'published fail/2 (the handler raises)');
ok(mqtt_pub($broker, 'fail/3', 'ok2'), 'published fail/3');
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE tag = 'ok' AND topic = 'fail/3'") > 0 }, $T),
	'the message after the failing one ran');
is(sqlq("SELECT count(*) - $dl0 FROM mqtt_emit.dead_letters"), '1', 'one dead letter');
is( sqlq("SELECT topic || ' ' || encode(payload::bytea, 'escape') || ' ' || (reason LIKE 'handler %h_fail(text,bytea) (id %) failed: cannot take fail/2 (SQLSTATE P0001, not tried again for this error: it would not pass)')
	   FROM mqtt_emit.dead_letters ORDER BY id DESC LIMIT 1"),
	'fail/2 bad true', 'the dead letter has the topic, the payload (as bytea text) and the handler\'s error');
is( sqlq("SELECT string_agg(tag || ':' || topic, ' ' ORDER BY n) FROM got WHERE topic LIKE 'fail/_'"),
	'fail:fail/1 ok:fail/1 ok:fail/2 fail:fail/3 ok:fail/3',
	'the failing handler\'s work is gone, the other handler of that message ran once, the next message ran');
is(sqlq("SELECT last_value FROM public.bad_calls"), '1',
	'a RAISE (P0001) is not tried again: the failing handler was called once');

# an error that may pass (40001) is tried again, and the third attempt takes it
ok(mqtt_pub($broker, 'fail/4', 'flaky'), 'published fail/4 (the handler fails twice with 40001)');
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE tag = 'fail' AND topic = 'fail/4'") > 0 }, $T),
	'fail/4 was taken');
is(sqlq("SELECT last_value FROM public.flaky_calls"), '3', 'the handler was called 3 times');
is(sqlq("SELECT string_agg(tag || ':' || topic, ' ' ORDER BY n) FROM got WHERE topic = 'fail/4'"),
	'fail:fail/4 ok:fail/4', 'the work of the attempt that succeeded is there once, with the other handler\'s');
is(sqlq("SELECT count(*) - $dl0 FROM mqtt_emit.dead_letters"), '1', 'no dead letter for fail/4');

# a stream of messages the handler refuses: each is a dead letter after one call
my $BAD = 30;
ok(mqtt_pub($broker, "fail/b$_", 'bad'), "published fail/b$_") for 1 .. $BAD;
ok(mqtt_pub($broker, 'fail/after', 'ok3'), 'published fail/after');
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE tag = 'ok' AND topic = 'fail/after'") > 0 }, $T),
	"the message after $BAD refused ones ran");
is(sqlq("SELECT last_value FROM public.bad_calls"), 1 + $BAD, "each of the $BAD refused messages was handled once");
is(sqlq("SELECT count(*) - $dl0 FROM mqtt_emit.dead_letters"), 1 + $BAD, "$BAD more dead letters");

# a handler gets the retained message of its topic when it subscribes
# (under MQTT 5 only the events' subscriptions ask for Retain Handling 2)
ok(mqtt_pub($broker, 'kept/state', 'retained-1', retain => 1), 'a retained message on kept/state');
sqlq(q{
	CREATE FUNCTION public.h_kept(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload) VALUES ('kept', topic, payload) $$;
	SELECT mqtt_emit.subscribe('kept/#', 'public.h_kept(text, bytea)');
});
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE tag = 'kept'") > 0 }, $T),
	'the handler of kept/# got the retained message at its subscription');
is(sqlq("SELECT topic || ' ' || encode(payload, 'escape') FROM got WHERE tag = 'kept'"),
	'kept/state retained-1', 'it is the retained message, once');
ok(mqtt_pub($broker, 'kept/state', '', retain => 1), 'the retained message cleared');

# a handler cancelled by mqtt_emit.listener_timeout (57014) is not tried
# again: it would take as long again, and hold up everything behind it
$node->append_conf('postgresql.conf', "mqtt_emit.listener_timeout = '300ms'\n");
$node->reload;
ok(poll_until(sub { sqlq('SHOW mqtt_emit.listener_timeout') eq '300ms' }, $T), 'listener_timeout = 300ms');
ok(mqtt_pub($broker, 'fail/slow', 'slow'), 'published fail/slow (the handler sleeps 30 s)');
ok(mqtt_pub($broker, 'fail/after-slow', 'ok4'), 'published fail/after-slow');
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE tag = 'ok' AND topic = 'fail/after-slow'") > 0 }, $T),
	'the message after the slow one ran');
is(sqlq("SELECT last_value FROM public.slow_calls"), '1', 'the handler cancelled by listener_timeout was called once');
like(sqlq("SELECT reason FROM mqtt_emit.dead_letters ORDER BY id DESC LIMIT 1"),
	qr/h_fail\(text,bytea\).*SQLSTATE 57014, not tried again/, 'its dead letter names the cancel (57014)');
$node->append_conf('postgresql.conf', "mqtt_emit.listener_timeout = '10s'\n");
$node->reload;
ok(poll_until(sub { sqlq('SHOW mqtt_emit.listener_timeout') eq '10s' }, $T), 'listener_timeout back to 10s');

# ---- rights ----
sqlq(q{
	CREATE ROLE alice LOGIN;
	CREATE TABLE public.alice_got (topic text, who text);
	ALTER TABLE public.alice_got OWNER TO alice;
	CREATE FUNCTION public.h_alice(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.alice_got VALUES (topic, current_user) $$;
	ALTER FUNCTION public.h_alice(text, bytea) OWNER TO alice;
	CREATE FUNCTION public.not_handler(topic text, payload text) RETURNS void
	LANGUAGE sql AS $$ SELECT $$;
});
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('alice/#', 'public.h_alice(text, bytea)')",
	'42501', 'cannot subscribe without the right', qr/may_listen_remote/);
sqlq("GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() TO alice");
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('$prefix/t/#', 'public.h_alice(text, bytea)')",
	'22023', 'cannot subscribe to the extension\'s prefix', qr/overlaps the topics of pg_mqtt_emit events/, qr/HINT:.*listen/);
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('#', 'public.h_alice(text, bytea)')",
	'22023', 'cannot subscribe to #, which overlaps the prefix');
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('+/+/+/#', 'public.h_alice(text, bytea)')",
	'22023', 'cannot subscribe to +/+/+/#, which overlaps the prefix');
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('a/b+/c', 'public.h_alice(text, bytea)')",
	'22023', 'a + inside a level is refused', qr/whole level/);
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('a/#/c', 'public.h_alice(text, bytea)')",
	'22023', 'a # before the last level is refused');
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('', 'public.h_alice(text, bytea)')",
	'22023', 'an empty filter is refused');
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe(repeat('a', 1025), 'public.h_alice(text, bytea)')",
	'22023', 'a filter of more than 1024 bytes is refused');
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('a/' || chr(1), 'public.h_alice(text, bytea)')",
	'22023', 'a control character is refused');
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('alice/#', 'public.not_handler(text, text)')",
	'42P13', 'a function of the wrong signature is refused');
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('alice/#', 'public.nothing(text, bytea)')",
	'42883', 'a function that does not exist is refused');
role_fails($node, 'alice', "SELECT mqtt_emit.subscribe('alice/#', 'public.h_alice(text, bytea)', qos => 3)",
	'22023', 'QoS 3 is refused');
role_fails($node, 'alice', "INSERT INTO mqtt_emit.handlers (topic_filter, handler) VALUES ('alice/#', 'public.h_alice(text, bytea)')",
	'42501', 'the registry is not writable directly');
my $aid = role_works($node, 'alice', "SELECT mqtt_emit.subscribe('alice/#', 'public.h_alice(text, bytea)')",
	'subscribes to alice/# with the right');
is(role_works($node, 'alice', "SELECT count(*) FROM mqtt_emit.handlers", 'reads the registry'),
	"1", 'alice sees only her own subscription');
ok( poll_until(
		sub {
			mqtt_pub($broker, 'alice/x', 'hi');
			sqlq("SELECT count(*) FROM alice_got") > 0;
		},
		$T, 0.5),
	'alice\'s handler runs');
is(sqlq("SELECT DISTINCT who FROM alice_got"), 'alice', 'alice\'s handler runs as alice');
is(role_works($node, 'alice', "SELECT mqtt_emit.unsubscribe(1)", 'unsubscribe of another role\'s id'),
	"f", 'another role\'s subscription is not removed');

# ---- unsubscribe ----
my $subs = stats($node)->{subscriptions};
is(role_works($node, 'alice', "SELECT mqtt_emit.unsubscribe($aid)", 'unsubscribes'), "t",
	'unsubscribe() says it removed the subscription');
is(role_works($node, 'alice', "SELECT mqtt_emit.unsubscribe($aid)", 'unsubscribes again'), "f",
	'a second unsubscribe() finds nothing');
ok(poll_until(sub { stats($node)->{subscriptions} == $subs - 1 }, $T),
	'the worker dropped the filter');
my $before = sqlq("SELECT count(*) FROM alice_got");
ok(mqtt_pub($broker, 'alice/after', 'gone'), 'published on alice/after');
ok(mqtt_pub($broker, 'data/after-unsubscribe', 'x'), 'published a later message on data/');
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE topic = 'data/after-unsubscribe'") > 0 }, $T),
	'the later message arrived');
is(sqlq("SELECT count(*) FROM alice_got"), $before, 'nothing reached alice\'s handler after unsubscribe()');

# ---- a handler that asks for a higher QoS: the filter is subscribed again ----
{
	my $off = $broker->log_position;
	sqlq(q{CREATE FUNCTION public.h_data2(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.got (tag, topic, payload) VALUES ('data2', topic, payload) $$;
	SELECT mqtt_emit.subscribe('data/#', 'public.h_data2(text, bytea)', qos => 2);});
	ok($broker->wait_for_log(qr/^\S+: \S+ 2 data\/#$/m, $T, $off),
		'a second handler of data/# with QoS 2: the worker subscribes to data/# again with QoS 2');
	sqlq(q{SELECT mqtt_emit.unsubscribe(id) FROM mqtt_emit.handlers WHERE handler = 'public.h_data2(text, bytea)'::regprocedure});
}

# ---- a handler of a role that cannot log in: its filter is not subscribed ----
{
	sqlq(q{
	CREATE ROLE bob LOGIN;
	GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() TO bob;
	CREATE TABLE public.bob_got (topic text);
	ALTER TABLE public.bob_got OWNER TO bob;
	CREATE FUNCTION public.h_bob(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.bob_got VALUES (topic) $$;
	ALTER FUNCTION public.h_bob(text, bytea) OWNER TO bob;
	});
	my $n0 = stats($node)->{subscriptions};
	role_works($node, 'bob', "SELECT mqtt_emit.subscribe('bob/#', 'public.h_bob(text, bytea)')",
		'subscribes to bob/#');
	ok(poll_until(sub { stats($node)->{subscriptions} == $n0 + 1 }, $T), 'the worker subscribed to bob/#');
	my $off = -s $node->logfile;
	sqlq('ALTER ROLE bob NOLOGIN');
	sqlq('SELECT mqtt_emit._listeners_changed()');
	ok(poll_until(sub { stats($node)->{subscriptions} == $n0 }, $T),
		'once bob cannot log in (and the registry is read again), bob/# is no longer subscribed');
	ok(poll_until(sub { log_since($node, $off) =~ /skips handler \d+ \(public\.h_bob\(text,bytea\) on "bob\/#"\): its role \d+ no longer exists or cannot log in/ }, $T),
		'the log says why');
	sqlq('ALTER ROLE bob LOGIN');
	sqlq('SELECT mqtt_emit._listeners_changed()');
	ok(poll_until(sub { stats($node)->{subscriptions} == $n0 + 1 }, $T), 'with LOGIN back, bob/# is subscribed again');
}

# ---- restart while publishing (QoS 1) ----
my $N = 600;
# one mosquitto_pub session, 20 messages every 0.1 s (about 3 s in all)
my @pub = ('sh', '-c',
	    "i=0; while [ \$i -lt $N ]; do i=\$((i+1)); echo \$i; "
	  . "[ \$((i % 20)) -eq 0 ] && sleep 0.1; done | "
	  . "mosquitto_pub -h 127.0.0.1 -p " . $broker->port . " -q 1 -t load/seq -l");
my $h = IPC::Run::start(\@pub, '<', '/dev/null', '>', \my $pout, '2>', \my $perr,
	IPC::Run::timeout(120));
ok(poll_until(sub { sqlq("SELECT count(*) FROM got WHERE tag = 'load'") >= 20 }, $T),
	'the first messages of the load arrived');
my $at_restart = sqlq("SELECT count(*) FROM got WHERE tag = 'load'");
$node->restart;    # pg_ctl restart: -m fast is its default
ok(eval { $h->finish; 1 } && $h->result == 0, 'mosquitto_pub published all of them')
  or diag "rc " . ($h->result // '?') . ": $perr";
ok( poll_until(
		sub { sqlq("SELECT count(DISTINCT payload) FROM got WHERE tag = 'load' AND topic = 'load/seq'") >= $N },
		$T, 0.5),
	'every message of the load arrived');
my ($runs, $distinct) = split /\|/,
  sqlq("SELECT count(*), count(DISTINCT payload) FROM got WHERE tag = 'load' AND topic = 'load/seq'");
my $twice = sqlq("SELECT count(*) FROM (SELECT payload FROM got WHERE tag = 'load' AND topic = 'load/seq'
               GROUP BY payload HAVING count(*) > 1) x");
note "restart -m fast while publishing: sent $N, run $runs (distinct $distinct), missing "
  . ($N - $distinct) . ", run twice $twice; $at_restart had run when the restart began";
is($distinct, $N, 'restart: none of the messages is lost');
is($runs, $N + $twice, 'restart: every run is one message once, or a counted duplicate');

# ---- README's example: sensor readings land in a table ----
sqlq(q{
	CREATE TABLE readings (sensor text, value numeric, at timestamptz DEFAULT now());
	CREATE FUNCTION on_reading(topic text, payload bytea) RETURNS void
	LANGUAGE sql AS $$
	    INSERT INTO readings (sensor, value)
	    VALUES (split_part(topic, '/', 2), mqtt_emit.payload_text(payload)::numeric)
	$$;
	SELECT mqtt_emit.subscribe('sensors/+/temp', 'on_reading(text, bytea)');
});
ok( poll_until(
		sub {
			mqtt_pub($broker, 'sensors/kitchen/temp', '21.5');
			sqlq("SELECT count(*) FROM readings") > 0;
		},
		$T, 0.5),
	'README example: a reading arrived');
ok(mqtt_pub($broker, 'sensors/cellar/temp', '12.25'), 'README example: published a second reading');
ok(poll_until(sub { sqlq("SELECT count(*) FROM readings WHERE sensor = 'cellar'") > 0 }, $T),
	'README example: the second reading arrived');
is(sqlq("SELECT string_agg(DISTINCT sensor || ' ' || value, ', ') FROM readings"),
	'cellar 12.25, kitchen 21.5', 'README example: the readings are in the table');

done_testing();
