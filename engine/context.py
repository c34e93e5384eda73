"""The step a piece of code is running in: ``nbrunbook.context()``.

The cell guard binds a :class:`StepContext` while a claimed cell runs; a
branch (``rb.task``/``rb.map``) binds its own for the branch's code. It lives
in a ``contextvars.ContextVar`` so it follows the code into worker threads
that copy the context (the branch executors do) and into ``await``.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import RunbookError

if TYPE_CHECKING:
    from .store import Store


class NoStepContext(RunbookError):
    """``context()`` was called outside a guarded cell or a branch."""

    def __init__(self) -> None:
        super().__init__(
            "not inside a runbook step: call nbrunbook.context() from a guarded cell of a started "
            "instance (%runbook start) or from inside rb.task/rb.map"
        )


@dataclass
class StepContext:
    """Who is running which step, and how to reach its store."""

    instance_id: str
    step_key: str
    invocation: int
    attempt: int
    epoch: int
    idempotency_key: str
    params: Mapping[str, Any]
    run_id: str
    owner: str
    store: Store | None = field(default=None, repr=False)
    #: Options for branches started from this step (lease, retry policy, ...).
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    _names: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def next_index(self, name: str) -> int:
        """The per-parent counter for same-name calls, taken at call time in call order."""
        with self._lock:
            n = self._names.get(name, 0)
            self._names[name] = n + 1
            return n


_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("nbrunbook_step", default=None)
# The running cell, for code that reaches us from threads the user started
# without copying the context (a kernel runs one cell at a time).
_cell: StepContext | None = None


def context() -> StepContext:
    """The step being run right now (raises ``NoStepContext`` outside one)."""
    ctx = current()
    if ctx is None:
        raise NoStepContext()
    return ctx


def current() -> StepContext | None:
    """The step being run right now, or ``None``."""
    return _current.get() or _cell


def set_cell(ctx: StepContext | None) -> None:
    """Set (or clear) the running cell's context, the fallback of :func:`current`."""
    global _cell
    _cell = ctx


@contextmanager
def bound(ctx: StepContext) -> Iterator[StepContext]:
    """Bind ``ctx`` as the current step for the duration of the block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def bind(ctx: StepContext | None) -> contextvars.Token[StepContext | None]:
    """Bind without a block (the guard binds in pre_run_cell, unbinds in post_run_cell)."""
    return _current.set(ctx)


def unbind(token: contextvars.Token[StepContext | None]) -> None:
    """Undo :func:`bind`."""
    _current.reset(token)
