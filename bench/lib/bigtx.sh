# bench/lib/bigtx.sh: big transactions (issue 16).
#
#   bash bench/run.sh bigtx
#
# One transaction of N single-row events (INSERT ... SELECT FROM
# generate_series into a table shaped like the trigger section's bench_t),
# N = 100k and 1M (BENCH_BIGTX_SIZES), with the default mqtt_emit.queue_size
# (8 MB, so the events do not fit in the queue), fsync on, synchronous_commit
# on.  Variants: unwatched, watched (memory mode: the events spill to the
# outbox) and durable (watched, mqtt_emit.delivery = durable).  Figures per
# variant and size: the INSERT's time, the COMMIT's time and their sum (ms,
# psql's \timing), and the backend's peak RssAnon (kB, /proc sampled every
# 50 ms while the transaction runs).  The worker is idle (queue and outbox
# empty) before every run; the table is truncated and a checkpoint taken.
# Also the time until the worker has published the whole transaction.

bigtx_run() {
	local variant="$1" n="$2" out="$WORK/bigtx.$1.$2" pidf="$WORK/bigtx.pid" peak=0 pid rss
	rm -f "$pidf"
	q a -c "TRUNCATE big_t" -c "CHECKPOINT" >/dev/null
	wait_idle a 600
	{
		echo "\\timing on"
		[[ "$variant" == durable ]] && echo "SET mqtt_emit.delivery = durable;"
		echo "\\o $pidf"
		echo "SELECT pg_backend_pid();"
		echo "\\o"
		echo "BEGIN;"
		echo "INSERT INTO big_t (account, name, email, amount, status) SELECT g % 1000000, 'user ' || g, 'user' || g || '@example.com', g / 100.0, 'active' FROM generate_series(1, $n) g;"
		echo "COMMIT;"
	} >"$out.sql"
	q a -f "$out.sql" >"$out.log" 2>&1 &
	local qpid=$!
	pm_poll 30 test -s "$pidf" || true
	read -r pid <"$pidf" || pid=""
	while kill -0 "$qpid" 2>/dev/null; do
		if [[ -n "$pid" ]]; then
			rss="$(proc_status "$pid" RssAnon 2>/dev/null || true)"
			[[ -n "$rss" ]] && ((rss > peak)) && peak=$rss
		fi
		sleep 0.05
	done
	wait "$qpid" || note "WARNING: bigtx $variant $n failed: $(cat "$out.log")"
	local t_ins t_com t0
	t_ins="$(grep '^Time:' "$out.log" | tail -n 2 | head -n 1 | awk '{ print $2 }')"
	t_com="$(grep '^Time:' "$out.log" | tail -n 1 | awk '{ print $2 }')"
	t0=$SECONDS
	[[ "$variant" != unwatched ]] && wait_idle a 1200
	printf '%s %s %s %s %s\n' "${t_ins:-NA}" "${t_com:-NA}" "$peak" "$((SECONDS - t0))" \
		"$(q a -c "SELECT published FROM mqtt_emit.stats")"
}

bench_bigtx() {
	local sizes="${BENCH_BIGTX_SIZES:-100000 1000000}" n v t_ins t_com peak drain pub
	start_cluster a \
		"fsync = on" \
		"max_wal_size = '8GB'" \
		"checkpoint_timeout = '30min'"
	q a <<-'SQL' >/dev/null
		CREATE TABLE big_t (
		    id         bigserial PRIMARY KEY,
		    account    int NOT NULL,
		    name       text NOT NULL,
		    email      text NOT NULL,
		    amount     numeric(12,2) NOT NULL,
		    status     text NOT NULL,
		    created_at timestamptz NOT NULL DEFAULT now()
		);
	SQL
	for n in $sizes; do
		for v in unwatched watched durable; do
			if [[ "$v" == unwatched ]]; then
				q a -c "SET client_min_messages = warning" -c "SELECT mqtt_emit.unwatch('big_t') FROM mqtt_emit.watched_tables WHERE table_name = 'big_t'::regclass" >/dev/null
			else
				q a -c "SELECT mqtt_emit.watch('big_t', model => 'big')" >/dev/null
			fi
			read -r t_ins t_com peak drain pub < <(bigtx_run "$v" "$n")
			note "bigtx $v $n: insert $t_ins ms, commit $t_com ms, peak RssAnon $peak kB, drained in ${drain}s (published $pub)"
			fig "bigtx_${v}_${n}_insert_ms" "$t_ins"
			fig "bigtx_${v}_${n}_commit_ms" "$t_com"
			fig "bigtx_${v}_${n}_total_ms" "$(calc "$t_ins + $t_com")"
			fig "bigtx_${v}_${n}_peak_rss_anon_kb" "$peak"
			[[ "$v" != unwatched ]] && fig "bigtx_${v}_${n}_drain_s" "$drain"
		done
		fig "bigtx_watched_${n}_total_ratio" "$(fmt 2 "$(calc "($(grep "^bigtx_watched_${n}_total_ms:" "$RESULTS/figures.txt" | tail -n1 | cut -d' ' -f2)) / ($(grep "^bigtx_unwatched_${n}_total_ms:" "$RESULTS/figures.txt" | tail -n1 | cut -d' ' -f2))")")"
		fig "bigtx_durable_${n}_total_ratio" "$(fmt 2 "$(calc "($(grep "^bigtx_durable_${n}_total_ms:" "$RESULTS/figures.txt" | tail -n1 | cut -d' ' -f2)) / ($(grep "^bigtx_unwatched_${n}_total_ms:" "$RESULTS/figures.txt" | tail -n1 | cut -d' ' -f2))")")"
	done
	stop_cluster a
}
