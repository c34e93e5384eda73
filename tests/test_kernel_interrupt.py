"""Interrupts, restarts and dead kernels: a cell cut off midway leaves its step ``interrupted`` (DESIGN.md §3)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from helpers.kernels import (  # noqa: F401 - fixtures
    Kernels,
    check_instance,
    effects,
    kernels_fixture,
    notebook_copy_fixture,
    start_code,
    wait_until,
)
from helpers.outcomes import CELLS, flag_path, outcome_notebook, wait_started


def _flags(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "effects.jsonl.slow", tmp_path / "effects.jsonl.started"


def _steps(events: list[Any], cell: str) -> list[tuple[str, int | None]]:
    return [(e.event, e.attempt) for e in events if e.step_key == f"cell/{cell}@1"]


def test_requested_interrupt_leaves_the_step_interrupted(kernels: Kernels, tmp_path: Path) -> None:
    """Kernel -> Interrupt mid-cell (sync and top-level await): interrupted, and the next run is refused."""
    nb = outcome_notebook(tmp_path)
    store = tmp_path / "store.duckdb"
    slow = flag_path(tmp_path, "slow")
    k = kernels.start()
    k.execute(start_code(nb.path, store, extra="--unordered")).ok()
    nb.run(k, ["setup"])
    for cell in ("sync", "aw"):
        slow.touch()
        msg = k.send(nb.source(cell), cell_id=cell)
        wait_started(tmp_path, cell)
        k.interrupt()
        res = k.collect(msg)
        assert res.status == "error", res
        assert res.ename == ("KeyboardInterrupt" if cell == "sync" else "CancelledError"), res.error_text
        # The traceback ends in the person's code, as without the extension: no frame of ours.
        (error,) = [o for o in res.outputs if o["output_type"] == "error"]
        assert "InterruptWatch" not in "".join(error["traceback"]), error["traceback"]
        slow.unlink()
        # Run All again: refused at the cell with the resolve advice; the body does not run.
        refused = k.execute(nb.source(cell), cell_id=cell)
        assert refused.ename == "StepInterrupted", refused.error_text
        assert f"nbrunbook resolve T1 {cell} --rerun|--done|--skip" in refused.evalue
        assert f"%runbook resolve {cell} --rerun" in refused.evalue
        assert refused.stdout == ""
    k.execute("%runbook resolve sync --rerun --note 'checked'").ok()
    assert k.execute(nb.source("sync"), cell_id="sync").ok().stdout == "sync finished\n"
    k.shutdown()

    lines = effects(tmp_path)
    assert [(e["cell"], e["attempt"]) for e in lines] == [("sync", 1), ("aw", 1), ("sync", 2)]
    assert lines[0]["key"] == lines[2]["key"]  # the retry keeps the idempotency key
    events = check_instance(store, "T1", lines)
    assert _steps(events, "sync") == [("claimed", 1), ("interrupted", 1), ("resolved", 1), ("claimed", 2), ("done", 2)]
    assert _steps(events, "aw") == [("claimed", 1), ("interrupted", 1)]
    assert not [e for e in events if e.event == "failed"]
    for cell, ename in (("sync", "KeyboardInterrupt"), ("aw", "CancelledError")):
        ev = next(e for e in events if e.step_key == f"cell/{cell}@1" and e.event == "interrupted")
        assert ev.payload["reason"] == "interrupt requested"
        assert ev.payload["error"]["type"] == ename


def test_own_keyboard_interrupt_caught_interrupt_and_retry_safe(kernels: Kernels, tmp_path: Path) -> None:
    """Not every KeyboardInterrupt is an interrupt; a retry-safe interrupted cell runs again."""
    nb = outcome_notebook(tmp_path)
    store = tmp_path / "store.duckdb"
    slow = flag_path(tmp_path, "slow")
    k = kernels.start()
    k.execute(start_code(nb.path, store, extra="--unordered")).ok()
    nb.run(k, ["setup"])
    # Raised by the cell's own code, no interrupt requested: an ordinary failure, retried.
    flag_path(tmp_path, "kb").touch()
    res = k.execute(nb.source("kb"), cell_id="kb")
    assert (res.status, res.ename) == ("error", "KeyboardInterrupt")
    flag_path(tmp_path, "kb").unlink()
    assert k.execute(nb.source("kb"), cell_id="kb").ok().stdout == "kb finished\n"
    # An interrupt the cell catches: the cell finished, so the step is done and skipped next time.
    slow.touch()
    msg = k.send(nb.source("caught"), cell_id="caught")
    wait_started(tmp_path, "caught")
    k.interrupt()
    assert k.collect(msg).ok().stdout == "caught\n"
    slow.unlink()
    again = k.execute(nb.source("caught"), cell_id="caught").ok()
    assert again.status_lines and again.stdout == "caught\n"  # replayed, not run
    # Retry-safe: interrupted, then run again on the next execute without asking.
    slow.touch()
    msg = k.send(nb.source("safe"), cell_id="safe")
    wait_started(tmp_path, "safe")
    k.interrupt()
    assert k.collect(msg).ename == "KeyboardInterrupt"
    slow.unlink()
    retried = k.execute(nb.source("safe"), cell_id="safe").ok()
    assert retried.stdout == "safe finished\n" and not retried.status_lines
    k.shutdown()

    lines = effects(tmp_path)
    assert Counter(e["cell"] for e in lines) == {"kb": 2, "caught": 1, "safe": 2}
    events = check_instance(store, "T1", lines)
    assert _steps(events, "kb") == [("claimed", 1), ("failed", 1), ("claimed", 2), ("done", 2)]
    failed = next(e for e in events if e.event == "failed")
    assert failed.payload["error"] == {"type": "KeyboardInterrupt", "message": "raised by the cell"}
    assert _steps(events, "caught") == [("claimed", 1), ("done", 1)]
    assert _steps(events, "safe") == [("claimed", 1), ("interrupted", 1), ("claimed", 2), ("done", 2)]


@pytest.mark.parametrize("now", [False, True], ids=["shutdown-request", "kill"])
def test_restart_during_a_cell_leaves_it_interrupted(kernels: Kernels, tmp_path: Path, now: bool) -> None:
    """Kernel -> Restart mid-cell: never failed, never done; the fresh kernel is refused at the cell."""
    nb = outcome_notebook(tmp_path)
    store = tmp_path / "store.duckdb"
    slow = flag_path(tmp_path, "slow")
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup"])
    slow.touch()
    k.send(nb.source("sync"), cell_id="sync")
    wait_started(tmp_path, "sync")
    # JupyterLab's Restart: KernelManager.restart_kernel (now=False: the shutdown_request path).
    if now:
        k.kill()
    else:
        k.restart()
    slow.unlink()

    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup"])
    refused = k.execute(nb.source("sync"), cell_id="sync")
    assert refused.ename == "StepInterrupted", refused.error_text
    assert "nbrunbook resolve T1 sync --rerun|--done|--skip" in refused.evalue
    assert refused.stdout == ""
    k.shutdown()
    lines = effects(tmp_path)
    assert [e["cell"] for e in lines] == ["sync"]
    events = check_instance(store, "T1", lines)
    assert _steps(events, "sync") == [("claimed", 1), ("interrupted", 1)]


def test_dead_kernel_leaves_an_interrupted_step(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("slow.ipynb")
    store = tmp_path / "store.duckdb"
    slow, started = _flags(tmp_path)
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup"])
    slow.touch()
    k.send(nb.source("s1"), cell_id="s1")
    wait_until(started.exists, "s1 to start")
    k.kill()  # SIGKILL mid-cell: the side effect may or may not have happened

    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup"])
    slow.unlink()
    refused = k.execute(nb.source("s1"), cell_id="s1")
    assert refused.ename == "StepInterrupted"
    assert "nbrunbook resolve T1 s1 --rerun|--done|--skip" in refused.evalue
    assert "%runbook resolve s1 --rerun" in refused.evalue
    assert refused.stdout == ""  # the body did not run
    status = k.execute("%runbook status").ok().stdout
    assert "interrupted" in status
    k.execute("%runbook resolve s1 --rerun --note 'checked the ticket'").ok()
    assert k.execute(nb.source("s1"), cell_id="s1").ok().stdout == "s1 finished\n"

    # A retry-safe cell is retried without asking.
    started.unlink()
    slow.touch()
    k.send(nb.source("s2"), cell_id="s2")
    wait_until(started.exists, "s2 to start")
    k.kill()
    slow.unlink()
    k.execute(start_code(nb.path, store)).ok()
    results = nb.run(k)
    assert all(r.status == "ok" for r in results.values()), {c: r.error_text for c, r in results.items()}
    assert results["s2"].stdout == "s2 finished\n" and not results["s2"].status_lines
    assert results["s1"].status_lines  # done before: skipped
    k.shutdown()

    lines = effects(tmp_path)
    assert Counter(e["cell"] for e in lines) == {"s1": 2, "s2": 2, "s3": 1}
    events = check_instance(store, "T1", lines)
    s1 = [e.event for e in events if e.step_key == "cell/s1@1"]
    assert s1 == ["claimed", "interrupted", "resolved", "claimed", "done"]
    resolved = next(e for e in events if e.event == "resolved")
    assert resolved.payload["decision"] == "rerun" and resolved.payload["note"] == "checked the ticket"
    s2 = [(e.event, e.attempt) for e in events if e.step_key == "cell/s2@1"]
    assert s2 == [("claimed", 1), ("interrupted", 1), ("claimed", 2), ("done", 2)]


def test_headless_rerun_interrupted_option(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("slow.ipynb")
    store = tmp_path / "store.duckdb"
    slow, started = _flags(tmp_path)
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup"])
    slow.touch()
    k.send(nb.source("s1"), cell_id="s1")
    wait_until(started.exists, "s1 to start")
    k.kill()
    slow.unlink()
    # What `nbrunbook run --rerun-interrupted` asks for: interrupted steps are retried.
    attach = (
        "from nbrunbook.kernel_ext import attach\n"
        f"attach(get_ipython(), 'T1', store={str(store)!r}, notebook={str(nb.path)!r}, "
        "options={'mode': 'headless', 'rerun_interrupted': True})"
    )
    assert k.execute(attach, silent=True).status == "ok"
    results = nb.run(k)
    assert all(r.status == "ok" for r in results.values()), {c: r.error_text for c, r in results.items()}
    assert results["s1"].stdout == "s1 finished\n"
    k.shutdown()
    lines = effects(tmp_path)
    events = check_instance(store, "T1", lines)
    assert [(e.event, e.attempt) for e in events if e.step_key == "cell/s1@1"] == [
        ("claimed", 1),
        ("interrupted", 1),
        ("claimed", 2),
        ("done", 2),
    ]


def test_detach_during_a_cell_leaves_it_interrupted(kernels: Kernels, tmp_path: Path) -> None:
    """A claimed cell cut off from its store (detached while it runs) has an unknown outcome: interrupted."""
    cells = {
        "setup": CELLS["setup"],
        "det": 'effect("det")\nfrom nbrunbook.kernel_ext import detach\ndetach(get_ipython())\nprint("detached")',
    }
    nb = outcome_notebook(tmp_path, cells)
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup"])
    assert k.execute(nb.source("det"), cell_id="det").ok().stdout == "detached\n"
    k.execute(start_code(nb.path, store)).ok()
    refused = k.execute(nb.source("det"), cell_id="det")
    assert refused.ename == "StepInterrupted", refused.error_text
    k.shutdown()
    lines = effects(tmp_path)
    events = check_instance(store, "T1", lines)
    assert _steps(events, "det") == [("claimed", 1), ("interrupted", 1)]
    ev = next(e for e in events if e.event == "interrupted")
    assert ev.payload["error"]["message"] == "the instance was detached while the cell ran"
