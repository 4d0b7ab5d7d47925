#!/usr/bin/env bash
# Provision portrace on a VM exactly as the README does: `sudo make setup` in
# the checkout (default /vagrant). Also what the Debian VM in CI runs.
set -euo pipefail
project=${1:-/vagrant}
if ! command -v make >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make
fi
start=$(date +%s)
make -C "$project" setup
echo "provision: done in $(( $(date +%s) - start )) s"
