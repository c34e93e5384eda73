"""Errors raised by the kernel extension (engine errors live in :mod:`nbrunbook.engine.errors`).

A refused cell raises its error as the cell's exception, so a headless client
reads the class name from the execute reply's ``ename`` (``StepInterrupted``,
``StepBusy``, ``OrderViolation``, ``AttemptsExhausted``, ``SourceChanged``,
``StoreError`` ...) and the fields from the message.
"""

from __future__ import annotations

from collections.abc import Sequence

from nbrunbook.engine.errors import RunbookError, StepError


class NotebookNotFound(RunbookError):
    """The kernel cannot tell which notebook file it runs."""

    def __init__(self, tried: Sequence[str]) -> None:
        self.tried = list(tried)
        detail = "; ".join(self.tried) if self.tried else "no hint available"
        super().__init__(
            f"cannot tell which notebook this kernel runs ({detail}); pass it with "
            "--notebook PATH (Python: attach(..., notebook=PATH))"
        )


class NotebookUnsupported(RunbookError, ValueError):
    """The notebook file cannot be used as a runbook; ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"notebook {path}: {reason}")


class NoInstance(RunbookError):
    """A command needs an attached instance and there is none."""

    def __init__(self) -> None:
        super().__init__(
            "no runbook instance is attached to this kernel: run `%runbook start` (or `%runbook attach ID`)"
        )


class SourceChanged(StepError):
    """A done cell's source differs from the source that ran (headless ``--on-changed error``)."""

    def __init__(self, instance_id: str, step: str, cell: str, recorded: str, current: str) -> None:
        self.cell = cell
        self.recorded = recorded
        self.current = current
        super().__init__(
            instance_id,
            step,
            f"cell {cell} changed since it ran as {step} (source hash {recorded} -> {current}); "
            f"choose with --on-changed rerun|skip, or `nbrunbook rerun {instance_id} {cell}`",
        )


class UnknownCell(RunbookError, LookupError):
    """A cell named in a command is neither a cell id, a step key nor a cell name of the runbook."""

    def __init__(self, cell: str, hint: str = "") -> None:
        self.cell = cell
        super().__init__(f"no cell {cell!r} in this runbook" + (f" ({hint})" if hint else ""))


class BadOption(RunbookError, ValueError):
    """An option given to :func:`nbrunbook.kernel_ext.attach` is unknown or has a bad value."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"option {name}: {reason}")


class GuardFailed(RunbookError):
    """The guard itself failed before the cell ran, so the cell was not run (it fails closed)."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(f"the cell was not run: the runbook guard failed ({type(cause).__name__}: {cause})")
