#!/usr/bin/perl
#
# tally.pl: count test results in the output of pg_regress, pg_prove or prove.
#
#   perl test/lib/tally.pl regress|tap < OUTPUT
#
# Prints three lines:  passed N / failed N / crashed 0|1, then one
# "failed_file NAME" line per failed file or test. "crashed 1" means the output
# has no recognisable result at all (the run died before reporting).
#
# regress: one case per pg_regress test line. PG 15 prints
#   "test foo   ... ok   12 ms", "     foo   ... FAILED   3 ms" (parallel
#   group), "test foo   ... failed (ignored)"; PG 16+ prints TAP
#   ("ok 1  - foo  12 ms", "not ok 2 - foo"). Ignored failures count as neither.
# tap: one case per TAP assertion, from prove's closing lines:
#   "Files=F, Tests=T, ..." gives the total; each file in the
#   "Test Summary Report" with "Tests: n Failed: f" adds f failures; a listed
#   file with f = 0 but a parse error (bad or missing plan) or a non-zero exit
#   counts as one more failure. passed = T - (sum of f).
use strict;
use warnings;

my $mode = shift // die "usage: tally.pl regress|tap < output\n";
my ($passed, $failed, $crashed) = (0, 0, 0);
my @failed_files;

if ($mode eq 'regress')
{
	my $seen = 0;
	while (my $line = <STDIN>)
	{
		if ($line =~ /^\s*(?:test\s+)?(\S+)\s+\.\.\.\s+(ok|FAILED|failed \(ignored\)|failed)/)
		{
			my ($name, $res) = ($1, $2);
			$seen++;
			if    ($res eq 'ok')               { $passed++; }
			elsif ($res =~ /ignored/)          { }
			else                               { $failed++; push @failed_files, $name; }
		}
		elsif ($line =~ /^(not )?ok\s+\d+\s+[-+]?\s*(\S+)/)
		{
			$seen++;
			if ($1) { $failed++; push @failed_files, $2; }
			else    { $passed++; }
		}
	}
	$crashed = 1 unless $seen;
}
elsif ($mode eq 'tap')
{
	my ($total, $sum_failed, $extra) = (undef, 0, 0);
	my $current;    # file of the summary-report entry being read
	my %entry;
	while (my $line = <STDIN>)
	{
		if ($line =~ /^Files=(\d+), Tests=(\d+)/)
		{
			$total = $2;
		}
		elsif ($line =~ /^(\S.*?)\s+\(Wstat: (\d+).*?Tests: (\d+) Failed: (\d+)\)\s*$/)
		{
			$current = $1;
			$entry{$current} = { wstat => $2, failed => $4, bad => 0 };
		}
		elsif (defined $current && $line =~ /^\s+(Parse errors|Non-zero exit status|Non-zero wait status)/)
		{
			$entry{$current}{bad} = 1;
		}
		elsif ($line !~ /^\s/)
		{
			$current = undef;
		}
	}
	for my $file (sort keys %entry)
	{
		my $e = $entry{$file};
		if ($e->{failed} > 0)
		{
			$sum_failed += $e->{failed};
			push @failed_files, $file;
		}
		elsif ($e->{bad} || $e->{wstat} != 0)
		{
			$extra++;
			push @failed_files, $file;
		}
	}
	if (defined $total)
	{
		$passed = $total - $sum_failed;
		$failed = $sum_failed + $extra;
	}
	else
	{
		$crashed = 1;
	}
}
else
{
	die "tally.pl: unknown mode '$mode'\n";
}

print "passed $passed\nfailed $failed\ncrashed $crashed\n";
print "failed_file $_\n" for @failed_files;
