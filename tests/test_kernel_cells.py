"""Cell kinds, directives, manifests, saved values and output capping (no kernel needed)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from helpers.kernels import FILES
from nbrunbook.engine.errors import DuplicateCellIds
from nbrunbook.engine.model import ALWAYS, GUARDED, INJECTED, PARAMETERS
from nbrunbook.engine.notebook_ids import derived_id
from nbrunbook.kernel_ext.capture import OutputRecorder
from nbrunbook.kernel_ext.cells import SaveSpec, assigned_names, classify, parse_directives, source_hash
from nbrunbook.kernel_ext.errors import BadOption, NotebookNotFound, NotebookUnsupported
from nbrunbook.kernel_ext.manifest import find_notebook, read_notebook
from nbrunbook.kernel_ext.saved import collect, restore
from nbrunbook.kernel_ext.session import Options


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("import os\nfrom pathlib import Path", ALWAYS),
        ("def f(x):\n    return x\n\n\nclass A:\n    pass", ALWAYS),
        ('"""doc"""\nLIMIT = 10\nNAMES = ("a", -1, {"k": [1.5]})\nT: int = 3', ALWAYS),
        ("%load_ext nbrunbook\n%runbook start --instance x", ALWAYS),
        ("%%html\n<b>hi</b>", ALWAYS),
        ("", ALWAYS),
        ("# just a comment\n", ALWAYS),
        ("x = compute()", GUARDED),
        ("LIMIT = 10\nprint(LIMIT)", GUARDED),
        ("a.b = 1", GUARDED),
        ("!deploy.sh", GUARDED),
        ("%%capture out\nprint(1)", GUARDED),
        ("%run script.py", GUARDED),
        ("x = [i for i in range(3)]", GUARDED),
        ("def f(:\n", GUARDED),  # does not parse: guarded, never skipped silently
        ("#| runbook: always\nrequests.post(url)", ALWAYS),
        ("#| runbook: guarded\nimport os", GUARDED),
    ],
)
def test_kind_from_source(source: str, kind: str) -> None:
    assert classify(source).kind == kind


def test_kind_and_options_from_tags_and_directives() -> None:
    assert classify("x = f()", ["parameters"]).kind == PARAMETERS
    assert classify("x = f()", ["injected-parameters"]).kind == INJECTED
    assert classify("x = f()", ["runbook:always"]).kind == ALWAYS
    spec = classify("x = f()", ["runbook:retry-safe", "runbook:unordered"])
    assert spec.kind == GUARDED and spec.retry_safe and spec.unordered
    spec = classify("#| runbook: retry-safe save=model:pickle,report name=train\n# Train\nmodel = fit()")
    assert spec.retry_safe and spec.name == "train"
    assert spec.save == (SaveSpec("model", True), SaveSpec("report", False))
    assert spec.pickle_names == frozenset({"model"})
    spec = classify("#| runbook: sometimes save=1x,y:json\nx = f()", ["runbook:nope"])
    assert spec.save == ()
    assert any("unknown directive 'sometimes'" in p for p in spec.problems)
    assert any("'1x' is not a Python name" in p for p in spec.problems)
    assert any("only ':pickle'" in p for p in spec.problems)
    assert any("unknown tag 'runbook:nope'" in p for p in spec.problems)
    # Directives are read only from the leading comment block.
    flags, _, _ = parse_directives("x = 1\n#| runbook: always")
    assert flags == set()


def test_names_and_hash() -> None:
    tree = ast.parse(
        "a = 1\nb, (c, d) = f()\ne += 1\nfor i in range(3):\n    g = i\nwith open(p) as h:\n    pass\n"
        "def fn():\n    inner = 1\nclass K:\n    attr = 2\nx.y = 3\nz[0] = 4\n_private = 5\nimport os\n"
        "lst = [k for k in range(2)]\nif (w := 3):\n    pass\n"
    )
    assert assigned_names(tree) == ["a", "b", "c", "d", "e", "i", "g", "h", "lst", "w"]
    assert source_hash("x = 1\r\n") == source_hash("x = 1\n\n") == source_hash("x = 1")
    assert source_hash("x = 1") != source_hash("x = 2")
    assert classify("# Load the data\ndf = load()").name == "Load the data"
    assert classify("df = load_a_rather_long_named_thing_from_somewhere(1, 2)").name.endswith("…")


def test_read_notebook(tmp_path: Path) -> None:
    nb = read_notebook(FILES / "kinds.ipynb")
    assert nb.runbook == "kinds"
    kinds = {c.cell_id: c.spec.kind for c in nb.cells}
    assert kinds == {
        "k-imports": ALWAYS,
        "k-always-tag": ALWAYS,
        "k-always-dir": ALWAYS,
        "k-params": PARAMETERS,
        "k-guarded": GUARDED,
        "k-magic": ALWAYS,
        "k-save": GUARDED,
    }
    manifest = nb.manifest_cells()
    assert [c.index for c in manifest] == list(range(7)) and manifest[0].source_hash == nb.cells[0].source_hash
    with pytest.raises(DuplicateCellIds) as dup:
        read_notebook(FILES / "dup_ids.ipynb")
    assert dup.value.ids == ["other", "same"]
    old = read_notebook(FILES / "no_ids.ipynb")  # nbformat 4.4: ids derived from order + source
    assert old.derived_ids
    assert [c.cell_id for c in old.cells] == [derived_id("code", c.index, c.source) for c in old.cells]
    v3 = {"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": []}
    (tmp_path / "v3.ipynb").write_text(json.dumps(v3))
    with pytest.raises(NotebookUnsupported, match="nbformat 3"):
        read_notebook(tmp_path / "v3.ipynb")
    (tmp_path / "bad.ipynb").write_text("[]")
    with pytest.raises(NotebookUnsupported, match="is not a notebook"):
        read_notebook(tmp_path / "bad.ipynb")
    with pytest.raises(NotebookUnsupported, match="cannot be read"):
        read_notebook(tmp_path / "missing.ipynb")


def test_find_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "run.ipynb").write_text("{}")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    with pytest.raises(NotebookNotFound) as err:
        find_notebook(None, {}, cwd=str(tmp_path))
    assert "JPY_SESSION_NAME is not set" in str(err.value) and "--notebook PATH" in str(err.value)
    assert find_notebook("run.ipynb", {}, cwd=str(tmp_path)) == str(tmp_path / "run.ipynb")
    monkeypatch.setenv("JPY_SESSION_NAME", "elsewhere/run.ipynb")
    assert find_notebook(None, {}, cwd=str(tmp_path)) == str(tmp_path / "run.ipynb")
    monkeypatch.setenv("JPY_SESSION_NAME", "elsewhere/other.ipynb")
    ns = {"__vsc_ipynb_file__": str(tmp_path / "run.ipynb")}
    assert find_notebook(None, ns, cwd=str(tmp_path)) == str(tmp_path / "run.ipynb")
    with pytest.raises(NotebookNotFound, match="is not a notebook file here"):
        find_notebook(None, {}, cwd=str(tmp_path))


def test_saved_values_never_pickle_without_opt_in() -> None:
    class Obj:
        pass

    ns = {"a": 1, "t": (1, [2]), "o": Obj(), "f": print, "big": "x" * 100, "m": {1: "k"}}
    values, unsaved, warnings = collect(ns, ["a", "t", "o", "f", "big", "gone"], [SaveSpec("m", True)], limit=50)
    assert set(values) == {"a", "t", "m"} and values["m"].encoding == "pickle"
    assert set(unsaved) == {"o", "big"} and "save=o:pickle" in unsaved["o"]
    assert warnings == []
    _, _, warnings = collect(ns, [], [SaveSpec("o"), SaveSpec("nope")], limit=50)
    assert any("not JSON- or Arrow-serialisable" in w for w in warnings) and any("no variable" in w for w in warnings)
    out: dict[str, object] = {}
    restored, problems = restore(out, values)  # the pickle is refused without the cell's opt-in
    assert sorted(restored) == ["a", "t"] and out == {"a": 1, "t": (1, [2])}
    assert problems and "m not restored" in problems[0]
    restored, problems = restore(out, values, pickle_names=frozenset({"m"}))
    assert "m" in restored and out["m"] == {1: "k"} and not problems


def test_output_recorder_caps_and_counts_what_it_dropped() -> None:
    rec = OutputRecorder(limit=120)
    rec.message("stream", {"name": "stdout", "text": "hello "}, None, None)
    rec.message("stream", {"name": "stdout", "text": "world\n"}, None, None)
    rec.message("stream", {"name": "stderr", "text": "x" * 200}, None, None)
    view = {"text/plain": "p", "application/vnd.jupyter.widget-view+json": {"model_id": "m"}}
    rec.message("execute_result", {"data": view, "metadata": {}}, None, None)
    items = rec.finish()
    # Chunks stay as sent (a frontend joins them itself); the result is kept apart, widget view and all.
    assert [i.get("c", {}).get("text") for i in items] == ["hello ", "world\n", None]
    assert items[-1] == {"t": "execute_result"}  # where the result came: what followed it follows it again
    assert rec.dropped > 200 and rec.result == {"data": view, "metadata": {}}
    rec = OutputRecorder()
    rec.message("comm_msg", {"comm_id": "c", "data": {}}, {"version": "2.1.0"}, [b"\x00\x01"])
    expected = {"t": "comm_msg", "c": {"comm_id": "c", "data": {}}, "m": {"version": "2.1.0"}, "b": ["AAE="]}
    assert rec.finish() == [expected]  # buffers (a widget's bytes) kept as base64


def test_options_are_checked() -> None:
    assert Options.from_mapping({"on-changed": "error", "rerun_interrupted": True}).on_changed == "error"
    with pytest.raises(BadOption, match="unknown option"):
        Options.from_mapping({"colour": "red"})
    with pytest.raises(BadOption, match="is not one of error, rerun, skip"):
        Options.from_mapping({"on_changed": "ignore"})
    with pytest.raises(BadOption, match="positive"):
        Options.from_mapping({"wait_timeout": 0})
