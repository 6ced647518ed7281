#!/usr/bin/perl
#
# 047_model_ownership.pl: a model name is owned, and a listener sees a local
# row only if its role could SELECT that row (README, "Security").
#
# One real cluster and a real mosquitto; everything hostile is done by
# unprivileged LOGIN roles over their own connections.
#
# 1. Forged events through a borrowed model name.  The superuser watches
#    table users under model "user" and has a listener on it.  Role eve
#    tries to publish under "user": watch() on a temporary table (0A000),
#    watch() on a table of her own under "user" or "USER" (42501), a capture
#    trigger written by hand on her own table (the INSERT fails, 42501, also
#    under a model bound to no role) and on a temporary table (0A000).  None of her rows may reach the superuser's
#    listener or the bus; a later row of users does (the marker: events are
#    handled and published in order).  Eve may publish under a model of her
#    own; bob may not bind his table to it, a superuser may; once every table
#    of eve's under her model is unwatched, the name is free again.
# 2. Row security.  Table docs has a policy USING (owner_name =
#    current_user); alice and bob may SELECT it and listen on it.  Each gets
#    exactly the rows a SELECT would show them (inserts, an update that moves
#    a row from alice to bob: the new row decides; a delete: the old row),
#    a restrictive policy hides more, a policy that fails to evaluate hides
#    the row (fail closed, logged) without stopping the listener worker, and
#    the table's owner (without FORCE) and a superuser get every row.
use strict;
use warnings;

use MqttEmitTest qw(:DEFAULT log_since role_fails role_works);
use PostgreSQL::Test::Utils;
use Test::More;

my $T = 60;

my $node;

sub sq { return $node->safe_psql('postgres', $_[0]); }

# $sql as $role: (exit code, stdout, stderr with SQLSTATEs)
sub as_role { return MqttEmitTest::as_role($node, @_); }

# $sql as $role fails with $state; with $hint, a second assertion on it
sub denied
{
	my ($role, $sql, $name, $state, $hint) = @_;
	my $err = role_fails($node, $role, $sql, $state, $name);
	like($err, $hint, "$role: $name: the error has a hint") if $hint;
	return;
}

sub allowed { return role_works($node, @_); }

my $broker = start_broker();
$node = new_node('own', broker => $broker);
my $sub = start_subscriber($broker, topic_prefix() . '/#');

sq(q{
CREATE EXTENSION pg_mqtt_emit;
CREATE ROLE eve LOGIN;
CREATE ROLE bob LOGIN;
CREATE ROLE alice LOGIN;
CREATE ROLE carol LOGIN;
CREATE SCHEMA eve_s AUTHORIZATION eve;
CREATE SCHEMA bob_s AUTHORIZATION bob;
CREATE SCHEMA alice_s AUTHORIZATION alice;
CREATE SCHEMA carol_s AUTHORIZATION carol;
CREATE TABLE users(id int PRIMARY KEY, name text, is_admin bool);
SELECT mqtt_emit.watch('users', model => 'user');
CREATE TABLE seen(n serial, id int, name text, usr text, origin text);
CREATE FUNCTION pg_listener(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.seen(id, name, usr, origin)
	VALUES ((e.result->>'id')::int, e.result->>'name', current_user, e.origin);
END $$;
SELECT mqtt_emit.listen('user', 'pg_listener(mqtt_emit.event)');
});

# ---------------------------------------------------------------------------
# 1. a model name is owned
# ---------------------------------------------------------------------------

denied('eve', q{
CREATE TEMP TABLE fake(id int, name text, is_admin bool);
GRANT SELECT ON fake TO PUBLIC;
SELECT mqtt_emit.watch('fake', model => 'user');
INSERT INTO fake VALUES (666, 'eve', true);
}, 'cannot watch a temporary table', '0A000', qr/HINT:.*permanent table/);
denied('eve', q{
CREATE TEMP TABLE fake2(id int, name text, is_admin bool);
SELECT mqtt_emit.watch('fake2', model => 'eve_temp');
}, 'cannot watch a temporary table under a fresh model either', '0A000');

allowed('eve', q{
CREATE TABLE eve_s.fake(id int PRIMARY KEY, name text, is_admin bool);
GRANT SELECT ON eve_s.fake TO PUBLIC;
}, 'creates a table of her own');
denied('eve', q{SELECT mqtt_emit.watch('eve_s.fake', model => 'user')},
	'cannot watch her table under the superuser\'s model', '42501',
	qr/HINT:.*model name of its own/);
denied('eve', q{SELECT mqtt_emit.watch('eve_s.fake', model => 'USER')},
	'nor under the same name in upper case (models match case-insensitively)', '42501');
is(sq(q{SELECT count(*) FROM mqtt_emit.watched_tables WHERE table_name = 'eve_s.fake'::regclass}),
	'0', 'eve_s.fake is not watched');

denied('eve', q{
CREATE TRIGGER forged AFTER INSERT ON eve_s.fake FOR EACH ROW
    EXECUTE FUNCTION mqtt_emit.capture('user', 'true', 'all');
INSERT INTO eve_s.fake VALUES (667, 'eve', true);
}, 'a capture trigger written by hand under "user" fails the INSERT', '42501',
	qr/HINT:.*mqtt_emit\.watch/);
denied('eve', q{
CREATE TEMP TABLE fake3(id int, name text, is_admin bool);
CREATE TRIGGER forged AFTER INSERT ON fake3 FOR EACH ROW
    EXECUTE FUNCTION mqtt_emit.capture('User', 'true', 'all');
INSERT INTO fake3 VALUES (668, 'eve', true);
}, 'one on a temporary table fails it too', '0A000');
denied('eve', q{
CREATE TABLE eve_s.fake4(id int, name text, is_admin bool);
CREATE TRIGGER forged AFTER INSERT ON eve_s.fake4 FOR EACH ROW
    EXECUTE FUNCTION mqtt_emit.capture('nobody_has_this', 'true', 'all');
INSERT INTO eve_s.fake4 VALUES (669, 'eve', true);
}, 'and one under a model bound to no role', '42501');

# the marker: once its event is handled and published, eve's would have been
sq(q{INSERT INTO users VALUES (1, 'marker', false)});
ok(poll_until(sub { sq(q{SELECT count(*) FROM seen WHERE id = 1}) eq '1' }, $T),
	'the superuser\'s listener got the row of users');
ok(poll_until(sub { grep { $_ eq '1' } arrived_ids($sub, 'user') }, $T),
	'the row of users was published');
is(sq(q{SELECT string_agg(id::text, ',' ORDER BY n) FROM seen}), '1',
	'no row of eve\'s reached the superuser\'s listener');
is(join(',', sort(arrived_ids($sub, 'user'), arrived_ids($sub, 'User'))), '1',
	'no row of eve\'s was published under "user"');

# a model of her own
allowed('eve', q{
CREATE TABLE eve_s.own(id int PRIMARY KEY);
SELECT mqtt_emit.watch('eve_s.own', model => 'eve_model');
INSERT INTO eve_s.own VALUES (10);
}, 'watches her own table under a model of her own and writes to it');
ok(poll_until(sub { grep { $_ eq '10' } arrived_ids($sub, 'eve_model') }, $T),
	'eve\'s event was published under her model');
is(sq(q{SELECT model || '=' || owner::text FROM mqtt_emit.models WHERE model IN ('eve_model', 'user') ORDER BY 1}),
	"eve_model=eve\nuser=postgres", 'mqtt_emit.models shows who owns which model');
allowed('bob', q{CREATE TABLE bob_s.t(id int PRIMARY KEY)}, 'creates a table');
denied('bob', q{SELECT mqtt_emit.watch('bob_s.t', model => 'eve_model')},
	'cannot bind his table to eve\'s model', '42501');
denied('bob', q{SELECT mqtt_emit.watch('bob_s.t', model => 'user')},
	'nor to the superuser\'s', '42501');
denied('eve', q{INSERT INTO mqtt_emit.models VALUES ('user', 'eve')},
	'cannot write mqtt_emit.models directly', '42501');
denied('eve', q{DELETE FROM mqtt_emit.models WHERE model = 'user'},
	'cannot delete from mqtt_emit.models', '42501');
sq(q{SELECT mqtt_emit.watch('bob_s.t', model => 'eve_model')});
allowed('bob', q{INSERT INTO bob_s.t VALUES (20)},
	'a table a superuser bound to eve\'s model publishes');
ok(poll_until(sub { grep { $_ eq '20' } arrived_ids($sub, 'eve_model') }, $T),
	'bob\'s event was published under eve_model');
sq(q{SELECT mqtt_emit.unwatch('bob_s.t')});

# freed once eve's last table under it is unwatched
allowed('eve', q{SELECT mqtt_emit.unwatch('eve_s.own')}, 'unwatches her table');
allowed('bob', q{SELECT mqtt_emit.watch('bob_s.t', model => 'eve_model')},
	'then bob may take the name');
denied('eve', q{
CREATE TRIGGER forged2 AFTER INSERT ON eve_s.own FOR EACH ROW
    EXECUTE FUNCTION mqtt_emit.capture('eve_model', 'true', 'all');
INSERT INTO eve_s.own VALUES (11);
}, 'and eve\'s trigger by hand under it no longer publishes', '42501');
sq(q{ALTER TABLE bob_s.t OWNER TO eve; GRANT USAGE ON SCHEMA bob_s TO eve});
denied('eve', q{INSERT INTO bob_s.t VALUES (21)},
	'a watched table given to another owner loses the model', '42501');

# ---------------------------------------------------------------------------
# 2. row security
# ---------------------------------------------------------------------------

sq(q{
CREATE TABLE docs(id int PRIMARY KEY, owner_name text, body text);
ALTER TABLE docs OWNER TO carol;
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON docs FOR SELECT USING (owner_name = current_user);
GRANT SELECT ON docs TO alice, bob;
SELECT mqtt_emit.watch('docs');
});
for my $r (qw(alice bob carol))
{
	allowed($r, qq{
CREATE TABLE ${r}_s.got(n serial, id int, op text, usr text);
CREATE FUNCTION ${r}_s.l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
	INSERT INTO ${r}_s.got(id, op, usr) VALUES ((e.result->>'id')::int, e.operation, current_user);
END \$\$;
SELECT mqtt_emit.listen('docs', '${r}_s.l(mqtt_emit.event)');
}, 'registers a listener on docs');
}
# the superuser's runs last for every event: once it has seen an event, the
# others have had it
sq(q{
CREATE TABLE docs_seen(n serial, id int, op text);
CREATE FUNCTION docs_l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.docs_seen(id, op) VALUES ((e.result->>'id')::int, e.operation);
END $$;
SELECT mqtt_emit.listen('docs', 'docs_l(mqtt_emit.event)');
});

my $round = 0;
sub got
{
	my ($r) = @_;
	return sq(qq{SELECT coalesce(string_agg(op || ':' || id, ',' ORDER BY n), '') FROM ${r}_s.got});
}

# run $sql as the owner, wait until the superuser's listener has seen
# $expect_seen events in all
sub change_and_wait
{
	my ($sql, $expect_seen, $name) = @_;
	sq($sql);
	ok(poll_until(sub { sq('SELECT count(*) FROM docs_seen') eq $expect_seen }, $T),
		"the superuser's listener got every event: $name");
	return;
}

change_and_wait(q{INSERT INTO docs VALUES (1, 'alice', 'a'), (2, 'bob', 'b'), (3, 'alice', 'c')},
	'3', 'inserts');
my (undef, $direct) = as_role('alice', q{SELECT string_agg(id::text, ',' ORDER BY id) FROM docs});
is($direct, '1,3', 'a direct SELECT shows alice rows 1 and 3');
is(got('alice'), 'create:1,create:3', 'alice\'s listener got only her rows');
is(got('bob'), 'create:2', 'bob\'s listener got only his row');
is(got('carol'), 'create:1,create:2,create:3', 'the table owner (no FORCE) got every row');

change_and_wait(q{UPDATE docs SET owner_name = 'bob' WHERE id = 1}, '4', 'update');
is(got('alice'), 'create:1,create:3', 'an update that gives the row to bob: alice does not get it (the new row decides)');
is(got('bob'), 'create:2,update:1', 'bob gets it');
change_and_wait(q{DELETE FROM docs WHERE id = 3}, '5', 'delete');
is(got('alice'), 'create:1,create:3,delete:3', 'alice gets the delete of her row (the old row decides)');
is(got('bob'), 'create:2,update:1', 'bob does not');

sq(q{CREATE POLICY not_hidden ON docs AS RESTRICTIVE FOR SELECT USING (body <> 'hidden')});
change_and_wait(q{INSERT INTO docs VALUES (4, 'alice', 'hidden'), (5, 'alice', 'shown')}, '7',
	'restrictive policy');
is(got('alice'), 'create:1,create:3,delete:3,create:5', 'a restrictive policy hides row 4 from alice');
is(got('carol'), 'create:1,create:2,create:3,update:1,delete:3,create:4,create:5',
	'the owner still gets every row');

sq(q{CREATE POLICY breaks ON docs AS RESTRICTIVE FOR SELECT USING (1 / (id - 6) IS NOT NULL)});
my $off = -s $node->logfile;
change_and_wait(q{INSERT INTO docs VALUES (6, 'alice', 'x'), (7, 'alice', 'y')}, '9',
	'a policy that fails for row 6');
is(got('alice'), 'create:1,create:3,delete:3,create:5,create:7',
	'a row whose policy check fails is not delivered, the next one is');
like(log_since($node, $off), qr/pg_mqtt_emit could not check row security.*docs/,
	'the failed check is logged');

sq(q{ALTER TABLE docs FORCE ROW LEVEL SECURITY});
change_and_wait(q{INSERT INTO docs VALUES (8, 'bob', 'z')}, '10', 'FORCE ROW LEVEL SECURITY');
like(got('carol'), qr/create:7$/, 'with FORCE the owner is subject to the policies too');
is(got('bob'), 'create:2,update:1,create:8', 'bob gets his row');

done_testing();
