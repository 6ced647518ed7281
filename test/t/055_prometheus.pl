#!/usr/bin/perl
#
# 055_prometheus.pl: every query of contrib/prometheus/queries.yaml (the
# postgres_exporter queries.yaml format) runs against a live cluster, as a
# role that is only a member of pg_monitor, and returns exactly the columns
# the file declares: LABEL columns as text, COUNTER and GAUGE columns as
# numbers that are never NULL, at least one row each.
use strict;
use warnings;

use MqttEmitTest;
use PostgreSQL::Test::Utils;
use File::Basename qw(dirname);
use Test::More;
use YAML::XS ();

my $file = dirname(__FILE__) . '/../../contrib/prometheus/queries.yaml';
ok(-f $file, "queries file $file") or BAIL_OUT('no queries.yaml');
my $conf = YAML::XS::LoadFile($file);
ok(ref $conf eq 'HASH' && keys %$conf >= 2, 'queries.yaml has the queries') or BAIL_OUT('bad yaml');

my $broker = start_broker();
my $node   = new_node('prom', broker => $broker);
$node->safe_psql('postgres', q{
CREATE EXTENSION pg_mqtt_emit;
CREATE ROLE exporter LOGIN IN ROLE pg_monitor;
CREATE TABLE t (id int PRIMARY KEY);
SELECT mqtt_emit.watch('t');
INSERT INTO t VALUES (1), (2);
});
ok(poll_until(sub { $node->safe_psql('postgres', 'SELECT published >= 2 FROM mqtt_emit.stats') eq 't' }, 30),
	'events published, so the counters have values');

my %numeric = map { $_ => 1 } qw(smallint integer bigint real), 'double precision', 'numeric';
my %text    = map { $_ => 1 } qw(text name), 'character varying';

for my $name (sort keys %$conf)
{
	my $q = $conf->{$name};
	ok(ref $q eq 'HASH' && defined $q->{query} && ref $q->{metrics} eq 'ARRAY', "$name: query and metrics")
	  or next;
	my (%usage, $bad);
	for my $m (@{ $q->{metrics} })
	{
		my ($col, @more) = ref $m eq 'HASH' ? keys %$m : ();
		if (!defined $col || @more || ref $m->{$col} ne 'HASH'
			|| ($m->{$col}{usage} // '') !~ /^(LABEL|COUNTER|GAUGE)$/
			|| ($m->{$col}{description} // '') eq '')
		{
			$bad = 1;
			next;
		}
		$usage{$col} = $m->{$col}{usage};
	}
	ok(!$bad, "$name: every metric has a usage (LABEL, COUNTER, GAUGE) and a description");

	(my $sql = $q->{query}) =~ s/;\s*\z//;
	# the columns and their types, as the exporter's role sees them
	my ($rc, $out, $err) = $node->psql('postgres', qq{
SET ROLE exporter;
CREATE TEMP VIEW q AS $sql;
SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum)
  FROM pg_attribute WHERE attrelid = 'q'::regclass AND attnum > 0;
SELECT count(*) FROM q;});
	is($rc, 0, "$name: runs as a pg_monitor member") or diag($err);
	my ($cols, $rows) = split /\n/, $out // '';
	my %got = map { split /:/, $_, 2 } split /,/, $cols // '';
	is_deeply([ sort keys %got ], [ sort keys %usage ], "$name: returns exactly the declared columns");
	ok(($rows // 0) >= 1, "$name: returns rows ($rows)");
	my @wrong = grep {
		defined $got{$_}
		  && ($usage{$_} eq 'LABEL' ? !$text{ $got{$_} } : !$numeric{ $got{$_} })
	} sort keys %usage;
	is("@wrong", '', "$name: labels are text, counters and gauges numbers");
	my @numcols = grep { $usage{$_} ne 'LABEL' } sort keys %usage;
	if (@numcols)
	{
		my $nulls = $node->safe_psql('postgres', "SET ROLE exporter; SELECT "
			  . join(' + ', map { "count(*) FILTER (WHERE q.\"$_\" IS NULL)" } @numcols)
			  . " FROM ($sql) q");
		is($nulls, '0', "$name: no NULL values");
	}
}

done_testing();
