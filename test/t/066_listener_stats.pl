#!/usr/bin/perl
#
# 066_listener_stats.pl: mqtt_emit.listener_stats and mqtt_emit.model_stats
# (README "Monitoring"): calls, errors and time of each listener, per
# model, each role seeing its own, zero again after stats_reset().
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT role_works);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 60;
my $N = 5;

my $broker = start_broker();
my $node   = new_node('lstats', broker => $broker);
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE ROLE alice LOGIN;
	CREATE TABLE t (id int PRIMARY KEY);
	GRANT SELECT ON t TO alice;
	SELECT mqtt_emit.watch('t');
	CREATE TABLE log (who text, id int);
	GRANT INSERT ON log TO alice;
	CREATE FUNCTION ok_l(e mqtt_emit.event) RETURNS void LANGUAGE sql
	  AS $$ INSERT INTO log VALUES ('ok', (e.result->>'id')::int) $$;
	CREATE FUNCTION bad_l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql
	  AS $$ BEGIN RAISE EXCEPTION 'bad on purpose'; END $$;
	CREATE FUNCTION alice_l(e mqtt_emit.event) RETURNS void LANGUAGE sql
	  AS $$ INSERT INTO public.log VALUES ('alice', (e.result->>'id')::int) $$;
	GRANT EXECUTE ON FUNCTION alice_l(mqtt_emit.event) TO alice;
	SELECT mqtt_emit.listen('t', 'ok_l(mqtt_emit.event)');
	SELECT mqtt_emit.listen('t', 'bad_l(mqtt_emit.event)');
});
role_works($node, 'alice', q{SELECT mqtt_emit.listen('t', 'public.alice_l(mqtt_emit.event)')},
	'registers her own listener');

sub sq { return $node->safe_psql('postgres', $_[0]); }

is(sq(q{SELECT string_agg(listener::text || '=' || calls || '/' || errors, ',' ORDER BY id) FROM mqtt_emit.listener_stats}),
	'ok_l(mqtt_emit.event)=0/0,bad_l(mqtt_emit.event)=0/0,alice_l(mqtt_emit.event)=0/0',
	'every listener is listed, with no call yet');

sq("INSERT INTO t SELECT g FROM generate_series(1, $N) g");
ok( poll_until(
		sub { sq(q{SELECT min(calls) FROM mqtt_emit.listener_stats}) >= $N },
		$T, 0.2),
	"each listener was called for the $N events");
is(sq(q{SELECT string_agg(listener::text || '=' || calls || '/' || errors, ',' ORDER BY id) FROM mqtt_emit.listener_stats}),
	"ok_l(mqtt_emit.event)=$N/0,bad_l(mqtt_emit.event)=$N/$N,alice_l(mqtt_emit.event)=$N/0",
	'calls and errors of each listener');
is(sq(q{SELECT bool_and(total_time > 0 AND mean_time > 0 AND last_call IS NOT NULL) FROM mqtt_emit.listener_stats}),
	't', 'time and last call are recorded');
is(sq(q{SELECT model || ' ' || listeners || ' ' || calls || ' ' || errors FROM mqtt_emit.model_stats}),
	"t 3 " . (3 * $N) . " $N", 'model_stats adds up the listeners of the model');

# alice sees her own listener only
is( (MqttEmitTest::as_role($node, 'alice',
			q{SELECT string_agg(listener::text || '=' || calls, ',') FROM mqtt_emit.listener_stats}))[1],
	"alice_l(mqtt_emit.event)=$N", 'alice sees only her listener');
is( (MqttEmitTest::as_role($node, 'alice', q{SELECT listeners || ' ' || calls FROM mqtt_emit.model_stats}))[1],
	"1 $N", 'alice\'s model_stats count only her listener');

sq('SELECT mqtt_emit.stats_reset()');
is(sq(q{SELECT sum(calls) || ' ' || sum(errors) FROM mqtt_emit.listener_stats}),
	'0 0', 'stats_reset() sets the listener counts back to zero');

$node->stop('fast');
done_testing();
