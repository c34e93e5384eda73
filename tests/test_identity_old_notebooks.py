"""Cell identity for notebooks without ids (nbformat 4.4), bad ids, and what a manifest change says.

Real ``nbrunbook run`` subprocesses and real kernels. Oracles: the effects
file the cells append to (one line per side effect), the store's steps and
journal invariants, and the files on disk (byte-identical after bad input).
A 4.4 notebook must behave exactly as the same notebook with ids: each case
that edits a notebook runs both and compares.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from helpers.kernels import (  # noqa: F401 - fixtures
    Kernels,
    check_instance,
    effects,
    kernels_fixture,
    notebook_copy_fixture,
    start_code,
)
from helpers.oracle import check_effects_once, check_store, read_effects
from helpers.runbooks import Run, cli, digest, effect_cell, write_notebook
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.model import ManifestCell
from nbrunbook.engine.notebook_ids import adopted_ids, source_hash
from nbrunbook.kernel_ext.manifest import manifest_changes


def _cells(effects_file: Path) -> list[tuple[str, str, list[str]]]:
    return [
        ("setup", f"import json\nEFFECTS = {str(effects_file)!r}", []),
        ("deploy", effect_cell("print('deploy')\n"), []),
        ("migrate", effect_cell("print('migrate')\n"), []),
        ("notify", effect_cell("print('notify')\n"), []),
    ]


def _edit(cells: list[tuple[str, str, list[str]]], cell_id: str, new_source: str) -> list[tuple[str, str, list[str]]]:
    return [(cid, new_source if cid == cell_id else src, tags) for cid, src, tags in cells]


def _run(nb: Path, store: Path, *extra: str) -> Run:
    return cli("run", str(nb), "-i", "r1", "--store", str(store), "--no-progress", *extra, cwd=nb.parent)


def _steps(store: Path, instance: str = "r1") -> dict[str, str]:
    with open_store(store) as s:
        check_store(s, instance)
        return {st.path: st.status for st in s.steps(instance)}


def _ran(run: Run) -> str:
    return next(ln for ln in run.lines if "; ran " in ln).split("; ")[1]  # "ran N, skipped M of K cells"


@pytest.mark.parametrize("v44", [False, True], ids=["with-ids", "nbformat-4.4"])
def test_an_edited_done_cell_is_reported_not_run_again(tmp_path: Path, v44: bool) -> None:
    fx = tmp_path / "effects.jsonl"
    nb, store = tmp_path / "deploy.ipynb", tmp_path / "store.duckdb"
    cells = _cells(fx)
    write_notebook(nb, cells, v44=v44)
    first = _run(nb, store)
    assert first.code == 0, first.stderr
    assert len(read_effects(fx)) == 3
    before = _steps(store)
    migrate = [p for p in before if p == "cell/migrate" or (v44 and p.startswith("cell/c2-"))]
    assert len(migrate) == 1  # the third code cell's step

    edited = _edit(cells, "migrate", effect_cell("print('migrate, now with a retry')\n"))
    write_notebook(nb, edited, v44=v44)
    again = _run(nb, store)
    # Exactly as for a notebook with ids: refused by --on-changed error (exit 2), naming the cell.
    assert again.code == 2, again.stderr
    cell = migrate[0].split("/", 1)[1]
    assert f"cell {cell} changed since it ran" in again.stderr and "SourceChanged" in again.stderr
    assert len(read_effects(fx)) == 3, "the edited cell ran again"
    assert _steps(store) == before  # no new step: the edit is the same cell

    skipped = _run(nb, store, "--on-changed", "skip")
    assert skipped.code == 0, skipped.stderr
    assert len(read_effects(fx)) == 3 and _steps(store) == before
    with open_store(store) as s:
        check_effects_once(read_effects(fx), check_store(s, "r1"))


@pytest.mark.parametrize("v44", [False, True], ids=["with-ids", "nbformat-4.4"])
def test_a_cell_inserted_above_done_cells_is_the_only_new_step(tmp_path: Path, v44: bool) -> None:
    fx = tmp_path / "effects.jsonl"
    nb, store = tmp_path / "deploy.ipynb", tmp_path / "store.duckdb"
    cells = _cells(fx)
    write_notebook(nb, cells, v44=v44)
    assert _run(nb, store).code == 0
    before = _steps(store)

    inserted = [cells[0], ("backup", effect_cell("print('backup first')\n"), []), *cells[1:]]
    write_notebook(nb, inserted, v44=v44)
    again = _run(nb, store)
    assert again.code == 0, again.stderr
    assert _ran(again) == "ran 1, skipped 3 of 5 cells", again.stderr
    after = _steps(store)
    new = set(after) - set(before)
    assert len(new) == 1 and {k: after[k] for k in before} == before  # the others kept their identity
    assert [e["step_key"] for e in read_effects(fx)][-1] == f"{new.pop()}@1"
    assert len(read_effects(fx)) == 4
    if v44:
        assert "has no cell ids (nbformat 4.4)" in again.stderr and "nbrunbook upgrade" in again.stderr
        assert "matched to the cells the instance pinned" in again.stderr


@pytest.mark.parametrize("which", [["-i", "r1"], []], ids=["the-instance", "the-runbook-latest"])
def test_upgrade_writes_the_ids_the_instance_already_uses(tmp_path: Path, which: list[str]) -> None:
    fx = tmp_path / "effects.jsonl"
    nb, store = tmp_path / "deploy.ipynb", tmp_path / "store.duckdb"
    cells = _cells(fx)
    write_notebook(nb, cells, v44=True)
    assert _run(nb, store).code == 0
    used = _steps(store)
    # Edited and a cell inserted at the top since the run: plain derivation would shift every id.
    changed = [("banner", "print('release 2')", []), *_edit(cells, "notify", effect_cell("print('notify #ops')\n"))]
    write_notebook(nb, changed, v44=True)

    before = digest(nb)
    unknown = cli("upgrade", str(nb), "--store", str(store), "-i", "no-such-run")
    assert unknown.code == 2 and "no instance 'no-such-run'" in unknown.stderr and digest(nb) == before
    up = cli("upgrade", str(nb), "--store", str(store), *which)
    assert up.code == 0 and "wrote ids for 5 cells" in up.stdout, up.stderr
    data = json.loads(nb.read_text())
    assert data["nbformat_minor"] == 5
    written = [c["id"] for c in data["cells"]]
    assert {f"cell/{i}" for i in written[2:]} == set(used)  # deploy, migrate, notify keep their steps
    assert f"cell/{written[0]}" not in used and f"cell/{written[1]}" not in used

    again = _run(nb, store, "--on-changed", "skip")
    assert again.code == 0, again.stderr
    assert "no cell ids" not in again.stderr  # real ids now
    assert len(read_effects(fx)) == 3  # the edited done cell did not run again
    after = _steps(store)
    assert {k: after[k] for k in used} == used and after[f"cell/{written[0]}"] == "done"  # only the banner is new
    assert len(after) == len(used) + 1
    assert cli("upgrade", str(nb)).stdout.endswith("nothing changed\n")


def test_upgrade_without_a_store_writes_the_in_memory_ids(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "plain.ipynb", [("a", "x = 1", []), ("b", "print(x)", [])], v44=True)
    up = cli("upgrade", str(nb), cwd=tmp_path)
    assert up.code == 0 and "wrote ids for 2 cells" in up.stdout
    assert not (tmp_path / ".nbrunbook").exists()  # the store was only looked for, not created
    ids = [c["id"] for c in json.loads(nb.read_text())["cells"]]
    assert ids[0].startswith("c0-") and ids[1].startswith("c1-")


# ------------------------------------------------------------------ bad ids


def _fingerprint(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("position", [0, 1])
def test_an_empty_cell_id_is_bad_input(tmp_path: Path, position: int) -> None:
    nb = write_notebook(tmp_path / "empty-id.ipynb", [("a", "print('a')", []), ("b", "print('b')", [])])
    data = json.loads(nb.read_text())
    data["cells"][position]["id"] = ""
    nb.write_text(json.dumps(data))
    store = tmp_path / "store" / "s.duckdb"
    before = _fingerprint(tmp_path)
    for args in (["run", str(nb), "-i", "e1", "--store", str(store), "--no-progress"], ["upgrade", str(nb)]):
        run = cli(*args, cwd=tmp_path)
        assert run.code == 2, run.stderr
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, run.stderr
        assert f"cell {position + 1} (code) has an invalid id ''" in lines[0], lines[0]
        assert _fingerprint(tmp_path) == before  # nothing written: no store, no output, notebook intact
        assert not store.parent.exists()


def test_an_empty_cell_id_is_refused_in_the_kernel(kernels: Kernels, tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "empty-id.ipynb", [("a", "print('a')", [])])
    data = json.loads(nb.read_text())
    data["cells"][0]["id"] = ""
    nb.write_text(json.dumps(data))
    before = digest(nb)
    k = kernels.start()
    res = k.execute(start_code(nb, tmp_path / "store.duckdb"))
    assert res.status == "error" and "cell 1 (code) has an invalid id ''" in res.evalue, res.error_text
    assert digest(nb) == before and not (tmp_path / "store.duckdb").exists()


# ------------------------------------------------------- in a kernel, no cellId


def test_a_frontend_without_cell_ids_finds_an_edit_to_a_44_notebook(kernels: Kernels, tmp_path: Path) -> None:
    fx = tmp_path / "effects.jsonl"
    nb, store = tmp_path / "old.ipynb", tmp_path / "store.duckdb"
    cells = _cells(fx)
    write_notebook(nb, cells, v44=True)
    k = kernels.start()
    k.execute(start_code(nb, store)).ok()
    for _, source, _ in cells:  # a classic frontend: no cellId at all
        k.execute(source).ok()
    assert len(read_effects(fx)) == 3

    # The person edits the done cell "migrate" and saves; the frontend still sends no id.
    new_source = effect_cell("print('migrate v2')\n")
    write_notebook(nb, _edit(cells, "migrate", new_source), v44=True)
    res = k.execute(new_source).ok()
    # The skip says so in its status; the re-pinned manifest's notice (stderr) offers the rerun.
    assert "changed since it ran" in res.status_lines[0] and "%runbook rerun c2-" in res.stderr, res.stderr
    assert "edited" in res.stderr  # the re-pinned manifest names the edit
    assert len(read_effects(fx)) == 3, "the edited done cell ran again"

    # A cell inserted above, saved, then run: a new step; the others keep their identity.
    inserted = [cells[0], ("audit", effect_cell("print('audit')\n"), []), *_edit(cells, "migrate", new_source)[1:]]
    write_notebook(nb, inserted, v44=True)
    k.execute(inserted[1][1]).ok()
    assert len(read_effects(fx)) == 4
    k.execute("%runbook stop").ok()
    events = check_instance(store, "T1", read_effects(fx))
    assert len({e.step_key for e in events if e.event == "done"}) == 4  # deploy, migrate, notify, audit: once each


# ------------------------------------------------------- the manifest-change text


def test_a_manifest_change_names_the_cells_and_the_rerun_command(
    kernels: Kernels, notebook_copy, tmp_path: Path
) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup", "a", "b"])
    data = json.loads(nb.path.read_text())
    cells = {c.get("id"): c for c in data["cells"]}
    cells["a"]["source"] = 'effect("a")\nprint("hello again from a")\nx = 41'  # done, edited
    data["cells"] = [c for c in data["cells"] if c.get("id") != "e"]  # removed
    new = {"cell_type": "code", "id": "f", "metadata": {}, "source": 'effect("f")', "outputs": []}
    data["cells"].append({**new, "execution_count": None})
    nb.path.write_text(json.dumps(data))
    res = k.execute('effect("f")', cell_id="f")  # the new cell: the kernel re-reads the file
    notice = next(ln for ln in res.stderr.splitlines() if "pinned runbook manifest version 2: " in ln)
    parts = notice.split("manifest version 2: ", 1)[1].split("; ")
    assert parts[0] == """added 'effect("f")' [f] (new steps)""", notice
    assert parts[1] == """edited 'effect("a")' [a]""", notice
    assert parts[2].startswith("removed ") and "[e] (their history stays in the journal)" in parts[2], notice
    assert notice.endswith("to run the new code: `%runbook rerun a`"), notice  # a is done: the decision to offer
    edited = k.execute(cells["a"]["source"], cell_id="a")
    assert "changed since it ran" in edited.status_lines[0]
    assert [e["step_key"] for e in effects(tmp_path) if e["step_key"].startswith("cell/a@")] == ["cell/a@1"]


def test_reattaching_after_an_edit_says_what_changed(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup", "a"])
    k.restart()
    data = json.loads(nb.path.read_text())
    for c in data["cells"]:
        if c.get("id") == "a":
            c["source"] = 'effect("a")\nx = 41'
    nb.path.write_text(json.dumps(data))
    k.execute(start_code(nb.path, store)).ok()
    first = k.execute(nb.source("setup"), cell_id="setup").ok()
    assert "the notebook changed since instance T1 last ran (manifest version 1 -> 2)" in first.stderr
    assert "edited" in first.stderr and "`%runbook rerun a`" in first.stderr, first.stderr
    again = k.execute('effect("a")\nx = 41', cell_id="a").ok()
    (status,) = again.status_lines
    assert "changed since it ran" in status and "manifest version" not in again.stderr  # said once
    assert len(effects(tmp_path)) == 1


# ------------------------------------------- JupyterLab and 4.4 notebooks: its own ids


def _jupyterlab_ids(cells: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, list[str]]]:
    """The cells with fresh uuids, as JupyterLab gives a 4.4 notebook's cells (and saves them)."""
    return [(str(uuid.uuid4()), src, tags) for _, src, tags in cells]


def test_a_44_notebook_saved_with_new_ids_resumes_the_same_steps(tmp_path: Path) -> None:
    fx = tmp_path / "effects.jsonl"
    nb, store = tmp_path / "deploy.ipynb", tmp_path / "store.duckdb"
    cells = _cells(fx)
    write_notebook(nb, cells, v44=True)
    assert _run(nb, store).code == 0
    before = _steps(store)
    # Opened and saved in JupyterLab: nbformat 4.5, every cell a new uuid.
    saved = _jupyterlab_ids(cells)
    write_notebook(nb, saved)
    again = _run(nb, store)
    assert again.code == 0, again.stderr
    assert _ran(again) == "ran 0, skipped 3 of 4 cells", again.stderr
    assert len(read_effects(fx)) == 3 and _steps(store) == before
    # And an edit after that save is still found.
    write_notebook(nb, _edit(saved, saved[2][0], effect_cell("print('migrate v3')\n")))
    edited = _run(nb, store)
    assert edited.code == 2 and "changed since it ran" in edited.stderr, edited.stderr
    assert len(read_effects(fx)) == 3 and _steps(store) == before


def test_jupyterlab_ids_for_an_unsaved_44_notebook_are_matched_by_source(kernels: Kernels, tmp_path: Path) -> None:
    fx = tmp_path / "effects.jsonl"
    nb, store = tmp_path / "old.ipynb", tmp_path / "store.duckdb"
    cells = _cells(fx)
    write_notebook(nb, cells, v44=True)
    k = kernels.start()
    k.execute(start_code(nb, store)).ok()
    lab = _jupyterlab_ids(cells)  # the ids JupyterLab sends for a 4.4 notebook it has not saved
    for cid, source, _ in lab:
        k.execute(source, cell_id=cid).ok()
    assert len(read_effects(fx)) == 3
    for cid, source, _ in lab:  # Run All again: skipped, not a second set of steps
        res = k.execute(source, cell_id=cid).ok()
        assert "not in the pinned runbook" not in res.stderr, res.stderr
    assert len(read_effects(fx)) == 3
    write_notebook(nb, lab)  # now saved: nbformat 4.5 with JupyterLab's ids; the kernel re-reads it
    for cid, source, _ in lab:
        res = k.execute(source, cell_id=cid).ok()
        assert "not in the pinned runbook" not in res.stderr and "manifest version" not in res.stderr, res.stderr
    assert len(read_effects(fx)) == 3
    k.execute("%runbook stop").ok()
    paths = set(_steps(store, "T1"))
    assert len(paths) == 3 and all(p.startswith("cell/c") for p in paths)  # the derived ids, not JupyterLab's


def _mc(cell_id: str, index: int, source: str, name: str = "") -> ManifestCell:
    return ManifestCell(cell_id=cell_id, index=index, source_hash=source_hash(source), name=name or cell_id)


@pytest.mark.parametrize(
    "on_changed, tail",
    [
        ("skip", "keeps its recorded run (shown), not run again; to run the new code: `nbrunbook rerun R7 b`"),
        ("error", "stops the run (--on-changed error), not run again; to run the new code: `nbrunbook rerun R7 b`"),
        ("rerun", "runs again (--on-changed rerun)"),
    ],
)
def test_the_change_text_follows_the_policy_and_names_each_cell(on_changed: str, tail: str) -> None:
    old = [_mc("a", 0, "x = 1"), _mc("b", 1, "charge()", "charge the card"), _mc("c", 2, "refund()")]
    new = [_mc("a", 0, "x = 1"), _mc("b", 1, "charge(retry=True)", "charge the card"), _mc("d", 2, "notify()")]
    changes = manifest_changes(old, new)
    text = changes.describe(lambda cid: f"nbrunbook rerun R7 {cid}", lambda cid: cid == "b", on_changed)
    assert text.startswith(
        "added d (new steps); edited 'charge the card' [b]; removed c (their history stays in the journal). "
        "An edited cell that already ran "
    ), text
    assert text.endswith(tail), text
    assert not manifest_changes(old, old)
    swapped = [_mc("b", 0, "charge()", "charge the card"), _mc("a", 1, "x = 1"), _mc("c", 2, "refund()")]
    assert manifest_changes(old, swapped).describe(str) == "cells reordered"
    not_done = changes.describe(str, lambda cid: False, on_changed)
    assert not_done.endswith("(their history stays in the journal)")  # nothing to decide


def test_only_a_wholesale_change_of_ids_is_adopted() -> None:
    pinned = [("c0-0a0a0a0a", source_hash("a = 1")), ("c1-0b0b0b0b", source_hash("charge()"))]
    saved_by_lab = adopted_ids(["7f3e", "91c2"], ["a = 1", "charge(retry=True)"], pinned)
    assert saved_by_lab == {"7f3e": "c0-0a0a0a0a", "91c2": "c1-0b0b0b0b"}  # the edit keeps its step
    # A notebook that shares an id with the manifest has its own identity: a replaced cell is new.
    assert adopted_ids(["c0-0a0a0a0a", "91c2"], ["a = 1", "refund()"], pinned) == {}
    # Real ids pinned before: nothing was derived, nothing to adopt.
    assert adopted_ids(["x", "y"], ["a = 1", "charge()"], [("p", source_hash("a = 1")), ("q", "0")]) == {}
