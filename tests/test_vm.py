"""Real VMs: Debian 12 (kernel 6.1) and Debian 13 (kernel 6.12), made with
debootstrap (each its stock kernel and the matching headers, so two more
kernel versions in CI), boot under QEMU, are provisioned by
vagrant/provision.sh (the Vagrantfile's script, i.e. the README's
`make setup`), and run `portrace demo` on both engines and a lab comparison.

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

pytestmark = [pytest.mark.vm, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "vagrant" / ".cache"
SUITES = {"bookworm": "6.1.", "trixie": "6.12."}  # Debian release -> its kernel series


def section(console: str, name: str) -> str:
    m = re.search(rf"^=== {re.escape(name)}\r?$(.*?)^=== ", console, re.S | re.M)
    assert m, f"no '=== {name}' section in the console"
    return m.group(1)


@pytest.fixture(scope="module", params=list(SUITES))
def suite(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def console(suite: str) -> str:
    if not (IN_CI or os.environ.get("PORTRACE_VM") == "1"):
        pytest.skip("boots a VM for minutes: runs in CI, or with PORTRACE_VM=1")
    need_root()
    for tool in ("debootstrap", "qemu-system-x86_64", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: make setup-test installs it")
    cache = CACHE / suite
    env = {**os.environ, "PORTRACE_VM_SUITE": suite}
    build = subprocess.run(["bash", "scripts/vm/build-image.sh", str(cache)], cwd=ROOT,
                           capture_output=True, text=True, timeout=3600, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    print(build.stdout)
    boot = subprocess.run(["bash", "scripts/vm/boot.sh", str(cache), "2400"], cwd=ROOT,
                          capture_output=True, text=True, timeout=2700, env=env)
    (cache / "console.log").write_text(boot.stdout)
    assert "=== done" in boot.stdout, boot.stdout[-3000:] + boot.stderr[-2000:]
    return boot.stdout


def test_vm_runs_its_own_kernel_with_matching_headers(console, suite):
    m = re.search(r"=== kernel (\S+) headers (\S+)", console)
    assert m, console[:2000]
    release, headers = m.groups()
    assert release != os.uname().release and release.startswith(SUITES[suite])
    assert headers.startswith("/usr/src/linux-headers-") and release in headers


def test_vm_is_provisioned_by_the_vagrantfile_script(console):
    assert re.search(r"^=== provision-exit 0\r?$", console, re.M), section(console, "provision")
    assert "provision: done in" in section(console, "provision")


def test_vm_demo_diagnoses_both_staged_conflicts(console):
    assert re.search(r"^=== demo-exit 0\r?$", console, re.M), section(console, "demo")
    assert "portrace demo: 2 of 2 staged conflicts diagnosed" in section(console, "demo")
    # The default is the CO-RE engine: the stock kernel has BTF.
    assert "portrace demo: engine core (kernel BTF at" in section(console, "demo")


@pytest.mark.parametrize("engine", ["core", "bcc"])
def test_vm_demo_on_each_engine(console, engine):
    text = section(console, f"demo-{engine}")
    assert re.search(rf"^=== demo-{engine}-exit 0\r?$", console, re.M), text
    assert f"portrace demo: engine {engine} (asked for with --engine {engine})" in text
    assert "portrace demo: 2 of 2 staged conflicts diagnosed" in text


def test_vm_lab_agrees_with_the_kernel(console):
    assert re.search(r"^=== lab-json-exit 0\r?$", console, re.M)
    text = section(console, "lab-json")
    data = json.loads(text[text.index("{"): text.rindex("}") + 1])
    assert data["judged"] == {"restart-timewait": "unchanged", "connect-exhaustion": "improved"}


def test_vm_validates_a_sysctl_file_before_against_after(console):
    """vagrant/validate-sysctl.sh on the VM's own namespace: the lab before,
    the file installed in /etc/sysctl.d, the lab after, judged (issue 12)."""
    text = section(console, "validate-sysctl")
    assert re.search(r"^=== validate-sysctl-exit 0\r?$", console, re.M), text
    assert re.search(r"against \S+/before\.json: tcp_fin_timeout=15: restart-finwait2 "
                     r"improved, restart-timewait unchanged", text), text
