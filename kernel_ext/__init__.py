"""The IPython kernel extension: ``%load_ext nbrunbook``, ``%runbook`` and the cell guard.

For clients that drive a kernel (the headless runner), the Python API is::

    from nbrunbook.kernel_ext import attach
    attach(get_ipython(), "INSTANCE", store=PATH, notebook=PATH, params={...},
           options={"mode": "headless", "on_changed": "error", "rerun_interrupted": False})

run once in the kernel (e.g. as a silent execute_request), then each cell
is sent as an ``execute_request`` whose metadata carries ``cellId`` (the
nbformat cell id) and ``tags`` (the cell's tags, e.g. ``parameters``,
``injected-parameters``, ``runbook:always``). A refused cell fails with the
engine error's class as ``ename`` (``StepInterrupted``, ``StepBusy``,
``OrderViolation``, ``AttemptsExhausted``, ``SourceChanged``, ``StoreError``...).
A skipped cell shows its status as an output of its own - a ``display_data``
whose data holds ``nbrunbook.kernel_ext.replay.STATUS_MIME``
(``application/vnd.nbrunbook.status+json``) and a ``text/plain`` line - then
sends the IOPub messages its first run sent, in order (:mod:`.replay`).
:func:`detach` commits what is in flight and releases the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Options, Session, attach

__all__ = ["Options", "Session", "attach", "current", "detach"]


def current(shell: Any) -> Session | None:
    """The session attached to ``shell``, or ``None``."""
    from .extension import _GUARDS

    guard = _GUARDS.get(shell)
    return guard.session if guard is not None else None


def detach(shell: Any) -> Session | None:
    """Detach the instance from ``shell`` (outcomes in flight are committed first)."""
    from .extension import _GUARDS

    guard = _GUARDS.get(shell)
    return guard.detach() if guard is not None else None


def __getattr__(name: str) -> Any:
    if name in ("Options", "Session", "attach"):
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module 'nbrunbook.kernel_ext' has no attribute {name!r}")
