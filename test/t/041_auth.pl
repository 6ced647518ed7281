#!/usr/bin/perl
#
# 041_auth.pl: broker authentication and authorisation (doc/DESIGN.md 7:
# mqtt_emit.username / mqtt_emit.password, "password hidden"; doc/DESIGN.md 6: a
# message the broker refuses must not block the others).
#
# A real mosquitto with allow_anonymous false, a password_file made with
# mosquitto_passwd and an acl_file: user "pgnode" may read and write only
# <prefix>/#. (The harness checks that its brokers are up with an anonymous
# mosquitto_pub; here mosquitto_pub and mosquitto_sub read their default
# options from $XDG_CONFIG_HOME, which gives them a user "harness" of their
# own, allowed on the harness's probe topics and to read <prefix>/#.)
#
# Checked: with the right credentials events go end to end (node A, MQTT
# 3.1.1, publishes; node B, MQTT 5, receives and runs its listener; a test
# subscriber sees them); with a wrong password the worker is not connected
# and last_error and the server log report the refusal; the password is
# never written to the server log, neither the wrong one nor the right one
# (also after the operator fixes it with a reload); a publish the ACL forbids
# (mqtt_emit.publish('forbidden/x', ...)) does not block the events after
# it, with MQTT 3.1.1 and with MQTT 5 (where the broker answers "not
# authorized" in the PUBACK). Every wait is a bounded poll.
use strict;
use warnings;

use IPC::Run ();
use Time::HiRes ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 30;
my $prefix = topic_prefix();
my $rand   = join '', map { sprintf '%02x', int(rand(256)) } 1 .. 6;
my $GOOD_PW    = "Good-Pw-$rand-x9";
my $WRONG_PW   = "Wrong-Pw-$rand-q7";
my $HARNESS_PW = "harness-$rand";

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

sub sq
{
	my ($node, $sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

sub stat_of
{
	my ($node, $col) = @_;
	return sq($node, "SELECT $col FROM mqtt_emit.stats");
}

sub log_size { return (-s $_[0]->logfile) // 0; }

sub log_since
{
	my ($node, $offset) = @_;
	my $text = slurp_file($node->logfile);
	return length($text) > $offset ? substr($text, $offset) : '';
}

sub run_or_die
{
	my (@cmd) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(30))
	  or die "@cmd: $err";
	return $out;
}

sub write_file
{
	my ($path, $text) = @_;
	open my $fh, '>', $path or die "$path: $!";
	print $fh $text;
	close $fh;
	return $path;
}

sub wait_connected
{
	my ($node, $col) = @_;
	$col //= 'connected';
	return poll_until(sub { stat_of($node, $col) eq 't' }, $T);
}

sub reload_and_wait
{
	my ($node, $conf) = @_;
	my $off = log_size($node);
	$node->append_conf('postgresql.conf', $conf);
	$node->reload;
	poll_until(sub { log_since($node, $off) =~ /broker settings changed, reconnecting/ }, $T)
	  or diag('worker did not take the new broker settings');
	return $off;
}

# ---------------------------------------------------------------------------
# broker with a password file and an ACL
# ---------------------------------------------------------------------------

my $dir = PostgreSQL::Test::Utils::tempdir('auth');
chmod 0755, $dir;
my $pwfile = "$dir/passwd";
run_or_die('mosquitto_passwd', '-b', '-c', $pwfile, 'pgnode', $GOOD_PW);
run_or_die('mosquitto_passwd', '-b', $pwfile, 'harness', $HARNESS_PW);
unlike(slurp_file($pwfile), qr/\Q$GOOD_PW\E/, 'password file holds a hash, not the password');
my $aclfile = write_file("$dir/acl", <<"EOF");
user harness
topic readwrite mqtt_emit_test/#
topic read $prefix/#

user pgnode
topic readwrite $prefix/#
EOF

# mosquitto_pub / mosquitto_sub defaults (command-line options win)
my $xdg = "$dir/xdg";
mkdir $xdg or die "$xdg: $!";
write_file("$xdg/$_", "-u harness\n-P $HARNESS_PW\n") for qw(mosquitto_pub mosquitto_sub);
$ENV{XDG_CONFIG_HOME} = $xdg;

my $broker = start_broker(
	extra_conf => [
		'allow_anonymous false',
		"password_file $pwfile",
		"acl_file $aclfile",
	]);

# the broker really refuses strangers
{
	my ($out, $err) = ('', '');
	my @base = ('mosquitto_pub', '-h', '127.0.0.1', '-p', $broker->port, '-q', '1',
		'-t', "$prefix/x", '-m', 'x');
	my $anon = IPC::Run::run([ @base, '-u', '', '-P', '' ], '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout(10));
	ok(!$anon, 'broker: an empty user name is refused');
	my $wrong = IPC::Run::run([ @base, '-u', 'pgnode', '-P', $WRONG_PW ], '<', \undef, '>', \$out,
		'2>', \$err, IPC::Run::timeout(10));
	ok(!$wrong, 'broker: pgnode with a wrong password is refused');
	like($err, qr/not authori[sz]ed/i, 'broker: mosquitto_pub says "not authorised"');
	ok(IPC::Run::run([ @base, '-u', 'pgnode', '-P', $GOOD_PW ], '<', \undef, '>', \$out,
		'2>', \$err, IPC::Run::timeout(10)), 'broker: pgnode with its password is accepted');
}

my $sub = start_subscriber($broker, "$prefix/#");

# ---------------------------------------------------------------------------
# right credentials: end to end (A publishes with MQTT 3.1.1, B receives
# with MQTT 5)
# ---------------------------------------------------------------------------

my $setup = q{
CREATE EXTENSION pg_mqtt_emit;
CREATE TABLE auth_t(id int PRIMARY KEY, v text);
SELECT mqtt_emit.watch('auth_t');
CREATE TABLE got(id int, source text, origin text);
CREATE FUNCTION on_auth(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO got VALUES ((e.result->>'id')::int, e.source, e.origin);
END $$;
};

my $node_a = new_node(
	'a',
	broker                    => $broker,
	'mqtt_emit.username'      => 'pgnode',
	'mqtt_emit.password'      => $GOOD_PW,
	'mqtt_emit.reconnect_max' => '500ms');
my $node_b = new_node(
	'b',
	broker                    => $broker,
	'mqtt_emit.username'      => 'pgnode',
	'mqtt_emit.password'      => $GOOD_PW,
	'mqtt_emit.mqtt_version'  => '5',
	'mqtt_emit.reconnect_max' => '500ms');
sq($_, $setup) for $node_a, $node_b;
sq($node_b, q{SELECT mqtt_emit.listen('auth_t', 'on_auth(mqtt_emit.event)', allow_remote => true, remote_only => true)});

ok(wait_connected($node_a), 'A (3.1.1, right password): publisher connected');
ok(wait_connected($node_b), 'B (MQTT 5, right password): publisher connected');
ok(wait_connected($node_b, 'subscriber_connected'), 'B: subscriber connected');
ok(poll_until(sub { $broker->log =~ /\Q$node_b->{mqtt_emit}{client_id}\E-subscriber \d \Q$prefix\E\/auth_t\/#/ }, $T),
	'B: subscribed to <prefix>/auth_t/#');

sq($node_a, q{INSERT INTO auth_t VALUES (1, 'one')});
ok(poll_until(sub { sq($node_b, 'SELECT count(*) FROM got WHERE id = 1') eq '1' }, $T),
	'A\'s event ran B\'s remote listener');
is(sq($node_b, 'SELECT source || \' \' || origin FROM got WHERE id = 1'),
	"remote $node_a->{mqtt_emit}{client_id}", 'B: source remote, origin A');
sq($node_b, q{INSERT INTO auth_t VALUES (2, 'two')});
ok($sub->wait_for(sub { grep { $_->[0] eq "$prefix/auth_t/create" && $_->[1] =~ /"id":2\b/ } @_ }, $T),
	'B\'s event (MQTT 5) reached the test subscriber');
like($broker->log, qr/as \Q$node_a->{mqtt_emit}{client_id}\E \(.*u'pgnode'\)/,
	'broker log: A logged in as pgnode');

# ---------------------------------------------------------------------------
# ACL: a forbidden publish does not block the events after it
# ---------------------------------------------------------------------------

for my $n ([ 'A (MQTT 3.1.1)', $node_a, 10 ], [ 'B (MQTT 5)', $node_b, 20 ])
{
	my ($what, $node, $base) = @$n;
	my $pub0 = stat_of($node, 'published');
	sq($node, q{SELECT mqtt_emit.publish('forbidden/x', 'not for you')});
	sq($node, "INSERT INTO auth_t VALUES ($base + $_, 'after forbidden')") for 1 .. 3;
	ok( $sub->wait_for(
			sub {
				my %ids = map { $_->[1] =~ /"id":(\d+)/ ? ($1 => 1) : () }
				  grep { $_->[0] eq "$prefix/auth_t/create" } @_;
				return 3 == grep { $ids{ $base + $_ } } 1 .. 3;
			},
			$T),
		"$what: the three events after a forbidden publish are delivered");
	ok(poll_until(sub { stat_of($node, 'queued') == 0 && stat_of($node, 'in_outbox') == 0 }, $T),
		"$what: nothing stays queued or in the outbox");
	ok(stat_of($node, 'connected') eq 't', "$what: still connected");
	# the refused message is not sent again and again
	my $r1 = stat_of($node, 'retried');
	Time::HiRes::sleep(2);    # an interval to compare the counter over, not a wait
	my $r2 = stat_of($node, 'retried');
	is($r2, $r1, "$what: no retries going on 2 s later (retried $r1 -> $r2)");
	my %n;
	$n{$_}++ for map { $_->[1] =~ /"id":(\d+)/ ? ($1) : () }
	  grep { $_->[0] eq "$prefix/auth_t/create" } $sub->messages;
	is(join(',', map { $n{ $base + $_ } // 0 } 1 .. 3), '1,1,1',
		"$what: each event after the forbidden publish delivered once (no resend storm)");
	my $st = sq($node, 'SELECT published, failed, retried, dead_letters FROM mqtt_emit.stats');
	note("$what: published, failed, retried, dead_letters = $st (published before: $pub0)");
}
ok(!grep({ $_->[0] =~ m{^forbidden/} } $sub->messages), 'nothing was delivered on forbidden/x');
# (B stops here: if it is resending in a loop, that must not disturb the rest)
$node_b->stop;

# ---------------------------------------------------------------------------
# wrong password
# ---------------------------------------------------------------------------

my $node_c = new_node(
	'c',
	broker                    => $broker,
	'mqtt_emit.username'      => 'pgnode',
	'mqtt_emit.password'      => $WRONG_PW,
	'mqtt_emit.reconnect_max' => '500ms');
sq($node_c, $setup);
my $line;
ok( poll_until(
		sub {
			($line) = slurp_file($node_c->logfile) =~
			  /^(.*pg_mqtt_emit publisher cannot reach broker.*)$/m;
			defined $line;
		},
		$T),
	'wrong password: "cannot reach broker" in the server log');
note($line // '');
like($line // '', qr/not authori[sz]ed|bad user name or password|code [45]\b/i,
	'wrong password: the log line says why (not authorised)');
ok(!poll_until(sub { stat_of($node_c, 'connected') eq 't' }, 3, 0.1),
	'wrong password: stats.connected stays false');
my $err = stat_of($node_c, 'last_error');
like($err, qr/^(?:publisher|subscriber): .*(not authori[sz]ed|bad user name or password|code [45]\b)/i,
	"wrong password: last_error reports the refusal ($err)");
sq($node_c, q{INSERT INTO auth_t VALUES (100, 'waits for the password')});

# MQTT 5 (reason code in the CONNACK), still the wrong password
my $off = reload_and_wait($node_c, "mqtt_emit.mqtt_version = '5'\n");
ok( poll_until(
		sub {
			($line) = log_since($node_c, $off) =~
			  /^(.*pg_mqtt_emit publisher cannot reach broker.*)$/m;
			defined $line;
		},
		$T),
	'wrong password, MQTT 5: "cannot reach broker" in the server log');
note($line // '');
like($line // '', qr/not[ _]authori[sz]ed|bad user name or password/i,
	'wrong password, MQTT 5: the log line gives the reason');

# the operator fixes the password (postgresql.conf and a restart: the
# password is restart-only, so that no reload writes it to the server log)
$node_c->append_conf('postgresql.conf', "mqtt_emit.password = '$GOOD_PW'\n");
$node_c->restart;
ok(wait_connected($node_c), 'password fixed by restart: connected');
ok($sub->wait_for(sub { grep { $_->[1] =~ /"id":100\b/ } @_ }, $T),
	'the event written while the password was wrong is delivered');

# the password in the server logs
for my $n ([ 'A', $node_a ], [ 'B', $node_b ], [ 'C', $node_c ])
{
	my ($name, $node) = @$n;
	my $log = slurp_file($node->logfile);
	unlike($log, qr/\Q$WRONG_PW\E/, "node $name: the wrong password is not in the server log");
	my ($leak) = $log =~ /^(.*\Q$GOOD_PW\E.*)$/m;
	ok(!defined $leak, "node $name: the password is not in the server log")
	  or diag("leaked by: $leak");
}

$_->stop for $node_a, $node_c;
done_testing();
