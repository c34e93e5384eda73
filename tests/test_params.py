"""Parameters behave like papermill's: typing, YAML, merge order, injection placement."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from nbrunbook.engine.params import BadParameter, collect, inject, python_source, resolve_type


@pytest.mark.parametrize(
    "raw, value",
    [
        ("True", True),
        ("False", False),
        ("None", None),
        ("12", 12),
        ("-3", -3),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("abc", "abc"),
        ("true", "true"),
        ("", ""),
        ("0x10", "0x10"),
    ],
)
def test_typed_like_papermill(raw: str, value: object) -> None:
    assert resolve_type(raw) == value and type(resolve_type(raw)) is type(value)


def test_papermill_agrees() -> None:
    cli = pytest.importorskip("papermill.cli")
    for raw in ("True", "None", "7", "7.0", "x", "1_000", " 3 "):
        assert resolve_type(raw) == cli._resolve_type(raw)


def test_merge_order(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("a: 1\nb: [1, 2]\nc: from-file\n")
    got = collect(yaml_strings=["a: 0\nd: {x: 1}"], files=[str(f)], raw=[("c", "5")], typed=[("e", "5")])
    assert got == {"a": 1, "b": [1, 2], "c": "5", "d": {"x": 1}, "e": 5}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"typed": [("1abc", "x")]}, "not a valid Python name"),
        ({"typed": [("class", "x")]}, "not a valid Python name"),
        ({"typed": [("x", "nan")]}, "cannot be a fixed parameter"),
        ({"yaml_strings": ["[1, 2]"]}, "expected a mapping"),
        ({"yaml_strings": ["a: [unclosed"]}, "not valid YAML"),
        ({"yaml_strings": ["d: 2026-11-22"]}, "not plain data"),
        ({"files": ["/nonexistent/p.yaml"]}, "cannot read"),
    ],
)
def test_bad_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(BadParameter, match=message):
        collect(**kwargs)


def _nb(*cells: tuple[str, list[str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    for src, tags in cells:
        c = nbformat.v4.new_code_cell(src)
        c.metadata["tags"] = tags
        nb.cells.append(c)
    return nb


def test_injected_after_the_parameters_cell() -> None:
    nb = _nb(("import os", []), ("x = 1", ["parameters"]), ("print(x)", []))
    out = inject(nb, {"x": 2, "s": "a'b"})
    assert [c.source.splitlines()[0] for c in out.cells] == ["import os", "x = 1", "# Parameters", "print(x)"]
    assert out.cells[2].metadata.tags == ["injected-parameters"]
    assert out.cells[2].id == "injected-parameters"
    ns: dict = {}
    exec(out.cells[2].source, ns)
    assert ns["x"] == 2 and ns["s"] == "a'b"
    assert len(nb.cells) == 3  # the input was not modified


def test_injected_first_without_parameters_cell_and_replaces_old_injection() -> None:
    nb = _nb(("print(1)", []))
    out = inject(nb, {"x": 1})
    assert out.cells[0].metadata.tags == ["injected-parameters"]
    again = inject(out, {"x": 3})
    assert len(again.cells) == 2 and "x = 3" in again.cells[0].source
    assert inject(nb, {}).cells == nb.cells


def test_python_source_literals() -> None:
    src = python_source({"a": [1, {"b": None}], "t": True, "f": 0.5})
    ns: dict = {}
    exec(src, ns)
    assert ns["a"] == [1, {"b": None}] and ns["t"] is True and ns["f"] == 0.5
