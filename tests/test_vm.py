"""A real VM: Debian stable made with debootstrap (its stock kernel and the
matching headers, so a second kernel version in CI) boots under QEMU, is
provisioned by vagrant/provision.sh (the Vagrantfile's script, i.e. the
README's `make setup`), and runs `portrace demo` and a lab comparison.

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

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "vagrant" / ".cache"


def section(console: str, name: str) -> str:
    m = re.search(rf"^=== {re.escape(name)}\r?$(.*?)^=== ", console, re.S | re.M)
    assert m, f"no '=== {name}' section in the console"
    return m.group(1)


@pytest.fixture(scope="module")
def console() -> str:
    if not (IN_CI or os.environ.get("PORTRACE_VM") == "1"):
        pytest.skip("boots a VM for minutes: runs in CI, or with PORTRACE_VM=1")
    need_root()
    for tool in ("debootstrap", "qemu-system-x86_64", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: make setup-test installs it")
    build = subprocess.run(["bash", "scripts/vm/build-image.sh", str(CACHE)], cwd=ROOT,
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout + build.stderr
    print(build.stdout)
    boot = subprocess.run(["bash", "scripts/vm/boot.sh", str(CACHE), "2400"], cwd=ROOT,
                          capture_output=True, text=True, timeout=2700)
    (CACHE / "console.log").write_text(boot.stdout)
    assert "=== done" in boot.stdout, boot.stdout[-3000:] + boot.stderr[-2000:]
    return boot.stdout


def test_vm_runs_its_own_kernel_with_matching_headers(console):
    m = re.search(r"=== kernel (\S+) headers (\S+)", console)
    assert m, console[:2000]
    release, headers = m.groups()
    assert release != os.uname().release  # a second kernel version
    assert headers.startswith("/usr/src/linux-headers-") and release in headers


def test_vm_is_provisioned_by_the_vagrantfile_script(console):
    assert re.search(r"^=== provision-exit 0\r?$", console, re.M), section(console, "provision")
    assert "provision: done in" in section(console, "provision")


def test_vm_demo_diagnoses_both_staged_conflicts(console):
    assert re.search(r"^=== demo-exit 0\r?$", console, re.M), section(console, "demo")
    assert "portrace demo: 2 of 2 staged conflicts diagnosed" in section(console, "demo")


def test_vm_lab_agrees_with_the_kernel(console):
    assert re.search(r"^=== lab-json-exit 0\r?$", console, re.M)
    text = section(console, "lab-json")
    data = json.loads(text[text.index("{"): text.rindex("}") + 1])
    assert data["judged"] == {"restart-timewait": "unchanged", "connect-exhaustion": "improved"}
