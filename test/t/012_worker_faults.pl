#!/usr/bin/perl
#
# 012_worker_faults.pl: the worker under faults (doc/DESIGN.md sections 4 and 6).
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
#   - a transaction larger than the whole queue (64 kB) spills, in order
#   - a message the broker refuses (over its max_packet_size) ends in
#     mqtt_emit.dead_letters and does not hold back or reorder the others
#   - pg_terminate_backend() of the worker: it comes back
#
# The subscriber on the first broker uses a persistent session (mosquitto_sub
# -c, broker persistence on): after a broker restart the worker may reconnect
# before mosquitto_sub does, and the broker must then keep the messages for
# it.  That way "arrived" measures the extension, not a race between two
# clients reconnecting.
use strict;
use warnings;

use IPC::Run ();
use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $TIMEOUT = 60;
my $JSON    = JSON::PP->new->utf8;

my $prefix  = topic_prefix();
my $broker = start_broker(
	name       => 'main',
	persistent => 1,
	extra_conf => ['max_queued_messages 0']);
my $node = new_node(
	'faults',
	broker                     => $broker,
	restart_after_crash        => 'on',    # PostgreSQL::Test::Cluster turns it off
	'mqtt_emit.reconnect_min'  => '100ms',
	'mqtt_emit.reconnect_max'  => '1s');
$node->safe_psql('postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE ev (id int PRIMARY KEY, phase text, pad text);
	SELECT mqtt_emit.watch('ev');
});

# a persistent session (-c): it gets what was published while it was away
my $sub = start_subscriber($broker, "$prefix/#",
	clean_session => 0, client_id => "faults-sub-$$");

# --- helpers ----------------------------------------------------------------

# One value from a node (default: the main one), or undef while it does not
# answer (restarting).
sub try_query
{
	my ($sql, $n) = @_;
	my ($rc, $out) = ($n // $node)->psql('postgres', $sql);
	return $rc == 0 ? $out : undef;
}

sub stat_of
{
	my ($col, $n) = @_;
	return try_query("SELECT $col FROM mqtt_emit.stats", $n);
}

sub wait_connected
{
	my ($want, $n) = @_;
	return poll_until(sub { (stat_of('connected', $n) // '') eq $want }, $TIMEOUT, 0.05);
}

my $next_id = 0;

# Commit $n rows of a phase, $per rows per transaction; returns the ids in
# commit order.  All transactions go through one psql call, or one call each
# with separate => 1 (to space them out).  node => another node, pad => bytes
# of padding per row.
sub commit_rows
{
	my ($phase, $n, $per, %o) = @_;
	my $pad = $o{pad} // 0;
	my (@ids, @sql);
	while (@ids < $n)
	{
		my $k = $n - @ids < $per ? $n - @ids : $per;
		my ($from, $to) = ($next_id + 1, $next_id + $k);
		push @sql,
		  "INSERT INTO ev SELECT g, '$phase', repeat('x', $pad) FROM generate_series($from, $to) g;\n";
		push @ids, $from .. $to;
		$next_id = $to;
	}
	my $n_node = $o{node} // $node;
	if ($o{separate})
	{
		$n_node->safe_psql('postgres', $_) for @sql;
	}
	else
	{
		$n_node->safe_psql('postgres', join('', @sql));
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
	if (@$subs == 1)
	{
		is_deeply(\@first, $ids, "$what: events arrive in commit order")
		  or diag("arrival order: @got");
	}
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

# --- a writer that keeps committing across a broker restart ------------------

# One session, one row per transaction (so commit order is id order), paced
# so that it spans the restart.
my @stream = ($next_id + 1 .. $next_id + 600);
$next_id += 600;
my $wsql = join '',
  map { "INSERT INTO ev VALUES ($_, 'stream'); SELECT pg_sleep(0.005);\n" } @stream;
my $wfile = "$PostgreSQL::Test::Utils::tmp_check/stream_$$.sql";
PostgreSQL::Test::Utils::append_to_file($wfile, $wsql);
my ($wout, $werr) = ('', '');
my $writer = IPC::Run::start(
	[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-f', $wfile ],
	'<', \undef, '>', \$wout, '2>', \$werr, IPC::Run::timeout($TIMEOUT));
ok(poll_until(sub { scalar(() = arrived($sub, 'stream')) >= 50 }, $TIMEOUT, 0.05),
	'stream: events flowing');
$broker->stop;
ok(wait_connected('f'), 'stream: broker stopped under load');
my $at_stop = try_query(q{SELECT count(*) FROM ev WHERE phase = 'stream'}) // 0;
ok( poll_until(
		sub { (try_query(q{SELECT count(*) FROM ev WHERE phase = 'stream'}) // 0) >= $at_stop + 50 },
		$TIMEOUT, 0.05),
	'stream: commits go on while the broker is down');
$broker->start;
ok(wait_connected('t'), 'stream: connected again');
ok($sub->wait_ready($TIMEOUT), 'stream: subscriber reconnected');
ok(eval { $writer->finish; 1 } && $writer->result == 0, 'stream: every commit succeeded')
  or diag($werr);
ok(wait_phase([$sub], 'stream', \@stream), 'stream: all events arrive');
check_phase('stream across a broker restart', [$sub], 'stream', \@stream);

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

# the second broker refuses packets over 20 kB (used at the end)
my $broker2 = start_broker(name => 'second', extra_conf => ['max_packet_size 20000']);
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
# restart with the smallest queue (64 kB), for the overflow test below
$node->append_conf('postgresql.conf', "mqtt_emit.queue_size = '64kB'");
$node->start;
ok(wait_connected('t'), 'worker connected after the start');
ok(wait_phase([$sub2], 'before_stop', \@before_stop),
	'events committed just before a fast shutdown are published');
check_phase('fast shutdown', [$sub2], 'before_stop', \@before_stop);

# --- a small queue, and a message the broker refuses ---------------------------

# The node now has the smallest queue (64 kB) and is on the second broker,
# which refuses packets over 20 kB.
is($node->safe_psql('postgres', 'SELECT queue_capacity FROM mqtt_emit.stats'), 65536,
	'queue of 64 kB');

# transactions larger than the whole queue, between small ones
my @spill;
push @spill, commit_rows('spill', 10,  5);
push @spill, commit_rows('spill', 600, 600, pad => 200);
push @spill, commit_rows('spill', 10,  2);
push @spill, commit_rows('spill', 600, 600, pad => 200);
push @spill, commit_rows('spill', 10,  5);
ok(wait_phase([$sub2], 'spill', \@spill), 'queue overflow: every event arrives');
check_phase('queue overflow (64 kB queue, 1220 events)', [$sub2], 'spill', \@spill);
note('node: ' . (try_query(
	'SELECT format($$spilled %s, dropped %s, enqueued %s$$, spilled, dropped, enqueued) FROM mqtt_emit.stats',
	$node) // '?'));

# One event over the broker's maximum packet size, between ordinary ones
# committed one per transaction while the worker reconnects: the broker
# closes the connection whenever it gets the big one, and what the worker
# sent behind it is lost with the connection.  Three rounds, since what is
# in flight at each disconnection depends on timing.
for my $round (1 .. 3)
{
	my $phase = "oversize$round";
	my @ov = commit_rows($phase, 5, 1, separate => 1);
	my ($huge) = commit_rows($phase, 1, 1, pad => 30000);
	push @ov, commit_rows($phase, 50, 1);
	push @ov, commit_rows($phase, 5, 1, separate => 1);
	ok(wait_phase([$sub2], $phase, \@ov),
		"$phase: a message the broker refuses does not hold back the events behind it");
	check_phase("$phase: around a refused message", [$sub2], $phase, \@ov);
	is(scalar(grep { $_ == $huge } arrived($sub2, $phase)), 0,
		"$phase: the refused message did not arrive");
	ok( poll_until(
			sub {
				(try_query(qq{SELECT count(*) FROM mqtt_emit.dead_letters
					WHERE payload LIKE '%"id":$huge,%'}, $node) // 0) == 1;
			},
			$TIMEOUT, 0.1),
		"$phase: the refused message is kept in mqtt_emit.dead_letters");
}
note('node: ' . (try_query(
	'SELECT format($$dead_letters %s, retried %s, connects %s$$, dead_letters, retried, connects) FROM mqtt_emit.stats',
	$node) // '?'));

# --- pg_terminate_backend() of the worker -------------------------------------

$wpid = worker_pid();
is($node->safe_psql('postgres', "SELECT pg_terminate_backend($wpid)"), 't',
	'pg_terminate_backend(worker)');
# bgw_restart_time is 1 s: 15 s is plenty
my $back = wait_new_worker($wpid, 15);
ok($back, 'the worker comes back after pg_terminate_backend()')
  or note('stats: ' . (try_query('SELECT row_to_json(s) FROM mqtt_emit.stats s') // '?'));
my @after_term = commit_rows('after_term', 20, 10);
if ($back)
{
	ok(wait_phase([$sub2], 'after_term', \@after_term, 15),
		'publishing goes on after pg_terminate_backend()');
}
else
{
	fail('publishing goes on after pg_terminate_backend(): no worker runs');
}

done_testing();
