#!/usr/bin/perl
#
# 046_limits_secrets.pl: no role gets more than its own rights (doc/DESIGN.md
# 10, "Trust model": names follow MQTT's UTF-8 topic rules; events caused by
# listeners carry a depth with a limit; secrets are not readable through
# pg_read_all_settings).  Everything an attacker does here is done as an
# unprivileged LOGIN role (alice) or as a member of pg_monitor (mon).
#
# Names: U+FFFF, other noncharacters and C1 control characters in a model
# name are refused by watch(), listen() and a direct INSERT into the
# registry, in publish()'s topic and in mqtt_emit.topic_prefix (22023, with
# the code point and its position); bytes that are not UTF-8 (a SQL_ASCII
# database) give 22021.  A capture trigger written by hand with such a
# model fails the change that fires it, and the publisher stays connected
# (stats.connects does not move; mosquitto disconnects a client that
# publishes to such a topic).
#
# Depth: alice's listener on b inserts two rows into b.  With
# mqtt_emit.max_depth = 3 one INSERT makes 1 + 2 + 4 + 8 + 16 = 31 rows:
# the 16 rows inserted at depth 4 are not captured (WARNING, counted in
# stats.depth_exceeded = 16), and nothing else happens after that.
# mqtt_emit.max_transaction_events set for alice by ALTER ROLE fails her
# larger transaction with 54000, and she cannot raise it.
#
# Secrets: mon reads neither mqtt_emit.password nor mqtt_emit.signing_key
# (SHOW, current_setting(), pg_settings, pg_file_settings), nor
# mqtt_emit.dead_letters; a superuser sees them; and the worker still uses
# the real ones: the broker has a password file (a masked password would be
# refused) and the published message's signature verifies with the real key.
use strict;
use warnings;

use Digest::SHA qw(hmac_sha256_hex);
use IPC::Run ();
use MqttEmitTest qw(:DEFAULT log_since role_works);
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 60;
my $prefix = topic_prefix();
my $PW     = 'pw-s3cret-4711';
my $KEY    = 'key-s3cret-0815';

my $node;

sub sq
{
	my ($sql, $db) = @_;
	return $node->safe_psql($db // 'postgres', $sql);
}

# $sql as $role (on node $n, database $db): (exit code, stdout, stderr)
sub as_role
{
	my ($role, $sql, $n, $db) = @_;
	return MqttEmitTest::as_role($n // $node, $role, $sql, $db);
}

# $sql as $role fails with $state, and stderr matches every pattern in @like
sub fails { return MqttEmitTest::role_fails($node, @_); }

sub works { return role_works($node, @_); }

sub st
{
	my ($col) = @_;
	return sq("SELECT $col FROM mqtt_emit.stats");
}

# ---------------------------------------------------------------------------
# a broker that checks the password; a node with a password and a key
# ---------------------------------------------------------------------------

my $dir = PostgreSQL::Test::Utils::tempdir('limits');
chmod 0755, $dir;
my $pwfile = "$dir/passwd";
for my $args ([ '-c', $pwfile, 'pgnode', $PW ], [ $pwfile, 'harness', 'harness-pw' ])
{
	my ($o, $e) = ('', '');
	IPC::Run::run([ 'mosquitto_passwd', '-b', @$args ], '<', \undef, '>', \$o, '2>', \$e)
	  or BAIL_OUT("mosquitto_passwd failed: $e");
}
my $xdg = "$dir/xdg";
mkdir $xdg or die "$xdg: $!";
PostgreSQL::Test::Utils::append_to_file("$xdg/$_", "-u harness\n-P harness-pw\n")
  for qw(mosquitto_pub mosquitto_sub);
$ENV{XDG_CONFIG_HOME} = $xdg;

my $broker = start_broker(extra_conf => [ 'allow_anonymous false', "password_file $pwfile" ]);
my $sub = start_subscriber($broker, "$prefix/#");

$node = new_node(
	'limits',
	broker                     => $broker,
	init                       => { extra => [ '--encoding=UTF8', '--locale=C' ] },
	'mqtt_emit.username'       => 'pgnode',
	'mqtt_emit.password'       => $PW,
	'mqtt_emit.signing_key'    => $KEY,
	'mqtt_emit.max_depth'      => 3,
	'mqtt_emit.reconnect_max'  => '500ms');

sq(q{
CREATE EXTENSION pg_mqtt_emit;
CREATE ROLE alice LOGIN;
CREATE ROLE mon LOGIN IN ROLE pg_monitor;
CREATE SCHEMA alice_s AUTHORIZATION alice;
GRANT EXECUTE ON FUNCTION mqtt_emit.publish(text, text, int, boolean, jsonb) TO alice;
});
ok(poll_until(sub { st('connected') eq 't' }, $T),
	'the worker connects to a broker that checks its password (the real one, not the masked one)');

sq(q{SET ROLE alice; SET search_path = alice_s;
CREATE TABLE t(id int PRIMARY KEY, v text);
CREATE TABLE t2(id int PRIMARY KEY);
CREATE TABLE b(id bigserial PRIMARY KEY, parent bigint);
CREATE FUNCTION noop(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION twice(e mqtt_emit.event) RETURNS void LANGUAGE sql
  AS $$ INSERT INTO alice_s.b(parent) VALUES ((e.result->>'id')::bigint), ((e.result->>'id')::bigint) $$;
});

# ---------------------------------------------------------------------------
# (6) names the broker refuses
# ---------------------------------------------------------------------------

my $ffff_err = fails('alice', q{SELECT mqtt_emit.watch('alice_s.t', model => U&'ab\FFFF')},
	'22023', 'watch() refuses U+FFFF in a model name',
	qr/U\+FFFF at position 3/, qr/HINT:/);
fails('alice', q{SELECT mqtt_emit.watch('alice_s.t', model => U&'x\FDD0')},
	'22023', 'watch() refuses the noncharacter U+FDD0', qr/U\+FDD0 at position 2/);
fails('alice', q{SELECT mqtt_emit.watch('alice_s.t', model => U&'x\+01FFFE')},
	'22023', 'watch() refuses the noncharacter U+1FFFE', qr/U\+1FFFE/);
fails('alice', q{SELECT mqtt_emit.watch('alice_s.t', model => U&'x\0085')},
	'22023', 'watch() refuses the C1 control character U+0085', qr/U\+0085/);
works('alice', q{SELECT mqtt_emit.watch('alice_s.t', model => 'café')},
	'watch() accepts a model name with other non-ASCII characters');
is(sq(q{SELECT model FROM mqtt_emit.watched_tables WHERE table_name = 'alice_s.t'::regclass}),
	'café', 'the model name is stored as given');

fails('alice', q{SELECT mqtt_emit.listen(U&'ab\FFFF', 'alice_s.noop(mqtt_emit.event)')},
	'22023', 'listen() refuses U+FFFF in a model name', qr/U\+FFFF at position 3/, qr/HINT:/);
# only the extension writes the registry now; a superuser's direct INSERT
# (as a restore makes) is checked as well
fails('postgres',
	q{INSERT INTO mqtt_emit.listeners (model, listener, allow_remote, owner) VALUES (U&'\FFFFx', 'alice_s.noop(mqtt_emit.event)', true, 'alice')},
	'22023', 'a direct INSERT into the registry refuses U+FFFF too', qr/U\+FFFF at position 1/);
is(sq('SELECT count(*) FROM mqtt_emit.listeners'), '0', 'no listener was registered');

fails('alice', q{SELECT mqtt_emit.publish(U&'a/b\FFFF', '{}')},
	'22023', 'publish() refuses U+FFFF in a topic', qr/topic contains character U\+FFFF at position 4/);
fails('alice', q{SELECT mqtt_emit.publish(U&'a/\0001', '{}')},
	'22023', 'publish() refuses a C0 control character', qr/U\+0001/);

{
	my ($out, $err) = ('', '');
	my $rc = $node->psql('postgres',
		q{ALTER SYSTEM SET mqtt_emit.topic_prefix = U&'p\FFFF'},
		stdout => \$out, stderr => \$err, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	ok($rc != 0 && $err =~ /ERROR:\s+22023:/ && $err =~ /U\+FFFF at position 2/,
		'mqtt_emit.topic_prefix refuses U+FFFF (22023)')
	  or diag("rc $rc, stderr: $err");
}

# a capture trigger written by hand (or restored by pg_dump) with U+FFFF
my $connects = st('connects');
works('alice',
	q{CREATE TRIGGER mqtt_emit_capture AFTER INSERT ON alice_s.t2 FOR EACH ROW EXECUTE FUNCTION mqtt_emit.capture(U&'bad\FFFF', 'true', 'all')},
	'alice can write a capture trigger by hand');
fails('alice', q{INSERT INTO alice_s.t2 VALUES (1)}, '22023',
	'a hand-written capture trigger with U+FFFF fails the change that fires it',
	qr/model name of the capture trigger contains character U\+FFFF at position 4/,
	qr/HINT:.*mqtt_emit\.watch/);
is(sq('SELECT count(*) FROM alice_s.t2'), '0', 'the change was rolled back');

sq(q{INSERT INTO alice_s.t VALUES (1, 'after')});
ok($sub->wait_for(sub { grep { $_->[0] eq "$prefix/café/create" && $_->[1] =~ /"after"/ } @_ }, $T),
	'a good event afterwards reaches the broker');
is(st('connects'), $connects, 'the publisher stayed connected all along');

# the signature is made with the real key, not the masked value
{
	my ($wire) = map { $_->[1] } grep { $_->[1] =~ /"after"/ } $sub->messages;
	my ($body, $sig) = ($wire // '') =~ /^(.*),"signature":"([0-9a-f]{64})"\}$/s;
	ok(defined $sig && $sig eq hmac_sha256_hex($body . '}', $KEY),
		'the published message is signed with the real mqtt_emit.signing_key')
	  or diag($wire // '(none)');
}

# bytes that are not UTF-8: a SQL_ASCII cluster
{
	my $ascii = new_node(
		'ascii',
		broker => $broker,
		init   => { extra => [ '--encoding=SQL_ASCII', '--locale=C' ] });
	$ascii->safe_psql('postgres', q{CREATE EXTENSION pg_mqtt_emit; CREATE ROLE alice LOGIN;
		CREATE TABLE public.at(id int); ALTER TABLE public.at OWNER TO alice;});
	my ($rc, $out, $err) = as_role('alice', q{SELECT mqtt_emit.watch('public.at', model => E'x\\xff')}, $ascii);
	ok($rc != 0 && $err =~ /ERROR:\s+22021:/ && $err =~ /not valid UTF-8 at byte 2/ && $err =~ /SQL_ASCII/,
		'alice: watch() refuses a model name that is not UTF-8 (22021)')
	  or diag("rc $rc, stderr: $err");
	$ascii->stop;
}

# ---------------------------------------------------------------------------
# (7) events that feed themselves; events per transaction
# ---------------------------------------------------------------------------

fails('alice', q{SET mqtt_emit.max_depth = 100}, '42501', 'cannot raise mqtt_emit.max_depth');
works('alice', q{SELECT mqtt_emit.watch('alice_s.b', emit => false)}, 'watch b (local only)');
works('alice', q{SET search_path = alice_s; SELECT mqtt_emit.listen('b', 'alice_s.twice(mqtt_emit.event)')},
	'a listener on b that inserts two rows into b');
my $log_off = -s $node->logfile;
my $calls0 = st('listener_calls');
works('alice', q{INSERT INTO alice_s.b(parent) VALUES (NULL)}, 'one INSERT into b');

ok( poll_until(
		sub {
			sq(q{SELECT depth_exceeded >= 16 AND NOT EXISTS (SELECT FROM mqtt_emit.outbox WHERE (flags & 2) <> 0)
				 FROM mqtt_emit.stats}) eq 't';
		},
		$T),
	'the chain stops: 16 events deeper than mqtt_emit.max_depth = 3 are not captured')
  or diag(sq('SELECT count(*) FROM alice_s.b') . ' rows; stats: '
	  . sq('SELECT depth_exceeded, listener_calls, in_outbox FROM mqtt_emit.stats'));
is(sq('SELECT count(*) FROM alice_s.b'), '31', 'b has 1 + 2 + 4 + 8 + 16 = 31 rows');
is(st('depth_exceeded'), '16', 'stats.depth_exceeded = 16');
is(st('listener_calls') - $calls0, 15, 'the listener ran for the 15 events of depth 0 to 3');
like(log_since($node, $log_off),
	qr/WARNING:.*event on "b" not captured: depth 4 exceeds "mqtt_emit.max_depth" \(3\)/,
	'the listener worker logs a WARNING naming the limit');

sq(q{ALTER ROLE alice SET mqtt_emit.max_transaction_events = 5});
is(works('alice', q{SHOW mqtt_emit.max_transaction_events}, 'alice sees her limit'), '5',
	'mqtt_emit.max_transaction_events is 5 for alice');
fails('alice', q{INSERT INTO alice_s.t SELECT g, 'bulk' FROM generate_series(10, 15) g}, '54000',
	'a transaction capturing 6 events fails', qr/mqtt_emit\.max_transaction_events/, qr/HINT:/);
is(sq(q{SELECT count(*) FROM alice_s.t WHERE v = 'bulk'}), '0', 'nothing of it was kept');
works('alice', q{INSERT INTO alice_s.t SELECT g, 'five' FROM generate_series(20, 24) g},
	'5 events in one transaction are allowed');
fails('alice', q{SET mqtt_emit.max_transaction_events = 0}, '42501', 'alice cannot lift her limit');
fails('alice', q{BEGIN; SELECT mqtt_emit.publish('x/y', '{}') FROM generate_series(1, 6); COMMIT;},
	'54000', 'publish() counts too');
sq(q{ALTER ROLE alice RESET mqtt_emit.max_transaction_events});

# ---------------------------------------------------------------------------
# (8) secrets
# ---------------------------------------------------------------------------

for my $g (qw(password signing_key))
{
	is(works('mon', "SHOW mqtt_emit.$g", "pg_monitor member may SHOW mqtt_emit.$g"),
		'********', "SHOW mqtt_emit.$g is masked for a pg_monitor member");
	is(works('mon', "SELECT current_setting('mqtt_emit.$g')", "current_setting('mqtt_emit.$g')"),
		'********', "current_setting('mqtt_emit.$g') is masked for a pg_monitor member");
	fails('alice', "SHOW mqtt_emit.$g", '42501', "SHOW mqtt_emit.$g");
}
is(works('mon', q{SELECT count(*) FROM pg_settings s WHERE row_to_json(s)::text ~ 's3cret'}, 'read pg_settings'),
	'0', 'no row of pg_settings holds a secret (setting, reset_val, boot_val) for a pg_monitor member');
is(works('mon', q{SELECT count(*) FROM pg_settings WHERE name LIKE 'mqtt_emit.%'}, 'count settings'),
	sq(q{SELECT count(*) FROM pg_settings WHERE name LIKE 'mqtt_emit.%'}),
	'pg_monitor sees the other settings of pg_mqtt_emit');
fails('mon', q{SELECT * FROM pg_file_settings}, '42501', 'pg_file_settings is not readable');
fails('mon', q{SELECT * FROM mqtt_emit.dead_letters}, '42501',
	'mqtt_emit.dead_letters (rows of any table) is not readable');
works('mon', q{SELECT connected FROM mqtt_emit.stats}, 'stats stay readable for pg_monitor');
is(sq(q{SHOW mqtt_emit.password}), $PW, 'a superuser sees the password');
is(sq(q{SELECT current_setting('mqtt_emit.signing_key')}), $KEY, 'a superuser sees the signing key');

$sub->stop;
done_testing();
