#!/usr/bin/perl
#
# 040_tls.pl: the worker talks TLS to the broker (doc/DESIGN.md 7: ssl:// and
# mqtts:// URLs, mqtt_emit.tls_ca_file / tls_cert_file / tls_key_file,
# mqtt_emit.tls_verify; README "Configuration").
#
# A throwaway PKI made with openssl in the test's temp dir: a CA, a server
# certificate for 127.0.0.1 and localhost (subjectAltName), a server
# certificate for "otherhost" only, a client certificate, and a second,
# unrelated CA. One real mosquitto with three TLS listeners (server
# certificate only; mutual TLS with require_certificate; the "otherhost"
# certificate) next to the harness's plain listener. One cluster, whose
# broker settings are changed by reload from case to case.
#
# Checked: with the right CA the worker connects over ssl:// and mqtts://
# (stats.connected) and its events reach a TLS subscriber (mosquitto_sub
# --cafile); mutual TLS works with the client certificate and is refused
# without it; a foreign CA and a certificate for another host name are
# refused (connected stays false, last_error set, a "cannot reach broker"
# line in the server log) and tls_verify = off accepts the latter; a
# non-superuser can neither SHOW nor see in pg_settings the TLS files and the
# password. Every wait is a bounded poll.
use strict;
use warnings;

use IPC::Run ();
use MqttEmitTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $T      = 30;    # seconds any one expected effect may take
my $prefix = topic_prefix();

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

sub run_ok_or_die
{
	my (@cmd) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout(60))
	  or die "@cmd failed: $err\n";
	return $out;
}

# openssl: a key and a certificate signed by $ca (or self-signed when $ca is
# undef, i.e. a CA). $ext: extension lines for the certificate.
sub make_cert
{
	my ($dir, $name, $cn, $ca, @ext) = @_;
	my ($key, $crt, $csr, $extf) =
	  map { "$dir/$name.$_" } qw(key crt csr ext);
	run_ok_or_die('openssl', 'ecparam', '-name', 'prime256v1', '-genkey',
		'-noout', '-out', $key);
	open my $fh, '>', $extf or die "$extf: $!";
	print $fh join("\n", @ext), "\n";
	close $fh;
	if (!defined $ca)
	{
		# a CA: self-signed through x509 -req so that the extension file applies
		run_ok_or_die('openssl', 'req', '-new', '-key', $key, '-subj',
			"/CN=$cn", '-out', $csr);
		run_ok_or_die('openssl', 'x509', '-req', '-in', $csr, '-signkey',
			$key, '-sha256', '-days', '3', '-out', $crt, '-extfile', $extf);
	}
	else
	{
		run_ok_or_die('openssl', 'req', '-new', '-key', $key, '-subj',
			"/CN=$cn", '-out', $csr);
		run_ok_or_die(
			'openssl', 'x509', '-req', '-in', $csr,
			'-CA', "$dir/$ca.crt", '-CAkey', "$dir/$ca.key",
			'-CAcreateserial', '-sha256', '-days', '3',
			'-out', $crt, '-extfile', $extf);
	}
	chmod 0644, $crt;
	chmod 0600, $key;
	return ($crt, $key);
}

sub sq
{
	my ($node, $sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

sub stat_of
{
	my ($node, $col) = @_;
	return sq($node, "SELECT $col FROM mqtt_emit.stats");
}

sub log_size
{
	my ($node) = @_;
	return (-s $node->logfile) // 0;
}

sub log_since
{
	my ($node, $offset) = @_;
	my $text = slurp_file($node->logfile);
	return length($text) > $offset ? substr($text, $offset) : '';
}

# Change the broker settings (postgresql.conf, later lines win) and reload;
# returns once the worker has taken them (its "reconnecting" line).
sub reconfigure
{
	my ($node, %set) = @_;
	my $offset = log_size($node);
	my $conf = join '',
	  map { my $v = $set{$_}; $v =~ s/'/''/g; "$_ = '$v'\n" } sort keys %set;
	$node->append_conf('postgresql.conf', $conf);
	$node->reload;
	my $url = $set{'mqtt_emit.broker_url'};
	my $ok = poll_until(
		sub {
			log_since($node, $offset) =~
			  /broker settings changed, reconnecting to "\Q$url\E"/;
		},
		$T);
	diag("the worker did not reload the broker settings for $url") unless $ok;
	return $offset;
}

sub wait_connected
{
	my ($node) = @_;
	return poll_until(sub { stat_of($node, 'connected') eq 't' }, $T);
}

# The publisher cannot connect to $url: a LOG line after $offset.
sub wait_refused_line
{
	my ($node, $url, $offset, $timeout) = @_;
	my $line;
	poll_until(
		sub {
			($line) = log_since($node, $offset) =~
			  /^(.*pg_mqtt_emit publisher cannot reach broker "\Q$url\E".*)$/m;
			return defined $line;
		},
		$timeout // $T);
	return $line;
}

# Stays disconnected: connected never turns true within $secs seconds, while
# the worker keeps retrying (reconnect_max is short here).
sub stays_disconnected
{
	my ($node, $secs) = @_;
	return !poll_until(sub { stat_of($node, 'connected') eq 't' }, $secs, 0.1);
}

# A mosquitto_sub over TLS in the background, live once the broker logs its
# subscription.
my $tls_sub_n = 0;

sub tls_sub_start
{
	my ($broker, %o) = @_;
	$tls_sub_n++;
	my $id = "tls-sub-$$-$tls_sub_n";
	my $s = { out => '', err => '', id => $id };
	my @cmd = (
		'mosquitto_sub', '-h', '127.0.0.1', '-p', $o{port},
		'--cafile', $o{cafile}, '-i', $id, '-q', '1', '-v',
		'-t', $o{topic}, '-W', '120');
	push @cmd, '--cert', $o{cert}, '--key', $o{key} if $o{cert};
	$s->{h} = IPC::Run::start(\@cmd, '<', \undef, '>', \$s->{out}, '2>',
		\$s->{err});
	my $live = poll_until(
		sub {
			$s->{h}->pump_nb if $s->{h}->pumpable;
			return $broker->log =~ /^\S+: \Q$id\E \d \Q$o{topic}\E$/m;
		},
		$T);
	diag("TLS subscriber $id not subscribed: $s->{err}") unless $live;
	$s->{live} = $live ? 1 : 0;
	return $s;
}

sub tls_sub_wait
{
	my ($s, $re) = @_;
	return poll_until(
		sub {
			$s->{h}->pump_nb if $s->{h}->pumpable;
			return $s->{out} =~ $re;
		},
		$T);
}

sub tls_sub_stop
{
	my ($s) = @_;
	eval { $s->{h}->kill_kill(grace => 2); 1 };
	return;
}

# ---------------------------------------------------------------------------
# PKI
# ---------------------------------------------------------------------------

my $pki = PostgreSQL::Test::Utils::tempdir('pki');
chmod 0755, $pki;
my @ca_ext = (
	'basicConstraints=critical,CA:TRUE',
	'keyUsage=critical,keyCertSign,cRLSign',
	'subjectKeyIdentifier=hash');
my @srv_ext = (
	'basicConstraints=CA:FALSE',
	'keyUsage=critical,digitalSignature,keyEncipherment',
	'extendedKeyUsage=serverAuth');
my ($ca_crt)  = make_cert($pki, 'ca',  'pg_mqtt_emit test CA',  undef, @ca_ext);
my ($ca2_crt) = make_cert($pki, 'ca2', 'pg_mqtt_emit other CA', undef, @ca_ext);
my ($srv_crt, $srv_key) = make_cert($pki, 'server', '127.0.0.1', 'ca', @srv_ext,
	'subjectAltName=IP:127.0.0.1,DNS:localhost');
my ($oth_crt, $oth_key) = make_cert($pki, 'other', 'otherhost', 'ca', @srv_ext,
	'subjectAltName=DNS:otherhost');
my ($cli_crt, $cli_key) = make_cert($pki, 'client', 'pgclient', 'ca',
	'basicConstraints=CA:FALSE',
	'keyUsage=critical,digitalSignature,keyEncipherment',
	'extendedKeyUsage=clientAuth');
like(run_ok_or_die('openssl', 'verify', '-CAfile', $ca_crt, $srv_crt),
	qr/OK/, 'server certificate verifies against the test CA');
ok(!eval { run_ok_or_die('openssl', 'verify', '-CAfile', $ca2_crt, $srv_crt); 1 },
	'server certificate does not verify against the other CA');

# ---------------------------------------------------------------------------
# broker: the harness's plain listener, plus three TLS listeners
# ---------------------------------------------------------------------------

my ($p_tls, $p_mtls, $p_oth) = (free_port(), free_port(), free_port());
($p_mtls, $p_oth) = (free_port(), free_port()) while $p_mtls == $p_tls
  || $p_oth == $p_tls || $p_oth == $p_mtls;
my $broker = start_broker(
	extra_conf => [
		"listener $p_tls 127.0.0.1",
		"cafile $ca_crt", "certfile $srv_crt", "keyfile $srv_key",
		"listener $p_mtls 127.0.0.1",
		"cafile $ca_crt", "certfile $srv_crt", "keyfile $srv_key",
		'require_certificate true',
		"listener $p_oth 127.0.0.1",
		"cafile $ca_crt", "certfile $oth_crt", "keyfile $oth_key",
	]);
ok($broker->is_running, 'mosquitto with TLS listeners is running');

# the TLS listener works for a stock client, and is really TLS
my $probe_sub = tls_sub_start($broker, port => $p_tls, cafile => $ca_crt,
	topic => "$prefix/probe");
ok($probe_sub->{live}, 'mosquitto_sub --cafile subscribes over TLS');
ok(!mqtt_pub($p_tls, "$prefix/probe", 'plain', timeout => 5),
	'a plain-text publish to the TLS port fails');
tls_sub_stop($probe_sub);

# ---------------------------------------------------------------------------
# node
# ---------------------------------------------------------------------------

my $url_tls = "ssl://127.0.0.1:$p_tls";
my $node = new_node(
	'tls',
	broker                      => $url_tls,
	'mqtt_emit.tls_ca_file'     => $ca_crt,
	'mqtt_emit.reconnect_max'   => '500ms',
	'mqtt_emit.username'        => 'tlsuser',
	'mqtt_emit.password'        => 'tls-secret-pw',
	extra_conf                  => ["log_min_messages = 'log'"]);
sq($node, q{
CREATE EXTENSION pg_mqtt_emit;
CREATE TABLE tls_t(id int PRIMARY KEY, v text);
SELECT mqtt_emit.watch('tls_t');
CREATE ROLE mallory LOGIN;
});

my $id = 0;

# Insert one row; a TLS subscriber with the given options must see it.
sub event_reaches
{
	my ($what, %sub_opts) = @_;
	my $s = tls_sub_start($broker, topic => "$prefix/tls_t/#", %sub_opts);
	$id++;
	sq($node, "INSERT INTO tls_t VALUES ($id, 'tls event $id')");
	ok(tls_sub_wait($s, qr{^\Q$prefix\E/tls_t/create \{.*"v":"tls event $id"}m),
		"$what: event $id reaches a TLS subscriber")
	  or diag("subscriber output: $s->{out} $s->{err}");
	tls_sub_stop($s);
	return;
}

# 1. ssl:// with the right CA
ok(wait_connected($node), 'ssl:// with the test CA: connected');
event_reaches('ssl://', port => $p_tls, cafile => $ca_crt);
like(log_since($node, 0), qr/pg_mqtt_emit publisher connected to broker "\Q$url_tls\E"/,
	'server log: publisher connected over ssl://');

# 2. mqtts:// spelling
my $url_mqtts = "mqtts://127.0.0.1:$p_tls";
reconfigure($node, 'mqtt_emit.broker_url' => $url_mqtts);
ok(wait_connected($node), 'mqtts:// with the test CA: connected');
event_reaches('mqtts://', port => $p_tls, cafile => $ca_crt);

# 3. wrong CA: refused
my $off = reconfigure($node, 'mqtt_emit.broker_url' => $url_tls,
	'mqtt_emit.tls_ca_file' => $ca2_crt);
my $line = wait_refused_line($node, $url_tls, $off);
ok(defined $line, 'foreign CA: "cannot reach broker" line in the server log')
  and note($line);
ok(stays_disconnected($node, 3), 'foreign CA: stats.connected stays false');
my $err = stat_of($node, 'last_error');
like($err, qr/^(?:publisher|subscriber): .+/, "foreign CA: last_error set ($err)");
# the events meanwhile wait: one more row, published once the CA is right
$id++;
sq($node, "INSERT INTO tls_t VALUES ($id, 'waited $id')");
my $waiting_id = $id;

# back to the right CA: the waiting event is delivered
my $s_wait = tls_sub_start($broker, port => $p_tls, topic => "$prefix/tls_t/#",
	cafile => $ca_crt);
reconfigure($node, 'mqtt_emit.broker_url' => $url_tls,
	'mqtt_emit.tls_ca_file' => $ca_crt);
ok(wait_connected($node), 'right CA again: connected');
ok(tls_sub_wait($s_wait, qr{"v":"waited $waiting_id"}),
	'the event written while the CA was wrong is delivered afterwards');
tls_sub_stop($s_wait);

# 4. a certificate for another host name: refused
my $url_oth = "ssl://127.0.0.1:$p_oth";
$off = reconfigure($node, 'mqtt_emit.broker_url' => $url_oth);
$line = wait_refused_line($node, $url_oth, $off);
ok(defined $line, 'name mismatch: "cannot reach broker" line in the server log')
  and note($line);
ok(stays_disconnected($node, 3), 'name mismatch (certificate for otherhost, URL 127.0.0.1): not connected');
$err = stat_of($node, 'last_error');
like($err, qr/^(?:publisher|subscriber): .+/, "name mismatch: last_error set ($err)");

# 5. same listener, tls_verify = off: accepted
reconfigure($node, 'mqtt_emit.broker_url' => $url_oth, 'mqtt_emit.tls_verify' => 'off');
ok(wait_connected($node), 'name mismatch with tls_verify = off: connected');
event_reaches('tls_verify = off', port => $p_tls, cafile => $ca_crt);

# and with tls_verify = off even the foreign CA is accepted (documented:
# "verify the broker's certificate and host name")
reconfigure($node, 'mqtt_emit.broker_url' => $url_tls, 'mqtt_emit.tls_ca_file' => $ca2_crt);
ok(wait_connected($node), 'foreign CA with tls_verify = off: connected');

# 6. mutual TLS: without a client certificate refused ...
my $url_mtls = "ssl://127.0.0.1:$p_mtls";
$off = reconfigure($node, 'mqtt_emit.broker_url' => $url_mtls,
	'mqtt_emit.tls_ca_file' => $ca_crt, 'mqtt_emit.tls_verify' => 'on');
$line = wait_refused_line($node, $url_mtls, $off);
ok(defined $line, 'mutual TLS without a client certificate: "cannot reach broker" line')
  and note($line);
ok(stays_disconnected($node, 3), 'mutual TLS without a client certificate: not connected');

# ... and with it accepted
reconfigure($node, 'mqtt_emit.broker_url' => $url_mtls,
	'mqtt_emit.tls_cert_file' => $cli_crt, 'mqtt_emit.tls_key_file' => $cli_key);
ok(wait_connected($node), 'mutual TLS with the client certificate: connected');
event_reaches('mutual TLS', port => $p_mtls, cafile => $ca_crt,
	cert => $cli_crt, key => $cli_key);

# 7. two refusals in a row after a reload to another broker: the second one
# is logged too (the operator must learn that the new URL fails as well)
$off = reconfigure($node, 'mqtt_emit.broker_url' => $url_tls,
	'mqtt_emit.tls_ca_file' => $ca2_crt);
ok(defined wait_refused_line($node, $url_tls, $off), 'refusal A logged');
$off = reconfigure($node, 'mqtt_emit.broker_url' => $url_oth,
	'mqtt_emit.tls_ca_file' => $ca2_crt);
ok(defined wait_refused_line($node, $url_oth, $off, 10),
	'refusal B (another URL, right after refusal A) logged as well');

# ---------------------------------------------------------------------------
# 8. the TLS files and the password are hidden from non-superusers
# ---------------------------------------------------------------------------

is(sq($node, 'SHOW mqtt_emit.tls_key_file'), $cli_key,
	'superuser: SHOW mqtt_emit.tls_key_file gives the path');
is(sq($node, 'SHOW mqtt_emit.password'), 'tls-secret-pw',
	'superuser: SHOW mqtt_emit.password gives it');
for my $guc (qw(tls_key_file tls_cert_file tls_ca_file password))
{
	my ($stdout, $stderr) = ('', '');
	my $rc = $node->psql('postgres', "SHOW mqtt_emit.$guc",
		stdout => \$stdout, stderr => \$stderr,
		extra_params => [ '-U', 'mallory', '-v', 'VERBOSITY=verbose' ]);
	isnt($rc, 0, "non-superuser: SHOW mqtt_emit.$guc fails");
	like($stderr, qr/42501/, "non-superuser: SHOW mqtt_emit.$guc raises 42501");
	unlike($stdout . $stderr, qr/\Q$pki\E|tls-secret-pw/,
		"non-superuser: SHOW mqtt_emit.$guc leaks nothing");

	($stdout, $stderr) = ('', '');
	$rc = $node->psql('postgres',
		"SELECT current_setting('mqtt_emit.$guc')",
		stdout => \$stdout, stderr => \$stderr,
		extra_params => [ '-U', 'mallory', '-v', 'VERBOSITY=verbose' ]);
	like($stderr, qr/42501/, "non-superuser: current_setting('mqtt_emit.$guc') raises 42501");

	($stdout, $stderr) = ('', '');
	$node->psql('postgres',
		"SELECT count(*) FROM pg_settings WHERE name = 'mqtt_emit.$guc'",
		stdout => \$stdout, stderr => \$stderr,
		extra_params => [ '-U', 'mallory' ]);
	is($stdout, '0', "non-superuser: pg_settings hides mqtt_emit.$guc");
	is(sq($node, "SELECT count(*) FROM pg_settings WHERE name = 'mqtt_emit.$guc'"),
		($guc eq 'password' ? 0 : 1),
		"superuser: pg_settings row count for mqtt_emit.$guc");
}
{
	my ($stdout, $stderr) = ('', '');
	$node->psql('postgres', 'SHOW ALL', stdout => \$stdout, stderr => \$stderr,
		extra_params => [ '-U', 'mallory' ]);
	like($stdout, qr/mqtt_emit\.broker_url/, 'non-superuser: SHOW ALL works');
	unlike($stdout, qr/\Q$pki\E|tls-secret-pw|tls_key_file|tls_cert_file|tls_ca_file/,
		'non-superuser: SHOW ALL shows neither the TLS files nor the password');
}
unlike(slurp_file($node->logfile), qr/tls-secret-pw/, 'the password never appears in the server log');

$node->stop;
done_testing();
