"""Notebooks and CLI runs for the headless-runner tests (real kernels, subprocesses)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

EFFECT = (
    "ctx = __import__('nbrunbook').context()\n"
    "with open(EFFECTS, 'a') as fh:\n"
    "    fh.write(json.dumps({{'step_key': ctx.step_key, 'key': ctx.idempotency_key, 'attempt': ctx.attempt, "
    "'owner': ctx.owner, 'epoch': ctx.epoch}}) + '\\n')\n"
    "{body}"
)


def effect_cell(body: str = "") -> str:
    """A guarded cell that appends its step to the effects file, then runs ``body``."""
    return EFFECT.format(body=body)


def write_notebook(path: Path, cells: list[tuple[str, str, list[str]]], *, v44: bool = False) -> Path:
    """Write a notebook of (id, source, tags) code cells (no ids at all when ``v44``)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for cell_id, source, tags in cells:
        c = nbformat.v4.new_code_cell(source)
        c.metadata["tags"] = tags
        c["id"] = cell_id
        nb.cells.append(c)
    data = json.loads(json.dumps(nb))  # not nbformat.writes: it would "repair" duplicate ids
    if v44:
        data["nbformat_minor"] = 4
        for c in data["cells"]:
            c.pop("id", None)
    path.write_text(json.dumps(data, indent=1))
    return path


def standard(path: Path, effects: Path) -> Path:
    """imports / parameters / three effect cells, the middle one failing while a flag file exists."""
    flag = path.parent / "fail.flag"
    return write_notebook(
        path,
        [
            ("imports", "import json, os, time", []),
            ("params", f"EFFECTS = {str(effects)!r}\ngreeting = 'hello'\ncount = 1", ["parameters"]),
            ("first", effect_cell("print('first ran', greeting)\nvalue = 41\n"), []),
            (
                "second",
                effect_cell(f"if os.path.exists({str(flag)!r}):\n    raise RuntimeError('flag set')\nvalue += 1\n"),
                [],
            ),
            ("third", effect_cell("print('third sees', value, count)\n"), []),
        ],
    )


@dataclass
class Run:
    """The result of one ``nbrunbook`` CLI process."""

    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """stderr lines without the kernel's own warnings."""
        return [ln for ln in self.stderr.splitlines() if ln.startswith("nbrunbook")]


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> Run:
    """Run ``nbrunbook ARGS`` (the installed entry point's module) to completion."""
    out = subprocess.run(
        [sys.executable, "-m", "nbrunbook.engine.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    return Run(out.returncode, out.stdout, out.stderr)


def start_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``nbrunbook ARGS`` without waiting (``env`` is added to this process's environment)."""
    return subprocess.Popen(
        [sys.executable, "-m", "nbrunbook.engine.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def digest(path: Path) -> str:
    """A file's content hash (the user's notebook must never change)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_output(path: Path) -> Any:
    """An output notebook."""
    return nbformat.read(str(path), as_version=4)
