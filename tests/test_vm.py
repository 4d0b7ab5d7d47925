"""Real VMs brought up by Vagrant: Debian 12 (kernel 6.1) and Debian 13
(kernel 6.12), made offline with debootstrap (each its stock kernel and the
matching headers, so two more kernel versions in CI) and packed as Vagrant
boxes for libvirt. `vagrant up` of vagrant/Vagrantfile, the user-facing one,
provisions one VM per release with vagrant/provision.sh (the README's `make
setup`); through `vagrant ssh` it runs `portrace demo` on both engines, the
CO-RE engine's port lookup on each kernel's hash layouts and a lab
comparison, then vagrant/validate-sysctl.sh judges each sysctl file before
against after, putting back what each changed before the next
(scripts/vm/vagrant-run.sh).

Runs in CI; elsewhere only with PORTRACE_VM=1 (it takes minutes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI, need_root

from portrace.kernel import capabilities

pytestmark = [pytest.mark.vm, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "vagrant" / ".cache"
SUITES = {"bookworm": "6.1.", "trixie": "6.12."}  # Debian release -> its kernel series
VM = "fin-timeout"  # the Vagrantfile's VM for the first file, which validates every file
FILES = {"fin-timeout": "net.ipv4.tcp_fin_timeout", "tw-reuse": "net.ipv4.tcp_tw_reuse"}
TOOLS = ("debootstrap", "mkfs.ext4", "qemu-img", "vagrant", "virsh", "libvirtd")


def section(console: str, name: str) -> str:
    m = re.search(rf"^=== {re.escape(name)}$(.*?)^=== {re.escape(name)}-exit (\d+)$",
                  console, re.S | re.M)
    assert m, f"no '=== {name}' section in the console"
    assert m.group(2) == "0", f"{name} exited {m.group(2)}:\n{m.group(1)[-3000:]}"
    return m.group(1)


@pytest.fixture(scope="module", params=list(SUITES))
def suite(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def console(suite: str) -> str:
    if not (IN_CI or os.environ.get("PORTRACE_VM") == "1"):
        pytest.skip("boots VMs for minutes: runs in CI, or with PORTRACE_VM=1")
    need_root()
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: make setup-test installs it")
    cache = CACHE / suite
    env = {**os.environ, "PORTRACE_VM_SUITE": suite}
    build = subprocess.run(["bash", "scripts/vm/build-image.sh", str(cache)], cwd=ROOT,
                           capture_output=True, text=True, timeout=3600, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    print(build.stdout)
    run = subprocess.run(["bash", "scripts/vm/vagrant-run.sh", str(cache)], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600, env=env)
    (cache / "console.log").write_text(run.stdout + run.stderr)
    assert "=== done" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    return run.stdout


def test_vagrant_up_boots_the_box_and_provisions_it_with_make_setup(console, suite):
    up = section(console, f"up-{VM}")
    assert f"Bringing machine '{VM}' up with 'libvirt' provider..." in up
    assert f"Base box:          portrace/debian-{suite}" in up
    assert "Rsyncing folder:" in up and "Running provisioner: shell..." in up
    assert "setup: ready: .venv/bin/portrace" in up and "provision: done in" in up
    m = re.search(r"kernel (\S+) headers (\S+)", section(console, "kernel"))
    assert m, section(console, "kernel")
    release, headers = m.groups()
    assert release != os.uname().release and release.startswith(SUITES[suite])
    assert headers.startswith("/usr/src/linux-headers-") and release in headers
    assert "Removing domain..." in section(console, "destroy")


def test_vm_sshd_never_shuts_the_host_out(console):
    """QEMU's user networking makes every connection from the host come from
    10.0.2.2, and OpenSSH 9.8+ penalises a source as a whole
    (PerSourcePenalties): the box exempts it (build-image.sh). 40 connections
    closed before authenticating, then one ssh, not retried, still gets in."""
    text = section(console, "ssh-penalty")
    assert "ssh after 40 unauthenticated connections: ok (OpenSSH_" in text, text


def test_vm_demo_diagnoses_both_staged_conflicts_on_each_engine(console):
    demo = section(console, "demo")
    assert "portrace demo: 2 of 2 staged conflicts diagnosed" in demo
    # The default is the CO-RE engine: the stock kernel has BTF.
    assert "portrace demo: engine core (kernel BTF at" in demo
    bcc = section(console, "demo-bcc")
    assert "portrace demo: engine bcc (asked for with --engine bcc)" in bcc
    assert "portrace demo: 2 of 2 staged conflicts diagnosed" in bcc


# The hash layouts each release's kernel has (kernel/core.py: walk_port): TCP's
# bind bucket lists its sockets itself on 6.1 (tb->owners), through per-address
# buckets on 6.12 (bhash2); UDP's table is per netns only from 6.2.
UDP_PATH = {"bookworm": "iterators", "trixie": "udp_hash"}


def test_vm_lookup_walks_the_ports_own_bucket_on_each_kernel(console, suite):
    rows = {r["protocol"]: r for r in map(json.loads, (
        line for line in section(console, "lookup").splitlines() if line.startswith("{")))}
    assert set(rows) == {"tcp", "udp"}, rows
    for r in rows.values():
        assert r["kernel"].startswith(SUITES[suite]), r
        # Debian's kernels have BPF trampolines: only bind/listen/connect pay.
        assert r["probes"] == "fexit" and r["left_out"] == {}, r
        assert r["same"], f"the walk and the iterators disagree: {r}"
        assert r["sockets"] == 2 and r["source"]["holders"] == "binder", r
    assert rows["tcp"]["source"]["sockets"] == {"tcp": "bind_hash"}, rows["tcp"]
    assert rows["udp"]["source"]["sockets"] == {"udp": UDP_PATH[suite]}, rows["udp"]
    if UDP_PATH[suite] == "iterators":
        assert "udp_table" in rows["udp"]["source"]["fallback"], rows["udp"]
    else:
        assert rows["udp"]["source"]["fallback"] is None, rows["udp"]
    demo = section(console, "demo")
    assert "sockets from the port's bind-hash bucket" in demo
    assert "sockets from sock_diag" in section(console, "demo-bcc")


def test_vm_recorder_unit_runs_as_its_own_user_with_only_its_capabilities(console):
    """systemd/portrace-record.service under the VM's systemd: DynamicUser=,
    AmbientCapabilities= and nothing else; it records a staged conflict with
    its blocker named (scripts/vm/unit.sh)."""
    text = section(console, "unit")
    assert "=== unit-exit 0" in console, text[-1500:]
    [row] = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    unit = (ROOT / "systemd" / "portrace-record.service").read_text()
    granted = next(line.split("=", 1)[1].split() for line in unit.splitlines()
                   if line.startswith("AmbientCapabilities="))
    assert row["uid"] != 0, row
    assert int(row["cap_eff"], 16) == sum(1 << capabilities.BY_NAME[c].number
                                          for c in granted), row
    assert row["engine"] == "core" and row["probes"] == "fexit", row
    assert row["cause"] == "listener" and row["holders"] == ["python3"], row
    assert set(row["left_out"]) == {"CAP_SYS_ADMIN"}, row
    assert "Overall exposure level for portrace-record.service" in text, text[-600:]


def test_vm_lab_agrees_with_the_kernel(console):
    text = section(console, "lab-json")
    data = json.loads(text[text.index("{"): text.rindex("}") + 1])
    assert data["judged"] == {"restart-timewait": "unchanged", "connect-exhaustion": "improved"}


def judged(console: str, suite: str, name: str) -> tuple[str, dict[str, str], dict[str, list[str]]]:
    """validate-sysctl's printed verdict line for one sysctl file, and its
    after.json as copied back."""
    text = section(console, f"validate-{name}")
    section(console, f"results-{name}")
    [line] = re.findall(r"^portrace lab: against \S+/before\.json: .*$", text, re.M)
    after = json.loads((CACHE / suite / "results" / name / "after.json").read_text())
    return line, after["judged"], after["why"]


def test_vm_validate_puts_back_what_each_file_changed(console, suite):
    """The one VM validates file after file: each file's key returns to the
    value read before it (the VM's own default), and the next file's
    baseline ran with it."""
    defaults = {"net.ipv4.tcp_fin_timeout": "60", "net.ipv4.tcp_tw_reuse": "2"}
    for name, key in FILES.items():
        text = section(console, f"validate-{name}")
        restored = re.findall(rf"^validate-sysctl: restored {re.escape(key)} = (\S+)$", text, re.M)
        assert restored == [defaults[key]], text[-2000:]
    before = json.loads((CACHE / suite / "results" / "tw-reuse" / "before.json").read_text())
    assert {r["sysctls"]["net.ipv4.tcp_fin_timeout"] for r in before["runs"]} == {"60"}


def test_vm_fin_timeout_shortens_the_finwait2_restart_only(console, suite):
    """tcp_fin_timeout = 15 after the VM's own 60: an orphaned FIN_WAIT2 goes
    sooner (tcp_fin_time); TIME_WAIT stays 60 s (TCP_TIMEWAIT_LEN)."""
    line, verdicts, why = judged(console, suite, "fin-timeout")
    assert line.endswith(": tcp_fin_timeout=15: restart-timewait unchanged, restart-finwait2 "
                         "improved, connect-exhaustion unchanged"), line
    assert verdicts == {"restart-timewait": "unchanged", "restart-finwait2": "improved",
                        "connect-exhaustion": "unchanged"}
    assert any("TIME_WAIT lasts 60 s" in w for w in why["restart-timewait"])
    assert any("orphaned FIN_WAIT2 lives" in w for w in why["restart-finwait2"])


def test_vm_tw_reuse_1_after_the_default_2_changes_nothing_on_loopback(console, suite):
    """tcp_tw_reuse = 1 after the VM's own 2: no restart moves (bind() never
    reads it), and the lab's loopback connect() neither (2 already covers
    loopback: tcp_twsk_unique); each verdict says why."""
    line, verdicts, why = judged(console, suite, "tw-reuse")
    assert line.endswith(": tcp_tw_reuse=1: restart-timewait unchanged, restart-finwait2 "
                         "unchanged, connect-exhaustion unchanged"), line
    assert set(verdicts.values()) == {"unchanged"}
    assert all(any("only connect() does" in w for w in why[s])
               for s in ("restart-timewait", "restart-finwait2"))
    assert any("tcp_tw_reuse = 2 already lets connect() take over a TIME_WAIT 4-tuple" in w
               for w in why["connect-exhaustion"])
