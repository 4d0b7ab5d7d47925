#!/usr/bin/env bash
# Run the lab on this VM's real (host) namespace before and after applying a
# sysctl file, keep both results under vagrant/results/<file name>/, and judge
# after against before with the lab's own rules:
#   sudo [PORTRACE_WITHIN=S] validate-sysctl.sh FILE.conf [SCENARIO...]
# (S: how long a restart may retry, default 20 s: longer than a shortened
# tcp_fin_timeout, or its effect cannot show)
# prints e.g. "against .../before.json: tcp_fin_timeout=15: restart-finwait2
# improved, restart-timewait unchanged" and exits as `portrace lab --baseline`
# does: 0, or 19 when a scenario measured worse (a pipeline's gate).
# With PORTRACE_RESTORE=1 it then puts back what the file changed (the values
# read before, and no /etc/sysctl.d copy), so one VM can validate file after file.
set -euo pipefail
file=${1:?usage: validate-sysctl.sh FILE.conf [SCENARIO...]}
shift
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(restart-timewait restart-finwait2 connect-exhaustion)
here=$(cd "$(dirname "$0")" && pwd)
project=$(dirname "$here")
portrace="$project/.venv/bin/portrace"
out="$here/results/$(basename "$file" .conf)"
within=${PORTRACE_WITHIN:-20}
installed="/etc/sysctl.d/90-portrace-$(basename "$file")"
mkdir -p "$out"
rm -f "$out/before.json" "$out/after.json"
# key=value as they are now, for each key the file sets (sysctl.d(5): "key = value",
# comments after # or ;); sysctl -n separates a vector's values by tabs.
before=()
while read -r key; do
    before+=("$key=$(sysctl -n "$key")")
done < <(sed -e 's/[#;].*//' "$file" | awk -F= 'NF >= 2 { sub(/^[ \t]*-/, "", $1); gsub(/[ \t]/, "", $1); print $1 }')

"$portrace" lab "${scenarios[@]}" --host --yes --within "$within" \
    --evidence "$out/before-evidence" --save "$out/before.json" | tee "$out/before.txt"
install -m 0644 "$file" "$installed"
sysctl --system >/dev/null
status=0
"$portrace" lab "${scenarios[@]}" --host --yes --within "$within" \
    --evidence "$out/after-evidence" --save "$out/after.json" \
    --baseline "$out/before.json" | tee "$out/after.txt" || status=${PIPESTATUS[0]}
echo "validate-sysctl: results in $out (before/after .txt, .json, -evidence/); exit $status"
if [ "${PORTRACE_RESTORE:-0}" = 1 ]; then
    rm -f "$installed"
    for kv in "${before[@]}"; do
        sysctl -q -w "$kv"
        echo "validate-sysctl: restored ${kv%%=*} = $(sysctl -n "${kv%%=*}")"
    done
fi
exit "$status"
