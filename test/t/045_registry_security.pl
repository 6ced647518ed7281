#!/usr/bin/perl
#
# 045_registry_security.pl: the listener registry gives no role more than its
# own rights (README, "Listeners"), checked as unprivileged LOGIN roles on one
# real cluster with a real mosquitto.
#
#   4. Dangling listeners never stop a worker: pg_temp functions are refused
#      at listen(); DROP FUNCTION (and DROP OWNED) takes the function's
#      listeners with it (sql_drop); rows whose function or role is gone, a
#      temporary function, an 8 MB search_path, written past the checks by a
#      superuser, are skipped with one LOG line each (not one per reload), and
#      both workers keep their PIDs; a dropped role's listener and one of a
#      role made NOLOGIN do not run; a NOLOGIN role cannot register.
#   5. PUBLIC cannot write or lock the registry, nor call
#      _listeners_changed(); while a superuser holds ACCESS EXCLUSIVE on it,
#      a registry reload times out, the old registry stays and events are
#      still published and their listeners run.
#   9. Bounds: search_path, filter, operations, listeners per role (54000).
#  10. subscriptions and watched_tables show only the role's own; allow_remote
#      needs the grant (EXECUTE on mqtt_emit.may_listen_remote()), and a
#      REVOKE stops that listener's remote events.
#
# A superuser listener "su" on model t records every event; its row for an
# event shows that the listener worker has handled it (and the listeners
# registered before it).
use strict;
use warnings;

use JSON::PP ();
use MqttEmitTest qw(:DEFAULT stats log_since role_fails role_works);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 30;

my $broker = start_broker();
my $node   = new_node('regsec', broker => $broker);
my $prefix = $node->{mqtt_emit}{topic_prefix};

sub sq { return $node->safe_psql('postgres', $_[0]); }

# $sql as $role: (exit code, stdout, stderr with SQLSTATEs)
sub as_role { return MqttEmitTest::as_role($node, @_); }

# $sql as $role fails with $state (and the hint matches $hint, if given)
sub denied
{
	my ($role, $sql, $name, $state, $hint) = @_;
	role_fails($node, $role, $sql, $state, $name,
		defined $hint ? (qr/HINT:\s+.*$hint/) : ());
	return;
}

sub allowed { return role_works($node, @_); }

sub pids
{
	return sq(q{SELECT string_agg(backend_type || '=' || pid, ',' ORDER BY backend_type)
	  FROM pg_stat_activity WHERE backend_type IN ('pg_mqtt_emit', 'pg_mqtt_emit listeners')});
}

# an event of t, and wait until the superuser's listener has seen it
my $next_id = 0;

sub event_seen
{
	my $id = ++$next_id;
	sq("INSERT INTO t VALUES ($id)");
	return poll_until(sub { sq("SELECT count(*) FROM ran WHERE who = 'su' AND id = $id") eq '1' }, $T)
	  ? $id : 0;
}

sub reload { sq('SELECT mqtt_emit._listeners_changed()'); }

sq(q{
CREATE EXTENSION pg_mqtt_emit;
CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
CREATE ROLE carol LOGIN;
CREATE ROLE grp NOLOGIN;
GRANT grp TO alice;
CREATE SCHEMA alice_s AUTHORIZATION alice;
CREATE SCHEMA bob_s AUTHORIZATION bob;
CREATE SCHEMA carol_s AUTHORIZATION carol;
CREATE TABLE t(id int PRIMARY KEY);
SELECT mqtt_emit.watch('t');
GRANT SELECT ON t TO PUBLIC;
CREATE TABLE hidden(id int PRIMARY KEY);
SELECT mqtt_emit.watch('hidden');
CREATE TABLE ran(who text, id int, source text);
GRANT INSERT ON ran TO PUBLIC;
CREATE FUNCTION su(e mqtt_emit.event) RETURNS void LANGUAGE sql
  AS $$ INSERT INTO public.ran VALUES ('su', (e.result->>'id')::int, e.source) $$;
-- a function anyone may execute, for bob's listener
CREATE FUNCTION pubfn(e mqtt_emit.event) RETURNS void LANGUAGE sql
  AS $$ INSERT INTO public.ran VALUES ('pubfn', (e.result->>'id')::int, e.source) $$;
});
for my $r (qw(alice bob carol))
{
	allowed($r, qq{
CREATE FUNCTION ${r}_s.l(e mqtt_emit.event) RETURNS void LANGUAGE sql
  AS \$\$ INSERT INTO public.ran VALUES ('$r', (e.result->>'id')::int, e.source) \$\$;
SELECT mqtt_emit.listen('t', '${r}_s.l(mqtt_emit.event)');
}, 'registers a listener on t');
}
allowed('bob', q{SELECT mqtt_emit.listen('t', 'pubfn(mqtt_emit.event)')}, 'registers pubfn (owned by the superuser)');
sq(q{SELECT mqtt_emit.listen('t', 'su(mqtt_emit.event)')});
ok(poll_until(sub { my $s = stats($node); $s && $s->{connected} }, $T), 'worker connected');
my $sub = start_subscriber($broker, "$prefix/#");
my $pids0 = pids();
is(scalar(my @p = split /,/, $pids0), 2, "both workers run ($pids0)");
{
	my $id = event_seen();
	ok($id, 'an event reaches the listeners')
	  or diag(sq(q{SELECT string_agg(backend_type || ':' || coalesce(wait_event, '') || ':' || coalesce(query, ''), E'\n')
	    FROM pg_stat_activity WHERE backend_type LIKE 'pg_mqtt_emit%'}) . "\n" . sq('SELECT * FROM mqtt_emit.stats')
	    . "\n" . sq('SELECT count(*) FROM mqtt_emit.outbox'));
	is(sq("SELECT string_agg(who, ',' ORDER BY who) FROM ran WHERE id = $id"),
		'alice,bob,carol,pubfn,su', 'every listener ran for it');
}

# ---------------------------------------------------------------------------
# 5. PUBLIC cannot write or lock the registry
# ---------------------------------------------------------------------------

denied('alice', q{BEGIN; LOCK TABLE mqtt_emit.listeners IN ACCESS EXCLUSIVE MODE; COMMIT;},
	'cannot LOCK the registry IN ACCESS EXCLUSIVE MODE', '42501');
denied('alice', q{BEGIN; LOCK TABLE mqtt_emit.listeners IN SHARE MODE; COMMIT;},
	'cannot LOCK it IN SHARE MODE', '42501');
denied('alice', q{DELETE FROM mqtt_emit.listeners}, 'cannot DELETE from the registry', '42501');
denied('alice', q{UPDATE mqtt_emit.listeners SET model = 'x'}, 'cannot UPDATE the registry', '42501');
denied('alice', q{TRUNCATE mqtt_emit.listeners}, 'cannot TRUNCATE the registry', '42501');
denied('alice', q{INSERT INTO mqtt_emit.listeners (model, listener) VALUES ('t', 'alice_s.l(mqtt_emit.event)')},
	'cannot INSERT into the registry (listen() only)', '42501');
denied('alice', q{SELECT mqtt_emit._listeners_changed()}, 'cannot call _listeners_changed()', '42501');
is((as_role('alice', q{SELECT count(*) FROM mqtt_emit.listeners}))[1], '1', 'alice sees her one listener');

# A superuser holds ACCESS EXCLUSIVE on the registry and a reload is due:
# the workers give up after lock_timeout and keep their registry.
{
	my $off = -s $node->logfile;
	my $bg  = $node->background_psql('postgres');
	$bg->query_safe('BEGIN');
	$bg->query_safe('LOCK TABLE mqtt_emit.listeners IN ACCESS EXCLUSIVE MODE');
	reload();
	my $id = ++$next_id;
	sq("INSERT INTO t VALUES ($id)");
	ok(poll_until(sub { grep { $_ eq $id } arrived_ids($sub, 't') }, $T),
		'while the registry is locked, the worker still publishes');
	ok(poll_until(sub { sq("SELECT count(*) FROM ran WHERE who = 'su' AND id = $id") eq '1' }, $T),
		'and the listener worker still runs the listeners loaded before');
	ok(poll_until(sub { log_since($node, $off) =~ /could not read the listener registry: canceling statement due to lock timeout/ }, $T),
		'the lock timeout is logged');
	like(log_since($node, $off), qr/HINT:\s+Another session holds a lock on "mqtt_emit.listeners"/,
		'with a hint');
	$bg->query_safe('ROLLBACK');
	$bg->quit;
	ok(poll_until(sub { log_since($node, $off) =~ /read the listener registry again/ }, $T),
		'once the lock is gone the registry is read again');
	is(pids(), $pids0, 'no worker exited');
}

# ---------------------------------------------------------------------------
# 4. dangling listeners
# ---------------------------------------------------------------------------

denied('alice', q{
CREATE FUNCTION pg_temp.tl(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$ SELECT $$;
SELECT mqtt_emit.listen('t', 'pg_temp.tl(mqtt_emit.event)');
}, 'cannot register a pg_temp function', '42P13', 'permanent schema');
denied('alice', q{SET ROLE grp; SELECT mqtt_emit.listen('t', 'pubfn(mqtt_emit.event)');},
	'cannot register as a NOLOGIN role (SET ROLE grp)', '42501', 'LOGIN');

# DROP FUNCTION takes the listeners with it
allowed('alice', q{
CREATE FUNCTION alice_s.gone(e mqtt_emit.event) RETURNS void LANGUAGE sql AS $$ SELECT $$;
SELECT mqtt_emit.listen('t', 'alice_s.gone(mqtt_emit.event)');
DROP FUNCTION alice_s.gone(mqtt_emit.event);
}, 'registers a listener, then drops its function');
is(sq(q{SELECT count(*) FROM mqtt_emit.listeners l WHERE NOT EXISTS (SELECT 1 FROM pg_proc p WHERE p.oid = l.listener)}),
	'0', 'DROP FUNCTION removed its listener from the registry');

# DROP FUNCTION racing the registry reads: the query's snapshot can still
# see a function the catalog caches no longer have; that listener is one
# whose function is gone, the rest of the registry loads (CI saw "cache
# lookup failed for function", and the registry kept for a second)
{
	my $off0 = -s $node->logfile;
	my @failed;
	for my $k (1 .. 40)
	{
		my ($rc, $out, $err) = as_role('alice', qq{
CREATE FUNCTION alice_s.race$k(e mqtt_emit.event) RETURNS void LANGUAGE sql AS \$\$ SELECT \$\$;
SELECT mqtt_emit.listen('t', 'alice_s.race$k(mqtt_emit.event)');
DROP FUNCTION alice_s.race$k(mqtt_emit.event);
});
		push @failed, "$k: $err" if $rc != 0;
	}
	is(join("\n", @failed), '', '40 rounds of listen, then DROP FUNCTION, as alice');
	ok(event_seen(), 'events are handled after 40 listen/DROP FUNCTION rounds');
	my $log = log_since($node, $off0);
	unlike($log, qr/could not read the listener registry: (?!canceling statement due to lock timeout)/,
		'the registry was read every time (no error but a lock timeout)');
	unlike($log, qr/cache lookup failed/, 'no "cache lookup failed" in the log');
}

# rows no check would let in, written by a superuser past the triggers: a
# function that does not exist, a temporary function (and then its session
# ends), an 8 MB search_path
my $off = -s $node->logfile;
my ($missing_id, $temp_id, $big_id);
{
	$missing_id = sq(q{SET session_replication_role = replica;
INSERT INTO mqtt_emit.listeners (model, listener, owner)
VALUES ('t', 4000000000::oid::regprocedure, 'alice') RETURNING id;});
	$big_id = sq(q{SET session_replication_role = replica;
INSERT INTO mqtt_emit.listeners (model, listener, owner, search_path)
VALUES ('t', 'alice_s.l(mqtt_emit.event)', 'alice', repeat('s,', 4 * 1024 * 1024) || 's') RETURNING id;});
	my $bg = $node->background_psql('postgres');
	$bg->query_safe(q{CREATE FUNCTION pg_temp.tf(e mqtt_emit.event) RETURNS void LANGUAGE sql
  AS $$ INSERT INTO public.ran VALUES ('temp', (e.result->>'id')::int, e.source) $$});
	$temp_id = $bg->query_safe(q{SET session_replication_role = replica;
INSERT INTO mqtt_emit.listeners (model, listener, owner)
VALUES ('t', 'pg_temp.tf(mqtt_emit.event)'::regprocedure, 'alice') RETURNING id;});
	$bg->query_safe('RESET session_replication_role');
	reload();
	my $id = event_seen();
	ok($id, 'the listener worker handles events after loading those rows');
	is(sq("SELECT count(*) FROM ran WHERE who = 'temp'"), '0', 'the temporary function did not run');
	is(sq("SELECT count(*) FROM ran WHERE who = 'alice' AND id = $id"), '1',
		'alice\'s own listener did, once (not the copy with the 8 MB search_path)');
	$bg->quit;
	# the session is gone, and so is its temporary function
	ok(poll_until(sub { sq(q{SELECT count(*) FROM pg_proc WHERE proname = 'tf'}) eq '0' }, $T),
		'the temporary function is gone with its session');
	reload();
	ok(event_seen(), 'events are handled after the reload');
	reload();
	reload();
	ok(event_seen(), 'and after two more reloads');
}
{
	# the listener worker says so when it loads the registry, which it may
	# do a little after the events above (a load that found the registry
	# locked is tried again a second later)
	my $want = qr/listener $big_id \(.* of role \d+\): its search_path is longer than 1024 bytes/;
	poll_until(sub { log_since($node, $off) =~ $want }, $T);
	my $log = log_since($node, $off);
	unlike($log, qr/cache lookup failed/, 'no "cache lookup failed" in the log');
	my $n = () = $log =~ /listener $missing_id \(4000000000 of role \d+\): its function no longer exists/g;
	is($n, 1, 'the listener of a missing function is logged once, not at every reload');
	like($log, qr/listener $temp_id \(pg_temp_\d+\.tf\(mqtt_emit\.event\) of role \d+\): its function is a temporary one/,
		'the temporary function\'s listener is named');
	$n = () = $log =~ /listener $temp_id \(\d+ of role \d+\): its function no longer exists/g;
	is($n, 1, 'and once its session ended, that its function is gone');
	$n = () = $log =~ /listener $big_id \(.* of role \d+\): its search_path is longer than 1024 bytes/g;
	is($n, 1, 'the 8 MB search_path is skipped and logged once');
	is(pids(), $pids0, 'no worker exited');
}
sq("DELETE FROM mqtt_emit.listeners WHERE id IN ($missing_id, $temp_id, $big_id)");

# DROP OWNED and DROP ROLE: bob's own function goes with its listener; his
# listener of the superuser's pubfn stays as a row of a role that is gone
{
	my $bob = sq(q{SELECT 'bob'::regrole::oid});
	sq(q{DROP OWNED BY bob; DROP ROLE bob;});
	is(sq("SELECT count(*) FROM mqtt_emit.listeners WHERE owner::oid = $bob AND listener <> 'pubfn(mqtt_emit.event)'::regprocedure"),
		'0', 'DROP OWNED removed the listener of bob\'s function');
	is(sq("SELECT count(*) FROM mqtt_emit.listeners WHERE owner::oid = $bob"), '1',
		'the listener of pubfn stays, its role gone');
	my $id = event_seen();
	ok($id, 'events are handled');
	is(sq("SELECT count(*) FROM ran WHERE who = 'pubfn' AND id = $id"), '0',
		'the dropped role\'s listener does not run (no reload since DROP ROLE)');
	reload();
	$id = event_seen();
	is(sq("SELECT count(*) FROM ran WHERE who = 'pubfn' AND id = $id"), '0', 'nor after a reload');
	ok(poll_until(sub { log_since($node, $off) =~ /listener \d+ \((public\.)?pubfn\(mqtt_emit\.event\) of role $bob\): its role no longer exists/ }, $T),
		'logged: its role no longer exists');
}

# a role made NOLOGIN: its listener stops at once
{
	sq('ALTER ROLE carol NOLOGIN');
	my $id = event_seen();
	is(sq("SELECT count(*) FROM ran WHERE who = 'carol' AND id = $id"), '0',
		'a NOLOGIN role\'s listener does not run (checked before the call)');
	reload();
	$id = event_seen();
	is(sq("SELECT count(*) FROM ran WHERE who = 'carol' AND id = $id"), '0', 'nor after a reload');
	ok(poll_until(sub { log_since($node, $off) =~ /its role cannot log in/ }, $T), 'logged: its role cannot log in');
	sq('ALTER ROLE carol LOGIN');
	reload();
	ok(poll_until(sub {
		my $i = event_seen();
		$i && sq("SELECT count(*) FROM ran WHERE who = 'carol' AND id = $i") eq '1' }, $T),
		'with LOGIN again it runs again');
	is(pids(), $pids0, 'no worker exited');
}

# ---------------------------------------------------------------------------
# 9. bounds
# ---------------------------------------------------------------------------

denied('alice', q{SELECT set_config('search_path', repeat('s,', 600) || 's', false);
SELECT mqtt_emit.listen('t', 'alice_s.l(mqtt_emit.event)');},
	'a search_path over 1024 bytes is refused', '54000', 'shorter');
denied('alice', q{SELECT mqtt_emit.listen('t', 'alice_s.l(mqtt_emit.event)', filter => jsonb_build_object('k', repeat('x', 5000)))},
	'a filter over 4096 bytes is refused', '54000', 'fewer keys');
denied('alice', q{SELECT mqtt_emit.listen('t', 'alice_s.l(mqtt_emit.event)', operations => array_fill('create'::text, ARRAY[20]))},
	'more than 16 operations are refused', '54000', 'once');
allowed('alice', q{SELECT count(mqtt_emit.listen('many', 'alice_s.l(mqtt_emit.event)'))
  FROM generate_series(1, 500 - (SELECT count(*) FROM mqtt_emit.listeners))},
	'registers up to 500 listeners');
denied('alice', q{SELECT mqtt_emit.listen('many', 'alice_s.l(mqtt_emit.event)')},
	'the 501st listener of a role is refused', '54000', 'unlisten');
is(sq(q{SELECT count(*) FROM mqtt_emit.listeners WHERE owner = 'alice'::regrole}), '500', 'alice has 500 listeners');
sq(q{DELETE FROM mqtt_emit.listeners WHERE model = 'many'});

# ---------------------------------------------------------------------------
# 10. views and the remote right
# ---------------------------------------------------------------------------

is((as_role('alice', q{SELECT string_agg(table_name::text, ',' ORDER BY table_name::text) FROM mqtt_emit.watched_tables}))[1] // '',
	't', 'watched_tables shows alice only t (which she may read), not hidden');
is(sq(q{SELECT string_agg(table_name::text, ',' ORDER BY table_name::text) FROM mqtt_emit.watched_tables}),
	'hidden,t', 'the superuser sees both');
sq(q{SELECT mqtt_emit.listen('sumodel', 'su(mqtt_emit.event)', allow_remote => true)});
is((as_role('alice', q{SELECT count(*) FROM mqtt_emit.subscriptions}))[1], '0',
	'subscriptions does not show alice the superuser\'s models');
denied('alice', q{SELECT mqtt_emit.listen('rm', 'alice_s.l(mqtt_emit.event)', allow_remote => true)},
	'cannot register an allow_remote listener without the grant', '42501',
	'GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote\(\) TO alice');
sq(q{GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() TO alice});
allowed('alice', q{SELECT mqtt_emit.listen('rm', 'alice_s.l(mqtt_emit.event)', allow_remote => true)},
	'with the grant she can');
is((as_role('alice', q{SELECT string_agg(topic_filter, ',' ORDER BY 1) FROM mqtt_emit.subscriptions}))[1],
	"$prefix/rm/#", 'subscriptions shows alice her own model only');
my $cid = $node->{mqtt_emit}{client_id};
ok(poll_until(sub { $broker->log =~ /\Q$cid\E-subscriber \d \Q$prefix\E\/rm\/#/ }, $T), 'the worker subscribed to rm');

my $rid = 1000;
sub remote_seen
{
	my $id = ++$rid;
	mqtt_pub($broker, "$prefix/rm/create",
		qq({"model":"rm","operation":"create","result":{"id":$id},"eventId":"0e5a1e00-0000-4000-8000-00000000$id","origin":"peer-x"}));
	# a marker after it: a superuser remote listener on sumodel
	mqtt_pub($broker, "$prefix/sumodel/create",
		qq({"model":"sumodel","operation":"create","result":{"id":$id},"eventId":"0e5a1e00-0000-4000-8000-00000001$id","origin":"peer-x"}));
	ok(poll_until(sub { sq("SELECT count(*) FROM ran WHERE who = 'su' AND id = $id AND source = 'remote'") eq '1' }, $T),
		"remote marker $id handled");
	return sq("SELECT count(*) FROM ran WHERE who = 'alice' AND id = $id AND source = 'remote'");
}
is(remote_seen(), '1', 'alice\'s remote listener receives a remote event');
sq(q{REVOKE EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() FROM alice});
is(remote_seen(), '0', 'after REVOKE it does not (checked before the call)');
reload();
is(remote_seen(), '0', 'nor after a reload');
ok(poll_until(sub { log_since($node, $off) =~ /its role may not receive remote events/ }, $T),
	'logged: its role may not receive remote events');
is(pids(), $pids0, 'no worker exited during the whole test');

$node->stop;
done_testing();
