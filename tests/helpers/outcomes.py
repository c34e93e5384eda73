"""A notebook of cells whose outcome the tests steer: slow cells to interrupt, cells that raise.

Written into the test's directory at test time (no fixture file to keep in
step). Every guarded cell writes one effect line (``effect(name)``); a slow
cell touches ``effects.jsonl.started.NAME`` once it is running and then
holds while ``effects.jsonl.slow`` exists, so a test interrupts it at a known
point by waiting on the file, never on the clock.
"""

from __future__ import annotations

from pathlib import Path

from helpers.kernels import Notebook, wait_until
from helpers.runbooks import write_notebook

SETUP = '''# helpers: always re-run (imports and definitions only)
import asyncio
import json
import os
import time

import nbrunbook as rb


def flag(name):
    """A flag file beside the effects file."""
    return os.environ["NBRUNBOOK_TEST_EFFECTS"] + "." + name


def effect(name):
    """Append one line per side effect, with the step's idempotency key."""
    ctx = rb.context()
    line = {"cell": name, "key": ctx.idempotency_key, "step_key": ctx.step_key, "attempt": ctx.attempt}
    with open(os.environ["NBRUNBOOK_TEST_EFFECTS"], "a") as f:
        f.write(json.dumps(line) + "\\n")


def started(name):
    """Say the cell is running (the test waits for this file)."""
    open(flag("started." + name), "w").close()


def holding():
    """True while the test holds slow cells."""
    return os.path.exists(flag("slow"))
'''

SLOW = 'effect("{name}")\nstarted("{name}")\nwhile holding():\n    time.sleep(0.05)\nprint("{name} finished")'

CELLS: dict[str, str] = {
    "setup": SETUP,
    # A sync cell cut off midway.
    "sync": SLOW.format(name="sync"),
    # A top-level await cell: ipykernel cancels it instead of raising into it.
    "aw": (
        'effect("aw")\nstarted("aw")\nwhile holding():\n'
        "    await asyncio.sleep(0.05)  # wakes the loop, so ipykernel's cancel lands\n"
        'print("aw finished")'
    ),
    # Raises KeyboardInterrupt itself (no interrupt requested) while its flag exists.
    "kb": (
        'effect("kb")\nif os.path.exists(flag("kb")):\n    raise KeyboardInterrupt("raised by the cell")\n'
        'print("kb finished")'
    ),
    # Catches the interrupt and finishes.
    "caught": (
        'effect("caught")\ntry:\n    started("caught")\n    while holding():\n        time.sleep(0.05)\n'
        'except KeyboardInterrupt:\n    print("caught")'
    ),
    # Retry-safe: an interrupt is retried without asking.
    "safe": "#| runbook: retry-safe\n" + SLOW.format(name="safe"),
}


def outcome_notebook(directory: Path, cells: dict[str, str] | None = None) -> Notebook:
    """Write ``outcomes.ipynb`` (``CELLS``, or the given id -> source) and return it."""
    chosen = cells if cells is not None else CELLS
    path = write_notebook(directory / "outcomes.ipynb", [(cid, src, []) for cid, src in chosen.items()])
    return Notebook(path)


def flag_path(directory: Path, name: str) -> Path:
    """The path of a flag file the cells look at (``flag(name)`` in the kernel)."""
    return directory / f"effects.jsonl.{name}"


def wait_started(directory: Path, name: str) -> None:
    """Block until the slow cell ``name`` is running."""
    path = flag_path(directory, "started." + name)
    wait_until(path.exists, f"{name} to start")
