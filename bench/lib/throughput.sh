# bench/lib/throughput.sh: publish throughput (doc/DESIGN.md 9, fourth row).
#
# The extension: N rows committed into a watched table tput_t(id bigint)
# (about 200-byte events), in one transaction; the clock starts when the
# COMMIT has returned (clock_timestamp() of the next statement) and stops
# when sub_count (a paho subscriber, QoS 1) has received the N-th message.
# Also N = 100k in transactions of 1k rows run back to back, the clock
# starting at the first commit, and N = 100k in one transaction in durable
# delivery mode (outbox written at commit, published from the outbox).
#
# The reference: bench/src/bare_publisher.c, paho MQTTAsync, QoS 1,
# maxInflight 65535, publishing N messages of the extension's average
# payload size as fast as paho takes them, to the same broker, with the
# same subscriber; the clock runs from its first send to the N-th message
# at the subscriber. The same program is also run with an in-flight window
# of mqtt_emit.max_inflight (what the extension's worker keeps), and its
# ratio printed too.
#
# Runs for N = 1k, 10k, 100k are interleaved (extension, bare, bare with
# window), repeated (median) and written to throughput.tsv for the plot.

TPUT_OFFSET=0
TPUT_CL="${TPUT_CL:-t}"		# the cluster tput_ext runs on (bench/lib/table.sh: another)

# tput_ext N [DELIVERY]: msgs/s, commit -> subscriber has N
tput_ext() {
	local n="$1" delivery="${2:-memory}" out t_commit last count
	start_sub tput "$TOPIC_PREFIX/tput/#" "$n"
	out="$(q "$TPUT_CL" <<-SQL
		BEGIN;
		SET LOCAL mqtt_emit.delivery = $delivery;
		INSERT INTO tput_t SELECT g FROM generate_series($((TPUT_OFFSET + 1)), $((TPUT_OFFSET + n))) g;
		COMMIT;
		SELECT extract(epoch FROM clock_timestamp());
	SQL
	)"
	TPUT_OFFSET=$((TPUT_OFFSET + n))
	t_commit="$(tail -n1 <<<"$out")"
	wait "$SUB_PID" || true
	count="$(kv "$WORK/sub.tput.out" count)"
	last="$(kv "$WORK/sub.tput.out" last_ns)"
	TPUT_LAST_PAYLOAD="$(kv "$WORK/sub.tput.out" avg_payload)"
	if [[ "$count" != "$n" ]]; then
		note "extension run of $n: only $count messages arrived"
		echo NA
		return
	fi
	fmt 0 "$(calc "$n / ($last / 1e9 - $t_commit)")"
}

# tput_ext_batched N BATCH: msgs/s, first commit -> subscriber has N
tput_ext_batched() {
	local n="$1" batch="$2" b out t_first t_end last count
	start_sub tput "$TOPIC_PREFIX/tput/#" "$n"
	{
		for ((b = 0; b < n / batch; b++)); do
			echo "BEGIN;"
			echo "INSERT INTO tput_t SELECT g FROM generate_series($((TPUT_OFFSET + b * batch + 1)), $((TPUT_OFFSET + (b + 1) * batch))) g;"
			echo "COMMIT;"
			if ((b == 0)); then echo "SELECT extract(epoch FROM clock_timestamp());"; fi
		done
		echo "SELECT extract(epoch FROM clock_timestamp());"
	} >"$WORK/tput_batched.sql"
	out="$(q t -f "$WORK/tput_batched.sql")"
	TPUT_OFFSET=$((TPUT_OFFSET + n))
	t_first="$(head -n1 <<<"$out")"
	t_end="$(tail -n1 <<<"$out")"
	wait "$SUB_PID" || true
	count="$(kv "$WORK/sub.tput.out" count)"
	last="$(kv "$WORK/sub.tput.out" last_ns)"
	fmt 2 "$(calc "$t_end - $t_first")" >"$WORK/tput_batched_insert_s"
	if [[ "$count" != "$n" ]]; then
		note "batched extension run of $n: only $count messages arrived"
		echo NA
		return
	fi
	fmt 0 "$(calc "$n / ($last / 1e9 - $t_first)")"
}

# tput_bare N SIZE [WINDOW]: msgs/s, first send -> subscriber has N
tput_bare() {
	local n="$1" size="$2" window="${3:-0}" count last start
	start_sub bare "$TOPIC_PREFIX/bare/#" "$n"
	"$BENCH_BIN/bare_publisher" -u "$BROKER_URL" -t "$TOPIC_PREFIX/bare/x" -n "$n" -s "$size" \
		-q 1 -w "$window" -T 300 >"$WORK/bare.out" 2>"$WORK/bare.err" || {
		cat "$WORK/bare.err" >&2
	}
	wait "$SUB_PID" || true
	count="$(kv "$WORK/sub.bare.out" count)"
	last="$(kv "$WORK/sub.bare.out" last_ns)"
	start="$(kv "$WORK/bare.out" start_ns)"
	if [[ "$count" != "$n" ]]; then
		note "bare run of $n: only $count messages arrived"
		echo NA
		return
	fi
	fmt 0 "$(calc "$n / (($last - $start) / 1e9)")"
}

bench_throughput() {
	local sizes reps window
	if [[ "$(quick full quick)" == quick ]]; then
		sizes=(1000 10000 30000)
		reps=(3 1 1)
	else
		sizes=(1000 10000 100000)
		reps=(5 3 2)
	fi
	# a queue large enough for the largest batch (else it spills to the outbox)
	start_cluster t \
		"fsync = on" \
		"mqtt_emit.queue_size = '256MB'" \
		"max_wal_size = '8GB'" \
		"checkpoint_timeout = '30min'"
	window="$(q t -c 'SHOW mqtt_emit.max_inflight')"

	q t <<-'SQL' >/dev/null
		CREATE TABLE tput_t (id bigint);
		SELECT mqtt_emit.watch('tput_t', model => 'tput');
	SQL
	wait_idle t

	# warm up, and learn the payload size
	tput_ext 1000 >/dev/null
	local size
	size="$(fmt 0 "$TPUT_LAST_PAYLOAD")"
	fig tput_payload_bytes "$size"
	tput_bare 1000 "$size" >/dev/null

	: >"$RESULTS/throughput_runs.tsv"
	local i r n e b bw
	for i in "${!sizes[@]}"; do
		n="${sizes[$i]}"
		for ((r = 1; r <= reps[i]; r++)); do
			e="$(tput_ext "$n")"
			wait_idle t 120
			b="$(tput_bare "$n" "$size")"
			bw="$(tput_bare "$n" "$size" "$window")"
			note "N=$n run $r: extension $e, bare $b, bare (window $window) $bw msgs/s"
			printf '%s\t%s\t%s\t%s\t%s\n' "$n" "$r" "$e" "$b" "$bw" >>"$RESULTS/throughput_runs.tsv"
		done
	done

	# batch size table for the plot: N, extension, bare, bare with window (medians)
	printf '# N\textension\tbare\tbare_window=%s\n' "$window" >"$RESULTS/throughput.tsv"
	for n in "${sizes[@]}"; do
		e="$(awk -F'\t' -v n="$n" '$1 == n { print $3 }' "$RESULTS/throughput_runs.tsv" | median)"
		b="$(awk -F'\t' -v n="$n" '$1 == n { print $4 }' "$RESULTS/throughput_runs.tsv" | median)"
		bw="$(awk -F'\t' -v n="$n" '$1 == n { print $5 }' "$RESULTS/throughput_runs.tsv" | median)"
		printf '%s\t%s\t%s\t%s\n' "$n" "$e" "$b" "$bw" >>"$RESULTS/throughput.tsv"
		fig "tput_ext_${n}_msgs_per_s" "$(fmt 0 "$e")"
		fig "tput_bare_${n}_msgs_per_s" "$(fmt 0 "$b")"
		fig "tput_bare_window${window}_${n}_msgs_per_s" "$(fmt 0 "$bw")"
	done
	n="${sizes[-1]}"
	e="$(awk -F'\t' -v n="$n" '$1 == n { print $2 }' "$RESULTS/throughput.tsv")"
	b="$(awk -F'\t' -v n="$n" '$1 == n { print $3 }' "$RESULTS/throughput.tsv")"
	bw="$(awk -F'\t' -v n="$n" '$1 == n { print $4 }' "$RESULTS/throughput.tsv")"
	fig "tput_ratio_ext_bare_$n" "$(fmt 3 "$(calc "$e / $b")") (target >= 0.8)"
	fig "tput_ratio_ext_bare_window${window}_$n" "$(fmt 3 "$(calc "$e / $bw")")"

	# the same N in durable mode: written to the outbox at commit, published
	# by the worker from there
	local durable
	durable="$(tput_ext "$n" durable)"
	wait_idle t 300
	fig "tput_ext_durable_${n}_msgs_per_s" "$durable"
	fig "tput_ratio_ext_durable_bare_$n" "$(fmt 3 "$(calc "$durable / $b")")"

	# the same N in transactions of 1k rows
	local batched
	batched="$(tput_ext_batched "$n" 1000)"
	fig "tput_ext_${n}_in_1k_tx_msgs_per_s" "$batched"
	fig "tput_ext_${n}_in_1k_tx_insert_s" "$(cat "$WORK/tput_batched_insert_s")"
	fig "tput_ratio_ext_${n}_in_1k_tx_bare" "$(fmt 3 "$(calc "$batched / $b")")"
	fig tput_setup "rows of tput_t(id bigint), one transaction per batch unless noted; sub_count QoS 1; bare_publisher QoS 1 maxInflight 65535; medians of ${reps[*]} runs for N = ${sizes[*]}"
	stop_cluster t
}
