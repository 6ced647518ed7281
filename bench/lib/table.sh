# bench/lib/table.sh: issue 16's table in one short run, each figure beside
# its target (about 6 minutes on 2 cores).
#
#   bash bench/run.sh table
#
# 1. Trigger overhead (bench/lib/trigger.sh's runs, fewer and shorter):
#    pgbench -c 2 -j 2, single-row INSERT, variants unwatched, watched,
#    notify (PL/pgSQL pg_notify trigger) and durable, rotated in each of
#    BENCH_TABLE_ROUNDS rounds (3) of BENCH_TABLE_SECONDS (5 s), with
#    synchronous_commit = on and off; ratios are medians of the ratios
#    within a round.  For the watched runs at off, also the share of events
#    that spilled to the outbox and the worker's CPU per event: utime +
#    stime of the worker process (all its threads, paho's included) from
#    before the run until the worker is idle again, divided by the rows.
#    Variants paused and durable_paused are watched and durable with the
#    worker stopped (SIGSTOP) while pgbench runs and resumed after it: what
#    the backends' own capture and commit cost when the worker's publishing
#    takes no CPU from them (on 2 cores, the worker and mosquitto share the
#    cores with the two pgbench clients and their backends).  paused runs
#    2 x 4,000 transactions (the queue must not fill: nothing takes events
#    out of it), and is compared with unwatched_t, unwatched for the same
#    count; durable_paused runs BENCH_TABLE_SECONDS like the others.
# 2. Publish rate: 100k rows committed in one transaction, COMMIT returned
#    -> a paho subscriber (QoS 1) has the 100,000th message
#    (throughput.sh's tput_ext), on a cluster with the default
#    mqtt_emit.queue_size (8 MB: every event spills to the outbox) and on
#    one with 256 MB (nothing spills); medians of BENCH_TABLE_PUBLISH_RUNS
#    (2); the worker's CPU per event over the same runs; on the 256 MB
#    cluster also with mqtt_emit.max_inflight = 200 (default 1000: paho
#    scans its in-flight list for every message id).  Then the same
#    100k rows with the table watched with batch => true (one message per
#    transaction, in parts of mqtt_emit.batch_max_bytes, default 256 kB):
#    COMMIT returned -> the subscriber of <batch prefix>/tput/# has
#    messages carrying all 100,000 rows (sub_count -b), as rows/s and
#    messages/s, medians of the same number of runs; and once more with
#    SET LOCAL mqtt_emit.emit_local = off (no copy of each event kept for
#    local listeners beside the batch: see README, "Batched messages").
# 3. Instructions per INSERT (callgrind): a backend in single-user mode
#    (postgres --single, the library preloaded, no worker) runs W and then
#    W + N single-row INSERTs, each its own transaction, into an unwatched
#    and into a watched copy of the trigger table, under valgrind
#    --tool=callgrind, collecting in the steps of exec_simple_query
#    (--toggle-collect of StartTransactionCommand, pg_parse_query,
#    pg_analyze_and_rewrite_fixedparams, pg_plan_queries, PortalStart,
#    PortalRun, PortalDrop, CommitTransactionCommand: parse, plan, execute
#    with the trigger, and the commit).  Instructions per INSERT are
#    (Ir(W + N) - Ir(W)) / N, so the first statements' catalog loading
#    drops out (also for the watched table with mqtt_emit.delivery =
#    durable); the same for the capture trigger (mqtt_emit_capture,
#    inclusive) and for pg_mqtt_emit's commit callback.  The annotated
#    profile of the watched run goes to callgrind_watched.txt.
#
# The figures go to figures.txt like every section's, and the table to
# table.txt.

TABLE_VARIANTS=(unwatched watched notify durable paused durable_paused unwatched_t)

# proc_sleeps PID: voluntary context switches of a process's main thread
# (for the worker: how often it slept, in WaitLatch or on a lock)
proc_sleeps() {
	awk '$1 == "voluntary_ctxt_switches:" { print $2 }' "/proc/$1/task/$1/status" 2>/dev/null
}

# proc_ticks PID: utime + stime of a process (all its threads), in clock ticks
proc_ticks() {
	sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $12 + $13 }'
}
TICK_US="$(awk -v t="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", 1e6 / t }')"

table_worker_pid() { q "$1" -c 'SELECT worker_pid FROM mqtt_emit.stats'; }

# table_trigger: the pgbench rounds; rows go to trigger_runs.tsv (with the
# worker's ticks and sleeps of the watched runs, and each run's start and
# end in seconds since the epoch, as columns 7 to 10)
table_trigger() {
	local rounds="$1" dur="$2" sync round i v tps rows spilled wpid w0 w1 ticks z0 z1 sleeps t_start t_end
	start_cluster a \
		"fsync = on" \
		"max_wal_size = '8GB'" \
		"checkpoint_timeout = '30min'"
	trigger_schema_sql | q a -f - >/dev/null
	cat >"$WORK/trigger_insert.sql" <<-'SQL'
		\set a random(1, 1000000)
		INSERT INTO bench_t (account, name, email, amount, status) VALUES (:a, 'user ' || :a, 'user' || :a || '@example.com', :a / 100.0, 'active');
	SQL
	: >"$RESULTS/trigger_runs.tsv"
	for sync in on off; do
		for ((round = 1; round <= rounds; round++)); do
			for ((i = 0; i < ${#TABLE_VARIANTS[@]}; i++)); do
				v="${TABLE_VARIANTS[$(((i + round - 1) % ${#TABLE_VARIANTS[@]}))]}"
				wpid="$(table_worker_pid a)"
				w0="$(proc_ticks "$wpid")"
				z0="$(proc_sleeps "$wpid")"
				t_start="$(date +%s.%N)"
				read -r tps rows spilled < <(trigger_run "$v" "$sync" "$dur")
				t_end="$(date +%s.%N)"
				ticks=NA
				sleeps=NA
				if [[ "$v" == watched ]]; then
					wait_idle a 120
					w1="$(proc_ticks "$wpid")"
					z1="$(proc_sleeps "$wpid")"
					[[ -n "$w0" && -n "$w1" ]] && ticks=$((w1 - w0))
					[[ -n "$z0" && -n "$z1" ]] && sleeps=$((z1 - z0))
				fi
				note "synchronous_commit=$sync round $round $v: $tps tps ($spilled of $rows events spilled; worker ticks $ticks, sleeps $sleeps)"
				printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$sync" "$round" "$v" "$tps" "$rows" "$spilled" "$ticks" "$sleeps" "$t_start" "$t_end" >>"$RESULTS/trigger_runs.tsv"
			done
		done
	done
	trigger_setup_sql unwatched | q a -f - >/dev/null
	wait_idle a
	stop_cluster a
}

# table_publish_runs NAME LABEL RUNS WHAT: RUNS x tput_ext 100k on cluster
# NAME; appends "LABEL msgs_per_s worker_ticks" lines to table_publish.tsv
table_publish_runs() {
	local name="$1" label="$2" runs="$3" what="$4" r e wpid w0 w1
	for ((r = 1; r <= runs; r++)); do
		wpid="$(table_worker_pid "$name")"
		w0="$(proc_ticks "$wpid")"
		e="$(tput_ext 100000)"
		wait_idle "$name" 300
		w1="$(proc_ticks "$wpid")"
		note "publish 100k, $what, run $r: $e msgs/s, worker $((w1 - w0)) ticks"
		printf '%s\t%s\t%s\n' "$label" "$e" "$((w1 - w0))" >>"$RESULTS/table_publish.tsv"
	done
}

# table_publish NAME QUEUE_SIZE RUNS: tput_ext 100k on a new cluster NAME;
# appends "NAME msgs_per_s worker_ticks" lines to table_publish.tsv
table_publish() {
	local name="$1" queue="$2" runs="$3"
	start_cluster "$name" \
		"fsync = on" \
		"mqtt_emit.queue_size = '$queue'" \
		"mqtt_emit.batch_topic_prefix = '$TOPIC_PREFIX-batch'" \
		"max_wal_size = '8GB'" \
		"checkpoint_timeout = '30min'"
	q "$name" <<-'SQL' >/dev/null
		CREATE TABLE tput_t (id bigint);
		SELECT mqtt_emit.watch('tput_t', model => 'tput');
	SQL
	wait_idle "$name"
	TPUT_CL="$name"
	tput_ext 1000 >/dev/null
	wait_idle "$name" 120
	table_publish_runs "$name" "$name" "$runs" "queue $queue"
	if [[ "$name" == p256 ]]; then
		q "$name" -c "ALTER SYSTEM SET mqtt_emit.max_inflight = 200" -c "SELECT pg_reload_conf()" >/dev/null
		tput_ext 1000 >/dev/null
		wait_idle "$name" 120
		table_publish_runs "$name" "${name}w200" "$runs" "queue $queue, max_inflight 200"
		q "$name" -c "ALTER SYSTEM RESET mqtt_emit.max_inflight" -c "SELECT pg_reload_conf()" >/dev/null
		tput_ext 1000 >/dev/null
		wait_idle "$name" 120
	fi
	table_publish_batch "$name" "$runs"
	stop_cluster "$name"
}

# table_publish_batch NAME RUNS: 100k rows in one transaction of a table
# watched with batch => true, on cluster NAME; appends "NAME rows_per_s
# msgs_per_s messages" lines to table_publish_batch.tsv
table_publish_batch() {
	local name="$1" runs="$2" r out t_commit last count msgs n=100000 mode set tag
	q "$name" <<-'SQL' >/dev/null
		SELECT mqtt_emit.watch('tput_t', model => 'tput', batch => true);
	SQL
	for mode in local nolocal; do
	set="" tag="$name"
	if [[ "$mode" == nolocal ]]; then
		set="SET LOCAL mqtt_emit.emit_local = off;" tag="${name}nl"
	fi
	for ((r = 0; r <= runs; r++)); do
		SUB_FLAGS=-b start_sub tputb "$TOPIC_PREFIX-batch/tput/#" "$n"
		out="$(q "$name" <<-SQL
			BEGIN;
			$set
			INSERT INTO tput_t SELECT g FROM generate_series($((TPUT_OFFSET + 1)), $((TPUT_OFFSET + n))) g;
			COMMIT;
			SELECT extract(epoch FROM clock_timestamp());
		SQL
		)"
		TPUT_OFFSET=$((TPUT_OFFSET + n))
		t_commit="$(tail -n1 <<<"$out")"
		wait "$SUB_PID" || true
		count="$(kv "$WORK/sub.tputb.out" count)"
		last="$(kv "$WORK/sub.tputb.out" last_ns)"
		msgs="$(kv "$WORK/sub.tputb.out" messages)"
		wait_idle "$name" 300
		# run 0 warms up
		((r == 0)) && continue
		if [[ "$count" != "$n" ]]; then
			note "batched publish 100k, $tag, run $r: only $count rows arrived"
			printf '%s\tNA\tNA\t%s\n' "$tag" "$msgs" >>"$RESULTS/table_publish_batch.tsv"
			continue
		fi
		note "batched publish 100k, $tag, run $r: $(fmt 0 "$(calc "$n / ($last / 1e9 - $t_commit)")") rows/s in $msgs messages"
		printf '%s\t%s\t%s\t%s\n' "$tag" "$(fmt 0 "$(calc "$n / ($last / 1e9 - $t_commit)")")" \
			"$(fmt 0 "$(calc "$msgs / ($last / 1e9 - $t_commit)")")" "$msgs" >>"$RESULTS/table_publish_batch.tsv"
	done
	done
}

# cg_total FILE: instructions collected; cg_fn FILE FUNCTION: inclusive
# instructions of a function (0 when absent)
cg_total() {
	callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !found { gsub(",", "", $1); print $1; found = 1 } END { if (!found) print "NA" }' || true
}
cg_fn() {
	callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
		awk -v f=":$2 " 'index($0, f) && !found { gsub(",", "", $1); print $1; found = 1 } END { if (!found) print "NA" }' || true
}

# table_callgrind: instructions per INSERT, see the file header
table_callgrind() {
	local w=30 n=300 datadir tbl count f
	if ! command -v valgrind >/dev/null 2>&1; then
		fig table_callgrind "NA (valgrind is not installed: apt-get install -y valgrind)"
		return 0
	fi
	# what exec_simple_query does for a statement (Debian's postgres binary
	# keeps only its exported symbols, so not exec_simple_query itself)
	local toggles=() fn
	for fn in StartTransactionCommand pg_parse_query pg_analyze_and_rewrite_fixedparams \
		pg_plan_queries PortalStart PortalRun PortalDrop CommitTransactionCommand; do
		toggles+=("--toggle-collect=$fn")
	done
	start_cluster c
	{
		trigger_schema_sql
		echo "CREATE TABLE bench_u (LIKE bench_t INCLUDING ALL);"
		echo "SELECT mqtt_emit.watch('bench_t');"
	} | q c -f - >/dev/null
	datadir="${CL_DATA[c]}"
	stop_cluster c
	local run extra
	for run in bench_u bench_t bench_t_durable; do
		tbl="${run%_durable}"
		extra=()
		[[ "$run" == *_durable ]] && extra=(-c mqtt_emit.delivery=durable)
		for count in "$w" "$((w + n))"; do
			f="$WORK/cg.$run.$count"
			awk -v n="$count" -v t="$tbl" 'BEGIN {
				for (i = 1; i <= n; i++)
					printf "INSERT INTO %s (account, name, email, amount, status) VALUES (%d, '\''user %d'\'', '\''user%d@example.com'\'', %d / 100.0, '\''active'\'');\n", t, 100000 + i, 100000 + i, 100000 + i, 100000 + i
			}' >"$f.sql"
			valgrind --tool=callgrind --callgrind-out-file="$f.out" "${toggles[@]}" \
				"$PG_BINDIR/postgres" --single -D "$datadir" -c synchronous_commit=on "${extra[@]}" postgres \
				<"$f.sql" >"$f.log" 2>&1 || note "callgrind run $run $count failed: $(tail -n3 "$f.log")"
		done
	done
	table_cg_figures "$w" "$n"
}

# table_cg_figures W N: CG_* and the figures from the four callgrind runs
table_cg_figures() {
	local w="$1" n="$2" u0 u1 t0 t1 c0 c1 x0 x1
	u0="$(cg_total "$WORK/cg.bench_u.$w.out")"
	u1="$(cg_total "$WORK/cg.bench_u.$((w + n)).out")"
	t0="$(cg_total "$WORK/cg.bench_t.$w.out")"
	t1="$(cg_total "$WORK/cg.bench_t.$((w + n)).out")"
	c0="$(cg_fn "$WORK/cg.bench_t.$w.out" mqtt_emit_capture)"
	c1="$(cg_fn "$WORK/cg.bench_t.$((w + n)).out" mqtt_emit_capture)"
	x0="$(cg_fn "$WORK/cg.bench_t.$w.out" capture_xact_callback)"
	x1="$(cg_fn "$WORK/cg.bench_t.$((w + n)).out" capture_xact_callback)"
	local d0 d1
	d0="$(cg_total "$WORK/cg.bench_t_durable.$w.out")"
	d1="$(cg_total "$WORK/cg.bench_t_durable.$((w + n)).out")"
	CG_DURABLE="$(calc "($d1 - $d0) / $n")"
	CG_UNWATCHED="$(calc "($u1 - $u0) / $n")"
	CG_WATCHED="$(calc "($t1 - $t0) / $n")"
	CG_TRIGGER="$(calc "($c1 - $c0) / $n")"
	CG_COMMIT="$(calc "($x1 - $x0) / $n")"
	fig table_instr_per_insert_unwatched "$(fmt 0 "$CG_UNWATCHED")"
	fig table_instr_per_insert_watched "$(fmt 0 "$CG_WATCHED")"
	fig table_instr_per_insert_durable "$(fmt 0 "$CG_DURABLE")"
	fig table_instr_capture_trigger "$(fmt 0 "$CG_TRIGGER") (mqtt_emit_capture, inclusive)"
	fig table_instr_commit_callback "$(fmt 0 "$CG_COMMIT") (capture_xact_callback, inclusive)"
	{
		echo "# callgrind, postgres --single, $n single-row INSERTs into the watched bench_t after $w (totals of the run; subtract the $w-row run's for per-row figures)"
		callgrind_annotate --inclusive=yes --threshold=99.5 "$WORK/cg.bench_t.$((w + n)).out" 2>/dev/null | sed -n 1,120p
		echo
		echo "# the capture trigger and its callees"
		callgrind_annotate --inclusive=yes --tree=calling --threshold=100 "$WORK/cg.bench_t.$((w + n)).out" 2>/dev/null |
			awk '/\* .*:(mqtt_emit_capture|append_row|me_json_value|me_json_event_tail|capture_xact_callback) \[/ { p = 1 } p && /^$/ { p = 0; print "" } p'
		echo
		echo "# self cost"
		callgrind_annotate --threshold=99 "$WORK/cg.bench_t.$((w + n)).out" 2>/dev/null | sed -n 1,80p
	} >"$RESULTS/callgrind_watched.txt" || true
	cp "$WORK/cg.bench_t.$((w + n)).out" "$RESULTS/callgrind_watched.out" 2>/dev/null || true
}

# tr_med SYNC VARIANT COLUMN: median of a column of trigger_runs.tsv
tr_med() {
	awk -F'\t' -v s="$1" -v v="$2" -v c="$3" '$1 == s && $3 == v { print $c }' "$RESULTS/trigger_runs.tsv" | median
}

bench_table() {
	# shellcheck source=trigger.sh
	source "$BENCH_LIB/trigger.sh"
	# shellcheck source=throughput.sh
	source "$BENCH_LIB/throughput.sh"
	local rounds="${BENCH_TABLE_ROUNDS:-3}" dur="${BENCH_TABLE_SECONDS:-5}" runs="${BENCH_TABLE_PUBLISH_RUNS:-2}"

	table_trigger "$rounds" "$dur"
	: >"$RESULTS/table_publish.tsv"
	: >"$RESULTS/table_publish_batch.tsv"
	table_publish p8 8MB "$runs"
	table_publish p256 256MB "$runs"
	table_callgrind
	table_report "$rounds" "$dur" "$runs"
}

# publish_rate LABEL: median msgs/s of table_publish.tsv's LABEL runs
publish_rate() {
	awk -F'\t' -v l="$1" '$1 == l { print $2 }' "$RESULTS/table_publish.tsv" | median
}

# publish_worker_us LABEL: the worker's CPU per event over those runs (us)
publish_worker_us() {
	awk -F'\t' -v l="$1" -v t="$TICK_US" '$1 == l { k += $3; n++ } END { if (n) printf "%.1f", k * t / (n * 100000); else print "NA" }' "$RESULTS/table_publish.tsv"
}

# table_report ROUNDS SECONDS RUNS: the figures and the table, from
# trigger_runs.tsv, table_publish.tsv and CG_* (table_callgrind)
table_report() {
	local rounds="$1" dur="$2" runs="$3"
	local on_wu off_wu off_wn off_du on_du spill wcpu p8 p256 wcpu8 wcpu256
	on_wu="$(trigger_ratio on watched unwatched)"
	on_du="$(trigger_ratio on durable unwatched)"
	off_wu="$(trigger_ratio off watched unwatched)"
	off_wn="$(trigger_ratio off watched notify)"
	off_du="$(trigger_ratio off durable unwatched)"
	local on_pu off_pu off_dpu on_dpu p256w wcpu256w
	on_pu="$(trigger_ratio on paused unwatched_t)"
	off_pu="$(trigger_ratio off paused unwatched_t)"
	on_dpu="$(trigger_ratio on durable_paused unwatched)"
	off_dpu="$(trigger_ratio off durable_paused unwatched)"
	p256w="$(publish_rate p256w200)"
	wcpu256w="$(publish_worker_us p256w200)"
	spill="$(awk -F'\t' '$1 == "off" && $3 == "watched" { r += $5; x += $6 } END { printf "%.1f%%", r ? 100 * x / r : 0 }' "$RESULTS/trigger_runs.tsv")"
	wcpu="$(awk -F'\t' -v t="$TICK_US" '$1 == "off" && $3 == "watched" && $7 != "NA" { k += $7; r += $5 } END { if (r) printf "%.1f", k * t / r; else print "NA" }' "$RESULTS/trigger_runs.tsv")"
	local wake_on wake_off
	wake_on="$(awk -F'\t' '$1 == "on" && $3 == "watched" && $8 != "" && $8 != "NA" { k += $8; r += $5 } END { if (r) printf "%.2f", k / r; else print "NA" }' "$RESULTS/trigger_runs.tsv")"
	wake_off="$(awk -F'\t' '$1 == "off" && $3 == "watched" && $8 != "" && $8 != "NA" { k += $8; r += $5 } END { if (r) printf "%.2f", k / r; else print "NA" }' "$RESULTS/trigger_runs.tsv")"
	p8="$(publish_rate p8)"
	p256="$(publish_rate p256)"
	wcpu8="$(publish_worker_us p8)"
	wcpu256="$(publish_worker_us p256)"
	local b8 b256 bm8 bm256 bn8 bn256
	b8="$(awk -F'\t' '$1 == "p8" { print $2 }' "$RESULTS/table_publish_batch.tsv" | median)"
	b256="$(awk -F'\t' '$1 == "p256" { print $2 }' "$RESULTS/table_publish_batch.tsv" | median)"
	bm8="$(awk -F'\t' '$1 == "p8" { print $3 }' "$RESULTS/table_publish_batch.tsv" | median)"
	bm256="$(awk -F'\t' '$1 == "p256" { print $3 }' "$RESULTS/table_publish_batch.tsv" | median)"
	bn8="$(awk -F'\t' '$1 == "p8" { print $4 }' "$RESULTS/table_publish_batch.tsv" | median)"
	bn256="$(awk -F'\t' '$1 == "p256" { print $4 }' "$RESULTS/table_publish_batch.tsv" | median)"
	local bl8 bl256
	bl8="$(awk -F'\t' '$1 == "p8nl" { print $2 }' "$RESULTS/table_publish_batch.tsv" | median)"
	bl256="$(awk -F'\t' '$1 == "p256nl" { print $2 }' "$RESULTS/table_publish_batch.tsv" | median)"

	fig table_ratio_watched_unwatched_on "$on_wu"
	fig table_ratio_watched_unwatched_off "$off_wu"
	fig table_ratio_watched_notify_off "$off_wn"
	fig table_ratio_durable_unwatched_off "$off_du"
	fig table_ratio_durable_unwatched_on "$on_du"
	fig table_ratio_watched_worker_paused_unwatched "on: $on_pu, off: $off_pu"
	fig table_ratio_durable_worker_paused_unwatched "on: $on_dpu, off: $off_dpu"
	fig table_publish_100k_queue256mb_max_inflight200 "$(fmt 0 "$p256w") msgs/s, worker $wcpu256w us per event"
	fig table_watched_off_spilled "$spill"
	fig table_worker_us_per_event_pgbench_off "$wcpu"
	fig table_worker_sleeps_per_event "on: $wake_on, off: $wake_off"
	fig table_publish_100k_queue8mb_msgs_per_s "$(fmt 0 "$p8")"
	fig table_publish_100k_queue256mb_msgs_per_s "$(fmt 0 "$p256")"
	fig table_worker_us_per_event_publish_100k "8 MB: $wcpu8, 256 MB: $wcpu256"
	fig table_publish_batch_100k_queue8mb_rows_per_s "$(fmt 0 "$b8")"
	fig table_publish_batch_100k_queue256mb_rows_per_s "$(fmt 0 "$b256")"
	fig table_publish_batch_100k_emit_local_off_rows_per_s "8 MB: $(fmt 0 "$bl8"), 256 MB: $(fmt 0 "$bl256")"
	fig table_publish_batch_100k_msgs_per_s "8 MB: $(fmt 0 "$bm8") ($bn8 messages), 256 MB: $(fmt 0 "$bm256") ($bn256 messages)"

	tps() { printf '%s / %s / %s / %s / %s / %s tps' "$(tr_med "$1" unwatched 4)" "$(tr_med "$1" watched 4)" "$(tr_med "$1" notify 4)" "$(tr_med "$1" durable 4)" "$(tr_med "$1" paused 4)" "$(tr_med "$1" durable_paused 4)"; }
	{
		printf '%-62s | %-40s | %s\n' "figure (issue 16)" "measured (median, rounds' range)" "target"
		printf '%-62s | %-40s | %s\n' "watched / unwatched, synchronous_commit = on" "$on_wu" ">= 0.9"
		printf '%-62s | %-40s | %s\n' "watched / unwatched, synchronous_commit = off" "$off_wu" ">= 0.85"
		printf '%-62s | %-40s | %s\n' "watched / pg_notify trigger, off" "$off_wn" "> 1 (ahead of pg_notify)"
		printf '%-62s | %-40s | %s\n' "events spilled to the outbox, watched, off" "$spill" "(0)"
		printf '%-62s | %-40s | %s\n' "durable / unwatched, off" "$off_du" ">= 0.7"
		printf '%-62s | %-40s | %s\n' "durable / unwatched, on" "$on_du" "(>= 0.6, DESIGN 9)"
		printf '%-62s | %-40s | %s\n' "  worker stopped: watched / unwatched, 2 x 4,000 tx, on" "$on_pu" ""
		printf '%-62s | %-40s | %s\n' "  worker stopped: watched / unwatched, 2 x 4,000 tx, off" "$off_pu" ""
		printf '%-62s | %-40s | %s\n' "  worker stopped: durable / unwatched, on" "$on_dpu" ""
		printf '%-62s | %-40s | %s\n' "  worker stopped: durable / unwatched, off" "$off_dpu" ""
		printf '%-62s | %-40s | %s\n' "publish 100k rows in one transaction, 8 MB queue (msg/s)" "$(fmt 0 "$p8")" ">= 50,000"
		printf '%-62s | %-40s | %s\n' "same, 256 MB queue (msg/s)" "$(fmt 0 "$p256")" ">= 50,000"
		printf '%-62s | %-40s | %s\n' "  same, max_inflight = 200 (msg/s; worker us per event)" "$(fmt 0 "$p256w"); $wcpu256w" ""
		printf '%-62s | %-40s | %s\n' "same, batch => true, 8 MB / 256 MB queue (rows/s)" "$(fmt 0 "$b8") / $(fmt 0 "$b256")" "(opt-in)"
		printf '%-62s | %-40s | %s\n' "  messages/s (messages), 8 MB / 256 MB" "$(fmt 0 "$bm8") ($bn8) / $(fmt 0 "$bm256") ($bn256)" ""
		printf '%-62s | %-40s | %s\n' "  same with emit_local = off, 8 MB / 256 MB (rows/s)" "$(fmt 0 "$bl8") / $(fmt 0 "$bl256")" ""
		printf '%-62s | %-40s | %s\n' "worker CPU per event, pgbench watched, off (us)" "$wcpu" "<= 10"
		printf '%-62s | %-40s | %s\n' "worker CPU per event, publish 100k, 8 MB / 256 MB (us)" "$wcpu8 / $wcpu256" "<= 10"
		printf '%-62s | %-40s | %s\n' "worker sleeps (voluntary switches) per event, watched, on / off" "$wake_on / $wake_off" ""
		printf '%-62s | %-40s | %s\n' "instructions per INSERT, unwatched (callgrind)" "$(fmt 0 "${CG_UNWATCHED:-NA}")" ""
		printf '%-62s | %-40s | %s\n' "instructions per INSERT, watched (callgrind)" "$(fmt 0 "${CG_WATCHED:-NA}")" ""
		printf '%-62s | %-40s | %s\n' "instructions per INSERT, durable (callgrind)" "$(fmt 0 "${CG_DURABLE:-NA}")" ""
		printf '%-62s | %-40s | %s\n' "  of which the capture trigger / the commit callback" "$(fmt 0 "${CG_TRIGGER:-NA}") / $(fmt 0 "${CG_COMMIT:-NA}")" ""
		printf '%-62s | %-40s | %s\n' "tps on: unwatch./watched/notify/durable/paused/dur. paused" "$(tps on)" ""
		printf '%-62s | %-40s | %s\n' "tps off: unwatch./watched/notify/durable/paused/dur. paused" "$(tps off)" ""
		printf '(pgbench -c 2 -j 2, %s rounds x %s s per variant and setting; publish: medians of %s runs)\n' "$rounds" "$dur" "$runs"
	} | tee "$RESULTS/table.txt"
}
