#!/usr/bin/env bash
# install-deps.sh: install what pg_mqtt_emit needs to build, test and demo on Debian 12.
#
# Idempotent: when every package is already installed it does nothing (no apt-get update).
# Must run as root unless everything is already installed.
set -euo pipefail

PACKAGES=(
	make gcc
	postgresql-15 postgresql-server-dev-15 postgresql-15-pgtap
	libtap-parser-sourcehandler-pgtap-perl libipc-run-perl libyaml-libyaml-perl
	mosquitto mosquitto-clients libpaho-mqtt-dev
)

missing=()
for pkg in "${PACKAGES[@]}"; do
	status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
	if [[ "$status" != "install ok installed" ]]; then
		missing+=("$pkg")
	fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
	echo "install-deps: all ${#PACKAGES[@]} packages already installed"
	exit 0
fi

echo "install-deps: missing: ${missing[*]}"
if [[ "$(id -u)" -ne 0 ]]; then
	echo "install-deps: must run as root to install them" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update </dev/null
apt-get install -y --no-install-recommends "${PACKAGES[@]}" </dev/null
echo "install-deps: done"
