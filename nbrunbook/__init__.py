"""nbrunbook: every cell of a notebook a durable, run-once step.

Public API re-exports. Heavy modules (DuckDB, IPython, ipywidgets) load on
first use, never at import, so ``%load_ext nbrunbook`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from nbrunbook.engine.errors import (
    AttemptsExhausted,
    InstanceNotFound,
    OrderViolation,
    ParamsMismatch,
    RunbookError,
    StepBusy,
    StepFenced,
    StepInterrupted,
    StoreError,
    StoreLocked,
    StoreVersionError,
)
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.store import Store

__version__ = "0.1.0"

# Lazily imported public names -> the module that defines them.
_LAZY = {
    "context": "nbrunbook.engine.context",
    "StepContext": "nbrunbook.engine.context",
    "task": "nbrunbook.engine.branches",
    "map": "nbrunbook.engine.branches",
    "parallel": "nbrunbook.engine.branches",
}

__all__ = [
    "AttemptsExhausted",
    "InstanceNotFound",
    "OrderViolation",
    "ParamsMismatch",
    "RunbookError",
    "StepBusy",
    "StepContext",
    "StepFenced",
    "StepInterrupted",
    "Store",
    "StoreError",
    "StoreLocked",
    "StoreVersionError",
    "__version__",
    "context",
    "load_ipython_extension",
    "map",
    "open_store",
    "parallel",
    "task",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbrunbook``: register the %runbook magics and the cell guard."""
    from nbrunbook.kernel_ext.extension import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbrunbook``: remove every hook the extension installed."""
    from nbrunbook.kernel_ext.extension import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nbrunbook' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
