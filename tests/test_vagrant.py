"""The Vagrantfile is valid, and the provisioning scripts are the README's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI

VAGRANT = Path(__file__).resolve().parents[1] / "vagrant"


def test_vagrantfile_validates():
    if shutil.which("vagrant") is None:
        if IN_CI:
            pytest.fail("vagrant missing: make setup-test installs it")
        pytest.skip("vagrant not installed")
    # VirtualBox cannot run here (libvirt does: tests/test_vm.py brings the
    # VMs up); validate the file whatever the provider.
    r = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "validated successfully" in r.stdout, r.stdout + r.stderr


def test_provisioning_is_the_readme_setup():
    script = (VAGRANT / "provision.sh").read_text()
    assert 'make -C "$project" setup' in script
    readme = (VAGRANT.parent / "README.md").read_text()
    assert "sudo make demo" in readme and "make setup" in readme
