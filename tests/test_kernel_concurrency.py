"""Two kernels, one instance, the same cell at the same moment: one effect; the other waits and skips.

Two processes share a store file only through the store server (DESIGN.md
§4); the kernels use a plain store path, exactly as a person would.
"""

from __future__ import annotations

import time
from pathlib import Path

from helpers.kernels import (  # noqa: F401 - fixtures
    TIMEOUT,
    Kernel,
    Kernels,
    check_instance,
    effects,
    kernels_fixture,
    notebook_copy_fixture,
    start_code,
    wait_until,
)

RACE = """import os
import time

effect("race")
open(os.environ["NBRUNBOOK_TEST_EFFECTS"] + ".started", "w").close()
while not os.path.exists(os.environ["NBRUNBOOK_TEST_EFFECTS"] + ".release"):
    time.sleep(0.02)
print("ran in", os.getpid())
"""


def _waiting(kernel: Kernel, msg_id: str) -> bool:
    kernel.poll(0.05)
    return "waiting up to" in kernel.streamed(msg_id)


def test_same_cell_in_two_kernels_runs_once(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k1, k2 = kernels.start(), kernels.start()
    for k in (k1, k2):
        k.execute(start_code(nb.path, store, extra="--unordered")).ok()
        nb.run(k, ["setup"])
    m1 = k1.send(RACE, cell_id="race")
    m2 = k2.send(RACE, cell_id="race")
    wait_until((tmp_path / "effects.jsonl.started").exists, "one kernel to claim and run the cell")
    # The other kernel must be seen waiting, visibly, while the winner still runs.
    deadline = time.monotonic() + TIMEOUT
    waiters = []
    while not waiters and time.monotonic() < deadline:
        waiters = [(k, m) for k, m in ((k1, m1), (k2, m2)) if _waiting(k, m)]
    assert len(waiters) == 1, "exactly one kernel waits"
    (tmp_path / "effects.jsonl.release").touch()
    r1, r2 = k1.collect(m1).ok(), k2.collect(m2).ok()
    ran, skipped = (r2, r1) if r1.status_lines else (r1, r2)
    assert ran.stdout.startswith("ran in") and not ran.status_lines
    assert "is running in" in skipped.stderr and "waiting up to" in skipped.stderr
    assert len(skipped.status_lines) == 1 and "already done in run" in skipped.status_lines[0]
    assert skipped.stdout == ran.stdout  # the winner's output, replayed
    assert waiters[0][0] is (k1 if skipped is r1 else k2)
    for k in (k1, k2):
        k.shutdown()
    lines = effects(tmp_path)
    assert [e["cell"] for e in lines] == ["race"]
    events = check_instance(store, "T1", lines)
    assert [e.event for e in events if e.step_key == "cell/race@1"] == ["claimed", "done"]
