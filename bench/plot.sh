#!/usr/bin/env bash
# bench/plot.sh DIR: PNG plots from the data bench/run.sh left in DIR.
#   latency.png     distribution of commit (node A) -> listener (node B) latency
#   throughput.png  publish throughput against batch size, extension and bare paho
set -euo pipefail
DIR="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/out}"
cd "$DIR"
TITLE_SUFFIX=""
if [[ -f figures.txt ]]; then
	TITLE_SUFFIX="$(sed -n 's/^date: //p' figures.txt | head -n1), $(sed -n 's/^machine_nproc: //p' figures.txt | head -n1) cores"
fi

if [[ -s latency_default.ms ]]; then
	files=(latency_default.ms)
	[[ -s latency_synccommit_off.ms ]] && files+=(latency_synccommit_off.ms)
	# histogram input: 0.1 ms bins, as fractions of events
	for f in "${files[@]}"; do
		awk '{ b = int($1 * 10); h[b]++; n++ } END { for (k in h) printf "%.2f %.6f\n", (k + 0.5) / 10, h[k] / n }' "$f" |
			sort -g >"${f%.ms}.hist"
		awk '{ v[NR] = $1 } END { for (i = 1; i <= NR; i++) printf "%s %.6f\n", v[i], i / NR }' "$f" >"${f%.ms}.cdf"
	done
	p50="$(sed -n 's/^latency_p50_ms: \([0-9.]*\).*/\1/p' figures.txt 2>/dev/null | head -n1)"
	p99="$(sed -n 's/^latency_p99_ms: \([0-9.]*\).*/\1/p' figures.txt 2>/dev/null | head -n1)"
	op50="$(sed -n 's/^latency_synccommit_off_p50_ms: \([0-9.]*\).*/\1/p' figures.txt 2>/dev/null | head -n1)"
	op99="$(sed -n 's/^latency_synccommit_off_p99_ms: \([0-9.]*\).*/\1/p' figures.txt 2>/dev/null | head -n1)"
	gnuplot <<-EOF
		set terminal pngcairo size 1200,500 font "DejaVu Sans,11" noenhanced
		set output "latency.png"
		set multiplot layout 1,2 title "pg_mqtt_emit: commit on node A -> listener ran on node B, 1,000 events/s ($TITLE_SUFFIX)"
		set grid
		set xlabel "latency (ms)"
		set ylabel "fraction of events per 0.1 ms"
		set xrange [0:12]
		set key top right
		set offsets 0, 0, graph 0.2, 0
		set style fill transparent solid 0.5 noborder
		set arrow 1 from 2, graph 0 to 2, graph 1 nohead dt 2 lc rgb "#2a9d2a"
		set label 1 "p50 target" at 2.1, graph 0.6 tc rgb "#2a9d2a"
		set arrow 2 from 10, graph 0 to 10, graph 1 nohead dt 2 lc rgb "#c03030"
		set label 2 "p99 target" at 8.1, graph 0.6 tc rgb "#c03030"
		plot "latency_default.hist" using 1:2 with boxes lc rgb "#3060c0" title "synchronous_commit=on (p50 ${p50:-?} ms, p99 ${p99:-?} ms)" $( [[ -s latency_synccommit_off.hist ]] && echo ', "latency_synccommit_off.hist" using 1:2 with boxes lc rgb "#e08020" title "synchronous_commit=off (p50 '"${op50:-?}"' ms, p99 '"${op99:-?}"' ms)"' )
		unset arrow 1
		unset arrow 2
		unset label 1
		unset label 2
		set offsets 0, 0, 0, 0
		set ylabel "fraction of events at or below"
		set logscale x
		set xrange [0.1:50]
		set yrange [0:1]
		set key bottom right
		plot "latency_default.cdf" using 1:2 with lines lw 2 lc rgb "#3060c0" title "synchronous_commit=on" $( [[ -s latency_synccommit_off.cdf ]] && echo ', "latency_synccommit_off.cdf" using 1:2 with lines lw 2 lc rgb "#e08020" title "synchronous_commit=off"' ), 0.5 with lines dt 3 lc rgb "gray" notitle, 0.99 with lines dt 3 lc rgb "gray" notitle
		unset multiplot
	EOF
	echo "plot: $DIR/latency.png"
fi

if [[ -s throughput.tsv ]]; then
	window="$(sed -n 's/^# .*bare_window=\([0-9]*\).*/\1/p' throughput.tsv | head -n1)"
	gnuplot <<-EOF
		set terminal pngcairo size 900,600 font "DejaVu Sans,11" noenhanced
		set output "throughput.png"
		set title "Publish throughput against batch size, ~200-byte messages, QoS 1\n($TITLE_SUFFIX)"
		set grid
		set logscale x
		set xlabel "messages per batch (one committed transaction)"
		set ylabel "messages/s until the subscriber has them all"
		set format y "%.0f"
		set yrange [0:*]
		set xrange [700:150000]
		set key below
		set datafile missing "NA"
		plot "throughput.tsv" using 1:2 with linespoints lw 2 pt 7 ps 1.3 lc rgb "#3060c0" title "pg_mqtt_emit: commit -> subscriber (median)", \
		     "" using 1:3 with linespoints lw 2 pt 5 ps 1.3 lc rgb "#c03030" title "bare paho MQTTAsync, maxInflight 65535 (median)", \
		     "" using 1:4 with linespoints lw 2 pt 9 dt 2 lc rgb "#808080" title "bare paho, at most ${window:-?} unacknowledged (median)", \
		     "throughput_runs.tsv" using (\$1*0.96):3 with points pt 6 ps 0.8 lc rgb "#3060c0" title "single runs", \
		     "" using (\$1*1.04):4 with points pt 4 ps 0.8 lc rgb "#c03030" notitle
	EOF
	echo "plot: $DIR/throughput.png"
fi
