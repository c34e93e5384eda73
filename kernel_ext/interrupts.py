"""Tell a requested interrupt from a ``KeyboardInterrupt`` the cell raises itself.

While a claimed cell runs, a SIGINT handler is chained in front of whatever
handler is installed (IPython's ``default_int_handler`` for a sync cell,
ipykernel's cancelling handler for a top-level ``await`` cell). It notes that
an interrupt was requested - the frontend's interrupt, a restart (which
interrupts first), the runner's timeout or Ctrl-C all arrive as SIGINT - and
then calls the handler it displaced, so the kernel's own interrupt handling
keeps working. A cell whose run ends in an error after such a request was cut
off at an arbitrary point: its step is ``interrupted`` (DESIGN.md §3), not
``failed``.
"""

from __future__ import annotations

import _signal
import signal
import threading
from collections.abc import Callable
from typing import Any

# The C function: ``signal.signal`` maps handlers to enum members on every call
# (see guard._set_handler).
_set_handler: Callable[[int, Any], Any] = getattr(_signal, "signal", signal.signal)
_get_handler: Callable[[int], Any] = getattr(_signal, "getsignal", signal.getsignal)


class InterruptWatch:
    """A SIGINT handler for the duration of one claimed cell; ``requested`` says if SIGINT came."""

    __slots__ = ("_handler", "_previous", "installed", "requested")

    def __init__(self) -> None:
        self.requested = False
        self.installed = False
        self._previous: Any = None
        self._handler: Callable[[int, Any], None] | None = None

    def start(self) -> None:
        """Chain the handler in front of the current one (main thread only; else a no-op)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            previous = self._previous
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                # SIG_DFL or a handler not installed from Python: do what Python does for SIGINT.
                raise KeyboardInterrupt

        try:
            self._previous = _set_handler(signal.SIGINT, handler)
        except (ValueError, OSError):
            return
        self._handler = handler
        self.installed = True

    def stop(self) -> None:
        """Put the displaced handler back, unless the cell installed its own meanwhile (then keep theirs)."""
        if not self.installed:
            return
        self.installed = False
        try:
            if _get_handler(signal.SIGINT) is self._handler:
                _set_handler(signal.SIGINT, self._previous)
        except (ValueError, OSError):
            pass
        self._handler = None
