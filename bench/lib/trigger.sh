# bench/lib/trigger.sh: trigger overhead (doc/DESIGN.md 9, first three rows).
#
# pgbench, 2 clients (-j 2), prepared statements, a custom script of one
# single-row INSERT (autocommit), into one table "bench_t" in four variants:
#   unwatched   no trigger
#   watched     mqtt_emit.watch('bench_t'), memory delivery, broker up
#   notify      a PL/pgSQL AFTER ROW trigger doing
#               pg_notify('ch', row_to_json(NEW)::text), nobody listening
#   notify_listened  the same, with a session that LISTENs on the channel and
#               consumes every notification (bench/src/notify_sink.c), as an
#               application built on pg_notify has one
#   durable     watched, with PGOPTIONS='-c mqtt_emit.delivery=durable'
# Rounds are interleaved (each round runs the four variants, starting at a
# different one), the table is truncated and a checkpoint taken before every
# run, and the worker must be idle (queue and outbox empty) before each run.
# Done with synchronous_commit = on (the default; fsync = on) and again with
# synchronous_commit = off, where commits do not wait for the WAL flush and
# the trigger's own cost shows more. Figures: the median tps of each variant,
# and for each ratio the median over rounds of the ratio within a round.

TRIGGER_VARIANTS=(unwatched watched notify durable notify_listened)

# trigger_schema_sql: the table of the trigger variants and the function of
# the pg_notify trigger (the profile section uses them too)
trigger_schema_sql() {
	cat <<-'SQL'
		CREATE TABLE bench_t (
		    id         bigserial PRIMARY KEY,
		    account    int NOT NULL,
		    name       text NOT NULL,
		    email      text NOT NULL,
		    amount     numeric(12,2) NOT NULL,
		    status     text NOT NULL,
		    created_at timestamptz NOT NULL DEFAULT now()
		);
		CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
		    PERFORM pg_notify('ch', row_to_json(NEW)::text);
		    RETURN NULL;
		END $$;
	SQL
}

trigger_setup_sql() {
	local variant="$1"
	cat <<-'SQL'
		SET client_min_messages = warning;
		DROP TRIGGER IF EXISTS bench_notify_trg ON bench_t;
		SELECT mqtt_emit.unwatch('bench_t')
		  FROM mqtt_emit.watched_tables WHERE table_name = 'bench_t'::regclass;
	SQL
	case "$variant" in
		watched | durable | paused | durable_paused) echo "SELECT mqtt_emit.watch('bench_t');" ;;
		notify | notify_listened)
			echo "CREATE TRIGGER bench_notify_trg AFTER INSERT ON bench_t FOR EACH ROW EXECUTE FUNCTION bench_notify();" ;;
	esac
	echo "TRUNCATE bench_t;"
	echo "CHECKPOINT;"
}

# trigger_ratio SYNC A B: median over rounds of tps(A) / tps(B), and the
# range of the per-round ratios
trigger_ratio() {
	awk -F'\t' -v s="$1" -v a="$2" -v b="$3" '
		$1 == s && $3 == a && $4 != "NA" { x[$2] = $4 }
		$1 == s && $3 == b && $4 != "NA" { y[$2] = $4 }
		END {
			for (r in x) if (r in y && y[r] > 0) { v[n++] = x[r] / y[r] }
			if (!n) { print "NA"; exit }
			for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
			m = (n % 2) ? v[(n - 1) / 2] : (v[n / 2 - 1] + v[n / 2]) / 2
			printf "%.3f (rounds: %.2f-%.2f)", m, v[0], v[n - 1]
		}' "$RESULTS/trigger_runs.tsv"
}

# trigger_run VARIANT SYNC DURATION: prints "tps rows spilled": pgbench's
# tps, the rows inserted, and how many of their events went to the outbox
# because the queue was full (mqtt_emit.stats.spilled; memory mode only)
trigger_run() {
	local variant="$1" sync="$2" dur="$3" opts out tps s0 s1 rows
	trigger_setup_sql "$variant" | q a -f - >/dev/null
	wait_idle a
	s0="$(q a -c 'SELECT spilled FROM mqtt_emit.stats')"
	if [[ "$variant" == notify_listened ]]; then
		rm -f "$WORK/notify_sink.out"
		"$BENCH_BIN/notify_sink" "host=${CL_SOCK[a]} port=${CL_PORT[a]} user=postgres dbname=postgres" ch \
			>"$WORK/notify_sink.out" 2>"$WORK/notify_sink.err" &
		SINK_PID=$!
		pm_track_pid "$SINK_PID"
		pm_poll 20 grep -q ready "$WORK/notify_sink.out" || pm_die "notify_sink did not start: $(cat "$WORK/notify_sink.err")"
	fi
	opts="-c synchronous_commit=$sync"
	[[ "$variant" == durable* ]] && opts="$opts -c mqtt_emit.delivery=durable"
	# *paused (bench/lib/table.sh): the worker is stopped (SIGSTOP) while
	# pgbench runs, so the backends have both cores; it was idle just before
	# (wait_idle above), sleeping in WaitLatch with no lock held.  paused
	# runs a count of transactions, not a duration: 2 x 4,000 events fill
	# about half of the default 8 MB queue (some 600 bytes per event in
	# it), so none spills to the outbox while nothing takes them out
	local wpid="" len="-T $dur"
	if [[ "$variant" == *paused ]]; then
		wpid="$(q a -c 'SELECT worker_pid FROM mqtt_emit.stats')"
		kill -STOP "$wpid"
		[[ "$variant" == paused ]] && len="-t ${TRIGGER_PAUSED_TX:-4000}"
	fi
	# its yardstick: unwatched, the same count (a run of 0.5-4 s, whose
	# first transactions of each new backend weigh more than in 5 s)
	[[ "$variant" == unwatched_t ]] && len="-t ${TRIGGER_PAUSED_TX:-4000}"
	# shellcheck disable=SC2086
	out="$(PGOPTIONS="$opts" pgb a -n -M prepared -c 2 -j 2 $len -f "$WORK/trigger_insert.sql" 2>&1)" || {
		[[ -n "$wpid" ]] && kill -CONT "$wpid"
		echo "$out" >&2
		echo "NA 0 0"
		return
	}
	[[ -n "$wpid" ]] && kill -CONT "$wpid"
	tps="$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | head -n1)"
	if [[ "$variant" == notify_listened ]]; then
		kill -TERM "$SINK_PID" 2>/dev/null || true
		wait "$SINK_PID" 2>/dev/null || true
		note "notify_sink: $(cat "$WORK/notify_sink.out" | tail -n1)"
	fi
	s1="$(q a -c 'SELECT spilled FROM mqtt_emit.stats')"
	rows="$(q a -c 'SELECT count(*) FROM bench_t')"
	echo "${tps:-NA} $rows $((s1 - s0))"
	[[ "$variant" == durable* ]] && trigger_unstick_outbox
	return 0
}

# Outbox rows written by concurrent durable-mode commits can stay in the
# outbox until the worker restarts (their ids are assigned before commit, and
# the worker's publish cursor may already be past an id that commits late),
# and while the outbox is not empty every later event takes the outbox path.
# Wait while the outbox drains; when its row count stops falling for 5 s
# with rows left, count them and restart the cluster so that the next run
# starts clean.
trigger_unstick_outbox() {
	local n prev=-1 still=0 deadline=$((SECONDS + 300))
	while ((SECONDS < deadline)); do
		n="$(q a -c 'SELECT count(*) FROM mqtt_emit.outbox')"
		if ((n == 0)); then
			wait_idle a 60
			return 0
		fi
		if ((n == prev)); then still=$((still + 1)); else still=0; fi
		((still >= 5)) && break
		prev="$n"
		sleep 1
	done
	note "durable run left $n rows in mqtt_emit.outbox that are not being published; restarting the cluster"
	echo "$n" >>"$WORK/trigger_stuck_rows"
	restart_cluster a
	wait_idle a 120
}

bench_trigger() {
	local rounds dur_on dur_off
	rounds="${BENCH_TRIGGER_ROUNDS:-$(quick 5 1)}"
	dur_on="$(quick 8 5)"
	dur_off="$(quick 6 5)"

	# default mqtt_emit.queue_size (8MB): a much larger ring costs every
	# backend a page fault per 4kB of ring it writes for the first time
	start_cluster a \
		"fsync = on" \
		"max_wal_size = '8GB'" \
		"checkpoint_timeout = '30min'"

	trigger_schema_sql | q a -f - >/dev/null
	cat >"$WORK/trigger_insert.sql" <<-'SQL'
		\set a random(1, 1000000)
		INSERT INTO bench_t (account, name, email, amount, status) VALUES (:a, 'user ' || :a, 'user' || :a || '@example.com', :a / 100.0, 'active');
	SQL

	# one event, to show its size on the wire
	trigger_setup_sql watched | q a -f - >/dev/null
	start_sub trig "$TOPIC_PREFIX/bench_t/#" 1
	q a -c "INSERT INTO bench_t (account, name, email, amount, status) VALUES (123456, 'user 123456', 'user123456@example.com', 1234.56, 'active')" >/dev/null
	wait "$SUB_PID" || true
	fig trigger_event_payload_bytes "$(kv "$WORK/sub.trig.out" avg_payload)"

	local sync round i v tps dur rows spilled
	: >"$RESULTS/trigger_runs.tsv"
	for sync in ${BENCH_TRIGGER_SYNC:-on off}; do
		if [[ "$sync" == on ]]; then dur="$dur_on"; else dur="$dur_off"; fi
		for ((round = 1; round <= rounds; round++)); do
			for ((i = 0; i < ${#TRIGGER_VARIANTS[@]}; i++)); do
				v="${TRIGGER_VARIANTS[$(((i + round - 1) % ${#TRIGGER_VARIANTS[@]}))]}"
				read -r tps rows spilled < <(trigger_run "$v" "$sync" "$dur")
				note "synchronous_commit=$sync round $round $v: $tps tps ($spilled of $rows events spilled to the outbox)"
				printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$sync" "$round" "$v" "$tps" "$rows" "$spilled" >>"$RESULTS/trigger_runs.tsv"
			done
		done
	done
	if [[ -s "$WORK/trigger_stuck_rows" ]]; then
		fig trigger_durable_outbox_rows_left "$(awk '{ s += $1; n++ } END { printf "%d rows left unpublished by %d of the durable runs (published after a restart)", s, n }' "$WORK/trigger_stuck_rows")"
	else
		fig trigger_durable_outbox_rows_left 0
	fi
	# leave the table unwatched
	trigger_setup_sql unwatched | q a -f - >/dev/null
	wait_idle a

	# tps: median over rounds; ratios: median over rounds of the ratio within
	# each round (the variants of one round ran minutes apart at most, so a
	# slow drift of the machine's other load cancels out)
	local prefix
	for sync in ${BENCH_TRIGGER_SYNC:-on off}; do
		if [[ "$sync" == on ]]; then prefix=trigger; else prefix=trigger_synccommit_off; fi
		for v in "${TRIGGER_VARIANTS[@]}"; do
			fig "${prefix}_tps_$v" "$(awk -F'\t' -v s="$sync" -v v="$v" '$1 == s && $3 == v { print $4 }' "$RESULTS/trigger_runs.tsv" | median) (runs: $(awk -F'\t' -v s="$sync" -v v="$v" '$1 == s && $3 == v { printf "%s%.0f", sep, $4; sep = " " }' "$RESULTS/trigger_runs.tsv"))"
		done
		fig "${prefix}_watched_spilled" "$(awk -F'\t' -v s="$sync" '$1 == s && $3 == "watched" { r += $5; x += $6 } END { printf "%d of %d events (%.0f%%) went to the outbox: queue full", x, r, r ? 100 * x / r : 0 }' "$RESULTS/trigger_runs.tsv")"
		fig "${prefix}_ratio_watched_unwatched" "$(trigger_ratio "$sync" watched unwatched) (target >= 0.85)"
		fig "${prefix}_ratio_watched_notify" "$(trigger_ratio "$sync" watched notify) (target >= 1.3)"
		fig "${prefix}_ratio_watched_notify_listened" "$(trigger_ratio "$sync" watched notify_listened) (pg_notify with a consumer)"
		fig "${prefix}_ratio_durable_unwatched" "$(trigger_ratio "$sync" durable unwatched) (target >= 0.6)"
	done
	stop_cluster a
	fig trigger_setup "pgbench -n -M prepared -c 2 -j 2, ${rounds} rounds x ${#TRIGGER_VARIANTS[@]} variants, ${dur_on}s (synchronous_commit=on) / ${dur_off}s (off), fsync=on"
}
