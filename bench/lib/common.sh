# bench/lib/common.sh: helpers of the benchmark's inner phase (runs as
# postgres). Sourced after scripts/common.sh by bench/run.sh --inner; defines
# functions only. The sections live in bench/lib/<section>.sh.

BENCH_LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH_DIR="$(cd "$BENCH_LIB/.." && pwd)"
BENCH_BIN="$BENCH_DIR/out/bin"

declare -A CL_SOCK CL_PORT CL_DATA

# fig NAME VALUE: one figure, on stdout and in figures.txt.
fig() {
	printf '%s: %s\n' "$1" "$2"
	printf '%s: %s\n' "$1" "$2" >>"$RESULTS/figures.txt"
}

# note TEXT: progress, on stderr.
note() { printf 'bench: %s\n' "$*" >&2; }

# calc EXPR: floating point arithmetic with awk; prints NA if an operand is NA.
calc() {
	case "$1" in *NA*) echo NA; return ;; esac
	awk "BEGIN { printf \"%s\", $1 }" </dev/null
}
# fmt DIGITS VALUE
fmt() {
	if [[ "$2" == NA || -z "$2" ]]; then echo NA; return; fi
	awk -v d="$1" -v v="$2" 'BEGIN { printf "%.*f", d, v }' </dev/null
}

# mean and median of the numbers on stdin (NA when none)
mean() { awk '$1 != "NA" { s += $1; n++ } END { if (n) printf "%.1f", s / n; else print "NA" }'; }
median() {
	grep -v NA | sort -g | awk '{ a[n++] = $1 } END {
		if (!n) { print "NA"; exit }
		if (n % 2) printf "%.1f", a[(n - 1) / 2]; else printf "%.1f", (a[n / 2 - 1] + a[n / 2]) / 2 }'
}

# quick FULL QUICK: the value for this mode
quick() { if [[ "${BENCH_QUICK:-0}" == 1 ]]; then echo "$2"; else echo "$1"; fi; }

# start_cluster NAME CONFLINES...: a cluster with pg_mqtt_emit preloaded and
# pointed at the broker; CONFLINES come after ours. Creates the extension.
start_cluster() {
	local name="$1"; shift
	local port
	port="$(pm_free_port)" || pm_die "no free port"
	pm_start_pg "$WORK/$name" "$port" \
		"shared_preload_libraries = 'pg_mqtt_emit'" \
		"mqtt_emit.broker_url = '$BROKER_URL'" \
		"mqtt_emit.database = 'postgres'" \
		"mqtt_emit.topic_prefix = '$TOPIC_PREFIX'" \
		"mqtt_emit.client_id = 'bench-$RUN_ID-$name'" \
		"max_connections = 50" \
		"log_min_messages = warning" \
		"$@" \
		${BENCH_PG_CONF:+"$BENCH_PG_CONF"} || pm_die "cluster $name did not start (log: $WORK/$name/postgresql.log)"
	CL_SOCK[$name]="$PG_SOCK"
	CL_PORT[$name]="$PG_PORT"
	CL_DATA[$name]="$PGDATA_DIR"
	q "$name" -c "CREATE EXTENSION pg_mqtt_emit" >/dev/null
	pm_poll 60 worker_connected "$name" || pm_die "worker of $name did not connect to the broker"
}

stop_cluster() {
	local name="$1"
	"$PG_BINDIR/pg_ctl" -D "${CL_DATA[$name]}" -m fast -w -t 60 stop >/dev/null 2>&1 ||
		pm_stop_pgdata "${CL_DATA[$name]}"
}

restart_cluster() {
	local name="$1"
	"$PG_BINDIR/pg_ctl" -D "${CL_DATA[$name]}" -l "$WORK/$name/postgresql.log" -m fast -w -t 120 restart >/dev/null ||
		pm_die "cluster $name did not restart"
	pm_poll 60 worker_connected "$name" || pm_die "worker of $name did not reconnect"
}

# q NAME PSQLARGS...: psql on cluster NAME, unaligned, quiet, stop on error.
q() {
	local name="$1"; shift
	"$PG_BINDIR/psql" -X -Atq -h "${CL_SOCK[$name]}" -p "${CL_PORT[$name]}" -U postgres -d postgres \
		-v ON_ERROR_STOP=1 "$@"
}

# pgb NAME PGBENCHARGS...: pgbench on cluster NAME.
pgb() {
	local name="$1"; shift
	"$PG_BINDIR/pgbench" -h "${CL_SOCK[$name]}" -p "${CL_PORT[$name]}" -U postgres "$@" postgres
}

worker_connected() {
	[[ "$(q "$1" -c 'SELECT connected FROM mqtt_emit.stats' 2>/dev/null)" == t ]]
}

# worker_idle NAME: the queue and the outbox are empty.
worker_idle() {
	[[ "$(q "$1" -c 'SELECT queued = 0 AND in_outbox = 0 AND queue_bytes = 0 FROM mqtt_emit.stats' 2>/dev/null)" == t ]]
}

# wait_idle NAME [TIMEOUT_S]
wait_idle() {
	pm_poll "${2:-300}" worker_idle "$1" || note "WARNING: the worker of $1 is still busy after ${2:-300}s"
}

# start_sub NAME FILTER COUNT: sub_count in the background; waits until it is
# subscribed. Its output goes to $WORK/sub.NAME.out; SUB_PID is set.
start_sub() {
	local name="$1" filter="$2" count="$3"
	rm -f "$WORK/sub.$name.ready" "$WORK/sub.$name.out"
	# SUB_FLAGS: more sub_count options (-b: count the rows of batched messages)
	# shellcheck disable=SC2086
	"$BENCH_BIN/sub_count" -u "$BROKER_URL" -t "$filter" -n "$count" -q 1 ${SUB_FLAGS:-} \
		-r "$WORK/sub.$name.ready" -T "${SUB_TIMEOUT:-300}" \
		>"$WORK/sub.$name.out" 2>"$WORK/sub.$name.err" &
	SUB_PID=$!
	pm_track_pid "$SUB_PID"
	pm_poll 20 test -f "$WORK/sub.$name.ready" || {
		cat "$WORK/sub.$name.err" >&2
		pm_die "sub_count did not subscribe"
	}
}

# kv FILE KEY: the value of KEY=value in FILE.
kv() { sed -n "s/^$2=//p" "$1" | head -n1; }

# proc_status PID FIELD: a /proc/PID/status field in kB (number only).
proc_status() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

machine_facts() {
	fig machine_nproc "$(nproc)"
	fig machine_cpu "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
	fig machine_mem_gb "$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)"
	fig postgresql_version "$("$PG_BINDIR/postgres" --version | sed 's/^postgres (PostgreSQL) //')"
	fig mosquitto_version "$(mosquitto -h 2>/dev/null | sed -n 's/^mosquitto version //p' | head -n1)"
	fig paho_version "$(ls /usr/lib/x86_64-linux-gnu/libpaho-mqtt3as.so.* 2>/dev/null | sed -n 's/.*\.so\.\([0-9]*\.[0-9]*\.[0-9]*\)$/\1/p' | head -n1)"
	fig git_commit "${BENCH_GIT:-unknown}"
	fig extension_so "$("$PG_CONFIG" --pkglibdir)/pg_mqtt_emit.so"
	fig date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	fig mode "$(quick full quick)"
	fig load_avg_1m_at_start "$(cut -d' ' -f1 /proc/loadavg)"
}

bench_inner() {
	export PATH="$PG_BINDIR:$PATH"
	unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS PGPASSWORD
	echo "$$" >"$WORK/inner.pid"
	trap 'pm_cleanup' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	mkdir -p "$WORK/tmp" "$WORK/results"
	export TMPDIR="$WORK/tmp"
	RESULTS="$WORK/results"
	: >"$RESULTS/figures.txt"
	RUN_ID="$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
	TOPIC_PREFIX="bench/$RUN_ID"

	machine_facts

	note "starting mosquitto"
	pm_start_broker "$WORK/broker"
	note "broker $BROKER_URL (pid $BROKER_PID)"

	local s
	for s in "$@"; do
		# shellcheck source=/dev/null
		source "$BENCH_LIB/$s.sh"
		note "== $s"
		local t0=$SECONDS
		"bench_$s"
		note "$s took $((SECONDS - t0))s"
	done
	fig load_avg_1m_at_end "$(cut -d' ' -f1 /proc/loadavg)"
	pm_cleanup
}
