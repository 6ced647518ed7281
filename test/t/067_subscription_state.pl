#!/usr/bin/perl
#
# 067_subscription_state.pl: the state of each subscription, as the broker
# answered its SUBSCRIBE (README "Monitoring", view mqtt_emit.subscriptions).
#
# What mosquitto 2.0 really does, checked here:
#  - Its acl_file does not check subscriptions at all (the default ACL check
#    returns success for every SUBSCRIBE, "FIXME - implement ACL subscription
#    strings"): a filter whose topics the user may not read is granted QoS 1
#    and its messages are silently not delivered.  Part 2 shows that: the
#    view says acknowledged, and the listener of the unreadable model never
#    runs while the readable one does.
#  - The dynamic security plugin does check them: it refuses with SUBACK
#    0x80 to an MQTT 3.1.1 client and 0x87 (Not authorized) to an MQTT 5
#    client.  Part 1 uses it: anonymous clients (the nodes) may subscribe to
#    everything but <prefix>/secret/#.
#
# Part 1: node A (3.1.1) and node B (MQTT 5) each have remote listeners on
# models "secret" and "open".  Their views show <prefix>/open/# acknowledged
# with granted QoS 1 and <prefix>/secret/# refused with the reason (0x80
# "Failure", 0x87 "Not authorized"); the refusal is logged exactly once per
# node although the broker sees the SUBSCRIBE repeated (backoff); after the
# broker's rule is removed (mosquitto_ctrl) the subscription is granted:
# the view says acknowledged with QoS 1, one LOG
# line says so, and an event on "secret" now runs the listener exactly once.
# (Dynamic security disconnects the clients whose rights change, so the
# grant comes with the resubscription after the reconnection; the retries
# before are counted in the broker's log.)  Every wait is a bounded poll.
use strict;
use warnings;

use IPC::Run ();
use JSON::PP ();
use MqttEmitTest qw(:DEFAULT stats log_since);
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 40;
my $prefix = topic_prefix();
my $DYNSEC = '/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so';

plan skip_all => "mosquitto dynamic security plugin not installed ($DYNSEC)"
  unless -e $DYNSEC;

sub sq { return $_[0]->safe_psql('postgres', $_[1]); }

sub run_or_die
{
	my (@cmd) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(30))
	  or die "@cmd: $err $out";
	return $out;
}

# "state|granted_qos|reason" of one filter in the view
sub sub_state
{
	my ($node, $filter) = @_;
	return sq($node,
		    "SELECT state || '|' || coalesce(granted_qos::text, '') || '|' || coalesce(reason, '') "
		  . "FROM mqtt_emit.subscriptions WHERE topic_filter = '$filter'");
}

# SUBSCRIBE requests for $filter by $client_id in the broker's debug log:
# "Received SUBSCRIBE from <id>" followed by one "\t<filter> (QoS n)" line
# per filter.
sub subscribes_seen
{
	my ($broker, $client_id, $filter) = @_;
	my ($n, $cur) = (0, '');
	for my $line (split /\n/, $broker->log)
	{
		if ($line =~ /Received SUBSCRIBE from (\S+)$/) { $cur = $1; next; }
		# mosquitto 2.0.11 logs a refused filter with the QoS asked for,
		# 2.0.21 (Debian forky) with "(denied)"
		$n++ if $cur eq $client_id && $line =~ /^\S+: \t\Q$filter\E \((QoS \d|denied)\)$/;
	}
	return $n;
}

my $seq = 0;
sub event_json
{
	my ($model, $id) = @_;
	$seq++;
	my $eid = sprintf('019a0000-0000-7000-8000-%012d', $seq);
	return qq({"model":"$model","operation":"create","args":{"data":{"id":$id}},)
	  . qq("result":{"id":$id},"timestamp":"2026-12-01T00:00:00.000Z","eventId":"$eid","origin":"tap-$$"});
}

my $setup = q{
CREATE EXTENSION pg_mqtt_emit;
CREATE TABLE runs (model text, id int);
CREATE FUNCTION rec(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO runs VALUES (e.model, (e.result->>'id')::int);
END $$;
};

# ---------------------------------------------------------------------------
# Part 1: dynamic security refuses <prefix>/secret/#
# ---------------------------------------------------------------------------

my $dir = PostgreSQL::Test::Utils::tempdir('subs');
chmod 0755, $dir;
my $ADMIN_PW = 'adm-' . join('', map { sprintf '%02x', int(rand(256)) } 1 .. 6);
run_or_die('mosquitto_ctrl', 'dynsec', 'init', "$dir/dynsec.json", 'admin', $ADMIN_PW);
{
	my $cfg = JSON::PP::decode_json(slurp_file("$dir/dynsec.json"));
	$cfg->{defaultACLAccess} = {
		publishClientSend    => JSON::PP::true,
		publishClientReceive => JSON::PP::true,
		subscribe            => JSON::PP::true,
		unsubscribe          => JSON::PP::true,
	};
	push @{ $cfg->{roles} },
	  {
		rolename => 'limited',
		acls     => [
			{ acltype => 'subscribeLiteral', topic => "$prefix/secret/#", priority => 0,
			  allow => JSON::PP::false }
		]
	  };
	$cfg->{groups} = [ { groupname => 'anon', roles => [ { rolename => 'limited' } ], clients => [] } ];
	$cfg->{anonymousGroup} = 'anon';
	open my $fh, '>', "$dir/dynsec.json" or die $!;
	print $fh JSON::PP->new->pretty->encode($cfg);
	close $fh;
}

my $broker = start_broker(
	extra_conf => [
		"plugin $DYNSEC",
		"plugin_opt_config_file $dir/dynsec.json",
		'log_type debug',
	]);

# the broker really refuses it, to both protocol versions
for my $v ([ '311', 128 ], [ '5', 135 ])
{
	my ($out, $err) = ('', '');
	IPC::Run::run(
		[ 'mosquitto_sub', '-V', $v->[0], '-q', '1', '-h', '127.0.0.1', '-p', $broker->port,
		  '-t', "$prefix/secret/#", '-t', "$prefix/open/#", '-d', '-W', '1' ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(10));
	like($out, qr/Subscribed \(mid: \d+\): $v->[1], 1\b/,
		"broker: mosquitto_sub -V $v->[0] is refused $v->[1] for secret, granted 1 for open");
}

my %nodes;
$nodes{a} = new_node('a', broker => $broker, 'mqtt_emit.mqtt_version' => '3.1.1');
$nodes{b} = new_node('b', broker => $broker, 'mqtt_emit.mqtt_version' => '5');
my %expect = (
	a => qr/^refused\|\|Failure \(0x80\)$/,
	b => qr/^refused\|\|Not authorized \(0x87\)$/);

for my $k (sort keys %nodes)
{
	my $n = $nodes{$k};
	$n->{log_off} = -s $n->logfile;
	sq($n, $setup);
	sq($n, q{SELECT mqtt_emit.listen('secret', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true)});
	sq($n, q{SELECT mqtt_emit.listen('open', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true)});
}

for my $k (sort keys %nodes)
{
	my $n   = $nodes{$k};
	my $ver = $k eq 'a' ? '3.1.1' : '5';
	my $cid = "$n->{mqtt_emit}{client_id}-subscriber";
	ok(poll_until(sub { sub_state($n, "$prefix/open/#") eq 'acknowledged|1|' }, $T),
		"$k ($ver): open acknowledged with granted QoS 1")
	  or diag(sub_state($n, "$prefix/open/#"));
	ok(poll_until(sub { sub_state($n, "$prefix/secret/#") =~ $expect{$k} }, $T),
		"$k ($ver): secret refused, with the reason")
	  or diag(sub_state($n, "$prefix/secret/#"));
	is(sq($n, "SELECT count(*) FROM mqtt_emit.subscriptions WHERE since IS NULL OR since > clock_timestamp()"),
		'0', "$k: every state has its time");
	is(sq($n, 'SELECT subscriptions FROM mqtt_emit.stats'), '2', "$k: stats.subscriptions counts both wanted filters");

	# retried with backoff (1 s, 2 s, ...): the broker sees it again, the
	# log says it once
	ok(poll_until(sub { subscribes_seen($broker, $cid, "$prefix/secret/#") >= 3 }, $T),
		"$k: the refused SUBSCRIBE was sent again (at least 3 times in all)")
	  or diag('seen ' . subscribes_seen($broker, $cid, "$prefix/secret/#"));
	my $log = log_since($n, $n->{log_off});
	my @lines = $log =~ /(the broker refused the subscription to "\Q$prefix\E\/secret\/#"[^\n]*)/g;
	is(scalar(@lines), 1, "$k: the refusal is logged once");
	like($lines[0] // '', qr/: (Failure|Not authorized) \(SUBACK code 0x(80|87)\)/, "$k: the log line names the reason");
	unlike($log, qr/refused the subscription to "\Q$prefix\E\/open/, "$k: open is not reported refused");
}

# a role that is not a superuser sees the state of its own subscription only
{
	my $na = $nodes{a};
	sq($na, q{
		CREATE ROLE plain LOGIN;
		GRANT EXECUTE ON FUNCTION mqtt_emit.may_listen_remote() TO plain;
		CREATE FUNCTION plain_l(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;
	});
	$na->safe_psql('postgres',
		q{SELECT mqtt_emit.listen('mine', 'plain_l(mqtt_emit.event)', allow_remote => true)},
		extra_params => [ '-U', 'plain' ]);
	my $view = sub {
		$na->safe_psql('postgres',
			q{SELECT string_agg(topic_filter || '|' || state || '|' || coalesce(granted_qos::text, ''), ',' ORDER BY 1) FROM mqtt_emit.subscriptions},
			extra_params => [ '-U', 'plain' ]);
	};
	ok(poll_until(sub { $view->() eq "$prefix/mine/#|acknowledged|1" }, $T),
		'a: a plain role sees its own filter acknowledged, and no other filter')
	  or diag($view->());
}

# an event on open runs the listeners; nothing comes for secret (not subscribed)
ok(mqtt_pub($broker, "$prefix/open/create", event_json('open', 1)), 'published an event on open');
ok(mqtt_pub($broker, "$prefix/secret/create", event_json('secret', 2)), 'published an event on secret (refused)');
for my $k (sort keys %nodes)
{
	ok(poll_until(sub { sq($nodes{$k}, "SELECT count(*) FROM runs WHERE model = 'open' AND id = 1") eq '1' }, $T),
		"$k: the event on open ran once");
}

# The operator fixes the broker.  Dynamic security disconnects the clients
# whose rights changed ("administrative action": to MQTT 5 clients a
# DISCONNECT with reason code 0x98, which paho reports only through its
# disconnected callback): the nodes reconnect and subscribe again.
run_or_die('mosquitto_ctrl', '-h', '127.0.0.1', '-p', $broker->port, '-u', 'admin', '-P', $ADMIN_PW,
	'dynsec', 'removeRoleACL', 'limited', 'subscribeLiteral', "$prefix/secret/#");
for my $k (sort keys %nodes)
{
	my $n = $nodes{$k};
	ok(poll_until(sub { sub_state($n, "$prefix/secret/#") eq 'acknowledged|1|' }, $T),
		"$k: after the broker's rule is removed, secret is acknowledged with QoS 1")
	  or diag(sub_state($n, "$prefix/secret/#"));
	ok(poll_until(sub { log_since($n, $n->{log_off}) =~ /subscription to "\Q$prefix\E\/secret\/#" acknowledged with QoS 1/ }, $T),
		"$k: the log says it was granted");
	is(sq($n, "SELECT count(*) FROM runs WHERE model = 'secret'"), '0',
		"$k: the event published while refused did not run");
}
like(log_since($nodes{b}, $nodes{b}{log_off}),
	qr/subscriber cannot reach broker "[^"]*": the broker closed the connection: Administrative action \(DISCONNECT reason code 152\)/,
	'b (MQTT 5): the broker\'s DISCONNECT is taken as the end of the connection, with its reason');
ok(mqtt_pub($broker, "$prefix/secret/create", event_json('secret', 3)), 'published an event on secret (granted)');
for my $k (sort keys %nodes)
{
	ok(poll_until(sub { sq($nodes{$k}, "SELECT count(*) FROM runs WHERE model = 'secret' AND id = 3") eq '1' }, $T),
		"$k: the event on secret ran once");
}
$_->stop for values %nodes;

# ---------------------------------------------------------------------------
# Part 2: mosquitto's acl_file grants what it will not deliver
# ---------------------------------------------------------------------------

my $acl = "$dir/acl";
{
	open my $fh, '>', $acl or die $!;
	# lines before any "user" apply to anonymous clients (the nodes, the harness)
	print $fh "topic readwrite mqtt_emit_test/#\ntopic readwrite $prefix/open/#\ntopic write $prefix/#\n";
	close $fh;
}
my $broker2 = start_broker(extra_conf => ["acl_file $acl"]);
my $c = new_node('c', broker => $broker2, 'mqtt_emit.mqtt_version' => '5');
sq($c, $setup);
sq($c, q{SELECT mqtt_emit.listen('hidden', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true)});
sq($c, q{SELECT mqtt_emit.listen('open', 'rec(mqtt_emit.event)', allow_remote => true, remote_only => true)});
ok(poll_until(sub { sub_state($c, "$prefix/hidden/#") eq 'acknowledged|1|' && sub_state($c, "$prefix/open/#") eq 'acknowledged|1|' }, $T),
	'acl_file: a filter the user may not read is still acknowledged with QoS 1 (mosquitto does not check)');
ok(mqtt_pub($broker2, "$prefix/hidden/create", event_json('hidden', 10)), 'acl_file: published on hidden');
ok(mqtt_pub($broker2, "$prefix/open/create", event_json('open', 11)), 'acl_file: published on open after it');
ok(poll_until(sub { sq($c, "SELECT count(*) FROM runs WHERE model = 'open' AND id = 11") eq '1' }, $T),
	'acl_file: the event on open ran once');
is(sq($c, "SELECT count(*) FROM runs WHERE model = 'hidden'"), '0',
	'acl_file: the event on hidden (published before it) was dropped by the broker');
$c->stop;

done_testing();
