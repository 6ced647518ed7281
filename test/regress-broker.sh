#!/usr/bin/env bash
# test/regress-broker.sh DIR WATCH_PID: the broker of a standalone
# `make installcheck` (the Makefile's REGRESS_PREP; test/run.sh brings its
# own broker and skips this with REGRESS_PREP=).
#
# Starts mosquitto on a free 127.0.0.1 port with its files in DIR, writes
# DIR/broker.conf (the broker URL, a topic prefix and client id unique to
# this run) for pg_regress's --temp-config, and leaves a watchdog that stops
# the broker once process WATCH_PID (the make that runs the tests) is gone.
# Refuses to run as root, since pg_regress --temp-instance runs initdb,
# which refuses root.
set -euo pipefail

dir="${1:?usage: regress-broker.sh DIR WATCH_PID}"
watch_pid="${2:?usage: regress-broker.sh DIR WATCH_PID}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "$(id -u)" -eq 0 ]]; then
	cat >&2 <<-'MSG'
		ERROR:  make installcheck cannot run as root
		DETAIL: pg_regress --temp-instance runs initdb, which refuses to run as root.
		HINT:   Run it as an ordinary user who owns this directory, for example
		          chown -R postgres: . && runuser -u postgres -- make PG_CONFIG=... with_llvm=no installcheck
		        or run the suites with: bash test/run.sh regress
	MSG
	exit 1
fi
export PATH="$PATH:/usr/sbin:/usr/local/sbin"
for prog in mosquitto mosquitto_pub perl; do
	if ! command -v "$prog" >/dev/null; then
		echo "ERROR:  $prog not found" >&2
		echo "HINT:   Install the test packages: bash scripts/install-deps.sh (as root)." >&2
		exit 1
	fi
done

# shellcheck source=../scripts/common.sh
source "$ROOT/scripts/common.sh"

# a broker of an earlier run whose watchdog did not get to stop it
if [[ -f "$dir/mosquitto.pid" ]]; then
	read -r old <"$dir/mosquitto.pid" || true
	if [[ -n "${old:-}" && "$(cat "/proc/$old/comm" 2>/dev/null)" == mosquitto ]] &&
		tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -qF "$dir/mosquitto.conf"; then
		pm_stop_pid "$old"
	fi
fi
rm -rf "$dir"
mkdir -p "$dir"
pm_start_broker "$dir" 2>>"$dir/start.log"
echo "$BROKER_PID" >"$dir/mosquitto.pid"

run_id="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
cat >"$dir/broker.conf" <<-CONF
	# written by test/regress-broker.sh for make installcheck
	mqtt_emit.broker_url = '$BROKER_URL'
	mqtt_emit.topic_prefix = 'test/regress-$run_id'
	mqtt_emit.client_id = 'regress-$run_id'
CONF

# the watchdog: polls once a second whether make is still there
nohup bash -c '
	while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 1; done
	kill -TERM "$2" 2>/dev/null || true' regress-broker-watchdog "$watch_pid" "$BROKER_PID" \
	</dev/null >/dev/null 2>&1 &
echo "mosquitto for installcheck: $BROKER_URL (pid $BROKER_PID, stopped when make $watch_pid exits)"
