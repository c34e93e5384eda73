"""``nbrunbook run`` keeps nbclient's and papermill's conventions (real kernels, CLI subprocesses).

Tags (``skip-execution``, ``raises-exception``), ``--allow-errors``, ``sys.exit``,
validation as lenient as nbclient's, a kernel that dies while starting. Oracles:
the exit code next to ``jupyter execute``'s, the stderr lines, the store's
journal and cursor (:func:`check_instance`), the effects file the cells write
and the output notebook.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers.kernels import check_instance
from helpers.oracle import read_effects
from helpers.runbooks import Run, cli, effect_cell, read_output, write_notebook
from nbrunbook.engine.factory import open_store


def _run(nb: Path, instance: str, store: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> Run:
    return cli("run", str(nb), "-i", instance, "--store", str(store), "-o", str(out), "--no-progress", *extra, env=env)


def _nb(path: Path, cells: list[tuple[str, str, list[str]]]) -> Path:
    """A notebook whose cells are named by their ids (a first comment line names a cell)."""
    return write_notebook(path, [(cid, f"# {cid}\n{src}", tags) for cid, src, tags in cells])


def _status(store: Path, instance: str) -> dict[str, str]:
    with open_store(store) as s:
        return {st.path: st.status for st in s.steps(instance)}


def _keys(effects: Path) -> list[str]:
    return [e["step_key"] for e in read_effects(effects)] if effects.exists() else []


def _text(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def _summary(run: Run) -> str:
    lines = [ln for ln in run.lines if ": instance " in ln]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_skip_execution_and_raises_exception_tags(tmp_path: Path) -> None:
    effects = tmp_path / "effects.jsonl"
    nb = _nb(
        tmp_path / "tags.ipynb",
        [
            ("imports", f"import json\nEFFECTS = {str(effects)!r}", []),
            ("a", effect_cell("print('a ran')\n"), []),
            ("skipme", effect_cell("print('must not run')\n"), ["skip-execution"]),
            ("boom", effect_cell("raise ValueError('expected boom')\n"), ["raises-exception"]),
            ("after", effect_cell("print('after ran')\n"), []),
        ],
    )
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    first = _run(nb, "tags-1", store, out)
    assert first.code == 0, first.stderr
    assert _keys(effects) == ["cell/a@1", "cell/boom@1", "cell/after@1"]  # skipme never ran
    progress = {ln.split()[3]: ln for ln in first.lines if ln.startswith("nbrunbook: [")}
    assert "not-run" in progress["skipme"] and "(skip-execution)" in progress["skipme"]
    assert "ValueError (expected: raises-exception)" in progress["boom"]
    output = read_output(out)
    meta = {c.id: c.metadata.get("nbrunbook", {}) for c in output.cells}
    assert meta["skipme"]["run"] == "not-run" and meta["skipme"]["reason"] == "skip-execution"
    assert output.cells[2].outputs == []
    assert meta["boom"]["run"] == "ran" and meta["boom"]["error"] == "ValueError" and meta["boom"]["expected_error"]
    assert [o.output_type for o in output.cells[3].outputs][-1] == "error"  # the expected error is kept
    assert "after ran" in _text(output.cells[4])
    status = _status(store, "tags-1")
    assert "cell/skipme" not in status  # not a step
    assert status["cell/boom"] == "done" and status["cell/after"] == "done"

    again = _run(nb, "tags-1", store, out)  # a resume: nothing runs twice, the error is shown again
    assert again.code == 0, again.stderr
    assert _keys(effects) == ["cell/a@1", "cell/boom@1", "cell/after@1"]
    replayed = read_output(out)
    assert replayed.cells[3].metadata["nbrunbook"]["run"] == "skipped"
    assert [o.output_type for o in replayed.cells[3].outputs][-1] == "error"
    check_instance(store, "tags-1", read_effects(effects))


def _jupyter_execute_code(nb: Path, *args: str) -> int:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-execute"), *args, str(nb)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out.returncode


def test_allow_errors_goes_on_and_leaves_failed_steps_to_retry(tmp_path: Path) -> None:
    effects = tmp_path / "effects.jsonl"
    flag = tmp_path / "fail.flag"
    flag.touch()
    nb = _nb(
        tmp_path / "errs.ipynb",
        [
            ("imports", f"import json, os\nEFFECTS = {str(effects)!r}", []),
            ("first", effect_cell(), []),
            ("second", effect_cell(f"if os.path.exists({str(flag)!r}):\n    raise RuntimeError('flag set')\n"), []),
            ("third", effect_cell("print('third ran')\n"), []),
            ("fourth", effect_cell("raise KeyError('always')\n"), []),
        ],
    )
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    run = _run(nb, "errs-1", store, out, "--allow-errors")
    # The same exit code as `jupyter execute --allow-errors` on this notebook (and 1 without it).
    assert run.code == _jupyter_execute_code(nb, "--allow-errors") == 0, run.stderr
    assert _keys(effects) == ["cell/first@1", "cell/second@1", "cell/third@1", "cell/fourth@1"]
    assert _status(store, "errs-1") == {
        "cell/first": "done",
        "cell/second": "failed",
        "cell/third": "done",
        "cell/fourth": "failed",
    }
    summary = _summary(run)
    assert "2 failed, let through by --allow-errors" in summary
    assert "'second' (second) RuntimeError" in summary and "'fourth' (fourth) KeyError" in summary
    output = read_output(out)
    assert output.metadata["nbrunbook"]["failed_cells"] == ["second", "fourth"]
    assert output.metadata["nbrunbook"]["exit_code"] == 0
    assert output.cells[2].metadata["nbrunbook"]["run"] == "failed"
    assert output.cells[2].outputs[-1].output_type == "error"
    assert "third ran" in _text(output.cells[3])

    flag.unlink()
    plain = _run(nb, "errs-1", store, out)  # no --allow-errors: the failed steps are retried, in order
    assert plain.code == 1, plain.stderr
    assert any("cell 'fourth' (fourth): KeyError" in ln for ln in plain.lines)
    assert _status(store, "errs-1")["cell/second"] == "done"
    attempts = [(e["step_key"], e["attempt"]) for e in read_effects(effects)]
    assert attempts[4:] == [("cell/second@1", 2), ("cell/fourth@1", 2)]  # first and third were not run again
    check_instance(store, "errs-1", read_effects(effects))


@pytest.mark.parametrize(
    ("code", "shown"),
    [("sys.exit()", "SystemExit()"), ("sys.exit(0)", "SystemExit(0)"), ("raise SystemExit", "SystemExit()")],
)
def test_sys_exit_zero_ends_the_instance_early_and_successfully(tmp_path: Path, code: str, shown: str) -> None:
    effects = tmp_path / "effects.jsonl"
    nb = _nb(
        tmp_path / "early.ipynb",
        [
            ("imports", f"import json, sys\nEFFECTS = {str(effects)!r}", []),
            ("first", effect_cell(), []),
            ("stop", effect_cell(f"print('stopping')\n{code}\n"), []),
            ("later", effect_cell(), []),
        ],
    )
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    first = _run(nb, "early-1", store, out)
    assert first.code == 0, first.stderr  # papermill's rule
    assert f"ended early at cell 'stop' (stop): {shown}" in _summary(first)
    assert _keys(effects) == ["cell/first@1", "cell/stop@1"]
    output = read_output(out)
    assert output.cells[2].metadata["nbrunbook"]["run"] == "ended" and "stopping" in _text(output.cells[2])
    assert output.metadata["nbrunbook"]["ended_early_at"] == "stop"
    assert output.cells[3].outputs == [] and "run" not in output.cells[3].metadata.get("nbrunbook", {})
    assert _status(store, "early-1") == {"cell/first": "done", "cell/stop": "done"}

    again = _run(nb, "early-1", store, out)  # the notebook decided to stop: a resume stops there too
    assert again.code == 0, again.stderr
    assert f"ended early at cell 'stop' (stop): {shown}" in _summary(again)
    assert _keys(effects) == ["cell/first@1", "cell/stop@1"]
    assert "later" not in json.dumps(_status(store, "early-1"))
    check_instance(store, "early-1", read_effects(effects))


def test_sys_exit_nonzero_is_a_failure(tmp_path: Path) -> None:
    effects = tmp_path / "effects.jsonl"
    nb = _nb(
        tmp_path / "bad_exit.ipynb",
        [
            ("imports", f"import json, sys\nEFFECTS = {str(effects)!r}", []),
            ("stop", effect_cell("sys.exit(3)\n"), []),
            ("later", effect_cell(), []),
        ],
    )
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    run = _run(nb, "bad-exit", store, out)
    assert run.code == 1, run.stderr
    assert any("cell 'stop' (stop): SystemExit: 3" in ln for ln in run.lines), run.stderr
    assert _keys(effects) == ["cell/stop@1"]
    assert _status(store, "bad-exit") == {"cell/stop": "failed"}


def _lenient(edit: str, data: dict[str, Any]) -> None:
    if edit == "kernelspec-without-name":
        del data["metadata"]["kernelspec"]["name"]
    elif edit == "unknown-metadata":
        data["metadata"]["made_up"] = {"x": 1}
        data["cells"][1]["made_up_key"] = True
    elif edit == "no-execution-count":
        del data["cells"][1]["execution_count"]


@pytest.mark.parametrize(
    ("edit", "warning"),
    [
        ("kernelspec-without-name", "'name' is a required property"),
        ("unknown-metadata", "Additional properties are not allowed"),
        ("no-execution-count", "'execution_count' is a required property"),
    ],
)
def test_a_notebook_nbclient_runs_with_a_warning_runs_here_too(tmp_path: Path, edit: str, warning: str) -> None:
    # Plain cells, so that `jupyter execute` (the oracle) runs the very same file.
    nb = _nb(tmp_path / "loose.ipynb", [("imports", "import json", []), ("only", "print('only ran')", [])])
    data = json.loads(nb.read_text())
    _lenient(edit, data)
    nb.write_text(json.dumps(data))
    assert _jupyter_execute_code(nb) == 0  # the oracle: nbclient runs it
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    run = _run(nb, "loose-1", store, out)
    assert run.code == 0, run.stderr
    warnings = [ln for ln in run.lines if "warning" in ln]
    assert len(warnings) == 1 and warning in warnings[0] and str(nb) in warnings[0], run.stderr
    # No traceback of the runner's (its frames are in the engine or nbclient), no nbformat log.
    assert "/engine/" not in run.stderr and "nbclient/" not in run.stderr, run.stderr
    assert "Notebook JSON is invalid" not in run.stderr
    output = read_output(out).cells[1]
    assert output.metadata["nbrunbook"]["run"] == "ran" and "only ran" in _text(output)
    assert _status(store, "loose-1") == {"cell/only": "done"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("del-source", "cell 2 has no source"),
        ("cell-metadata-list", "cell 2 has no metadata object"),
        ("kernelspec-number", "metadata.kernelspec is not an object"),
        ("tags-string", "cell 2: metadata.tags is not a list of strings"),
    ],
)
def test_a_notebook_that_cannot_run_is_refused_with_one_line(tmp_path: Path, edit: str, message: str) -> None:
    nb = _nb(tmp_path / "broken.ipynb", [("imports", "import json", []), ("only", "x = 1", [])])
    data = json.loads(nb.read_text())
    if edit == "del-source":
        del data["cells"][1]["source"]
    elif edit == "cell-metadata-list":
        data["cells"][1]["metadata"] = []
    elif edit == "kernelspec-number":
        data["metadata"]["kernelspec"] = 3
    else:
        data["cells"][1]["metadata"]["tags"] = "skip-execution"
    nb.write_text(json.dumps(data))
    before = nb.read_bytes()
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    run = _run(nb, "broken-1", store, out)
    assert run.code == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nbrunbook: error: {nb}: cannot be run: {message}"), lines
    assert not store.exists() and not out.exists() and nb.read_bytes() == before


def _kernelspec(root: Path, name: str, argv: list[str], env: dict[str, str] | None = None) -> dict[str, str]:
    """A kernelspec ``name`` running ``argv``; the environment that finds it."""
    spec = root / "kernels" / name
    spec.mkdir(parents=True)
    kernel = {"argv": [*argv, "-f", "{connection_file}"], "display_name": name, "language": "python", "env": env or {}}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return {"JUPYTER_PATH": str(root)}


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("exits", "it exited with status 3"),
        ("killed", "killed by SIGKILL"),
        ("crashes-on-import", "it exited with status 1"),
    ],
)
def test_a_kernel_that_dies_while_starting_is_one_line_and_exit_1(tmp_path: Path, how: str, why: str) -> None:
    if how == "exits":
        env = _kernelspec(tmp_path / "jupyter", "dies", [sys.executable, "-c", "import sys; sys.exit(3)"])
    elif how == "killed":
        code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        env = _kernelspec(tmp_path / "jupyter", "dies", [sys.executable, "-c", code])
    else:
        # The real ipykernel launcher, shadowed on its path by a module that fails to import.
        shadow = tmp_path / "shadow"
        shadow.mkdir()
        (shadow / "ipykernel_launcher.py").write_text("raise ImportError('a broken install')\n")
        argv = [sys.executable, "-m", "ipykernel_launcher"]
        env = _kernelspec(tmp_path / "jupyter", "dies", argv, env={"PYTHONPATH": str(shadow)})
    nb = _nb(tmp_path / "k.ipynb", [("only", "x = 1", [])])
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    run = _run(nb, "dies-1", store, out, "--kernel", "dies", env=env)
    assert run.code == 1, run.stderr
    assert [ln for ln in run.lines if "kernel" in ln] == [f"nbrunbook: the kernel died while starting: {why}"]
    # No traceback of ours (nbclient's, jupyter_client's); a crashing kernel's own
    # report is the kernel's stderr, which only the import crash prints.
    assert "nbclient" not in run.stderr and "jupyter_client" not in run.stderr, run.stderr
    if how != "crashes-on-import":
        assert "Traceback" not in run.stderr, run.stderr
    assert not out.exists()  # nothing ran, nothing is written


def test_a_kernel_whose_program_is_missing_is_one_line_and_exit_1(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-python")
    env = _kernelspec(tmp_path / "jupyter", "gone", [missing, "-m", "ipykernel_launcher"])
    nb = _nb(tmp_path / "k.ipynb", [("only", "x = 1", [])])
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    run = _run(nb, "gone-1", store, out, "--kernel", "gone", env=env)
    assert run.code == 1, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"nbrunbook: the kernel 'gone' could not be started: [Errno 2] No such file or directory: {missing!r}"
    ]
    assert not out.exists() and not store.exists()
