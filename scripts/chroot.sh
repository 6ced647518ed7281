#!/usr/bin/env bash
# chroot.sh: Debian chroots with another PostgreSQL major version, for building
# and testing pg_mqtt_emit against it on this machine (root only).
#
#   bash scripts/chroot.sh ensure SUITE MAJOR        # create or check the chroot
#   bash scripts/chroot.sh run SUITE MAJOR CMD...    # CMD inside, in a copy of the tree
#   bash scripts/chroot.sh test SUITE MAJOR [ARGS]   # bash test/run.sh ARGS inside
#   bash scripts/chroot.sh path SUITE                # where the chroot lives
#
# e.g. `bash scripts/chroot.sh test trixie 17` runs the whole suite against
# PostgreSQL 17 of Debian 13; `... test forky 18 tap test/t/010_publish.pl`.
#
# The chroots live in $PG_MQTT_EMIT_CHROOT_CACHE (default
# /var/cache/pg_mqtt_emit), one per suite: chroot-SUITE. A stamp file in each
# holds the suite, the major version and the package list; when it differs
# from what this script wants, or the chroot does not work (no pg_config for
# MAJOR), the chroot is made anew with debootstrap (minbase) from the Debian
# mirror this machine's apt uses (or $PG_MQTT_EMIT_MIRROR). A lock file per
# chroot serialises creation and use.
#
# Mounts (/proc, /dev, a tmpfs on /dev/shm) are made in a private mount
# namespace (unshare --mount) that ends with the command, so nothing stays
# mounted even if this script is killed; the EXIT trap unmounts them as well.
# The tree is copied (without .git and build output) to /tmp inside the chroot
# and removed afterwards.
set -euo pipefail

CHROOT_SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHROOT_ROOT="$(cd "$CHROOT_SCRIPT_DIR/.." && pwd)"
CHROOT_CACHE="${PG_MQTT_EMIT_CHROOT_CACHE:-/var/cache/pg_mqtt_emit}"

chroot_log() { printf 'chroot: %s\n' "$*" >&2; }
chroot_die() { chroot_log "error: $*"; exit 1; }

# chroot_packages MAJOR: what the build and the whole test suite need
# (the same list as scripts/install-deps.sh, plus what minbase lacks).
chroot_packages() {
	local major="$1"
	echo make gcc libc6-dev \
		"postgresql-$major" "postgresql-server-dev-$major" "postgresql-$major-pgtap" \
		libtap-parser-sourcehandler-pgtap-perl libipc-run-perl libyaml-libyaml-perl perl \
		mosquitto mosquitto-clients libpaho-mqtt-dev rabbitmq-server \
		openssl util-linux procps ca-certificates
}

# chroot_mirror: the Debian archive URI of this machine's apt sources (the
# first one that is not debian-security), or $PG_MQTT_EMIT_MIRROR.
chroot_mirror() {
	if [[ -n "${PG_MQTT_EMIT_MIRROR:-}" ]]; then
		echo "$PG_MQTT_EMIT_MIRROR"
		return
	fi
	local uri
	uri="$(
		{
			cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
				awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }'
			cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
				awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }'
		} | grep -v -- '-security' | grep -E '/debian/?$' | head -n 1
	)"
	[[ -n "$uri" ]] || chroot_die "no Debian mirror in /etc/apt/sources.list*; set PG_MQTT_EMIT_MIRROR"
	echo "$uri"
}

chroot_dir() { echo "$CHROOT_CACHE/chroot-$1"; }

chroot_stamp_text() {
	local suite="$1" major="$2"
	echo "suite=$suite"
	echo "major=$major"
	echo "packages=$(chroot_packages "$major")"
}

# chroot_mounts_under DIR: true if anything is mounted at or below DIR
# (never delete a directory with /dev bound into it).
chroot_mounts_under() {
	local dir="$1"
	awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# chroot_ok SUITE MAJOR: the chroot exists, has our stamp and a working pg_config.
chroot_ok() {
	local suite="$1" major="$2" dir
	dir="$(chroot_dir "$suite")"
	[[ -f "$dir/.pg_mqtt_emit-stamp" ]] || return 1
	[[ "$(cat "$dir/.pg_mqtt_emit-stamp")" == "$(chroot_stamp_text "$suite" "$major")" ]] || return 1
	chroot "$dir" "/usr/lib/postgresql/$major/bin/pg_config" --version >/dev/null 2>&1 || return 1
	local rc=0
	chroot "$dir" /bin/sh -c "PATH=/usr/sbin:/usr/bin:/sbin:/bin; mosquitto -h" >/dev/null 2>&1 || rc=$?
	# mosquitto -h exits 3 after printing its usage
	((rc == 0 || rc == 3))
}

# chroot_ensure SUITE MAJOR: create the chroot unless it is fine (caller holds the lock).
chroot_ensure() {
	local suite="$1" major="$2" dir new mirror script=""
	dir="$(chroot_dir "$suite")"
	if chroot_ok "$suite" "$major"; then
		chroot_log "$dir: ready ($(chroot "$dir" "/usr/lib/postgresql/$major/bin/pg_config" --version))"
		return 0
	fi
	command -v debootstrap >/dev/null || {
		chroot_log "installing debootstrap"
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap </dev/null >/dev/null ||
			{ apt-get update </dev/null >/dev/null &&
				DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap </dev/null >/dev/null; } ||
			chroot_die "cannot install debootstrap"
	}
	# debootstrap has no script for suites newer than it knows: those
	# (forky, the testing suite after trixie) bootstrap like sid
	if [[ ! -e "/usr/share/debootstrap/scripts/$suite" ]]; then
		script=/usr/share/debootstrap/scripts/sid
	fi
	mirror="$(chroot_mirror)"
	new="$dir.new"
	for d in "$dir" "$new"; do
		if [[ -e "$d" ]]; then
			chroot_mounts_under "$d" && chroot_die "$d has something mounted in it; unmount it first"
			chroot_log "removing $d (stale or broken)"
			rm -rf --one-file-system "$d"
		fi
	done
	mkdir -p "$CHROOT_CACHE"
	local packages t0=$SECONDS
	packages="$(chroot_packages "$major" | tr ' ' ',')"
	chroot_log "debootstrap $suite into $new (takes a minute or two, ~2 GB)"
	# in a private mount namespace: the /proc and /sys that debootstrap mounts
	# go away with it, even if it is interrupted
	if ! unshare --mount --propagation private \
		debootstrap --variant=minbase --include="$packages" "$suite" "$new" "$mirror" ${script:+"$script"} \
		>"$CHROOT_CACHE/debootstrap-$suite.log" 2>&1; then
		tail -n 30 "$CHROOT_CACHE/debootstrap-$suite.log" >&2
		chroot_die "debootstrap $suite failed (log: $CHROOT_CACHE/debootstrap-$suite.log)"
	fi
	# no services start inside (mosquitto's postinst)
	printf '#!/bin/sh\nexit 101\n' >"$new/usr/sbin/policy-rc.d"
	chmod 755 "$new/usr/sbin/policy-rc.d"
	chroot_stamp_text "$suite" "$major" >"$new/.pg_mqtt_emit-stamp"
	mv "$new" "$dir"
	chroot_ok "$suite" "$major" || chroot_die "$dir was created but does not work"
	chroot_log "$dir: created in $((SECONDS - t0)) s ($(chroot "$dir" "/usr/lib/postgresql/$major/bin/pg_config" --version))"
}

# chroot_lock SUITE: take the chroot's lock (fd 9) for the rest of the process.
chroot_lock() {
	mkdir -p "$CHROOT_CACHE"
	exec 9>"$CHROOT_CACHE/chroot-$1.lock"
	if ! flock -n 9; then
		chroot_log "waiting for $CHROOT_CACHE/chroot-$1.lock"
		flock 9
	fi
}

CHROOT_CHILD=""
CHROOT_COPY=""
chroot_cleanup() {
	if [[ -n "$CHROOT_CHILD" ]] && kill -0 "$CHROOT_CHILD" 2>/dev/null; then
		kill -TERM "$CHROOT_CHILD" 2>/dev/null || true
		wait "$CHROOT_CHILD" 2>/dev/null || true
	fi
	# the namespace's mounts are gone with it; these only matter if the
	# namespace could not be made private
	local dir m
	if [[ -n "${CHROOT_DIR:-}" ]]; then
		for m in "$CHROOT_DIR/dev/shm" "$CHROOT_DIR/dev" "$CHROOT_DIR/proc"; do
			if awk -v m="$m" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; then
				umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
			fi
		done
	fi
	if [[ -n "$CHROOT_COPY" && -d "$CHROOT_COPY" ]]; then
		rm -rf --one-file-system "$CHROOT_COPY"
	fi
}

# chroot_run SUITE MAJOR CMD...: CMD as root inside the chroot, in /tmp/…/src
# (a copy of the tree), with PG_CONFIG of MAJOR. Returns CMD's exit status.
chroot_run() {
	local suite="$1" major="$2"; shift 2
	CHROOT_DIR="$(chroot_dir "$suite")"
	chroot_lock "$suite"
	chroot_ensure "$suite" "$major"
	trap chroot_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	# what failed runs kept (test/run.sh keeps its temp dir on failure), after two days
	find "$CHROOT_DIR/tmp" -maxdepth 1 -name 'pg_mqtt_emit_*' -mtime +2 \
		-exec rm -rf --one-file-system {} + 2>/dev/null || true
	CHROOT_COPY="$(mktemp -d "$CHROOT_DIR/tmp/pg_mqtt_emit_src.XXXXXX")"
	# shellcheck source=common.sh
	source "$CHROOT_SCRIPT_DIR/common.sh"
	pm_copy_tree "$CHROOT_ROOT" "$CHROOT_COPY/src"
	local inside="${CHROOT_COPY#"$CHROOT_DIR"}/src"
	local -a envv=(
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
		HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=dumb
		PG_CONFIG="/usr/lib/postgresql/$major/bin/pg_config"
		PG_MAJOR="$major"
	)
	local v
	for v in CI PG_CFLAGS PROVE_FLAGS PG_TEST_TIMEOUT_DEFAULT KEEP_TMP SKIP_DEPS SKIP_BUILD; do
		if [[ -n "${!v+set}" ]]; then envv+=("$v=${!v}"); fi
	done
	local rc=0
	# shellcheck disable=SC2016
	unshare --mount --propagation private -- bash -c '
		set -e
		d="$1"; shift
		mount -t proc proc "$d/proc"
		mount --bind /dev "$d/dev"
		mount -t tmpfs -o mode=1777,size=1g tmpfs "$d/dev/shm"
		exec chroot "$d" "$@"
	' chroot-run "$CHROOT_DIR" /usr/bin/env -i "${envv[@]}" bash -c 'cd "$1" && shift && exec "$@"' run "$inside" "$@" </dev/null &
	CHROOT_CHILD=$!
	wait "$CHROOT_CHILD" || rc=$?
	CHROOT_CHILD=""
	return "$rc"
}

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	cmd="${1:-}"
	case "$cmd" in
		ensure)
			(($# == 3)) || { usage >&2; exit 2; }
			[[ "$(id -u)" -eq 0 ]] || chroot_die "run as root"
			chroot_lock "$2"
			chroot_ensure "$2" "$3" ;;
		run)
			(($# >= 4)) || { usage >&2; exit 2; }
			[[ "$(id -u)" -eq 0 ]] || chroot_die "run as root"
			suite="$2" major="$3"; shift 3
			chroot_run "$suite" "$major" "$@" ;;
		test)
			(($# >= 3)) || { usage >&2; exit 2; }
			[[ "$(id -u)" -eq 0 ]] || chroot_die "run as root"
			suite="$2" major="$3"; shift 3
			chroot_run "$suite" "$major" bash test/run.sh "$@" ;;
		path)
			(($# == 2)) || { usage >&2; exit 2; }
			chroot_dir "$2" ;;
		-h | --help) usage ;;
		*) usage >&2; exit 2 ;;
	esac
fi
