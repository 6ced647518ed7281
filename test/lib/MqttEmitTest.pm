
=pod

=head1 NAME

MqttEmitTest - harness for pg_mqtt_emit's multi-process TAP suites

=head1 SYNOPSIS

  use strict;
  use warnings;
  use MqttEmitTest;    # loads PostgreSQL::Test::Cluster and ::Utils too
  use Test::More;

  my $broker = start_broker();
  my $node   = new_node('a', broker => $broker);
  $node->safe_psql('postgres', 'CREATE EXTENSION pg_mqtt_emit');

  my $sub = start_subscriber($broker, topic_prefix() . '/#');
  $node->safe_psql('postgres', 'INSERT INTO t VALUES (1)');
  ok($sub->wait_for_count(1), 'event published');
  my ($topic, $payload) = @{ ($sub->messages)[0] };

  $broker->stop;     # broker down
  $broker->start;    # back, same port
  done_testing();

=head1 DESCRIPTION

Starts real servers for the tests: mosquitto brokers on free 127.0.0.1 ports,
PostgreSQL clusters (through PostgreSQL's own PostgreSQL::Test::Cluster) with
pg_mqtt_emit preloaded and pointed at a broker, and mosquitto_sub subscribers
whose output the test can read. Every wait is a bounded poll; nothing sleeps
for a fixed time waiting for an asynchronous effect.

All nodes of one test script share one topic prefix, C<test/E<lt>randomE<gt>>
(see topic_prefix()), so several runs may share a broker without seeing each
other's messages, while the nodes of one script see each other's events.

Everything this module starts is stopped by PID when its object is destroyed
or, at the latest, in an END block. PostgreSQL::Test::Cluster stops its own
nodes in its END block.

Runs as any user but root (initdb refuses root); test/run.sh runs it as
C<postgres>. PostgreSQL's bin directory (from C<$PG_CONFIG>, default
the newest F</usr/lib/postgresql/NN/bin/pg_config>) is put first in PATH, and its Perl
test modules are added to @INC, so C<prove -I test/lib> is enough.

=cut

package MqttEmitTest;

use strict;
use warnings;

use File::Basename qw(dirname);

our ($PG_CONFIG, $PG_BINDIR, $PG_PERL_DIR);

BEGIN
{
	# default: the newest Debian-installed version (15 if none is)
	my ($newest) = sort { $b <=> $a } map { m{/postgresql/(\d+)/} ? $1 : () }
	  glob('/usr/lib/postgresql/*/bin/pg_config');
	$newest //= 15;
	$PG_CONFIG = $ENV{PG_CONFIG} // "/usr/lib/postgresql/$newest/bin/pg_config";
	$PG_BINDIR = "/usr/lib/postgresql/$newest/bin";
	my $pgxs_src = "/usr/lib/postgresql/$newest/lib/pgxs/src";
	if (-x $PG_CONFIG)
	{
		chomp(my $bindir = `"$PG_CONFIG" --bindir`);
		chomp(my $pgxs = `"$PG_CONFIG" --pgxs`);
		$PG_BINDIR = $bindir if $bindir ne '';
		# .../lib/pgxs/src/makefiles/pgxs.mk -> .../lib/pgxs/src
		$pgxs_src = dirname(dirname($pgxs)) if $pgxs ne '';
	}
	$PG_PERL_DIR = "$pgxs_src/test/perl";
	unshift @INC, $PG_PERL_DIR unless grep { $_ eq $PG_PERL_DIR } @INC;

	# PostgreSQL::Test::Cluster::init runs "$PG_REGRESS --config-auth".
	$ENV{PG_REGRESS} //= "$pgxs_src/test/regress/pg_regress";

	# PostgreSQL::Test::Cluster runs initdb, pg_ctl and psql from PATH.
	my @path = grep { $_ ne $PG_BINDIR } split /:/, ($ENV{PATH} // '');
	$ENV{PATH} = join ':', $PG_BINDIR, @path, '/usr/sbin', '/usr/bin', '/bin';
}

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;

use Carp qw(croak);
use Exporter 'import';
use File::Path ();
use File::Temp ();
use IPC::Run ();
use JSON::PP ();
use POSIX qw(WNOHANG);
use Scalar::Util qw(refaddr weaken);
use Test::More ();
use Time::HiRes ();

our @EXPORT = qw(
  start_broker start_rabbitmq new_node start_subscriber poll_until
  topic_prefix mqtt_pub free_port
  arrived_ids tally ranges
);

# Not exported by default: several scripts define a stats() of their own.
# use MqttEmitTest qw(:DEFAULT stats);
our @EXPORT_OK = qw(stats stat_of log_since as_role role_fails role_works);

# Objects (brokers, subscribers) to stop in END, keyed by address.
our %LIVE;

# Only the process that loaded this module stops what it started; a forked
# child that somehow runs Perl destructors must not.
our $OWNER_PID = $$;

my $rand_hex = sub {
	my ($bytes) = @_;
	return join '', map { sprintf '%02x', int(rand(256)) } 1 .. $bytes;
};

our $TOPIC_PREFIX = $ENV{MQTT_EMIT_TEST_TOPIC_PREFIX}
  // ('test/' . $rand_hex->(6));

my $node_counter = 0;

my $JSON = JSON::PP->new->utf8;

# A signal ends the script through exit(), so that the END blocks (ours and
# PostgreSQL::Test::Cluster's) stop what was started.
for my $sig (qw(INT TERM HUP))
{
	next if ref $SIG{$sig};
	$SIG{$sig} = sub {
		print STDERR "caught SIG$_[0], stopping\n";
		exit 1;
	};
}

=pod

=head1 FUNCTIONS

=over

=item topic_prefix()

The topic prefix that new_node() gives every node of this test script:
C<test/E<lt>12 hex digitsE<gt>>, unique per run (override with
C<$MQTT_EMIT_TEST_TOPIC_PREFIX>).

=cut

sub topic_prefix
{
	return $TOPIC_PREFIX;
}

=pod

=item default_timeout()

Seconds a wait may take by default: C<$PG_TEST_TIMEOUT_DEFAULT>, else 180
(PostgreSQL::Test::Utils' own default).

=cut

sub default_timeout
{
	return $PostgreSQL::Test::Utils::timeout_default || 180;
}

=pod

=item poll_until($code, $timeout_s = default_timeout(), $interval_s = 0.05)

Calls C<$code> until it returns a true value, which poll_until then returns;
returns false (an empty list in list context, undef in scalar context) once
C<$timeout_s> seconds have passed. C<$code> is called at least once.

=cut

sub poll_until
{
	my ($code, $timeout, $interval) = @_;
	$timeout  //= default_timeout();
	$interval //= 0.05;
	my $deadline = Time::HiRes::time() + $timeout;
	while (1)
	{
		my $r = $code->();
		return $r if $r;
		return if Time::HiRes::time() >= $deadline;
		Time::HiRes::sleep($interval);
	}
}

=pod

=item free_port()

A TCP port free on 127.0.0.1, chosen by PostgreSQL::Test::Cluster::get_free_port
(it asks the kernel by binding the port, and picks from 10200-32767, below
Linux's ephemeral range, so a client socket is unlikely to take it while a
broker on it is down for a restart test).

=cut

sub free_port
{
	return PostgreSQL::Test::Cluster::get_free_port();
}

=pod

=item mqtt_pub($broker, $topic, $payload, %opts)

Publishes one message with mosquitto_pub (QoS C<$opts{qos}>, default 1;
C<retain =E<gt> 1> for a retained message; C<undef> payload sends an empty one;
C<file =E<gt> $path> sends the bytes of a file instead; C<args =E<gt> [...]> adds
mosquitto_pub options, such as C<-V 5 -D publish user-property k v>).
Returns true when mosquitto_pub exited 0. Bounded by C<$opts{timeout}>
(default 10 s).

=cut

sub mqtt_pub
{
	my ($broker, $topic, $payload, %opts) = @_;
	my $port = ref $broker ? $broker->port : $broker;
	my @cmd  = (
		'mosquitto_pub', '-h', '127.0.0.1', '-p', $port,
		'-q', $opts{qos} // 1, '-t', $topic);
	push @cmd, '-r' if $opts{retain};
	push @cmd, @{ $opts{args} } if $opts{args};
	push @cmd,
	    defined $opts{file} ? ('-f', $opts{file})
	  : defined $payload    ? ('-m', $payload)
	  :                       ('-n');
	my ($out, $err) = ('', '');
	my $ok = eval {
		IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err,
			IPC::Run::timeout($opts{timeout} // 10));
	};
	return $ok ? 1 : 0;
}

# Fork and exec @cmd with stdin from /dev/null and stdout/stderr to files.
# Returns the child's PID (the exec'd program's PID: no shell in between).
sub _spawn
{
	my ($cmd, $stdout_file, $stderr_file) = @_;
	my $pid = fork();
	croak "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDIN, '<', '/dev/null') or POSIX::_exit(126);
		open(STDOUT, '>>', $stdout_file) or POSIX::_exit(126);
		open(STDERR, '>>', $stderr_file) or POSIX::_exit(126);
		{ no warnings 'exec'; exec { $cmd->[0] } @$cmd; }
		POSIX::_exit(127);
	}
	# test/run.sh stops these by PID if this script is killed before END.
	if (my $pidfile = $ENV{MQTT_EMIT_TEST_PIDFILE})
	{
		if (open my $fh, '>>', $pidfile)
		{
			print $fh "$pid " . substr((split m{/}, $cmd->[0])[-1], 0, 15) . "\n";
			close $fh;
		}
	}
	return $pid;
}

# True if $pid (our child) is still running; reaps it if it exited.
sub _child_alive
{
	my ($pid) = @_;
	return 0 unless $pid;
	my $r = waitpid($pid, WNOHANG);
	return $r == 0 ? 1 : 0;
}

# Stops our child $pid: SIGTERM, bounded wait, then SIGKILL.
sub _stop_child
{
	my ($pid, $timeout) = @_;
	return unless $pid;
	return unless _child_alive($pid);
	kill 'TERM', $pid;
	return if poll_until(sub { !_child_alive($pid) }, $timeout // 10, 0.02);
	kill 'KILL', $pid;
	waitpid($pid, 0);
	return;
}

=pod

=item start_broker(%opts)

Starts a mosquitto broker and returns an MqttEmitTest::Broker once
mosquitto_pub to it succeeds. Options: C<port> (default free_port()),
C<name> (used in file names), C<extra_conf> (a string or an array ref of
lines appended to mosquitto.conf), C<timeout> (seconds to wait for it,
default default_timeout()), C<persistent> (1: C<persistence true> in a
directory of its own, saved only at shutdown, so that persistent sessions
and their queued messages survive a stop and start).

The configuration is C<listener PORT 127.0.0.1>, C<allow_anonymous true>,
C<persistence false>, C<max_inflight_messages 0>, a log file in the broker's
directory, and C<user root> only when running as root (else mosquitto would
drop to user mosquitto and could not write its log).

=cut

sub start_broker
{
	my (%opts) = @_;
	if (delete $opts{persistent})
	{
		my $dir = PostgreSQL::Test::Utils::tempdir();
		my $extra = $opts{extra_conf} // [];
		$opts{extra_conf} = [
			'persistence true', "persistence_location $dir/", 'autosave_interval 0',
			ref $extra ? @$extra : ($extra)
		];
	}
	my $broker = MqttEmitTest::Broker->_new(%opts);
	$broker->start;
	return $broker;
}

=pod

=item start_rabbitmq(%opts)

Starts a RabbitMQ node with its MQTT plugin (Debian's rabbitmq-server) and
returns an MqttEmitTest::RabbitMQ once an MQTT publish to it succeeds, or
undef when it did not come up (the log is diag()ed). Everything is its own:
node name (C<mqttemit-PID-NAME@localhost>), AMQP, distribution and MQTT ports
(free_port()), data and log directories, and HOME (the Erlang cookie).
Options: C<name> (default C<rmq1>, C<rmq2>, ...), C<cluster> (another
MqttEmitTest::RabbitMQ: this node shares its epmd port and HOME, so the two
can form a cluster with ->join_cluster), C<timeout> (seconds to wait, default 180),
C<wait> (0: return at once, without waiting; call ->wait_up, so that
several nodes start at the same time).
Stopped by PID in END, after which the epmd the nodes started on their
private port is stopped (C<epmd -port P -kill>).

=cut

my $rabbit_counter = 0;

sub start_rabbitmq
{
	my (%opts) = @_;
	my $wait = delete $opts{wait} // 1;
	my $r = MqttEmitTest::RabbitMQ->_new(%opts);
	return $r->start(wait => $wait) ? $r : undef;
}

=pod

=item new_node($name, broker => $broker, %opts)

Creates, initialises and starts (unless C<start =E<gt> 0>) a
PostgreSQL::Test::Cluster. It does not create the extension. Options:

  broker       MqttEmitTest::Broker, or a broker URL string; required unless preload => 0
  preload      1 (default): shared_preload_libraries = 'pg_mqtt_emit' and the
               mqtt_emit.* settings below; 0: a plain cluster, no mqtt_emit settings
  database     mqtt_emit.database (default 'postgres')
  client_id    mqtt_emit.client_id (default "<name>-<pid>-<n>", unique per node)
  topic_prefix mqtt_emit.topic_prefix (default topic_prefix())
  start        0 to leave the node stopped (default 1)
  init         hash ref of options for $node->init (e.g. { allows_streaming => 1 })
  extra_conf   a string or array ref of raw postgresql.conf lines
  any other key => value   written as  key = 'value'  (e.g. 'mqtt_emit.qos' => 0)

The values used are in C<< $node->{mqtt_emit} >> (keys broker_url, client_id,
topic_prefix, database; empty hash for preload => 0).

=cut

sub new_node
{
	my ($name, %opts) = @_;
	my $broker    = delete $opts{broker};
	my $preload   = exists $opts{preload} ? delete $opts{preload} : 1;
	my $start     = exists $opts{start} ? delete $opts{start} : 1;
	my $database  = delete $opts{database} // 'postgres';
	my $client_id = delete $opts{client_id};
	my $prefix    = delete $opts{topic_prefix} // topic_prefix();
	my $init      = delete $opts{init} // {};
	my $extra     = delete $opts{extra_conf};

	croak "new_node($name): broker => is required unless preload => 0"
	  if $preload && !defined $broker;
	$node_counter++;
	$client_id //= "$name-$$-$node_counter";

	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%$init);

	my @lines = ('', '# added by MqttEmitTest::new_node');
	$node->{mqtt_emit} = {};
	if ($preload)
	{
		my $url = ref $broker ? $broker->url : $broker;
		push @lines,
		  "shared_preload_libraries = 'pg_mqtt_emit'",
		  'mqtt_emit.broker_url = ' . _conf_quote($url),
		  'mqtt_emit.database = ' . _conf_quote($database),
		  'mqtt_emit.client_id = ' . _conf_quote($client_id),
		  'mqtt_emit.topic_prefix = ' . _conf_quote($prefix);
		$node->{mqtt_emit} = {
			broker_url   => $url,
			client_id    => $client_id,
			topic_prefix => $prefix,
			database     => $database,
		};
	}
	for my $key (sort keys %opts)
	{
		croak "new_node($name): bad setting name '$key'"
		  unless $key =~ /^[A-Za-z_][A-Za-z0-9_.]*$/;
		push @lines, "$key = " . _conf_quote($opts{$key});
	}
	if (defined $extra)
	{
		push @lines, ref $extra ? @$extra : ($extra);
	}
	$node->append_conf('postgresql.conf', join("\n", @lines) . "\n");

	$node->start if $start;
	return $node;
}

# A postgresql.conf string literal.
sub _conf_quote
{
	my ($v) = @_;
	$v =~ s/'/''/g;
	return "'$v'";
}

=pod

=item start_subscriber($broker, $filter, %opts)

Starts C<mosquitto_sub -q 1> on C<$filter> (a topic filter, or an array ref of
them) in the background, writing every message to a file, and returns an
MqttEmitTest::Subscriber once the subscription is live: it also subscribes to
a private probe topic and publishes probes there until one comes back. Probe
messages never appear in messages(). Options: C<qos> (subscription QoS,
default 1), C<client_id>, C<clean_session> (0: a persistent session,
mosquitto_sub C<-c>; the broker keeps QoS 1 messages for it while it is
disconnected), C<extra_args> (array ref of more mosquitto_sub arguments),
C<timeout>. After a broker restart mosquitto_sub
reconnects (about a second later) and subscribes again; messages published
in between are lost (clean session).

=cut

sub start_subscriber
{
	my ($broker, $filter, %opts) = @_;
	my $sub = MqttEmitTest::Subscriber->_new($broker, $filter, %opts);
	$sub->_start;
	return $sub;
}

=pod

=item as_role($node, $role, $sql [, $db])

Runs C<$sql> with psql in database C<$db> (default postgres) of C<$node>, connected as
C<$role>, stopping at the first error, with verbose errors (SQLSTATEs in
stderr). Returns (exit code, stdout, stderr). Exported on request.

=item role_fails($node, $role, $sql, $sqlstate, $name, @like)

One assertion: C<$sql> as C<$role> fails with C<$sqlstate>, and stderr
matches every regex in C<@like>. Returns stderr. Exported on request.

=item role_works($node, $role, $sql, $name)

One assertion: C<$sql> as C<$role> succeeds. Returns stdout. Exported on
request.

=item stat_of($node, $column)

One column of mqtt_emit.stats of C<$node>, or undef when the node does not
answer. Exported on request.

=item log_since($node, $offset)

The server log of C<$node> from byte C<$offset> on. Exported on request.

=cut

sub as_role
{
	my ($node, $role, $sql, $db) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql($db // 'postgres', $sql, stdout => \$out, stderr => \$err,
		on_error_stop => 1,
		extra_params => [ '-U', $role, '-v', 'VERBOSITY=verbose' ]);
	return ($rc, $out, $err);
}

sub role_fails
{
	my ($node, $role, $sql, $state, $name, @like) = @_;
	my ($rc, $out, $err) = as_role($node, $role, $sql);
	my $ok = $rc != 0 && $err =~ /ERROR:\s+$state:/;
	$ok &&= $err =~ $_ for @like;
	Test::More::ok($ok, "$role: $name ($state)")
	  or Test::More::diag("rc $rc, stdout: $out, stderr: $err");
	return $err;
}

sub role_works
{
	my ($node, $role, $sql, $name) = @_;
	my ($rc, $out, $err) = as_role($node, $role, $sql);
	Test::More::ok($rc == 0, "$role: $name") or Test::More::diag("rc $rc, stderr: $err");
	return $out;
}

sub stat_of
{
	my ($node, $col) = @_;
	my ($rc, $out) = $node->psql('postgres', "SELECT $col FROM mqtt_emit.stats");
	return $rc == 0 ? $out : undef;
}

sub log_since
{
	my ($node, $offset) = @_;
	my $text = PostgreSQL::Test::Utils::slurp_file($node->logfile);
	return length($text) > $offset ? substr($text, $offset) : '';
}

=pod

=item stats($node)

mqtt_emit.stats of C<$node> (database postgres) as a hash ref, or undef when
the node does not answer (stopped, crash restart). Exported on request:
C<use MqttEmitTest qw(:DEFAULT stats)>.

=cut

sub stats
{
	my ($node) = @_;
	my ($rc, $out) =
	  $node->psql('postgres', 'SELECT row_to_json(s) FROM mqtt_emit.stats s');
	return undef if $rc != 0 || !defined $out || $out eq '';
	return $JSON->decode($out);
}

=pod

=item arrived_ids($sub, $model)

The C<result.id> of every create event of C<$model> (topic
C<topic_prefix()/$model/create>) that subscriber C<$sub> received, in arrival
order, duplicates included; C<'?'> for a payload that is not the expected
JSON. The same list as walking C<< $sub->messages >>, but read incrementally:
the file offset reached and the ids found so far are kept per subscriber
output file and model, and each call parses only the complete lines added
since (a line still being written is left for the next call), so polling it
over tens of thousands of events stays cheap. A subscriber's output file only
grows after it started.

=cut

# arrived_ids() state, by "<subscriber file>\0<model>":
# { off => bytes of complete lines parsed, ids => [ ids found so far ] }.
my %arrived_readers;

# A create event exactly as capture.c writes it; $1 is the top-level
# result.id when it is an integer and result's first key. Anything else
# (other key order, whitespace, a non-integer id) is decoded as JSON.
my $create_id_re = qr/
	\A\{"model":"(?:[^"\\]++|\\.)*+","operation":"create",
	"args":\{"data":(?&obj)\},"result":\{"id":(-?\d+)[,}]
	(?(DEFINE)(?<obj>\{(?:[^{}"]++|"(?:[^"\\]++|\\.)*+"|(?&obj))*+\}))
/xs;

sub arrived_ids
{
	my ($sub, $model) = @_;
	my $st = $arrived_readers{ $sub->file . "\0$model" } //= { off => 0, ids => [] };
	my $re = qr{^\Q${\ topic_prefix()}\E/\Q$model\E/create$};
	open my $fh, '<', $sub->file or return @{ $st->{ids} };
	# read up to the size the file has now: the subscriber keeps appending
	my $size = -s $fh;
	seek $fh, $st->{off}, 0;
	while ($st->{off} < $size && defined(my $line = <$fh>))
	{
		# the same parsing as MqttEmitTest::Subscriber::_read_all; a line
		# still being written has no newline yet: read it next time
		last unless $line =~ s/\n\z//;
		$st->{off} += length($line) + 1;
		my ($hex, $qos, $retain, $topic) = split /\t/, $line, 4;
		# probes never match $re
		next unless defined $topic && $topic =~ $re;
		my $payload = pack('H*', $hex);
		if ($payload =~ $create_id_re)
		{
			push @{ $st->{ids} }, $1;
			next;
		}
		my $p = eval { $JSON->decode($payload) };
		push @{ $st->{ids} }, (ref $p eq 'HASH' && ref $p->{result} eq 'HASH')
		  ? $p->{result}{id} // '?' : '?';
	}
	close $fh;
	return @{ $st->{ids} };
}

=pod

=item ranges(@ids)

C<"1-5, 9, 12-40"> for a list of integers (anything else is left out),
cut after 400 characters.

=cut

sub ranges
{
	my @n = sort { $a <=> $b } grep { /^-?\d+$/ } @_;
	my @out;
	while (@n)
	{
		my $s = shift @n;
		my $e = $s;
		$e = shift @n while @n && $n[0] == $e + 1;
		push @out, $s == $e ? $s : "$s-$e";
	}
	my $txt = join ', ', @out;
	return length $txt > 400 ? substr($txt, 0, 400) . ' ...' : $txt;
}

=pod

=item tally($label, \@arrived, \@expected, $forbidden)

Compares the ids that arrived (in arrival order) with those committed (in
commit order), note()s the counts, the missing, unexpected and forbidden ids
(see ranges()) and the first 5 commit order inversions, and returns a hash ref:

  sent        ids expected
  received    ids arrived, duplicates included
  distinct    distinct ids arrived
  missing     expected ids that never arrived
  duplicates  arrivals of an id already seen
  unexpected  distinct arrived ids not expected
  forbidden   distinct arrived ids that $forbidden matches (0 without one)
  disorder    first deliveries of expected ids that came after one committed later
  inversions  array ref: up to 5 of them, as "A then B"

C<$forbidden>, the ids that must never arrive (rolled back), is undef, an
array ref of ids, or a code ref called with an id that returns true for such
an id.

=cut

sub tally
{
	my ($label, $arrived, $expected, $forbidden) = @_;
	my $is_bad;
	if (!defined $forbidden)
	{
		$is_bad = sub { 0 };
	}
	elsif (ref $forbidden eq 'ARRAY')
	{
		my %bad = map { $_ => 1 } @$forbidden;
		$is_bad = sub { $bad{ $_[0] } };
	}
	elsif (ref $forbidden eq 'CODE')
	{
		$is_bad = $forbidden;
	}
	else
	{
		croak 'tally: $forbidden must be undef, an array ref or a code ref';
	}

	my %pos = map { $expected->[$_] => $_ } 0 .. $#$expected;
	my (%seen, @first, @unexpected, @forbidden_seen);
	my $dups = 0;
	for my $id (@$arrived)
	{
		if ($seen{$id}++) { $dups++; next; }
		if (exists $pos{$id}) { push @first, $id; }
		else                  { push @unexpected, $id; }
		push @forbidden_seen, $id if $is_bad->($id);
	}
	my @missing = grep { !$seen{$_} } @$expected;
	my $disorder = 0;
	my @inv;
	for my $i (1 .. $#first)
	{
		next unless $pos{ $first[$i] } < $pos{ $first[ $i - 1 ] };
		$disorder++;
		push @inv, "$first[$i - 1] then $first[$i]" if @inv < 5;
	}
	my %r = (
		sent       => scalar @$expected,
		received   => scalar @$arrived,
		distinct   => scalar keys %seen,
		missing    => scalar @missing,
		duplicates => $dups,
		unexpected => scalar @unexpected,
		forbidden  => scalar @forbidden_seen,
		disorder   => $disorder,
		inversions => \@inv);
	Test::More::note(
		sprintf(
			'%s: sent %d, received %d (distinct %d), missing %d, duplicates %d, '
			  . 'unexpected %d, %sout of commit order %d',
			$label, @r{qw(sent received distinct missing duplicates unexpected)},
			(defined $forbidden ? "rolled back seen $r{forbidden}, " : ''),
			$disorder));
	Test::More::note("$label: missing ids: " . ranges(@missing)) if @missing;
	Test::More::note("$label: unexpected ids: " . ranges(@unexpected))
	  if @unexpected;
	Test::More::note("$label: rolled-back ids seen: " . ranges(@forbidden_seen))
	  if @forbidden_seen;
	Test::More::note("$label: first inversions: " . join(', ', @inv)) if @inv;
	return \%r;
}

# Remember a broker or subscriber for END. Weak references: an object that
# goes out of scope stops in DESTROY.
sub _register
{
	my ($obj) = @_;
	$LIVE{ refaddr $obj} = $obj;
	weaken($LIVE{ refaddr $obj});
	return;
}

# A new directory for one broker or subscriber under tmp_check (next to the
# nodes' logs), kept after a failed run and removed in END after a passing one.
my @workdirs;

sub _workdir
{
	my ($prefix) = @_;
	my $dir = File::Temp::tempdir("${prefix}_XXXX",
		DIR     => $PostgreSQL::Test::Utils::tmp_check,
		CLEANUP => 0);
	push @workdirs, $dir;
	return $dir;
}

END
{
	# Keep the test's exit status: stopping children calls waitpid.
	local $?;
	if ($$ == $OWNER_PID)
	{
		# Subscribers before brokers, so that they do not log reconnect noise.
		for my $obj (sort { ref($b) cmp ref($a) } grep { defined } values %LIVE)
		{
			eval { $obj->stop; 1 };
		}
		if (Test::More->builder->is_passing && !defined $ENV{PG_TEST_NOCLEAN})
		{
			File::Path::rmtree($_) for @workdirs;
		}
	}
}

=pod

=back

=head1 MqttEmitTest::Broker

=over

=item ->port, ->pid (undef while stopped), ->url ('tcp://127.0.0.1:PORT'),
->dir, ->conf_file, ->log_file, ->log (log file contents)

=item ->start

Starts mosquitto on the broker's port (the same port after a ->stop) and waits
until mosquitto_pub succeeds; dies with the log if it does not come up.

=item ->stop

SIGTERM by PID, waits (bounded) until it exited, SIGKILL as a last resort.

=item ->kill9

SIGKILL by PID (a crash, not a clean shutdown).

=item ->is_running

=item ->log_position

Current size of the log file: pass it as C<$offset> below to look only at
what is logged from now on.

=item ->wait_for_log($regex, $timeout_s, $offset = 0)

Polls the broker's log (from byte C<$offset>) until it matches; true if it did.

=item ->wait_for_subscription($client_id, $filter, $timeout_s, $offset = 0)

Waits until the broker logged a SUBSCRIBE of C<$filter> by C<$client_id>,
e.g. a node's subscriber,
C<< $b->wait_for_subscription($node->{mqtt_emit}{client_id} . '-subscriber', topic_prefix() . '/t/#') >>.
Use it before publishing events a remote node must receive: the node's
listener registration only asks its worker to subscribe.

=back

=cut

package MqttEmitTest::Broker;

use strict;
use warnings;

use Carp qw(croak);

my $broker_counter = 0;

sub _new
{
	my ($class, %opts) = @_;
	$broker_counter++;
	my $name = $opts{name} // "broker$broker_counter";
	my $dir  = MqttEmitTest::_workdir("mosquitto_$name");
	my $self = bless {
		name       => $name,
		port       => $opts{port},
		fixed_port => defined $opts{port},
		timeout    => $opts{timeout} // MqttEmitTest::default_timeout(),
		dir        => $dir,
		conf_file  => "$dir/mosquitto.conf",
		log_file   => "$dir/mosquitto.log",
		out_file   => "$dir/mosquitto.out",
		extra      => (
			  !defined $opts{extra_conf} ? []
			: ref $opts{extra_conf}      ? [ @{ $opts{extra_conf} } ]
			:                              [ $opts{extra_conf} ]),
		pid   => undef,
		owner => $$,
	}, $class;
	MqttEmitTest::_register($self);
	return $self;
}

sub _write_conf
{
	my ($self) = @_;
	my @conf = (
		"listener $self->{port} 127.0.0.1",
		'allow_anonymous true',
		'persistence false',
		'max_inflight_messages 0',
		'max_queued_messages 0',
		"log_dest file $self->{log_file}",
		'log_type error',
		'log_type warning',
		'log_type notice',
		'log_type information',
		'log_type subscribe',
		'log_type unsubscribe',
		'log_timestamp_format %Y-%m-%dT%H:%M:%S',
		# As root mosquitto would switch to user mosquitto, which cannot
		# write to our directory.
		($> == 0 ? ('user root') : ()),
		@{ $self->{extra} });
	open my $fh, '>', $self->{conf_file}
	  or croak "cannot write $self->{conf_file}: $!";
	print $fh join("\n", @conf), "\n";
	close $fh;
	return;
}

sub port      { return $_[0]->{port}; }
sub pid       { return $_[0]->{pid}; }
sub url       { return "tcp://127.0.0.1:$_[0]->{port}"; }
sub dir       { return $_[0]->{dir}; }
sub conf_file { return $_[0]->{conf_file}; }
sub log_file  { return $_[0]->{log_file}; }

sub log
{
	my ($self) = @_;
	my $text = '';
	for my $f ($self->{log_file}, $self->{out_file})
	{
		$text .= PostgreSQL::Test::Utils::slurp_file($f) if -e $f;
	}
	return $text;
}

sub is_running
{
	my ($self) = @_;
	return MqttEmitTest::_child_alive($self->{pid});
}

sub log_position
{
	my ($self) = @_;
	return -s $self->{log_file} // 0;
}

sub wait_for_log
{
	my ($self, $regex, $timeout, $offset) = @_;
	$offset //= 0;
	return MqttEmitTest::poll_until(
		sub {
			open my $fh, '<', $self->{log_file} or return 0;
			seek $fh, $offset, 0;
			local $/;
			my $text = <$fh> // '';
			close $fh;
			return $text =~ $regex ? 1 : 0;
		},
		$timeout);
}

sub wait_for_subscription
{
	my ($self, $client_id, $filter, $timeout, $offset) = @_;
	# mosquitto logs "<time>: <client id> <qos> <filter>" for each SUBSCRIBE
	return $self->wait_for_log(qr/^\S+: \Q$client_id\E \d+ \Q$filter\E$/m,
		$timeout, $offset);
}

sub start
{
	my ($self) = @_;
	croak "broker $self->{name} is already running (pid $self->{pid})"
	  if $self->is_running;

	# The first start may pick another port if ours was taken in the
	# meantime; a restart always reuses the port (tests rely on it).
	my $first = !defined $self->{port};
	for my $attempt (1 .. ($first && !$self->{fixed_port} ? 5 : 1))
	{
		$self->{port} = MqttEmitTest::free_port() if $first;
		$self->_write_conf;
		my $why = $self->_start_once;
		return $self unless defined $why;
		next if $first && $why eq 'exited' && $attempt < 5;
		croak "mosquitto $self->{name} on port $self->{port} $why; log:\n"
		  . $self->log;
	}
	return $self;
}

# Starts mosquitto once and waits until it accepts a publish. Returns undef
# on success, else why not ('exited' or 'not reachable ...').
sub _start_once
{
	my ($self) = @_;
	$self->{pid} = MqttEmitTest::_spawn([ 'mosquitto', '-c', $self->{conf_file} ],
		$self->{out_file}, $self->{out_file});
	my $pid  = $self->{pid};
	my $died = 0;
	my $up   = MqttEmitTest::poll_until(
		sub {
			if (!MqttEmitTest::_child_alive($pid)) { $died = 1; return 1; }
			return MqttEmitTest::mqtt_pub($self, 'mqtt_emit_test/ready', 'x',
				qos => 0, timeout => 5);
		},
		$self->{timeout}, 0.05);
	return undef if $up && !$died;
	$self->stop;
	return $died ? 'exited' : "not reachable after $self->{timeout} s";
}

sub stop
{
	my ($self) = @_;
	return if $$ != $self->{owner};
	MqttEmitTest::_stop_child($self->{pid});
	$self->{pid} = undef;
	return;
}

sub kill9
{
	my ($self) = @_;
	return unless $self->{pid};
	kill 'KILL', $self->{pid};
	waitpid($self->{pid}, 0);
	$self->{pid} = undef;
	return;
}

sub DESTROY
{
	my ($self) = @_;
	local ($?, $@);
	$self->stop;
}

=pod

=head1 MqttEmitTest::Subscriber

=over

=item ->messages

The messages received so far, in arrival order, as a list of
C<[$topic, $payload]> (payload as raw bytes; decode_json takes them as is).
Probe messages are left out.

=item ->records

The same messages as hash refs: C<{ topic, payload, qos, retain }>.

=item ->count

Number of messages (without probes).

=item ->wait_for_count($n, $timeout_s = default_timeout())

Polls until at least C<$n> messages have arrived; returns true if they did,
false on timeout.

=item ->wait_for($code, $timeout_s)

Polls until C<< $code->(@messages) >> returns true; returns that value, or
false on timeout.

=item ->wait_ready($timeout_s)

Publishes fresh probes until one comes back: after a broker restart, this
returns once mosquitto_sub has reconnected and subscribed again. True if so.

=item ->stop

Stops mosquitto_sub (by PID). ->messages still works afterwards.

=item ->pid, ->client_id, ->file (raw output), ->filters, ->probe_topic

=back

=cut

package MqttEmitTest::Subscriber;

use strict;
use warnings;

use Carp qw(croak);

my $sub_counter = 0;

sub _new
{
	my ($class, $broker, $filter, %opts) = @_;
	croak 'start_subscriber: broker and topic filter required'
	  unless $broker && defined $filter;
	$sub_counter++;
	my $dir = MqttEmitTest::_workdir("mosquitto_sub$sub_counter");
	my $self = bless {
		broker  => $broker,
		port    => (ref $broker ? $broker->port : $broker),
		filters => (ref $filter ? [@$filter] : [$filter]),
		qos     => $opts{qos} // 1,
		client_id => $opts{client_id} // "sub-$$-$sub_counter-" . int(rand(1e9)),
		clean_session => $opts{clean_session} // 1,
		extra_args    => [ @{ $opts{extra_args} // [] } ],
		timeout => $opts{timeout} // MqttEmitTest::default_timeout(),
		file    => "$dir/messages.out",
		errfile => "$dir/mosquitto_sub.err",
		probe_topic => 'mqtt_emit_test/probe/' . "$$-$sub_counter-" . int(rand(1e9)),
		pid     => undef,
		owner   => $$,
	}, $class;
	return $self;
}

sub pid         { return $_[0]->{pid}; }
sub client_id   { return $_[0]->{client_id}; }
sub file        { return $_[0]->{file}; }
sub filters     { return @{ $_[0]->{filters} }; }
sub probe_topic { return $_[0]->{probe_topic}; }

sub _start
{
	my ($self) = @_;
	# One line per message: hex payload, QoS, retain flag, topic. Hex keeps
	# payloads with newlines, tabs or binary bytes intact; the topic comes last
	# so that it may contain anything but a newline.
	my @cmd = (
		'mosquitto_sub', '-h', '127.0.0.1', '-p', $self->{port},
		'-i', $self->{client_id},
		($self->{clean_session} ? () : ('-c')),
		'-q', $self->{qos},
		@{ $self->{extra_args} },
		'-F', '%x\t%q\t%r\t%t',
		(map { ('-t', $_) } @{ $self->{filters} }),
		'-t', $self->{probe_topic});
	open my $fh, '>', $self->{file} or croak "cannot create $self->{file}: $!";
	close $fh;
	$self->{pid} = MqttEmitTest::_spawn(\@cmd, $self->{file}, $self->{errfile});
	MqttEmitTest::_register($self);

	if (!$self->wait_ready)
	{
		my $err = -e $self->{errfile}
		  ? PostgreSQL::Test::Utils::slurp_file($self->{errfile}) : '';
		$self->stop;
		croak "mosquitto_sub on port $self->{port} never received its probe;"
		  . " stderr:\n$err";
	}
	return $self;
}

sub wait_ready
{
	my ($self, $timeout) = @_;
	# Publish a probe now and then until one of them comes back: then the
	# subscriptions (all sent in the same SUBSCRIBE packet) are live. Probes
	# published by an earlier call do not count.
	my $first = ($self->{probe_seq} //= 0) + 1;
	my $last_probe = 0;
	return MqttEmitTest::poll_until(
		sub {
			return 0 unless MqttEmitTest::_child_alive($self->{pid});
			if (Time::HiRes::time() - $last_probe >= 0.25)
			{
				my $seq = ++$self->{probe_seq};
				MqttEmitTest::mqtt_pub($self->{port}, $self->{probe_topic},
					"probe $seq", qos => 0, timeout => 5);
				$last_probe = Time::HiRes::time();
			}
			return scalar grep {
				$_->{topic} eq $self->{probe_topic}
				  && $_->{payload} =~ /^probe (\d+)$/
				  && $1 >= $first
			} $self->_read_all;
		},
		$timeout // $self->{timeout}, 0.02) ? 1 : 0;
}

# All lines of the output file, parsed, probes included.
sub _read_all
{
	my ($self) = @_;
	open my $fh, '<', $self->{file} or return ();
	my @recs;
	while (my $line = <$fh>)
	{
		# A line still being written has no newline yet: leave it for later.
		last unless $line =~ s/\n\z//;
		my ($hex, $qos, $retain, $topic) = split /\t/, $line, 4;
		next unless defined $topic;
		push @recs, {
			topic   => $topic,
			payload => pack('H*', $hex),
			qos     => $qos,
			retain  => $retain,
		};
	}
	close $fh;
	return @recs;
}

sub records
{
	my ($self) = @_;
	return grep { $_->{topic} ne $self->{probe_topic} } $self->_read_all;
}

sub messages
{
	my ($self) = @_;
	return map { [ $_->{topic}, $_->{payload} ] } $self->records;
}

sub count
{
	my ($self) = @_;
	return scalar(my @r = $self->records);
}

sub wait_for_count
{
	my ($self, $n, $timeout) = @_;
	return MqttEmitTest::poll_until(sub { $self->count >= $n }, $timeout) ? 1 : 0;
}

sub wait_for
{
	my ($self, $code, $timeout) = @_;
	return MqttEmitTest::poll_until(sub { $code->($self->messages) }, $timeout);
}

sub stop
{
	my ($self) = @_;
	return if $$ != $self->{owner};
	MqttEmitTest::_stop_child($self->{pid});
	$self->{pid} = undef;
	return;
}

sub DESTROY
{
	my ($self) = @_;
	local ($?, $@);
	$self->stop;
}

=pod

=head1 MqttEmitTest::RabbitMQ

=over

=item ->start(wait => 1)

Starts the node (again, with the same ports and data after a ->stop) and
waits until an MQTT publish to it succeeds; true if it came up. With
C<wait =E<gt> 0> it returns at once: ->wait_up waits.

=item ->wait_up

Waits until an MQTT publish to the node succeeds; true if it did, else
diag()s its output, stops it and returns false.

=item ->stop

SIGTERM to rabbitmq-server by PID (it stops the node cleanly), bounded wait.

=item ->ctl(@args)

Runs rabbitmqctl against this node with its environment; returns (exit
status, stdout + stderr).

=item ->join_cluster($other)

Makes this node a member of $other's cluster (stop_app, join_cluster,
start_app); true on success.

=item ->port (MQTT), ->url, ->node, ->pid, ->dir, ->log (its log file),
->version (C<3.10> etc.)

=back

=cut

package MqttEmitTest::RabbitMQ;

use strict;
use warnings;

use Carp qw(croak);

our $SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server';
our $CTL    = '/usr/lib/rabbitmq/bin/rabbitmqctl';

# epmd ports to stop in END, after every node
my %epmd_ports;

sub _new
{
	my ($class, %opts) = @_;
	$rabbit_counter++;
	my $name = $opts{name} // "rmq$rabbit_counter";
	my $dir  = MqttEmitTest::_workdir("rabbitmq_$name");
	my $other = $opts{cluster};
	my $self = bless {
		name    => $name,
		dir     => $dir,
		home    => $other ? $other->{home} : $dir,
		epmd    => $other ? $other->{epmd} : MqttEmitTest::free_port(),
		node    => "mqttemit-$$-$name\@localhost",
		timeout => $opts{timeout} // 180,
		pid     => undef,
		owner   => $$,
		map { $_ => MqttEmitTest::free_port() } qw(amqp dist mqtt),
	}, $class;
	$epmd_ports{ $self->{epmd} } = 1;
	PostgreSQL::Test::Utils::append_to_file("$dir/enabled_plugins", "[rabbitmq_mqtt].\n");
	PostgreSQL::Test::Utils::append_to_file("$dir/rabbitmq.conf", join("\n",
		"listeners.tcp.default = 127.0.0.1:$self->{amqp}",
		"mqtt.listeners.tcp.default = 127.0.0.1:$self->{mqtt}",
		'mqtt.allow_anonymous = true',
		'loopback_users = none',
		'log.file.level = info', ''));
	PostgreSQL::Test::Utils::append_to_file("$dir/rabbitmq-env.conf", '');
	MqttEmitTest::_register($self);
	return $self;
}

sub port { return $_[0]->{mqtt}; }
sub url  { return "tcp://127.0.0.1:$_[0]->{mqtt}"; }
sub node { return $_[0]->{node}; }
sub pid  { return $_[0]->{pid}; }
sub dir  { return $_[0]->{dir}; }
sub log  { return "$_[0]->{dir}/log/$_[0]->{node}.log"; }

sub version
{
	my ($v) = `dpkg-query -W -f='\${Version}' rabbitmq-server 2>/dev/null` =~ /^(\d+\.\d+)/;
	return $v // '0.0';
}

sub _env
{
	my ($self) = @_;
	my $d = $self->{dir};
	return (
		HOME                          => $self->{home},
		RABBITMQ_NODENAME             => $self->{node},
		RABBITMQ_NODE_PORT            => $self->{amqp},
		RABBITMQ_DIST_PORT            => $self->{dist},
		ERL_EPMD_PORT                 => $self->{epmd},
		RABBITMQ_CONFIG_FILE          => "$d/rabbitmq.conf",
		RABBITMQ_ADVANCED_CONFIG_FILE => "$d/advanced.config",
		RABBITMQ_CONF_ENV_FILE        => "$d/rabbitmq-env.conf",
		RABBITMQ_ENABLED_PLUGINS_FILE => "$d/enabled_plugins",
		RABBITMQ_MNESIA_BASE          => "$d/mnesia",
		RABBITMQ_LOG_BASE             => "$d/log",
		RABBITMQ_PID_FILE             => "$d/rabbitmq.pid",
		RABBITMQ_PLUGINS_EXPAND_DIR   => "$d/plugins-expand");
}

sub is_running
{
	my ($self) = @_;
	return MqttEmitTest::_child_alive($self->{pid});
}

sub start
{
	my ($self, %opts) = @_;
	croak "RabbitMQ $self->{name} is already running" if $self->is_running;
	{
		local %ENV = (%ENV, $self->_env);
		$self->{pid} = MqttEmitTest::_spawn([$SERVER], "$self->{dir}/out", "$self->{dir}/out");
	}
	return 1 if defined $opts{wait} && !$opts{wait};
	return $self->wait_up;
}

sub wait_up
{
	my ($self) = @_;
	my $pid  = $self->{pid};
	my $died = 0;
	my $up = MqttEmitTest::poll_until(
		sub {
			if (!MqttEmitTest::_child_alive($pid)) { $died = 1; return 1; }
			return MqttEmitTest::mqtt_pub($self->{mqtt}, 'mqtt_emit_test/ready', 'x',
				qos => 1, timeout => 5);
		},
		$self->{timeout}, 0.2);
	if (!$up || $died)
	{
		Test::More::diag("RabbitMQ $self->{name} did not come up: "
			  . (-e "$self->{dir}/out" ? PostgreSQL::Test::Utils::slurp_file("$self->{dir}/out") : ''));
		$self->stop;
		return 0;
	}
	return 1;
}

sub stop
{
	my ($self) = @_;
	return if $$ != $self->{owner};
	MqttEmitTest::_stop_child($self->{pid}, 60);
	$self->{pid} = undef;
	return;
}

sub ctl
{
	my ($self, @args) = @_;
	local %ENV = (%ENV, $self->_env);
	my $out = '';
	my $ok = IPC::Run::run([ $CTL, '-n', $self->{node}, @args ],
		'<', \undef, '>&', \$out, IPC::Run::timeout(120));
	return ($ok ? 0 : ($? >> 8 || 1), $out);
}

sub join_cluster
{
	my ($self, $other) = @_;
	for my $step ([ 'stop_app' ], [ 'join_cluster', $other->{node} ], [ 'start_app' ])
	{
		my ($rc, $out) = $self->ctl(@$step);
		if ($rc != 0)
		{
			Test::More::diag("rabbitmqctl @$step on $self->{node}: $out");
			return 0;
		}
	}
	return MqttEmitTest::poll_until(
		sub { MqttEmitTest::mqtt_pub($self->{mqtt}, 'mqtt_emit_test/ready', 'x', qos => 1, timeout => 5) },
		$self->{timeout}, 0.2) ? 1 : 0;
}

sub DESTROY
{
	my ($self) = @_;
	local ($?, $@);
	$self->stop;
}

# Stop the nodes, then their epmd (this END runs before MqttEmitTest's:
# END blocks run in reverse order of compilation).
END
{
	local $?;
	if ($$ == $MqttEmitTest::OWNER_PID)
	{
		for my $obj (grep { defined && ref eq __PACKAGE__ } values %MqttEmitTest::LIVE)
		{
			eval { $obj->stop; 1 };
		}
		for my $port (keys %epmd_ports)
		{
			IPC::Run::run([ 'epmd', '-port', $port, '-kill' ],
				'<', \undef, '>', \my $o, '2>', \my $e, IPC::Run::timeout(10));
		}
	}
}

1;
