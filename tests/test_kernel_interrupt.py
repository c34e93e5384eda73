"""Interrupts and dead kernels: a live interrupt is a plain failure, a dead owner an interrupted step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from helpers.kernels import (  # noqa: F401 - fixtures
    Kernels,
    check_instance,
    effects,
    kernels_fixture,
    notebook_copy_fixture,
    start_code,
    wait_until,
)


def _flags(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "effects.jsonl.slow", tmp_path / "effects.jsonl.started"


def test_interrupt_fails_the_cell_and_the_retry_runs(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("slow.ipynb")
    store = tmp_path / "store.duckdb"
    slow, started = _flags(tmp_path)
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup"])
    slow.touch()
    msg = k.send(nb.source("s1"), cell_id="s1")
    wait_until(started.exists, "s1 to start")
    k.interrupt()
    res = k.collect(msg)
    assert res.status == "error" and res.ename == "KeyboardInterrupt"
    slow.unlink()
    again = k.execute(nb.source("s1"), cell_id="s1").ok()
    assert again.stdout == "s1 finished\n"
    # A top-level `await` cell is cancelled by ipykernel, not raised into: still a failure.
    started.unlink()
    slow.touch()
    code = (
        "import asyncio, os\n"
        "effect('aw')\n"
        "open(os.environ['NBRUNBOOK_TEST_EFFECTS'] + '.started', 'w').close()\n"
        "while os.path.exists(os.environ['NBRUNBOOK_TEST_EFFECTS'] + '.slow'):\n"
        "    await asyncio.sleep(0.05)  # wakes the loop, so ipykernel's cancel lands"
    )
    msg = k.send(code, cell_id="aw")
    wait_until(started.exists, "the await cell to start")
    k.interrupt()
    res = k.collect(msg)
    assert res.status == "error", res
    slow.unlink()
    done = k.execute("import asyncio\neffect('aw')\nawait asyncio.sleep(0)\nprint('retried')", cell_id="aw").ok()
    assert done.stdout == "retried\n"
    k.shutdown()
    lines = effects(tmp_path)
    assert [(e["cell"], e["attempt"]) for e in lines] == [("s1", 1), ("s1", 2), ("aw", 1), ("aw", 2)]
    assert lines[0]["key"] == lines[1]["key"]
    events = check_instance(store, "T1", lines)
    s1 = [(e.event, e.attempt) for e in events if e.step_key == "cell/s1@1"]
    assert s1 == [("claimed", 1), ("failed", 1), ("claimed", 2), ("done", 2)]
    failed = next(e for e in events if e.step_key == "cell/s1@1" and e.event == "failed")
    assert failed.payload["error"]["type"] == "KeyboardInterrupt"
    aw = [(e.event, e.attempt) for e in events if e.step_key == "cell/aw@1"]
    assert aw == [("claimed", 1), ("failed", 1), ("claimed", 2), ("done", 2)]


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
