"""Stopping a headless run: a cell timeout, Ctrl-C (SIGINT) or SIGTERM.

Each of them cuts the running cell off at an arbitrary point, so the step's
outcome is unknown: the kernel is *interrupted* (``interrupt_kernel``, as
JupyterLab's stop button does), which makes the guard record the step
``interrupted`` (DESIGN.md §3). A kernel that does not answer the interrupt
within :data:`GRACE` seconds (a cell in C code that ignores SIGINT, a cell
that catches KeyboardInterrupt and goes on) is killed; the store then finds
the dead owner's step and marks it ``interrupted`` as after ``kill -9``. A
second Ctrl-C kills the kernel at once.

:class:`Stopper` holds what happened; :class:`.runner.RunbookClient` asks it
after each cell whether the run must end and with which exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import typing as t
from collections.abc import Iterator

from . import cli

#: Seconds the kernel gets to answer an interrupt before it is killed.
#: ``NBRUNBOOK_INTERRUPT_GRACE`` overrides it (tests use a short one).
GRACE = 10.0

#: Exit codes of a run stopped by a signal: 128 + the signal, as a shell reports it.
EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def grace() -> float:
    """The interrupt grace period in seconds (see :data:`GRACE`)."""
    try:
        value = float(os.environ.get("NBRUNBOOK_INTERRUPT_GRACE", GRACE))
    except ValueError:
        return GRACE
    return value if value > 0 else GRACE


class Stopped(KeyboardInterrupt):
    """A signal arrived while no kernel was running yet (start-up, validation).

    A ``KeyboardInterrupt`` so that code which already cleans up after Ctrl-C
    (the kernel started early, temporary files) does so for SIGTERM too.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def code(self) -> int:
        """The exit status: 130 for SIGINT, 143 for SIGTERM."""
        return EXIT_FOR_SIGNAL.get(signal.Signals(self.signum), 128 + self.signum)


def _raise_stopped(signum: int, frame: t.Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def outside_the_loop() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Stopped` while this block runs (main thread only)."""
    try:
        previous = {s: signal.signal(s, _raise_stopped) for s in EXIT_FOR_SIGNAL}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def saved_handlers() -> dict[int, t.Any]:
    """The current SIGINT and SIGTERM handlers, to restore after the run."""
    return {int(s): signal.getsignal(s) for s in EXIT_FOR_SIGNAL}


class Stopper:
    """Interrupts (then kills) the run's kernel on a cell timeout or a signal; remembers why.

    ``km`` is the run's ``AsyncKernelManager``. Every method runs on the
    event loop of the run.
    """

    def __init__(self, km: t.Any, restore: dict[int, t.Any] | None = None, grace_seconds: float | None = None) -> None:
        self.km = km
        #: The handlers to put back when the run ends (taken before nbclient set its own).
        self.restore = restore if restore is not None else saved_handlers()
        self.grace = grace_seconds if grace_seconds is not None else grace()
        #: The signal that stops the run (SIGINT / SIGTERM), if one arrived.
        self.signum: int | None = None
        #: (the cell, its timeout in seconds) if a cell timed out.
        self.timed_out: tuple[t.Any, float] | None = None
        #: The kernel was killed because it did not answer the interrupt in time.
        self.killed = False
        self._watchdog: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------- signals

    def install(self) -> None:
        """Handle SIGINT and SIGTERM on the running loop (a no-op off the main thread)."""
        loop = asyncio.get_running_loop()
        try:
            for s in EXIT_FOR_SIGNAL:
                loop.add_signal_handler(s, self._on_signal, int(s))
        except (ValueError, RuntimeError, NotImplementedError):
            return
        self._loop = loop

    def uninstall(self) -> None:
        """Put back the SIGINT and SIGTERM handlers of before the run (see ``restore``)."""
        if self._loop is None:
            return
        for s in EXIT_FOR_SIGNAL:
            self._loop.remove_signal_handler(s)
            if self.restore.get(int(s)) is not None:
                signal.signal(s, self.restore[int(s)])
        self._loop = None

    def _on_signal(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            self._spawn(self._interrupt())
        else:
            # A second Ctrl-C: the user does not want to wait for the cell.
            self._spawn(self._kill())

    # ------------------------------------------------------------- timeout

    async def on_timeout(self, cell: t.Any, timeout: float) -> None:
        """A cell ran past ``--cell-timeout``: interrupt it (once)."""
        if self.timed_out is None:
            self.timed_out = (cell, timeout)
            await self._interrupt()

    # -------------------------------------------------------------- state

    @property
    def stopping(self) -> bool:
        """True once a timeout or a signal asked the run to end."""
        return self.signum is not None or self.timed_out is not None

    @property
    def exit_code(self) -> int:
        """The run's exit status: 130 / 143 for a signal, 5 (interrupted step) for a timeout."""
        if self.signum is not None:
            return EXIT_FOR_SIGNAL.get(signal.Signals(self.signum), 128 + self.signum)
        return cli.EXIT_INTERRUPTED

    @property
    def signal_name(self) -> str:
        """``SIGINT`` / ``SIGTERM`` (empty without a signal)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def answered(self) -> None:
        """The running cell's reply arrived: no kill is needed."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    # ------------------------------------------------------------ actions

    def _spawn(self, coro: t.Coroutine[t.Any, t.Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # a reference, or the loop may drop the task
        task.add_done_callback(self._tasks.discard)

    async def _interrupt(self) -> None:
        if not self.km.has_kernel:
            return
        try:
            await self.km.interrupt_kernel()
        except Exception:  # noqa: BLE001 - a kernel already gone needs no interrupt
            return
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._kill_after_grace())

    async def _kill_after_grace(self) -> None:
        await asyncio.sleep(self.grace)
        await self._kill()

    async def _kill(self) -> None:
        """Kill the kernel process now; nbclient then sees it dead and the cell ends."""
        provisioner = getattr(self.km, "provisioner", None)
        if provisioner is None or not self.km.has_kernel:
            return
        self.killed = True
        with contextlib.suppress(Exception):
            await provisioner.kill()
