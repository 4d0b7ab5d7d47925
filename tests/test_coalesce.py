"""``--coalesce``: a retry loop's identical failures are each either
diagnosed or counted in a ``repeats`` event, never both and never neither;
with 0, each is diagnosed again except those that come while the one before
is being diagnosed (README, --help)."""

from __future__ import annotations

import json

from conftest import READY_TIMEOUT_S, TracerProcess, bpf_unavailable, need_root

from portrace.commands.stage import ScratchNetns, Staged

PORT = 19195  # outside conftest.PORTS: this tracer is the test's own


def test_coalesce_0_diagnoses_a_retry_loop_again_and_counts_the_rest(engine):
    need_root()
    t = TracerProcess([PORT], extra=["--coalesce", "0"], engine=engine)
    try:
        if t.wait_for(lambda e: e["type"] == "ready", timeout=READY_TIMEOUT_S) is None:
            code, err = t.stop()
            bpf_unavailable(f"portrace --engine {engine} exited {code}: {err.strip()[-800:]}")
        with ScratchNetns("portrace-test-coalesce") as ns:
            holder = Staged("listen", "127.0.0.1", PORT, "--hold", name="holder", netns=ns)
            try:
                loop = Staged("restart", "127.0.0.1", PORT, "--every", "0.1", "--within", "2",
                              name="retry-loop", netns=ns)
                attempts = json.loads(loop.info)["attempts"]
                loop.release()
            finally:
                holder.release()

            def accounted() -> int:
                mine = [e for e in t.events if e.get("pid") == loop.pid]
                return sum(e["count"] if e["type"] == "repeats" else e["type"] == "bind_error"
                           for e in mine)

            t.wait_for(lambda _: accounted() >= attempts, timeout=30)
            diagnosed = [e for e in t.events
                         if e["type"] == "bind_error" and e["pid"] == loop.pid]
            assert accounted() == attempts, (accounted(), attempts)
            # The default (1 s) would diagnose 2 or 3 of a 2 s loop; 0 diagnoses
            # every one that does not arrive during the previous diagnosis.
            assert len(diagnosed) >= attempts // 2, (len(diagnosed), attempts)
            assert all(e["verdict"]["cause"] == "listener" for e in diagnosed)
    finally:
        t.stop()
