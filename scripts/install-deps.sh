#!/usr/bin/env bash
# install-deps.sh: install what pg_mqtt_emit needs to build, test and demo on
# Debian 12 or 13.
# (rabbitmq-server: test/t/062_rabbitmq.pl starts a node of its own; nothing starts on install.)
#
# The PostgreSQL major version: $PG_MAJOR, else that of $PG_CONFIG, else the
# one the Debian release ships (12: 15, 13: 17; see pm_pg_major in common.sh).
# Idempotent: when every package is already installed it does nothing (no apt-get update).
# Must run as root unless everything is already installed.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PACKAGES=(
	make gcc
	"postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR" "postgresql-$PG_MAJOR-pgtap"
	libtap-parser-sourcehandler-pgtap-perl libipc-run-perl libyaml-libyaml-perl
	mosquitto mosquitto-clients libpaho-mqtt-dev
	rabbitmq-server
)

missing=()
for pkg in "${PACKAGES[@]}"; do
	status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
	if [[ "$status" != "install ok installed" ]]; then
		missing+=("$pkg")
	fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
	echo "install-deps: all ${#PACKAGES[@]} packages already installed (PostgreSQL $PG_MAJOR)"
	exit 0
fi

echo "install-deps: PostgreSQL $PG_MAJOR; missing: ${missing[*]}"
if [[ "$(id -u)" -ne 0 ]]; then
	echo "install-deps: must run as root to install them" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update </dev/null
apt-get install -y --no-install-recommends "${PACKAGES[@]}" </dev/null
echo "install-deps: done"
