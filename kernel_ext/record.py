"""Record a claimed cell's outcome, and report outcomes whose commit failed.

A done cell's record - its outputs, the names not saved and why, the hash of
the source that ran - is stored as the reserved value ``#cell`` next to the
saved variables, so a skip needs one read (``Store.values``) and the journal
stays small; the ``done`` event carries a summary.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from nbrunbook.engine.errors import StepFenced, StoreUnavailable
from nbrunbook.engine.faults import crashpoint
from nbrunbook.engine.model import Claim, EncodedValue

from . import saved
from .capture import OutputRecorder
from .outcome import DONE, INTERRUPTED, Outcome, without_exit_notice

if TYPE_CHECKING:
    from .session import Session, Target

CELL_RECORD = "#cell"
#: The form of ``#cell``: 2 keeps the IOPub messages the cell sent (``messages``,
#: see :mod:`.capture`); records without ``v`` (before 0.2) keep ``outputs``
#: items, which :mod:`.replay` still shows.
RECORD_VERSION = 2
#: Key in a done cell's record and ``done`` event: the cell ended the run with
#: ``SystemExit`` of this code (0 or None), like papermill's early end.
SYSTEM_EXIT = "system_exit"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def read_record(values: dict[str, EncodedValue]) -> dict[str, Any]:
    """The ``#cell`` record among a step's values (``{}`` if none, e.g. after ``resolve --done``)."""
    raw = values.get(CELL_RECORD)
    if raw is None:
        return {}
    try:
        data = json.loads(raw.data)
    except (ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_outcome(
    shell: Any,
    session: Session,
    claim: Claim,
    target: Target,
    recorder: OutputRecorder | None,
    names: Sequence[str],
    outcome: Outcome,
    result: Any,
    warn: Callable[[str], None],
) -> Future[Any]:
    """``fail`` with the error, or ``complete`` with outputs and saved values; returns the commit's future.

    A failed or interrupted outcome is a ``fail`` (``interrupted=True`` for a
    cell cut off by a requested interrupt: its outcome is unknown). A done
    outcome that carries an error (``raises-exception``, a clean
    ``SystemExit``) keeps it in the record as ``error`` (ename, evalue,
    traceback), plus ``system_exit`` (the code) when the cell ended the run,
    so a skip can show and raise it again.

    Submitted with ``wait=False``: the commit overlaps the next cell and is
    ordered before its claim.
    """
    crashpoint("before_record")
    common: dict[str, Any] = {"owner": session.owner, "epoch": claim.state.epoch, "run_id": session.run_id}
    error = outcome.error
    if outcome.status != DONE:
        assert error is not None
        fut = session.store.fail(
            session.instance_id,
            claim.step_key,
            error={"type": type(error).__name__, "message": str(error)[:2000]},
            wait=False,
            interrupted=outcome.status == INTERRUPTED,
            **common,
        )
    else:
        recorder = recorder or OutputRecorder(session.options.output_limit)
        messages = recorder.finish()
        result_bundle = recorder.result
        if getattr(shell, "_last_traceback_during_displayhook", False):
            result_bundle = None  # its display raised: the reply is that error, there is no result
        if outcome.ended_run:
            messages = without_exit_notice(messages)
        values, unsaved, warnings = saved.collect(
            shell.user_ns, names, target.spec.save, limit=session.options.value_limit
        )
        for w in warnings:
            warn(w)
        for spec in target.spec.save:  # a failed save= is named again whenever the cell is skipped
            if spec.name not in values and spec.name in shell.user_ns:
                unsaved[spec.name] = f"save={spec.name}: a {type(shell.user_ns[spec.name]).__name__} cannot be recorded"
        record: dict[str, Any] = {
            "v": RECORD_VERSION,
            "messages": messages,
            "msg_id": recorder.msg_id,
            "unsaved": unsaved,
            "source_hash": target.live_hash,
        }
        if result_bundle is not None:
            record["result"] = result_bundle
        if recorder.dropped:
            record["dropped"] = recorder.dropped
            record["limit"] = recorder.limit
        payload: dict[str, Any] = {
            "outputs": sum("c" in m for m in messages) + (result_bundle is not None),  # markers aside
            "saved": sorted(n for n in values if n != CELL_RECORD),
            "source_hash": target.live_hash,
        }
        if outcome.kept is not None:
            record["error"] = dict(outcome.kept)
            payload["error"] = {"type": outcome.kept["ename"], "message": outcome.kept["evalue"]}
        if outcome.ended_run:
            record[SYSTEM_EXIT] = payload[SYSTEM_EXIT] = outcome.exit_code
        text = json.dumps(record, separators=(",", ":"), default=_jsonable)
        values[CELL_RECORD] = EncodedValue("json", text.encode())
        fut = session.store.complete(
            session.instance_id,
            claim.step_key,
            payload=payload,
            values=values,
            wait=False,
            **common,
        )
    if not isinstance(fut, Future):  # a store that committed at once
        done: Future[Any] = Future()
        done.set_result(fut)
        return done
    return fut


def report_pending(session: Session, warn: Callable[[str], None], *, block: bool) -> None:
    """Warn about background commits that failed; with ``block``, wait for them (30 s at most each)."""
    keep: list[tuple[Future[Any], str]] = []
    for fut, label in session.pending:
        if not fut.done():
            if not block:
                keep.append((fut, label))
                continue
            try:
                fut.exception(timeout=30)
            except TimeoutError:
                keep.append((fut, label))
                continue
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, StoreUnavailable) and session.lost_outcome is None:
                session.lost_outcome = exc
            what = "fenced: " if isinstance(exc, StepFenced) else ""
            warn(f"warning: the outcome of {label} was not recorded ({what}{exc})")
    session.pending = keep
