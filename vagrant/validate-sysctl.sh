#!/usr/bin/env bash
# Run the lab on this VM's real (host) namespace before and after applying a
# sysctl file, and keep both results under vagrant/results/<file name>/.
#   sudo validate-sysctl.sh FILE.conf [SCENARIO...]
set -euo pipefail
file=${1:?usage: validate-sysctl.sh FILE.conf [SCENARIO...]}
shift
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(restart-timewait restart-finwait2 connect-exhaustion)
here=$(cd "$(dirname "$0")" && pwd)
project=$(dirname "$here")
portrace="$project/.venv/bin/portrace"
out="$here/results/$(basename "$file" .conf)"
mkdir -p "$out"

run() {  # $1: before | after
    "$portrace" lab "${scenarios[@]}" --host --yes --within 10 \
        --evidence "$out/$1-evidence" | tee "$out/$1.txt"
    "$portrace" lab "${scenarios[@]}" --host --yes --within 10 --json > "$out/$1.json"
}

run before
install -m 0644 "$file" "/etc/sysctl.d/90-portrace-$(basename "$file")"
sysctl --system >/dev/null
run after
echo "validate-sysctl: results in $out (before.txt, after.txt, *.json, *-evidence/)"
