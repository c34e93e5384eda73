"""Named crash points for fault-injection tests (DESIGN.md §11).

A test arms a point by starting a process with ``NBRUNBOOK_CRASH_AT=<name>``
(optionally ``<name>:<n>`` to crash at the n-th hit). When the point is hit
the process kills itself with SIGKILL - no cleanup, no flush, exactly like
``kill -9``. Unarmed, a crash point costs one set lookup.
"""

from __future__ import annotations

import os
import signal
import threading

#: Every crash point in the engine, so tests can iterate over them.
POINTS = (
    "after_claim",  # the claim committed, the step's code has not run
    "before_record",  # the step's code ran, its outcome is not recorded
    "inside_commit",  # statements executed, COMMIT not issued
    "after_commit",  # COMMIT done, reply not delivered
    "before_reply",  # store server: the request is done (committed), its reply not yet sent
)

_armed: dict[str, int] = {}
_lock = threading.Lock()


def _load() -> None:
    spec = os.environ.get("NBRUNBOOK_CRASH_AT", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, count = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"unknown crash point {name!r}; known: {', '.join(POINTS)}")
        _armed[name] = int(count or 1)


_loaded = False


def crashpoint(name: str) -> None:
    """Die here with SIGKILL if the point ``name`` is armed (and its count reached)."""
    global _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                _load()
                _loaded = True
    if not _armed or name not in _armed:
        return
    with _lock:
        _armed[name] -= 1
        if _armed[name] > 0:
            return
    os.kill(os.getpid(), signal.SIGKILL)
