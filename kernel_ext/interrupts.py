"""Tell a requested interrupt from a ``KeyboardInterrupt`` the cell raises itself.

While a claimed cell runs, the watch notes whether SIGINT arrived - the
frontend's interrupt, a restart (which interrupts first), the runner's
timeout or Ctrl-C all arrive as SIGINT. A cell whose run ends in an error
after such a request was cut off at an arbitrary point: its step is
``interrupted`` (DESIGN.md §3), not ``failed``.

It notes it without touching the SIGINT handler where it can: Python's C
signal handler writes the signal's number to the *wakeup fd*
(``signal.set_wakeup_fd``) before any Python handler runs, so a socket pair
set as the wakeup fd for the cell's duration sees the interrupt while the
kernel's own handler (``default_int_handler`` for a sync cell, ipykernel's
cancelling handler for a top-level ``await`` cell) does the interrupting, and
the ``KeyboardInterrupt``'s traceback ends in the person's code, as without
the extension. Where the wakeup fd is taken (an event loop that handles
signals itself), a Python handler is chained in front of the current one
instead and calls it.
"""

from __future__ import annotations

import _signal
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

# The C function: ``signal.signal`` maps handlers to enum members on every call
# (see guard._set_handler).
_set_handler: Callable[[int, Any], Any] = getattr(_signal, "signal", signal.signal)
_get_handler: Callable[[int], Any] = getattr(_signal, "getsignal", signal.getsignal)
_SIGINT = int(signal.SIGINT)
#: One socket pair per process (made on first use): (read end, write end).
_PAIR: tuple[socket.socket, socket.socket] | None = None


def _pair() -> tuple[socket.socket, socket.socket]:
    global _PAIR
    if _PAIR is None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        _PAIR = (r, w)
    return _PAIR


def _drained(r: socket.socket) -> bool:
    """Read what the wakeup fd got; True if SIGINT is among it."""
    seen = False
    while True:
        try:
            data = r.recv(4096)
        except (BlockingIOError, InterruptedError):
            return seen
        except OSError:
            return seen
        if not data:
            return seen
        seen = seen or _SIGINT in data


class InterruptWatch:
    """Watches for SIGINT for the duration of one claimed cell; ``requested`` says if it came."""

    __slots__ = ("_handler", "_previous", "_requested", "_wakeup", "installed")

    def __init__(self) -> None:
        self._requested = False
        self.installed = False
        self._previous: Any = None
        self._handler: Callable[[int, Any], None] | None = None
        self._wakeup: socket.socket | None = None

    @property
    def requested(self) -> bool:
        """Whether SIGINT arrived while the watch was on."""
        if not self._requested and self._wakeup is not None:
            self._requested = _drained(self._wakeup)
        return self._requested

    def start(self) -> None:
        """Begin watching (main thread only; else a no-op)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        try:
            r, w = _pair()
            _drained(r)  # bytes of signals that came before this cell are not this cell's
            previous = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):
            previous = None
        if previous == -1:
            self._wakeup = r
            self.installed = True
            return
        if previous is not None:
            signal.set_wakeup_fd(previous)  # someone else's (an event loop's): keep it, chain a handler
        self._chain()

    def _chain(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self._requested = True
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
        """Stop watching: put back what was displaced, unless the cell replaced it meanwhile (then keep theirs)."""
        if not self.installed:
            return
        self.installed = False
        if self._wakeup is not None:
            _ = self.requested  # read the wakeup fd before it is given up
            try:
                current = signal.set_wakeup_fd(-1)
                if current != _pair()[1].fileno():
                    signal.set_wakeup_fd(current)  # the cell set its own: leave it
            except (ValueError, OSError):
                pass
            self._wakeup = None
            return
        try:
            if _get_handler(signal.SIGINT) is self._handler:
                _set_handler(signal.SIGINT, self._previous)
        except (ValueError, OSError):
            pass
        self._handler = None
