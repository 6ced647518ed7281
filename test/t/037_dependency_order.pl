#!/usr/bin/perl
#
# 037_dependency_order.pl: a transaction that read another's committed row
# is published, and runs its local listeners, after it (issue 12: "the queue
# position of a transaction's events is fixed before the transaction becomes
# visible, so a transaction that depends on another is always published
# after it"; README "Delivery semantics").
#
# Four pgbench clients append to one chain: each transaction inserts a row
# that names the newest row it sees committed (prev = max(id)), without
# waiting for any lock of it: it may start the instant that row became
# visible, which is before its transaction's COMMIT callback ran.
# Meanwhile two more clients commit transactions of 200 kB (64 rows of
# 3 kB) on another watched table, so that committing backends wait for one
# another.  Counted, in the order the broker's subscriber received them
# (publishing order) and in the order a local listener ran them: rows
# missing, twice, and rows that came before the row they name.
#
# Rounds: memory delivery; the same with mqtt_emit.marker_wait = 0 and more
# big transactions than the 1 MB queue holds (spills, some without a
# marker); durable delivery; memory delivery while the broker is frozen
# and then thawed (everything goes through the outbox).
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats arrived_ids tally);
use POSIX ();
use PostgreSQL::Test::Utils;
use Test::More;

my $T       = 180;
my $CLIENTS = 4;
my $TX      = $ENV{PG_MQTT_EMIT_037_TX} // 3000;    # chain attempts per client and round

my $broker = start_broker();
END { kill 'CONT', $broker->pid if $broker && $broker->pid; }
my $node = new_node(
	'deporder',
	broker                       => $broker,
	'mqtt_emit.queue_size'       => '1MB',
	'synchronous_commit'         => 'off',
	'max_connections'            => '40');
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE chain (id bigserial PRIMARY KEY, prev bigint, sess int NOT NULL);
	SELECT mqtt_emit.watch('chain');
	CREATE TABLE bulk (id bigserial PRIMARY KEY, pad text NOT NULL);
	SELECT mqtt_emit.watch('bulk');
	CREATE TABLE runlog (seq bigserial PRIMARY KEY, id bigint NOT NULL, prev bigint);
	CREATE FUNCTION rec(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$
	  INSERT INTO runlog (id, prev) VALUES ((e.result->>'id')::bigint, (e.result->>'prev')::bigint)
	$$;
	SELECT mqtt_emit.listen('chain', 'rec(mqtt_emit.event)');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T), 'worker connected');
my $sub = start_subscriber($broker, topic_prefix() . '/chain/#');

my $dir = $PostgreSQL::Test::Utils::tmp_check;
open my $fh, '>', "$dir/chain.sql" or die $!;
print $fh "INSERT INTO chain (prev, sess) SELECT max(id), :client_id FROM chain;\n";
close $fh;
open $fh, '>', "$dir/bulk.sql" or die $!;
print $fh "INSERT INTO bulk (pad) SELECT repeat('b', 3000) FROM generate_series(1, 64);\n";
close $fh;

sub pgbench
{
	my ($name, $script, $clients, $tx, $settings) = @_;
	local $ENV{PGOPTIONS} = $settings;
	return MqttEmitTest::_spawn(
		[
			'pgbench', '-n', '-h', $node->host, '-p', $node->port,
			'-c', $clients, '-j', $clients, '-t', $tx, '-f', $script, 'postgres'
		],
		"$dir/$name.out", "$dir/$name.err");
}

sub wait_all
{
	my ($name, @pids) = @_;
	my %status;
	ok( poll_until(
			sub {
				for my $pid (@pids)
				{
					next if exists $status{$pid};
					$status{$pid} = $? >> 8 if waitpid($pid, POSIX::WNOHANG()) == $pid;
				}
				return keys %status == @pids;
			},
			$T),
		"$name: the clients finished");
	is_deeply([ map { $status{$_} } @pids ], [ (0) x @pids ], "$name: pgbench exited 0")
	  or diag(join '', map { slurp_file("$dir/$name$_.err") } ('', '_bulk'));
}

# rows (id => prev) of this round, in the order they came; returns the
# counts of rows missing, twice, and before the row they name
sub check_order
{
	my ($label, $arrived, $committed) = @_;
	my (%at, $twice, $inverted, @first);
	my $i = 0;
	for my $r (@$arrived)
	{
		my ($id, $prev) = @$r;
		if (exists $at{$id}) { $twice++; next; }
		$at{$id} = $i++;
	}
	my $missing = grep { !exists $at{$_} } keys %$committed;
	for my $id (keys %$committed)
	{
		my $prev = $committed->{$id};
		next unless defined $prev && exists $committed->{$prev};
		next unless exists $at{$id} && exists $at{$prev};
		next unless $at{$prev} > $at{$id};
		$inverted++;
		push @first, "$id (prev $prev)" if @first < 5;
	}
	note sprintf('%s: committed %d, came %d, missing %d, twice %d, before the row they name %d%s',
		$label, scalar(keys %$committed), scalar(@$arrived), $missing, $twice // 0, $inverted // 0,
		@first ? ': ' . join(', ', @first) : '');
	return ($missing, $twice // 0, $inverted // 0);
}

sub round
{
	my ($name, $settings, %opt) = @_;
	my $id0   = $node->safe_psql('postgres', 'SELECT coalesce(max(id), 0) FROM chain');
	my $runs0 = $node->safe_psql('postgres', 'SELECT coalesce(max(seq), 0) FROM runlog');
	my $st0   = stats($node);
	ok(kill('STOP', $broker->pid), "$name: broker frozen") if $opt{freeze};
	my @pids = (
		pgbench($name, "$dir/chain.sql", $CLIENTS, $TX, $settings),
		pgbench("${name}_bulk", "$dir/bulk.sql", 2, $opt{bulk} // 100, $settings));
	wait_all($name, @pids);
	ok(kill('CONT', $broker->pid), "$name: broker thawed") if $opt{freeze};
	my %committed = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres', "SELECT id, coalesce(prev, 0) FROM chain WHERE id > $id0");
	is(scalar keys %committed, $CLIENTS * $TX, "$name: " . $CLIENTS * $TX . ' chain rows committed');

	my $re = qr{^\Q${\ topic_prefix()}\E/chain/create$};
	my @pub;
	ok( poll_until(
			sub {
				@pub = grep { $_->[0] > $id0 }
				  map { $_->[1] =~ /"result":\{"id":(\d+),"prev":(\d+|null)/ ? [ $1, $2 ] : () }
				  grep { $_->[0] =~ $re } $sub->messages;
				@pub >= keys %committed;
			},
			$T, 0.5),
		"$name: the subscriber received every chain row");
	my ($missing, $twice, $inv) = check_order("$name (published)", \@pub, \%committed);
	is($missing, 0, "$name: published: none missing");
	is($inv,     0, "$name: published: every row after the row it read");

	ok( poll_until(
			sub { $node->safe_psql('postgres', "SELECT count(*) FROM runlog WHERE seq > $runs0") >= keys %committed },
			$T, 0.5),
		"$name: the local listener ran for every chain row");
	my @ran = map { [ split /\|/ ] } split /\n/,
	  $node->safe_psql('postgres', "SELECT id, coalesce(prev, 0) FROM runlog WHERE seq > $runs0 ORDER BY seq");
	($missing, $twice, $inv) = check_order("$name (local)", \@ran, \%committed);
	is($missing, 0, "$name: local: none missing");
	is($twice,   0, "$name: local: none ran twice");
	is($inv,     0, "$name: local listeners ran every row after the row it read");
	my $st = stats($node);
	note sprintf('%s: spilled %d, outboxed %d', $name,
		$st->{spilled} - $st0->{spilled}, $st->{outboxed} - $st0->{outboxed});
	cmp_ok($st->{spilled} - $st0->{spilled}, '>', 0, "$name: events spilled") if $opt{spills};
}

round('memory', '');
round('spill', '-c mqtt_emit.marker_wait=0', bulk => 400, spills => 1);
round('durable', '-c mqtt_emit.delivery=durable');
round('outage', '', freeze => 1, spills => 1);

done_testing();
