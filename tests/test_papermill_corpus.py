"""papermill's own test notebooks, run by papermill (the oracle) and by ``nbrunbook run``.

The notebooks under ``tests/corpus/papermill/`` are vendored from papermill's
published source distribution (``papermill/tests/notebooks/``, BSD licence
kept beside them; its README says which were left out and why). Each test
runs one notebook with the real ``papermill`` CLI and, alongside it, with
``nbrunbook run`` as a subprocess on a fresh store, then runs nbrunbook again
on the same instance (a resume), and compares:

- the exit status: papermill's 0 (also after ``sys.exit(0)``) must be
  nbrunbook's 0, papermill's failure 1 must be nbrunbook's 1, on both runs;
- which code cells ran: papermill's ``metadata.papermill.status`` of each cell
  (``completed``, ``failed`` or ``pending``, checked against its
  ``execution_count``) against what ``metadata.nbrunbook.run`` says nbrunbook
  did (``ran``/``always``/``ended``, ``failed``, ``skipped`` or nothing: not
  reached); an empty cell is never sent to the kernel by either tool, so for
  it only "reached" (``empty``) or not counts;
- the error each executed cell shows (the ``ename`` of its error outputs);
- on the resume: the same cells are reached, the failing cell is retried and
  fails again, and no step that was done runs a second time (no new claim in
  the journal, and its cell does not say it ran); the journal and cursor pass
  the store oracles.

Parameters are the ones papermill's own tests pass (``papermill/tests/*.py``),
given as the same ``-p`` to both tools.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers.oracle import check_store
from helpers.runbooks import Run, cli, digest, read_output
from nbrunbook.engine.factory import open_store

CORPUS = Path(__file__).resolve().parent / "corpus" / "papermill"


@dataclass(frozen=True)
class Case:
    """How papermill's own tests run one notebook, for both tools."""

    params: tuple[tuple[str, str], ...] = ()
    #: Extra papermill arguments only (``blank-vscode`` has no kernelspec: papermill needs ``-k``).
    papermill_args: tuple[str, ...] = ()
    #: Arguments for both tools (a kernel the notebook names but the machine lacks).
    kernel: str | None = None
    #: papermill's TestCWD runs it in a directory holding ``check.txt``.
    needs_check_txt: bool = False


#: One entry per vendored notebook compared here (keyboard_interrupt.ipynb has its own test).
CASES: dict[str, Case] = {
    # test_execute.py TestMinimalNotebook: no kernelspec at all; papermill's tests pass kernel_name='python3'.
    "blank-vscode": Case(params=(("var", "It works"),), papermill_args=("-k", "python3")),
    "broken": Case(),  # Python 2 print: a SyntaxError in the first cell
    "broken1": Case(),  # TestBrokenNotebook1 (stale papermill error markers in its markdown)
    "broken2": Case(),  # TestBrokenNotebook2: display_data, then an error, in one cell
    "complex_parameters": Case(),  # test_inspect.py; its parameters cell ends in a SyntaxError
    "line_magic_error": Case(),  # TestSysExit.test_line_magic_error
    "nb_version_4.4": Case(params=(("var", "It works"),)),  # TestNotebookValidation: nbformat 4.4, no cell ids
    "no_parameters": Case(params=(("msg", "Hello"),)),  # test_no_tags: injected first; an empty last cell
    "read_check": Case(needs_check_txt=True),  # TestCWD.test_execution_respects_cwd_assignment
    "report_mode_test": Case(params=(("a", "0"),)),  # TestReportMode
    "result_no_exec": Case(),  # only a parameters cell
    "simple_execute": Case(params=(("msg", "Hello"),)),  # test_cell_insertion
    "sysexit": Case(),  # TestSysExit: sys.exit() ends the run, exit 0
    "sysexit0": Case(),  # sys.exit(0): exit 0
    "sysexit1": Case(),  # sys.exit(1): a failure, exit 1
    "systemexit": Case(),  # raise SystemExit: exit 0
    # test_autosave.py: kernelspec name 'python' (not installed here); papermill's tests run it as python3.
    "test_autosave": Case(kernel="python3"),
    "test_logging": Case(),  # test_clientwrap.py: `from ggplot import mpg` fails (ModuleNotFoundError)
    "test_notebooknode_io": Case(),  # test_iorw.py
}

#: Vendored but run by its own test below (it sleeps 60 s: only a timeout ends it in time).
TIMEOUT_CASE = "keyboard_interrupt"


# ------------------------------------------------------------------ the oracle


@dataclass
class Outcome:
    """What one tool did with one notebook: exit status, and per code cell a label and its errors."""

    code: int
    cells: list[str]  # ran | failed | skipped | not-run | empty | <anything else nbrunbook wrote>
    errors: list[list[str]]  # enames of each code cell's error outputs
    sources: list[str]  # each code cell's source ("<injected>" for injected parameters)


def _code_cells(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _source(cell: Any) -> str:
    # The two tools write the injected values in their own quoting (papermill "x", nbrunbook 'x').
    return "<injected>" if "injected-parameters" in cell.metadata.get("tags", []) else str(cell.source)


def _errors(cell: Any) -> list[str]:
    return [str(o.get("ename")) for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def papermill_outcome(code: int, out: Path) -> Outcome:
    """papermill's output notebook, read with papermill's own per-cell status.

    papermill marks a cell ``completed``, ``failed`` (it raised, also
    ``SystemExit``) or ``pending`` (never reached). A reached empty cell is
    ``completed`` without an execution_count (nbclient does not send it).
    """
    nb = read_output(out)
    labels = []
    for cell in _code_cells(nb):
        status = cell.metadata["papermill"]["status"]
        assert status in ("completed", "failed", "pending"), status
        if not cell.source.strip():
            assert cell.execution_count is None and not cell.outputs, cell
            labels.append("not-run" if status == "pending" else "empty")
            continue
        # The oracle itself: papermill's status and the execution_count agree.
        assert (cell.execution_count is not None) == (status != "pending"), (status, cell.execution_count)
        labels.append({"completed": "ran", "failed": "failed", "pending": "not-run"}[status])
    return Outcome(code, labels, [_errors(c) for c in _code_cells(nb)], [_source(c) for c in _code_cells(nb)])


def expected_nbrunbook(pm: Outcome) -> Outcome:
    """What ``nbrunbook run`` must do on a first run, from papermill's outcome.

    The one translation: papermill marks the cell that ended the notebook with
    ``sys.exit(0)`` ``failed`` but exits 0; that is a successful early end, so
    nbrunbook runs the cell and records its step done (``ran``).
    """
    cells = ["ran" if label == "failed" and pm.code == 0 else label for label in pm.cells]
    return Outcome(pm.code, cells, pm.errors, pm.sources)


def nbrunbook_outcome(run: Run, out: Path) -> tuple[Outcome, list[dict[str, Any]]]:
    """``nbrunbook run``'s output notebook: each cell's label from ``metadata.nbrunbook``, and that metadata."""
    assert out.exists(), f"no output notebook (exit {run.code}):\n{run.stderr}"
    nb = read_output(out)
    labels, meta = [], []
    for cell in _code_cells(nb):
        m = dict(cell.metadata.get("nbrunbook", {}))
        did = m.get("run")
        if did == "refused":
            label = f"refused {m.get('error')}"
        elif not cell.source.strip() and did in ("ran", "always", "not-run"):
            assert cell.execution_count is None and not cell.outputs, cell  # reached, but nothing to run
            label = "empty"
        else:
            # "ended": the cell ran and ended the run with sys.exit(0) (papermill's rule).
            label = {
                "ran": "ran",
                "always": "ran",
                "ended": "ran",
                "failed": "failed",
                "skipped": "skipped",
                "not-run": "not-run",
                None: "not-run",
            }.get(did, str(did))
        labels.append(label)
        meta.append(m)
    return Outcome(run.code, labels, [_errors(c) for c in _code_cells(nb)], [_source(c) for c in _code_cells(nb)]), meta


def _claims(store: Path) -> Counter[str]:
    """``claimed`` events per step key, after the store oracles passed on the instance's journal."""
    s = open_store(store)
    try:
        return Counter(str(e.step_key) for e in check_store(s, "pm-1") if e.event == "claimed")
    finally:
        s.close()


# ------------------------------------------------------------------ running both


def _papermill(nb: Path, out: Path, case: Case, cwd: Path | None) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "papermill", str(nb), str(out), "--no-progress-bar", *case.papermill_args]
    if case.kernel:
        args += ["-k", case.kernel]
    if cwd is not None:
        args += ["--cwd", str(cwd)]
    for name, value in case.params:
        args += ["-p", name, value]
    # Run from the notebook's folder: papermill's kernel starts in its own cwd
    # unless --cwd, nbrunbook's in the notebook's folder.
    return subprocess.Popen(args, cwd=nb.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _nbrunbook_args(nb: Path, store: Path, out: Path, case: Case, cwd: Path | None) -> list[str]:
    args = ["run", str(nb), "-i", "pm-1", "--store", str(store), "-o", str(out), "--no-progress"]
    if case.kernel:
        args += ["--kernel", case.kernel]
    if cwd is not None:
        args += ["--cwd", str(cwd)]
    for name, value in case.params:
        args += ["-p", name, value]
    return args


def _setup(tmp_path: Path, name: str, case: Case) -> tuple[Path, Path | None]:
    """A private copy of the notebook (nothing may write beside the vendored one) and the kernel's cwd."""
    folder = tmp_path / "nb"
    folder.mkdir()
    nb = folder / f"{name}.ipynb"
    shutil.copyfile(CORPUS / f"{name}.ipynb", nb)
    cwd = None
    if case.needs_check_txt:
        cwd = tmp_path / "work"
        cwd.mkdir()
        (cwd / "check.txt").write_text("exists")
    return nb, cwd


@pytest.mark.parametrize("name", sorted(CASES))
def test_nbrunbook_ends_like_papermill(tmp_path: Path, name: str) -> None:
    """papermill, then nbrunbook's first run and its resume: the same exit code and the same cells reached."""
    case = CASES[name]
    nb, cwd = _setup(tmp_path, name, case)
    before = digest(nb)
    store, pm_out, out1, out2 = (tmp_path / f for f in ("store.duckdb", "pm.ipynb", "run1.ipynb", "run2.ipynb"))

    # papermill and nbrunbook's first run at once (two kernels, two cores).
    pm_proc = _papermill(nb, pm_out, case, cwd)
    first = cli(*_nbrunbook_args(nb, store, out1, case, cwd))
    _, pm_stderr = pm_proc.communicate(timeout=300)
    assert pm_proc.returncode in (0, 1), f"papermill itself broke ({pm_proc.returncode}):\n{pm_stderr}"
    pm = papermill_outcome(pm_proc.returncode, pm_out)

    expected = expected_nbrunbook(pm)
    got1, meta1 = nbrunbook_outcome(first, out1)
    assert got1.sources == expected.sources, "the two output notebooks do not have the same code cells"
    assert (got1.code, got1.cells) == (expected.code, expected.cells), (
        f"first run differs from papermill's (exit, cells):\n{first.stderr}"
    )
    assert got1.errors == expected.errors, "first run's error outputs differ from papermill's"
    for label, m in zip(got1.cells, meta1, strict=True):
        if "status" in m:  # a guarded cell's step: failed iff the cell failed
            assert m["status"] == ("failed" if label == "failed" else "done"), m
    claims1 = _claims(store)

    # The resume: the same command again, on the same instance.
    second = cli(*_nbrunbook_args(nb, store, out2, case, cwd))
    got2, meta2 = nbrunbook_outcome(second, out2)
    reached = ["ran" if label == "skipped" else label for label in got2.cells]
    assert (second.code, reached) == (expected.code, expected.cells), (
        f"the resume does not end like papermill (exit, cells reached):\n{second.stderr}"
    )
    done_before = [i for i, m in enumerate(meta1) if m.get("status") == "done"]
    claims2 = _claims(store)
    keys = [meta1[i]["step_key"] for i in done_before]
    assert [claims2[k] for k in keys] == [claims1[k] for k in keys], "a done step was claimed again on the resume"
    # The resume's own notes: a done step is skipped ("ended" again for the sys.exit cell, replayed).
    assert [meta2[i].get("run") for i in done_before] == [
        "ended" if meta1[i].get("run") == "ended" else "skipped" for i in done_before
    ], "a step done by the first run does not say it was skipped on the resume"
    for i in done_before:
        assert (meta2[i]["step_key"], meta2[i]["attempt"], meta2[i]["run_id"]) == (
            meta1[i]["step_key"],
            meta1[i]["attempt"],
            meta1[i]["run_id"],
        ), f"cell {i}'s done step changed on the resume"
    failed = [i for i, label in enumerate(got2.cells) if label == "failed"]
    assert [got2.errors[i] for i in failed] == [expected.errors[i] for i in failed]
    for i, m in enumerate(meta1):
        if m.get("status") == "failed":  # retried: the same step, its next attempt
            assert (meta2[i]["step_key"], meta2[i]["attempt"]) == (m["step_key"], m["attempt"] + 1), meta2[i]

    assert digest(nb) == before  # neither tool touches the input notebook


def test_a_timeout_in_keyboard_interrupt_notebook(tmp_path: Path) -> None:
    """``keyboard_interrupt.ipynb`` (``sleep(60)``) under a cell timeout of 2 s.

    papermill (nbclient) interrupts the kernel and fails with a
    ``CellTimeoutError`` traceback (exit 1); it has no memory, so that is all.
    nbrunbook's documented difference: the cut-off step's outcome is unknown,
    so it is ``interrupted`` (exit 5, one line and the ``resolve`` advice,
    no traceback), and the resume stops at it again without running it.
    """
    nb, _ = _setup(tmp_path, TIMEOUT_CASE, Case())
    store, pm_out, out1, out2 = (tmp_path / f for f in ("store.duckdb", "pm.ipynb", "run1.ipynb", "run2.ipynb"))
    pm_proc = subprocess.Popen(
        [sys.executable, "-m", "papermill", str(nb), str(pm_out), "--no-progress-bar", "--execution-timeout", "2"],
        cwd=nb.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    args = ["run", str(nb), "-i", "pm-1", "--store", str(store), "--no-progress", "--cell-timeout", "2"]
    first = cli(*args, "-o", str(out1))
    _, pm_stderr = pm_proc.communicate(timeout=300)
    assert pm_proc.returncode == 1 and "CellTimeoutError" in pm_stderr, pm_stderr
    pm = papermill_outcome(1, pm_out)  # papermill leaves the cell "completed", cut off by the kernel interrupt
    assert (pm.cells, pm.errors) == (["ran"], [["KeyboardInterrupt"]])

    assert first.code == 5, first.stderr
    assert any("resolve pm-1" in line for line in first.lines), first.stderr
    assert "Traceback" not in first.stderr, first.stderr
    _, meta1 = nbrunbook_outcome(first, out1)  # the partial output notebook is written
    assert meta1[0].get("status") == "interrupted", meta1

    second = cli(*args, "-o", str(out2))
    assert second.code == 5, second.stderr
    assert any("resolve pm-1" in line for line in second.lines), second.stderr
    _, meta2 = nbrunbook_outcome(second, out2)
    assert (meta2[0].get("status"), meta2[0].get("attempt")) == ("interrupted", 1), meta2  # not run again
    s = open_store(store)
    try:
        check_store(s, "pm-1")
    finally:
        s.close()


def test_the_corpus_folder_matches_the_registry() -> None:
    """Every vendored notebook is run here; the licence and the README stay with them."""
    vendored = {p.stem for p in CORPUS.glob("*.ipynb")}
    assert vendored == set(CASES) | {TIMEOUT_CASE}
    assert (CORPUS / "LICENSE").read_text().startswith("BSD 3-Clause License")
    readme = (CORPUS / "README.md").read_text()
    for name in vendored:
        assert f"{name}.ipynb" in readme, f"{name}.ipynb is not listed in {CORPUS / 'README.md'}"
