"""Exceptions raised by nbrunbook.

Every error is a :class:`RunbookError`. Subclasses carry the facts as fields and
build their message from them, so callers (the CLI, the magics) can both show
one clear line and act on the details.

Control signals that must not be swallowed by ``except Exception`` in user code
(for example "skip this cell") live in :mod:`nbrunbook.engine.signals` and
derive from ``BaseException`` instead.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence


class RunbookError(Exception):
    """Base class of every error nbrunbook raises on purpose."""


# --------------------------------------------------------------------- store


class StoreError(RunbookError):
    """The store at ``path`` cannot be used; ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"store {path}: {reason}")


class StoreVersionError(StoreError):
    """The store was written by a newer nbrunbook schema than this one reads."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            path,
            f"written by schema version {found}, this nbrunbook reads up to "
            f"{supported}; upgrade nbrunbook to open it (nothing was changed)",
        )


class StoreLocked(StoreError):
    """Another process holds the DuckDB file, so it cannot be opened here."""

    def __init__(self, path: str, holder: str) -> None:
        self.holder = holder
        super().__init__(path, f"the database file is held by another process: {holder}")


class StoreUnavailable(StoreError):
    """The store cannot be reached, started or written (the server is gone, the disk is full)."""


#: How DuckDB, SQLite-style libraries and the OS word a full disk (DuckDB keeps no errno).
_DISK_FULL = ("no space left on device", "disk is full", "disk full", "not enough space on the disk")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is the disk being full (ENOSPC, EDQUOT)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(current).lower() for words in _DISK_FULL):
            return True
        current = current.__cause__ or current.__context__
    return False


def store_write_error(path: str, exc: BaseException, doing: str = "commit failed") -> StoreError:
    """The error for a failed write to the store at ``path``.

    A full disk is the store being unavailable (exit 4), said in words a
    person acts on; anything else is ``doing`` with the library's first line.
    """
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if is_disk_full(exc):
        return StoreUnavailable(path, f"the disk is full: {doing} ({detail}); free space, then run again")
    return StoreError(path, f"{doing}: {detail}")


class OutputNotWritten(RunbookError):
    """The output notebook could not be written (the run itself is recorded in the store)."""

    def __init__(self, path: str, exc: BaseException) -> None:
        self.path = path
        self.reason = "the disk is full" if is_disk_full(exc) else (getattr(exc, "strerror", None) or str(exc))
        super().__init__(f"cannot write the output notebook {path}: {self.reason}")


class ProtocolError(StoreError):
    """The store server and this client do not speak the same protocol."""


# ----------------------------------------------------------------- instances


class InvalidName(RunbookError, ValueError):
    """A user-supplied identifier (instance id, cell id, key) is malformed."""

    def __init__(self, what: str, value: str, rule: str) -> None:
        self.what = what
        self.value = value
        self.rule = rule
        super().__init__(f"invalid {what} {value!r}: {rule}")


class DuplicateCellIds(RunbookError, ValueError):
    """A notebook has several cells with the same id."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = sorted(set(ids))
        super().__init__(
            "duplicate cell ids in the notebook: "
            + ", ".join(self.ids)
            + " (give each cell its own id, e.g. with `nbrunbook upgrade`)"
        )


class InstanceNotFound(RunbookError, LookupError):
    """No instance with this id exists in the store."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        super().__init__(f"no instance {instance_id!r} in this store")


class RunbookNotFound(RunbookError, LookupError):
    """No runbook (or manifest version) with this name exists in the store."""

    def __init__(self, runbook: str, version: int | None = None) -> None:
        self.runbook = runbook
        self.version = version
        what = f"runbook {runbook!r}" + (f" manifest version {version}" if version else "")
        super().__init__(f"no {what} in this store")


class ParamsMismatch(RunbookError):
    """An existing instance was opened with other parameters than it was created with."""

    def __init__(self, instance_id: str, stored: dict, given: dict) -> None:
        self.instance_id = instance_id
        self.stored = stored
        self.given = given
        changed = sorted(k for k in set(stored) | set(given) if stored.get(k, _MISSING) != given.get(k, _MISSING))
        super().__init__(
            f"instance {instance_id!r} was created with other parameters "
            f"(differing: {', '.join(changed)}); parameters of an instance are fixed"
        )


class RunbookMismatch(RunbookError):
    """An existing instance belongs to another runbook."""

    def __init__(self, instance_id: str, stored: str, given: str) -> None:
        self.instance_id = instance_id
        self.stored = stored
        self.given = given
        super().__init__(f"instance {instance_id!r} belongs to runbook {stored!r}, not {given!r}")


_MISSING = object()


# --------------------------------------------------------------------- steps


class StepError(RunbookError):
    """Base of errors about one step of one instance."""

    def __init__(self, instance_id: str, step: str, message: str) -> None:
        self.instance_id = instance_id
        self.step = step
        super().__init__(message)


class StepNotFound(StepError, LookupError):
    """The step has never been claimed in this instance."""

    def __init__(self, instance_id: str, step: str) -> None:
        super().__init__(instance_id, step, f"step {step} of instance {instance_id!r} has no record")


class StepBusy(StepError):
    """Another live owner holds the step (raised after waiting gave up)."""

    def __init__(self, instance_id: str, step: str, owner: str, since: float) -> None:
        self.owner = owner
        self.since = since
        super().__init__(instance_id, step, f"step {step} is running in {owner}")


class StepFenced(StepError):
    """The caller's claim was taken over; its outcome was journaled as ``fenced``."""

    def __init__(
        self,
        instance_id: str,
        step: str,
        owner: str,
        epoch: int,
        current_owner: str | None,
        current_epoch: int,
        current_status: str,
    ) -> None:
        self.owner = owner
        self.epoch = epoch
        self.current_owner = current_owner
        self.current_epoch = current_epoch
        self.current_status = current_status
        super().__init__(
            instance_id,
            step,
            f"claim on {step} (owner {owner}, epoch {epoch}) is stale: the step is now "
            f"{current_status} at epoch {current_epoch}"
            + (f" held by {current_owner}" if current_owner else "")
            + "; this outcome was not applied",
        )


class StepInterrupted(StepError):
    """The step was cut off mid-run (its owner died, or an interrupt was requested); a person must decide."""

    def __init__(self, instance_id: str, step: str, cell: str | None = None) -> None:
        self.cell = cell or step
        self.command = f"nbrunbook resolve {instance_id} {self.cell} --rerun|--done|--skip"
        super().__init__(
            instance_id,
            step,
            f"step {step} was interrupted (cut off mid-run: its owner died or the kernel was interrupted; "
            f"the side effect may or may not have happened). Decide with: {self.command}",
        )


class AttemptsExhausted(StepError):
    """The step failed as many times as its invocation allows."""

    def __init__(self, instance_id: str, step: str, attempts: int, limit: int) -> None:
        self.attempts = attempts
        self.limit = limit
        super().__init__(
            instance_id,
            step,
            f"step {step} failed {attempts} times (limit {limit}); "
            f"decide with: nbrunbook resolve {instance_id} {step} --rerun|--done|--skip",
        )


class OrderViolation(StepError):
    """Earlier guarded cells are not done yet."""

    def __init__(self, instance_id: str, step: str, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        super().__init__(
            instance_id,
            step,
            f"cannot run {step} before the earlier cells are done: {', '.join(self.missing)} "
            "(run them first, or start the instance with --unordered)",
        )


class InvalidTransition(StepError):
    """The requested change does not apply to the step's current state."""

    def __init__(self, instance_id: str, step: str, status: str, action: str) -> None:
        self.status = status
        self.action = action
        super().__init__(instance_id, step, f"cannot {action} step {step}: it is {status}")


# -------------------------------------------------------------------- values


class ValueNotSerializable(RunbookError, TypeError):
    """A value to be recorded is neither JSON- nor Arrow-serialisable."""

    def __init__(self, name: str, type_name: str, hint: str = "") -> None:
        self.name = name
        self.type_name = type_name
        super().__init__(
            f"cannot record {name!r}: values of type {type_name} are not JSON- or "
            f"Arrow-serialisable" + (f"; {hint}" if hint else "")
        )


class ValueTooLarge(RunbookError, ValueError):
    """A value to be recorded exceeds the size cap."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        self.name = name
        self.size = size
        self.limit = limit
        super().__init__(f"cannot record {name!r}: {size} bytes exceeds the cap of {limit}")
