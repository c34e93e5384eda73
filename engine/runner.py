"""The headless runner: nbclient's ``NotebookClient`` advancing a runbook instance.

It is nbclient with three additions, not a reimplementation of kernel
messaging: (1) before the first cell it loads the extension and attaches the
instance in the kernel (one silent ``execute_request``); (2) every cell's
``execute_request`` carries the cell's id and tags in its metadata, like
JupyterLab sends them, so the guard knows which step it is; (3) each cell's
runbook outcome (ran, skipped, failed, refused) is read from the reply and
kept in the output notebook's cell metadata under ``nbrunbook``.

Refusals come back from the guard as errors whose ``ename`` is the engine's
error class; :data:`EXIT_FOR_ENAME` maps them to the exit codes of
DESIGN.md §6.

The reply decides how the run goes on, with nbclient's and papermill's rules:
a ``raises-exception`` cell's error is expected, ``--allow-errors`` goes on
past failed cells, ``skip-execution`` cells are not sent, ``SystemExit`` with
code 0 / None ends the run successfully (papermill). A cell timeout, Ctrl-C
or SIGTERM interrupts the kernel (:mod:`.run_signals`): the cut-off step is
``interrupted`` and the run stops for a person's decision.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import time
import typing as t
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbclient.util import run_sync

from . import cli
from .errors import OutputNotWritten
from .kernel import MetadataKernelClient, RunbookKernelManager, last_words

if t.TYPE_CHECKING:
    from .run_signals import Stopper

#: Guard refusals (the engine error class names) -> exit codes.
EXIT_FOR_ENAME = {
    "StepInterrupted": cli.EXIT_INTERRUPTED,
    "StepBusy": cli.EXIT_TIMEOUT,
    "ParamsMismatch": cli.EXIT_BAD_INPUT,
    "RunbookMismatch": cli.EXIT_BAD_INPUT,
    "BadParameter": cli.EXIT_BAD_INPUT,
    "InvalidName": cli.EXIT_BAD_INPUT,
    "DuplicateCellIds": cli.EXIT_BAD_INPUT,
    "NotebookUnsupported": cli.EXIT_BAD_INPUT,
    "BadOption": cli.EXIT_BAD_INPUT,
    "SourceChanged": cli.EXIT_BAD_INPUT,
    "OrderViolation": cli.EXIT_BAD_INPUT,
    "InstanceNotFound": cli.EXIT_BAD_INPUT,
    "StoreError": cli.EXIT_STORE,
    "StoreLocked": cli.EXIT_STORE,
    "StoreUnavailable": cli.EXIT_STORE,
    "StoreVersionError": cli.EXIT_STORE,
    "ProtocolError": cli.EXIT_STORE,
}

#: ``SystemExit`` values that end a run successfully: papermill's ``""`` and
#: ``"0"`` (``sys.exit()``, ``sys.exit(0)``, ``raise SystemExit``) and ``None``.
SUCCESS_EXITS = ("", "0", "None")


@dataclass
class CellOutcome:
    """What happened to one code cell in this run."""

    index: int
    cell_id: str
    name: str
    status: str  # ran | skipped | failed | refused | always | not-run | ended | interrupted
    seconds: float = 0.0
    ename: str | None = None
    evalue: str | None = None
    step: dict[str, t.Any] = field(default_factory=dict)


class RunnerError(Exception):
    """The run stopped; ``code`` is the exit status, ``message`` one line for stderr."""

    def __init__(self, code: int, message: str, *, resolve: str | None = None) -> None:
        self.code = code
        self.message = message
        #: The cell whose step is interrupted and needs ``nbrunbook resolve``.
        self.resolve = resolve
        super().__init__(message)


class KernelStartFailed(RunnerError):
    """The kernel died before it answered: nothing ran, so nothing is written."""


class AttachRefused(RunnerError):
    """The instance refused this run before any cell ran (other parameters, another runbook, its store).

    Nothing ran, so the run changes no file: no output notebook is written.
    """


def _error_line(evalue: str | None) -> str:
    return (evalue or "").strip().splitlines()[0] if evalue else ""


class RunbookClient(NotebookClient):
    """Execute a runbook notebook as one advance of an instance (see module doc)."""

    def __init__(
        self,
        nb: t.Any,
        *,
        notebook_path: str,
        instance_id: str,
        store: str,
        params: Mapping[str, t.Any] | None,
        options: Mapping[str, t.Any],
        force_params: bool = False,
        runbook: str | None = None,
        on_cell: Callable[[CellOutcome, int], None] | None = None,
        before_cell: Callable[[int, t.Any], None] | None = None,
        before_attach: Callable[[RunbookClient], t.Awaitable[None]] | None = None,
        **kw: t.Any,
    ) -> None:
        # nbclient's ``timeout`` is an integer trait; ``--cell-timeout 2.5`` is not.
        timeout = kw.pop("timeout", None)
        kw.setdefault("kernel_manager_class", RunbookKernelManager)
        kw.setdefault("store_widget_state", True)
        super().__init__(nb, **kw)
        self.cell_timeout: float | None = float(timeout) if timeout and timeout > 0 else None
        if kw.get("km") is not None:
            # A kernel started for this run (kernel.start_early): the client shuts
            # it down at the end, as nbclient does with a kernel it starts itself.
            self.owns_km = True
        self.notebook_path = notebook_path
        self.instance_id = instance_id
        self.store_location = store
        self.params = params
        self.run_options = dict(options)
        self.force_params = force_params
        self.runbook = runbook
        self.on_cell = on_cell
        self.before_cell = before_cell
        # Awaited once the kernel runs, before the instance is attached: work the
        # caller started alongside the kernel's start (the store's first look).
        self.before_attach = before_attach
        self.outcomes: list[CellOutcome] = []
        #: Set while the run executes: interrupts the kernel on a timeout or a signal.
        self.stopper: Stopper | None = None
        #: The cell whose ``sys.exit(0)`` ended the run early (papermill's rule).
        self.ended: CellOutcome | None = None
        self._reply: dict[str, t.Any] | None = None
        self._signals_before: dict[int, t.Any] | None = None

    # ------------------------------------------------------------ kernel side

    async def _run_silently(self, code: str) -> dict[str, t.Any]:
        """Execute setup code in the kernel; return the reply content (raises nothing)."""
        kc = t.cast(MetadataKernelClient, self.kc)
        kc.next_metadata = {"nbrunbook": {"setup": True}}
        msg_id = kc.execute(code, silent=False, store_history=False, stop_on_error=False)
        reply = await self.async_wait_for_reply(msg_id)
        content: dict[str, t.Any] = reply["content"] if reply else {"status": "error", "ename": "Timeout"}
        return content

    async def _attach(self) -> None:
        args = {
            "instance_id": self.instance_id,
            "store": self.store_location,
            "notebook": self.notebook_path,
            "params": self.params,
            "options": self.run_options,
            "force_params": self.force_params,
            "runbook": self.runbook,
        }
        code = (
            "def __nbrunbook_attach():\n"
            "    import json\n"
            "    from nbrunbook.kernel_ext import attach\n"
            f"    kw = json.loads({json.dumps(json.dumps(args))})\n"
            "    s = attach(get_ipython(), kw.pop('instance_id'), **kw)\n"
            "    return {'instance_id': s.instance_id, 'created': s.created, 'run_id': s.run_id}\n"
            "__nbrunbook_attached = __nbrunbook_attach()\n"
            "del __nbrunbook_attach\n"
        )
        reply = await self._run_silently(code)
        if reply.get("status") != "ok":
            ename = str(reply.get("ename", "Error"))
            raise AttachRefused(
                EXIT_FOR_ENAME.get(ename, cli.EXIT_FAILED), f"{ename}: {_error_line(reply.get('evalue'))}"
            )
        await self._run_silently("del __nbrunbook_attached")

    async def _detach(self) -> None:
        await self._run_silently("from nbrunbook.kernel_ext import detach as __d; __d(get_ipython()); del __d")

    # -------------------------------------------------------------- the run

    def _get_timeout(self, cell: t.Any) -> int | None:
        # ``--cell-timeout`` is for cells: the silent setup requests (attach,
        # detach) wait as long as they need. (A float: nbclient only adds it to
        # the clock and passes it to ``get_msg``.)
        return t.cast(int, self.cell_timeout) if cell is not None else None

    async def _async_handle_timeout(self, timeout: int, cell: t.Any = None) -> dict[str, t.Any] | None:
        # nbclient raises CellTimeoutError (or interrupts, with a trait set);
        # the run interrupts, so the step is recorded interrupted, and kills the
        # kernel if it does not answer (run_signals.Stopper).
        assert self.stopper is not None
        await self.stopper.on_timeout(cell, timeout)
        return None

    async def _check_raise_for_error(self, cell: t.Any, cell_index: int, exec_reply: dict[str, t.Any] | None) -> None:
        # The reply decides the cell's outcome (_run_cells), never nbclient's
        # allow-errors rules alone: a guard refusal stops even a raises-exception cell.
        self._reply = exec_reply["content"] if exec_reply else None

    async def async_start_new_kernel_client(self) -> t.Any:
        """nbclient's, with a kernel that dies while starting turned into one :class:`RunnerError`."""
        from .run_signals import Stopper

        process = getattr(getattr(self.km, "provisioner", None), "process", None)
        # The run's signal handlers replace nbclient's (which only clean the
        # kernel up) before the wait for the kernel, which may be long.
        self.stopper = Stopper(self.km, restore=self._signals_before)
        self.stopper.install()
        try:
            return await super().async_start_new_kernel_client()
        except (RuntimeError, TimeoutError) as exc:
            self.stopper.uninstall()
            # nbclient already cleaned the kernel up, but leaves its atexit
            # cleanup registered, which would fail on the missing manager at exit.
            atexit.unregister(self._cleanup_kernel)
            code = process.poll() if process is not None else None
            if code is None:
                why = str(exc) or type(exc).__name__
            elif code < 0:
                why = f"killed by {signal.Signals(-code).name}"
            else:
                why = f"it exited with status {code}"
            if self.stopper.signum is not None:
                message = f"stopped by {self.stopper.signal_name} while the kernel was starting; no cell ran"
                raise KernelStartFailed(self.stopper.exit_code, message) from None
            raise KernelStartFailed(cli.EXIT_FAILED, f"the kernel died while starting: {why}") from None

    async def async_run(self) -> int:
        """Execute every cell as one advance of the instance; returns the exit code."""
        from .run_signals import Stopper, saved_handlers

        self.reset_execution_trackers()
        self.stopper = None
        # Before nbclient sets its own (which only clean the kernel up): put back at the end.
        self._signals_before = saved_handlers()
        km = self.km  # nbclient drops it when the kernel is cleaned up; a dead kernel's stderr is read after
        try:
            async with self.async_setup_kernel(cwd=self.resources.get("metadata", {}).get("path")):
                if self.stopper is None:  # the kernel client was there already
                    self.stopper = Stopper(self.km, restore=self._signals_before)
                    self.stopper.install()
                try:
                    if self.before_attach is not None:
                        await self.before_attach(self)
                    await self._attach()
                    code = await self._run_cells()
                    if code == cli.EXIT_OK:
                        await self._detach()
                    self.set_widgets_metadata()
                    return code
                except (RunnerError, DeadKernelError) as exc:
                    stopped = isinstance(exc, RunnerError) and exc.code == self.stopper.exit_code
                    if self.stopper.signum is not None and not stopped:
                        # The signal, not what it caused (an interrupted attach), ends the run.
                        raise self._stopped(None) from None
                    if isinstance(exc, DeadKernelError):
                        raise self._died(km, exc) from None
                    raise
                finally:
                    self.stopper.answered()
                    self.stopper.uninstall()
        except DeadKernelError as exc:
            raise self._died(km, exc) from None

    @staticmethod
    def _died(km: t.Any, exc: DeadKernelError) -> RunnerError:
        """One line for a kernel that died mid-run, with its last words (its stderr is kept off the terminal)."""
        words = last_words(km)
        return RunnerError(cli.EXIT_FAILED, f"the kernel died: {exc}" + (f" ({words})" if words else ""))

    async def _run_cells(self) -> int:
        kc = self.kc
        stopper = self.stopper
        assert isinstance(kc, MetadataKernelClient), "the kernel client cannot send cell ids"
        assert stopper is not None
        for index, cell in enumerate(self.nb.cells):
            if cell.cell_type != "code":
                continue
            if stopper.signum is not None:  # between two cells: nothing was cut off
                raise self._stopped(None)
            if self.before_cell is not None:
                self.before_cell(index, cell)
            kc.next_metadata = {
                "cellId": cell.get("id"),
                "tags": list(cell.metadata.get("tags", [])),
            }
            start = time.monotonic()
            self._reply = None
            died = False
            try:
                await self.async_execute_cell(cell, index, execution_count=self.code_cells_executed + 1)
            except DeadKernelError:
                if not stopper.stopping:
                    raise
                died = True  # killed by the stopper: the cell was cut off
            kc.next_metadata = None  # not sent when nbclient skips the cell (skip-execution, empty)
            stopper.answered()
            outcome = self._outcome(index, cell, time.monotonic() - start, self._reply, died)
            self.outcomes.append(outcome)
            note: dict[str, t.Any] = {"run": outcome.status}
            if outcome.ename:
                note["error"] = outcome.ename
            if outcome.status in ("ran", "skipped") and outcome.ename:
                note["expected_error"] = True  # raises-exception
            if outcome.step.get("reason"):
                note["reason"] = outcome.step["reason"]
            cell.metadata["nbrunbook"] = note
            if self.on_cell is not None:
                self.on_cell(outcome, index)
            self._stop_after(outcome)
            if outcome.status == "ended":
                self.ended = outcome
                return cli.EXIT_OK
        return cli.EXIT_OK

    def _stop_after(self, outcome: CellOutcome) -> None:
        """Raise the :class:`RunnerError` that ends the run after ``outcome``, if any."""
        stopper = self.stopper
        assert stopper is not None
        where = f"cell {outcome.name!r} ({outcome.cell_id})"
        if stopper.timed_out is not None:
            seconds = stopper.timed_out[1]
            killed = " (the kernel did not answer the interrupt and was killed)" if stopper.killed else ""
            raise RunnerError(
                cli.EXIT_INTERRUPTED,
                f"{where} timed out after {seconds:g} s{killed}; the step is interrupted",
                resolve=outcome.cell_id,
            )
        if stopper.signum is not None:
            raise self._stopped(outcome)
        if outcome.status == "refused":
            code = EXIT_FOR_ENAME.get(outcome.ename or "", cli.EXIT_FAILED)
            raise RunnerError(code, f"{where}: {outcome.ename}: {_error_line(outcome.evalue)}")
        if outcome.status == "failed" and not self.allow_errors:
            raise RunnerError(cli.EXIT_FAILED, f"{where}: {outcome.ename}: {_error_line(outcome.evalue)}")

    def _stopped(self, outcome: CellOutcome | None) -> RunnerError:
        """The error ending a run stopped by SIGINT / SIGTERM (``outcome``: the cell it cut off)."""
        stopper = self.stopper
        assert stopper is not None
        name = stopper.signal_name
        if outcome is None or outcome.status != "interrupted":
            return RunnerError(stopper.exit_code, f"stopped by {name}; no cell was cut off")
        killed = " (the kernel did not answer the interrupt and was killed)" if stopper.killed else ""
        return RunnerError(
            stopper.exit_code,
            f"stopped by {name} during cell {outcome.name!r} ({outcome.cell_id}){killed}; the step is interrupted",
            resolve=outcome.cell_id,
        )

    def _outcome(
        self, index: int, cell: t.Any, seconds: float, reply: dict[str, t.Any] | None, died: bool
    ) -> CellOutcome:
        from nbrunbook.kernel_ext.cells import classify
        from nbrunbook.kernel_ext.replay import STATUS_MIME

        cell_id = str(cell.get("id", f"#{index}"))
        tags = list(cell.metadata.get("tags", []))
        spec = classify(cell.source, tags, fallback_name=cell_id)
        name = spec.name or cell_id
        outcome = CellOutcome(index, cell_id, name, "ran", seconds)
        if died or (self.stopper is not None and self.stopper.stopping and reply and reply.get("status") == "error"):
            outcome.status = "interrupted"
            return outcome
        if reply is None:
            # nbclient did not send it: an empty cell, or a skip-execution one.
            outcome.status = "not-run"
            if self.skip_cells_with_tag in tags:
                outcome.step = {"reason": self.skip_cells_with_tag}
            return outcome
        # A skipped cell says so in an output of its own (never in its streams): see kernel_ext/replay.py.
        replayed = any(STATUS_MIME in (o.get("data") or {}) for o in cell.get("outputs", []))
        if reply.get("status") == "error":
            outcome.ename, outcome.evalue = str(reply.get("ename", "Error")), str(reply.get("evalue", ""))
            if outcome.ename in EXIT_FOR_ENAME:
                outcome.status = "refused"
            elif outcome.ename == "SystemExit" and outcome.evalue.strip() in SUCCESS_EXITS:
                outcome.status = "ended"  # papermill's rule: the notebook chose to stop here
                outcome.step = {"replayed": replayed}
            elif "raises-exception" in tags:
                # nbclient's rule: the error is expected (a skip shows it again).
                outcome.status = "skipped" if replayed else "ran"
            else:
                outcome.status = "failed"
            return outcome
        outcome.status = "skipped" if replayed else ("ran" if spec.kind == "guarded" else "always")
        return outcome

    def run(self) -> int:
        """Synchronous :meth:`async_run`."""
        code: int = run_sync(self.async_run)()
        return code


def write_notebook(nb: t.Any, path: str) -> None:
    """Write the output notebook atomically (never a half-written file)."""
    import nbformat

    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            nbformat.write(nb, fh)
        os.replace(tmp, path)
    except (OSError, UnicodeError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # never a stray half-written temp file (a full disk, say)
        raise OutputNotWritten(path, exc) from None
