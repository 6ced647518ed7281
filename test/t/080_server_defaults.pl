#!/usr/bin/perl
#
# 080_server_defaults.pl: the workers do not take the server's defaults for
# client sessions.  An operator may set, server-wide, for the sessions of
# their applications:
#
#   default_transaction_isolation = 'serializable'
#   default_transaction_read_only = on
#   lock_timeout = '1ms'
#   exit_on_error = on
#   transaction_timeout = '200ms'   (PostgreSQL 17 and later)
#
# (here also ALTER DATABASE ... SET, which a background worker connecting to
# the database takes too: the servers restart after it).  The publisher,
# its outbox bookkeeping, the listener worker and the listeners must behave
# as with the defaults: every event published once and every listener run
# once, memory, spilled and durable, local and remote, with no worker error
# and no worker restart, also across a configuration reload.
#
# Two nodes on one broker, both with these settings.  A writes 3 x 120 rows
# (memory; one transaction of 60 rows of 2 kB that spills past A's 64 kB
# queue; durable), with a local listener on A and a remote listener on B,
# and beside each a listener that fails for every 40th row (a caught error,
# FATAL under exit_on_error) and sleeps 0.3 s for row 100 (its transaction
# outlasts transaction_timeout).  Counted: rows published (a subscriber on
# the broker), listener runs on A and on B, missing, run twice and out of
# order.  The sessions of the test itself turn these settings off.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT stats);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 120;
my @hostile = (
	"default_transaction_isolation = 'serializable'",
	'default_transaction_read_only = on',
	"lock_timeout = '1ms'",
	'exit_on_error = on');

my $broker = start_broker();
my %node;
for my $name (qw(a b))
{
	$node{$name} = new_node(
		"sdef_$name",
		broker                 => $broker,
		'mqtt_emit.queue_size' => '64kB',
		extra_conf             => \@hostile);
}

# missing, run twice, unexpected and out of order: all 0
sub counts_ok
{
	my ($label, $r) = @_;
	is(join(' ', map { "$_ $r->{$_}" } qw(missing duplicates unexpected disorder)),
		'missing 0 duplicates 0 unexpected 0 disorder 0', "$label: none missing, twice or out of order");
}

my $pg17 = $node{a}->safe_psql('postgres', 'SHOW server_version_num') >= 170000;

sub sq
{
	my ($n, $sql) = @_;
	return $node{$n}->safe_psql('postgres',
		    "SET default_transaction_read_only = off; SET lock_timeout = 0; SET exit_on_error = off;\n"
		  . ($pg17 ? "SET transaction_timeout = 0;\n" : '')
		  . $sql);
}

# the listener worker's process id
sub lpid
{
	my ($n) = @_;
	return sq($n, q{SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_mqtt_emit listeners'});
}

for my $n (qw(a b))
{
	is($node{$n}->safe_psql('postgres', 'SHOW default_transaction_read_only'),
		'on', "$n: sessions are read-only by default");
	sq($n, q{
		CREATE EXTENSION pg_mqtt_emit;
		ALTER DATABASE postgres SET default_transaction_isolation = 'serializable';
		ALTER DATABASE postgres SET default_transaction_read_only = on;
		CREATE TABLE item (id int PRIMARY KEY, pad text NOT NULL DEFAULT '');
		CREATE TABLE runlog (seq bigserial PRIMARY KEY, id int NOT NULL, src text NOT NULL);
		CREATE FUNCTION rec(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
		BEGIN
			INSERT INTO runlog (id, src) VALUES ((e.result->>'id')::int, e.source);
		END $$;
		CREATE FUNCTION boom(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
		BEGIN
			IF (e.result->>'id')::int = 100 THEN
				PERFORM pg_sleep(0.3);
			END IF;
			IF (e.result->>'id')::int % 40 = 0 THEN
				RAISE EXCEPTION 'boom %', e.result->>'id';
			END IF;
		END $$;
	});
	sq($n, q{ALTER DATABASE postgres SET transaction_timeout = '200ms'}) if $pg17;
}
sq('a', q{SELECT mqtt_emit.watch('item', emit => true);
	SELECT mqtt_emit.listen('item', 'rec(mqtt_emit.event)');
	SELECT mqtt_emit.listen('item', 'boom(mqtt_emit.event)')});
sq('b', q{SELECT mqtt_emit.listen('item', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true);
	SELECT mqtt_emit.listen('item', 'boom(mqtt_emit.event)', allow_remote => true, remote_only => true)});
# the workers start again with the database's settings
$node{$_}->restart for qw(a b);

for my $n (qw(a b))
{
	ok(poll_until(sub { my $s = stats($node{$n}); $s && $s->{connected} }, $T),
		"$n: the worker connects");
}
ok( poll_until(
		sub {
			sq('b', q{SELECT count(*) FROM mqtt_emit.subscriptions WHERE state = 'acknowledged'}) > 0;
		},
		$T),
	'b: subscribed to the model of its remote listener');

my %pid0 = map { $_ => stats($node{$_})->{worker_pid} } qw(a b);
my %lpid0;
for my $n (qw(a b))
{
	ok(poll_until(sub { lpid($n) ne '' }, $T), "$n: the listener worker runs");
	$lpid0{$n} = lpid($n);
}
my %log0 = map { $_ => -s $node{$_}->logfile } qw(a b);

my $sub = start_subscriber($broker, topic_prefix() . '/item/#');
$sub->wait_ready;

# memory: 12 transactions of 10 rows
my @want;
for my $t (0 .. 11)
{
	my $lo = $t * 10 + 1;
	my $hi = $lo + 9;
	sq('a', "INSERT INTO item (id) SELECT g FROM generate_series($lo, $hi) g");
	push @want, $lo .. $hi;
}
# a reload in between: the settings stay the workers' own
sq($_, 'SELECT pg_reload_conf()') for qw(a b);
# spilled: 60 rows of 2 kB in one transaction, past the 64 kB queue, then
# 60 single-row transactions
my $spilled0 = stats($node{a})->{spilled};
sq('a', "INSERT INTO item (id, pad) SELECT g, repeat('x', 2000) FROM generate_series(121, 180) g");
push @want, 121 .. 180;
sq('a', "INSERT INTO item (id) VALUES ($_)") for 181 .. 240;
push @want, 181 .. 240;
# durable: 12 transactions of 10 rows
for my $t (0 .. 11)
{
	my $lo = 241 + $t * 10;
	my $hi = $lo + 9;
	sq('a', "SET mqtt_emit.delivery = durable; INSERT INTO item (id) SELECT g FROM generate_series($lo, $hi) g");
	push @want, $lo .. $hi;
}
cmp_ok(stats($node{a})->{spilled} - $spilled0, '>', 0, 'the big transaction spilled to the outbox');

my $n = scalar @want;
ok(poll_until(sub { scalar(arrived_ids($sub, 'item')) >= $n }, $T),
	"the broker has all $n events");
counts_ok('published', tally('published', [ arrived_ids($sub, 'item') ], \@want));

for my $side (['a', 'local'], ['b', 'remote'])
{
	my ($nn, $src) = @$side;
	ok( poll_until(sub { sq($nn, 'SELECT count(*) FROM runlog') >= $n }, $T),
		"$nn: the $src listener ran for all $n events");
	my @ran = split /\n/, sq($nn, 'SELECT id FROM runlog ORDER BY seq');
	counts_ok("$nn listener", tally("$nn listener", \@ran, \@want));
	is(sq($nn, "SELECT count(*) FROM runlog WHERE src <> '$src'"), '0',
		"$nn: every run has source = '$src'");
}
ok(poll_until(sub { stats($node{a})->{in_outbox} == 0 }, $T),
	'a: the outbox is empty');

for my $nn (qw(a b))
{
	is(stats($node{$nn})->{worker_pid}, $pid0{$nn}, "$nn: the worker did not restart");
	is(lpid($nn), $lpid0{$nn}, "$nn: the listener worker did not restart");
	cmp_ok(sq($nn, q{SELECT coalesce(sum(errors), 0) FROM mqtt_emit.listener_stats WHERE listener::text LIKE 'boom%'}),
		'>=', 9, "$nn: the failing listener failed (9 rows of 360 are multiples of 40)");
	my $log = slurp_file($node{$nn}->logfile, $log0{$nn});
	my @bad = grep { /ERROR|FATAL/ } split /\n/, $log;
	is(scalar @bad, 0, "$nn: no error in the log") or diag join("\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]);
}

$sub->stop;
done_testing();
