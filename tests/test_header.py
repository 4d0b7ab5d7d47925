"""The numbers shared with the kernel side come from bpf/portrace.h as the C
compiler reads it: each one the reader finds is checked against a program
compiled from that header."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI

from portrace.kernel import header, records


def test_each_number_is_the_compilers(tmp_path: Path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        if IN_CI:
            pytest.fail("no C compiler: make setup-test installs clang")
        pytest.skip("no C compiler")
    found = header.parse((header.bpf_dir() / "portrace.h").read_text())
    assert {"PT_BIND_ERROR", "PT_OPT_V6ONLY", "PT_SRC_KERNEL", "PT_LOST_LIMITED",
            "PT_RATE_NS", "PT_UID_UNKNOWN"} <= set(found)
    prints = "".join(f'printf("{name} %lld\\n", (long long)({name}));\n'
                     for name in found)
    src = tmp_path / "values.c"
    src.write_text(f'#include <stdio.h>\n#include <linux/types.h>\n#include "portrace.h"\n'
                   f"int main(void) {{\n{prints}return 0;\n}}\n")
    subprocess.run([cc, f"-I{header.bpf_dir()}", str(src), "-o", str(tmp_path / "values")],
                   check=True)
    out = subprocess.run([str(tmp_path / "values")], capture_output=True, text=True, check=True)
    assert dict((n, int(v)) for n, v in map(str.split, out.stdout.splitlines())) == found


def test_every_record_kind_is_decoded():
    """A kind added to enum pt_kind without a decoder fails here."""
    assert set(header.enum("pt_kind").values()) == set(records.CALLS) | {records.PT_STATE}


def test_an_enumerator_without_a_value_is_refused():
    with pytest.raises(header.HeaderError, match="PT_B"):
        header.parse("enum pt_x {\n\tPT_A = 1,\n\tPT_B,\n};\n")
    with pytest.raises(header.HeaderError, match="PT_NOPE"):
        header.value("PT_NOPE")
    with pytest.raises(header.HeaderError, match="pt_nope"):
        header.enum("pt_nope")
