#!/usr/bin/perl
#
# 064_dependency_order.pl: a transaction that read another's row is
# published after it (README "Delivery semantics": a transaction's place in
# the queue is fixed at PRE_COMMIT, before it becomes visible).
#
# Several sessions extend one chain: each transaction reads the highest id
# committed so far, without waiting for any lock, and inserts the next one
# (INSERT ... SELECT max(id) + 1 ... ON CONFLICT DO NOTHING); row k+1 is
# written only after row k became visible.  The create events of the chain
# must be published in id order, every id once:
#
#   plain:   8 sessions, the default queue;
#   spill:   4 sessions, a 64 kB queue and 4 kB events, so that most
#            transactions go through the outbox (with a marker or without);
#   outage:  4 sessions while the broker is stopped and started again.
#
# Counted: sent (rows committed), received, missing, duplicates, out of
# order.  The randomized test (050) covers the other transaction shapes.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use POSIX ();
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 180;

# broker with persistence: the outage phase stops and starts it, and the
# persistent test subscriber must get what was queued for it
my $broker = start_broker(persistent => 1, extra_conf => ['max_queued_messages 0']);

# Runs $sessions psql sessions, each making $per attempts to extend the
# chain in table $tbl (a pad of $pad characters per row); returns the pids.
sub start_writers
{
	my ($node, $tbl, $sessions, $per, $pad) = @_;
	my $dir = $PostgreSQL::Test::Utils::tmp_check;
	my @pids;
	for my $s (1 .. $sessions)
	{
		my $file = "$dir/${tbl}_$s.sql";
		open my $fh, '>', $file or die $!;
		print $fh <<"SQL";
DO \$\$
BEGIN
  FOR i IN 1..$per LOOP
    INSERT INTO $tbl (id, pad)
      SELECT coalesce(max(id), 0) + 1, repeat('p', $pad) FROM $tbl
      ON CONFLICT DO NOTHING;
    COMMIT;
  END LOOP;
END \$\$;
SQL
		close $fh;
		push @pids,
		  MqttEmitTest::_spawn(
			[
				'psql', '-X', '-q', '-h', $node->host, '-p', $node->port,
				'-d', 'postgres', '-v', 'ON_ERROR_STOP=1', '-f', $file
			],
			"$dir/${tbl}_$s.out", "$dir/${tbl}_$s.err");
	}
	return @pids;
}

sub wait_writers
{
	my ($label, @pids) = @_;
	my %status;
	my $done = poll_until(
		sub {
			for my $pid (@pids)
			{
				next if exists $status{$pid};
				$status{$pid} = $? >> 8 if waitpid($pid, POSIX::WNOHANG()) == $pid;
			}
			return keys %status == @pids;
		},
		$T);
	ok($done, "$label: the writers finished");
	is_deeply([ map { $status{$_} // 'running' } @pids ], [ (0) x @pids ],
		"$label: every writer committed its transactions");
}

# Every committed row's event arrives, once, in id order.
sub check_chain
{
	my ($label, $node, $sub, $tbl, $dup_max) = @_;
	$dup_max //= 0;
	my $n = $node->safe_psql('postgres', "SELECT count(*) FROM $tbl");
	is($node->safe_psql('postgres', "SELECT max(id) FROM $tbl"), $n,
		"$label: the chain has no gap ($n rows)");
	my @expected = (1 .. $n);
	my %want     = map { $_ => 1 } @expected;
	ok( poll_until(
			sub { scalar(grep { $want{$_} } arrived_ids($sub, $tbl)) >= $n },
			$T, 0.5),
		"$label: the events of the $n rows arrive");
	my $r = tally($label, [ arrived_ids($sub, $tbl) ], \@expected);
	is($r->{missing},    0, "$label: none missing");
	# after a lost connection what was not acknowledged is sent again
	# (at-least-once): at most the in-flight window twice
	cmp_ok($r->{duplicates}, '<=', $dup_max, "$label: at most $dup_max sent twice");
	is($r->{disorder},   0, "$label: published in the order the transactions read each other");
	return $n;
}

sub setup_node
{
	my ($name, $tbl, %conf) = @_;
	my $node = new_node($name, broker => $broker, %conf);
	$node->safe_psql(
		'postgres', qq{
		CREATE EXTENSION pg_mqtt_emit;
		CREATE TABLE $tbl (id int PRIMARY KEY, pad text NOT NULL);
		SELECT mqtt_emit.watch('$tbl');
	});
	ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
		"$name: worker connected");
	return $node;
}

# ---------------------------------------------------------------------------
# plain
# ---------------------------------------------------------------------------

my $plain = setup_node('plain', 'chain_plain');
my $sub_plain = start_subscriber($broker, topic_prefix() . '/chain_plain/#');
wait_writers('plain', start_writers($plain, 'chain_plain', 8, 1500, 0));
my $n = check_chain('plain', $plain, $sub_plain, 'chain_plain');
cmp_ok($n, '>=', 1500, 'plain: the sessions extended the chain');
$plain->stop('fast');

# ---------------------------------------------------------------------------
# spill
# ---------------------------------------------------------------------------

my $spill = setup_node('spill', 'chain_spill', 'mqtt_emit.queue_size' => '64kB');
my $sub_spill = start_subscriber($broker, topic_prefix() . '/chain_spill/#');
my $before = stats($spill);
wait_writers('spill', start_writers($spill, 'chain_spill', 4, 500, 2000));
check_chain('spill', $spill, $sub_spill, 'chain_spill');
my $after = stats($spill);
note 'spill: spilled ' . ($after->{spilled} - $before->{spilled})
  . ', enqueued ' . ($after->{enqueued} - $before->{enqueued});
cmp_ok($after->{spilled} - $before->{spilled}, '>', 0, 'spill: transactions went through the outbox');
$spill->stop('fast');

# ---------------------------------------------------------------------------
# outage
# ---------------------------------------------------------------------------

my $outage = setup_node(
	'outage', 'chain_outage',
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '500ms');
my $sub_outage = start_subscriber($broker, topic_prefix() . '/chain_outage/#',
	clean_session => 0, client_id => "chain-outage-$$");
# the broker goes before the writers start and comes back while they write:
# the chain goes into the outbox, and is published from there while it
# still grows
$broker->stop;
ok(poll_until(sub { my $s = stats($outage); $s && !$s->{connected} }, $T),
	'outage: the worker sees the broker go');
my @w = start_writers($outage, 'chain_outage', 4, 1500, 0);
ok( poll_until(
		sub { $outage->safe_psql('postgres', 'SELECT count(*) FROM chain_outage') >= 1000 },
		60, 0.05),
	'outage: the chain grows while the broker is away')
  or diag($outage->safe_psql('postgres',
	"SELECT string_agg(backend_type || ' ' || coalesce(wait_event_type || ':' || wait_event, 'running') || ' ' || left(query, 40), E'\\n') FROM pg_stat_activity"));
$broker->start;
wait_writers('outage', @w);
check_chain('outage', $outage, $sub_outage, 'chain_outage', 1000);
$outage->stop('fast');

done_testing();
