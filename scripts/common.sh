# common.sh: shell functions shared by test/run.sh and scripts/demo.sh.
# Source it; it defines functions and defaults only and starts nothing.
#
# Conventions: every wait is a bounded poll (pm_poll); every process started
# is recorded by PID (pm_track_pid) or data directory (pm_track_pgdata) and
# stopped by pm_cleanup, which callers install in an EXIT trap.

# pm_debian_pg_major: the PostgreSQL major version this Debian release ships
# (12 bookworm: 15, 13 trixie: 17, forky: 18; otherwise what the "postgresql"
# package depends on); nothing if unknown.
pm_debian_pg_major() {
	local codename=""
	codename="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")" || true
	case "$codename" in
		bookworm) echo 15 ;;
		trixie) echo 17 ;;
		forky) echo 18 ;;
		*) apt-cache depends postgresql 2>/dev/null |
			sed -n 's/^ *Depends: postgresql-\([0-9][0-9]*\)$/\1/p' | head -n 1 ;;
	esac
}

# pm_pg_major: the major version to build and test against: $PG_MAJOR; else
# that of $PG_CONFIG (asking it, or from its path /usr/lib/postgresql/NN/...);
# else the one the Debian release ships.
pm_pg_major() {
	if [[ -n "${PG_MAJOR:-}" ]]; then
		echo "$PG_MAJOR"
		return
	fi
	if [[ -n "${PG_CONFIG:-}" ]]; then
		local v
		v="$("$PG_CONFIG" --version 2>/dev/null | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')" || true
		if [[ -z "$v" && "$PG_CONFIG" =~ /postgresql/([0-9]+)/ ]]; then v="${BASH_REMATCH[1]}"; fi
		if [[ -n "$v" ]]; then
			echo "$v"
			return
		fi
	fi
	pm_debian_pg_major
}

PG_MAJOR="$(pm_pg_major)" || PG_MAJOR=""
PG_MAJOR="${PG_MAJOR:-15}"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}"
PG_BINDIR="$("$PG_CONFIG" --bindir 2>/dev/null || echo "/usr/lib/postgresql/$PG_MAJOR/bin")"
PG_USER="${PG_USER:-postgres}"

PM_PIDS=()
PM_PGDATA=()

pm_log() { printf '%s\n' "$*" >&2; }
pm_die() { pm_log "error: $*"; exit 1; }

# pm_poll TIMEOUT_S CMD...: run CMD until it succeeds; 1 if TIMEOUT_S passed.
pm_poll() {
	local timeout="$1"; shift
	local deadline=$((SECONDS + timeout))
	while true; do
		if "$@"; then return 0; fi
		if ((SECONDS >= deadline)); then return 1; fi
		sleep 0.05
	done
}

# pm_free_port: a TCP port free on 127.0.0.1. Asks the kernel by binding
# random ports in 10200-32767, below Linux's ephemeral range (as
# PostgreSQL::Test::Cluster does), so no client socket takes it meanwhile.
pm_free_port() {
	perl -MIO::Socket::INET -e '
		for (1 .. 200) {
			my $p = 10200 + int(rand(32767 - 10200));
			my $s = IO::Socket::INET->new(Listen => 1, Proto => "tcp",
				LocalAddr => "127.0.0.1", LocalPort => $p, ReuseAddr => 0)
			  or next;
			close $s;
			print "$p\n";
			exit 0;
		}
		exit 1;'
}

pm_track_pid() { PM_PIDS+=("$1"); }
pm_track_pgdata() { PM_PGDATA+=("$1"); }

# pm_stop_pid PID: SIGTERM, bounded wait, then SIGKILL. Only for our own PIDs.
pm_stop_pid() {
	local pid="$1"
	kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	if ! pm_poll 10 pm_pid_gone "$pid"; then
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
}
# pm_pid_gone PID: true if PID has exited (zombies included; no procps needed)
pm_pid_gone() {
	kill -0 "$1" 2>/dev/null || return 0
	local state
	state="$(sed -E 's/.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null || true)"
	[[ -z "$state" || "$state" == Z ]]
}

# pm_stop_pgdata DIR: stop the postmaster of DIR (pg_ctl reads its PID from
# postmaster.pid), immediate mode: this is cleanup, not a test.
pm_stop_pgdata() {
	local dir="$1"
	[[ -f "$dir/postmaster.pid" ]] || return 0
	"$PG_BINDIR/pg_ctl" -D "$dir" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
}

pm_cleanup() {
	local i
	for ((i = ${#PM_PGDATA[@]} - 1; i >= 0; i--)); do
		pm_stop_pgdata "${PM_PGDATA[$i]}"
	done
	for ((i = ${#PM_PIDS[@]} - 1; i >= 0; i--)); do
		pm_stop_pid "${PM_PIDS[$i]}"
	done
	PM_PGDATA=()
	PM_PIDS=()
}

# pm_start_broker DIR: start mosquitto on a free port with its config and log
# in DIR; sets BROKER_PORT, BROKER_PID, BROKER_URL; returns once mosquitto_pub
# to it succeeds. Retries on another port if the chosen one was taken.
pm_start_broker() {
	local dir="$1" attempt
	mkdir -p "$dir"
	for attempt in 1 2 3 4 5; do
		BROKER_PORT="$(pm_free_port)" || pm_die "no free port"
		{
			echo "listener $BROKER_PORT 127.0.0.1"
			echo "allow_anonymous true"
			echo "persistence false"
			echo "max_inflight_messages 0"
			echo "max_queued_messages 0"
			echo "log_dest file $dir/mosquitto.log"
			echo "log_timestamp_format %Y-%m-%dT%H:%M:%S"
			# as root mosquitto would switch to user mosquitto, which cannot write here
			if [[ "$(id -u)" -eq 0 ]]; then echo "user root"; fi
		} >"$dir/mosquitto.conf"
		mosquitto -c "$dir/mosquitto.conf" </dev/null >>"$dir/mosquitto.out" 2>&1 &
		BROKER_PID=$!
		pm_track_pid "$BROKER_PID"
		if pm_poll 30 _pm_broker_ready && kill -0 "$BROKER_PID" 2>/dev/null; then
			BROKER_URL="tcp://127.0.0.1:$BROKER_PORT"
			return 0
		fi
		pm_stop_pid "$BROKER_PID"
		pm_log "mosquitto on port $BROKER_PORT did not come up (attempt $attempt):"
		tail -n 5 "$dir/mosquitto.log" "$dir/mosquitto.out" >&2 2>/dev/null || true
	done
	pm_die "could not start mosquitto"
}
_pm_broker_ready() {
	if ! kill -0 "$BROKER_PID" 2>/dev/null; then return 0; fi   # died: stop polling
	mosquitto_pub -h 127.0.0.1 -p "$BROKER_PORT" -q 0 -t mqtt_emit_test/ready -m x >/dev/null 2>&1
}

# pm_start_pg DIR PORT CONFLINES...: initdb DIR/data (as the current user,
# which must not be root), a private socket directory DIR/sock, listen on no
# TCP address, the given postgresql.conf lines, start and wait. Sets PGDATA_DIR,
# PG_SOCK, PG_PORT.
pm_start_pg() {
	local dir="$1" port="$2"; shift 2
	PGDATA_DIR="$dir/data"
	PG_SOCK="$dir/sock"
	PG_PORT="$port"
	mkdir -p "$PG_SOCK"
	"$PG_BINDIR/initdb" -D "$PGDATA_DIR" -U postgres -A trust -N -E UTF8 --no-locale \
		>"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
	{
		echo ""
		echo "# added by scripts/common.sh"
		echo "port = $PG_PORT"
		echo "listen_addresses = ''"
		echo "unix_socket_directories = '$PG_SOCK'"
		echo "fsync = off"
		echo "log_line_prefix = '%m [%p] %q%a '"
		printf '%s\n' "$@"
	} >>"$PGDATA_DIR/postgresql.conf"
	pm_track_pgdata "$PGDATA_DIR"
	"$PG_BINDIR/pg_ctl" -D "$PGDATA_DIR" -l "$dir/postgresql.log" -w -t 120 start >/dev/null \
		|| { tail -n 30 "$dir/postgresql.log" >&2; return 1; }
}

# pm_psql ARGS...: psql on the cluster of pm_start_pg, stop on errors.
pm_psql() {
	"$PG_BINDIR/psql" -X -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres \
		-v ON_ERROR_STOP=1 "$@"
}

# pm_copy_tree SRC DST: copy the source tree without .git and build or test output.
pm_copy_tree() {
	local src="$1" dst="$2"
	mkdir -p "$dst"
	tar -C "$src" \
		--exclude=./.git --exclude=./tmp_check --exclude=./results --exclude=./log \
		--exclude=./regression.diffs --exclude=./regression.out \
		--exclude='*.o' --exclude='*.so' --exclude='*.bc' \
		-cf - . | tar -C "$dst" -xf -
}

# pm_build_install DIR: build and install the extension in DIR (PGXS). Uses
# PG_CFLAGS from the environment (may be empty). Returns non-zero on failure.
pm_build_install() {
	local dir="$1" undef
	make -C "$dir" PG_CONFIG="$PG_CONFIG" with_llvm=no PG_CFLAGS="${PG_CFLAGS:-}" || return 1
	# a shared library links with undefined symbols; one of our own (me_*)
	# would only fail when the server loads it
	undef="$(nm -D --undefined-only "$dir/pg_mqtt_emit.so" 2>/dev/null | awk '$2 ~ /^me_/ {print $2}')"
	if [[ -n "$undef" ]]; then
		echo "pg_mqtt_emit.so references undefined functions of its own: $undef" >&2
		return 1
	fi
	make -C "$dir" PG_CONFIG="$PG_CONFIG" with_llvm=no PG_CFLAGS="${PG_CFLAGS:-}" install
}
