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

__all__ = [
    "AttemptsExhausted",
    "InstanceNotFound",
    "OrderViolation",
    "ParamsMismatch",
    "RunbookError",
    "StepBusy",
    "StepFenced",
    "StepInterrupted",
    "Store",
    "StoreError",
    "StoreLocked",
    "StoreVersionError",
    "__version__",
    "open_store",
]


def __getattr__(name: str) -> Any:
    raise AttributeError(f"module 'nbrunbook' has no attribute {name!r}")
