"""Regressions for the four failure modes of DESIGN.md §2, at store level.

Each test is named after the failure mode it keeps impossible. The same modes
are tested again through real kernels and rb.map once those layers exist.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from conftest import owner
from helpers.oracle import check_effects_once, check_store, read_effects
from nbrunbook.engine.keys import branch_path, idempotency_key
from nbrunbook.engine.model import ClaimOutcome, EncodedValue
from nbrunbook.engine.store import Store

A = owner("alice")


def _fan_out(store: Store, iid: str, parent: str, names: list[str]) -> list[str]:
    """Launch one branch per name at once; each claims and completes after random delays."""
    start = threading.Barrier(len(names))
    keys: list[str] = []

    def branch(i: int, name: str) -> None:
        path = branch_path(parent, name, str(i))  # identity from names, never order
        start.wait()
        time.sleep(random.random() / 200)
        c = store.claim(iid, path, owner=A, run_id="r")
        assert c.outcome is ClaimOutcome.CLAIMED
        time.sleep(random.random() / 200)
        store.complete(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="r")
        keys.append(c.step_key)

    threads = [threading.Thread(target=branch, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return keys


def test_fm1_no_collided_seq_under_fanout(store: Store, new_instance: Callable[..., str]) -> None:
    """Three branches launched at once, with random delays, many times: seq unique
    and gap-free, and the branch keys never depend on completion order."""
    key_sets = []
    orders = set()
    for rep in range(60):
        iid = new_instance(f"fan-{rep}")
        keys = _fan_out(store, iid, "cell/p@1", ["alpha", "beta", "gamma"])
        events = check_store(store, iid)
        assert len(events) == 1 + 6
        key_sets.append(frozenset(keys))
        orders.add(tuple(keys))
    assert len(set(key_sets)) == 1, "branch keys changed between repetitions"
    assert len(orders) > 1, "completion order never varied: the test proves nothing"


def test_fm2_no_double_execution_under_concurrent_advance(
    store: Store, new_instance: Callable[..., str], tmp_path: Path
) -> None:
    """Two advancers run read -> claim -> effect -> record over the same steps at
    once: every side effect happens exactly once, and the log agrees."""
    iid = new_instance()
    effects = tmp_path / "effects.jsonl"
    lock = threading.Lock()
    go = threading.Barrier(2)

    def advance(name: str) -> None:
        me = owner(name)
        go.wait()
        for i in range(40):
            path = f"cell/c{i}"
            c = store.claim(iid, path, owner=me, run_id=f"run-{name}")
            while c.outcome is ClaimOutcome.BUSY:
                store.wait(iid, path, timeout=30)
                c = store.claim(iid, path, owner=me, run_id=f"run-{name}")
            if c.outcome is ClaimOutcome.DONE:
                continue
            assert c.outcome is ClaimOutcome.CLAIMED
            with lock, effects.open("a") as fh:
                fh.write(json.dumps({"step_key": c.step_key, "owner": me, "key": c.idempotency_key}) + "\n")
            store.complete(iid, c.step_key, owner=me, epoch=c.state.epoch, run_id=f"run-{name}")

    threads = [threading.Thread(target=advance, args=(n,)) for n in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = check_store(store, iid)
    found = read_effects(effects)
    assert len(found) == 40
    check_effects_once(found, events)


def test_fm3_concurrent_siblings_never_merge(store: Store, new_instance: Callable[..., str]) -> None:
    """Two concurrent runs with the same step names (two instances of one runbook,
    and two same-named branches under one parent) keep separate journals and results."""
    i1, i2 = new_instance("sib-1"), new_instance("sib-2")
    go = threading.Barrier(4)

    def run(iid: str, run_id: str, parent_key: str, branch: str) -> None:
        me = owner(run_id)
        go.wait()
        for n in range(20):
            path = branch_path(parent_key, "agent", f"{branch}-{n}")
            c = store.claim(iid, path, owner=me, run_id=run_id)
            assert c.outcome is ClaimOutcome.CLAIMED
            value = EncodedValue("json", json.dumps({"run": run_id, "n": n}).encode())
            store.complete(iid, c.step_key, owner=me, epoch=c.state.epoch, run_id=run_id, values={"out": value})

    jobs = [
        (i1, "run-1a", "cell/x@1", "b0"),
        (i1, "run-1b", "cell/x@1", "b1"),
        (i2, "run-2a", "cell/x@1", "b0"),
        (i2, "run-2b", "cell/x@1", "b1"),
    ]
    threads = [threading.Thread(target=run, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for iid, runs in ((i1, {"run-1a", "run-1b"}), (i2, {"run-2a", "run-2b"})):
        events = check_store(store, iid)
        step_events = [e for e in events if e.step_key]
        assert {e.run_id for e in step_events} == runs
        per_run = Counter(e.run_id for e in step_events)
        assert set(per_run.values()) == {40}  # 20 claimed + 20 done each, nothing merged
        for e in step_events:
            branch = "b0" if e.run_id.endswith("a") else "b1"
            assert f"[{branch}-" in (e.step_key or "")
            if e.event == "done":
                out = json.loads(store.values(iid, e.step_key or "")["out"].data)
                assert out["run"] == e.run_id
    # Same names, different instances: different idempotency keys.
    assert idempotency_key(i1, "cell/x@1/agent[b0-0]@1") != idempotency_key(i2, "cell/x@1/agent[b0-0]@1")


def test_fm4_retry_resumes_and_rerun_never_replays_stale_results(
    store: Store, new_instance: Callable[..., str]
) -> None:
    """Children derive from the parent's *invocation*: a retry of the parent (attempt
    2) returns finished children and re-runs only failed ones; an explicit rerun
    (invocation 2) runs every child fresh and never sees invocation 1's results."""
    iid = new_instance()
    ran: list[str] = []

    def run_parent(fail: set[int]) -> tuple[int, dict[int, str]]:
        p = store.claim(iid, "cell/p", owner=A, run_id="r")
        assert p.outcome is ClaimOutcome.CLAIMED
        results: dict[int, str] = {}
        failed = False
        for i in range(6):
            path = branch_path(p.step_key, "map", str(i))
            c = store.claim(iid, path, owner=A, run_id="r")
            if c.outcome is ClaimOutcome.DONE:
                results[i] = json.loads(store.values(iid, c.step_key)["r"].data)
                continue
            assert c.outcome is ClaimOutcome.CLAIMED
            ran.append(c.step_key)
            if i in fail:
                store.fail(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="r", error={})
                failed = True
                continue
            val = f"inv{p.state.invocation}-item{i}"
            store.complete(
                iid,
                c.step_key,
                owner=A,
                epoch=c.state.epoch,
                run_id="r",
                values={"r": EncodedValue("json", json.dumps(val).encode())},
            )
            results[i] = val
        if failed:
            store.fail(iid, p.step_key, owner=A, epoch=p.state.epoch, run_id="r", error={})
        else:
            store.complete(iid, p.step_key, owner=A, epoch=p.state.epoch, run_id="r")
        return p.state.invocation, results

    inv, _ = run_parent(fail={2, 4})
    assert inv == 1 and len(ran) == 6
    ran.clear()
    inv, results = run_parent(fail=set())  # retry: attempt 2 of invocation 1
    assert inv == 1
    assert ran == ["cell/p@1/map[2]@1", "cell/p@1/map[4]@1"]  # only the failed ones
    assert results == {i: f"inv1-item{i}" for i in range(6)}
    ran.clear()
    store.rerun(iid, "cell/p", owner=A, run_id="r")
    inv, results = run_parent(fail=set())  # explicit rerun: invocation 2
    assert inv == 2
    assert ran == [f"cell/p@2/map[{i}]@1" for i in range(6)]  # all fresh
    assert results == {i: f"inv2-item{i}" for i in range(6)}  # never a stale one
    check_store(store, iid)
