"""Build hook: a wheel carries the CO-RE engine's compiled object.

Everything else about the package is in pyproject.toml. ``build_py`` first
runs ``make core-object`` (clang, libbpf-dev), so ``bpf/core.bpf.o`` exists
when the package data (``src/portrace/bpf -> ../../bpf``) is copied; where it
is already built and current, make does nothing and needs no compiler.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithCoreObject(build_py):
    def run(self) -> None:
        subprocess.run(["make", "-s", "-C", str(ROOT), "core-object"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildPyWithCoreObject})
