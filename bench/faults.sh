#!/usr/bin/env bash
# bench/faults.sh: writers under faults (issue 11), against real servers.
#
#   bash bench/faults.sh            # frozen and slow_listener, about 4 minutes
#   bash bench/faults.sh frozen     # or: slow_listener, crash_memory, crash_durable
#
# frozen: pgbench (2 clients, single-row INSERT into a watched table) for
#   FAULTS_SECONDS (default 100) s; mosquitto is frozen with SIGSTOP from 10 s
#   for 75 s, then SIGCONT (the default keepalive of 30 s: the worker notices
#   within 45 s).
# slow_listener: 400 commits/s (pgbench -R 400) with a local listener that
#   takes 50 ms per event, broker up, for 60 s; the pg_mqtt_emit processes'
#   longest open transaction is sampled every second.
#
# Prints "name: value" lines: tps, commit latency max and p99 (ms, from
# pgbench's per-transaction log), rows committed, events that reached a
# subscriber (distinct row ids; a persistent session, so what the broker
# holds while frozen is delivered later), events lost. Uses the installed
# extension (as root it builds and installs the working tree first, like
# test/run.sh). Timing belongs here, not in the tests.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=../scripts/common.sh
source "$ROOT/scripts/common.sh"

if [[ "${1:-}" != "--inner" ]]; then
	SCENARIOS=("${@:-frozen slow_listener}")
	if [[ "$(id -u)" -eq 0 ]]; then
		WORK="$(mktemp -d /tmp/pg_mqtt_emit_faults.XXXXXX)"
		pm_copy_tree "$ROOT" "$WORK/src"
		PG_CFLAGS="" pm_build_install "$WORK/src" >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; exit 1; }
		chown -R "$PG_USER": "$WORK"
		runuser -u "$PG_USER" -- env PATH="$PATH" PG_CONFIG="$PG_CONFIG" \
			bash "$WORK/src/bench/faults.sh" --inner "$WORK" ${SCENARIOS[*]}
		rc=$?
		rm -rf "$WORK"
		exit $rc
	fi
	WORK="$(mktemp -d /tmp/pg_mqtt_emit_faults.XXXXXX)"
	exec bash "$0" --inner "$WORK" ${SCENARIOS[*]}
fi
shift
WORK="$1"; shift
export PATH="$PG_BINDIR:$PATH"
trap pm_cleanup EXIT

# start_servers DIR NAME CONF...: a broker, a server with table ev watched
# (postgresql.conf lines CONF added), connected, and a persistent subscriber
# to everything writing DIR/sub.out.
start_servers() {
	local dir="$1" name="$2"; shift 2
	mkdir -p "$dir"
	pm_start_broker "$dir/broker"
	pm_start_pg "$dir/pg" "$(pm_free_port)" \
		"shared_preload_libraries = 'pg_mqtt_emit'" \
		"mqtt_emit.broker_url = '$BROKER_URL'" \
		"mqtt_emit.topic_prefix = 'faults'" \
		"mqtt_emit.client_id = 'faults-$name-$$'" "$@"
	pm_psql -q -c "CREATE EXTENSION pg_mqtt_emit" \
		-c "CREATE TABLE ev (id bigserial PRIMARY KEY, v text NOT NULL)" \
		-c "SELECT mqtt_emit.watch('ev')" >/dev/null
	pm_poll 30 bash -c "[[ \$(\"$PG_BINDIR/psql\" -X -At -h '$PG_SOCK' -p '$PG_PORT' -U postgres -d postgres -c 'SELECT connected FROM mqtt_emit.stats') == t ]]" \
		|| pm_die "the worker did not connect"
	mosquitto_sub -h 127.0.0.1 -p "$BROKER_PORT" -q 1 -c -i "faults-sub-$name-$$" -t 'faults/#' \
		>"$dir/sub.out" 2>"$dir/sub.err" &
	pm_track_pid "$!"
	pm_poll 30 bash -c "mosquitto_pub -h 127.0.0.1 -p $BROKER_PORT -q 1 -t faults/ev/probe -m '{\"result\":{\"id\":0}}' && grep -q '\"id\":0' '$dir/sub.out'" \
		|| pm_die "the subscriber did not come up"
}

run_scenario() {
	local name="$1"
	local dir="$WORK/$name" seconds
	start_servers "$dir" "$name"
	if [[ "$name" == slow_listener ]]; then
		pm_psql -q -c "CREATE FUNCTION slow(e mqtt_emit.event) RETURNS void LANGUAGE sql AS \$\$ SELECT pg_sleep(0.05) \$\$" \
			-c "SELECT mqtt_emit.listen('ev', 'slow(mqtt_emit.event)')" >/dev/null
	fi

	echo "INSERT INTO ev (v) VALUES ('x');" >"$dir/ins.sql"
	seconds=$([[ "$name" == frozen ]] && echo "${FAULTS_SECONDS:-100}" || echo 60)
	local rate=()
	[[ "$name" == slow_listener ]] && rate=(-R 400)
	(cd "$dir" && pgbench -n -h "$PG_SOCK" -p "$PG_PORT" -U postgres -c 2 -j 2 -T "$seconds" "${rate[@]}" \
		-f ins.sql -l --log-prefix=pgb postgres >"$dir/pgbench.out" 2>&1) &
	local pgb=$!
	local maxxact=0 t
	for ((t = 0; t < seconds; t++)); do
		if [[ "$name" == frozen && $t -eq 10 ]]; then kill -STOP "$BROKER_PID"; fi
		if [[ "$name" == frozen && $t -eq 85 ]]; then kill -CONT "$BROKER_PID"; fi
		local x
		x="$(pm_psql -At -c "SELECT coalesce(round(max(extract(epoch FROM now() - xact_start))::numeric, 1), 0) FROM pg_stat_activity WHERE backend_type LIKE 'pg_mqtt_emit%'" 2>/dev/null || echo 0)"
		maxxact="$(echo "$x $maxxact" | awk '{print ($1 > $2) ? $1 : $2}')"
		pm_psql -At -c "SELECT 'long transaction: ' || backend_type || ' ' || state || ' ' || coalesce(wait_event_type || ':' || wait_event, '-') || ' ' || round(extract(epoch FROM now() - xact_start)::numeric, 1) || ' s: ' || left(query, 60) FROM pg_stat_activity WHERE backend_type LIKE 'pg_mqtt_emit%' AND now() - xact_start > interval '2 s'" >>"$WORK/long_transactions.log" 2>/dev/null || true
		sleep 1
	done
	kill -CONT "$BROKER_PID" 2>/dev/null || true
	wait "$pgb" || true
	local rows
	rows="$(pm_psql -At -c 'SELECT count(*) FROM ev')"
	arrived() { grep -o '"result":{"id":[0-9]*' "$dir/sub.out" | grep -v '"id":0$' | sort -u | wc -l; }
	# bounded wait for the rest to arrive (the listener scenario may take long)
	local deadline=$((SECONDS + 240)) got
	while got="$(arrived)"; ((got < rows && SECONDS < deadline)); do sleep 1; done
	local tps lat
	tps="$(grep -o 'tps = [0-9.]*' "$dir/pgbench.out" | head -1 | awk '{print $3}')"
	lat="$(cat "$dir"/pgb.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%.1f %.1f", a[NR]/1000, a[int(NR*0.99)]/1000}')"
	echo "${name}_tps: $tps"
	echo "${name}_commit_latency_max_ms: ${lat% *}"
	echo "${name}_commit_latency_p99_ms: ${lat#* }"
	echo "${name}_rows_committed: $rows"
	echo "${name}_events_arrived: $got"
	echo "${name}_events_lost: $((rows - got))"
	echo "${name}_worker_longest_transaction_s: $maxxact"
	[[ -s "$WORK/long_transactions.log" ]] && sort -u "$WORK/long_transactions.log" | tail -5 >&2
	pm_psql -At -c "SELECT 'stats: spilled ' || spilled || ', outboxed ' || outboxed || ', dead_letters ' || dead_letters || ', listener_calls ' || listener_calls || ', in_outbox ' || in_outbox FROM mqtt_emit.stats" >&2
	pm_cleanup
}

# crash_memory / crash_durable: one transaction of 20,000 rows, and the
# worker killed with SIGKILL 50 ms after its commit (the postmaster then
# restarts the whole server and sets up new shared memory); how many of the
# committed events reach a subscriber.
run_crash() {
	local name="$1" delivery="$2"
	local dir="$WORK/$name"
	start_servers "$dir" "$name" "mqtt_emit.delivery = '$delivery'" "restart_after_crash = on"
	local wpid
	wpid="$(pm_psql -At -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_mqtt_emit'")"
	pm_psql -q -c "INSERT INTO ev (v) SELECT 'x' FROM generate_series(1, 20000)" >/dev/null
	sleep 0.05
	kill -KILL "$wpid"
	pm_poll 60 bash -c "[[ \$(\"$PG_BINDIR/psql\" -X -At -h '$PG_SOCK' -p '$PG_PORT' -U postgres -d postgres -c 'SELECT connected FROM mqtt_emit.stats' 2>/dev/null) == t ]]" \
		|| pm_die "the server did not come back"
	local rows got deadline=$((SECONDS + 60))
	rows="$(pm_psql -At -c 'SELECT count(*) FROM ev')"
	arrived() { grep -o '"result":{"id":[0-9]*' "$dir/sub.out" | grep -v '"id":0$' | sort -u | wc -l; }
	while got="$(arrived)"; ((got < rows && SECONDS < deadline)); do sleep 1; done
	echo "${name}_rows_committed: $rows"
	echo "${name}_events_arrived: $got"
	echo "${name}_events_lost: $((rows - got))"
	pm_cleanup
}

for s in "$@"; do
	case "$s" in
		crash_memory) run_crash crash_memory memory ;;
		crash_durable) run_crash crash_durable durable ;;
		*) run_scenario "$s" ;;
	esac
done
