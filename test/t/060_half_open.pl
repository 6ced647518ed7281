#!/usr/bin/perl
#
# 060_half_open.pl: a broker that stops answering without closing the
# connection (frozen with SIGSTOP: the kernel keeps the TCP connection and
# accepts the writes) is noticed within about 1.5 x mqtt_emit.keepalive
# (doc/DESIGN.md 6), idle and under a write load; after SIGCONT everything
# committed in between arrives.
#
# paho 1.3.12 alone sends a PINGREQ once it has sent or received nothing
# for a keepalive interval, and gives up 1.5 intervals later without a
# PINGRESP: 1.5 to 2.5 intervals after the freeze when idle, about 2.5
# under a write load (measured here with keepalive 4 s: 10 s; issue 11 had
# 30 s and a 75 s freeze go unnoticed).  The worker's watchdog
# (src/broker.c) probes a quiet broker and gives the connection up 1.5
# intervals after the broker's last answer.  The bound asserted is 1.5 x
# keepalive + 2 s of slack: under load paho alone misses it; idle it may
# meet it by luck.
#
# Checked, with mqtt_emit.keepalive = 4s:
#   - a healthy idle connection stays up for 3 keepalive intervals (the
#     watchdog's probes are answered; no reconnection)
#   - idle, broker frozen: stats.connected and subscriber_connected turn
#     false within the bound (measured, printed); the log says why
#   - SIGCONT: both reconnect; a remote message runs the listener again (the
#     subscriber subscribed again on its new connection)
#   - a writer committing one row every 10 ms, broker frozen: connected
#     turns false within the same bound while the writer goes on; after
#     SIGCONT every event arrives (none missing), in commit order
use strict;
use warnings;

use IPC::Run ();
use Time::HiRes ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $T         = 60;
my $KEEPALIVE = 4;
my $BOUND     = 1.5 * $KEEPALIVE + 2;    # the requirement: ~1.5 x keepalive
my $prefix    = topic_prefix();

my $broker = start_broker(name => 'frozen');

# Whatever happens, never leave the broker stopped.
my $frozen = 0;
END { kill 'CONT', $broker->pid if $frozen && $broker && $broker->pid; }

sub freeze { ok(kill('STOP', $broker->pid), 'SIGSTOP to mosquitto ' . $broker->pid); $frozen = 1; }
sub thaw   { ok(kill('CONT', $broker->pid), 'SIGCONT to mosquitto'); $frozen = 0; }

my $node = new_node(
	'halfopen',
	broker                    => $broker,
	'mqtt_emit.keepalive'     => "${KEEPALIVE}s",
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
$node->safe_psql('postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE ev (id bigint PRIMARY KEY, phase text);
	CREATE SEQUENCE ev_seq;
	SELECT mqtt_emit.watch('ev');
	CREATE TABLE ctl (stop boolean);
	INSERT INTO ctl VALUES (false);
	CREATE PROCEDURE writer(p text, max_rows int, delay float8) LANGUAGE plpgsql AS $$
	DECLARE i int := 0;
	BEGIN
		WHILE i < max_rows AND NOT (SELECT stop FROM ctl) LOOP
			INSERT INTO ev VALUES (nextval('ev_seq'), p);
			COMMIT;
			PERFORM pg_sleep(delay);
			i := i + 1;
		END LOOP;
	END $$;
	CREATE TABLE got (id int);
	CREATE FUNCTION on_remote(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO got VALUES ((e.result->>'id')::int);
	END $$;
	SELECT mqtt_emit.listen('remote_t', 'on_remote(mqtt_emit.event)', allow_remote => true, remote_only => true);
});

# a persistent session: it keeps what arrives while it is away, if ever
my $sub = start_subscriber($broker, "$prefix/#", clean_session => 0, client_id => "halfopen-sub-$$");

sub stat_of
{
	my ($col) = @_;
	my ($rc, $out) = $node->psql('postgres', "SELECT $col FROM mqtt_emit.stats");
	return $rc == 0 ? $out : undef;
}

sub sq { return $node->safe_psql('postgres', $_[0]); }

# Seconds until $col of mqtt_emit.stats is $want, or undef after $timeout.
sub time_until
{
	my ($col, $want, $t0, $timeout) = @_;
	my $at;
	poll_until(
		sub {
			return 0 unless (stat_of($col) // '') eq $want;
			$at = Time::HiRes::time();
			return 1;
		},
		$timeout, 0.02);
	return defined $at ? $at - $t0 : undef;
}

my $remote_n = 0;

# A message from outside for the remote listener; true when it ran.
sub remote_roundtrip
{
	my $id = ++$remote_n;
	my $payload = qq({"model":"remote_t","operation":"create","args":{"data":{"id":$id}},)
	  . qq("result":{"id":$id},"timestamp":"2026-01-01T00:00:00.000Z","eventId":"halfopen-$$-$id"});
	return poll_until(
		sub {
			mqtt_pub($broker, "$prefix/remote_t/create", $payload);
			return sq("SELECT count(*) FROM got WHERE id = $id") > 0;
		},
		$T, 0.5);
}

ok(poll_until(sub { (stat_of('connected') // '') eq 't' }, $T), 'publisher connected');
ok(poll_until(sub { (stat_of('subscriber_connected') // '') eq 't' }, $T), 'subscriber connected');
ok($broker->wait_for_subscription($node->{mqtt_emit}{client_id} . '-subscriber', "$prefix/remote_t/#", $T),
	'subscribed to the remote model');
ok(remote_roundtrip(), 'a remote message runs the listener');

# --- a healthy idle connection stays up ---------------------------------------

my $connects0 = stat_of('connects');
my $log_off = -s $node->logfile;
my $stayed = !poll_until(
	sub {
		(stat_of('connected') // '') ne 't' || (stat_of('subscriber_connected') // '') ne 't'
		  || stat_of('connects') ne $connects0;
	},
	3 * $KEEPALIVE, 0.1);
ok($stayed, "healthy idle broker: both connections stay up for 3 x keepalive (${\ (3 * $KEEPALIVE)} s)");
unlike(slurp_file($node->logfile, $log_off), qr/no answer from the broker/,
	'healthy idle broker: the watchdog gave nothing up');

# --- idle, broker frozen -------------------------------------------------------

$log_off = -s $node->logfile;
freeze();
my $t0 = Time::HiRes::time();
my $dt_pub = time_until('connected', 'f', $t0, 30);
my $dt_sub = time_until('subscriber_connected', 'f', $t0, 30);
diag(sprintf('idle, broker frozen: publisher lost after %s s, subscriber after %s s (keepalive %d s, bound %.1f s)',
	map({ defined $_ ? sprintf('%.2f', $_) : 'never' } $dt_pub, $dt_sub), $KEEPALIVE, $BOUND));
ok(defined $dt_pub && $dt_pub <= $BOUND, "idle: stats.connected false within $BOUND s");
ok(defined $dt_sub && $dt_sub <= $BOUND, "idle: stats.subscriber_connected false within $BOUND s");
like(slurp_file($node->logfile, $log_off),
	qr/publisher cannot reach broker .*no answer from the broker for [\d.]+ s \(mqtt_emit\.keepalive is $KEEPALIVE s\)/,
	'idle: the log says the broker did not answer');
sq(q{INSERT INTO ev SELECT nextval('ev_seq'), 'idle' FROM generate_series(1, 20)});
thaw();
ok(poll_until(sub { (stat_of('connected') // '') eq 't' }, $T), 'idle: publisher connected again after SIGCONT');
ok(poll_until(sub { (stat_of('subscriber_connected') // '') eq 't' }, $T), 'idle: subscriber connected again');
ok(remote_roundtrip(), 'idle: the remote listener runs again (subscribed on the new connection)');
my @idle = split /\n/, sq(q{SELECT id FROM ev WHERE phase = 'idle' ORDER BY id});
ok(poll_until(sub { my %a = map { $_ => 1 } arrived_ids($sub, 'ev'); !grep { !$a{$_} } @idle }, $T),
	'idle: the events committed while frozen arrive');

# --- under a write load, broker frozen -----------------------------------------

my ($wout, $werr) = ('', '');
my $writer = IPC::Run::start(
	[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
	  '-c', "CALL writer('load', 20000, 0.01)" ],
	'<', \undef, '>', \$wout, '2>', \$werr, IPC::Run::timeout(180));
my $pub0 = stat_of('published');
ok(poll_until(sub { stat_of('published') >= $pub0 + 100 }, $T), 'load: events flowing');
$log_off = -s $node->logfile;
freeze();
$t0 = Time::HiRes::time();
my $at_freeze = sq(q{SELECT count(*) FROM ev WHERE phase = 'load'});
my $dt_load = time_until('connected', 'f', $t0, 30);
my $during = sq(q{SELECT count(*) FROM ev WHERE phase = 'load'}) - $at_freeze;
diag(sprintf('load, broker frozen: publisher lost after %s s (keepalive %d s, bound %.1f s); %d rows committed meanwhile',
	defined $dt_load ? sprintf('%.2f', $dt_load) : 'never', $KEEPALIVE, $BOUND, $during));
ok(defined $dt_load && $dt_load <= $BOUND, "load: stats.connected false within $BOUND s");
ok($during > 0, 'load: the writer kept committing while the broker was frozen');
like(slurp_file($node->logfile, $log_off), qr/no answer from the broker for [\d.]+ s/,
	'load: the log says the broker did not answer');
thaw();
ok(poll_until(sub { (stat_of('connected') // '') eq 't' }, $T), 'load: connected again after SIGCONT');
my $pub1 = stat_of('published');
ok(poll_until(sub { stat_of('published') >= $pub1 + 100 }, $T), 'load: events flowing again');
sq('UPDATE ctl SET stop = true');
ok(eval { $writer->finish; 1 } && $writer->result == 0, 'load: every commit succeeded') or diag($werr);

my @load = split /\n/, sq(q{SELECT id FROM ev WHERE phase = 'load' ORDER BY id});
my %is_load = map { $_ => 1 } @load;
ok(poll_until(sub { my %a = map { $_ => 1 } arrived_ids($sub, 'ev'); !grep { !$a{$_} } @load }, $T),
	sprintf('load: all %d events arrive', scalar @load));
my $r = tally('load across a frozen broker', [ grep { $is_load{$_} } arrived_ids($sub, 'ev') ], \@load);
is($r->{missing}, 0, 'load: none missing');
is($r->{disorder}, 0, 'load: first arrivals in commit order');
note('stats: ' . sq('SELECT row_to_json(s) FROM mqtt_emit.stats s'));

$node->stop;
done_testing();
