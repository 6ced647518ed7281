#!/usr/bin/env bash
# bench/run.sh: pg_mqtt_emit's benchmarks (doc/DESIGN.md section 9).
#
#   bash bench/run.sh                    # everything, ~13 minutes on 2 cores
#   BENCH_QUICK=1 bash bench/run.sh      # short runs, ~4 minutes, rough figures
#   bash bench/run.sh trigger latency    # only some sections
#   bash bench/run.sh table              # issue 16's table: every figure beside
#                                        # its target, ~6 minutes (bench/lib/table.sh)
#
# Sections: trigger (pgbench single-row INSERT overhead), throughput (commit ->
# subscriber vs a bare paho publisher, and against batch size), latency
# (commit on node A -> listener on node B at 1,000 events/s), memory (worker
# RSS after 100k and 1M events), subscribe (listen() commit -> SUBACK, worker
# start -> both clients ready), profile (perf of a backend and of the worker;
# only when named or with BENCH_PROFILE=1), table (issue 16's figures with
# their targets, and callgrind's instructions per INSERT; only when named),
# paho (paho's own rate and CPU per QoS 1 message, MQTTAsync and MQTTClient,
# by window; only when named).
#
# As root: installs the packages (scripts/install-deps.sh, gnuplot-nox), copies
# the tree to a temp dir, builds the extension from it and installs it into a
# private copy of the PostgreSQL installation in that temp dir (nothing is
# installed system-wide), builds the C programs of bench/, then runs the
# sections as user postgres against servers it starts itself (mosquitto with
# max_inflight_messages 0, PostgreSQL clusters with pg_mqtt_emit preloaded)
# on free ports, and stops them by PID.
#
# Prints figures as "name: value" lines on stdout (progress goes to stderr).
# Writes figures.txt, the raw data and PNG plots to bench/out/ (BENCH_OUT).
#
# Environment: BENCH_QUICK=1, BENCH_PROFILE=1, BENCH_OUT (default bench/out),
# BENCH_REV (measure that git revision of the extension, e.g. HEAD, instead
# of the working tree),
# BENCH_TRIGGER_ROUNDS (default 5), BENCH_TRIGGER_SYNC (default "on off":
# the synchronous_commit settings of the trigger section), BENCH_PG_CONF (one
# more postgresql.conf line for every cluster, e.g. "mqtt_emit.batch_delay = 0"),
# SKIP_DEPS=1, SKIP_BUILD=1 (use the system's installed extension), KEEP_TMP=1,
# PG_CONFIG. Not a test: it never fails because a target is missed.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
export PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"

ALL_SECTIONS=(trigger throughput latency memory subscribe)

# ---------------------------------------------------------------------------
# Inner phase, as postgres: servers and measurements.
# ---------------------------------------------------------------------------
if [[ "${1:-}" == "--inner" ]]; then
	WORK="$2"
	shift 2
	# shellcheck source=../scripts/common.sh
	source "$ROOT/scripts/common.sh"
	# shellcheck source=lib/common.sh
	source "$ROOT/bench/lib/common.sh"
	bench_inner "$@"
	exit 0
fi

# ---------------------------------------------------------------------------
# Outer phase: packages, build, install, then the inner phase as postgres.
# ---------------------------------------------------------------------------
sections=()
for arg in "$@"; do
	case "$arg" in
		trigger | throughput | latency | memory | subscribe | profile | table | bigtx | paho) sections+=("$arg") ;;
		-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
		*) echo "unknown section \"$arg\" (trigger, throughput, latency, memory, subscribe, profile, table, bigtx, paho)" >&2; exit 2 ;;
	esac
done
if ((${#sections[@]} == 0)); then
	sections=("${ALL_SECTIONS[@]}")
	if [[ "${BENCH_PROFILE:-0}" == 1 ]]; then sections+=(profile); fi
fi

if [[ "${SKIP_DEPS:-0}" != 1 ]]; then
	bash "$ROOT/scripts/install-deps.sh" >&2
	if ! command -v gnuplot >/dev/null 2>&1 && [[ "$(id -u)" -eq 0 ]]; then
		echo "bench: installing gnuplot-nox" >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gnuplot-nox </dev/null >&2 ||
			{ apt-get update </dev/null >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gnuplot-nox </dev/null >&2; } ||
			echo "bench: gnuplot-nox could not be installed; no plots" >&2
	fi
	if [[ " ${sections[*]} " == *" table "* ]] && ! command -v valgrind >/dev/null 2>&1 && [[ "$(id -u)" -eq 0 ]]; then
		echo "bench: installing valgrind" >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends valgrind </dev/null >&2 || true
	fi
	if [[ " ${sections[*]} " == *" profile "* ]] && ! command -v perf >/dev/null 2>&1 && [[ "$(id -u)" -eq 0 ]]; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends linux-perf </dev/null >&2 || true
	fi
fi
# shellcheck source=../scripts/common.sh
source "$ROOT/scripts/common.sh"

OUT="${BENCH_OUT:-$ROOT/bench/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pg_mqtt_emit_bench.XXXXXX")"
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
		echo "bench: files kept in $WORK" >&2
	else
		rm -rf "$WORK"
	fi
}
trap outer_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SRC="$WORK/src"
if [[ -n "${BENCH_REV:-}" ]]; then
	# a committed revision of the extension, with this bench/
	mkdir -p "$SRC"
	git -C "$ROOT" archive "$BENCH_REV" | tar -C "$SRC" -xf -
	rm -rf "$SRC/bench"
	pm_copy_tree "$ROOT/bench" "$SRC/bench"
	bench_git="$(git -C "$ROOT" rev-parse --short "$BENCH_REV")"
else
	pm_copy_tree "$ROOT" "$SRC"
	bench_git="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
	if [[ -n "$(git -C "$ROOT" status --porcelain -- src Makefile '*.sql' '*.control' 2>/dev/null)" ]]; then
		bench_git="$bench_git+uncommitted"
	fi
fi
rm -rf "$SRC/bench/out"
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
	echo "bench: build skipped (SKIP_BUILD=1), using the system's PostgreSQL and pg_mqtt_emit" >&2
	RUN_PG_CONFIG="$PG_CONFIG"
else
	# A private copy of the PostgreSQL installation (PostgreSQL finds its lib
	# and share directories relative to its binaries), with the extension
	# installed into it: other builds installed meanwhile on this machine do
	# not mix into the figures, and this run installs nothing system-wide.
	pg_bindir="$("$PG_CONFIG" --bindir)"
	pg_libroot="$(dirname "$pg_bindir")"              # /usr/lib/postgresql/15
	pg_share="$("$PG_CONFIG" --sharedir)"             # /usr/share/postgresql/15
	INST="$WORK/inst"
	mkdir -p "$INST$(dirname "$pg_libroot")" "$INST$(dirname "$pg_share")"
	cp -a "$pg_libroot" "$INST$(dirname "$pg_libroot")/"
	cp -a "$pg_share" "$INST$(dirname "$pg_share")/"
	echo "bench: building pg_mqtt_emit $bench_git into a private PostgreSQL tree" >&2
	{
		make -C "$SRC" PG_CONFIG="$PG_CONFIG" with_llvm=no &&
			make -C "$SRC" PG_CONFIG="$PG_CONFIG" with_llvm=no DESTDIR="$INST" install
	} >"$WORK/build.log" 2>&1 || {
		cat "$WORK/build.log" >&2
		pm_die "build failed"
	}
	RUN_PG_CONFIG="$INST$pg_bindir/pg_config"
	[[ "$("$RUN_PG_CONFIG" --pkglibdir)" == "$INST"* ]] || pm_die "the private PostgreSQL tree is not relocatable"
fi
make -C "$SRC/bench" >"$WORK/bench-build.log" 2>&1 || {
	cat "$WORK/bench-build.log" >&2
	pm_die "building bench programs failed"
}

inner_env=(
	PATH="$("$RUN_PG_CONFIG" --bindir):/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
	PG_CONFIG="$RUN_PG_CONFIG"
	LANG=C.UTF-8
	LC_ALL=C.UTF-8
	BENCH_QUICK="${BENCH_QUICK:-0}"
	BENCH_GIT="$bench_git"
	BENCH_TRIGGER_ROUNDS="${BENCH_TRIGGER_ROUNDS:-}"
	BENCH_TRIGGER_SYNC="${BENCH_TRIGGER_SYNC:-on off}"
	BENCH_PG_CONF="${BENCH_PG_CONF:-}"
	BENCH_TABLE_ROUNDS="${BENCH_TABLE_ROUNDS:-}"
	BENCH_TABLE_SECONDS="${BENCH_TABLE_SECONDS:-}"
	BENCH_TABLE_PUBLISH_RUNS="${BENCH_TABLE_PUBLISH_RUNS:-}"
	BENCH_BIGTX_SIZES="${BENCH_BIGTX_SIZES:-}"
)
if [[ "$(id -u)" -eq 0 ]]; then
	chown -R "$PG_USER:" "$WORK"
	runuser -u "$PG_USER" -- env HOME="$WORK" "${inner_env[@]}" \
		bash "$SRC/bench/run.sh" --inner "$WORK" "${sections[@]}" </dev/null &
else
	env "${inner_env[@]}" bash "$SRC/bench/run.sh" --inner "$WORK" "${sections[@]}" </dev/null &
fi
INNER_PID=$!
rc=0
wait "$INNER_PID" || rc=$?
INNER_PID=""

# results and plots
if [[ -d "$WORK/results" ]]; then
	cp -r "$WORK/results/." "$OUT/"
	if command -v gnuplot >/dev/null 2>&1; then
		bash "$ROOT/bench/plot.sh" "$OUT" >&2 || echo "bench: plotting failed" >&2
	fi
	echo "bench: figures, data and plots in $OUT" >&2
fi
exit "$rc"
