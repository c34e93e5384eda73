"""Which C allocator the store server runs with.

DuckDB's planner and executor allocate and free many small C++ objects per
statement, through the process's ``malloc``. With glibc's allocator that is
a quarter of a group commit's time here (``perf``: ``_int_malloc``, ``_int_free``,
``malloc_consolidate``); with jemalloc the commit takes ~0.8 of the time
(BENCHMARKS.md, series G). An allocator can only be chosen when a process starts, so the
server is started with jemalloc preloaded when the machine has it
(Debian/Ubuntu: ``libjemalloc2``), and with the system allocator otherwise.

``NBRUNBOOK_SERVER_MALLOC=system`` keeps the system allocator; ``auto`` (the
default) and ``jemalloc`` use jemalloc where it is found. Only the server is
affected: kernels and runs keep whatever their own process was started with.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: The environment variable that chooses the server's allocator.
ENV = "NBRUNBOOK_SERVER_MALLOC"
_CHOICES = ("auto", "jemalloc", "system")


def choice(environ: Mapping[str, str]) -> str:
    """The allocator asked for in ``environ`` (``auto`` if unset); a bad value raises ValueError naming it."""
    value = environ.get(ENV, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV}={environ.get(ENV)!r}: expected one of {', '.join(_CHOICES)}")
    return "auto" if value == "jemalloc" else value


def jemalloc_library() -> str | None:
    """The soname of the machine's jemalloc (what ``LD_PRELOAD`` takes), or None."""
    import ctypes.util  # only when a server is started: not on every client's import

    return ctypes.util.find_library("jemalloc")


def server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment to start a server process with: ``environ`` plus jemalloc preloaded, if chosen and found."""
    env = dict(environ)
    if choice(environ) == "system" or not sys.platform.startswith("linux"):
        return env  # (LD_PRELOAD is the Linux loader's; elsewhere the server keeps the system allocator)
    lib = jemalloc_library()
    if lib is None:
        return env
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    if not any("jemalloc" in os.path.basename(p) for p in preload):
        env["LD_PRELOAD"] = " ".join([lib, *preload])
    return env


def in_use(maps: str = "/proc/self/maps") -> str:
    """``jemalloc`` if this process has jemalloc mapped (preloaded), else ``system``."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "libjemalloc" in line:
                    return "jemalloc"
    except OSError:
        pass
    return "system"
