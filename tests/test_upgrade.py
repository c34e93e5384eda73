"""``nbrunbook upgrade``: derived ids written once, identical to the in-memory ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from nbrunbook.engine.notebook_ids import NotebookError, assign_ids, derived_id, read_json, upgrade


def _v44(path: Path) -> dict:
    nb = {
        "nbformat": 4,
        "nbformat_minor": 4,
        "metadata": {},
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": "# title"},
            {
                "cell_type": "code",
                "metadata": {},
                "source": ["x = 1\n", "print(x)"],
                "outputs": [],
                "execution_count": None,
            },
            {
                "cell_type": "code",
                "metadata": {"tags": ["t"]},
                "source": "y = 2",
                "outputs": [],
                "execution_count": None,
            },
        ],
    }
    path.write_text(json.dumps(nb))
    return nb


def test_upgrade_writes_the_derived_ids(tmp_path: Path) -> None:
    path = tmp_path / "old.ipynb"
    _v44(path)
    in_memory = read_json(str(path))
    assign_ids(in_memory)
    assert upgrade(str(path)) == 3
    written = nbformat.read(str(path), as_version=4)
    nbformat.validate(written)
    assert written.nbformat_minor == 5
    assert [c.id for c in written.cells] == [c["id"] for c in in_memory["cells"]]
    assert written.cells[1].id == derived_id("code", 0, "x = 1\nprint(x)")
    assert written.cells[2].metadata.tags == ["t"]
    assert upgrade(str(path)) == 0  # idempotent


def test_cli_upgrade_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "old.ipynb"
    _v44(path)
    out = subprocess.run(
        [sys.executable, "-m", "nbrunbook.engine.cli", "upgrade", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "wrote ids for 3 cells" in out.stdout
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    before = bad.read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "nbrunbook.engine.cli", "upgrade", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "not valid JSON" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert bad.read_bytes() == before


@pytest.mark.parametrize(
    "content, message",
    [("[]", "no cell list"), ('{"nbformat": 3, "cells": []}', "nbformat 3"), ("", "not valid JSON")],
)
def test_read_json_refusals(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "x.ipynb"
    path.write_text(content)
    with pytest.raises(NotebookError, match=message):
        read_json(str(path))
    with pytest.raises(NotebookError, match="no such file"):
        read_json(str(tmp_path / "missing.ipynb"))
