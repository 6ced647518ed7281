#!/usr/bin/perl
#
# 010_publish.pl: the publish path end to end.  A real mosquitto broker, one
# PostgreSQL cluster with pg_mqtt_emit, and a mosquitto_sub on the test's topic
# prefix that must see exactly the expected topics and payloads (doc/DESIGN.md
# sections 3, 5 and 6): INSERT/UPDATE/DELETE, multi-row statements, reserved
# and mixed-case names, schema-qualified tables and custom models, topic-level
# escaping, column lists, emit switches, many column types compared with the
# row's to_jsonb(), rollbacks, savepoints, commit order, topic styles and
# mqtt_emit.publish().
#
# Absence is proved with markers: a row of the watched table "marker" is
# committed after the step, and once that marker's event has arrived every
# event committed before it has arrived too (one queue, published in commit
# order, QoS 1 to one subscriber).  Whatever else arrived before the marker is
# the step's output, and it must be exactly what the step expects.
use strict;
use warnings;

use IPC::Run ();
use JSON::PP ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes ();
use Time::Local qw(timegm);

my $TIMEOUT = 60;    # seconds for one marker to come back

# All nodes of the script share topic_prefix(); this node publishes below it,
# with upper case letters, so that topic_style 'all' (which lowercases the
# whole topic) is visible to the same subscriber.
my $base   = topic_prefix();
my $pfx    = "$base/Pub";
my $broker = start_broker();
my $node   = new_node('pub', broker => $broker, topic_prefix => $pfx,
	max_prepared_transactions => 2);
my $cid    = $node->{mqtt_emit}{client_id};

$node->safe_psql('postgres', 'CREATE EXTENSION pg_mqtt_emit');
ok( poll_until(
		sub {
			$node->safe_psql('postgres', 'SELECT connected FROM mqtt_emit.stats') eq 't';
		},
		$TIMEOUT),
	'worker connected to the broker');

my $sub = start_subscriber($broker, "$base/#");

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# payloads and psql output are UTF-8 bytes
my $JSON  = JSON::PP->new->utf8->allow_bignum->allow_nonref;
my $CANON = JSON::PP->new->utf8->canonical->allow_bignum->allow_nonref;

sub jdecode
{
	my ($text) = @_;
	return eval { $JSON->decode($text) };
}

# Canonical JSON text of a value (decoded structure or JSON text): keys
# sorted, numbers exact (bignum), so two values compare as strings.
sub canon
{
	my ($v) = @_;
	$v = $JSON->decode($v) if defined $v && !ref $v;
	return $CANON->encode($v);
}

# Top-level members of a JSON object text, in order, as [key, raw value].
sub members
{
	my ($s) = @_;
	my @out;
	my $depth = 0;
	my ($key, $vstart);
	my $want_key = 0;
	pos($s) = 0;
	while ($s =~ /\G(?:("(?:[^"\\]++|\\.)*+")|([{}\[\],:])|([^"{}\[\],:]++))/gcs)
	{
		my $endpos = pos($s);
		if (defined $1)
		{
			if ($depth == 1 && $want_key)
			{
				$key      = $JSON->decode($1);
				$want_key = 0;
			}
			next;
		}
		next if defined $3;
		my $c = $2;
		if ($c eq '{' || $c eq '[')
		{
			$depth++;
			$want_key = 1 if $depth == 1 && $c eq '{';
		}
		elsif ($c eq ':' && $depth == 1)
		{
			$vstart = $endpos;
		}
		elsif (($c eq ',' && $depth == 1) || ($c eq '}' && $depth == 1))
		{
			push @out, [ $key, substr($s, $vstart, $endpos - 1 - $vstart) ]
			  if defined $key;
			$key      = undef;
			$want_key = 1;
			$depth-- if $c eq '}';
		}
		elsif ($c eq '}' || $c eq ']')
		{
			$depth--;
		}
	}
	return @out;
}

sub keys_in_order
{
	my ($s) = @_;
	return [ map { $_->[0] } members($s) ];
}

sub raw_member
{
	my ($s, $k) = @_;
	for my $m (members($s))
	{
		return $m->[1] if $m->[0] eq $k;
	}
	return undef;
}

my $cursor = 0;    # index of the first record not yet returned
my $marker = 0;
my %event_ids;     # eventId => count, over the whole script

sub marker_n
{
	my ($rec) = @_;
	return undef unless index($rec->{payload}, '"marker"') >= 0;
	my $d = jdecode($rec->{payload});
	return undef
	  unless ref $d eq 'HASH' && ($d->{model} // '') eq 'marker'
	  && ref $d->{result} eq 'HASH';
	return $d->{result}{n};
}

# Commit a marker row and wait for its event; returns the records (hashes:
# topic, payload, qos) that arrived since the previous collect(), markers
# left out.
sub collect
{
	my ($what) = @_;
	my $k = ++$marker;
	$node->safe_psql('postgres', "INSERT INTO marker VALUES ($k)");
	my ($idx, @recs);
	my $found = poll_until(
		sub {
			@recs = $sub->records;
			for my $i ($cursor .. $#recs)
			{
				my $n = marker_n($recs[$i]);
				if (defined $n && $n == $k) { $idx = $i; return 1; }
			}
			return 0;
		},
		$TIMEOUT);
	if (!$found)
	{
		fail("marker $k (after: $what) arrived within $TIMEOUT s");
		return ();
	}
	my @got = grep { !defined marker_n($_) } @recs[ $cursor .. $idx - 1 ];
	$cursor = $idx + 1;
	for my $r (@got)
	{
		my $d = jdecode($r->{payload});
		# topic_style 'both' sends one event twice: count per style
		$event_ids{ $d->{eventId} . ($r->{topic} =~ m{/all$} ? ' (all)' : '') }++
		  if ref $d eq 'HASH' && defined $d->{eventId};
	}
	return @got;
}

# Run SQL (one psql call) and return what it published.
sub step
{
	my ($what, $sql) = @_;
	$node->safe_psql('postgres', $sql);
	return collect($what);
}

sub q1
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

# to_jsonb of the rows of a table matching a condition, decoded, by order.
sub rows_json
{
	my ($table, $where, $order) = @_;
	$order //= '1';
	my $out = q1(
		"SELECT to_jsonb(t)::text FROM $table t WHERE $where ORDER BY $order");
	return [ map { $JSON->decode($_) } grep { length } split /\n/, $out ];
}

sub row_json
{
	my ($table, $where) = @_;
	my $rows = rows_json($table, $where);
	die "row_json: " . scalar(@$rows) . " rows in $table where $where"
	  unless @$rows == 1;
	return $rows->[0];
}

sub topic_of
{
	my ($model, $op) = @_;
	return "$pfx/$model/$op";
}

# Check one row event record against expectations:
#   topic, model, op (create/update/delete), result, and for update: where,
#   data, old; for delete: where.  Expectations are decoded JSON or JSON text.
sub check_event
{
	my ($name, $rec, %x) = @_;
	if (!$rec)
	{
		fail("$name: event missing");
		return;
	}
	my ($topic, $raw) = ($rec->{topic}, $rec->{payload});
	is($topic, $x{topic}, "$name: topic");
	my $d = jdecode($raw);
	if (ref $d ne 'HASH')
	{
		fail("$name: payload is a JSON object: $raw");
		return;
	}
	my $op = $x{op};
	is_deeply(
		keys_in_order($raw),
		[
			qw(model operation args result timestamp eventId),
			($op eq 'create' ? () : ('old')), 'origin'
		],
		"$name: payload keys in order");
	is($d->{model},     $x{model}, "$name: model");
	is($d->{operation}, $op,       "$name: operation");
	my $args = raw_member($raw, 'args') // '{}';
	if ($op eq 'create')
	{
		is_deeply(keys_in_order($args), ['data'], "$name: args keys");
		is(canon($d->{args}{data}), canon($x{result}), "$name: args.data = new row");
	}
	elsif ($op eq 'update')
	{
		is_deeply(keys_in_order($args), [ 'where', 'data' ], "$name: args keys");
		is(canon($d->{args}{where}), canon($x{where}), "$name: args.where = key of old row");
		is(canon($d->{args}{data}), canon($x{data}), "$name: args.data = changed columns");
	}
	else
	{
		is_deeply(keys_in_order($args), ['where'], "$name: args keys");
		is(canon($d->{args}{where}), canon($x{where}), "$name: args.where = key");
	}
	is(canon($d->{result}), canon($x{result}), "$name: result");
	is(canon($d->{old}), canon($x{old}), "$name: old") if $op ne 'create';
	like($d->{timestamp} // '', qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/,
		"$name: timestamp is ISO 8601 UTC with ms");
	if (($d->{timestamp} // '') =~ /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)/)
	{
		my $t = timegm($6, $5, $4, $3, $2 - 1, $1);
		ok(abs($t - time()) < 600, "$name: timestamp is current ($d->{timestamp})");
	}
	like($d->{eventId} // '',
		qr/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/,
		"$name: eventId is a UUID");
	is($d->{origin}, $cid, "$name: origin is the node's client id");
	return $d;
}

sub topics
{
	return [ map { $_->{topic} } @_ ];
}

# ---------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------

q1(<<'SQL');
CREATE TABLE marker (n int PRIMARY KEY);
SELECT mqtt_emit.watch('marker');
CREATE TABLE "user" (id int PRIMARY KEY, name text, email text);
SELECT mqtt_emit.watch('"user"');
CREATE TABLE "MixedCase" ("Key" int, k2 text, "Val" text, PRIMARY KEY ("Key", k2));
SELECT mqtt_emit.watch('"MixedCase"');
CREATE SCHEMA app;
CREATE TABLE app.orders (id int PRIMARY KEY, total numeric(10,2), status text);
SELECT mqtt_emit.watch('app.orders');
CREATE TABLE app.line_items (id int PRIMARY KEY, order_id int, sku text);
SELECT mqtt_emit.watch('app.line_items', model => 'OrderLine');
CREATE TABLE odd (id int PRIMARY KEY, v text);
SELECT mqtt_emit.watch('odd', model => 'a/b+c#d%e f');
CREATE TABLE accounts (id int PRIMARY KEY, login text, password_hash text, note text);
SELECT mqtt_emit.watch('accounts', exclude_columns => '{password_hash}');
CREATE TABLE profiles (id int PRIMARY KEY, nick text, ssn text, salary int);
SELECT mqtt_emit.watch('profiles', columns => '{id,nick}');
CREATE TABLE quiet (id int PRIMARY KEY);
SELECT mqtt_emit.watch('quiet', emit => false);
CREATE TABLE plain (id int PRIMARY KEY, v text);
SQL

is(scalar(my @none = collect('setup')), 0, 'nothing published by the setup');

# ---------------------------------------------------------------------------
# INSERT, UPDATE, DELETE on a table named "user"
# ---------------------------------------------------------------------------

my @m = step('insert user', q{INSERT INTO "user" VALUES (1, 'Alice', 'alice@example.com')});
is_deeply(topics(@m), [ topic_of('user', 'create') ], 'insert: exactly one event');
my $alice = row_json('"user"', 'id = 1');
check_event('insert user', $m[0],
	topic => topic_of('user', 'create'), model => 'user', op => 'create',
	result => $alice);
like($m[0]{payload}, qr/^\{"model":"user","operation":"create","args":\{"data":\{"id":1,/,
	'insert: compact JSON, seed fields first');

# the bytes of a text value are escaped exactly as PostgreSQL's escape_json()
# writes them (row_to_json renders the same columns compactly, in order)
@m = step('insert escapes',
	q{INSERT INTO "user" VALUES (2, E'q" b\\\\ \\x01\\x1f\\b\\f\\n\\r\\t \\u00e9 \\u20ac', E'\\x7f\\x02"'), (3, '', NULL)});
is(raw_member($m[0]{payload}, 'result'),
	q1(q{SELECT row_to_json(u)::text FROM "user" u WHERE id = 2}),
	'insert: control characters, quotes and backslashes escaped as escape_json() does');
is(raw_member($m[1]{payload}, 'result'),
	q1(q{SELECT row_to_json(u)::text FROM "user" u WHERE id = 3}),
	'insert: an empty string and a null');
q1(q{DELETE FROM "user" WHERE id IN (2, 3)});
collect('delete escapes');

@m = step('update user', q{UPDATE "user" SET name = 'Alicia' WHERE id = 1});
is_deeply(topics(@m), [ topic_of('user', 'update') ], 'update: exactly one event');
check_event('update user', $m[0],
	topic => topic_of('user', 'update'), model => 'user', op => 'update',
	where  => { id => 1 },
	data   => { name => 'Alicia' },
	result => row_json('"user"', 'id = 1'),
	old    => $alice);

# an update that changes the primary key: where has the old key
my $alicia = row_json('"user"', 'id = 1');
@m = step('update user pk', q{UPDATE "user" SET id = 2, email = NULL WHERE id = 1});
check_event('update user pk', $m[0],
	topic => topic_of('user', 'update'), model => 'user', op => 'update',
	where  => { id => 1 },
	data   => { id => 2, email => undef },
	result => row_json('"user"', 'id = 2'),
	old    => $alicia);
is(scalar @m, 1, 'update of the key: one event');

# an update that changes nothing: data is empty
my $u2 = row_json('"user"', 'id = 2');
@m = step('no-op update', q{UPDATE "user" SET name = name WHERE id = 2});
is(scalar @m, 1, 'no-op update: one event');
check_event('no-op update', $m[0],
	topic => topic_of('user', 'update'), model => 'user', op => 'update',
	where => { id => 2 }, data => {}, result => $u2, old => $u2);

# without a primary key: the replica identity index, else the whole old row
q1(q{CREATE TABLE nopk (a int, b text);
	SELECT mqtt_emit.watch('nopk');
	CREATE TABLE ident (code text NOT NULL, v text);
	CREATE UNIQUE INDEX ident_code ON ident (code);
	ALTER TABLE ident REPLICA IDENTITY USING INDEX ident_code;
	SELECT mqtt_emit.watch('ident');
	INSERT INTO nopk VALUES (1, 'x');
	INSERT INTO ident VALUES ('k1', 'x')});
collect('no-pk setup');
@m = step('no pk', q{UPDATE nopk SET b = 'y'; UPDATE ident SET v = 'y'});
check_event('update without a key', $m[0],
	topic => topic_of('nopk', 'update'), model => 'nopk', op => 'update',
	where => { a => 1, b => 'x' }, data => { b => 'y' },
	result => { a => 1, b => 'y' }, old => { a => 1, b => 'x' });
check_event('update with a replica identity index', $m[1],
	topic => topic_of('ident', 'update'), model => 'ident', op => 'update',
	where => { code => 'k1' }, data => { v => 'y' },
	result => { code => 'k1', v => 'y' }, old => { code => 'k1', v => 'x' });

@m = step('delete user', q{DELETE FROM "user" WHERE id = 2});
is_deeply(topics(@m), [ topic_of('user', 'delete') ], 'delete: exactly one event');
check_event('delete user', $m[0],
	topic => topic_of('user', 'delete'), model => 'user', op => 'delete',
	where => { id => 2 }, result => $u2, old => $u2);

# ---------------------------------------------------------------------------
# multi-row statements
# ---------------------------------------------------------------------------

@m = step('multi-row insert',
	q{INSERT INTO "user" SELECT g, 'u' || g, NULL FROM generate_series(10, 14) g});
is_deeply(topics(@m), [ (topic_of('user', 'create')) x 5 ], 'multi-row insert: 5 events');
my $rows = rows_json('"user"', 'id BETWEEN 10 AND 14', 'id');
for my $i (0 .. 4)
{
	check_event("multi-row insert #$i", $m[$i],
		topic => topic_of('user', 'create'), model => 'user', op => 'create',
		result => $rows->[$i]);
}

my $before = $rows;
@m = step('multi-row update',
	q{UPDATE "user" SET name = upper(name) WHERE id BETWEEN 10 AND 14});
is_deeply(topics(@m), [ (topic_of('user', 'update')) x 5 ], 'multi-row update: 5 events');
my $after = rows_json('"user"', 'id BETWEEN 10 AND 14', 'id');
my @sorted = sort { (jdecode($a->{payload})->{old}{id} // 0) <=> (jdecode($b->{payload})->{old}{id} // 0) } @m;
for my $i (0 .. 4)
{
	check_event("multi-row update #$i", $sorted[$i],
		topic => topic_of('user', 'update'), model => 'user', op => 'update',
		where  => { id => 10 + $i },
		data   => { name => 'U' . (10 + $i) },
		result => $after->[$i],
		old    => $before->[$i]);
}

@m = step('multi-row delete', q{DELETE FROM "user" WHERE id BETWEEN 10 AND 12});
is_deeply(topics(@m), [ (topic_of('user', 'delete')) x 3 ], 'multi-row delete: 3 events');
@sorted = sort { (jdecode($a->{payload})->{result}{id} // 0) <=> (jdecode($b->{payload})->{result}{id} // 0) } @m;
for my $i (0 .. 2)
{
	check_event("multi-row delete #$i", $sorted[$i],
		topic => topic_of('user', 'delete'), model => 'user', op => 'delete',
		where => { id => 10 + $i }, result => $after->[$i], old => $after->[$i]);
}

# INSERT ... ON CONFLICT DO UPDATE: one create, one update
@m = step('upsert', q{INSERT INTO "user" VALUES (13, 'x', NULL), (20, 'new', NULL)
	ON CONFLICT (id) DO UPDATE SET name = excluded.name});
is_deeply(topics(@m), [ topic_of('user', 'update'), topic_of('user', 'create') ],
	'upsert: update of the conflicting row, create of the new one, in row order');

# COPY is a multi-row statement too
@m = step('copy', qq{COPY "user" (id, name) FROM stdin;\n90\tcopy-a\n91\tcopy-b\n\\.\n});
is_deeply([ map { jdecode($_->{payload})->{result}{name} } @m ], [ 'copy-a', 'copy-b' ],
	'COPY FROM: one create per row, in order');

# ---------------------------------------------------------------------------
# mixed case, schema-qualified tables, custom models, escaping
# ---------------------------------------------------------------------------

@m = step('MixedCase', q{INSERT INTO "MixedCase" VALUES (1, 'a', 'v1');
	UPDATE "MixedCase" SET "Val" = 'v2' WHERE "Key" = 1});
is_deeply(topics(@m), [ topic_of('MixedCase', 'create'), topic_of('MixedCase', 'update') ],
	'MixedCase: topics keep the case');
my $mc = row_json('"MixedCase"', '"Key" = 1');
check_event('MixedCase create', $m[0],
	topic => topic_of('MixedCase', 'create'), model => 'MixedCase', op => 'create',
	result => { Key => 1, k2 => 'a', Val => 'v1' });
check_event('MixedCase update', $m[1],
	topic => topic_of('MixedCase', 'update'), model => 'MixedCase', op => 'update',
	where  => { Key => 1, k2 => 'a' },    # composite primary key
	data   => { Val => 'v2' },
	result => $mc,
	old    => { Key => 1, k2 => 'a', Val => 'v1' });

@m = step('app.orders', q{INSERT INTO app.orders VALUES (7, 19.90, 'new')});
check_event('app.orders', $m[0],
	topic => topic_of('orders', 'create'), model => 'orders', op => 'create',
	result => row_json('app.orders', 'id = 7'));
is(scalar @m, 1, 'schema-qualified table: model is the table name');

@m = step('custom model', q{INSERT INTO app.line_items VALUES (1, 7, 'SKU-1')});
check_event('custom model', $m[0],
	topic => topic_of('OrderLine', 'create'), model => 'OrderLine', op => 'create',
	result => row_json('app.line_items', 'id = 1'));
is(scalar @m, 1, 'custom model: one event');

# watch() again changes the model
@m = step('re-watch with a model', q{SELECT mqtt_emit.watch('app.orders', model => 'Order');
	UPDATE app.orders SET status = 'paid' WHERE id = 7});
is_deeply(topics(@m), [ topic_of('Order', 'update') ], 're-watch: new model on the wire');
is(jdecode($m[0]{payload})->{model}, 'Order', 're-watch: model field');

@m = step('model with / + # %', q{INSERT INTO odd VALUES (1, 'x')});
is(scalar @m, 1, 'odd model: one event');
is($m[0]{topic}, "$pfx/a%2Fb%2Bc%23d%25e f/create",
	'odd model: /, +, # and % percent-encoded in the topic');
my @levels_pfx = split m{/}, $pfx, -1;
is(scalar(my @l = split m{/}, ($m[0]{topic} // ''), -1), @levels_pfx + 2,
	'odd model: no extra topic levels');
check_event('odd model', $m[0],
	topic => "$pfx/a%2Fb%2Bc%23d%25e f/create", model => 'a/b+c#d%e f', op => 'create',
	result => { id => 1, v => 'x' });

# ---------------------------------------------------------------------------
# column lists: excluded columns never on the wire
# ---------------------------------------------------------------------------

my $secret = 'S3CRET-' . int(rand(1e9));
@m = step('exclude_columns', qq{INSERT INTO accounts VALUES (1, 'bob', '$secret-1', 'n1');
	UPDATE accounts SET password_hash = '$secret-2', note = 'n2' WHERE id = 1;
	DELETE FROM accounts WHERE id = 1});
is_deeply(topics(@m),
	[ map { topic_of('accounts', $_) } qw(create update delete) ],
	'exclude_columns: three events');
ok(!grep({ $_->{payload} =~ /password_hash|\Q$secret\E/ } @m),
	'exclude_columns: neither the column nor its values are on the wire');
check_event('exclude create', $m[0],
	topic => topic_of('accounts', 'create'), model => 'accounts', op => 'create',
	result => { id => 1, login => 'bob', note => 'n1' });
check_event('exclude update', $m[1],
	topic => topic_of('accounts', 'update'), model => 'accounts', op => 'update',
	where  => { id => 1 },
	data   => { note => 'n2' },
	result => { id => 1, login => 'bob', note => 'n2' },
	old    => { id => 1, login => 'bob', note => 'n1' });
check_event('exclude delete', $m[2],
	topic => topic_of('accounts', 'delete'), model => 'accounts', op => 'delete',
	where => { id => 1 }, result => { id => 1, login => 'bob', note => 'n2' },
	old => { id => 1, login => 'bob', note => 'n2' });

# renaming the excluded column keeps it excluded
@m = step('exclude after rename', qq{ALTER TABLE accounts RENAME password_hash TO pw;
	INSERT INTO accounts VALUES (2, 'carol', '$secret-3', 'n3')});
is(scalar @m, 1, 'exclude after rename: one event');
ok(!grep({ $_->{payload} =~ /\Q$secret\E|"pw"/ } @m),
	'exclude after rename: renamed column still off the wire');

@m = step('columns', qq{INSERT INTO profiles VALUES (1, 'nick', '$secret-4', 1000);
	UPDATE profiles SET salary = 2000, nick = 'nick2' WHERE id = 1});
is(scalar @m, 2, 'columns: two events');
ok(!grep({ $_->{payload} =~ /ssn|salary|\Q$secret\E/ } @m),
	'columns: only the listed columns are on the wire');
check_event('columns create', $m[0],
	topic => topic_of('profiles', 'create'), model => 'profiles', op => 'create',
	result => { id => 1, nick => 'nick' });
check_event('columns update', $m[1],
	topic => topic_of('profiles', 'update'), model => 'profiles', op => 'update',
	where => { id => 1 }, data => { nick => 'nick2' },
	result => { id => 1, nick => 'nick2' }, old => { id => 1, nick => 'nick' });

# A partitioned table whose partition has another column layout (a dropped
# column shifts the attribute numbers): the excluded column must stay
# excluded in every partition.
q1(<<'SQL');
CREATE TABLE logins (id int, secret text, who text, PRIMARY KEY (id)) PARTITION BY RANGE (id);
CREATE TABLE logins_1 (dropme int, id int NOT NULL, secret text, who text);
ALTER TABLE logins_1 DROP COLUMN dropme;
ALTER TABLE logins ATTACH PARTITION logins_1 FOR VALUES FROM (0) TO (100);
CREATE TABLE logins_2 PARTITION OF logins FOR VALUES FROM (100) TO (200);
SELECT mqtt_emit.watch('logins', exclude_columns => '{secret}');
SQL
@m = step('partitioned exclude', qq{INSERT INTO logins VALUES (150, '$secret-p2', 'p2');
	INSERT INTO logins VALUES (50, '$secret-p1', 'p1')});
is_deeply(topics(@m), [ (topic_of('logins', 'create')) x 2 ],
	'partitioned table: events under the parent\'s model');
ok(!grep({ $_->{payload} =~ /\Q$secret\E|"secret"/ } @m),
	'partitioned table: excluded column off the wire in every partition')
  or diag(join "\n", map { $_->{payload} } @m);
is(canon(jdecode($m[1]{payload} // '{}')->{result} // {}), canon({ id => 50, who => 'p1' }),
	'partitioned table, partition with other attribute numbers: result');

# operations: only the listed ones
q1(q{CREATE TABLE only_del (id int PRIMARY KEY, v text);
	SELECT mqtt_emit.watch('only_del', operations => '{delete}')});
@m = step('operations', q{INSERT INTO only_del VALUES (1, 'a');
	UPDATE only_del SET v = 'b'; DELETE FROM only_del});
is_deeply(topics(@m), [ topic_of('only_del', 'delete') ],
	'operations => {delete}: only deletes published');

# a non-ASCII table name is one topic level as is
q1(q{CREATE TABLE "Café" (id int PRIMARY KEY); SELECT mqtt_emit.watch('"Café"')});
@m = step('non-ASCII model', q{INSERT INTO "Café" VALUES (1)});
is_deeply(topics(@m), [ topic_of('Café', 'create') ], 'non-ASCII model in the topic');
is(jdecode($m[0]{payload} // '{}')->{model}, do { my $c = 'Café'; utf8::decode($c); $c },
	'non-ASCII model in the payload');

# ---------------------------------------------------------------------------
# switches: emit => false, emit_remote, emit_local, enabled, unwatched
# ---------------------------------------------------------------------------

@m = step('emit => false', q{INSERT INTO quiet VALUES (1); UPDATE quiet SET id = 2; DELETE FROM quiet});
is(scalar @m, 0, 'emit => false: nothing published');

@m = step('emit_remote = off', q{BEGIN;
	SET LOCAL mqtt_emit.emit_remote = off;
	INSERT INTO "user" VALUES (30, 'hidden', NULL);
	COMMIT;
	INSERT INTO "user" VALUES (31, 'visible', NULL)});
is_deeply(topics(@m), [ topic_of('user', 'create') ],
	'SET LOCAL emit_remote = off: nothing published in that transaction');
is(jdecode($m[0]{payload})->{result}{id}, 31,
	'emit_remote is back on in the next transaction');

@m = step('emit_local = off', q{SET mqtt_emit.emit_local = off;
	INSERT INTO "user" VALUES (32, 'remote only', NULL)});
is_deeply(topics(@m), [ topic_of('user', 'create') ], 'emit_local = off still publishes');

@m = step('enabled = off', q{SET mqtt_emit.enabled = off;
	INSERT INTO "user" VALUES (33, 'not captured', NULL)});
is(scalar @m, 0, 'mqtt_emit.enabled = off: nothing published');

@m = step('unwatched', q{INSERT INTO plain VALUES (1, 'x')});
is(scalar @m, 0, 'unwatched table: nothing published');

@m = step('unwatch', q{SELECT mqtt_emit.unwatch('"MixedCase"');
	INSERT INTO "MixedCase" VALUES (2, 'b', 'x')});
is(scalar @m, 0, 'after unwatch: nothing published');

@m = step('watch quiet with emit', q{SELECT mqtt_emit.watch('quiet');
	INSERT INTO quiet VALUES (5)});
is_deeply(topics(@m), [ topic_of('quiet', 'create') ],
	'watch() again with emit => true publishes');

# ---------------------------------------------------------------------------
# types: result equals the row's to_jsonb()
# ---------------------------------------------------------------------------

q1(<<'SQL');
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN price AS numeric(12,2);
CREATE DOMAIN tags AS text[];
CREATE DOMAIN doc AS jsonb;
CREATE TYPE pair AS (x int, label text, at timestamptz);
CREATE TABLE typed (
  id int PRIMARY KEY,
  n numeric, n2 numeric(30,10), f8 double precision, f4 real,
  i2 smallint, i8 bigint, b boolean,
  ts timestamp, tstz timestamptz, d date, tm time, tmz timetz, iv interval,
  ia int[], ta text[], ia2 int[], tsa timestamptz[], ja jsonb[],
  j json, jb jsonb, by bytea, u uuid, m mood, pi posint, pr price, tg tags, dc doc,
  c pair, ca pair[], mny money, ip inet, bt bit varying, tx text, ch char(3)
);
SELECT mqtt_emit.watch('typed');
SQL

my %type_rows = (
	1 => q{(1,
	  12345678901234567890.12345678901234567890, -0.0000000001, 1.0000000000000002, 3.14,
	  -32768, 9223372036854775807, true,
	  '2026-03-01 12:34:56.789123', '2026-03-01 12:34:56.789+05', '2026-02-28', '23:59:59.5',
	  '10:00+02', '1 year 2 mons 3 days 04:05:06.5',
	  '{1,2,NULL,3}', '{"a b","c\"d",NULL,"é"}', '{{1,2},{3,4}}',
	  '{"2026-01-01 00:00:00+00",infinity}', ARRAY['{"a":1}'::jsonb, '[1,"x"]'],
	  '{"k": [1, 2.50, "x"],  "n": null, "k": "dup"}',
	  '{"nested": {"a": [true, false, null]}, "num": 1.50, "big": 123456789012345678901234567890}',
	  '\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', 42, 19.99, '{x,y}',
	  '{"d": 1}',
	  ROW(1, 'lbl', '2026-01-01 00:00+00'), ARRAY[ROW(2, 'z', NULL)::pair], 12.34,
	  '192.168.0.1/24', B'1010',
	  E'quote " backslash \\\\ slash / tab \t newline \n cr \r ctrl \x01 \x1f unicode \u2603 emoji \U0001F600',
	  'ab')},
	2 => q{(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
	  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
	  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)},
	3 => q{(3, 'NaN', 0, 'Infinity', '-Infinity', 0, -9223372036854775808, false,
	  'infinity', '-infinity', 'infinity', '00:00', '00:00+00', '0',
	  '{}', '{}', '{}', '{}', '{}', '[]', '"just a string"', '\x', '00000000-0000-0000-0000-000000000000',
	  'sad', 1, 0, '{}', 'null', ROW(NULL, NULL, NULL), '{}', 0, '::1', B'', '', '   ')},
	4 => q{(4, 'Infinity', 1e-10, 'NaN', 1e30, 1, 1, true, '1999-12-31 23:59:59',
	  '2000-01-01 00:00:00.000001+00', '0001-01-01 BC', '12:00', '12:00-11:30', '-1 day',
	  '{-1}', '{""}', '{{NULL}}', '{NULL}', '{null}', '123.4500', '1e2', '\xdeadbeef',
	  NULL, 'ok', 2147483647, -0.5, '{""}', '[1, 2.0, 3e1]', ROW(0, '', 'infinity'),
	  '{"(1,a,)"}', -1, '10.0.0.0/8', B'1', 'x', 'xyz')},
);
for my $id (sort keys %type_rows)
{
	@m = step("types row $id", "INSERT INTO typed VALUES $type_rows{$id}");
	is(scalar @m, 1, "types row $id: one event");
	my $expect = row_json('typed', "id = $id");
	my $d      = check_event("types row $id", $m[0],
		topic => topic_of('typed', 'create'), model => 'typed', op => 'create',
		result => $expect);
	my $raw_result = raw_member($m[0]{payload} // '{}', 'result') // 'null';
	is( q1( "SELECT \$pl\$$raw_result\$pl\$::jsonb = to_jsonb(t) FROM typed t WHERE id = $id"),
		't', "types row $id: result::jsonb = to_jsonb(row) in SQL");
}

# an update of every column type, and a delete
my $old3 = row_json('typed', 'id = 3');
@m = step('types update', q{UPDATE typed SET (n, n2, f8, f4, i2, i8, b, ts, tstz, d, tm,
	tmz, iv, ia, ta, ia2, tsa, ja, j, jb, by, u, m, pi, pr, tg, dc, c, ca, mny, ip, bt, tx, ch)
	= (SELECT n, n2, f8, f4, i2, i8, b, ts, tstz, d, tm, tmz, iv, ia, ta, ia2, tsa, ja,
	   j, jb, by, u, m, pi, pr, tg, dc, c, ca, mny, ip, bt, tx, ch FROM typed WHERE id = 1)
	WHERE id = 3});
my $new3 = row_json('typed', 'id = 3');
my %changed = %$new3;
delete $changed{id};
check_event('types update', $m[0],
	topic => topic_of('typed', 'update'), model => 'typed', op => 'update',
	where => { id => 3 }, data => \%changed, result => $new3, old => $old3);
is(scalar @m, 1, 'types update: one event');

my $old1 = row_json('typed', 'id = 1');
@m = step('types delete', q{DELETE FROM typed WHERE id = 1});
check_event('types delete', $m[0],
	topic => topic_of('typed', 'delete'), model => 'typed', op => 'delete',
	where => { id => 1 }, result => $old1, old => $old1);

# a 100 kB TOASTed text (stored out of line, uncompressed)
q1(<<'SQL');
CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
ALTER TABLE docs ALTER body SET STORAGE EXTERNAL;
SELECT mqtt_emit.watch('docs');
SQL
@m = step('toast insert', q{INSERT INTO docs
	SELECT 1, 'big', string_agg(md5(g::text), '') FROM generate_series(1, 3200) g});
is(q1(q{SELECT length(body) FROM docs WHERE id = 1}), '102400', 'toast: 100 kB body');
ok(q1(q{SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE oid = 'docs'::regclass}) eq 't',
	'toast: the body is stored in the TOAST table');
my $doc1 = row_json('docs', 'id = 1');
check_event('toast insert', $m[0],
	topic => topic_of('docs', 'create'), model => 'docs', op => 'create', result => $doc1);
is(length(jdecode($m[0]{payload} // '{}')->{result}{body} // ''), 102400,
	'toast insert: the whole body is in the payload');

@m = step('toast update', q{UPDATE docs SET title = 'bigger' WHERE id = 1});
check_event('toast update', $m[0],
	topic => topic_of('docs', 'update'), model => 'docs', op => 'update',
	where => { id => 1 }, data => { title => 'bigger' },
	result => row_json('docs', 'id = 1'), old => $doc1);
my $doc1b = row_json('docs', 'id = 1');

@m = step('toast delete', q{DELETE FROM docs WHERE id = 1});
check_event('toast delete', $m[0],
	topic => topic_of('docs', 'delete'), model => 'docs', op => 'delete',
	where => { id => 1 }, result => $doc1b, old => $doc1b);

# ---------------------------------------------------------------------------
# rollbacks and savepoints publish nothing
# ---------------------------------------------------------------------------

@m = step('rollback', q{BEGIN; INSERT INTO "user" VALUES (40, 'rb', NULL);
	SELECT mqtt_emit.publish('} . "$base/adhoc/rolledback" . q{', 'x'); ROLLBACK});
is(scalar @m, 0, 'rolled-back transaction: nothing published');

my ($rc, $out, $err) = $node->psql('postgres',
	q{BEGIN; INSERT INTO "user" VALUES (41, 'ok', NULL); INSERT INTO "user" VALUES (41, 'dup', NULL); COMMIT;});
isnt($rc, 0, 'failing transaction fails');
@m = collect('failed transaction');
is(scalar @m, 0, 'failed transaction: nothing published');

q1(q{CREATE TABLE deferred (id int PRIMARY KEY, k int UNIQUE DEFERRABLE INITIALLY DEFERRED);
	SELECT mqtt_emit.watch('deferred')});
($rc, $out, $err) = $node->psql('postgres',
	q{BEGIN; INSERT INTO deferred VALUES (1, 1), (2, 1); COMMIT;});
isnt($rc, 0, 'transaction failing at commit (deferred constraint) fails');
@m = collect('deferred failure');
is(scalar @m, 0, 'transaction failing at commit: nothing published');

# PREPARE TRANSACTION with pending events: a clear error, nothing published
($rc, $out, $err) = $node->psql('postgres',
	q{BEGIN; INSERT INTO "user" VALUES (45, 'prepared', NULL); PREPARE TRANSACTION 'p1';});
isnt($rc, 0, 'PREPARE TRANSACTION with pending events fails');
like($err, qr/pending pg_mqtt_emit events/, 'PREPARE TRANSACTION: clear error');
is(q1(q{SELECT count(*) FROM pg_prepared_xacts}), '0', 'nothing left prepared');
@m = collect('prepare');
is(scalar @m, 0, 'PREPARE TRANSACTION: nothing published');

@m = step('savepoints', q{BEGIN;
	INSERT INTO "user" VALUES (50, 'kept-1', NULL);
	SAVEPOINT a;
	INSERT INTO "user" VALUES (51, 'rolled back', NULL);
	SAVEPOINT b;
	INSERT INTO "user" VALUES (52, 'rolled back too', NULL);
	ROLLBACK TO SAVEPOINT a;
	INSERT INTO "user" VALUES (53, 'kept-2', NULL);
	SAVEPOINT c;
	SAVEPOINT d;
	INSERT INTO "user" VALUES (54, 'released then rolled back', NULL);
	RELEASE SAVEPOINT d;
	ROLLBACK TO SAVEPOINT c;
	SAVEPOINT e;
	INSERT INTO "user" VALUES (55, 'kept-3', NULL);
	RELEASE SAVEPOINT e;
	COMMIT});
is_deeply([ map { jdecode($_->{payload})->{result}{id} } @m ], [ 50, 53, 55 ],
	'savepoints: only the events outside rolled-back savepoints, in order');

@m = step('plpgsql exception block', q{DO $$
BEGIN
	INSERT INTO "user" VALUES (60, 'kept', NULL);
	BEGIN
		INSERT INTO "user" VALUES (61, 'undone', NULL);
		RAISE EXCEPTION 'boom';
	EXCEPTION WHEN raise_exception THEN
		NULL;
	END;
	INSERT INTO "user" VALUES (62, 'kept', NULL);
END
$$});
is_deeply([ map { jdecode($_->{payload})->{result}{id} } @m ], [ 60, 62 ],
	'exception block: the failed block published nothing');

# ---------------------------------------------------------------------------
# one transaction: statement order, only after commit
# ---------------------------------------------------------------------------

my $bg = $node->background_psql('postgres');
$bg->query_safe('BEGIN');
$bg->query_safe(q{INSERT INTO "user" VALUES (70, 'open', NULL)});
$bg->query_safe(q{UPDATE "user" SET name = 'open2' WHERE id = 70});
$bg->query_safe(q{INSERT INTO app.orders VALUES (70, 1.00, 'open')});
$bg->query_safe(q{SELECT mqtt_emit.publish('} . "$base/adhoc/open" . q{', 'in the open transaction')});
$bg->query_safe(q{DELETE FROM "user" WHERE id = 70});
@m = collect('open transaction');
is(scalar @m, 0,
	'nothing published while the transaction is open (a later commit\'s marker arrived)');
$bg->query_safe('COMMIT');
@m = collect('committed transaction');
is_deeply(
	topics(@m),
	[
		topic_of('user', 'create'), topic_of('user', 'update'),
		topic_of('Order', 'create'), "$base/adhoc/open", topic_of('user', 'delete')
	],
	'after commit: all events of the transaction, in statement order');

# two interleaved transactions: commit order, each transaction together
my $bg2 = $node->background_psql('postgres');
$bg->query_safe('BEGIN');
$bg->query_safe(q{INSERT INTO "user" VALUES (80, 'A1', NULL)});
$bg2->query_safe('BEGIN');
$bg2->query_safe(q{INSERT INTO "user" VALUES (81, 'B1', NULL)});
$bg->query_safe(q{INSERT INTO "user" VALUES (82, 'A2', NULL)});
$bg2->query_safe(q{INSERT INTO "user" VALUES (83, 'B2', NULL)});
$bg2->query_safe('COMMIT');
$bg->query_safe('COMMIT');
@m = collect('interleaved transactions');
is_deeply([ map { jdecode($_->{payload})->{result}{name} } @m ], [qw(B1 B2 A1 A2)],
	'interleaved transactions: in commit order, each in statement order');

# durable delivery (events written to the outbox by the committing
# transaction) mixed with memory delivery: still commit order
@m = step('durable and memory', q{
	INSERT INTO "user" VALUES (300, 'm1', NULL);
	SET mqtt_emit.delivery = durable;
	INSERT INTO "user" VALUES (301, 'd1', NULL);
	BEGIN; INSERT INTO "user" VALUES (302, 'd-rolled-back', NULL); ROLLBACK;
	RESET mqtt_emit.delivery;
	INSERT INTO "user" VALUES (303, 'm2', NULL);
	SET mqtt_emit.delivery = durable;
	INSERT INTO "user" VALUES (304, 'd2', NULL), (305, 'd3', NULL);
	UPDATE "user" SET name = 'd4' WHERE id = 305;
	RESET mqtt_emit.delivery;
	INSERT INTO "user" VALUES (306, 'm3', NULL)});
is_deeply([ map { jdecode($_->{payload})->{result}{name} } @m ], [qw(m1 d1 m2 d2 d3 d4 m3)],
	'durable and memory delivery mixed: commit order, rolled-back durable transaction absent')
  or diag('got: ' . join ' ', map { jdecode($_->{payload})->{result}{name} . '/' . jdecode($_->{payload})->{operation} } @m);
my ($durable_update) = grep { jdecode($_->{payload})->{operation} eq 'update' } @m;
check_event('durable update', $durable_update,
	topic => topic_of('user', 'update'), model => 'user', op => 'update',
	where => { id => 305 }, data => { name => 'd4' },
	result => { id => 305, name => 'd4', email => undef },
	old    => { id => 305, name => 'd3', email => undef });
# the worker deletes acknowledged rows in batches (every 256 rows or 10 ms,
# asynchronous commit): the last ones may go a moment after their arrival
ok(poll_until(sub { q1('SELECT count(*) FROM mqtt_emit.outbox') eq '0' }, $TIMEOUT),
	'durable: the outbox is empty once published');

# mqtt_emit.batch_delay: with 0 every commit wakes the worker; with a long
# nap the commits of a burst are published together after it.  Either way
# everything arrives, in commit order.
for my $delay ('0', '50ms')
{
	$node->append_conf('postgresql.conf', "mqtt_emit.batch_delay = '$delay'");
	$node->reload;
	ok( poll_until(
			sub { q1('SHOW mqtt_emit.batch_delay') eq ($delay eq '0' ? '0' : $delay) }, $TIMEOUT),
		"batch_delay $delay: reloaded");
	my @names = map { "bd$delay-$_" } 1 .. 20;
	@m = step("batch_delay $delay",
		join("\n", map { "INSERT INTO \"user\" VALUES (" . (400 + $_ + ($delay eq '0' ? 0 : 20)) . ", 'bd$delay-$_', NULL);" } 1 .. 20));
	is_deeply([ map { jdecode($_->{payload})->{result}{name} } @m ], \@names,
		"batch_delay $delay: 20 single-row commits arrive, in commit order");
}
$node->append_conf('postgresql.conf', "mqtt_emit.batch_delay = '0.5ms'");
$node->reload;

# concurrent durable writers: every event is published (before a marker
# committed after them all) and each session's events in its commit order
q1(q{CREATE TABLE conc (id int PRIMARY KEY, w int); SELECT mqtt_emit.watch('conc')});
my (@writers, $nwriters, $per_writer);
($nwriters, $per_writer) = (6, 300);
for my $w (1 .. $nwriters)
{
	my $sql = "SET mqtt_emit.delivery = durable;\n"
	  . join('', map { 'INSERT INTO conc VALUES (' . ($w * 1000 + $_) . ", $w);\n" } 1 .. $per_writer);
	my $f = "$PostgreSQL::Test::Utils::tmp_check/writer_$w.sql";
	PostgreSQL::Test::Utils::append_to_file($f, $sql);
	my ($o, $e) = ('', '');
	push @writers, IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-f', $f ],
		'<', \undef, '>', \$o, '2>', \$e, IPC::Run::timeout($TIMEOUT));
}
ok(eval { $_->finish; 1 } && $_->result == 0, 'durable writer committed') for @writers;
@m = collect('concurrent durable writers');
my %by_writer;
push @{ $by_writer{ jdecode($_->{payload})->{result}{w} // 0 } }, jdecode($_->{payload})->{result}{id} for @m;
is(scalar @m, $nwriters * $per_writer,
	'concurrent durable writers: every event published before a later marker')
  or diag('still in the outbox: ' . q1('SELECT count(*) FROM mqtt_emit.outbox')
	  . ', stats: ' . q1('SELECT row_to_json(s) FROM mqtt_emit.stats s'));
for my $w (1 .. $nwriters)
{
	is_deeply($by_writer{$w}, [ map { $w * 1000 + $_ } 1 .. $per_writer ],
		"concurrent durable writers: session $w in its commit order");
}

# a long-lived session sees watch() changes and new columns made elsewhere
$bg->query_safe(q{INSERT INTO app.line_items VALUES (2, 7, 'SKU-2')});
q1(q{SELECT mqtt_emit.watch('app.line_items', model => 'Item', exclude_columns => '{sku}');
	ALTER TABLE app.line_items ADD COLUMN qty int DEFAULT 3});
$bg->query_safe(q{INSERT INTO app.line_items VALUES (3, 7, 'SKU-3')});
@m = collect('cache invalidation');
is_deeply(topics(@m), [ topic_of('OrderLine', 'create'), topic_of('Item', 'create') ],
	'long-lived session: a watch() from another session takes effect');
is(canon(jdecode($m[1]{payload} // '{}')->{result}), canon({ id => 3, order_id => 7, qty => 3 }),
	'long-lived session: new column included, newly excluded column left out');
$bg2->quit;

# ---------------------------------------------------------------------------
# mqtt_emit.publish(): ad hoc, at commit only
# ---------------------------------------------------------------------------

$bg->query_safe('BEGIN');
$bg->query_safe(q{SELECT mqtt_emit.publish('} . "$base/adhoc/text" . q{', 'hello, world')});
$bg->query_safe(q{SELECT mqtt_emit.publish('} . "$base/adhoc/json" . q{', '{"b": 2, "a": [1, 2.50]}'::jsonb)});
$bg->query_safe(q{SELECT mqtt_emit.publish('} . "$base/adhoc/qos0" . q{', 'qos zero', 0)});
@m = collect('publish before commit');
is(scalar @m, 0, 'publish(): nothing before commit');
$bg->query_safe('COMMIT');
@m = collect('publish after commit');
is_deeply(
	[ map { [ $_->{topic}, $_->{payload} ] } @m ],
	[
		[ "$base/adhoc/text", 'hello, world' ],
		[ "$base/adhoc/json", '{"a": [1, 2.50], "b": 2}' ],
		[ "$base/adhoc/qos0", 'qos zero' ],
	],
	'publish(): after commit, exact topics and payloads, in order');
is_deeply([ map { $_->{qos} } @m ], [ 1, 1, 0 ], 'publish(): QoS as requested');
$bg->quit;

# ---------------------------------------------------------------------------
# topic_style 'all' and 'both' (prisma-extension-emitter's topics)
# ---------------------------------------------------------------------------

# Wait until the worker publishes markers in a style: returns true once a
# marker comes back on a topic that ends with /all ('all') or on the
# operation topic ('both': after 'all' only 'both' sends that one).
sub await_style
{
	my ($want) = @_;
	return poll_until(
		sub {
			my $k = $marker + 1;
			collect("style $want");
			my @r = $sub->records;
			my ($rec) = grep { my $n = marker_n($_); defined $n && $n == $k } @r;
			return 0 unless $rec;
			return $want eq 'all'
			  ? $rec->{topic} =~ m{/marker/all$}
			  : $rec->{topic} =~ m{/marker/create$};
		},
		$TIMEOUT, 0.1);
}

my $lpfx = lc $pfx;
q1(q{ALTER SYSTEM SET mqtt_emit.topic_style = 'all'; SELECT pg_reload_conf()});
ok(await_style('all'), 'topic_style = all took effect');
@m = step('style all', q{SELECT mqtt_emit.watch('"MixedCase"');
	INSERT INTO "MixedCase" VALUES (9, 'Z', 'all style');
	DELETE FROM "MixedCase" WHERE "Key" = 9});
is_deeply(topics(@m), [ "$lpfx/mixedcase/all", "$lpfx/mixedcase/all" ],
	'topic_style = all: <prefix lowercased>/<model lowercased>/all');
is_deeply([ map { jdecode($_->{payload})->{operation} } @m ], [qw(create delete)],
	'topic_style = all: operation in the payload');
is(jdecode($m[0]{payload})->{model}, 'MixedCase', 'topic_style = all: model keeps its case in the payload');
@m = step('style all odd', q{INSERT INTO odd VALUES (2, 'y')});
is(scalar(my @l2 = split m{/}, ($m[0]{topic} // ''), -1), @levels_pfx + 2,
	'topic_style = all: odd model adds no topic levels');

q1(q{ALTER SYSTEM SET mqtt_emit.topic_style = 'both'; SELECT pg_reload_conf()});
ok(await_style('both'), 'topic_style = both took effect');
@m = step('style both', q{INSERT INTO "MixedCase" VALUES (10, 'Y', 'both styles')});
is_deeply([ sort @{ topics(@m) } ],
	[ sort(topic_of('MixedCase', 'create'), "$lpfx/mixedcase/all") ],
	'topic_style = both: operation topic and all topic');
is(scalar(keys %{ { map { $_->{payload} => 1 } @m } }), 1,
	'topic_style = both: the same payload on both');

q1(q{ALTER SYSTEM RESET mqtt_emit.topic_style; SELECT pg_reload_conf()});

# ---------------------------------------------------------------------------
# totals
# ---------------------------------------------------------------------------

my @dups = grep { $event_ids{$_} > 1 } keys %event_ids;
ok(scalar(keys %event_ids) > 50, scalar(keys %event_ids) . ' event ids seen');
is(scalar @dups, 0, 'no event id seen twice') or diag("duplicates: @dups");
note('messages received: ' . $sub->count . ', markers: ' . $marker);

done_testing();
