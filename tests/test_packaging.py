"""The wheel carries the CO-RE engine's object, built by the wheel build
itself (setup.py's build_py hook) when the tree has none."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".venv", ".git", "vagrant", "*.o", "__pycache__",
                                 "*.egg-info", "build")


@pytest.mark.root  # clang and libbpf-dev build the object: what `sudo make setup` installs
def test_wheel_builds_and_carries_the_core_object(tmp_path: Path):
    tree = tmp_path / "portrace"
    shutil.copytree(ROOT, tree, ignore=IGNORED, symlinks=True)
    assert not (tree / "bpf" / "core.bpf.o").exists()
    out = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(out), str(tree)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [wheel] = out.glob("portrace-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "portrace/bpf/core.bpf.o" in names
    assert {"portrace/bpf/bcc.bpf.c", "portrace/bpf/portrace.h",
            "portrace/bpf/calls.h"} <= set(names)  # the bcc engine compiles these


@pytest.mark.root  # pipx and the OS's bcc/libbpf: what `sudo make setup-test` installs
def test_pipx_install_gives_a_working_portrace(tmp_path: Path):
    """The README's `pipx install --system-site-packages .`: the OS's bcc and
    libbpf, the wheel's CO-RE object; --version, check and completion work."""
    from importlib.metadata import version

    env = {**os.environ, "PIPX_HOME": str(tmp_path / "pipx"),
           "PIPX_BIN_DIR": str(tmp_path / "bin")}
    r = subprocess.run(["pipx", "install", "--system-site-packages", str(ROOT)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    exe = str(tmp_path / "bin" / "portrace")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"portrace {version('portrace')}"
    if os.geteuid() == 0:
        free = subprocess.run([exe, "check", "--json", "--engine", "core", "19299"],
                              capture_output=True, text=True, timeout=60)
        assert free.returncode == 0 and json.loads(free.stdout)["engine"] == "core", free.stderr
    words = subprocess.run([exe], env={**env, "COMP_WORDS": "portrace ch", "COMP_CWORD": "1",
                                       "_PORTRACE_COMPLETE": "bash_complete"},
                           capture_output=True, text=True, timeout=60)
    assert words.stdout.split() == ["plain,check"]
