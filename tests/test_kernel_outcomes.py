"""A step's outcome comes from the execute reply (DESIGN.md §3): display errors, SystemExit, nbclient's tags.

Real kernels sent ``execute_request``s with ``cellId`` (and ``tags`` where the
runner sends them); every test ends with the journal/cursor invariants and
the effects file (one effect per done step, failed attempts excused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers.kernels import (  # noqa: F401 - fixtures
    Kernel,
    Kernels,
    Notebook,
    Result,
    check_instance,
    effects,
    kernels_fixture,
    start_code,
)
from helpers.outcomes import SETUP
from helpers.runbooks import cli, read_output, write_notebook
from nbrunbook.engine.factory import open_store
from nbrunbook.kernel_ext.record import read_record


def _notebook(tmp_path: Path, cells: list[tuple[str, str, list[str]]]) -> Notebook:
    path = write_notebook(tmp_path / "outcomes.ipynb", [("setup", SETUP, []), *cells])
    return Notebook(path)


def _steps(events: list[Any], cell: str) -> list[tuple[str, int | None]]:
    return [(e.event, e.attempt) for e in events if e.step_key == f"cell/{cell}@1"]


def _errors(res: Result) -> list[dict[str, Any]]:
    return [o for o in res.outputs if o["output_type"] == "error"]


def _record(store: Path, cell: str) -> dict[str, Any]:
    with open_store(store) as s:
        return read_record(s.values("T1", f"cell/{cell}@1"))


def _fresh(kernels: Kernels, k: Kernel, nb: Notebook, store: Path, extra: str = "") -> Kernel:
    """Shut ``k`` down (its outcomes committed) and attach the instance in a new kernel."""
    k.shutdown()
    k2 = kernels.start()
    k2.execute(start_code(nb.path, store, extra=extra)).ok()
    return k2


# Each fails only while the flag file "broken" exists, so the retry can succeed. The last two fail
# while the result is displayed (ipykernel then leaves a flag set for the next `await` cell).
DISPLAY_ERRORS = {
    "image": (
        'effect("image")\nfrom IPython.display import Image\nImage(filename="picture.png")',
        "FileNotFoundError",
        "No such file or directory",
    ),
    "repr_html": (
        'effect("repr_html")\n'
        "class Report:\n"
        "    def _repr_html_(self):\n"
        '        if os.path.exists(flag("broken")):\n'
        '            raise ValueError("cannot render the report")\n'
        '        return "<b>report</b>"\n'
        "Report()",
        "ValueError",
        "cannot render the report",
    ),
    "formatter": (
        'effect("formatter")\n'
        "def money(value, printer, cycle):\n"
        '    if os.path.exists(flag("broken")):\n'
        "        1 / 0\n"
        '    printer.text(f"{value.real:.2f} EUR")\n'
        "get_ipython().display_formatter.formatters['text/plain'].for_type(complex, money)\n"
        "complex(3, 0)",
        "ZeroDivisionError",
        "division by zero",
    ),
}


def test_an_error_while_the_result_is_displayed_fails_the_step(kernels: Kernels, tmp_path: Path) -> None:
    """The reply says error, so the step is failed with the real error, and the next run retries it."""
    later = ("later", 'effect("later")\nawait asyncio.sleep(0)\nprint("later ran")', [])
    nb = _notebook(tmp_path, [*((cid, src, []) for cid, (src, _, _) in DISPLAY_ERRORS.items()), later])
    store = tmp_path / "store.duckdb"
    broken = tmp_path / "effects.jsonl.broken"
    broken.touch()
    k = kernels.start()
    k.execute(start_code(nb.path, store, extra="--unordered")).ok()
    nb.run(k, ["setup"])
    for cid, (_, ename, evalue) in DISPLAY_ERRORS.items():
        res = k.execute(nb.source(cid), cell_id=cid)
        assert res.status == "error", (cid, res)
        shown = _errors(res)
        assert len(shown) == 1, (cid, shown)  # shown once, not again by the guard
        assert shown[0]["ename"] == ename and evalue in shown[0]["evalue"]
    # ipykernel leaves the display error's flag set for a top-level `await` cell: not our outcome.
    assert k.execute(nb.source("later"), cell_id="later").ok().stdout == "later ran\n"
    broken.unlink()
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    k = _fresh(kernels, k, nb, store, extra="--unordered")
    results = nb.run(k)
    for cid in DISPLAY_ERRORS:
        res = results[cid]
        assert res.status == "ok", (cid, res.error_text)
        assert not res.status_lines, cid  # ran again, not skipped
        assert res.result is not None, cid
    assert results["formatter"].result["text/plain"] == "3.00 EUR"  # type: ignore[index]
    k.shutdown()

    lines = effects(tmp_path)
    events = check_instance(store, "T1", lines)
    assert _steps(events, "later") == [("claimed", 1), ("done", 1)]
    for cid, (_, ename, evalue) in DISPLAY_ERRORS.items():
        assert _steps(events, cid) == [("claimed", 1), ("failed", 1), ("claimed", 2), ("done", 2)], cid
        failed = next(e for e in events if e.step_key == f"cell/{cid}@1" and e.event == "failed")
        assert failed.payload["error"]["type"] == ename and evalue in failed.payload["error"]["message"]


@pytest.mark.parametrize(
    "statement, evalue",
    [("sys.exit()", ""), ("sys.exit(0)", "0"), ("raise SystemExit", "")],
    ids=["exit", "exit-0", "raise"],
)
def test_a_clean_system_exit_ends_the_run_and_again_on_resume(
    kernels: Kernels, tmp_path: Path, statement: str, evalue: str
) -> None:
    """Papermill's early end: the step is done, and a skip of it ends Run All at the same cell again."""
    nb = _notebook(
        tmp_path,
        [
            ("first", 'effect("first")\nprint("first ran")', []),
            ("stop", f'import sys\neffect("stop")\nprint("stopping here")\n{statement}', []),
            ("after", 'effect("after")', []),
        ],
    )
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    first = nb.run(k)  # Run All: stops at the error, like nbclient
    assert list(first) == ["setup", "first", "stop"]
    stop = first["stop"]
    assert (stop.status, stop.ename, stop.evalue) == ("error", "SystemExit", evalue)
    assert stop.stdout == "stopping here\n"

    k = _fresh(kernels, k, nb, store)
    again = nb.run(k)
    assert list(again) == ["setup", "first", "stop"]  # the notebook decided to stop: `after` never runs
    replayed = again["stop"]
    assert (replayed.status, replayed.ename, replayed.evalue) == ("error", "SystemExit", evalue)
    assert replayed.status_lines and replayed.stdout == "stopping here\n"
    assert [(o["ename"], o["evalue"]) for o in _errors(replayed)] == [(o["ename"], o["evalue"]) for o in _errors(stop)]
    assert replayed.stderr == stop.stderr
    k.shutdown()

    record = _record(store, "stop")  # read once the kernels let go of the store (outcomes commit in the background)
    assert "system_exit" in record and record["system_exit"] in (0, None)
    assert record["error"]["ename"] == "SystemExit"
    lines = effects(tmp_path)
    assert [e["cell"] for e in lines] == ["first", "stop"]
    events = check_instance(store, "T1", lines)
    assert _steps(events, "stop") == [("claimed", 1), ("done", 1)]
    done = next(e for e in events if e.step_key == "cell/stop@1" and e.event == "done")
    assert "system_exit" in done.payload
    assert _steps(events, "after") == []


@pytest.mark.parametrize("statement", ["sys.exit(1)", 'sys.exit("no config found")'], ids=["code-1", "message"])
def test_a_nonzero_system_exit_is_a_failure(kernels: Kernels, tmp_path: Path, statement: str) -> None:
    """``sys.exit(1)`` / ``sys.exit("msg")`` fail the step; the next run retries it."""
    source = f'import sys\neffect("stop")\nif os.path.exists(flag("broken")):\n    {statement}\nprint("went on")'
    nb = _notebook(tmp_path, [("stop", source, [])])
    store = tmp_path / "store.duckdb"
    (tmp_path / "effects.jsonl.broken").touch()
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    res = nb.run(k)["stop"]
    assert (res.status, res.ename) == ("error", "SystemExit")
    (tmp_path / "effects.jsonl.broken").unlink()
    retried = nb.run(k)["stop"]
    assert retried.ok().stdout == "went on\n" and not retried.status_lines
    k.shutdown()
    events = check_instance(store, "T1", effects(tmp_path))
    assert _steps(events, "stop") == [("claimed", 1), ("failed", 1), ("claimed", 2), ("done", 2)]
    failed = next(e for e in events if e.event == "failed")
    assert failed.payload["error"]["type"] == "SystemExit"


CUSTOM_ERROR = (
    'effect("own")\nclass DeployError(Exception):\n    """A deploy step refused."""\n\n'
    'raise DeployError("rollback needed")'
)


def test_raises_exception_tag_is_done_and_replays_its_error(kernels: Kernels, tmp_path: Path) -> None:
    """nbclient's ``raises-exception``: done with its error; a skip raises the same error; later cells run."""
    nb = _notebook(
        tmp_path,
        [
            ("boom", 'effect("boom")\nprint("before the error")\nraise KeyError("expected")', ["raises-exception"]),
            ("after", 'effect("after")\nprint("after ran")', []),
            # The user's own exception class: the skip cannot import it, the reply must not differ.
            ("own", CUSTOM_ERROR, ["raises-exception"]),
        ],
    )
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup"])
    # As JupyterLab sends it (cellId, no tags): the tag is known from the notebook file.
    boom = k.execute(nb.source("boom"), cell_id="boom")
    assert (boom.status, boom.ename, boom.evalue) == ("error", "KeyError", "'expected'")
    assert k.execute(nb.source("after"), cell_id="after").ok().stdout == "after ran\n"  # no order violation
    own = nb.run(k, ["own"])["own"]  # as the runner sends it (with its tags)
    assert (own.status, own.ename, own.evalue) == ("error", "DeployError", "rollback needed")

    k = _fresh(kernels, k, nb, store)
    again = nb.run(k, stop_on_error=False)  # like nbclient, which carries on past the expected error
    replayed = again["boom"]
    assert (replayed.status, replayed.ename, replayed.evalue) == ("error", "KeyError", "'expected'")
    assert replayed.status_lines and replayed.stdout == "before the error\n"
    assert _errors(replayed) == _errors(boom)  # same name, value and traceback as the first run
    assert again["after"].ok().status_lines
    assert again["own"].status_lines and _errors(again["own"]) == _errors(own)
    assert (again["own"].ename, again["own"].evalue) == ("DeployError", "rollback needed")
    k.shutdown()

    record = _record(store, "boom")
    assert record["error"]["ename"] == "KeyError" and "system_exit" not in record
    assert record["error"]["traceback"] == _errors(boom)[0]["traceback"]
    lines = effects(tmp_path)
    assert [e["cell"] for e in lines] == ["boom", "after", "own"]
    events = check_instance(store, "T1", lines)
    assert _steps(events, "boom") == [("claimed", 1), ("done", 1)]
    assert _steps(events, "after") == [("claimed", 1), ("done", 1)]


def test_an_untagged_error_is_still_a_failure(kernels: Kernels, tmp_path: Path) -> None:
    """Without the tag (in the file or the request) an error is failed, and the next cell waits for it."""
    nb = _notebook(
        tmp_path,
        [("boom", 'effect("boom")\nraise KeyError("unexpected")', []), ("after", 'effect("after")', [])],
    )
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    results = nb.run(k, stop_on_error=False)
    assert results["boom"].ename == "KeyError"
    assert results["after"].ename == "OrderViolation"
    k.shutdown()
    events = check_instance(store, "T1", effects(tmp_path))
    assert _steps(events, "boom") == [("claimed", 1), ("failed", 1)]


def test_skip_execution_cell_is_not_a_step(kernels: Kernels, tmp_path: Path) -> None:
    """nbclient never runs a ``skip-execution`` cell: later cells do not wait for it."""
    nb = _notebook(
        tmp_path,
        [
            ("first", 'effect("first")', []),
            ("draft", 'print("a draft, not run headless")', ["skip-execution"]),
            ("last", 'effect("last")\nprint("last ran")', []),
        ],
    )
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    results = nb.run(k, ["setup", "first", "last"])  # what nbclient sends
    assert results["last"].ok().stdout == "last ran\n"
    # A frontend that runs it anyway (JupyterLab: cellId, no tags; the tag is in the file): it runs, as no step.
    assert k.execute(nb.source("draft"), cell_id="draft").ok().stdout.startswith("a draft")
    # An edited draft (not the pinned source) with the tag in the request: still no step.
    assert k.execute("print('edited draft')", cell_id="draft", tags=["skip-execution"]).ok().stdout == "edited draft\n"
    k.shutdown()
    events = check_instance(store, "T1", effects(tmp_path))
    assert not [e for e in events if e.step_key and "draft" in e.step_key]


def test_nbrunbook_run_honours_the_tags(tmp_path: Path) -> None:
    """`nbrunbook run`: raises-exception and skip-execution end as under nbclient (exit 0), first run and resume."""
    nb = write_notebook(
        tmp_path / "tags.ipynb",
        [
            ("first", "print('first')", []),
            ("boom", "print('before')\nraise KeyError('expected')", ["raises-exception"]),
            ("draft", "print('draft')", ["skip-execution"]),
            ("last", "print('last')", []),
        ],
    )
    store = tmp_path / "store.duckdb"
    errors = []
    for _ in range(2):
        run = cli("run", str(nb), "--store", str(store), "--instance", "T1", "--output", str(tmp_path / "out.ipynb"))
        assert run.code == 0, run.stderr
        out = read_output(tmp_path / "out.ipynb")
        cells = {c.id: c for c in out.cells}
        text = "".join(o.get("text", "") for o in cells["last"].outputs if o.output_type == "stream")
        assert text.splitlines() == ["last"]
        assert cells["draft"].outputs == []
        errors.append([(o.ename, o.evalue, o.traceback) for o in cells["boom"].outputs if o.output_type == "error"])
    assert errors[0] == errors[1] and errors[0][0][:2] == ("KeyError", "'expected'")
    events = check_instance(store, "T1")
    assert _steps(events, "boom") == [("claimed", 1), ("done", 1)]
    assert not [e for e in events if e.step_key and "draft" in e.step_key]
