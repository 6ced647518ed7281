#!/usr/bin/perl
#
# 011_event_ids.pl: event ids (doc/DESIGN.md 5.3).  Thousands of events from two
# clusters on one broker, written by concurrent sessions, then more after a
# clean restart and after a crash restart of the first cluster: every event
# arrives, every eventId is UUID-formatted and unique, the ids of the two
# nodes never collide, and ids after a restart do not repeat earlier ones.
# Identical rows (the seed's weakness: its id is a prefix of the payload)
# get distinct ids too.
use strict;
use warnings;

use IPC::Run ();
use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $TIMEOUT = 120;
my $UUID    = qr/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
my $JSON    = JSON::PP->new->utf8;

my $prefix = topic_prefix();
my $broker = start_broker();
my $node_a      = new_node('ida', broker => $broker);
my $node_b      = new_node('idb', broker => $broker);

for my $n ($node_a, $node_b)
{
	$n->safe_psql('postgres', q{
		CREATE EXTENSION pg_mqtt_emit;
		CREATE TABLE ev (id int PRIMARY KEY, phase text, v text);
		SELECT mqtt_emit.watch('ev');
		CREATE TABLE same (v text);
		SELECT mqtt_emit.watch('same');
	});
}

sub connected
{
	my ($n) = @_;
	return poll_until(
		sub {
			my ($rc, $out) = $n->psql('postgres',
				'SELECT connected AND worker_pid IS NOT NULL FROM mqtt_emit.stats');
			return $rc == 0 && $out eq 't';
		},
		$TIMEOUT, 0.1);
}
ok(connected($node_a), 'node a connected');
ok(connected($node_b), 'node b connected');

my $sub = start_subscriber($broker, "$prefix/#");

# psql in the background, for concurrent writers.
sub psql_start
{
	my ($n, $sql) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $n->connstr('postgres'), '-f', '-' ],
		'<', \$sql, '>', \$out, '2>', \$err, IPC::Run::timeout($TIMEOUT));
	return { h => $h, err => \$err };
}

sub psql_finish
{
	my ($j) = @_;
	my $ok = eval { $j->{h}->finish; 1 } && $j->{h}->result == 0;
	diag(${ $j->{err} }) unless $ok;
	return $ok;
}

# SQL for rows [from, to] of a phase in transactions of $per rows.
sub inserts
{
	my ($phase, $from, $to, $per) = @_;
	my $sql = '';
	for (my $s = $from; $s <= $to; $s += $per)
	{
		my $e = $s + $per - 1;
		$e = $to if $e > $to;
		$sql .= "INSERT INTO ev SELECT g, '$phase', md5(g::text) FROM generate_series($s, $e) g;\n";
	}
	return $sql;
}

# Records by phase: all decoded payloads whose result.phase is $phase.
my %expect;    # phase => [origin, number of rows]
my %origin_of = (a => $node_a->{mqtt_emit}{client_id}, b => $node_b->{mqtt_emit}{client_id});

sub decoded
{
	my @d;
	for my $r ($sub->records)
	{
		my $p = eval { $JSON->decode($r->{payload}) };
		push @d, $p if ref $p eq 'HASH';
	}
	return @d;
}

sub wait_total
{
	my ($n) = @_;
	return poll_until(sub { $sub->count >= $n }, $TIMEOUT, 0.25);
}

# Phase 1: 5000 rows on a (two concurrent sessions, 5 transactions each) while
# node b writes 2000 rows (4 transactions) at the same time.
my @jobs = (
	psql_start($node_a, inserts('a1', 1,    2500, 500)),
	psql_start($node_a, inserts('a1', 2501, 5000, 500)),
	psql_start($node_b, inserts('b1', 1,    2000, 500)));
ok(psql_finish($_), 'concurrent writer committed') for @jobs;
$expect{a1} = [ 'a', 5000 ];
$expect{b1} = [ 'b', 2000 ];

# identical rows, many per millisecond
$node_a->safe_psql('postgres', q{INSERT INTO same SELECT 'identical' FROM generate_series(1, 300)});
$node_b->safe_psql('postgres', q{INSERT INTO same SELECT 'identical' FROM generate_series(1, 300)});

my $total = 7600;
ok(wait_total($total), "phase 1: $total events arrived") or note('received ' . $sub->count);

# Phase 2: a clean restart of a, then more events.
my $pid_before = $node_a->safe_psql('postgres', 'SELECT worker_pid FROM mqtt_emit.stats');
$node_a->restart;
ok(connected($node_a), 'node a connected again after a restart');
isnt($node_a->safe_psql('postgres', 'SELECT worker_pid FROM mqtt_emit.stats'), $pid_before,
	'a new worker after the restart');
$node_a->safe_psql('postgres', inserts('a2', 5001, 6000, 500));
$expect{a2} = [ 'a', 1000 ];
$total += 1000;

# Phase 3: a crash (immediate shutdown) and start of a, then more events.
ok(wait_total($total), 'phase 2 arrived before the crash');
$node_a->stop('immediate');
$node_a->start;
ok(connected($node_a), 'node a connected again after an immediate shutdown');
$node_a->safe_psql('postgres', inserts('a3', 6001, 7000, 250));
$node_b->safe_psql('postgres', inserts('b3', 2001, 2500, 250));
$expect{a3} = [ 'a', 1000 ];
$expect{b3} = [ 'b', 500 ];
$total += 1500;

ok(wait_total($total), "all $total events arrived");

# ---------------------------------------------------------------------------
my @events = decoded();
note('sent ' . $total . ', received ' . scalar(@events));

my (%count_of_id, %ids_by_phase, %ids_by_origin, %rows_by_phase, $bad_format);
for my $e (@events)
{
	my $id = $e->{eventId} // '';
	$count_of_id{$id}++;
	$bad_format++ unless $id =~ $UUID;
	my $phase = ref $e->{result} eq 'HASH' ? ($e->{result}{phase} // 'same') : '?';
	push @{ $ids_by_phase{$phase} }, $id;
	push @{ $ids_by_origin{ $e->{origin} // '?' } }, $id;
	$rows_by_phase{$phase}{ $e->{result}{id} }++ if defined $e->{result}{id};
}

is($bad_format // 0, 0, 'every eventId is UUID-formatted');
my @dup_ids = grep { $count_of_id{$_} > 1 } keys %count_of_id;
is(scalar(@events), $total, "received exactly $total events");
is(scalar(keys %count_of_id), scalar(@events), 'every eventId is unique');
note('duplicate ids: ' . scalar(@dup_ids) . (@dup_ids ? " e.g. $dup_ids[0]" : ''));

for my $phase (sort keys %expect)
{
	my ($node, $n) = @{ $expect{$phase} };
	my $rows = $rows_by_phase{$phase} // {};
	my ($lo)    = { a1 => 1, b1 => 1, a2 => 5001, a3 => 6001, b3 => 2001 }->{$phase};
	my $missing = grep { !$rows->{$_} } $lo .. $lo + $n - 1;
	my $dups    = grep { $_ > 1 } values %$rows;
	note("phase $phase (node $node): sent $n, received "
		  . scalar(@{ $ids_by_phase{$phase} // [] })
		  . ", missing $missing, duplicates $dups");
	is($missing, 0, "phase $phase: no event missing");
}

is(scalar(@{ $ids_by_phase{same} // [] }), 600, 'identical rows: 600 events');
my %same = map { $_ => 1 } @{ $ids_by_phase{same} // [] };
is(scalar(keys %same), 600, 'identical rows get distinct ids');

# the two nodes' ids never collide
my %a_ids = map { $_ => 1 } @{ $ids_by_origin{ $origin_of{a} } // [] };
my %b_ids = map { $_ => 1 } @{ $ids_by_origin{ $origin_of{b} } // [] };
is(scalar(keys %a_ids), 7300, "node a: 7300 distinct ids");
is(scalar(keys %b_ids), 2800, "node b: 2800 distinct ids");
is(scalar(grep { $b_ids{$_} } keys %a_ids), 0, 'no id of node a is an id of node b');
is_deeply([ sort keys %ids_by_origin ], [ sort values %origin_of ],
	'every event carries its node as origin');

# restarts do not repeat ids
my %before = map { $_ => 1 } @{ $ids_by_phase{a1} // [] };
my %after2 = map { $_ => 1 } @{ $ids_by_phase{a2} // [] };
is(scalar(grep { $before{$_} } keys %after2), 0,
	'ids after a clean restart differ from the ids before it');
is(scalar(grep { $before{$_} || $after2{$_} } @{ $ids_by_phase{a3} // [] }), 0,
	'ids after a crash restart differ from all earlier ones');

# nothing else arrived: a last marker, and nothing after it but the marker
$node_b->safe_psql('postgres', q{INSERT INTO ev VALUES (999999, 'end', 'end')});
ok(wait_total($total + 1), 'end marker arrived');
is($sub->count, $total + 1, 'no unexpected extra events');

done_testing();
