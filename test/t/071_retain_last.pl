#!/usr/bin/perl
#
# 071_retain_last.pl: watch(..., retain_last => true) keeps one retained
# message per row on <prefix>/<model>/state/<key> (issue 17, README
# "Retained state"), with a real mosquitto.
#
# After every step a fresh subscriber, connecting afterwards, must see
# exactly the expected retained set (topic => payload, each with the retain
# flag), read off the broker:
#  - insert, update, delete (cleared), an update that changes the key (old
#    topic cleared, new one set);
#  - hostile keys: "/", "+", "#", "%" and "%25" (distinct), "$", ".", ",",
#    a tab, the empty string, unicode (2, 3 and 4 byte characters), a key of
#    60,000 bytes; one too long for a topic fails its insert (54000) and
#    leaves nothing behind;
#  - a composite key (text, date, int), changed in a session with another
#    DateStyle and TimeZone: the same topics;
#  - the excluded column is never in any payload, retained or live;
#  - on the live bus, each state message comes right after its event;
#  - a remote listener node (subscribed to <prefix>/<model>/#, so it gets
#    every state message live and, at each SUBSCRIBE, retained) runs its
#    listeners for the events only, counts no state message as received or
#    rejected, and logs them at DEBUG1 as ignored; a second node that joins
#    when the states are retained gets them all at once and does the same;
#  - a broker outage in durable delivery, with a crash (immediate stop) of
#    the writer while the broker is down: once both are back, the retained
#    set is the final state of every row;
#  - unwatch() clears nothing: the states stay until mosquitto_sub
#    --remove-retained (README's recipe) clears them.
use strict;
use warnings;

use IPC::Run ();
use MqttEmitTest qw(:DEFAULT stats role_fails);
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 60;
my $prefix = topic_prefix();
my $S      = "r71/$$/sentinel";    # ad-hoc publishes that close each step

# persistent: retained messages and sessions survive the outage below
my $broker = start_broker(persistent => 1);
my $w = new_node(
	'writer',
	broker                    => $broker,
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s');
my %lconf = (
	broker                    => $broker,
	'mqtt_emit.reconnect_min' => '100ms',
	'mqtt_emit.reconnect_max' => '1s',
	log_min_messages          => 'debug1');
my $l = new_node('listener', %lconf);

sub sq { my ($node, $sql) = @_; return $node->safe_psql('postgres', $sql); }

my $listener_sql = q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE calls (n serial, model text, op text, id text, topic text);
	CREATE FUNCTION on_event(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO calls (model, op, id, topic)
		VALUES (e.model, e.operation, coalesce(e.result->>'id', e.result->>'site'), e.topic);
	END $$;
	SELECT mqtt_emit.listen('device', 'on_event(mqtt_emit.event)', allow_remote => true, remote_only => true);
	SELECT mqtt_emit.listen('reading', 'on_event(mqtt_emit.event)', allow_remote => true, remote_only => true);
};
sq($l, $listener_sql);
sq($w, q{
	CREATE EXTENSION pg_mqtt_emit;
	CREATE TABLE device (id text PRIMARY KEY, name text, secret text, temp numeric);
	SELECT mqtt_emit.watch('device', exclude_columns => '{secret}', retain_last => true);
	CREATE TABLE reading (site text, day date, n int, v numeric, PRIMARY KEY (site, day, n));
	SELECT mqtt_emit.watch('reading', retain_last => true);
});
ok(poll_until(sub { my $s = stats($w); $s && $s->{connected} }, $T), 'writer connected');
for my $m ('device', 'reading')
{
	ok($broker->wait_for_subscription($l->{mqtt_emit}{client_id} . '-subscriber', "$prefix/$m/#", $T),
		"listener node subscribed to $prefix/$m/#");
}

# everything on the bus, live, from the start
my $live = start_subscriber($broker, [ "$prefix/#", "$S/#" ]);

# The key level as README "Retained state" defines it: the UTF-8 bytes,
# all but A-Z a-z 0-9 - _ ~ percent-encoded in upper-case hex.
sub enc
{
	my ($s) = @_;
	$s =~ s/([^A-Za-z0-9_~-])/sprintf('%%%02X', ord $1)/ge;
	return $s;
}
sub dtopic { return "$prefix/device/state/" . enc($_[0]); }

# The row of device as its events render it (no secret).
sub drow
{
	my ($id, $name, $temp) = @_;
	return '{"id":' . jstr($id) . ',"name":' . jstr($name) . ',"temp":' . $temp . '}';
}

# A JSON string as escape_json writes it (bytes in, bytes out).
sub jstr
{
	my ($s) = @_;
	$s =~ s/(["\\])/\\$1/g;
	$s =~ s/\t/\\t/g;
	return "\"$s\"";
}

# Wait until the writer's queue and outbox are drained and everything it
# published before now reached the broker: an ad-hoc publish, after the
# step's events in the queue's order, arrives at the live subscriber.
my $sentinel = 0;

sub settle
{
	my ($what) = @_;
	$sentinel++;
	sq($w, "SELECT mqtt_emit.publish('$S/$sentinel', '$sentinel')");
	my $ok = poll_until(sub { grep { $_->[0] eq "$S/$sentinel" } $live->messages }, $T);
	ok($ok, "$what: everything published (sentinel $sentinel arrived)");
	return $ok;
}

# What a subscriber that connects now gets: { topic => payload }, checked to
# be retained and one per topic.
my @all_payloads;    # every retained payload seen, for the secret check

sub retained
{
	my ($model) = @_;
	my $sub = start_subscriber($broker, "$prefix/$model/state/#");
	my @r = $sub->records;
	$sub->stop;
	my %set;
	my $bad = 0;
	for my $r (@r)
	{
		$bad++ if $r->{retain} ne '1' || exists $set{ $r->{topic} };
		$set{ $r->{topic} } = $r->{payload};
		push @all_payloads, $r->{payload};
	}
	is($bad, 0, "$model: every message the later subscriber got is retained, one per topic");
	return \%set;
}

my %expect;    # device: topic => payload
my %expect_r;  # reading
my %events = (device => 0, reading => 0);

sub check_sets
{
	my ($what) = @_;
	settle($what);
	my $got = retained('device');
	is_deeply($got, \%expect, "$what: a later subscriber sees exactly the expected device states")
	  or diag(explain({ got => $got, expected => \%expect }));
	my $got_r = retained('reading');
	is_deeply($got_r, \%expect_r, "$what: ... and reading states")
	  or diag(explain({ got => $got_r, expected => \%expect_r }));
}

# ---------------------------------------------------------------------------
# insert, update, delete, key change
# ---------------------------------------------------------------------------

sq($w, q{INSERT INTO device VALUES ('d1', 'one', 'SECRET-1', 20.5), ('d2', 'two', 'SECRET-2', 21),
                                   ('d3', 'three', 'SECRET-3', 22)});
$events{device} += 3;
$expect{ dtopic('d1') } = drow('d1', 'one', 20.5);
$expect{ dtopic('d2') } = drow('d2', 'two', 21);
$expect{ dtopic('d3') } = drow('d3', 'three', 22);
check_sets('insert');

sq($w, q{UPDATE device SET name = 'uno', secret = 'SECRET-1b' WHERE id = 'd1';
         UPDATE device SET temp = 23.25 WHERE id = 'd2'});
$events{device} += 2;
$expect{ dtopic('d1') } = drow('d1', 'uno', 20.5);
$expect{ dtopic('d2') } = drow('d2', 'two', 23.25);
check_sets('update');

sq($w, q{DELETE FROM device WHERE id = 'd3'});
$events{device} += 1;
delete $expect{ dtopic('d3') };
check_sets('delete');

my $before = scalar $live->records;
sq($w, q{UPDATE device SET id = 'd1-new', temp = 19 WHERE id = 'd1'});
$events{device} += 1;
delete $expect{ dtopic('d1') };
$expect{ dtopic('d1-new') } = drow('d1-new', 'uno', 19);
check_sets('update that changes the key');

# on the live bus: the event, then the old key cleared, then the new state
my @step = grep { $_->{topic} !~ m{^\Q$S\E/} } ($live->records)[ $before .. $live->count - 1 ];
is_deeply(
	[ map { [ $_->{topic}, $_->{topic} =~ /update$/ ? 'event' : $_->{payload} ] } @step ],
	[ [ "$prefix/device/update", 'event' ], [ dtopic('d1'), '' ], [ dtopic('d1-new'), drow('d1-new', 'uno', 19) ] ],
	'live: the update event, then the empty message on the old key, then the new row');

# ---------------------------------------------------------------------------
# hostile keys (the file is UTF-8; the strings are its bytes)
# ---------------------------------------------------------------------------

my @hostile = ('a/b', 'a%2Fb', '+', '#', '%', '%25', '$SYS', 'a.b', 'x,y', "x\ty", '',
	'küche', '温度', "\xf0\x9f\x8c\xa1", '-_~');
my %seen_topic;
$seen_topic{ dtopic($_) }++ for @hostile;
is(scalar(keys %seen_topic), scalar(@hostile), 'the hostile keys give distinct topics');
my $i = 0;
my $values = join(', ',
	map { $i++; "(E'" . join('', map { $_ eq "'" ? "''" : $_ eq "\\" ? "\\\\" : $_ eq "\t" ? '\t' : $_ } split //, $_) . "', 'h$i', 'SECRET-H$i', $i)" }
	  @hostile);
sq($w, "INSERT INTO device VALUES $values");
$events{device} += @hostile;
$i = 0;
for my $k (@hostile)
{
	$i++;
	$expect{ dtopic($k) } = drow($k, "h$i", $i);
}

# a key as long as a topic allows, and one too long
my $long = 'L' x 60000;
sq($w, "INSERT INTO device VALUES (repeat('L', 60000), 'long', 'SECRET-L', 1)");
$events{device} += 1;
$expect{ dtopic($long) } = drow($long, 'long', 1);
role_fails($w, 'postgres', "INSERT INTO device VALUES (repeat('/', 21840), 'too long', 'SECRET-T', 1)",
	'54000', 'a key too long for a topic fails its insert', qr/longer than MQTT allows/);
check_sets('hostile and long keys');
ok(!grep({ length($_) > 65535 } keys %expect), 'every expected topic is within 65535 bytes');
is(sq($w, q{SELECT count(*) FROM device WHERE name = 'too long'}), '0', 'the too long key was not stored');

# ---------------------------------------------------------------------------
# a composite key (text, date, int): topics do not follow DateStyle/TimeZone
# ---------------------------------------------------------------------------

sub rtopic { my ($site, $day, $n) = @_; return "$prefix/reading/state/" . join(',', enc($site), enc($day), enc($n)); }
sub rrow   { my ($site, $day, $n, $v) = @_; return '{"site":' . jstr($site) . ',"day":"' . $day . '","n":' . $n . ',"v":' . $v . '}'; }

sq($w, q{SET datestyle = 'ISO, MDY'; INSERT INTO reading VALUES ('north', '2026-03-01', 1, 5.5), ('so/uth', '2026-03-02', 2, 6)});
$events{reading} += 2;
$expect_r{ rtopic('north', '2026-03-01', 1) } = rrow('north', '2026-03-01', 1, 5.5);
$expect_r{ rtopic('so/uth', '2026-03-02', 2) } = rrow('so/uth', '2026-03-02', 2, 6);
check_sets('composite key insert');

# another DateStyle and TimeZone: the old key's topic is found all the same
sq($w, q{SET datestyle = 'German, DMY'; SET timezone = 'Pacific/Kiritimati';
         UPDATE reading SET n = 3, v = 7 WHERE site = 'north';
         DELETE FROM reading WHERE site = 'so/uth'});
$events{reading} += 2;
delete $expect_r{ rtopic('north', '2026-03-01', 1) };
delete $expect_r{ rtopic('so/uth', '2026-03-02', 2) };
$expect_r{ rtopic('north', '2026-03-01', 3) } = rrow('north', '2026-03-01', 3, 7);
check_sets('composite key change and delete under DateStyle German');

# ---------------------------------------------------------------------------
# the remote listener node: events only
# ---------------------------------------------------------------------------

sub calls_ok
{
	my ($node, $what, %n) = @_;
	my $want = $n{device} + $n{reading};
	my $ok = poll_until(sub { sq($node, 'SELECT count(*) FROM calls') >= $want }, $T);
	is(sq($node, q{SELECT count(*) FILTER (WHERE model = 'device') || '/' || count(*) FILTER (WHERE model = 'reading') FROM calls}),
		"$n{device}/$n{reading}", "$what: the listeners ran once per event (device/reading)");
	is(sq($node, q{SELECT count(*) FROM calls WHERE topic LIKE '%/state/%' OR op NOT IN ('create', 'update', 'delete')}),
		'0', "$what: no listener ran for a state message");
	my $s = stats($node);
	is($s->{rejected}, 0, "$what: no message counted as rejected");
	is($s->{received}, $want, "$what: received counts the events only");
	is($s->{listener_errors}, 0, "$what: no listener errors");
}

calls_ok($l, 'listener node', %events);
my $ignored_re = qr/DEBUG:  pg_mqtt_emit ignored a state message on "\Q$prefix\E\/(?:device|reading)\/state\//;
my @ign = (slurp_file($l->logfile) =~ /$ignored_re/g);
ok(@ign > 0, 'listener node: its log shows the state messages it ignored (' . scalar(@ign) . ')');

# a node that joins now gets every retained state at its SUBSCRIBE
my $l2 = new_node('late', %lconf);
sq($l2, $listener_sql);
ok($broker->wait_for_subscription($l2->{mqtt_emit}{client_id} . '-subscriber', "$prefix/device/#", $T),
	'late node subscribed');
my $nstates = keys(%expect) + keys(%expect_r);
ok(poll_until(sub { my @x = (slurp_file($l2->logfile) =~ /$ignored_re/g); @x >= $nstates }, $T),
	"late node: the $nstates retained states arrived at its subscription and were ignored");
my %events2 = (device => 0, reading => 0);
sq($w, q{INSERT INTO device VALUES ('late', 'late', 'SECRET-LATE', 0)});
$events{device}++;
$events2{device}++;
$expect{ dtopic('late') } = drow('late', 'late', 0);
check_sets('insert after the late node joined');
calls_ok($l2, 'late node', %events2);

# Under MQTT 5 the events' filters are subscribed with Retain Handling 2:
# a node that joins gets no retained state, only the live state messages
# that follow new events (two here, one per marker row; the second
# marker's listener run comes after the first marker's state message).
my $l5 = new_node('late5', %lconf, 'mqtt_emit.mqtt_version' => '5');
sq($l5, $listener_sql);
ok($broker->wait_for_subscription($l5->{mqtt_emit}{client_id} . '-subscriber', "$prefix/device/#", $T),
	'MQTT 5 late node subscribed');
for my $k (1, 2)
{
	sq($w, "INSERT INTO device VALUES ('m5-$k', 'm', 'SECRET-M5', 0)");
	$events{device}++;
	$events2{device}++;
	$expect{ dtopic("m5-$k") } = drow("m5-$k", 'm', 0);
}
calls_ok($l5, 'MQTT 5 late node', device => 2, reading => 0);
my @ign5 = (slurp_file($l5->logfile) =~ /$ignored_re/g);
ok(@ign5 >= 1 && @ign5 <= 2,
	'MQTT 5 late node: no retained state at its subscription, only live ones (' . scalar(@ign5)
	  . " ignored; a 3.1.1 node got $nstates)");
check_sets('after the MQTT 5 node joined');

# ---------------------------------------------------------------------------
# broker outage, durable delivery, and a crash of the writer meanwhile
# ---------------------------------------------------------------------------

$broker->stop;
ok(poll_until(sub { my $s = stats($w); $s && !$s->{connected} }, $T), 'writer sees the broker gone');
sq($w, q{SET mqtt_emit.delivery = durable;
	INSERT INTO device VALUES ('out', 'o1', 'SECRET-O', 1);
	UPDATE device SET name = 'o2' WHERE id = 'out';
	UPDATE device SET name = 'o3', temp = 3 WHERE id = 'out';
	BEGIN;
	UPDATE device SET id = 'd2-moved' WHERE id = 'd2';
	DELETE FROM device WHERE id IN ('#', '+');
	INSERT INTO device VALUES ('tmp', 't', 'SECRET-TMP', 0);
	DELETE FROM device WHERE id = 'tmp';
	COMMIT;
	INSERT INTO reading VALUES ('outage', '2026-03-05', 1, 1);
	UPDATE reading SET v = 2 WHERE site = 'outage';});
$events{device} += 3 + 1 + 2 + 2;
$events2{device} += 3 + 1 + 2 + 2;
$events{reading} += 2;
$events2{reading} += 2;
$expect{ dtopic('out') } = drow('out', 'o3', 3);
$expect{ dtopic('d2-moved') } = drow('d2-moved', 'two', 23.25);
delete $expect{ dtopic($_) } for ('d2', '#', '+');
$expect_r{ rtopic('outage', '2026-03-05', 1) } = rrow('outage', '2026-03-05', 1, 2);
is(sq($w, q{SELECT count(*) FROM mqtt_emit.outbox WHERE kind = 2 AND (flags & 8) <> 0}), '11',
	'the 11 state messages wait in the outbox, retained');

$w->stop('immediate');
$w->start;
$broker->start;
ok(poll_until(sub { my $s = stats($w); $s && $s->{connected} && $s->{in_outbox} == 0 }, $T),
	'after the crash and the outage the writer emptied its outbox');
# the live subscriber (a clean session) subscribes again after the broker's
# restart, maybe after the writer published: the sentinel of settle() is
# only published once it is back (CI, PG18 chroot: the sentinel came 0.1 s
# after the writer's reconnection and was lost for it)
ok($live->wait_ready($T), 'the live subscriber is subscribed again');
check_sets('after the outage and the crash');
is(sq($w, 'SELECT count(*) FROM mqtt_emit.dead_letters'), '0', 'no dead letters');

ok($l->poll_query_until('postgres', 'SELECT subscriber_connected FROM mqtt_emit.stats'),
	'listener node reconnected');
calls_ok($l, 'listener node, after the outage', %events);
calls_ok($l2, 'late node, after the outage', %events2);

# ---------------------------------------------------------------------------
# unwatch() clears nothing (README); the README's recipe clears the states
# ---------------------------------------------------------------------------

sq($w, q{SELECT mqtt_emit.unwatch('reading');
	DELETE FROM reading WHERE site = 'outage';
	INSERT INTO reading VALUES ('after', '2026-03-06', 1, 1)});
check_sets('unwatch, then a delete and an insert');    # %expect_r unchanged
my ($out, $err) = ('', '');
IPC::Run::run([ 'mosquitto_sub', '-h', '127.0.0.1', '-p', $broker->port,
		'-t', "$prefix/reading/state/#", '--remove-retained', '--retained-only', '-W', '1' ],
	'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(30));
%expect_r = ();
is_deeply(retained('reading'), {}, 'mosquitto_sub --remove-retained cleared the states of the unwatched table');

# ---------------------------------------------------------------------------
# the excluded column, anywhere
# ---------------------------------------------------------------------------

my @secret = grep { /SECRET|"secret"/ } @all_payloads, map { $_->[1] } $live->messages;
is(scalar(@secret), 0, 'no retained or live payload has the excluded column or its values');
ok(scalar(@all_payloads) > 50, 'the check read ' . scalar(@all_payloads) . ' retained payloads');

done_testing();
