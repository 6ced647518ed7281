#!/usr/bin/perl
#
# 078_big_transaction.pl: transactions larger than the shared-memory queue
# (issue 16).  With the default mqtt_emit.queue_size (8 MB) a transaction of
# 200,000 events of about 450 bytes cannot go through the queue: its events
# are written to the outbox in chunks while it runs (pending.c,
# maybe_flush_chunk) and the rest at commit, placed by one marker.
#
#   1. 200,000 rows in one transaction (memory mode, mqtt_emit.overflow =
#      spill): every event arrives exactly once and in order; the backend's
#      transaction memory stays bounded (TopTransactionContext well below
#      what 200,000 kept events take), and part of the events is in the
#      outbox before the commit (visible to the transaction itself).
#   2. Savepoints in a big transaction: rolled back after chunks were
#      written inside them, rolled back with events kept in memory,
#      released, and an exception block: only the kept events arrive, in
#      order.
#   3. Big transactions that abort at the end (ROLLBACK, and an error at
#      COMMIT time's last statement): nothing published, nothing left in
#      the outbox.
#   4. A big durable transaction committed while the broker is down, then
#      a crash (pg_ctl stop -m immediate) before the worker published it:
#      every event arrives after the restart.
#   5. Small commits of another session interleaved with a big transaction
#      (memory mode, then durable): one model, all arrive in commit order.
#   6. The same big transactions by a role without rights on the outbox,
#      with its own schema first in search_path; a durable event in a READ
#      ONLY transaction is refused.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T     = 600;    # bound of the waits for a whole big transaction
my $MODEL = 'bigtx';

my $broker = start_broker(extra_conf => ['max_queued_messages 0']);
my $node   = new_node(
	'bigtx',
	broker                    => $broker,
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
$node->safe_psql(
	'postgres', qq{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE bt (id int PRIMARY KEY, v text NOT NULL);
	SELECT mqtt_emit.watch('bt', model => '$MODEL');
});
is($node->safe_psql('postgres', 'SHOW mqtt_emit.queue_size'), '8MB',
	'the default queue size (8 MB)');
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, 120),
	'worker connected to the broker');
my $sub = start_subscriber($broker, topic_prefix() . "/$MODEL/#");

my @expected;      # every id that must arrive, in commit order
my @forbidden;     # ids that must never arrive

# rows $a..$b of bt, events of about 450 bytes
sub ins
{
	my ($a, $b) = @_;
	return "INSERT INTO bt SELECT g, repeat('x', 200) FROM generate_series($a, $b) g;\n";
}

# wait until every id of @$want has arrived
sub all_arrived
{
	my ($want, $label) = @_;
	my %h;
	my $ok = poll_until(
		sub {
			%h = map { $_ => 1 } arrived_ids($sub, $MODEL);
			scalar(grep { $h{$_} } @$want) == @$want;
		},
		$T, 0.5);
	ok($ok, $label)
	  or diag(scalar(grep { !$h{$_} } @$want) . ' of ' . scalar(@$want) . ' missing');
	return $ok;
}

sub outbox_count
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox');
}

# ---------------------------------------------------------------------------
# 1. 200,000 events in one transaction
# ---------------------------------------------------------------------------

{
	my $bg = $node->background_psql('postgres');
	$bg->query_safe('BEGIN');
	$bg->query_safe(ins(1, 200000));
	my $mem = $bg->query_safe(
		"SELECT total_bytes FROM pg_backend_memory_contexts WHERE name = 'TopTransactionContext'");
	my $rows_before = $bg->query_safe('SELECT count(*) FROM mqtt_emit.outbox');
	$bg->query_safe('COMMIT');
	$bg->quit;
	note "TopTransactionContext before COMMIT: $mem bytes; outbox rows before COMMIT: $rows_before";
	# 200,000 events of ~450 bytes kept in memory would be ~100 MB
	cmp_ok($mem, '<', 32 * 1024 * 1024,
		'the transaction memory stays bounded (below 32 MB for 200,000 events)');
	cmp_ok($rows_before, '>=', 100000,
		'most events were written to the outbox before the commit');
	push @expected, 1 .. 200000;
}
all_arrived([ 1 .. 200000 ], 'all 200,000 events of one transaction arrive');
my $r = tally('200k', [ arrived_ids($sub, $MODEL) ], \@expected);
is($r->{missing},    0, '200k: none missing');
is($r->{duplicates}, 0, '200k: no duplicates');
is($r->{unexpected}, 0, '200k: nothing unexpected');
is($r->{disorder},   0, '200k: in order');
ok(poll_until(sub { outbox_count() eq '0' }, $T), '200k: the outbox drains');
is(stats($node)->{spilled} > 0 ? 1 : 0, 1, 'stats counts the events as spilled');

# ---------------------------------------------------------------------------
# 2. savepoints inside a big transaction
# ---------------------------------------------------------------------------

{
	my $script = "BEGIN;\n"
	  # chunks written inside the savepoint, then rolled back
	  . "SAVEPOINT s0;\n" . ins(300001, 340000) . "ROLLBACK TO SAVEPOINT s0;\n"
	  . ins(200001, 230000)
	  # events of the outer level pending: kept in memory, rolled back
	  . "SAVEPOINT s1;\n" . ins(340001, 370000) . "ROLLBACK TO SAVEPOINT s1;\n"
	  . ins(230001, 260000)
	  . "SAVEPOINT s2;\n" . ins(260001, 290000) . "RELEASE SAVEPOINT s2;\n"
	  # nested: the inner one rolled back, the outer one released
	  . "SAVEPOINT s3;\n" . ins(290001, 300000)
	  . "SAVEPOINT s4;\n" . ins(370001, 400000) . "ROLLBACK TO SAVEPOINT s4;\n"
	  . "RELEASE SAVEPOINT s3;\n"
	  . "DO \$\$ BEGIN INSERT INTO bt SELECT g, repeat('x', 200) FROM generate_series(400001, 430000) g;"
	  . " RAISE EXCEPTION 'undo'; EXCEPTION WHEN raise_exception THEN NULL; END \$\$;\n"
	  . ins(430001, 450000)
	  . "COMMIT;\n";
	$node->safe_psql('postgres', $script);
	push @expected,  200001 .. 300000, 430001 .. 450000;
	push @forbidden, 300001 .. 430000;
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM bt WHERE id > 200000'),
	'120000', 'savepoints: the table holds the 120,000 kept rows');
all_arrived([ 200001 .. 300000, 430001 .. 450000 ],
	'savepoints: the kept events arrive');

# ---------------------------------------------------------------------------
# 3. big transactions that abort at the end
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', "BEGIN;\n" . ins(500001, 600000) . "ROLLBACK;\n");
push @forbidden, 500001 .. 600000;
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"BEGIN;\n" . ins(600001, 700000) . "INSERT INTO bt VALUES (1, 'duplicate');\nCOMMIT;\n",
		on_error_stop => 0);
	like($err, qr/duplicate key value/, 'abort: the second transaction fails at its end');
	push @forbidden, 600001 .. 700000;
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM bt WHERE id > 500000'),
	'0', 'abort: no row of the aborted transactions');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtt_emit.outbox WHERE (payload::jsonb #>> '{result,id}')::int > 500000"),
	'0', 'abort: nothing of them in the outbox');
$node->safe_psql('postgres', "INSERT INTO bt VALUES (700001, 'after abort')");
push @expected, 700001;
all_arrived([700001], 'abort: an event committed after them arrives');

$r = tally('savepoints and aborts', [ arrived_ids($sub, $MODEL) ], \@expected, \@forbidden);
ok(poll_until(sub { outbox_count() eq '0' }, $T), 'savepoints and aborts: the outbox drains');
is($r->{missing},    0, 'savepoints and aborts: none missing');
is($r->{forbidden},  0, 'savepoints and aborts: no rolled-back event arrived');
is($r->{duplicates}, 0, 'savepoints and aborts: no duplicates');
is($r->{unexpected}, 0, 'savepoints and aborts: nothing unexpected');
is($r->{disorder},   0, 'savepoints and aborts: in commit order');

# ---------------------------------------------------------------------------
# 4. crash after the commit of a big durable transaction
# ---------------------------------------------------------------------------

$broker->stop;
ok(poll_until(sub { my $s = stats($node); $s && !$s->{connected} }, 120),
	'crash: the broker is down');
$node->safe_psql('postgres',
	"SET mqtt_emit.delivery = durable;\nBEGIN;\n" . ins(800001, 900000) . "COMMIT;\n");
my @durable = (800001 .. 900000);
push @expected, @durable;
# (durable events carry the local-listener flag; a big durable
# transaction's chunk rows get their local rows apart, at PRE_COMMIT)
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtt_emit.outbox WHERE (flags & 1) <> 0'),
	'100000', 'crash: the 100,000 durable events are in the outbox, to be published');
$node->stop('immediate');
my $port = $broker->port;
$broker->start;
is($broker->port, $port, 'crash: broker back on the same port');
ok($sub->wait_ready(120), 'crash: subscriber subscribed again before the node starts');
$node->start;
all_arrived(\@durable, 'crash: every event of the big durable transaction arrives after the crash');
ok(poll_until(sub { outbox_count() eq '0' }, $T), 'crash: the outbox drains');
{
	my @all = arrived_ids($sub, $MODEL);
	my @after = grep { $_ >= 800001 && $_ <= 900000 } @all;
	$r = tally('durable after crash', \@after, \@durable);
	is($r->{missing},  0, 'crash: none missing');
	is($r->{disorder}, 0, 'crash: in order');
	note "crash: duplicates $r->{duplicates} (allowed after a crash)";
}

# ---------------------------------------------------------------------------
# 5. small commits of another session between a big transaction's chunks
# ---------------------------------------------------------------------------

sub interleaved
{
	my ($label, $delivery, $base) = @_;
	my @order;
	my $small = sub {
		my ($from, $n) = @_;
		$node->safe_psql('postgres',
			"DO \$\$ BEGIN FOR i IN $from.." . ($from + $n - 1)
			  . " LOOP INSERT INTO bt VALUES (i, 'small'); COMMIT; END LOOP; END \$\$");
		push @order, $from .. $from + $n - 1;
	};
	my $bg = $node->background_psql('postgres');
	$bg->query_safe("SET mqtt_emit.delivery = $delivery");
	$bg->query_safe('BEGIN');
	$small->($base + 100001, 100);
	$bg->query_safe(ins($base + 1, $base + 30000));
	$small->($base + 100101, 100);
	$bg->query_safe(ins($base + 30001, $base + 60000));
	$small->($base + 100201, 100);
	$bg->query_safe('COMMIT');
	$bg->quit;
	push @order, $base + 1 .. $base + 60000;
	$small->($base + 100301, 100);
	all_arrived(\@order, "$label: every event arrives");
	my %mine = map { $_ => 1 } @order;
	my @got = grep { $mine{$_} } arrived_ids($sub, $MODEL);
	my $res = tally($label, \@got, \@order);
	is($res->{missing},    0, "$label: none missing");
	is($res->{duplicates}, 0, "$label: no duplicates");
	is($res->{disorder},   0, "$label: in commit order");
}

interleaved('interleaved, memory',  'memory',  1000000);
interleaved('interleaved, durable', 'durable', 2000000);
ok(poll_until(sub { outbox_count() eq '0' }, $T), 'interleaved: the outbox drains');

# ---------------------------------------------------------------------------
# 6. a role without rights on the outbox: its big transactions commit (the
#    backend's statements on the outbox run as the extension's owner, with
#    search_path pinned), in memory mode and durable; a durable event in a
#    READ ONLY transaction is refused as the INSERT was before
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', q{
	CREATE ROLE app LOGIN;
	GRANT INSERT ON bt TO app;
	CREATE SCHEMA evil AUTHORIZATION app;
});
for my $case ([ 'memory', 3000000 ], [ 'durable', 4000000 ])
{
	my ($delivery, $base) = @$case;
	$node->safe_psql('postgres', "ALTER ROLE app SET mqtt_emit.delivery = $delivery");
	my ($rc, $out, $err) = $node->psql('postgres',
		"SET search_path = evil, public;\nBEGIN;\n" . ins($base + 1, $base + 30000) . "COMMIT;\n",
		extra_params => [ '-U', 'app' ]);
	is($rc, 0, "role app, $delivery: a 30,000-row transaction (chunks) commits") or diag $err;
	my @ids = ($base + 1 .. $base + 30000);
	all_arrived(\@ids, "role app, $delivery: every event arrives");
	my %mine = map { $_ => 1 } @ids;
	my $res = tally("role app, $delivery", [ grep { $mine{$_} } arrived_ids($sub, $MODEL) ], \@ids);
	is($res->{missing} + $res->{duplicates} + $res->{disorder}, 0,
		"role app, $delivery: none missing, twice or out of order");
}
ok(poll_until(sub { outbox_count() eq '0' }, $T), 'role app: the outbox drains');
my ($rc, $out, $err) = $node->psql('postgres',
	q{SET mqtt_emit.delivery = durable; BEGIN READ ONLY; SELECT mqtt_emit.publish('ro/x', 'hi'); COMMIT;},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/25006.*read-only transaction/,
	'a durable event in a READ ONLY transaction is refused (25006)');

$sub->stop;
unlike($broker->log, qr/Outgoing messages are being dropped/,
	'the broker dropped no message for the subscriber');
done_testing();
