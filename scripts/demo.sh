#!/usr/bin/env bash
# demo.sh: pg_mqtt_emit end to end, on a throwaway broker and cluster.
#
#   bash scripts/demo.sh
#
# As root on a fresh Debian 12 or 13: installs the packages, builds and installs the
# extension (from a copy of the tree), starts mosquitto and PostgreSQL on free
# ports in a temp dir (as user postgres), watches a table "user", registers a
# PL/pgSQL listener, runs INSERT/UPDATE/DELETE and a rolled-back transaction,
# and shows what arrived on the bus (mosquitto_sub), what the listener logged,
# and mqtt_emit.stats. Stops everything and removes the temp dir at the end.
#
# Environment: PG_CONFIG, PG_MAJOR (as in test/run.sh), SKIP_DEPS=1, SKIP_BUILD=1, KEEP_TMP=1 (keep the temp
# dir), DEMO_TIMEOUT (seconds to wait for messages, default 30).
# Exit status 0 when every step worked.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# PG_MAJOR, PG_CONFIG: as given, else the version the Debian release ships
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"
export PG_MAJOR PG_CONFIG
DEMO_TIMEOUT="${DEMO_TIMEOUT:-30}"
TOPIC_PREFIX="prisma/events"    # the seed's default prefix: a private broker, no clash

step() {
	if [[ -t 1 ]]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi
}

# ---------------------------------------------------------------------------
# Inner phase, as postgres: servers, SQL, output.
# ---------------------------------------------------------------------------
inner() {
	WORK="$1"
	cd "$WORK"
	# shellcheck source=common.sh
	source "$ROOT/scripts/common.sh"
	export PATH="$PG_BINDIR:$PATH"
	unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS PGPASSWORD
	echo "$$" >"$WORK/inner.pid"
	trap 'pm_cleanup' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	local problems=()
	local run_id
	run_id="$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"

	step "starting mosquitto"
	pm_start_broker "$WORK/broker"
	echo "broker $BROKER_URL (pid $BROKER_PID)"

	step "starting PostgreSQL with pg_mqtt_emit preloaded"
	pm_start_pg "$WORK/pg" "$(pm_free_port)" \
		"shared_preload_libraries = 'pg_mqtt_emit'" \
		"mqtt_emit.broker_url = '$BROKER_URL'" \
		"mqtt_emit.database = 'postgres'" \
		"mqtt_emit.topic_prefix = '$TOPIC_PREFIX'" \
		"mqtt_emit.client_id = 'demo-$run_id'" ||
		pm_die "PostgreSQL did not start"
	echo "postgres: socket $PG_SOCK, port $PG_PORT"
	echo "settings: mqtt_emit.broker_url = '$BROKER_URL', mqtt_emit.topic_prefix = '$TOPIC_PREFIX'"

	step "subscribing: mosquitto_sub -v -q 1 -t '$TOPIC_PREFIX/#'"
	local probe="demo-probe/$run_id" msgs="$WORK/messages.txt"
	: >"$msgs"
	mosquitto_sub -h 127.0.0.1 -p "$BROKER_PORT" -v -q 1 -t "$TOPIC_PREFIX/#" -t "$probe" \
		</dev/null >"$msgs" 2>"$WORK/mosquitto_sub.err" &
	SUB_PID=$!
	pm_track_pid "$SUB_PID"
	# live once a probe published to the second filter comes back
	PROBE="$probe" MSGS="$msgs"
	pm_poll 30 probe_seen || pm_die "mosquitto_sub did not get its probe: $(cat "$WORK/mosquitto_sub.err")"
	echo "subscriber ready (pid $SUB_PID)"

	step "CREATE EXTENSION, a table, mqtt_emit.watch"
	pm_psql -e <<-'SQL'
		CREATE EXTENSION pg_mqtt_emit;
		CREATE TABLE "user" (id serial PRIMARY KEY, name text, email text);
		SELECT mqtt_emit.watch('"user"');
	SQL

	step "a PL/pgSQL listener: every 'user' event goes to demo_log"
	local listening=1
	if ! pm_psql -e <<-'SQL'; then
		CREATE TABLE demo_log (
		    id        bigserial PRIMARY KEY,
		    logged_at timestamptz NOT NULL DEFAULT clock_timestamp(),
		    source    text,
		    operation text,
		    model     text,
		    event_id  text,
		    result    jsonb
		);
		CREATE FUNCTION log_event(e mqtt_emit.event) RETURNS void LANGUAGE plpgsql AS $$
		BEGIN
		    INSERT INTO demo_log(source, operation, model, event_id, result)
		    VALUES (e.source, e.operation, e.model, e.event_id, e.result);
		END $$;
		SELECT mqtt_emit.listen('user', 'log_event(mqtt_emit.event)'::regprocedure);
	SQL
		listening=0
		problems+=("registering the listener failed")
	fi

	step "writes: 2 inserts, 1 update, 1 delete, a rolled-back insert, 1 more insert"
	pm_psql -e <<-'SQL'
		INSERT INTO "user" (name, email) VALUES ('Alice', 'alice@example.com'), ('Bob', 'bob@example.com');
		UPDATE "user" SET email = 'alice@new.example.com' WHERE name = 'Alice';
		DELETE FROM "user" WHERE name = 'Bob';
		BEGIN;
		INSERT INTO "user" (name, email) VALUES ('Mallory', 'mallory@example.com');
		ROLLBACK;
		INSERT INTO "user" (name, email) VALUES ('Carol', 'carol@example.com');
	SQL
	# 5 committed row events. Carol's insert commits after the rollback, and
	# events leave in commit order: once it is here, Mallory's would have been.
	local expected=5

	step "waiting (at most ${DEMO_TIMEOUT}s) for $expected messages"
	if pm_poll "$DEMO_TIMEOUT" messages_at_least "$expected"; then
		echo "$(message_count) messages arrived"
	else
		problems+=("only $(message_count) of $expected messages arrived within ${DEMO_TIMEOUT}s")
	fi
	if grep -v "^$probe " "$msgs" | grep -q Mallory; then
		problems+=("the rolled-back insert was published")
	else
		echo "nothing from the rolled-back transaction (Mallory) was published"
	fi
	if ((listening)); then
		if pm_poll "$DEMO_TIMEOUT" log_at_least "$expected"; then
			echo "the listener ran $expected times"
		else
			problems+=("the listener logged $(log_count) of $expected events within ${DEMO_TIMEOUT}s")
		fi
	fi

	step "MQTT messages seen by mosquitto_sub (topic payload)"
	grep -v "^$probe " "$msgs" || echo "(none)"

	step "SELECT * FROM demo_log"
	pm_psql -c 'SELECT * FROM demo_log ORDER BY id' || problems+=("reading demo_log failed")

	step "SELECT * FROM mqtt_emit.stats"
	pm_psql -x -c 'SELECT * FROM mqtt_emit.stats' || problems+=("reading mqtt_emit.stats failed")

	step "stopping"
	pm_stop_pid "$SUB_PID"
	"$PG_BINDIR/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 60 stop >/dev/null || true
	pm_cleanup

	if ((${#problems[@]})); then
		step "demo incomplete"
		printf '  - %s\n' "${problems[@]}"
		echo "server log: $WORK/pg/postgresql.log (tail below)"
		tail -n 40 "$WORK/pg/postgresql.log"
		exit 1
	fi
	step "demo complete"
}

probe_seen() {
	mosquitto_pub -h 127.0.0.1 -p "$BROKER_PORT" -q 0 -t "$PROBE" -m probe >/dev/null 2>&1 || true
	grep -q "^$PROBE " "$MSGS"
}
message_count() { grep -vc "^$PROBE " "$MSGS" || true; }
messages_at_least() { (($(message_count) >= $1)); }
log_count() { pm_psql -Atq -c 'SELECT count(*) FROM demo_log' 2>/dev/null || echo 0; }
log_at_least() { (($(log_count) >= $1)); }

if [[ "${1:-}" == "--inner" ]]; then
	shift
	inner "$@"
	exit 0
fi

# ---------------------------------------------------------------------------
# Outer phase: packages, build, install, then the demo as postgres.
# ---------------------------------------------------------------------------
if [[ "${SKIP_DEPS:-0}" != 1 ]]; then
	bash "$ROOT/scripts/install-deps.sh"
fi
# shellcheck source=common.sh
source "$ROOT/scripts/common.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pg_mqtt_emit_demo.XXXXXX")"
chmod 755 "$WORK"
INNER_PID=""
outer_cleanup() {
	local rc=$?
	if [[ -n "$INNER_PID" ]] && kill -0 "$INNER_PID" 2>/dev/null; then
		local inner_pid=""
		[[ -f "$WORK/inner.pid" ]] && read -r inner_pid <"$WORK/inner.pid"
		kill -TERM "${inner_pid:-$INNER_PID}" 2>/dev/null || true
		pm_poll 60 pm_pid_gone "$INNER_PID" || kill -TERM "$INNER_PID" 2>/dev/null || true
		wait "$INNER_PID" 2>/dev/null || true
	fi
	if [[ "${KEEP_TMP:-0}" == 1 ]] || ((rc != 0)); then
		echo "demo files kept in $WORK" >&2
	else
		rm -rf "$WORK"
	fi
}
trap outer_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SRC="$WORK/src"
pm_copy_tree "$ROOT" "$SRC"
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
	echo "build: skipped (SKIP_BUILD=1)"
else
	step "building and installing pg_mqtt_emit"
	pm_build_install "$SRC" >"$WORK/build.log" 2>&1 || {
		cat "$WORK/build.log"
		pm_die "build failed"
	}
	grep -E '^/usr/bin/install' "$WORK/build.log" || true
fi

inner_env=(
	PATH="$PG_BINDIR:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
	PG_CONFIG="$PG_CONFIG"
	DEMO_TIMEOUT="$DEMO_TIMEOUT"
	LANG=C.UTF-8
	LC_ALL=C.UTF-8
)
if [[ "$(id -u)" -eq 0 ]]; then
	chown -R "$PG_USER:" "$WORK"
	runuser -u "$PG_USER" -- env HOME="$WORK" "${inner_env[@]}" \
		bash "$SRC/scripts/demo.sh" --inner "$WORK" </dev/null &
else
	env "${inner_env[@]}" bash "$SRC/scripts/demo.sh" --inner "$WORK" </dev/null &
fi
INNER_PID=$!
rc=0
wait "$INNER_PID" || rc=$?
INNER_PID=""
exit "$rc"
