"""kill -9 in the middle of a commit stream loses nothing committed and leaves
no partial transaction (DESIGN.md §4, §11). Real subprocesses, real files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.oracle import check_store
from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.model import ClaimOutcome

STREAM = Path(__file__).parent / "helpers" / "commit_stream.py"


def _start(store: Path, n: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(STREAM), str(store), "crash", str(n), *extra],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _verify(store_path: Path, committed: list[str], claimed: list[str]) -> None:
    store = EmbeddedStore(str(store_path))
    try:
        events = check_store(store, "crash")  # seq gap-free, cursor == journal: no partial txn
        done = {e.step_key for e in events if e.event == "done"}
        assert set(committed) <= done, f"lost committed outcomes: {sorted(set(committed) - done)[:5]}"
        for key in committed:
            assert store.values("crash", key), f"values of {key} lost"
        claims = {e.step_key for e in events if e.event == "claimed"}
        assert set(claimed) <= claims
        # The store is usable afterwards: the killed owner's running step (if any)
        # is interrupted for the next claimer, never silently re-run.
        for s in store.steps("crash"):
            if s.status == "running":
                c = store.claim("crash", s.path, owner="next@crash-host:2:def", run_id="run-n", lease=0.001)
                assert c.outcome in (ClaimOutcome.BUSY, ClaimOutcome.INTERRUPTED)
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("trial", range(3))
def test_kill9_mid_stream_loses_nothing_committed(tmp_path: Path, mode: str, trial: int) -> None:
    path = tmp_path / "s.duckdb"
    proc = _start(path, 100_000, mode)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    committed: list[str] = []
    claimed: list[str] = []
    stop_after = random.randint(20, 300)
    for line in proc.stdout:
        kind, _, key = line.strip().partition(" ")
        (committed if kind == "committed" else claimed).append(key)
        if len(committed) >= stop_after:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed += [k.split(" ", 1)[1] for k in proc.stdout.read().splitlines() if k.startswith("committed ")]
    proc.stdout.close()
    _verify(path, committed, claimed)


@pytest.mark.parametrize("point", ["inside_commit", "after_commit"])
def test_crash_points_in_the_writer(tmp_path: Path, point: str) -> None:
    path = tmp_path / "s.duckdb"
    # Die at the 25th commit: creation, then ~12 claim/complete pairs.
    proc = _start(path, 1000, env={"NBRUNBOOK_CRASH_AT": f"{point}:25"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    lines = out.splitlines()
    committed = [line.split()[1] for line in lines if line.startswith("committed ")]
    claimed = [line.split()[1] for line in lines if line.startswith("claimed ")]
    _verify(path, committed, claimed)
    store = EmbeddedStore(str(path))
    try:
        events = store.journal("crash")
        # 25th commit = complete of step 11 (claims and completes alternate after creation).
        done = [e for e in events if e.event == "done"]
        if point == "inside_commit":
            assert len(done) == 11  # the transaction in flight left no trace
        else:
            assert len(done) == 12  # committed, only the reply was lost
    finally:
        store.close()
