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
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import typing as t
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError
from nbclient.util import run_sync

from . import cli
from .errors import OutputNotWritten
from .kernel import MetadataKernelClient, RunbookKernelManager, last_words

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


@dataclass
class CellOutcome:
    """What happened to one code cell in this run."""

    index: int
    cell_id: str
    name: str
    status: str  # ran | skipped | failed | refused | always | not-run
    seconds: float = 0.0
    ename: str | None = None
    evalue: str | None = None
    step: dict[str, t.Any] = field(default_factory=dict)


class RunnerError(Exception):
    """The run stopped; ``code`` is the exit status, ``message`` one line for stderr."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


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
        kw.setdefault("kernel_manager_class", RunbookKernelManager)
        kw.setdefault("store_widget_state", True)
        super().__init__(nb, **kw)
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

    async def async_run(self) -> int:
        """Execute every cell as one advance of the instance; returns the exit code."""
        self.reset_execution_trackers()
        km = self.km  # nbclient drops it when the kernel is cleaned up; a dead kernel's stderr is read after
        try:
            async with self.async_setup_kernel(cwd=self.resources.get("metadata", {}).get("path")):
                if self.before_attach is not None:
                    await self.before_attach(self)
                await self._attach()
                code = await self._run_cells()
                if code == cli.EXIT_OK:
                    await self._detach()
                self.set_widgets_metadata()
                return code
        except DeadKernelError as exc:
            words = last_words(km)  # its stderr is kept off the terminal (kernel.py): say why here
            raise RunnerError(cli.EXIT_FAILED, f"the kernel died: {exc}" + (f" ({words})" if words else "")) from None

    async def _run_cells(self) -> int:
        kc = self.kc
        assert isinstance(kc, MetadataKernelClient), "the kernel client cannot send cell ids"
        for index, cell in enumerate(self.nb.cells):
            if cell.cell_type != "code":
                continue
            if self.before_cell is not None:
                self.before_cell(index, cell)
            kc.next_metadata = {
                "cellId": cell.get("id"),
                "tags": list(cell.metadata.get("tags", [])),
            }
            start = time.monotonic()
            failure: CellExecutionError | None = None
            try:
                await self.async_execute_cell(cell, index, execution_count=self.code_cells_executed + 1)
            except CellExecutionError as exc:
                failure = exc
            outcome = self._outcome(index, cell, time.monotonic() - start, failure)
            self.outcomes.append(outcome)
            cell.metadata["nbrunbook"] = {"run": outcome.status, **({"error": outcome.ename} if outcome.ename else {})}
            if self.on_cell is not None:
                self.on_cell(outcome, index)
            if failure is not None:
                code = EXIT_FOR_ENAME.get(outcome.ename or "", cli.EXIT_FAILED)
                if outcome.status == "failed":
                    code = cli.EXIT_FAILED
                raise RunnerError(
                    code, f"cell {outcome.name!r} ({outcome.cell_id}): {outcome.ename}: {_error_line(outcome.evalue)}"
                )
        return cli.EXIT_OK

    def _outcome(self, index: int, cell: t.Any, seconds: float, failure: CellExecutionError | None) -> CellOutcome:
        from nbrunbook.kernel_ext.cells import classify
        from nbrunbook.kernel_ext.replay import STATUS_PREFIX

        cell_id = str(cell.get("id", f"#{index}"))
        spec = classify(cell.source, cell.metadata.get("tags", []), fallback_name=cell_id)
        name = spec.name or cell_id
        outputs = cell.get("outputs", [])
        # The status line is the first stdout of a skipped cell; a notice on stderr may come before it
        # (the wait for another run's claim), so the first output is not the one to look at.
        first: t.Mapping[str, t.Any] = next(
            (o for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout"), {}
        )
        replayed = str(first.get("text", "")).startswith(STATUS_PREFIX)
        if failure is not None:
            ename, evalue = failure.ename, failure.evalue
            status = "refused" if ename in EXIT_FOR_ENAME else "failed"
            return CellOutcome(index, cell_id, name, status, seconds, ename, evalue)
        status = "skipped" if replayed else ("ran" if spec.kind == "guarded" else "always")
        return CellOutcome(index, cell_id, name, status, seconds)

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
