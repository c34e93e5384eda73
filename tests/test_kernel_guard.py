"""The run-once cell guard on real kernels: claim, skip + replay, restore, resume.

Oracles: the store's journal/cursor invariants and an effects file each
guarded cell appends to (one JSON line with its idempotency key).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from helpers.kernels import (  # noqa: F401 - fixtures
    Kernels,
    check_instance,
    effects,
    kernels_fixture,
    notebook_copy_fixture,
    start_code,
)
from nbrunbook.engine.factory import open_store


def test_fail_restart_resume_runs_each_effect_once(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()

    first = nb.run(k)  # Run All stops at the failing cell
    assert list(first) == ["setup", "a", "b", "c"]
    assert first["c"].status == "error" and first["c"].ename == "RuntimeError", first["c"].error_text
    assert first["a"].stdout == "hello from a\n"

    k.restart()
    started = k.execute(start_code(nb.path, store)).ok()
    assert "resumed instance T1" in started.stdout and "2/5 steps done, 1 failed" in started.stdout

    second = nb.run(k)
    assert all(r.status == "ok" for r in second.values()), {c: r.error_text for c, r in second.items()}
    # Skipped cells show their recorded outputs again, with one status line each.
    assert second["a"].stdout == "hello from a\n"
    assert len(second["a"].status_lines) == 1 and "already done in run" in second["a"].status_lines[0]
    assert "restored x" in second["a"].status_lines[0]
    assert [d["data"]["text/html"] for d in second["b"].displays] == ["<b>bold b</b>"]
    assert second["c"].stdout == "c passed on attempt 2\n"
    assert second["d"].result == {"text/plain": "84"}
    assert second["e"].stdout == "awaited 85\n"
    # Variables of skipped cells are restored.
    assert k.value("[x, y, z, w]") == [41, 42, 84, 85]

    third = nb.run(k)  # everything is done now: nothing runs, everything replays
    assert all(r.status == "ok" for r in third.values())
    assert third["d"].result == {"text/plain": "84"} and third["d"].status_lines
    assert third["c"].stdout == "c passed on attempt 2\n"
    assert third["e"].stdout == "awaited 85\n"
    k.shutdown()

    lines = effects(tmp_path)
    per_cell = Counter(e["cell"] for e in lines)
    assert per_cell == {"a": 1, "b": 1, "c": 2, "d": 1, "e": 1}
    c_lines = [e for e in lines if e["cell"] == "c"]
    assert [e["attempt"] for e in c_lines] == [1, 2]
    assert c_lines[0]["key"] == c_lines[1]["key"] and c_lines[0]["step_key"] == "cell/c@1"
    assert c_lines[0]["pid"] != c_lines[1]["pid"]  # the retry ran in the restarted kernel
    events = check_instance(store, "T1", lines)
    assert [e.event for e in events if e.step_key == "cell/c@1"] == ["claimed", "failed", "claimed", "done"]
    failed = next(e for e in events if e.event == "failed")
    assert failed.payload["error"] == {"type": "RuntimeError", "message": "boom in c"}


def test_context_matches_the_claim(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store, extra="-p region eu -p size 3")).ok()
    nb.run(k, ["setup"])
    res = k.execute(
        "ctx = rb.context()\nprint(ctx.instance_id, ctx.step_key, ctx.invocation, ctx.attempt, ctx.epoch, "
        "dict(ctx.params), ctx.run_id.startswith('run-'), len(ctx.idempotency_key))",
        cell_id="ctx-cell",
    ).ok()
    assert res.stdout == "T1 cell/ctx-cell@1 1 1 1 {'region': 'eu', 'size': 3} True 32\n"
    assert "not in the pinned runbook" in res.stderr  # a cell added after start is still a step
    # Outside a step (unguarded: an always cell) there is no context.
    res = k.execute("import nbrunbook as rb\ntry:\n    rb.context()\nexcept rb.RunbookError as e:\n    print('none')")
    assert res.ok().stdout == "none\n"
    # Parameters are in the namespace.
    assert k.value("[region, size]") == ["eu", 3]


def test_always_and_parameters_cells_rerun(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("kinds.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store, extra="-p env prod")).ok()
    for _ in range(2):
        res = nb.run(k)
        assert all(r.status == "ok" for r in res.values()), {c: r.error_text for c, r in res.items()}
        assert res["k-always-tag"].stdout == "tagged always\n" and not res["k-always-tag"].status_lines
        assert res["k-always-dir"].stdout == "directive always\n"
        # The instance's parameters override the parameters cell's defaults (papermill semantics).
        assert k.value("[env, size]") == ["prod", 1]
    assert res["k-guarded"].stdout == "guarded prod 1\n" and res["k-guarded"].status_lines  # replayed
    # save=obj:pickle restores a non-JSON value; an unsaveable implicit value is named on skip.
    k.restart()
    k.execute(start_code(nb.path, store, extra="-p env prod")).ok()
    res = nb.run(k, ["k-imports", "k-params", "k-save"])
    line = res["k-save"].status_lines[0]
    assert "restored" in line and "obj" in line and "items" in line and "saved_list" in line
    assert "not restored: unsaved (" in line
    assert k.value("[obj == {1: 'non-string key'}, items, saved_list]") == [True, [3], [1, [2, 3]]]
    assert k.value("type(saved_list[1]).__name__") == "tuple"
    k.execute("%runbook stop").ok()
    with open_store(store) as s:
        rows = {st.path for st in s.steps("T1")}
    assert rows == {"cell/k-guarded", "cell/k-save"}  # always/parameters cells are never claimed


def test_edit_after_done_warns_and_skips(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup", "a"])
    edited = k.execute('effect("a")\nprint("edited a")\nx = 1000', cell_id="a").ok()
    assert edited.stdout == "hello from a\n"  # the recorded run is shown, the new code did not run
    (status,) = edited.status_lines  # the warning is part of the skip's status, not of the cell's streams
    assert "changed since it ran" in status and "%runbook rerun a" in status and edited.stderr == ""
    assert k.value("x") == 41
    # %runbook rerun opens a new invocation: new step key, new idempotency key.
    k.execute("%runbook rerun a").ok()
    again = k.execute('effect("a")\nprint("edited a")\nx = 1000', cell_id="a").ok()
    assert again.stdout == "edited a\n" and not again.status_lines
    assert k.value("x") == 1000
    k.shutdown()
    lines = effects(tmp_path)
    assert [(e["step_key"], e["attempt"]) for e in lines] == [("cell/a@1", 1), ("cell/a@2", 1)]
    assert lines[0]["key"] != lines[1]["key"]
    check_instance(store, "T1", lines)


def test_order_enforced_unless_unordered(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup", "a"])
    res = k.execute(nb.source("d"), cell_id="d")
    assert res.status == "error" and res.ename == "OrderViolation"
    assert "'effect(\"b\")' [b]" in res.evalue and "[c]" in res.evalue and "--unordered" in res.evalue
    assert "[a]" not in res.evalue
    # A new unordered instance lets the same cell run first.
    k.execute(start_code(nb.path, store, instance="T2", extra="--unordered")).ok()
    nb.run(k, ["setup"])
    k.execute("x = 1; y = 2", cell_id="pre").ok()
    assert k.execute(nb.source("d"), cell_id="d").ok().result == {"text/plain": "4"}
    k.shutdown()
    lines = effects(tmp_path)
    assert [(e["instance"], e["cell"]) for e in lines] == [("T1", "a"), ("T2", "d")]
    check_instance(store, "T1", [e for e in lines if e["instance"] == "T1"])
    check_instance(store, "T2", [e for e in lines if e["instance"] == "T2"])


def test_capture_empty_and_comment_cells(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store, extra="--unordered")).ok()
    nb.run(k, ["setup"])
    capture = '%%capture captured\neffect("cap")\nprint("swallowed")\nget_ipython().run_cell("print(1)")'
    for _ in range(2):
        res = k.execute(capture, cell_id="cap").ok()
        assert res.stdout == ""
    assert k.value("'swallowed' in captured.stdout") is True  # captured on the first run, in this kernel
    for _ in range(2):
        assert k.execute("", cell_id="empty").ok().outputs == []
        assert k.execute("# only a comment", cell_id="comment").ok().outputs == []
        assert k.execute("   \n\n", cell_id="blank").ok().outputs == []
    # A syntax error in a claimed cell is a failure of that attempt; fixed, it runs.
    assert k.execute("effect('syn')\n1 +", cell_id="syn").ename == "SyntaxError"
    k.execute("effect('syn')", cell_id="syn").ok()
    k.shutdown()
    lines = effects(tmp_path)
    assert [e["cell"] for e in lines] == ["cap", "syn"]
    events = check_instance(store, "T1", lines)
    paths = {e.step_key for e in events if e.step_key}
    assert paths == {"cell/cap@1", "cell/syn@1"}
    syn = [(e.event, e.attempt) for e in events if e.step_key == "cell/syn@1"]
    assert syn == [("claimed", 1), ("failed", 1), ("claimed", 2), ("done", 2)]


def test_cells_without_ids_fall_back_to_source(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    k.execute(nb.source("setup")).ok()
    first = k.execute(nb.source("a")).ok()  # no cellId: matched by source hash
    assert "matched to the runbook by their source" in first.stderr
    again = k.execute(nb.source("a")).ok()
    assert again.status_lines and "matched" not in again.stderr  # the notice is shown once
    scratch = k.execute("print('scratch', x)").ok()  # not in the runbook and no id: runs, unguarded
    assert scratch.stdout == "scratch 41\n" and "ran unguarded" in scratch.stderr
    k.shutdown()
    events = check_instance(store, "T1", effects(tmp_path))
    assert {e.step_key for e in events if e.step_key} == {"cell/a@1"}


def test_headless_attach_api_with_tags(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    """What the runner does: attach through the Python API, send ids and tags as metadata."""
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    setup = (
        "from nbrunbook.kernel_ext import attach\n"
        f"attach(get_ipython(), 'H1', store={str(store)!r}, notebook={str(nb.path)!r}, params={{'n': 1}}, "
        "options={'mode': 'headless', 'on_changed': 'error'})"
    )
    assert k.execute(setup, silent=True).status == "ok"
    for _ in range(2):  # the runner's injected-parameters cell runs every time, unclaimed
        injected = k.execute("n = 1\nprint('injected', n)", cell_id="injected-parameters", tags=["injected-parameters"])
        assert injected.ok().stdout == "injected 1\n" and not injected.status_lines
    results = nb.run(k, ["setup", "a"])
    assert results["a"].ok().stdout == "hello from a\n"
    changed = k.execute('effect("a")\nprint("changed")', cell_id="a")
    assert changed.ename == "SourceChanged" and "--on-changed rerun|skip" in changed.evalue
    for _ in range(2):  # a tag sent in the metadata makes an unknown cell `always`
        tagged = k.execute("print('by tag')", cell_id="tagged", tags=["runbook:always"]).ok()
        assert tagged.stdout == "by tag\n" and "not in the pinned runbook" not in tagged.stderr
    res = k.execute("from nbrunbook.kernel_ext import detach\ndetach(get_ipython()).instance_id", silent=True)
    assert res.status == "ok"
    k.shutdown()
    lines = effects(tmp_path)
    assert [e["cell"] for e in lines] == ["a"]
    events = check_instance(store, "H1", lines)
    attached = next(e for e in events if e.event == "kernel_attached")
    assert attached.payload["mode"] == "headless"


def test_fenced_outcome_is_reported_at_the_next_cell(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store, extra="--unordered")).ok()
    nb.run(k, ["setup"])
    # The store declares this kernel gone while the cell runs (what a store server does when
    # it loses the kernel's connection): the claim is interrupted, the outcome must be fenced.
    gone = (
        "from nbrunbook.kernel_ext import current\n"
        "s = current(get_ipython())\n"
        "effect('gone')\n"
        "s.store.release_owner(s.owner, reason='test: declared gone', run_id=s.run_id)\n"
        "print('finished anyway')"
    )
    assert k.execute(gone, cell_id="gone").ok().stdout == "finished anyway\n"
    after = k.execute("effect('next')", cell_id="next").ok()
    assert "the outcome of gone was not recorded (fenced:" in after.stderr
    refused = k.execute(gone, cell_id="gone")
    assert refused.ename == "StepInterrupted"
    k.shutdown()
    events = check_instance(store, "T1", effects(tmp_path))
    assert [e.event for e in events if e.step_key == "cell/gone@1"] == ["claimed", "interrupted", "fenced"]


def test_saved_notebook_is_repinned(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup", "a", "b"])
    assert k.execute(nb.source("d"), cell_id="d").ename == "OrderViolation"  # c is missing
    # The person deletes cell c in JupyterLab and saves: the runbook is re-pinned, d may run.
    data = json.loads(nb.path.read_text())
    data["cells"] = [c for c in data["cells"] if c.get("id") != "c"]
    nb.path.write_text(json.dumps(data))
    res = k.execute(nb.source("d"), cell_id="d").ok()
    assert res.result == {"text/plain": "84"} and "pinned runbook manifest version 2" in res.stderr
    k.shutdown()
    events = check_instance(store, "T1", effects(tmp_path))
    pinned = [e.payload for e in events if e.event == "manifest_pinned"]
    assert pinned == [{"previous": 1, "version": 2}]


def test_long_cell_keeps_its_lease_and_branches_see_the_cell(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute("%load_ext nbrunbook\n%config RunbookMagics.lease = 0.6").ok()
    k.execute(start_code(nb.path, store, extra="--unordered")).ok()
    nb.run(k, ["setup"])
    # The heartbeat renews the running cell's lease (every lease/3) while its code runs.
    long_cell = (
        "import time\n"
        "from nbrunbook.kernel_ext import current\n"
        "s = current(get_ipython())\n"
        "effect('hb')\n"
        "first = s.store.step(s.instance_id, 'cell/hb').lease_until\n"
        "time.sleep(1.5)\n"
        "print(s.store.step(s.instance_id, 'cell/hb').lease_until > first)"
    )
    assert k.execute(long_cell, cell_id="hb").ok().stdout == "True\n"
    # rb.map / rb.task inside a guarded cell are children of the cell's step.
    fan = "effect('fan')\nres = rb.map(lambda v: v * v, [1, 2, 3])\none = rb.task(len, 'abcd')\nprint(res, one)"
    assert k.execute(fan, cell_id="fan").ok().stdout == "[1, 4, 9] 4\n"
    k.shutdown()
    events = check_instance(store, "T1", effects(tmp_path))
    assert [e.event for e in events if e.step_key == "cell/hb@1"] == ["claimed", "done"]
    children = {e.step_key for e in events if e.event == "done" and (e.step_key or "").startswith("cell/fan@1/")}
    assert len(children) == 4
