#!/usr/bin/perl
#
# 077_batch_message.pl: watch(..., batch => true) publishes one message per
# transaction and table, in parts, on <batch_topic_prefix>/<model>/batch
# (README, "Batched messages"), and tries to break it with a real broker:
#
# - bad option values and a batch prefix that collides with the topic
#   prefix fail with their SQLSTATEs (watch() and the change itself);
# - a transaction bigger than mqtt_emit.batch_max_bytes (here 16 kB) comes
#   in parts 1..n of one transaction, each within the limit;
# - a savepoint rolled back inside a batched transaction leaves its rows out;
# - many small transactions: one message each, in commit order;
# - the broker goes down: batches wait in the outbox and all arrive when it
#   is back (persistent subscriber session, as in 030);
# - a part the broker refuses (max_packet_size) becomes a dead letter and
#   the batches after it still arrive;
# - counts: sent, received, missing, duplicates, out of order (at-least-once:
#   duplicates are reported, missing and out-of-order events fail);
# - the events inside are the seed format's objects, with exclude_columns
#   applied;
# - a subscriber of <prefix>/# (the seed's format) receives none of it and
#   every single event of an ordinary table in the same transactions;
# - local listeners run once per row as for any table.
use strict;
use warnings;

use JSON::PP ();
use MqttEmitTest qw(:DEFAULT stats role_fails role_works);
use PostgreSQL::Test::Utils;
use Test::More;

my $T     = 120;
my $JSON  = JSON::PP->new->utf8;
my $P     = topic_prefix();
my $BP    = "$P-batch";          # not under $P: $P/# does not match it
my $LIMIT = 16 * 1024;

my $broker = start_broker(persistent => 1,
	extra_conf => [ 'max_queued_messages 0', 'max_packet_size 60000' ]);
my $node = new_node(
	'batch',
	broker                         => $broker,
	'mqtt_emit.batch_topic_prefix' => $BP,
	'mqtt_emit.batch_max_bytes'    => $LIMIT,
	'mqtt_emit.reconnect_min'      => '100ms',
	'mqtt_emit.reconnect_max'      => '1s');
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE b (id int PRIMARY KEY, v text NOT NULL, secret text);
	CREATE TABLE p (id int PRIMARY KEY, v text NOT NULL);
	CREATE TABLE seen (id int);
	CREATE FUNCTION on_b(e mqtt_emit.event) RETURNS void LANGUAGE sql
	AS $$ INSERT INTO seen VALUES ((e.result->>'id')::int) $$;
	SELECT mqtt_emit.watch('p');
});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T),
	'worker connected');

# ---------------------------------------------------------------------------
# option errors
# ---------------------------------------------------------------------------

role_fails($node, 'postgres', "SELECT mqtt_emit.watch('b', emit => false, batch => true)",
	'22023', 'batch without emit', qr/batch needs emit/);
role_fails($node, 'postgres', "SELECT mqtt_emit.watch('b', batch => true, retain_last => true)",
	'22023', 'batch with retain_last', qr/batch and retain_last cannot both be set/);
role_fails($node, 'postgres', "ALTER SYSTEM SET mqtt_emit.batch_max_bytes = 100",
	'22023', 'batch_max_bytes below its minimum', qr/outside the valid range/);
role_fails($node, 'postgres', "ALTER SYSTEM SET mqtt_emit.batch_topic_prefix = 'a/#'",
	'22023', 'a batch prefix with a wildcard', qr/must not contain/);
role_fails($node, 'postgres', "ALTER SYSTEM SET mqtt_emit.batch_topic_prefix = ''",
	'22023', 'an empty batch prefix', qr/must not be empty/);

# a batch prefix under the topic prefix, equal to it, or above it
for my $bad ("$P/batches", $P, uc($P), (split m{/}, $P)[0])
{
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET mqtt_emit.batch_topic_prefix = '$bad'; SELECT pg_reload_conf()");
	ok(poll_until(sub {
		$node->safe_psql('postgres', 'SHOW mqtt_emit.batch_topic_prefix') eq $bad }, $T),
		"batch prefix set to $bad");
	role_fails($node, 'postgres', "SELECT mqtt_emit.watch('b', batch => true)",
		'22023', "watch refuses batch prefix $bad",
		qr/collides with "mqtt_emit.topic_prefix"/, qr/HINT:/);
}
# a table watched before the collision: its changes fail, nothing is sent
$node->safe_psql('postgres',
	"ALTER SYSTEM RESET mqtt_emit.batch_topic_prefix; SELECT pg_reload_conf()");
ok(poll_until(sub {
	$node->safe_psql('postgres', 'SHOW mqtt_emit.batch_topic_prefix') eq $BP }, $T),
	'batch prefix back');
$node->safe_psql('postgres',
	"SELECT mqtt_emit.watch('b', exclude_columns => '{secret}', batch => true)");
is($node->safe_psql('postgres',
	"SELECT emit, batch, retain_last FROM mqtt_emit.watched_tables WHERE table_name = 'b'::regclass"),
	't|t|f', 'watched_tables shows batch');
$node->safe_psql('postgres',
	"ALTER SYSTEM SET mqtt_emit.batch_topic_prefix = '$P/x'; SELECT pg_reload_conf()");
ok(poll_until(sub {
	$node->safe_psql('postgres', 'SHOW mqtt_emit.batch_topic_prefix') eq "$P/x" }, $T),
	'colliding batch prefix set');
role_fails($node, 'postgres', "INSERT INTO b VALUES (-1, 'no')",
	'22023', 'a change of a batched table under a colliding prefix',
	qr/collides/);
$node->safe_psql('postgres',
	"ALTER SYSTEM RESET mqtt_emit.batch_topic_prefix; SELECT pg_reload_conf()");
ok(poll_until(sub {
	$node->safe_psql('postgres', 'SHOW mqtt_emit.batch_topic_prefix') eq $BP }, $T),
	'batch prefix back again');
is($node->safe_psql('postgres', 'SELECT count(*) FROM b'), 0, 'the refused change left no row');

# ---------------------------------------------------------------------------
# subscribers: the seed format's, and the batches' (persistent session)
# ---------------------------------------------------------------------------

my $seed = start_subscriber($broker, "$P/#",
	clean_session => 0, client_id => "seed-$$");
my $bsub = start_subscriber($broker, "$BP/#",
	clean_session => 0, client_id => "batch-$$");
$node->safe_psql('postgres', "SELECT mqtt_emit.listen('b', 'on_b(mqtt_emit.event)')");

my $next = 1;        # the next id of b
my @sent;            # ids of b committed, in commit order
my $psent = 0;       # rows of p committed
my $ntx = 0;         # transactions that changed b

# one transaction inserting $n rows into b (one INSERT ... SELECT)
sub batch_tx
{
	my ($n, %o) = @_;
	my ($a, $z) = ($next, $next + $n - 1);
	my $pad = $o{pad} // 40;
	$node->safe_psql('postgres',
		"INSERT INTO b SELECT i, repeat('v', $pad), 'hidden' FROM generate_series($a, $z) i");
	push @sent, $a .. $z;
	$next = $z + 1;
	$ntx++;
}

# batch messages received: decoded payloads, in arrival order
sub batches
{
	my @m;
	for my $r ($bsub->records)
	{
		next unless $r->{topic} eq "$BP/b/batch";
		my $d = eval { $JSON->decode($r->{payload}) };
		push @m, $d // { bad => $r->{payload} };
		$m[-1]{_bytes} = length $r->{payload};
	}
	return @m;
}

sub received_ids
{
	return map { map { $_->{result}{id} } @{ $_->{events} // [] } } batches();
}

sub all_arrived
{
	my %h = map { $_ => 1 } received_ids();
	return !grep { !$h{$_} } @sent;
}

# ---------------------------------------------------------------------------
# one transaction bigger than the part limit
# ---------------------------------------------------------------------------

batch_tx(2000);
ok(poll_until(\&all_arrived, $T), '2000 rows of one transaction arrive');
my @parts = batches();
my $n = $parts[0]{parts};
ok($n > 1, "the transaction came in $n parts (limit $LIMIT bytes)");
is(scalar(@parts), $n, 'exactly that many messages');
is_deeply([ map { $_->{part} } @parts ], [ 1 .. $n ], 'parts 1..n in order');
is(scalar(grep { $_->{transactionId} eq $parts[0]{transactionId} } @parts), $n,
	'all parts name the same transaction');
is(scalar(grep { $_->{total} == 2000 && $_->{parts} == $n } @parts), $n,
	'each part says total 2000 and its part count');
my $sum = 0;
$sum += $_->{count} for @parts;
is($sum, 2000, 'the counts add up to 2000');
is(scalar(grep { $_->{count} == scalar @{ $_->{events} } } @parts), $n,
	'each count matches its events');
is(scalar(grep { $_->{_bytes} <= $LIMIT } @parts), $n, 'each part within the limit');
my $ev = $parts[0]{events}[0];
is_deeply([ sort keys %$ev ], [ sort qw(model operation args result timestamp eventId origin) ],
	'an event in a batch has the seed format\'s fields');
is($ev->{model}, 'b', 'its model');
is($ev->{operation}, 'create', 'its operation');
ok(!exists $ev->{result}{secret} && !exists $ev->{args}{data}{secret},
	'exclude_columns applies inside the batch');
like($ev->{eventId}, qr/^[0-9a-f-]{36}$/, 'it has its event id');
is($parts[0]{model}, 'b', 'the batch names its model');
is($parts[0]{origin}, $node->{mqtt_emit}{client_id}, 'the batch names its origin');

# ---------------------------------------------------------------------------
# savepoint rolled back inside a batched transaction
# ---------------------------------------------------------------------------

{
	my $a = $next;
	$node->safe_psql(
		'postgres', qq{
		BEGIN;
		INSERT INTO b SELECT i, 'sp', NULL FROM generate_series($a, $a + 4) i;
		SAVEPOINT s;
		INSERT INTO b SELECT i, 'gone', NULL FROM generate_series($a + 5, $a + 9) i;
		ROLLBACK TO s;
		INSERT INTO b SELECT i, 'sp', NULL FROM generate_series($a + 10, $a + 11) i;
		COMMIT;
	});
	push @sent, ($a .. $a + 4, $a + 10, $a + 11);
	$next = $a + 12;
	$ntx++;
	ok(poll_until(\&all_arrived, $T), 'the savepoint transaction arrives');
	my ($m) = grep { grep { $_->{result}{id} == $a } @{ $_->{events} } } batches();
	is_deeply([ map { $_->{result}{id} } @{ $m->{events} } ],
		[ $a .. $a + 4, $a + 10, $a + 11 ],
		'one message without the rolled-back rows');
}

# ---------------------------------------------------------------------------
# many small transactions, each also changing an ordinary table
# ---------------------------------------------------------------------------

{
	my $a = $next;
	my $k = 200;
	$node->safe_psql('postgres', qq{
		DO \$\$ BEGIN
		FOR t IN 0..$k - 1 LOOP
			INSERT INTO b SELECT i, 'small', NULL FROM generate_series($a + 5 * t, $a + 5 * t + 4) i;
			INSERT INTO p VALUES (t, 'plain');
			COMMIT;
		END LOOP; END \$\$});
	push @sent, $a .. $a + 5 * $k - 1;
	$next = $a + 5 * $k;
	$ntx += $k;
	$psent += $k;
	ok(poll_until(\&all_arrived, $T), "$k small transactions arrive");
}

# ---------------------------------------------------------------------------
# broker down: batches wait in the outbox
# ---------------------------------------------------------------------------

ok(poll_until(sub { my $s = stats($node); $s && $s->{queued} == 0 && $s->{in_outbox} == 0 }, $T),
	'all acknowledged before the outage');
$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, $T), 'broker down');
my $out_before = stats($node)->{outboxed};
{
	my $a = $next;
	$node->safe_psql('postgres', qq{
		DO \$\$ BEGIN
		FOR t IN 0..29 LOOP
			INSERT INTO b SELECT i, 'outage', NULL FROM generate_series($a + 10 * t, $a + 10 * t + 9) i;
			COMMIT;
		END LOOP; END \$\$});
	push @sent, $a .. $a + 299;
	$next = $a + 300;
	$ntx += 30;
}
batch_tx(1500);
ok(poll_until(sub { my $s = stats($node); $s && $s->{queued} == 0 && $s->{outboxed} > $out_before }, $T),
	'the batches went to the outbox');
my $rows = $node->safe_psql('postgres',
	"SELECT count(*) FROM mqtt_emit.outbox WHERE model = '$BP/b/batch'");
ok($rows >= 31, "the outbox holds the batches ($rows rows)");
$broker->start;
ok(poll_until(\&all_arrived, $T, 0.5), 'every batched row arrives after the broker returned');
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} && $s->{in_outbox} == 0 }, $T),
	'the outbox drains');

# ---------------------------------------------------------------------------
# a part the broker refuses: a dead letter; what follows still arrives
# ---------------------------------------------------------------------------

{
	my $a = $next;
	# one row whose event (the row twice, in args.data and result) is ~80 kB:
	# a part of its own, larger than the broker's max_packet_size
	$node->safe_psql('postgres', "INSERT INTO b VALUES ($a, repeat('x', 40000), NULL)");
	$next++;
	batch_tx(10);
	ok(poll_until(sub {
		$node->safe_psql('postgres',
			"SELECT count(*) FROM mqtt_emit.dead_letters WHERE topic = '$BP/b/batch'") == 1 }, $T),
		'the oversized part is a dead letter');
	ok(poll_until(\&all_arrived, $T), 'the batch after it arrives');
	ok(!grep({ $_ == $a } received_ids()), 'the refused part never arrived');
}

# ---------------------------------------------------------------------------
# durable delivery: the parts are written to the outbox at commit
# ---------------------------------------------------------------------------

{
	my $a = $next;
	$node->safe_psql('postgres', qq{
		BEGIN;
		SET LOCAL mqtt_emit.delivery = durable;
		INSERT INTO b SELECT i, repeat('d', 40), NULL FROM generate_series($a, $a + 999) i;
		COMMIT;
	});
	push @sent, $a .. $a + 999;
	$next = $a + 1000;
	$ntx++;
	ok(poll_until(\&all_arrived, $T), 'a durable batched transaction arrives');
}

# ---------------------------------------------------------------------------
# the tally
# ---------------------------------------------------------------------------

my @got = received_ids();
my %count;
$count{$_}++ for @got;
my @missing = grep { !$count{$_} } @sent;
my $dups = 0;
$dups += $_ - 1 for values %count;
# out of order: a first arrival lower than an earlier first arrival
my (%first, @order);
for my $id (@got) { push @order, $id unless $first{$id}++; }
my $ooo = 0;
for my $i (1 .. $#order) { $ooo++ if $order[$i] < $order[ $i - 1 ]; }
my %sent = map { $_ => 1 } @sent;
my @extra = grep { !$sent{$_} } keys %count;
note sprintf('sent %d rows in %d transactions, received %d (%d distinct), missing %d, '
	  . 'duplicates %d, out of order %d, messages %d',
	scalar(@sent), $ntx, scalar(@got), scalar(keys %count), scalar(@missing), $dups, $ooo,
	scalar(my @b = batches()));
is(scalar(@missing), 0, 'missing: 0') or diag("missing: @missing[0 .. ($#missing < 20 ? $#missing : 20)]");
is(scalar(@extra), 0, 'nothing received that was not committed (rolled back, refused)');
is($ooo, 0, 'out of order: 0');
is(scalar(grep { !defined $_->{transactionId} } batches()), 0, 'every message is a batch');

# the seed's subscriber: ordinary events only, none of the batches
my @seedmsgs = $seed->messages;
is(scalar(grep { $_->[0] =~ m{/batch$} || $_->[1] =~ /"transactionId"/ } @seedmsgs), 0,
	"a subscriber of $P/# received no batched message");
is(scalar(grep { $_->[0] =~ m{^\Q$P\E/b/} } @seedmsgs), 0,
	'nor any single event of the batched table');
ok(poll_until(sub { scalar(grep { $_->[0] eq "$P/p/create" } $seed->messages) >= $psent }, $T),
	"it received the $psent events of the ordinary table");

# local listeners: once per committed row
my $committed = $node->safe_psql('postgres', 'SELECT count(*) FROM b');
is($committed, scalar(@sent) + 1, 'rows of b committed = rows sent + the refused one');
ok($node->poll_query_until('postgres',
	"SELECT count(*) = $committed AND count(DISTINCT id) = $committed FROM seen"),
	'the local listener ran once per committed row');

# ---------------------------------------------------------------------------
# without batch, the table publishes single events again
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', "SELECT mqtt_emit.watch('b')");
$node->safe_psql('postgres', "INSERT INTO b VALUES ($next, 'single', NULL)");
ok(poll_until(sub { grep { $_->[0] eq "$P/b/create" } $seed->messages }, $T),
	'watch() without batch: single events again');

done_testing();
