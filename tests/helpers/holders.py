"""A foreign process holding a DuckDB file open: what a store must refuse clearly."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOLD = "import duckdb, sys; c = duckdb.connect({path!r}); print('held', flush=True); sys.stdin.read()"


@contextmanager
def foreign_holder(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A plain ``duckdb`` process that has ``path`` open (and locked) until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD.format(path=str(path))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()  # its read returns: it exits and lets go of the file
        proc.wait(timeout=60)
        proc.stdout.close()
