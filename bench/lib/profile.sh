# bench/lib/profile.sh: where the time goes (bench/README.md, "Profiles").
#
# 1. CPU per inserted row by process kind (bench/lib/cpushare.py: utime +
#    stime from /proc of the backends, the pgbench client, the pg_mqtt_emit
#    worker with its paho threads, mosquitto, the WAL writer...) while
#    pgbench runs each trigger variant with synchronous_commit = off.
# 2. perf record (user space: this runs as postgres) of one pgbench backend
#    inserting into the watched table, and of the worker while it publishes
#    a 100k-row transaction. Reports: profile_*.txt next to the figures.

prof_variant() {
	local variant="$1" dur="$2" opts="-c synchronous_commit=off"
	trigger_setup_sql "$variant" | q p -f - >/dev/null
	wait_idle p 60
	[[ "$variant" == durable ]] && opts="$opts -c mqtt_emit.delivery=durable"
	PGOPTIONS="$opts" pgb p -n -M prepared -c 2 -j 2 -T "$dur" -f "$WORK/trigger_insert.sql" >"$WORK/prof_pgbench.out" 2>&1 &
	local pgb_pid=$!
	sleep 2
	python3 "$BENCH_LIB/cpushare.py" --postmaster "$(head -n1 "${CL_DATA[p]}/postmaster.pid")" \
		--broker "$BROKER_PID" --seconds "$((dur - 4))" \
		--count-cmd "$PG_BINDIR/psql -X -Atq -h ${CL_SOCK[p]} -p ${CL_PORT[p]} -U postgres -d postgres -c 'SELECT count(*) FROM bench_t'" \
		>"$RESULTS/profile_cpu_$variant.txt"
	wait "$pgb_pid" || true
	fig "profile_cpu_us_per_row_$variant" "$(grep -v '^rows' "$RESULTS/profile_cpu_$variant.txt" | tr '\n' ' ' | sed 's/ $//')"
	[[ "$variant" == durable ]] && { pm_poll 30 worker_idle p || restart_cluster p; }
	return 0
}

# prof_perf PID SECONDS NAME: perf record of PID, then two reports
prof_perf() {
	local pid="$1" secs="$2" name="$3"
	perf record -g -o "$WORK/perf.$name.data" -p "$pid" -- sleep "$secs" >/dev/null 2>"$WORK/perf.$name.err" || {
		note "perf record failed: $(tail -n2 "$WORK/perf.$name.err")"
		return 0
	}
	{
		echo "# perf record -g -p <$name pid> (user space), by thread and library"
		perf report -i "$WORK/perf.$name.data" --no-children --stdio --sort comm,dso -g none 2>/dev/null | grep '%' | head -n 20
		echo
		echo "# by symbol (self)"
		perf report -i "$WORK/perf.$name.data" --no-children --stdio --sort comm,dso,sym -g none 2>/dev/null | grep '%' | head -n 40
		echo
		echo "# by symbol, including callees (children)"
		perf report -i "$WORK/perf.$name.data" --children --stdio --sort sym -g none 2>/dev/null | grep '%' | head -n 40
	} >"$RESULTS/profile_$name.txt" || true
	rm -f "$WORK/perf.$name.data"
}

bench_profile() {
	# shellcheck source=trigger.sh
	source "$BENCH_LIB/trigger.sh"
	start_cluster p "fsync = on" "mqtt_emit.queue_size = '256MB'"
	{
		trigger_schema_sql
		echo "CREATE TABLE tput_t (id bigint);"
		echo "SELECT mqtt_emit.watch('tput_t', model => 'tput');"
	} | q p -f - >/dev/null
	cat >"$WORK/trigger_insert.sql" <<-'SQL'
		\set a random(1, 1000000)
		INSERT INTO bench_t (account, name, email, amount, status) VALUES (:a, 'user ' || :a, 'user' || :a || '@example.com', :a / 100.0, 'active');
	SQL
	local v
	# notify_listened needs its consumer, which only the trigger section starts
	for v in unwatched watched notify durable; do
		prof_variant "$v" "$(quick 12 8)"
	done

	if ! command -v perf >/dev/null 2>&1; then
		note "perf not installed: no perf profiles"
		stop_cluster p
		return 0
	fi
	# a backend inserting into the watched table
	trigger_setup_sql watched | q p -f - >/dev/null
	PGOPTIONS="-c synchronous_commit=off" pgb p -n -M prepared -c 2 -j 2 -T "$(quick 12 8)" -f "$WORK/trigger_insert.sql" >/dev/null 2>&1 &
	local pgb_pid=$!
	sleep 2
	local bpid
	bpid="$(q p -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench' LIMIT 1")"
	[[ -n "$bpid" ]] && prof_perf "$bpid" "$(quick 8 4)" backend
	wait "$pgb_pid" || true
	wait_idle p 60

	# the worker publishing a 100k-row transaction
	local wpid n
	n="$(quick 100000 30000)"
	wpid="$(q p -c 'SELECT worker_pid FROM mqtt_emit.stats')"
	perf record -g -o "$WORK/perf.worker.data" -p "$wpid" >/dev/null 2>"$WORK/perf.worker.err" &
	local perf_pid=$!
	sleep 0.5
	start_sub prof "$TOPIC_PREFIX/tput/#" "$n"
	q p -c "INSERT INTO tput_t SELECT g FROM generate_series(1, $n) g" >/dev/null
	wait "$SUB_PID" || true
	kill -INT "$perf_pid" 2>/dev/null || true
	wait "$perf_pid" || true
	{
		echo "# perf record -g -p <worker pid> (user space) while it published $n events"
		perf report -i "$WORK/perf.worker.data" --no-children --stdio --sort comm,dso -g none 2>/dev/null | grep '%' | head -n 20
		echo
		echo "# by symbol (self)"
		perf report -i "$WORK/perf.worker.data" --no-children --stdio --sort comm,dso,sym -g none 2>/dev/null | grep '%' | head -n 40
	} >"$RESULTS/profile_worker.txt" || true
	rm -f "$WORK/perf.worker.data"
	fig profile_files "profile_cpu_<variant>.txt, profile_backend.txt, profile_worker.txt"
	stop_cluster p
}
