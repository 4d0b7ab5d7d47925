#!/usr/bin/env bash
# In a VM, as root: the flight recorder's systemd unit as shipped
# (systemd/portrace-record.service), run by the VM's systemd: a user of its own
# (DynamicUser=) holding only its AmbientCapabilities=. One conflict is staged on
# its port; what the service recorded is printed as one JSON line (asserted by
# tests/test_vm.py), then `systemd-analyze security`'s verdict on the unit.
set -euo pipefail
port=9310
unit=/etc/systemd/system/portrace-record.service
# The service's own user must reach the checkout, as it reaches /opt/portrace
# (README): CI clones into a 0700 directory, and rsync keeps that mode.
chmod o+x /vagrant
sed 's#/opt/portrace/.venv/bin/portrace#/vagrant/.venv/bin/portrace#' \
    /vagrant/systemd/portrace-record.service > "$unit"
echo "PORTRACE_PORTS=$port" > /etc/default/portrace-record
systemctl daemon-reload
systemctl start portrace-record
trap 'systemctl stop portrace-record; rm -f "$unit" /etc/default/portrace-record; systemctl daemon-reload' EXIT
evidence=/var/lib/portrace
ready=0
for _ in $(seq 120); do
    grep -qs '"type":"ready"' "$evidence"/*.jsonl && { ready=1; break; }
    sleep 0.5
done
if [ "$ready" -eq 0 ]; then
    echo "unit: no ready event in $evidence after 60 s"
    systemctl status --no-pager portrace-record || true
    journalctl -u portrace-record --no-pager -o cat | tail -n 30
    exit 1
fi
pid=$(systemctl show -p MainPID --value portrace-record)
python3 - "$port" <<'EOF'
import socket, sys, time
port = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen()
late = socket.socket()
try:
    late.bind(("127.0.0.1", port))
except OSError as exc:
    print(f"staged: {exc.strerror}", flush=True)
time.sleep(3)
EOF
python3 - "$pid" "$evidence" <<'EOF'
import glob, json, sys
pid, evidence = int(sys.argv[1]), sys.argv[2]
status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
events = [json.loads(line) for f in sorted(glob.glob(f"{evidence}/*.jsonl")) for line in open(f)]
ready = next((e for e in events if e["type"] == "ready"), {})
failure = next((e for e in events if e["type"] == "bind_error"), None)
blockers = failure["blockers"] if failure else []
print(json.dumps({
    "uid": int(status["Uid"].split()[0]), "cap_eff": status["CapEff"].strip(),
    "engine": ready.get("engine"), "probes": ready.get("probes"),
    "left_out": ready.get("left_out"),
    "cause": failure and failure["verdict"]["cause"],
    "holders": [p["comm"] for b in blockers for p in b["processes"]],
}))
EOF
systemd-analyze security portrace-record --no-pager | tail -n 1
