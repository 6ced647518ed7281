#!/usr/bin/perl
#
# 044_privileges.pl: what an unprivileged role can and cannot do with
# pg_mqtt_emit (doc/DESIGN.md 2: only the owner may watch a table; doc/DESIGN.md 4:
# listeners run as the role that registered them, never as the worker's
# superuser; README: listeners table under row-level security, outbox not
# readable by PUBLIC, publish() not granted to PUBLIC, stats for pg_monitor,
# dead letters for superusers only,
# enabled superuser-only, listeners run as security-restricted operations).
#
# One real cluster and a real mosquitto. Role alice (no special rights, but a
# member of admin_r, which may read table secret) owns schema alice_s, a
# watched table there and a listener; role bob has a listener too; role
# watcher is in pg_monitor. A superuser listener registered after alice's on
# the same model ("observer") records what it sees; its row is the sign that
# alice's listener has run for an event.
#
# Checked: the SQL API refuses alice what she has no right to (42501: watch or
# unwatch a table she does not own, listen with a function she cannot
# execute, read or write the outbox and dead letters, publish(), SET
# mqtt_emit.enabled / delivery / overflow, read stats); she sees and removes
# only her own listeners and cannot write rows for others. Her listener runs
# as alice; reading a table she may not read, SET ROLE (even to a role she is
# a member of), SET SESSION AUTHORIZATION and CREATE TEMP TABLE all fail in
# it, each logged and counted as exactly one listener error, while the
# observer still runs; nor does her listener on the model of a watched table
# she may not read receive its rows. Then what a listener must not be able to leave behind:
# a setting it changes must not outlive its call (not seen by the next
# listener, of another role), and in particular a search_path it sets must
# not be used by the worker's own superuser queries (alice's code would run as
# the superuser). Finally the listener registry written directly (INSERT,
# bypassing listen()): a function that is no listener, a function alice may
# not execute, or a wildcard model must not take effect.
use strict;
use warnings;

use JSON::PP ();
use MqttEmitTest qw(:DEFAULT role_fails role_works);
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 30;
my $prefix = topic_prefix();

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

my $node;

sub sq
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

# $sql as $role: (exit code, stdout, stderr with SQLSTATEs)
sub as_role { return MqttEmitTest::as_role($node, @_); }

# $sql as $role fails with $state (default 42501), or works
sub denied
{
	my ($role, $sql, $name, $state) = @_;
	role_fails($node, $role, $sql, $state // '42501', $name);
	return;
}

sub allowed { return role_works($node, @_); }

sub stats
{
	return JSON::PP::decode_json(sq('SELECT row_to_json(s) FROM mqtt_emit.stats s'));
}

sub log_size { return (-s $node->logfile) // 0; }

sub log_since
{
	my ($offset) = @_;
	my $text = slurp_file($node->logfile);
	return length($text) > $offset ? substr($text, $offset) : '';
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

my $broker = start_broker();
$node = new_node('priv', broker => $broker);
sq(q{
CREATE EXTENSION pg_mqtt_emit;
CREATE ROLE alice LOGIN NOINHERIT;  -- admin_r's rights only after SET ROLE
CREATE ROLE bob LOGIN;
CREATE ROLE watcher LOGIN IN ROLE pg_monitor;
CREATE ROLE admin_r NOLOGIN;
GRANT admin_r TO alice;
CREATE TABLE secret(x int);
INSERT INTO secret VALUES (42);
GRANT SELECT ON secret TO admin_r;
CREATE TABLE pg_owned(id int PRIMARY KEY);
SELECT mqtt_emit.watch('pg_owned');
CREATE TABLE private_calls(who text, sess text);
CREATE FUNCTION private_fn(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
	INSERT INTO public.private_calls VALUES (current_user, session_user);
END $$;
REVOKE EXECUTE ON FUNCTION private_fn(mqtt_emit.event) FROM PUBLIC;
-- what alice's code may write only if it runs as a superuser
CREATE TABLE pwned(who text, sess text, what text);
-- the observer: a superuser listener that runs after alice's
CREATE TABLE observed(n serial, id text, what text, usr text, leak text, path text);
CREATE FUNCTION observer(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.observed(id, what, usr, leak, path)
	VALUES (e.result->>'id', e.result->>'what', current_user,
	        current_setting('mqtt_emit_test.leak', true), current_setting('search_path'));
END $$;
CREATE SCHEMA alice_s AUTHORIZATION alice;
CREATE SCHEMA bob_s AUTHORIZATION bob;
});

# alice's objects, made by alice
allowed('alice', q{
CREATE TABLE alice_s.t(id int PRIMARY KEY, what text);
CREATE TABLE alice_s.b(id int PRIMARY KEY);
CREATE TABLE alice_s.seen(id text, what text, usr text, sess text);
SELECT mqtt_emit.watch('alice_s.t', model => 'alice_t');
SELECT mqtt_emit.watch('alice_s.b', model => 'alice_b');
CREATE FUNCTION alice_s.l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	CASE e.result->>'what'
	WHEN 'ok' THEN
		NULL;
	WHEN 'read' THEN
		PERFORM x FROM public.secret;
	WHEN 'role_member' THEN
		SET ROLE admin_r;
	WHEN 'role_super' THEN
		SET ROLE postgres;
	WHEN 'session_auth' THEN
		SET SESSION AUTHORIZATION postgres;
	WHEN 'temp' THEN
		CREATE TEMP TABLE alice_tmp(x int);
	WHEN 'leak' THEN
		PERFORM pg_catalog.set_config('mqtt_emit_test.leak', 'from-alice', false);
	WHEN 'leak_local' THEN
		PERFORM pg_catalog.set_config('mqtt_emit_test.leak', 'from-alice-local', true);
	WHEN 'path' THEN
		PERFORM pg_catalog.set_config('search_path', 'alice_s, pg_catalog', false);
	ELSE
		NULL;
	END CASE;
	INSERT INTO alice_s.seen VALUES (e.result->>'id', e.result->>'what', current_user, session_user);
END $$;
SELECT mqtt_emit.listen('alice_t', 'alice_s.l(mqtt_emit.event)');
}, 'creates, watches its own tables and registers its listener');
sq(q{SELECT mqtt_emit.listen('alice_t', 'observer(mqtt_emit.event)');
     SELECT mqtt_emit.listen('alice_b', 'observer(mqtt_emit.event)');
     CREATE FUNCTION observer_pg(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
     BEGIN
         INSERT INTO public.observed(id, what, usr) VALUES (e.result->>'id', 'pg_owned', current_user);
     END $$;
     SELECT mqtt_emit.listen('pg_owned', 'observer_pg(mqtt_emit.event)');});
allowed('bob', q{
CREATE FUNCTION bob_s.l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
SELECT mqtt_emit.listen('alice_t', 'bob_s.l(mqtt_emit.event)');
}, 'registers a listener of its own');

# ---------------------------------------------------------------------------
# 1. the SQL API
# ---------------------------------------------------------------------------

denied('alice', q{SELECT mqtt_emit.watch('pg_owned')}, 'cannot watch a table she does not own');
denied('alice', q{SELECT mqtt_emit.watch('secret')}, 'cannot watch a table she may read but does not own');
denied('alice', q{SELECT mqtt_emit.unwatch('pg_owned')}, 'cannot unwatch a table she does not own');
is(sq(q{SELECT count(*) FROM mqtt_emit.watched_tables WHERE table_name = 'pg_owned'::regclass}), '1',
	'pg_owned is still watched');
denied('alice', q{SELECT mqtt_emit.listen('alice_t', 'private_fn(mqtt_emit.event)')},
	'cannot register a listener on a function she cannot execute');
denied('alice', q{SELECT * FROM mqtt_emit.outbox}, 'cannot read mqtt_emit.outbox');
denied('alice', q{INSERT INTO mqtt_emit.outbox (kind, flags, op, qos, model, payload) VALUES (2, 1, 0, 1, 'x/y', '{}')},
	'cannot write mqtt_emit.outbox');
denied('alice', q{DELETE FROM mqtt_emit.outbox}, 'cannot delete from mqtt_emit.outbox');
denied('alice', q{SELECT * FROM mqtt_emit.dead_letters}, 'cannot read mqtt_emit.dead_letters');
denied('alice', q{SELECT * FROM mqtt_emit.stats}, 'cannot read mqtt_emit.stats');
allowed('watcher', q{SELECT connected FROM mqtt_emit.stats}, 'pg_monitor member reads mqtt_emit.stats');
denied('watcher', q{SELECT count(*) FROM mqtt_emit.dead_letters}, 'pg_monitor member cannot read mqtt_emit.dead_letters (rows of any table)');
denied('alice', q{SELECT mqtt_emit.publish('x/y', 'text payload')}, 'cannot call mqtt_emit.publish(text, text)');
denied('alice', q{SELECT mqtt_emit.publish('x/y', '{"a":1}'::jsonb)}, 'cannot call mqtt_emit.publish(text, jsonb)');
denied('alice', q{SET mqtt_emit.enabled = off}, 'cannot SET mqtt_emit.enabled');
denied('alice', q{BEGIN; SET LOCAL mqtt_emit.enabled = off; COMMIT;}, 'cannot SET LOCAL mqtt_emit.enabled');
denied('alice', q{SELECT set_config('mqtt_emit.enabled', 'off', false)}, 'cannot set_config mqtt_emit.enabled');
denied('alice', q{SET mqtt_emit.delivery = durable}, 'cannot SET mqtt_emit.delivery');
denied('alice', q{SET mqtt_emit.overflow = drop}, 'cannot SET mqtt_emit.overflow');
allowed('alice', q{SET mqtt_emit.emit_remote = off; SET mqtt_emit.emit_local = off;},
	'may SET mqtt_emit.emit_remote / emit_local (per session, as documented)');

# the listener registry: each role its own rows
is((as_role('alice', q{SELECT string_agg(owner::text || ':' || listener::text, ',' ORDER BY id) FROM mqtt_emit.listeners}))[1],
	'alice:alice_s.l(mqtt_emit.event)', 'alice sees only her own listener');
is((as_role('bob', q{SELECT count(*) FROM mqtt_emit.listeners}))[1], '1', 'bob sees only his own listener');
is(sq(q{SELECT count(*) FROM mqtt_emit.listeners}), '5', 'the superuser sees all five');
my $bob_id = sq(q{SELECT id FROM mqtt_emit.listeners WHERE owner = 'bob'::regrole});
{
	my ($rc, $out, $err) = as_role('alice', "SELECT mqtt_emit.unlisten($bob_id)");
	isnt($rc, 0, 'alice cannot unlisten bob\'s listener');
}
as_role('alice', "DELETE FROM mqtt_emit.listeners WHERE id = $bob_id");
is(sq("SELECT count(*) FROM mqtt_emit.listeners WHERE id = $bob_id"), '1', 'bob\'s listener survives alice\'s DELETE');
denied('alice', q{UPDATE mqtt_emit.listeners SET owner = 'postgres'}, 'cannot UPDATE the registry');
denied('alice', q{INSERT INTO mqtt_emit.listeners (model, listener, owner) VALUES ('alice_t', 'observer(mqtt_emit.event)', 'postgres')},
	'cannot INSERT a listener owned by another role');

# ---------------------------------------------------------------------------
# 2. alice's listener at work
# ---------------------------------------------------------------------------

ok(poll_until(sub { stats()->{connected} }, $T), 'worker connected');
my $ev_id = 0;

# alice inserts a row; once the observer has seen it, return the counters'
# differences and the log since.
sub alice_event
{
	my ($what) = @_;
	$ev_id++;
	my $before = stats();
	my $off    = log_size();
	my ($rc, $out, $err) = as_role('alice', "INSERT INTO alice_s.t VALUES ($ev_id, '$what')");
	diag("alice's insert failed: $err") if $rc;
	my $seen = poll_until(sub { sq("SELECT count(*) FROM observed WHERE id = '$ev_id' AND what = '$what'") eq '1' }, $T);
	my $after = stats();
	return {
		id       => $ev_id,
		observed => $seen,
		calls    => $after->{listener_calls} - $before->{listener_calls},
		errors   => $after->{listener_errors} - $before->{listener_errors},
		log      => log_since($off),
		pid_same => ($after->{worker_pid} // 0) == ($before->{worker_pid} // -1),
	};
}

{
	my $r = alice_event('ok');
	ok($r->{observed}, 'event ok: the observer ran');
	is(sq("SELECT usr FROM alice_s.seen WHERE id = '$r->{id}'"), 'alice', 'alice\'s listener runs as alice (current_user)');
	is($r->{calls}, 2, 'two listener calls (alice, observer; bob may not read alice_s.t, so his listener does not get its rows)');
	is($r->{errors}, 0, 'no listener error');
	is(sq("SELECT usr FROM observed WHERE id = '$r->{id}'"), 'postgres', 'the observer runs as its owner');
}

for my $case (
	[ 'read', qr/permission denied for table secret/, 'reading a table she may not read' ],
	[ 'role_member', qr/cannot set parameter "role" within security-(restricted operation|definer function)/,
		'SET ROLE to a role she is a member of' ],
	[ 'role_super', qr/cannot set parameter "role" within security-(restricted operation|definer function)|permission denied/,
		'SET ROLE postgres (the superuser)' ],
	[ 'session_auth', qr/cannot set parameter "session_authorization" within security-(restricted operation|definer function)|permission denied/,
		'SET SESSION AUTHORIZATION postgres' ],
	[ 'temp', qr/cannot create temporary table within security-restricted operation/, 'CREATE TEMP TABLE' ],
  )
{
	my ($what, $msg, $name) = @$case;
	my $r = alice_event($what);
	ok($r->{observed}, "$name: the observer still ran");
	is(sq("SELECT count(*) FROM alice_s.seen WHERE id = '$r->{id}'"), '0', "$name: fails in alice's listener");
	is($r->{errors}, 1, "$name: counted as exactly one listener error");
	my ($line) = $r->{log} =~ /^(.*pg_mqtt_emit listener alice_s\.l\(mqtt_emit\.event\).*failed.*)$/m;
	like($line // '', $msg, "$name: logged with the listener and the reason");
	note($line // '(no line)');
	ok($r->{pid_same}, "$name: same worker");
}
is(sq(q{SELECT string_agg(DISTINCT usr, ',') FROM observed}), 'postgres', 'the observer always ran as postgres');
my ($rc_ctl) = as_role('alice', q{SET ROLE admin_r; SELECT x FROM public.secret;});
is($rc_ctl, 0, 'control: outside a listener alice may SET ROLE admin_r and read secret');

# the rows of a watched table alice may not read do not reach her through a
# listener on its model (listeners run with her rights: doc/DESIGN.md 4)
sq(q{
CREATE TABLE payroll(id int PRIMARY KEY, salary int);
SELECT mqtt_emit.watch('payroll');
CREATE FUNCTION observer_payroll(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.observed(id, what, usr) VALUES (e.result->>'id', 'payroll', current_user);
END $$;
});
{
	my ($rc, $out, $err) = as_role('alice', q{
CREATE TABLE alice_s.loot(row_text text);
CREATE FUNCTION alice_s.spy(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO alice_s.loot VALUES (e.result::text);
END $$;
SELECT mqtt_emit.listen('payroll', 'alice_s.spy(mqtt_emit.event)');
});
	note('alice: listen on model payroll ' . ($rc ? "refused: $err" : 'accepted'));
	sq(q{SELECT mqtt_emit.listen('payroll', 'observer_payroll(mqtt_emit.event)');
	     INSERT INTO payroll VALUES (1007, 123456);});
	ok(poll_until(sub { sq(q{SELECT count(*) FROM observed WHERE what = 'payroll' AND id = '1007'}) eq '1' }, $T),
		'payroll event: the observer ran');
	my ($rc2, $loot) = as_role('alice', q{SELECT coalesce(string_agg(row_text, ' '), '') FROM alice_s.loot});
	is($loot, '', 'alice\'s listener did not receive a row of payroll, which she may not read');
	denied('alice', q{SELECT * FROM payroll}, 'control: alice may not read payroll');
}

# ---------------------------------------------------------------------------
# 3. a listener leaves nothing behind
# ---------------------------------------------------------------------------

{
	my $r = alice_event('leak');
	ok($r->{observed}, 'leak: the observer ran');
	is(sq("SELECT count(*) FROM alice_s.seen WHERE id = '$r->{id}'"), '1', 'alice\'s listener set a setting (no error)');
	is(sq("SELECT coalesce(leak, '') FROM observed WHERE id = '$r->{id}'"), '',
		'a setting alice\'s listener made is not seen by the next listener (another role)');
	my $r2 = alice_event('ok');
	is(sq("SELECT coalesce(leak, '') FROM observed WHERE id = '$r2->{id}'"), '',
		'nor by listeners of the next event');
	my $r3 = alice_event('leak_local');
	is(sq("SELECT coalesce(leak, '') FROM observed WHERE id = '$r3->{id}'"), '',
		'a transaction-local setting of alice\'s listener is not seen by the next listener either');
}

# search_path: the worker's own queries run as the superuser; if a listener's
# search_path outlived its call, alice's objects would take the place of
# pg_catalog's in them. Alice prepares a domain "text" whose check writes to
# pwned (which only a superuser may), and an operator ~ for integers doing
# the same.
allowed('alice', q{
CREATE FUNCTION alice_s.pwn(v pg_catalog.text) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $$
BEGIN
	RAISE LOG 'alice-pwn ran as % for %', pg_catalog.current_user(), v;
	BEGIN
		INSERT INTO public.pwned VALUES (pg_catalog.current_user(), pg_catalog.session_user(), v);
	EXCEPTION WHEN OTHERS THEN NULL;
	END;
	RETURN true;
END $$;
CREATE DOMAIN alice_s.text AS pg_catalog.text CHECK (alice_s.pwn(VALUE));
CREATE FUNCTION alice_s.pwn_int(i pg_catalog.int4) RETURNS pg_catalog.int4 LANGUAGE plpgsql AS $$
BEGIN
	PERFORM alice_s.pwn('operator ~');
	RETURN OPERATOR(pg_catalog.~) i;
END $$;
CREATE OPERATOR alice_s.~ (RIGHTARG = pg_catalog.int4, FUNCTION = alice_s.pwn_int);
}, 'prepares a domain "text" and an operator ~ in her schema');
{
	my $r = alice_event('path');
	ok($r->{observed}, 'path: the observer ran');
	like(sq("SELECT path FROM observed WHERE id = '$r->{id}'"), qr/^"\$user", public$/,
		'the observer ran with its own search_path');
	# make the worker run its queries: reload the registry (any role may
	# register a listener), a durable event (outbox queries), another event
	allowed('alice', q{SELECT mqtt_emit.listen('alice_b', 'alice_s.l(mqtt_emit.event)')},
		'registers another listener (the worker reloads its registry)');
	sq(q{SET mqtt_emit.delivery = durable; INSERT INTO pg_owned VALUES (1);});
	ok(poll_until(sub { sq(q{SELECT count(*) FROM observed WHERE id = '1' AND what = 'pg_owned'}) eq '1' }, $T),
		'the durable event ran its local listener');
	my $r2 = alice_event('ok');
	ok($r2->{observed}, 'the worker still runs listeners');
	ok(poll_until(sub { stats()->{in_outbox} == 0 }, $T), 'the durable event left the outbox');
	is(sq(q{SELECT coalesce(string_agg(who || '/' || sess || '/' || what, ', '), '') FROM pwned WHERE who <> 'alice'}), '',
		'alice\'s code never ran as another role inside the worker');
	my @ran_as = grep { $_ ne 'alice' } slurp_file($node->logfile) =~ /alice-pwn ran as (\w+) for/g;
	is(join(',', @ran_as), '', 'the server log shows alice\'s code running as no other role');
}

# ---------------------------------------------------------------------------
# 4. the registry written directly, bypassing listen()
# ---------------------------------------------------------------------------

allowed('alice', q{
CREATE FUNCTION alice_s.notlistener(i int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO alice_s.seen VALUES ('notlistener', i::text, current_user, session_user);
END $$;
}, 'creates a function that is not a listener');
my $bypass = sub {
	my ($row, $name) = @_;
	my ($rc, $out, $err) = as_role('alice',
		"INSERT INTO mqtt_emit.listeners (model, listener, allow_remote) VALUES $row; SELECT mqtt_emit._listeners_changed();");
	note("$name: INSERT " . ($rc ? "refused: $err" : 'accepted'));
	return $rc;
};
$bypass->(q{('alice_b', 'alice_s.notlistener(integer)', false)}, 'not a listener');
$bypass->(q{('alice_b', 'private_fn(mqtt_emit.event)', false)}, 'private_fn');
my $sub_off = length($broker->log);
$bypass->(q{('+', 'alice_s.l(mqtt_emit.event)', true)}, 'wildcard model');

# a legitimate subscription made after them shows that the worker has
# reloaded its registry and synchronised its subscriptions
sq(q{SELECT mqtt_emit.listen('sync_marker', 'observer(mqtt_emit.event)', allow_remote => true)});
my $cid = $node->{mqtt_emit}{client_id};
# (the worker's own view of the SUBACK: mosquitto 2.1 writes its log file
# in blocks, so a line can reach it long after the fact)
ok( poll_until(
		sub {
			sq(qq{SELECT count(*) FROM mqtt_emit.subscriptions WHERE topic_filter = '$prefix/sync_marker/#' AND state = 'acknowledged'}) == 1;
		},
		$T),
	'the worker reloaded the registry and subscribed to sync_marker');
is(sq(q{SELECT count(*) FROM mqtt_emit.subscriptions WHERE topic_filter LIKE '%+%'}), 0,
	'no subscription of the worker has a "+" in it');
unlike(substr($broker->log, $sub_off), qr/\Q$cid\E-subscriber \d \Q$prefix\E\/\+\/#/,
	'a model "+" written into the registry directly does not make the worker subscribe to <prefix>/+/#');

my ($rc_b) = as_role('alice', q{INSERT INTO alice_s.b VALUES (1)});
is($rc_b, 0, 'alice writes to her table alice_s.b');
ok(poll_until(sub { sq(q{SELECT count(*) FROM observed WHERE what IS NULL AND id = '1'}) ne '0' }, $T),
	'the observer ran for that event (after the rows alice wrote into the registry)');
is(sq(q{SELECT count(*) FROM alice_s.seen WHERE id = 'notlistener'}), '0',
	'a function that is not f(mqtt_emit.event), written into the registry directly, is never called');
is(sq(q{SELECT count(*) FROM private_calls}), '0',
	'a function alice may not execute, written into the registry directly, is never called');
is(stats()->{worker_pid} ? 1 : 0, 1, 'the worker is still running');

$node->stop;
done_testing();
