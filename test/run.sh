#!/usr/bin/env bash
# test/run.sh: the test command of pg_mqtt_emit.
#
#   bash test/run.sh                          # everything (what CI runs)
#   bash test/run.sh regress [TEST...]        # pg_regress (+ ISOLATION specs); TESTs override REGRESS
#   bash test/run.sh pgtap [FILE.sql...]      # pgTAP only (default test/pgtap/*.sql)
#   bash test/run.sh tap [FILE.pl...]         # Perl TAP only (default test/t/*.pl)
#   bash test/run.sh regress tap test/t/010_publish.pl   # suites combine
#
# As root (CI, a fresh Debian 12 or 13): installs the packages (scripts/install-deps.sh),
# copies the tree to a temp dir, builds and installs the extension there, then
# runs the suites as user postgres. As another user: the packages must already
# be installed and `make install` must be allowed.
#
# Suites: a mosquitto broker is started on a free port for pg_regress and
# pgTAP; each runs against a throwaway cluster with pg_mqtt_emit preloaded and
# pointed at it (unique topic prefix and client id per run). Perl TAP suites
# (test/t/*.pl, test/lib/MqttEmitTest.pm) start their own brokers and clusters.
#
# Counting (one "case" each): a pg_regress test, a pgTAP assertion, a Perl TAP
# assertion (see test/lib/tally.pl). A TAP file that dies or has a bad plan
# without a failing assertion counts one failure; a suite that crashes (build
# error, server does not start, no result printed) counts one failure. The
# last line is exactly "N passed, N failed"; the exit status is non-zero if
# anything failed.
#
# Environment: PG_CONFIG (default /usr/lib/postgresql/$PG_MAJOR/bin/pg_config),
# PG_MAJOR (default: that of PG_CONFIG if set, else the version the Debian
# release ships: 15 on Debian 12, 17 on Debian 13),
# PG_CFLAGS (default: strict warnings with -Werror, as CI builds),
# SKIP_DEPS=1, SKIP_BUILD=1, KEEP_TMP=1 (keep the temp dir even on success; it
# is always kept on failure), PROVE_FLAGS (extra prove options, e.g. -v),
# PG_TEST_TIMEOUT_DEFAULT (seconds for one wait in Perl TAP, default 180),
# MQTT_EMIT_TEST_CONF (a file of postgresql.conf lines added to the pg_regress
# and pgTAP clusters' configuration, after ours).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

# PG_MAJOR and PG_CONFIG: what the caller set, else the version this Debian
# release ships (scripts/common.sh; 15 on Debian 12, 17 on Debian 13)
# shellcheck source=../scripts/common.sh
source "$ROOT/scripts/common.sh"
export PG_MAJOR PG_CONFIG
export PG_CFLAGS="${PG_CFLAGS--Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare -Werror}"

usage() {
	sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------------------
# Inner phase: runs as the postgres user in the copied tree, runs the suites
# and writes the counts to $WORK/counts.
# ---------------------------------------------------------------------------
inner() {
	WORK="$1"; shift
	cd "$ROOT"
	# shellcheck source=../scripts/common.sh
	source "$ROOT/scripts/common.sh"

	export PATH="$PG_BINDIR:$PATH"
	unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS PGPASSWORD
	mkdir -p "$WORK/tmp"
	export TMPDIR="$WORK/tmp"

	local run_id
	run_id="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"

	local -a suites=() regress_args=() pgtap_args=() tap_args=()
	local current=""
	while (($#)); do
		case "$1" in
			regress | pgtap | tap) current="$1"; suites+=("$1") ;;
			*)
				case "$current" in
					regress) regress_args+=("$1") ;;
					pgtap) pgtap_args+=("$1") ;;
					tap) tap_args+=("$1") ;;
				esac ;;
		esac
		shift
	done

	# the outer phase signals this PID (not runuser's, which would SIGKILL us
	# two seconds later) to stop the run
	echo "$$" >"$WORK/inner.pid"
	PASSED=0
	FAILED=0
	BROKER_URL=""
	JOB=""
	# Job control: each long command runs in its own process group, which a
	# signal handler can stop as a whole (a trap only runs while we "wait").
	set -m
	trap 'stop_tap_leftovers; pm_cleanup' EXIT
	trap 'stop_job; exit 130' INT
	trap 'stop_job; exit 143' TERM

	local s
	for s in "${suites[@]}"; do
		case "$s" in
			regress) suite_regress "${regress_args[@]+"${regress_args[@]}"}" ;;
			pgtap) suite_pgtap "${pgtap_args[@]+"${pgtap_args[@]}"}" ;;
			tap) suite_tap "${tap_args[@]+"${tap_args[@]}"}" ;;
		esac
		echo "$PASSED $FAILED" >"$WORK/counts"
	done
	echo "$PASSED $FAILED" >"$WORK/counts"
}

# stop_tap_leftovers: what a killed Perl TAP script could not stop in its END
# blocks: clusters (by data dir: pg_ctl reads postmaster.pid), brokers and
# subscribers (by the PIDs MqttEmitTest recorded, if still that program).
stop_tap_leftovers() {
	local dir="$WORK/tap" pd pid cmd
	for pd in "$dir"/tmp_check/t_*_data/pgdata; do
		if [[ -f "$pd/postmaster.pid" ]]; then pm_stop_pgdata "$pd"; fi
	done
	if [[ -f "$dir/pids" ]]; then
		local args
		while read -r pid cmd; do
			# still ours? same program, our uid, and our config path or probe
			# topic in its arguments (guards against a reused PID)
			[[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$cmd" && -O "/proc/$pid" ]] || continue
			args="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
			if [[ "$args" == *"$WORK/"* || "$args" == *mqtt_emit_test/probe/* ]]; then
				kill -TERM "$pid" 2>/dev/null || true
			fi
		done <"$dir/pids"
	fi
}

# run_job OUTFILE CMD...: run CMD in the background (own process group),
# output to the terminal and OUTFILE; sets RC to its exit status.
run_job() {
	local out="$1"; shift
	( "$@" 2>&1 | tee "$out"; exit "${PIPESTATUS[0]}" ) &
	JOB=$!
	RC=0
	wait "$JOB" || RC=$?
	JOB=""
}

# stop_job: stop the running job's process group (ours, by its PID).
stop_job() {
	if [[ -n "$JOB" ]]; then
		kill -TERM -- "-$JOB" 2>/dev/null || true
		if ! pm_poll 30 pm_pid_gone "$JOB"; then
			kill -KILL -- "-$JOB" 2>/dev/null || true
		fi
		wait "$JOB" 2>/dev/null || true
		JOB=""
	fi
}

# add_counts LABEL TALLY_OUTPUT: add tally.pl's figures to the totals.
add_counts() {
	local label="$1" tally="$2" p f c
	p="$(awk '$1 == "passed" { print $2 }' <<<"$tally")"
	f="$(awk '$1 == "failed" { print $2 }' <<<"$tally")"
	c="$(awk '$1 == "crashed" { print $2 }' <<<"$tally")"
	PASSED=$((PASSED + p))
	FAILED=$((FAILED + f + c))
	echo "== $label: passed=$p failed=$f$( ((c)) && echo ' (no results: the suite crashed)')"
}

crash() {
	FAILED=$((FAILED + 1))
	echo "== $1: crashed ($2), counted as 1 failure"
}

# extra_conf: the lines of $MQTT_EMIT_TEST_CONF (a file), for the clusters
# of pg_regress and pgTAP, e.g. log_min_messages = debug1.
extra_conf() {
	if [[ -n "${MQTT_EMIT_TEST_CONF:-}" ]]; then
		echo "# from $MQTT_EMIT_TEST_CONF"
		cat "$MQTT_EMIT_TEST_CONF"
	fi
}

ensure_broker() {
	if [[ -z "$BROKER_URL" ]]; then
		pm_start_broker "$WORK/broker"
		echo "mosquitto $BROKER_URL (pid $BROKER_PID)"
	fi
}

# make_var VAR: the value of VAR in the extension's Makefile (PGXS included).
make_var() {
	local helper="$WORK/print-var.mk"
	printf 'print-%%:\n\t$(info $($*))\n\t@:\n' >"$helper"
	make -s --no-print-directory -f Makefile -f "$helper" \
		PG_CONFIG="$PG_CONFIG" with_llvm=no "print-$1"
}

# instance_opts NAME OPTS DEFAULT_DB: rewrite the Makefile's pg_regress (or
# pg_isolation_regress) options for a temp instance of ours: keep them except
# the instance, port and config; its --temp-config files go first into our
# config, our settings after them. Sets INSTANCE_OPTS.
instance_opts() {
	local name="$1" opts="$2" db="$3" o f
	local dir="$WORK/$name" conf="$WORK/$name/$name.conf"
	local -a kept=() optv=()
	mkdir -p "$dir"
	: >"$conf"
	read -ra optv <<<"$opts"
	for o in "${optv[@]+"${optv[@]}"}"; do
		case "$o" in
			--temp-config=*)
				f="${o#--temp-config=}"
				if [[ -f "$f" ]]; then
					{ echo "# from $f"; cat "$f"; echo; } >>"$conf"
				elif [[ "$f" == */tmp_broker/broker.conf ]]; then
					:	# a standalone installcheck's broker (REGRESS_PREP): ours instead
				else
					echo "note: $f (from the Makefile) does not exist"
				fi ;;
			--temp-instance=* | --port=*) ;;
			--dbname=*) db="${o#--dbname=}"; db="${db%%,*}"; kept+=("$o") ;;
			*) kept+=("$o") ;;
		esac
	done
	if [[ " ${kept[*]+"${kept[*]}"} " != *" --dbname="* ]]; then kept+=("--dbname=$db"); fi
	cat >>"$conf" <<-EOF
		# generated by test/run.sh
		shared_preload_libraries = 'pg_mqtt_emit'
		mqtt_emit.broker_url = '$BROKER_URL'
		mqtt_emit.database = '$db'
		mqtt_emit.topic_prefix = 'test/$name-$run_id'
		mqtt_emit.client_id = '$name-$run_id'
	EOF
	extra_conf >>"$conf"
	# a temp instance left behind by a killed pg_regress
	pm_track_pgdata "$dir/tmp_check/data"
	INSTANCE_OPTS="${kept[*]+"${kept[*]} "}--temp-config=$conf --temp-instance=$dir/tmp_check --port=$(pm_free_port)"
}

# pg_regress: the Makefile's REGRESS (or the test names given), and its
# ISOLATION specs (pg_isolation_regress) if it has any and no names were given.
suite_regress() {
	echo
	echo "=== pg_regress ==="
	if [[ ! -f Makefile ]]; then
		echo "== pg_regress: skipped (no Makefile yet)"
		return 0
	fi
	local regress isolation
	regress="$(make_var REGRESS)" && isolation="$(make_var ISOLATION)" ||
		{ crash pg_regress "cannot read the Makefile"; return 0; }
	if (($#)); then regress="$*"; isolation=""; fi
	if [[ -z "${regress//[[:space:]]/}" && -z "${isolation//[[:space:]]/}" ]]; then
		echo "== pg_regress: skipped (REGRESS and ISOLATION are empty)"
		return 0
	fi
	ensure_broker

	# Two make runs, so that the specs run even when a regress test failed.
	local rc=0 tally kind
	for kind in regress isolation; do
		local list
		if [[ "$kind" == regress ]]; then list="$regress"; else list="$isolation"; fi
		[[ -n "${list//[[:space:]]/}" ]] || continue
		# REGRESS_PREP=: our broker, not the one a standalone installcheck starts
		local -a make_args=(PG_CONFIG="$PG_CONFIG" with_llvm=no REGRESS_PREP=)
		if [[ "$kind" == regress ]]; then
			instance_opts regress "$(make_var REGRESS_OPTS)" contrib_regression
			make_args+=(REGRESS="$list" REGRESS_OPTS="$INSTANCE_OPTS" ISOLATION=)
			echo "REGRESS=$list"
			echo "REGRESS_OPTS=$INSTANCE_OPTS"
		else
			instance_opts isolation "$(make_var ISOLATION_OPTS)" isolation_regression
			make_args+=(REGRESS= ISOLATION="$list" ISOLATION_OPTS="$INSTANCE_OPTS")
			echo "ISOLATION=$list"
			echo "ISOLATION_OPTS=$INSTANCE_OPTS"
		fi
		run_job "$WORK/$kind/output.txt" make installcheck "${make_args[@]}"
		tally="$(perl "$ROOT/test/lib/tally.pl" regress <"$WORK/$kind/output.txt")"
		add_counts "pg_regress ($kind)" "$tally"
		if ((RC != 0)) && ! grep -q '^failed [1-9]' <<<"$tally" && ! grep -q '^crashed 1' <<<"$tally"; then
			crash "pg_regress ($kind)" "make installcheck exited $RC"
		fi
		((RC == 0)) || rc=$RC
	done

	if ((rc != 0)); then
		local f
		for f in regression.diffs output_iso/regression.diffs; do
			if [[ -s "$f" ]]; then
				echo "--- $f ---"
				cat "$f"
			fi
		done
		for f in "$WORK"/regress/tmp_check/log/postmaster.log "$WORK"/isolation/tmp_check/log/postmaster.log; do
			if [[ -f "$f" ]]; then
				echo "--- tail of the server log ($f) ---"
				tail -n 60 "$f"
			fi
		done
	fi
}

suite_pgtap() {
	echo
	echo "=== pgTAP ==="
	local -a files=("$@")
	if ((${#files[@]} == 0)); then
		shopt -s nullglob
		files=(test/pgtap/*.sql)
		shopt -u nullglob
	fi
	if ((${#files[@]} == 0)); then
		echo "== pgTAP: skipped (no test/pgtap/*.sql)"
		return 0
	fi
	ensure_broker
	local dir="$WORK/pgtap"
	mkdir -p "$dir"
	if ! pm_start_pg "$dir" "$(pm_free_port)" \
		"shared_preload_libraries = 'pg_mqtt_emit'" \
		"mqtt_emit.broker_url = '$BROKER_URL'" \
		"mqtt_emit.database = 'postgres'" \
		"mqtt_emit.topic_prefix = 'test/pgtap-$run_id'" \
		"mqtt_emit.client_id = 'pgtap-$run_id'" \
		"$(extra_conf)"; then
		crash pgTAP "the cluster did not start"
		return 0
	fi
	echo "cluster on $PG_SOCK port $PG_PORT"
	if ! pm_psql -q -c 'CREATE EXTENSION pgtap'; then
		crash pgTAP "CREATE EXTENSION pgtap failed"
		pm_stop_pgdata "$PGDATA_DIR"
		return 0
	fi
	run_job "$dir/output.txt" pg_prove -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres "${files[@]}"
	local rc=$RC
	add_counts pgTAP "$(perl "$ROOT/test/lib/tally.pl" tap <"$dir/output.txt")"
	if ((rc != 0)); then
		echo "--- tail of the server log ($dir/postgresql.log) ---"
		tail -n 60 "$dir/postgresql.log"
	fi
	"$PG_BINDIR/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 60 stop >/dev/null || true
}

suite_tap() {
	echo
	echo "=== Perl TAP ==="
	local -a files=("$@")
	if ((${#files[@]} == 0)); then
		shopt -s nullglob
		files=(test/t/*.pl)
		shopt -u nullglob
	fi
	if ((${#files[@]} == 0)); then
		echo "== Perl TAP: skipped (no test/t/*.pl)"
		return 0
	fi
	local dir="$WORK/tap" perl_dir
	mkdir -p "$dir"
	perl_dir="$(dirname "$(dirname "$("$PG_CONFIG" --pgxs)")")/test/perl"
	# TESTDIR (PostgreSQL 15), TESTDATADIR and TESTLOGDIR (16 and later):
	# where PostgreSQL::Test::Utils puts tmp_check (data dirs, brokers' files)
	# and the logs; the same absolute paths on every version.
	# MQTT_EMIT_TEST_PIDFILE: every process MqttEmitTest starts, so that we
	# can stop them if a test is killed before its END blocks ran.
	local -a prove_flags=()
	read -ra prove_flags <<<"${PROVE_FLAGS:-}"
	export TESTDIR="$dir" TESTDATADIR="$dir/tmp_check" TESTLOGDIR="$dir/tmp_check/log" \
		MQTT_EMIT_TEST_PIDFILE="$dir/pids"
	run_job "$dir/output.txt" prove -I test/lib -I "$perl_dir" \
		"${prove_flags[@]+"${prove_flags[@]}"}" "${files[@]}"
	local rc=$RC
	unset TESTDIR TESTDATADIR TESTLOGDIR MQTT_EMIT_TEST_PIDFILE
	local tally
	tally="$(perl "$ROOT/test/lib/tally.pl" tap <"$dir/output.txt")"
	add_counts "Perl TAP" "$tally"

	stop_tap_leftovers

	if ((rc != 0)); then
		local f name
		while read -r _ f; do
			name="$(basename "$f")"
			name="${name%.*}"
			echo "--- $dir/tmp_check/log/regress_log_$name (tail) ---"
			tail -n 150 "$dir/tmp_check/log/regress_log_$name" 2>/dev/null || true
			for log in "$dir/tmp_check/log/${name}"_*.log; do
				[[ -f "$log" ]] || continue
				echo "--- $log (tail) ---"
				tail -n 40 "$log"
			done
		done < <(grep '^failed_file ' <<<"$tally")
	fi
}

if [[ "${1:-}" == "--inner" ]]; then
	shift
	inner "$@"
	exit 0
fi

# ---------------------------------------------------------------------------
# Outer phase: arguments, packages, copy, build, install, then the inner phase
# as postgres; prints the total.
# ---------------------------------------------------------------------------
args=()
have_suite=0
while (($#)); do
	case "$1" in
		-h | --help) usage; exit 0 ;;
		all) args+=(regress pgtap tap); have_suite=1 ;;
		regress | pgtap | tap) args+=("$1"); have_suite=1; last_suite="$1" ;;
		-*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
		*)
			((have_suite)) || { echo "'$1': name a suite first (regress, pgtap or tap)" >&2; exit 2; }
			if [[ "$last_suite" == regress ]]; then
				args+=("$1")    # a test name
			elif [[ -e "$1" ]]; then
				abs="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
				[[ "$abs" == "$ROOT/"* ]] || { echo "$1 is not inside $ROOT" >&2; exit 2; }
				args+=("${abs#"$ROOT/"}")
			elif [[ -e "$ROOT/$1" ]]; then
				args+=("$1")
			else
				echo "no such file: $1" >&2
				exit 2
			fi ;;
	esac
	shift
done
((have_suite)) || args=(regress pgtap tap)

total() {
	echo
	echo "$1 passed, $2 failed"
}

if [[ "${SKIP_DEPS:-0}" != 1 ]]; then
	bash "$ROOT/scripts/install-deps.sh" || { total 0 1; exit 1; }
fi
# shellcheck source=../scripts/common.sh
source "$ROOT/scripts/common.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pg_mqtt_emit_test.XXXXXX")"
chmod 755 "$WORK"
INNER_PID=""
outer_cleanup() {
	local rc=$?
	if [[ -n "$INNER_PID" ]] && kill -0 "$INNER_PID" 2>/dev/null; then
		# stop the inner phase, which stops what it started, and wait for it
		local inner_pid=""
		[[ -f "$WORK/inner.pid" ]] && read -r inner_pid <"$WORK/inner.pid"
		kill -TERM "${inner_pid:-$INNER_PID}" 2>/dev/null || true
		pm_poll 60 pm_pid_gone "$INNER_PID" || kill -TERM "$INNER_PID" 2>/dev/null || true
		wait "$INNER_PID" 2>/dev/null || true
	fi
	if ((rc == 0)) && [[ "${KEEP_TMP:-0}" != 1 ]]; then
		rm -rf "$WORK"
	else
		echo "test files kept in $WORK" >&2
	fi
}
trap outer_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SRC="$WORK/src"
pm_copy_tree "$ROOT" "$SRC"

if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
	echo "build: skipped (SKIP_BUILD=1)"
elif [[ ! -f "$SRC/Makefile" ]]; then
	echo "build: skipped (no Makefile yet)"
else
	echo "=== build (PG_CFLAGS=$PG_CFLAGS) ==="
	if ! pm_build_install "$SRC"; then
		echo "== build: failed, counted as 1 failure"
		total 0 1
		exit 1
	fi
fi

inner_env=(
	PATH="$PG_BINDIR:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
	PG_CONFIG="$PG_CONFIG"
	LANG=C.UTF-8
	LC_ALL=C.UTF-8
)
if [[ -n "${MQTT_EMIT_TEST_CONF:-}" ]]; then
	cp "$MQTT_EMIT_TEST_CONF" "$WORK/extra.conf"
	inner_env+=(MQTT_EMIT_TEST_CONF="$WORK/extra.conf")
fi
if [[ "$(id -u)" -eq 0 ]]; then
	chown -R "$PG_USER:" "$WORK"
	runuser -u "$PG_USER" -- env HOME="$WORK" "${inner_env[@]}" \
		bash "$SRC/test/run.sh" --inner "$WORK" "${args[@]}" </dev/null &
else
	env "${inner_env[@]}" bash "$SRC/test/run.sh" --inner "$WORK" "${args[@]}" </dev/null &
fi
INNER_PID=$!
inner_rc=0
wait "$INNER_PID" || inner_rc=$?
INNER_PID=""

passed=0
failed=0
if [[ -f "$WORK/counts" ]]; then
	read -r passed failed <"$WORK/counts"
fi
if ((inner_rc != 0)); then
	echo "== the test run itself exited $inner_rc, counted as 1 failure"
	failed=$((failed + 1))
fi
total "$passed" "$failed"
((failed == 0))
