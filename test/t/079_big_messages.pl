#!/usr/bin/perl
#
# 079_big_messages.pl: messages far larger than the publisher's byte window
# (1 MB of unacknowledged payload, src/inflight.c) and than the socket
# buffers, through the queue and through the outbox, with a real broker
# and nothing between them:
#
# - batched transactions in parts of the default 256 kB
#   (mqtt_emit.batch_max_bytes), about 6 MB each: every part of every
#   transaction arrives, parts 1..n, the rows in commit order;
# - single events of about 200 kB each (a 100 kB column, twice in the event):
#   every one arrives, in commit order;
# - the same while the broker is down: the events wait in the outbox (where
#   the worker reads only as many rows as the byte window has room for) and
#   all arrive when it is back (persistent subscriber sessions);
# - counts: sent, received, missing, duplicates, out of order (at-least-once:
#   duplicates are reported, missing and out-of-order events fail).
#
# How fast they arrive (the 1 s stalls of paho's cut-short writes that the
# byte window and the nudge remove) is measured in bench/ (bench/README.md,
# "session 9"), not here.
use strict;
use warnings;

use JSON::PP ();
use MqttEmitTest qw(:DEFAULT stats stat_of tally arrived_ids);
use PostgreSQL::Test::Utils;
use Test::More;

my $T    = 180;
my $JSON = JSON::PP->new->utf8;
my $P    = topic_prefix();
my $BP   = "$P-batch";

my $broker = start_broker(persistent => 1);
my $node = new_node(
	'big',
	broker                         => $broker,
	'mqtt_emit.batch_topic_prefix' => $BP,
	'mqtt_emit.queue_size'         => '64MB',
	'mqtt_emit.reconnect_min'      => '100ms',
	'mqtt_emit.reconnect_max'      => '1s');
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE bb (id int PRIMARY KEY, v text NOT NULL);
	CREATE TABLE bs (id int PRIMARY KEY, v text NOT NULL);
	SELECT mqtt_emit.watch('bb', batch => true);
	SELECT mqtt_emit.watch('bs');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T), 'connected');

my $bsub = start_subscriber($broker, "$BP/#", clean_session => 0, client_id => "big-b-$$");
my $ssub = start_subscriber($broker, "$P/bs/#", clean_session => 0, client_id => "big-s-$$");

my (@bsent, @ssent);
my ($bnext, $snext) = (1, 1);

# one transaction of $n rows of bb, each with a $pad-byte column
sub batch_tx
{
	my ($n, $pad) = @_;
	my ($a, $z) = ($bnext, $bnext + $n - 1);
	$node->safe_psql('postgres',
		"INSERT INTO bb SELECT i, repeat('b', $pad) FROM generate_series($a, $z) i");
	push @bsent, $a .. $z;
	$bnext = $z + 1;
}

# $n transactions of one bs row each, with a $pad-byte column
sub single_txs
{
	my ($n, $pad) = @_;
	my $a = $snext;
	$node->safe_psql('postgres', qq{
		DO \$\$ BEGIN
		FOR i IN $a..$a + $n - 1 LOOP
			INSERT INTO bs VALUES (i, repeat('s', $pad));
			COMMIT;
		END LOOP; END \$\$});
	push @ssent, $a .. $a + $n - 1;
	$snext = $a + $n;
}

# The batch parts received, in arrival order: read from the subscriber's
# file incrementally (about 50 MB of hex by the end), the fields taken with
# regexes (JSON::PP would take minutes for that much); one part in 20 is
# also decoded whole, which must agree.
my %bst = (off => 0, parts => []);

sub parts
{
	open my $fh, '<', $bsub->file or return @{ $bst{parts} };
	my $size = -s $fh;
	seek $fh, $bst{off}, 0;
	while ($bst{off} < $size && defined(my $line = <$fh>))
	{
		last unless $line =~ s/\n\z//;    # being written: next time
		$bst{off} += length($line) + 1;
		my ($hex, $qos, $retain, $topic) = split /\t/, $line, 4;
		next unless defined $topic && $topic eq "$BP/bb/batch";
		my $payload = pack('H*', $hex);
		my %m = (_bytes => length $payload);
		if ($payload =~ /\A\{"model":"bb","transactionId":"([^"]+)","part":(\d+),"parts":(\d+),"count":(\d+),/)
		{
			@m{qw(transactionId part parts count)} = ($1, $2, $3, $4);
			$m{ids} = [ $payload =~ /"result":\{"id":(\d+),/g ];
			$m{bad} = 1 unless $payload =~ /\]\}\z/ && @{ $m{ids} } == $m{count};
			if (@{ $bst{parts} } % 20 == 0)
			{
				my $d = eval { $JSON->decode($payload) };
				my @ids = map { $_->{result}{id} } @{ $d->{events} // [] };
				$m{bad} = 1 unless $d && "@ids" eq "@{ $m{ids} }"
				  && $d->{part} == $m{part} && $d->{transactionId} eq $m{transactionId};
			}
		}
		else
		{
			$m{bad} = 1;
			$m{ids} = [];
		}
		push @{ $bst{parts} }, \%m;
	}
	close $fh;
	return @{ $bst{parts} };
}

sub batch_ids
{
	return map { @{ $_->{ids} } } parts();
}

sub all_in
{
	my ($got, $want) = @_;
	my %h = map { $_ => 1 } @$got;
	return !grep { !$h{$_} } @$want;
}

sub check_parts
{
	my ($label) = @_;
	my @p = parts();
	is(scalar(grep { $_->{bad} } @p), 0, "$label: every batch message is a well-formed part");
	is(scalar(grep { $_->{_bytes} > 256 * 1024 } @p), 0, "$label: each part within 256 kB");
	my %by;
	push @{ $by{ $_->{transactionId} // '?' } }, $_ for grep { !$_->{bad} } @p;
	my $bad = 0;
	for my $tx (keys %by)
	{
		my $n = $by{$tx}[0]{parts};
		my %have = map { $_->{part} => 1 } @{ $by{$tx} };
		$bad++ if grep { !$have{$_} } 1 .. $n;
		$bad++ if grep { $_ < 1 || $_ > $n } keys %have;
	}
	is($bad, 0, "$label: every transaction came in its parts 1..n (" . scalar(keys %by)
		  . ' transactions, ' . scalar(@p) . ' messages)');
}

sub check_counts
{
	my ($label) = @_;
	my $b = tally("$label, batched rows", [ batch_ids() ], \@bsent);
	is($b->{missing},  0, "$label: batched rows missing: 0");
	is($b->{disorder}, 0, "$label: batched rows out of commit order: 0");
	is($b->{unexpected}, 0, "$label: no batched row that was not committed");
	my $s = tally("$label, single events", [ arrived_ids($ssub, 'bs') ], \@ssent);
	is($s->{missing},  0, "$label: single events missing: 0");
	is($s->{disorder}, 0, "$label: single events out of commit order: 0");
	is($s->{unexpected}, 0, "$label: no single event that was not committed");
}

# ---------------------------------------------------------------------------
# through the queue
# ---------------------------------------------------------------------------

# 3,000 events of ~2 kB: ~6 MB, about 24 parts of 256 kB
batch_tx(3000, 1000);
batch_tx(3000, 1000);
single_txs(30, 100_000);
ok(poll_until(sub { all_in([ batch_ids() ], \@bsent) }, $T, 0.5),
	'queue: every batched row arrives (two transactions of ~6 MB)');
ok(poll_until(sub { all_in([ arrived_ids($ssub, 'bs') ], \@ssent) }, $T, 0.5),
	'queue: every single event of ~200 kB arrives');
check_parts('queue');
check_counts('queue');

# ---------------------------------------------------------------------------
# broker down: through the outbox
# ---------------------------------------------------------------------------

ok(poll_until(sub { my $s = stats($node); $s && $s->{queued} == 0 && $s->{in_outbox} == 0 }, $T),
	'all acknowledged before the outage');
$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, $T), 'broker down');
my $out_before = stats($node)->{outboxed};
batch_tx(3000, 1000);
single_txs(20, 100_000);
batch_tx(1500, 1000);
ok(poll_until(sub { my $s = stats($node); $s && $s->{queued} == 0 && $s->{outboxed} > $out_before }, $T),
	'the events went to the outbox');
my $rows = $node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox');
ok($rows >= 20 + 2, "the outbox holds them ($rows rows)");
$broker->start;
ok(poll_until(sub { all_in([ batch_ids() ], \@bsent) }, $T, 0.5),
	'outbox: every batched row arrives after the broker returned');
ok(poll_until(sub { all_in([ arrived_ids($ssub, 'bs') ], \@ssent) }, $T, 0.5),
	'outbox: every single event arrives after the broker returned');
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} && $s->{in_outbox} == 0 }, $T),
	'the outbox drains');
check_parts('outbox');
check_counts('outbox');
is(stat_of($node, 'dead_letters'), 0, 'no dead letters');

done_testing();
