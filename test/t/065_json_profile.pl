#!/usr/bin/perl
#
# 065_json_profile.pl: mqtt_emit.json_profile (README "Configuration").
#
# The same row is published under the default profile (postgres: as
# to_jsonb() renders it) and under prisma (as Prisma's client writes its
# values, so that a Node peer reads them right): bigint beyond 2^53 and
# numeric as strings, date, timestamp and timestamptz as UTC ISO 8601 with
# milliseconds and Z.  The published result object is compared exactly, as
# text, and a local listener's event.result holds the same values.
use strict;
use warnings;

use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 60;

my $broker = start_broker();
my $node   = new_node('profile', broker => $broker, timezone => 'America/New_York');
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE v (id int PRIMARY KEY, big bigint, small bigint, neg bigint,
	                num numeric, f float8, d date, ts timestamp(3), tstz timestamptz,
	                inf timestamp);
	SELECT mqtt_emit.watch('v');
	CREATE TABLE seen (id int, result jsonb);
	CREATE FUNCTION keep(e mqtt_emit.event) RETURNS void LANGUAGE sql
	  AS $$ INSERT INTO seen VALUES ((e.result->>'id')::int, e.result) $$;
	SELECT mqtt_emit.listen('v', 'keep(mqtt_emit.event)');
});
ok(poll_until(sub { $node->safe_psql('postgres', 'SELECT connected FROM mqtt_emit.stats') eq 't' }, $T),
	'worker connected');
my $sub = start_subscriber($broker, topic_prefix() . '/v/#');

my $row = q{(%d, 9007199254740993, 9007199254740991, -9007199254740993, 12.50, 1.5,
	'2026-11-13', '2026-11-13 10:30:00.123', '2026-11-13 10:30:00.123+00', 'infinity')};

# the result object of the create event of row $id, as text
sub result_text
{
	my ($id) = @_;
	my $text;
	poll_until(
		sub {
			for my $m ($sub->messages)
			{
				next unless $m->[1] =~ /"result":(\{"id":$id,[^}]*\})/;
				$text = $1;
				return 1;
			}
			return 0;
		},
		$T, 0.2);
	return $text;
}

is($node->safe_psql('postgres', 'SHOW mqtt_emit.json_profile'), 'postgres', 'the default profile is postgres');
$node->safe_psql('postgres', sprintf("INSERT INTO v VALUES $row", 1));
is( result_text(1),
	'{"id":1,"big":9007199254740993,"small":9007199254740991,"neg":-9007199254740993,'
	  . '"num":12.50,"f":1.5,"d":"2026-11-13","ts":"2026-11-13T10:30:00.123",'
	  . '"tstz":"2026-11-13T05:30:00.123-05:00","inf":"infinity"}',
	'postgres: values as to_jsonb() renders them');
is( $node->safe_psql('postgres', q{SELECT result = (SELECT to_jsonb(v) FROM v WHERE id = 1) FROM seen WHERE id = 1}),
	't', 'postgres: the local listener gets to_jsonb() of the row');

$node->safe_psql('postgres', "ALTER SYSTEM SET mqtt_emit.json_profile = 'prisma'; SELECT pg_reload_conf();");
ok(poll_until(sub { $node->safe_psql('postgres', 'SHOW mqtt_emit.json_profile') eq 'prisma' }, $T),
	'the profile is prisma after a reload');
$node->safe_psql('postgres', sprintf("INSERT INTO v VALUES $row", 2));
is( result_text(2),
	'{"id":2,"big":"9007199254740993","small":9007199254740991,"neg":"-9007199254740993",'
	  . '"num":"12.50","f":1.5,"d":"2026-11-13T00:00:00.000Z","ts":"2026-11-13T10:30:00.123Z",'
	  . '"tstz":"2026-11-13T10:30:00.123Z","inf":"infinity"}',
	'prisma: big integers and numeric as strings, dates and timestamps in UTC with Z');
ok(poll_until(sub { $node->safe_psql('postgres', 'SELECT count(*) FROM seen WHERE id = 2') eq '1' }, $T),
	'prisma: the local listener runs');
is( $node->safe_psql('postgres', q{SELECT result->>'big' || ' ' || jsonb_typeof(result->'big') || ' ' || (result->>'ts') FROM seen WHERE id = 2}),
	'9007199254740993 string 2026-11-13T10:30:00.123Z',
	'prisma: the local listener gets the same values');

# a JSON reader gets every digit of the big integer
my $decoded = JSON::PP->new->decode(result_text(2));
is($decoded->{big}, '9007199254740993', 'prisma: the big integer survives a JSON parser that reads numbers as doubles');

$node->stop('fast');
done_testing();
