#!/usr/bin/perl
#
# 012_worker_faults.pl: the worker under faults (DESIGN.md sections 4 and 6).
#   - kill -9 of the worker: the postmaster restarts it and it keeps publishing
#   - broker stop/start on the same port: commits succeed while it is down,
#     stats.connected goes false then true, and every event committed during
#     the outage arrives afterwards, in commit order
#   - the same, with the worker killed (-9) while the broker is away
#   - SIGHUP with a new mqtt_emit.broker_url: the worker moves to the new
#     broker, and no event committed around the switch is lost
#   - pg_ctl stop -m fast: clean shutdown ("pg_mqtt_emit worker shutting
#     down"), and events committed just before it are published after the
#     next start
#   - pg_terminate_backend() of the worker: it comes back
#
# The subscriber on the first broker uses a persistent session (mosquitto_sub
# -c, broker persistence on): after a broker restart the worker may reconnect
# before mosquitto_sub does, and the broker must then keep the messages for
# it.  That way "arrived" measures the extension, not a race between two
# clients reconnecting.
use strict;
use warnings;

use File::Temp ();
use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $TIMEOUT = 60;
my $JSON    = JSON::PP->new->utf8;

# --- a mosquitto_sub with a persistent session (-c) -------------------------
{

	package PersistentSubscriber;
	our @ISA = ('MqttEmitTest::Subscriber');

	sub _start
	{
		my ($self) = @_;
		my @cmd = (
			'mosquitto_sub', '-h', '127.0.0.1', '-p', $self->{port},
			'-i', $self->{client_id}, '-c', '-q', $self->{qos},
			'-F', '%x\t%q\t%r\t%t',
			(map { ('-t', $_) } @{ $self->{filters} }),
			'-t', $self->{probe_topic});
		open my $fh, '>', $self->{file} or die "cannot create $self->{file}: $!";
		close $fh;
		$self->{pid} = MqttEmitTest::_spawn(\@cmd, $self->{file}, $self->{errfile});
		MqttEmitTest::_register($self);
		die "persistent mosquitto_sub never received its probe\n"
		  unless $self->wait_ready;
		return $self;
	}
}

my $prefix  = topic_prefix();
my $persist = File::Temp::tempdir('mosquitto_db_XXXX',
	DIR => $PostgreSQL::Test::Utils::tmp_check, CLEANUP => 1);
my $broker = start_broker(
	name       => 'main',
	extra_conf => [
		'persistence true', "persistence_location $persist/",
		'max_queued_messages 0',
	]);
my $node = new_node(
	'faults',
	broker                     => $broker,
	restart_after_crash        => 'on',    # PostgreSQL::Test::Cluster turns it off
	'mqtt_emit.reconnect_min'  => '100ms',
	'mqtt_emit.reconnect_max'  => '1s');
$node->safe_psql('postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE ev (id int PRIMARY KEY, phase text);
	SELECT mqtt_emit.watch('ev');
});

my $sub = PersistentSubscriber->_new($broker, "$prefix/#",
	client_id => "faults-sub-$$");
$sub->_start;

# --- helpers ----------------------------------------------------------------

# One value from the node, or undef while it does not answer (restarting).
sub try_query
{
	my ($sql) = @_;
	my ($rc, $out) = $node->psql('postgres', $sql);
	return $rc == 0 ? $out : undef;
}

sub stat_of
{
	my ($col) = @_;
	return try_query("SELECT $col FROM mqtt_emit.stats");
}

sub wait_connected
{
	my ($want) = @_;
	return poll_until(sub { (stat_of('connected') // '') eq $want }, $TIMEOUT, 0.05);
}

my $next_id = 0;

# Commit $n rows of a phase, $per rows per transaction (one psql call each);
# returns the ids in commit order.
sub commit_rows
{
	my ($phase, $n, $per) = @_;
	my @ids;
	while (@ids < $n)
	{
		my $k = $n - @ids < $per ? $n - @ids : $per;
		my ($from, $to) = ($next_id + 1, $next_id + $k);
		$node->safe_psql('postgres',
			"INSERT INTO ev SELECT g, '$phase' FROM generate_series($from, $to) g");
		push @ids, $from .. $to;
		$next_id = $to;
	}
	return @ids;
}

# Ids of a phase's events received by a subscriber, in arrival order.
sub arrived
{
	my ($s, $phase) = @_;
	my @ids;
	for my $r ($s->records)
	{
		next unless index($r->{payload}, qq{"$phase"}) >= 0;
		my $d = eval { $JSON->decode($r->{payload}) };
		next unless ref $d eq 'HASH' && ref $d->{result} eq 'HASH';
		push @ids, $d->{result}{id} if ($d->{result}{phase} // '') eq $phase;
	}
	return @ids;
}

sub wait_phase
{
	my ($subs, $phase, $ids, $timeout) = @_;
	my %want = map { $_ => 1 } @$ids;
	return poll_until(
		sub {
			my %got = map { $_ => 1 } map { arrived($_, $phase) } @$subs;
			return !grep { !$got{$_} } keys %want;
		},
		$timeout // $TIMEOUT, 0.1);
}

# Check a phase: nothing missing, first arrivals in commit order; notes counts.
sub check_phase
{
	my ($what, $subs, $phase, $ids) = @_;
	my @got = map { arrived($_, $phase) } @$subs;
	my (%seen, @first);
	for (@got) { push @first, $_ unless $seen{$_}++; }
	my $missing = grep { !$seen{$_} } @$ids;
	my $dups    = @got - keys %seen;
	note(sprintf('%s: sent %d, received %d, missing %d, duplicates %d',
		$what, scalar @$ids, scalar @got, $missing, $dups));
	is($missing, 0, "$what: no event missing");
	is_deeply(\@first, $ids, "$what: events arrive in commit order")
	  if @$subs == 1;
	return;
}

sub worker_pid
{
	return stat_of('worker_pid');
}

# Wait until a worker runs whose pid differs from $old, and is connected.
sub wait_new_worker
{
	my ($old, $timeout) = @_;
	return poll_until(
		sub {
			my $pid = worker_pid();
			return defined $pid && $pid ne '' && $pid ne $old
			  && (stat_of('connected') // '') eq 't';
		},
		$timeout // $TIMEOUT, 0.1);
}

# --- basics -----------------------------------------------------------------

ok(wait_connected('t'), 'worker connected');
my @ids = commit_rows('start', 20, 10);
ok(wait_phase([$sub], 'start', \@ids), 'events published');
check_phase('start', [$sub], 'start', \@ids);

my $wpid = worker_pid();
like($wpid, qr/^\d+$/, "stats.worker_pid is set ($wpid)");
is( $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit'"),
	$wpid, 'pg_stat_activity shows the worker with the same pid');

# --- kill -9 of the worker --------------------------------------------------

my $log_off = -s $node->logfile;
ok(kill('KILL', $wpid), "kill -9 worker $wpid");
ok(wait_new_worker($wpid), 'a new worker runs and is connected after kill -9');
my $new_wpid = worker_pid() // '';
note("worker after kill -9: $new_wpid");
like(slurp_file($node->logfile, $log_off), qr/terminated by signal 9/,
	'server log: worker terminated by signal 9');
@ids = commit_rows('after_kill', 50, 10);
ok(wait_phase([$sub], 'after_kill', \@ids), 'publishing goes on after kill -9');
check_phase('after kill -9', [$sub], 'after_kill', \@ids);

# --- broker stop/start on the same port ------------------------------------

my $port = $broker->port;
$broker->stop;
ok(wait_connected('f'), 'stats.connected goes false when the broker stops');
my @outage;
my $ok = eval { @outage = commit_rows('outage', 300, 20); 1 };
ok($ok, 'commits succeed while the broker is down (15 transactions)') or diag($@);
is(scalar(() = arrived($sub, 'outage')), 0, 'nothing arrived while the broker is down');
note('while down: ' . (try_query(
	'SELECT format($$queued %s, in_outbox %s, last_error %s$$, queued, in_outbox, last_error) FROM mqtt_emit.stats') // '?'));
$broker->start;
is($broker->port, $port, 'broker back on the same port');
ok(wait_connected('t'), 'stats.connected goes true when the broker is back');
ok($sub->wait_ready($TIMEOUT), 'subscriber reconnected');
ok(wait_phase([$sub], 'outage', \@outage), 'events committed during the outage arrive');
check_phase('broker outage', [$sub], 'outage', \@outage);

# --- broker away and the worker killed: the events still arrive -------------

$broker->stop;
ok(wait_connected('f'), 'broker stopped again');
my @outage2 = commit_rows('outage2', 100, 10);
ok( poll_until(sub { (stat_of('in_outbox') // 0) >= 100 }, $TIMEOUT, 0.1),
	'while the broker is away the events wait in the outbox table')
  or note('stats: ' . (try_query('SELECT row_to_json(s) FROM mqtt_emit.stats s') // '?'));
$wpid = worker_pid();
ok(kill('KILL', $wpid), "kill -9 worker $wpid while the broker is away");
ok( poll_until(
		sub {
			my $pid = worker_pid();
			return defined $pid && $pid ne '' && $pid ne $wpid;
		},
		$TIMEOUT, 0.1),
	'a new worker runs');
$broker->start;
ok(wait_connected('t'), 'connected again');
ok($sub->wait_ready($TIMEOUT), 'subscriber reconnected');
ok(wait_phase([$sub], 'outage2', \@outage2),
	'events committed before the crash arrive after it');
check_phase('broker away + kill -9', [$sub], 'outage2', \@outage2);

# --- SIGHUP with a new broker_url --------------------------------------------

my $broker2 = start_broker(name => 'second');
my $sub2    = start_subscriber($broker2, "$prefix/#");
my @switch  = commit_rows('switch', 200, 50);
$log_off = -s $node->logfile;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET mqtt_emit.broker_url = '" . $broker2->url . "'; SELECT pg_reload_conf()");
my @probe;
ok( poll_until(
		sub {
			push @probe, commit_rows('probe', 1, 1);
			return poll_until(sub { scalar arrived($sub2, 'probe') }, 0.5, 0.05);
		},
		$TIMEOUT, 0.05),
	'after SIGHUP the worker publishes to the new broker');
like(slurp_file($node->logfile, $log_off), qr/reconnecting to "\Q${\ $broker2->url}\E"/,
	'server log: reconnecting to the new broker');
ok(wait_connected('t'), 'connected to the new broker');
ok(wait_phase([ $sub, $sub2 ], 'switch', \@switch),
	'events committed just before the switch arrive (on either broker)');
check_phase('around the switch', [ $sub, $sub2 ], 'switch', \@switch);

my @on2 = commit_rows('on2', 50, 10);
ok(wait_phase([$sub2], 'on2', \@on2), 'events after the switch arrive at the new broker');
check_phase('after the switch', [$sub2], 'on2', \@on2);
# the old broker gets none: a message published to it directly afterwards
# arrives, and nothing of the phase before it
ok(mqtt_pub($broker, "$prefix/direct", 'old broker marker'), 'marker to the old broker');
ok($sub->wait_for(sub { grep { $_->[0] eq "$prefix/direct" } @_ }, $TIMEOUT),
	'old broker marker arrived');
is(scalar(() = arrived($sub, 'on2')), 0, 'the old broker got nothing after the switch');

# --- pg_ctl stop -m fast ------------------------------------------------------

# one big transaction right before the stop, so that some of it is likely
# still queued or in flight when the worker gets SIGTERM
my @before_stop = commit_rows('before_stop', 3000, 3000);
$log_off = -s $node->logfile;
$wpid    = worker_pid();
$node->stop('fast');
my $stoplog = slurp_file($node->logfile, $log_off);
like($stoplog, qr/pg_mqtt_emit worker shutting down/,
	'server log: pg_mqtt_emit worker shutting down');
like($stoplog, qr/database system is shut down/, 'clean shutdown');
ok(!kill(0, $wpid), 'the worker process is gone');
$node->start;
ok(wait_connected('t'), 'worker connected after the start');
ok(wait_phase([$sub2], 'before_stop', \@before_stop),
	'events committed just before a fast shutdown are published');
check_phase('fast shutdown', [$sub2], 'before_stop', \@before_stop);

# --- pg_terminate_backend() of the worker -------------------------------------

$wpid = worker_pid();
is($node->safe_psql('postgres', "SELECT pg_terminate_backend($wpid)"), 't',
	'pg_terminate_backend(worker)');
# bgw_restart_time is 1 s: 15 s is plenty
ok(wait_new_worker($wpid, 15), 'the worker comes back after pg_terminate_backend()')
  or note('stats: ' . (try_query('SELECT row_to_json(s) FROM mqtt_emit.stats s') // '?'));
my @after_term = commit_rows('after_term', 20, 10);
ok(wait_phase([$sub2], 'after_term', \@after_term, 15),
	'publishing goes on after pg_terminate_backend()');

done_testing();
