"""The store contract: every Store implementation must pass this suite unchanged.

Parametrised over ``STORE_KINDS`` in conftest (embedded now; the store server
and PostgreSQL join later). Real DuckDB files in tmp_path; no mocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from conftest import owner
from helpers.oracle import check_store
from nbrunbook.engine import model
from nbrunbook.engine.errors import (
    DuplicateCellIds,
    InstanceNotFound,
    InvalidName,
    InvalidTransition,
    ParamsMismatch,
    RunbookMismatch,
    StepFenced,
)
from nbrunbook.engine.keys import idempotency_key
from nbrunbook.engine.model import ClaimOutcome, EncodedValue, ManifestCell
from nbrunbook.engine.store import Store

A = owner("alice")
B = owner("bob")


def _claim(store: Store, iid: str, path: str, who: str = A, run: str = "run-1", **kw: object) -> model.Claim:
    return store.claim(iid, path, owner=who, run_id=run, **kw)  # type: ignore[arg-type]


def _done(store: Store, iid: str, c: model.Claim, who: str = A, **kw: object) -> model.StepState:
    st = store.complete(iid, c.step_key, owner=who, epoch=c.state.epoch, run_id="run-1", **kw)  # type: ignore[arg-type]
    assert isinstance(st, model.StepState)
    return st


# ------------------------------------------------------------------ manifests


def test_pin_manifest_is_idempotent_and_versions_changes(store: Store) -> None:
    cells = [ManifestCell("a", 0, source_hash="1"), ManifestCell("b", 1, source_hash="2")]
    m1 = store.pin_manifest("deploy", cells, path="deploy.ipynb")
    assert m1.version == 1
    assert store.pin_manifest("deploy", cells).version == 1
    changed = [ManifestCell("a", 0, source_hash="1"), ManifestCell("b", 1, source_hash="3")]
    assert store.pin_manifest("deploy", changed).version == 2
    assert store.manifest("deploy").cells == changed
    assert store.manifest("deploy", 1).cells == cells
    assert store.manifest("deploy", 1).path == "deploy.ipynb"


def test_duplicate_cell_ids_are_refused_and_nothing_is_written(store: Store) -> None:
    with pytest.raises(DuplicateCellIds) as info:
        store.pin_manifest("dup", [ManifestCell("a", 0), ManifestCell("b", 1), ManifestCell("a", 2)])
    assert info.value.ids == ["a"]
    assert "a" in str(info.value)
    with pytest.raises(Exception, match="no runbook"):
        store.manifest("dup")


# ------------------------------------------------------------------ instances


def test_instance_params_are_fixed(store: Store, run_id: str) -> None:
    m = store.pin_manifest("rb", [ManifestCell("a", 0)])
    inst, created = store.open_instance("rb", "i-1", {"n": 1}, manifest_version=m.version, owner=A, run_id=run_id)
    assert created and inst.params == {"n": 1}
    again, created = store.open_instance("rb", "i-1", {"n": 1}, manifest_version=m.version, owner=B, run_id=run_id)
    assert not created and again.created_by == A
    before = store.journal("i-1")
    with pytest.raises(ParamsMismatch, match="differing: n"):
        store.open_instance("rb", "i-1", {"n": 2}, manifest_version=m.version, owner=B, run_id=run_id)
    assert store.journal("i-1") == before
    assert store.get_instance("i-1").params == {"n": 1}
    forced, _ = store.open_instance(
        "rb", "i-1", {"n": 2}, manifest_version=m.version, owner=B, run_id=run_id, force_params=True
    )
    assert forced.params == {"n": 2} and store.get_instance("i-1").params == {"n": 2}
    assert store.journal("i-1")[-1].event == "params_forced"
    with pytest.raises(RunbookMismatch):
        store.open_instance("other", "i-1", {"n": 2}, manifest_version=0, owner=B, run_id=run_id)


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 129, "semi;colon", "quote'", "sp ace", "../etc"])
def test_bad_instance_ids_are_refused_without_writes(store: Store, run_id: str, bad: str) -> None:
    with pytest.raises(InvalidName, match="instance id"):
        store.open_instance("rb", bad, {}, manifest_version=0, owner=A, run_id=run_id)
    assert store.instances() == []


def test_instance_created_is_seq_one_and_manifest_moves_are_journaled(store: Store, run_id: str) -> None:
    m1 = store.pin_manifest("rb", [ManifestCell("a", 0)])
    store.open_instance("rb", "i", {}, manifest_version=m1.version, owner=A, run_id=run_id)
    m2 = store.pin_manifest("rb", [ManifestCell("a", 0), ManifestCell("b", 1)])
    inst, _ = store.open_instance("rb", "i", {}, manifest_version=m2.version, owner=A, run_id=run_id)
    assert inst.manifest_version == 2
    events = store.journal("i")
    assert [e.event for e in events] == ["instance_created", "manifest_pinned"]
    assert events[0].seq == 1 and events[1].payload == {"version": 2, "previous": 1}


def test_unknown_instance(store: Store) -> None:
    with pytest.raises(InstanceNotFound):
        store.get_instance("nope")
    with pytest.raises(InstanceNotFound):
        _claim(store, "nope", "cell/a")


# ---------------------------------------------------------------------- claims


def test_claim_complete_skip(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a")
    assert c.outcome is ClaimOutcome.CLAIMED
    assert (c.state.invocation, c.state.attempt, c.state.epoch) == (1, 1, 1)
    assert c.step_key == "cell/a@1"
    assert c.idempotency_key == idempotency_key(iid, "cell/a@1")
    busy = _claim(store, iid, "cell/a", B)
    assert busy.outcome is ClaimOutcome.BUSY and busy.state.owner == A
    st = _done(store, iid, c, payload={"note": "ok"})
    assert st.status == "done" and st.duration is not None
    again = _claim(store, iid, "cell/a", B)
    assert again.outcome is ClaimOutcome.DONE and again.state.owner == A
    events = check_store(store, iid)
    assert [e.event for e in events] == ["instance_created", "claimed", "done"]
    assert events[2].payload["note"] == "ok"
    assert all(e.run_id for e in events)


def test_values_are_recorded_with_done(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a")
    vals = {"x": EncodedValue("json", b"[1, 2]"), "blob": EncodedValue("arrow", bytes(range(256)))}
    _done(store, iid, c, values=vals)
    assert store.values(iid, "cell/a@1") == vals
    assert store.values(iid, "cell/a@2") == {}


def test_a_done_claim_can_carry_its_values(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a", with_values=True)
    assert c.outcome is ClaimOutcome.CLAIMED and c.values is None  # only a done step has values to give
    vals = {"x": EncodedValue("json", b"[1, 2]"), "blob": EncodedValue("arrow", bytes(range(256)))}
    # Pipelined, as the kernel records: the next claim must still see the values.
    store.complete(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="run-1", values=vals, wait=False)
    again = _claim(store, iid, "cell/a", B, with_values=True)
    assert again.outcome is ClaimOutcome.DONE and again.values == vals
    assert _claim(store, iid, "cell/a", B).values is None  # not asked for: not read
    skipped = _claim(store, iid, "cell/b")
    store.release_owner(A, reason="test")
    store.resolve(iid, "cell/b", "skip", owner=B, run_id="run-2")
    answer = _claim(store, iid, "cell/b", B, with_values=True)
    assert skipped.outcome is ClaimOutcome.CLAIMED
    assert answer.outcome is ClaimOutcome.DONE and answer.state.status == "skipped" and answer.values is None


def test_failure_retry_keeps_idempotency_key(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c1 = _claim(store, iid, "cell/a")
    store.fail(
        iid, c1.step_key, owner=A, epoch=c1.state.epoch, run_id="r", error={"type": "ValueError", "message": "x"}
    )
    c2 = _claim(store, iid, "cell/a", B)
    assert c2.outcome is ClaimOutcome.CLAIMED
    assert (c2.state.attempt, c2.state.invocation) == (2, 1)
    assert c2.state.epoch == c1.state.epoch + 1
    assert c2.idempotency_key == c1.idempotency_key
    events = check_store(store, iid)
    assert events[2].event == "failed" and events[2].payload["error"]["type"] == "ValueError"
    assert events[3].payload == {"after": "failed"}


def test_fail_interrupted_needs_a_decision(store: Store, new_instance: Callable[..., str]) -> None:
    """A holder reporting a requested interrupt: running -> interrupted, fenced rules as for fail."""
    iid = new_instance()
    c1 = _claim(store, iid, "cell/a")
    error = {"type": "KeyboardInterrupt", "message": ""}
    fut = store.fail(
        iid, c1.step_key, owner=A, epoch=c1.state.epoch, run_id="r", error=error, interrupted=True, wait=False
    )
    assert not isinstance(fut, model.StepState)
    assert fut.result(timeout=30).status == "interrupted"
    # A repeat of the committed call (a lost reply) answers the same and journals nothing.
    again = store.fail(iid, c1.step_key, owner=A, epoch=c1.state.epoch, run_id="r", error=error, interrupted=True)
    assert isinstance(again, model.StepState) and again.status == "interrupted"
    assert _claim(store, iid, "cell/a", B).outcome is ClaimOutcome.INTERRUPTED
    c2 = _claim(store, iid, "cell/a", B, retry_safe=True)
    assert c2.outcome is ClaimOutcome.CLAIMED and c2.state.attempt == 2
    assert c2.idempotency_key == c1.idempotency_key
    with pytest.raises(StepFenced):  # the old holder again: never applied
        store.fail(iid, c1.step_key, owner=A, epoch=c1.state.epoch, run_id="r", error=error, interrupted=True)
    assert store.step(iid, "cell/a").status == "running"  # type: ignore[union-attr]
    events = check_store(store, iid)
    assert [e.event for e in events] == ["instance_created", "claimed", "interrupted", "claimed", "fenced"]
    assert events[2].payload["reason"] == "interrupt requested"
    assert events[2].payload["error"] == error and events[2].owner == A
    assert events[4].payload["rejected"] == "interrupted"


def test_attempts_are_bounded(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance(max_attempts=2)
    for _ in range(2):
        c = _claim(store, iid, "cell/a")
        assert c.outcome is ClaimOutcome.CLAIMED
        store.fail(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="r", error={})
    ex = _claim(store, iid, "cell/a")
    assert ex.outcome is ClaimOutcome.EXHAUSTED and ex.max_attempts == 2
    # A person decides to try again: the next claim is attempt 3.
    store.resolve(iid, "cell/a", "rerun", owner=B, run_id="r")
    c = _claim(store, iid, "cell/a")
    assert c.outcome is ClaimOutcome.CLAIMED and c.state.attempt == 3
    check_store(store, iid)


def test_claim_many_is_one_atomic_group(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    first = _claim(store, iid, "cell/p@1/m[1]", B)
    done = _claim(store, iid, "cell/p@1/m[2]", B)
    _done(store, iid, done, B)
    paths = [f"cell/p@1/m[{i}]" for i in range(5)]
    claims = store.claim_many(iid, paths, owner=A, run_id="r", token="t")
    assert [c.outcome for c in claims] == [
        ClaimOutcome.CLAIMED,
        ClaimOutcome.BUSY,
        ClaimOutcome.DONE,
        ClaimOutcome.CLAIMED,
        ClaimOutcome.CLAIMED,
    ]
    assert claims[1].state.owner == B and claims[1].state.epoch == first.state.epoch
    assert all(c.state.parent == "cell/p@1" for c in claims)
    again = store.claim_many(iid, paths, owner=A, run_id="r", token="t")  # lost reply: same answer
    assert [c.state.epoch for c in again] == [c.state.epoch for c in claims]
    with pytest.raises(InvalidName):
        store.claim_many(iid, ["cell/x", "cell/x"], owner=A, run_id="r")
    events = check_store(store, iid)
    assert [e.event for e in events].count("claimed") == 5
    assert {s.path for s in store.steps(iid, parent="cell/p@1")} == set(paths)


def test_stale_holder_is_fenced_and_journaled(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c1 = _claim(store, iid, "cell/a", A, lease=0.2)
    time.sleep(0.3)  # A's lease runs out (A hangs)
    c2 = _claim(store, iid, "cell/a", B)
    assert c2.outcome is ClaimOutcome.INTERRUPTED  # not retry-safe: a person decides
    c2 = _claim(store, iid, "cell/a", B, retry_safe=True)
    assert c2.outcome is ClaimOutcome.CLAIMED and c2.state.epoch == 2 and c2.state.attempt == 2
    with pytest.raises(StepFenced) as info:
        store.complete(iid, c1.step_key, owner=A, epoch=c1.state.epoch, run_id="r")
    assert info.value.current_owner == B and info.value.current_epoch == 2
    with pytest.raises(StepFenced):
        store.renew(iid, c1.step_key, owner=A, epoch=c1.state.epoch)
    _done(store, iid, c2, B)
    with pytest.raises(StepFenced):
        store.fail(iid, c1.step_key, owner=A, epoch=c1.state.epoch, run_id="r", error={})
    events = check_store(store, iid)
    names = [e.event for e in events]
    assert names == ["instance_created", "claimed", "interrupted", "claimed", "fenced", "done", "fenced"]
    assert events[2].payload["reason"] == "lease expired"
    assert store.step(iid, "cell/a").status == "done"  # type: ignore[union-attr]


def test_renew_keeps_the_claim(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a", A, lease=0.4)
    for _ in range(3):
        time.sleep(0.2)
        store.renew(iid, c.step_key, owner=A, epoch=c.state.epoch, lease=0.4)
    assert _claim(store, iid, "cell/a", B).outcome is ClaimOutcome.BUSY
    assert len(store.journal(iid)) == 2  # renewals are not history


def test_release_owner_interrupts_at_once(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    ca = _claim(store, iid, "cell/a", A)
    _claim(store, iid, "cell/b", A)
    cb = _claim(store, iid, "cell/c", B)
    changed = store.release_owner(A, reason="connection lost")
    assert sorted(s.path for s in changed) == ["cell/a", "cell/b"]
    assert store.step(iid, "cell/a").status == "interrupted"  # type: ignore[union-attr]
    assert store.step(iid, "cell/c").status == "running"  # type: ignore[union-attr]
    assert _claim(store, iid, "cell/a", B).outcome is ClaimOutcome.INTERRUPTED
    retry = _claim(store, iid, "cell/a", B, retry_safe=True)
    assert retry.outcome is ClaimOutcome.CLAIMED and retry.state.attempt == 2
    assert retry.idempotency_key == ca.idempotency_key
    rerun = _claim(store, iid, "cell/b", B, rerun_interrupted=True)
    assert rerun.outcome is ClaimOutcome.CLAIMED
    _done(store, iid, cb, B)
    events = check_store(store, iid)
    interrupted = [e for e in events if e.event == "interrupted"]
    assert {e.payload["reason"] for e in interrupted} == {"connection lost"}
    assert {e.owner for e in interrupted} == {A}


@pytest.mark.parametrize("decision, status", [("done", "done"), ("skip", "skipped"), ("rerun", "pending")])
def test_resolve_interrupted(store: Store, new_instance: Callable[..., str], decision: str, status: str) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a", A)
    store.release_owner(A, reason="killed")
    st = store.resolve(iid, "cell/a", decision, owner=B, run_id="r2", note="checked by hand")
    assert st.status == status
    after = _claim(store, iid, "cell/a", B)
    if decision == "rerun":
        assert after.outcome is ClaimOutcome.CLAIMED and after.state.attempt == 2
        assert after.idempotency_key == c.idempotency_key
    else:
        assert after.outcome is ClaimOutcome.DONE
    with pytest.raises(StepFenced):  # the vanished holder comes back: too late
        store.complete(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="r")
    events = check_store(store, iid)
    resolved = next(e for e in events if e.event == "resolved")
    assert resolved.payload["decision"] == decision and resolved.owner == B


def test_resolve_refuses_a_live_or_finished_step(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a", A)
    with pytest.raises(InvalidTransition, match="running"):
        store.resolve(iid, "cell/a", "done", owner=B, run_id="r")
    _done(store, iid, c)
    with pytest.raises(InvalidTransition, match="done"):
        store.resolve(iid, "cell/a", "skip", owner=B, run_id="r")
    with pytest.raises(InvalidName):
        store.resolve(iid, "cell/a", "maybe", owner=B, run_id="r")


def test_resolve_rerun_of_a_cell_reruns_its_interrupted_branches(
    store: Store, new_instance: Callable[..., str]
) -> None:
    # The kernel died inside a fan-out: the cell and its unfinished branches are
    # interrupted. A person's `resolve CELL --rerun` must let the cell's next
    # attempt run them; a finished branch stays done, a later invocation's and
    # another cell's branches are not touched.
    iid = new_instance()
    other = _claim(store, iid, "cell/z", A)
    z0 = _claim(store, iid, "cell/z@1/map[0]", A)
    cell = _claim(store, iid, "cell/f", A)
    b0 = _claim(store, iid, "cell/f@1/map[0]", A)
    b1 = _claim(store, iid, "cell/f@1/map[1]", A)
    nested = _claim(store, iid, "cell/f@1/map[1]@1/task[0]", A)
    _done(store, iid, b0)
    store.release_owner(A, reason="killed")
    st = store.resolve(iid, "cell/f", "rerun", owner=B, run_id="r2", note="checked")
    assert st.status == "pending"
    again = {p: _claim(store, iid, p, B) for p in ("cell/f", "cell/f@1/map[1]", "cell/f@1/map[1]@1/task[0]")}
    for c, first in zip(again.values(), (cell, b1, nested), strict=True):
        assert c.outcome is ClaimOutcome.CLAIMED and c.state.attempt == 2
        assert c.idempotency_key == first.idempotency_key
    assert _claim(store, iid, "cell/f@1/map[0]", B).outcome is ClaimOutcome.DONE
    for untouched in (other, z0):
        assert store.step(iid, untouched.state.path).status == "interrupted"  # type: ignore[union-attr]
    events = check_store(store, iid)
    resolved = {e.step_key: e.payload for e in events if e.event == "resolved"}
    assert set(resolved) == {"cell/f@1", "cell/f@1/map[1]@1", "cell/f@1/map[1]@1/task[0]@1"}
    assert resolved["cell/f@1/map[1]@1"]["note"] == "with its cell cell/f@1"
    assert {e.owner for e in events if e.event == "resolved"} == {B}


def test_rerun_opens_a_new_invocation(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c1 = _claim(store, iid, "cell/a")
    _done(store, iid, c1, values={"v": EncodedValue("json", b"1")})
    st = store.rerun(iid, "cell/a", owner=B, run_id="r2", reason="new data")
    assert (st.status, st.invocation, st.attempt) == ("pending", 2, 0)
    c2 = _claim(store, iid, "cell/a", B)
    assert c2.outcome is ClaimOutcome.CLAIMED
    assert c2.step_key == "cell/a@2" and c2.state.attempt == 1
    assert c2.idempotency_key != c1.idempotency_key
    assert store.values(iid, "cell/a@2") == {}
    assert store.values(iid, "cell/a@1") == {"v": EncodedValue("json", b"1")}
    with pytest.raises(InvalidTransition):
        store.rerun(iid, "cell/a@2", owner=B, run_id="r2")  # running
    events = check_store(store, iid)
    reopened = next(e for e in events if e.event == "reopened")
    assert reopened.step_key == "cell/a@2" and reopened.payload["previous"] == "cell/a@1"


def test_order_is_enforced_by_requires(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/b", requires=["cell/a"])
    assert c.outcome is ClaimOutcome.ORDER and c.missing == ["cell/a"]
    assert store.step(iid, "cell/b") is None
    ca = _claim(store, iid, "cell/a")
    _done(store, iid, ca)
    assert _claim(store, iid, "cell/b", requires=["cell/a"]).outcome is ClaimOutcome.CLAIMED
    check_store(store, iid)


def test_lost_reply_retries_are_recognised(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a", A, token="tok-1")
    again = _claim(store, iid, "cell/a", A, token="tok-1")
    assert again.outcome is ClaimOutcome.CLAIMED and again.state.epoch == c.state.epoch
    other_call = _claim(store, iid, "cell/a", A, token="tok-2")
    assert other_call.outcome is ClaimOutcome.BUSY  # same process, another call: no double claim
    first = _done(store, iid, c)
    assert _done(store, iid, c) == first  # complete retried after its commit: same answer
    events = check_store(store, iid)
    assert [e.event for e in events].count("claimed") == 1
    assert [e.event for e in events].count("done") == 1


def test_async_complete_is_ordered_before_later_calls(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    futures = []
    for i in range(20):
        c = _claim(store, iid, f"cell/s{i}")
        futures.append(store.complete(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="r", wait=False))
    last = _claim(store, iid, "cell/last")
    assert last.outcome is ClaimOutcome.CLAIMED
    # The later claim returned, so every earlier outcome is already durable.
    assert all(store.step(iid, f"cell/s{i}").status == "done" for i in range(20))  # type: ignore[union-attr]
    assert all(f.result(timeout=5).status == "done" for f in futures)  # type: ignore[union-attr]
    check_store(store, iid)


def test_async_fenced_outcome_reaches_the_future(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a")
    store.release_owner(A, reason="gone")
    fut = store.complete(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="r", wait=False)
    with pytest.raises(StepFenced):
        fut.result(timeout=5)  # type: ignore[union-attr]


# --------------------------------------------------------------------- events


def test_append_and_once(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    e1 = store.append(iid, "note", owner=A, run_id="r", payload={"text": "hi"})
    assert e1.seq == 2 and e1.payload == {"text": "hi"}
    d1 = store.append(
        iid, "fanout_declared", owner=A, run_id="r", step_key="cell/a@1", payload={"keys": [1, 2]}, once=True
    )
    d2 = store.append(
        iid, "fanout_declared", owner=B, run_id="r", step_key="cell/a@1", payload={"keys": [9]}, once=True
    )
    assert d2 == d1 and d2.payload == {"keys": [1, 2]}
    with pytest.raises(InvalidName, match="state-transition"):
        store.append(iid, "done", owner=A, run_id="r")
    assert [e.seq for e in store.journal(iid)] == [1, 2, 3]


def test_journal_since_and_limit(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    for i in range(10):
        store.append(iid, "tick", owner=A, run_id="r", payload={"i": i})
    assert [e.seq for e in store.journal(iid, since_seq=5)] == [6, 7, 8, 9, 10, 11]
    assert [e.seq for e in store.journal(iid, since_seq=5, limit=2)] == [6, 7]
    assert store.journal(iid, since_seq=11) == []


def test_instances_and_status(store: Store, run_id: str) -> None:
    m = store.pin_manifest(
        "rb",
        [ManifestCell("imp", 0, kind="always"), ManifestCell("a", 1), ManifestCell("b", 2), ManifestCell("c", 3)],
    )
    for iid in ("x1", "x2"):
        store.open_instance("rb", iid, {}, manifest_version=m.version, owner=A, run_id=run_id)
    store.open_instance("other", "y1", {}, manifest_version=0, owner=A, run_id=run_id)
    c = _claim(store, "x1", "cell/a")
    _done(store, "x1", c)
    c = _claim(store, "x1", "cell/b")
    st = store.instance_status("x1")
    assert st.status == "running"
    counts = st.counts()
    assert (counts["total"], counts["done"], counts["running"], counts["pending"]) == (3, 1, 1, 1)
    assert [cell.cell_id for cell, _ in st.cells()] == ["imp", "a", "b", "c"]
    store.fail("x1", c.step_key, owner=A, epoch=c.state.epoch, run_id="r", error={})
    summaries = {s.instance_id: s for s in store.instances()}
    assert set(summaries) == {"x1", "x2", "y1"}
    assert (summaries["x1"].status, summaries["x1"].done, summaries["x1"].total) == ("failed", 1, 3)
    assert summaries["x2"].status == "created"
    assert [s.instance_id for s in store.instances(runbook="other")] == ["y1"]
    assert [s.instance_id for s in store.instances(status="failed")] == ["x1"]


def test_wait_returns_when_the_holder_finishes(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    c = _claim(store, iid, "cell/a", A)
    timer = threading.Timer(0.2, lambda: _done(store, iid, c))
    timer.start()
    st = store.wait(iid, "cell/a", timeout=30)
    timer.join()
    assert st is not None and st.status == "done"
    assert _claim(store, iid, "cell/a", B).outcome is ClaimOutcome.DONE


def test_wait_times_out_on_a_live_holder(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    _claim(store, iid, "cell/a", A)
    st = store.wait(iid, "cell/a", timeout=0.2)
    assert st is not None and st.status == "running"


def test_subscribe_delivers_backlog_then_live_events(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    store.append(iid, "before", owner=A, run_id="r")
    got: list[int] = []
    seen = threading.Event()

    def cb(events: list[model.Event]) -> None:
        got.extend(e.seq for e in events)
        if got and got[-1] >= 5:
            seen.set()

    stop = store.subscribe(iid, cb, since_seq=1)
    c = _claim(store, iid, "cell/a")
    _done(store, iid, c)
    store.append(iid, "after", owner=A, run_id="r")
    assert seen.wait(10)
    stop()
    store.append(iid, "unheard", owner=A, run_id="r")
    store.flush()
    assert got == [2, 3, 4, 5]


def test_two_handles_share_one_writer(open_kind: Callable[[], Store], new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    other = open_kind()
    c = _claim(other, iid, "cell/a")
    store2 = open_kind()
    assert _claim(store2, iid, "cell/a", B).outcome is ClaimOutcome.BUSY
    _done(other, iid, c)
    assert store2.step(iid, "cell/a").status == "done"  # type: ignore[union-attr]
