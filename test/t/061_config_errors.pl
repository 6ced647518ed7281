#!/usr/bin/perl
#
# 061_config_errors.pl: broker settings that cannot work are reported with
# the setting and the fix, not as a connection failure that repeats forever
# (doc/DESIGN.md 7).
#
#   - mqtt_emit.broker_url: spaces or semicolons in a URL, an unknown or
#     missing scheme, no host, a bad port, a path, credentials in the URL,
#     and in a list an empty or bad element (the DETAIL names it) or more
#     than 16 URLs are refused by ALTER SYSTEM (SQLSTATE 22023, DETAIL and
#     HINT) and by a reload (the worker stays on its broker); good URLs and
#     comma-separated lists of them are accepted
#   - mqtt_emit.password without mqtt_emit.username (MQTT 3.1.1 forbids it):
#     one WARNING naming both settings with a hint, last_error says so, and
#     the worker does not connect at all (the broker logs no connection);
#     setting the user name and reloading connects
#   - a broker that refuses the credentials: the log line gives the CONNACK
#     return code (3.1.1) or reason code (5) and what it means
use strict;
use warnings;

use IPC::Run ();
use MqttEmitTest qw(:DEFAULT stat_of log_since);
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 30;
my $prefix = topic_prefix();

sub sq { my ($node, $sql) = @_; return $node->safe_psql('postgres', $sql); }



my $broker = start_broker(name => 'plain');
my $node   = new_node(
	'conf',
	broker                    => $broker,
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '500ms');
sq($node, 'CREATE EXTENSION pg_mqtt_emit');
ok(poll_until(sub { (stat_of($node, 'connected') // '') eq 't' }, $T), 'connected');

# --- mqtt_emit.broker_url --------------------------------------------------------

# [value, what, expected DETAIL]
my @bad = (
	[ 'tcp://a.example:1883 tcp://b.example:1883', 'a space-separated list', qr/must not contain spaces/ ],
	[ 'tcp://a.example:1883;tcp://b.example:1883', 'a semicolon-separated list', qr/must not contain spaces or semicolons/ ],
	[ 'tcp://a.example:1883, http://b.example:80', 'a list with a bad second URL',
	  qr/Broker URL 2 of the list, "http:\/\/b.example:80": Unknown scheme "http:\/\/"/ ],
	[ 'tcp://a.example:1883,,tcp://b.example:1883', 'a list with an empty element', qr/Broker URL 2 of the list is empty/ ],
	[ 'tcp://a.example:1883,', 'a list ending in a comma', qr/Broker URL 2 of the list is empty/ ],
	[ join(',', map { "tcp://b$_.example:1883" } 1 .. 17), 'a list of 17', qr/has 17 broker URLs; at most 16/ ],
	[ 'http://example.invalid:80', 'an unknown scheme', qr/Unknown scheme "http:\/\/"/ ],
	[ 'broker.example:1883', 'no scheme', qr/has no scheme/ ],
	[ 'TCP://broker.example:1883', 'an upper-case scheme', qr/lower case/ ],
	[ 'tcp://:1883', 'no host', qr/no host name/ ],
	[ 'tcp://broker.example:99999', 'port 99999', qr/port .* 1 to 65535/ ],
	[ 'tcp://broker.example:', 'an empty port', qr/port .* 1 to 65535/ ],
	[ 'tcp://broker.example:1883/mqtt', 'a path after tcp://', qr/Unexpected "\/mqtt"/ ],
	[ 'tcp://user:secret@broker.example:1883', 'credentials in the URL', qr/must not contain a user name or password/ ],
	[ 'tcp://[::1:1883', 'a broken IPv6 address', qr/IPv6 address .* malformed/ ],
);
for my $case (@bad)
{
	my ($url, $what, $detail) = @$case;
	my ($rc, $out, $err) = $node->psql('postgres',
		"ALTER SYSTEM SET mqtt_emit.broker_url = '$url'",
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	isnt($rc, 0, "broker_url, $what: refused");
	like($err, qr/ERROR:  22023: invalid value for parameter "mqtt_emit\.broker_url"/,
		"broker_url, $what: SQLSTATE 22023");
	like($err, qr/DETAIL:  .*$detail/, "broker_url, $what: DETAIL says why");
	like($err, qr/HINT:  \S/, "broker_url, $what: with a HINT");
	note($err);
}
for my $url ('tcp://127.0.0.1:1883', 'mqtt://broker.example', 'ssl://broker.example:8883',
	'mqtts://broker.example:8883', 'ws://broker.example:9001/mqtt', 'wss://broker.example',
	'tcp://[::1]:1883', 'tcp://a.example:1883,tcp://b.example:1883',
	'tcp://a.example:1883, ssl://b.example:8883,  mqtt://[::1]:1883',
	join(', ', map { "tcp://b$_.example:1883" } 1 .. 16))
{
	my ($rc, $out, $err) = $node->psql('postgres', "ALTER SYSTEM SET mqtt_emit.broker_url = '$url'");
	is($rc, 0, "broker_url $url: accepted") or diag($err);
}
sq($node, 'ALTER SYSTEM RESET mqtt_emit.broker_url');

# a bad list in postgresql.conf: the reload keeps the old value, the worker its broker
my $off = -s $node->logfile;
$node->append_conf('postgresql.conf',
	"mqtt_emit.broker_url = '" . $broker->url . ", tcp://a b:1883'\n");
$node->reload;
ok( poll_until(
		sub {
			log_since($node, $off) =~
			  /invalid value for parameter "mqtt_emit\.broker_url".*\n.*DETAIL:  Broker URL 2 of the list, "tcp:\/\/a b:1883": .*must not contain spaces/;
		},
		$T),
	'reload with a bad list in broker_url: the server log names the setting, the element and why');
is(sq($node, 'SHOW mqtt_emit.broker_url'), $broker->url, 'reload with a bad list: the old URL stays');
unlike(log_since($node, $off), qr/broker settings changed/, 'reload with a bad list: the worker did not reconnect');
is(stat_of($node, 'connected'), 't', 'reload with a bad list: still connected');
$node->append_conf('postgresql.conf', "mqtt_emit.broker_url = '" . $broker->url . "'\n");
$node->reload;
$node->stop;

# --- a password without a user name -----------------------------------------

my $broker2 = start_broker(name => 'nouser');
my $node2 = new_node(
	'nouser',
	broker                    => $broker2,
	'mqtt_emit.password'      => 'only-a-password',
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '200ms');
sq($node2, 'CREATE EXTENSION pg_mqtt_emit');
my $line;
ok( poll_until(
		sub {
			($line) = slurp_file($node2->logfile) =~ /^(.*WARNING: .*mqtt_emit\.password.*)$/m;
			defined $line;
		},
		$T),
	'password without user name: a WARNING in the server log');
note($line // '');
like($line // '', qr/"mqtt_emit\.password" is set but "mqtt_emit\.username" is empty/,
	'password without user name: the WARNING names both settings');
like(slurp_file($node2->logfile), qr/HINT:  Set "mqtt_emit\.username"/,
	'password without user name: the HINT says what to do');
like(stat_of($node2, 'last_error') // '', qr/mqtt_emit\.password is set but mqtt_emit\.username is empty/,
	'password without user name: last_error says so');
# an interval to count attempts over (with reconnect_max 200ms, a worker that
# tried would have tried about 10 times), not a wait for an effect
ok(!poll_until(sub { (stat_of($node2, 'connected') // '') eq 't' }, 2, 0.1),
	'password without user name: not connected');
my $client2 = $node2->{mqtt_emit}{client_id};
my $from_node = () = $broker2->log =~ /\Q$client2\E|<unknown>|protocol error/g;
is($from_node, 0, 'password without user name: the broker saw no connection attempt from the worker');
my $warnings = () = slurp_file($node2->logfile) =~ /WARNING: .*mqtt_emit\.password/g;
is($warnings, 1, 'password without user name: logged once');
unlike(slurp_file($node2->logfile), qr/only-a-password/, 'the password is not in the server log');

$node2->append_conf('postgresql.conf', "mqtt_emit.username = 'someone'\n");
$node2->reload;
ok(poll_until(sub { (stat_of($node2, 'connected') // '') eq 't' }, $T),
	'user name set and reloaded: connected');
$node2->stop;

# --- the broker refuses the credentials: CONNACK codes ---------------------------

my $dir = PostgreSQL::Test::Utils::tempdir('auth');
chmod 0755, $dir;
my $pwfile = "$dir/passwd";
my ($o, $e) = ('', '');
IPC::Run::run([ 'mosquitto_passwd', '-b', '-c', $pwfile, 'pgnode', 'right-pw' ],
	'<', \undef, '>', \$o, '2>', \$e, IPC::Run::timeout(30)) or die "mosquitto_passwd: $e";
my $broker3 = start_broker(name => 'auth', extra_conf => [ "password_file $pwfile" ]);
my $node3 = new_node(
	'refused',
	broker                    => $broker3,
	'mqtt_emit.username'      => 'pgnode',
	'mqtt_emit.password'      => 'wrong-pw',
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '500ms');
sq($node3, 'CREATE EXTENSION pg_mqtt_emit');
ok( poll_until(
		sub {
			($line) = slurp_file($node3->logfile) =~ /^(.*publisher cannot reach broker.*)$/m;
			defined $line;
		},
		$T),
	'wrong password (3.1.1): "cannot reach broker" logged');
note($line // '');
like($line // '',
	qr/the broker refused the connection: (bad user name or password \(CONNACK return code 4\)|not authorized \(CONNACK return code 5\))/,
	'wrong password (3.1.1): the CONNACK return code and its meaning');
$off = -s $node3->logfile;
$node3->append_conf('postgresql.conf', "mqtt_emit.mqtt_version = '5'\n");
$node3->reload;
ok( poll_until(
		sub {
			($line) = log_since($node3, $off) =~ /^(.*publisher cannot reach broker.*)$/m;
			defined $line;
		},
		$T),
	'wrong password (MQTT 5): "cannot reach broker" logged');
note($line // '');
like($line // '',
	qr/the broker refused the connection: (Bad user name or password \(CONNACK reason code 134\)|Not authorized \(CONNACK reason code 135\))/,
	'wrong password (MQTT 5): the CONNACK reason code and its meaning');
$node3->stop;

done_testing();
