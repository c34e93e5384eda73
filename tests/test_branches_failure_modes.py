"""The four failure modes of DESIGN.md §2, through ``rb.map`` / ``rb.task`` / ``rb.parallel``.

The cell is claimed and its context bound exactly as the kernel guard does
(``helpers.cells.running_cell``); branches run on real threads against a real
DuckDB file, and the oracles are invariants over the journal, the cursor and
an effects file.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import nbrunbook as rb
from conftest import owner
from helpers.cells import Effects, as_context, branch_events, running_cell
from helpers.oracle import check_effects_once, check_store, read_effects
from nbrunbook.engine import context
from nbrunbook.engine.store import Store


def test_fm1_three_branches_at_once_never_collide(store: Store, new_instance: Callable[..., str]) -> None:
    """Three branches launched at once, 1,000 times, with random delays: seq unique and
    gap-free in every journal, and the branch keys are the same whatever the completion order."""
    key_sets: set[tuple[str, ...]] = set()
    orders: set[tuple[str, ...]] = set()

    def branch(name: str) -> str:
        time.sleep(random.random() / 500)
        finished.append(context.context().step_key)
        return name.upper()

    for rep in range(1000):
        iid = new_instance(f"fan-{rep}")
        finished: list[str] = []
        with running_cell(store, iid) as cell:
            results = rb.map(branch, ["alpha", "beta", "gamma"], max_workers=3)
        assert results == ["ALPHA", "BETA", "GAMMA"]  # list order, not completion order
        events = check_store(store, iid)
        # instance_created, cell claimed, fanout_declared, 3 x (claimed, done), cell done
        assert len(events) == 10
        branch_events = [e for e in events if e.step_key and e.step_key.startswith(cell.step_key + "/")]
        assert Counter(e.event for e in branch_events) == {"claimed": 3, "done": 3, "fanout_declared": 1}
        assert all(e.run_id == "run-1" for e in branch_events)
        key_sets.add(tuple(sorted(e.step_key or "" for e in branch_events if e.event == "done")))
        orders.add(tuple(finished))
    assert key_sets == {("cell/fan@1/branch[0]@1", "cell/fan@1/branch[1]@1", "cell/fan@1/branch[2]@1")}
    assert len(orders) > 1, "completion order never varied: the test proves nothing"


@pytest.mark.parametrize("advancers", [2, 3])
def test_fm2_concurrent_advancers_run_each_branch_once(
    store: Store, new_instance: Callable[..., str], tmp_path: Path, advancers: int
) -> None:
    """Several advancers (other owners, other runs) drive the same fan-out at once:
    every branch's side effect happens once, and every advancer gets the same results."""
    iid = new_instance()
    effects = Effects(tmp_path / "effects.jsonl")
    go = threading.Barrier(advancers)
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def work(item: int) -> str:
        time.sleep(random.random() / 200)
        effects.record(item=item)
        return f"item-{item}-by-{context.context().owner}"

    def advance(cell_ctx: context.StepContext, name: str) -> None:
        me = as_context(cell_ctx, owner=owner(name), run_id=f"run-{name}")
        try:
            with context.bound(me):
                go.wait()
                results[name] = rb.map(work, range(60), max_workers=4)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with running_cell(store, iid) as cell:
        threads = [threading.Thread(target=advance, args=(cell, f"adv{n}")) for n in range(advancers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    events = check_store(store, iid)
    found = read_effects(tmp_path / "effects.jsonl")
    assert len(found) == 60, "a branch ran twice, or not at all"
    check_effects_once(found, branch_events(events))
    assert sorted(e["item"] for e in found) == list(range(60))
    first = next(iter(results.values()))
    assert all(r == first for r in results.values()), "advancers saw different results"
    ran_by = {e["step_key"]: e["owner"] for e in found}
    for i, text in enumerate(first):
        key = f"cell/fan@1/work[{i}]@1"
        assert text == f"item-{i}-by-{ran_by[key]}"  # the recorded result of whoever ran it
    claims = [e for e in events if e.event == "claimed" and "/work[" in (e.step_key or "")]
    assert len(claims) == 60 and {e.run_id for e in claims} <= {f"run-adv{n}" for n in range(advancers)}


def test_fm3_concurrent_sibling_runs_never_merge(store: Store, new_instance: Callable[..., str]) -> None:
    """Two runs of the same runbook at once, with the same cell, fan-out and branch names
    (and, inside each, sibling branches calling same-named tasks): journals, keys' results
    and idempotency keys stay apart."""
    runs = {"sib-1": "run-a", "sib-2": "run-b"}
    for iid in runs:
        new_instance(iid)
    go = threading.Barrier(len(runs))
    results: dict[str, list[dict[str, object]]] = {}
    errors: list[BaseException] = []

    def tool(step: int) -> dict[str, object]:
        ctx = context.context()
        return {"instance": ctx.instance_id, "run": ctx.run_id, "key": ctx.step_key, "step": step}

    def agent(role: str) -> dict[str, object]:
        time.sleep(random.random() / 100)
        ctx = context.context()
        tools = [rb.task(tool, n, name="tool") for n in range(3)]
        return {"instance": ctx.instance_id, "run": ctx.run_id, "key": ctx.step_key, "role": role, "tools": tools}

    def run(iid: str) -> None:
        try:
            with running_cell(store, iid, owner=owner(runs[iid]), run_id=runs[iid]):
                go.wait()
                results[iid] = rb.map(agent, ["planner", "coder", "critic"], key=str, max_workers=3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(iid,)) for iid in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    keys: dict[str, set[str]] = {}
    idem: dict[str, set[str]] = {}
    for iid, run_id in runs.items():
        events = check_store(store, iid)
        step_events = [e for e in events if e.step_key]
        assert {e.run_id for e in step_events} == {run_id}, "another run's events in this journal"
        keys[iid] = {e.step_key or "" for e in step_events if e.event == "done"}
        assert len(keys[iid]) == 1 + 3 + 9  # the cell, 3 agents, 3 tools each
        for e in step_events:
            if e.event == "done" and "[" in (e.step_key or ""):
                recorded = json.loads(store.values(iid, e.step_key or "")["result"].data)
                assert recorded["instance"] == iid and recorded["run"] == run_id
                assert recorded["key"] == e.step_key
        for res in results[iid]:
            assert res["instance"] == iid and res["run"] == run_id
            tools = res["tools"]
            assert isinstance(tools, list)
            # Same-named tasks of sibling branches live under their own branch.
            assert [t["key"] for t in tools] == [f"{res['key']}/tool[#{n}]@1" for n in range(3)]
        idem[iid] = {s.idempotency_key for s in store.steps(iid)}
    assert keys["sib-1"] == keys["sib-2"], "same names must give the same step keys"
    assert not idem["sib-1"] & idem["sib-2"], "idempotency keys must differ between instances"


def test_fm4_retry_reruns_only_failed_branches_and_rerun_runs_all_fresh(
    store: Store, new_instance: Callable[..., str]
) -> None:
    """A map where some branches fail: the retry (attempt 2, same invocation) returns the
    finished branches' recorded results and re-runs only the failed ones; an explicit
    rerun of the cell (invocation 2) runs every branch fresh and never sees a stale result."""
    iid = new_instance()
    ran: list[str] = []
    lock = threading.Lock()
    failing = {2, 4}

    def work(item: int) -> str:
        ctx = context.context()
        with lock:
            ran.append(ctx.step_key)
        if item in failing:
            raise RuntimeError(f"item {item} broke")
        return f"inv{ctx.step_key.split('@')[1].split('/')[0]}-item{item}-attempt{ctx.attempt}"

    with pytest.raises(ExceptionGroup) as info, running_cell(store, iid, cell="p") as cell:
        rb.map(work, range(6))
    assert cell.attempt == 1
    assert "cell/p@1/work[2]@1" in str(info.value) and "cell/p@1/work[4]@1" in str(info.value)
    assert sorted(ran) == [f"cell/p@1/work[{i}]@1" for i in range(6)]

    ran.clear()
    failing.clear()
    with running_cell(store, iid, cell="p") as cell:  # retry: attempt 2 of invocation 1
        results = rb.map(work, range(6))
    assert (cell.invocation, cell.attempt) == (1, 2)
    assert sorted(ran) == ["cell/p@1/work[2]@1", "cell/p@1/work[4]@1"]
    assert results == [f"inv1-item{i}-attempt{2 if i in (2, 4) else 1}" for i in range(6)]

    ran.clear()
    store.rerun(iid, "cell/p", owner=owner("operator"), run_id="run-op", reason="fresh numbers")
    with running_cell(store, iid, cell="p") as cell:  # invocation 2
        results = rb.map(work, range(6))
    assert cell.invocation == 2
    assert sorted(ran) == [f"cell/p@2/work[{i}]@1" for i in range(6)]  # all fresh
    assert results == [f"inv2-item{i}-attempt1" for i in range(6)]  # never a stale one
    check_store(store, iid)


def test_fm4_tasks_follow_the_parent_invocation(store: Store, new_instance: Callable[..., str]) -> None:
    """rb.task: a retry returns the recorded result without running; a rerun runs it again."""
    iid = new_instance()
    calls: list[str] = []

    def fetch(n: int) -> tuple[int, str]:
        calls.append(context.context().step_key)
        return (n, context.context().idempotency_key)

    with pytest.raises(RuntimeError), running_cell(store, iid, cell="t"):
        first = rb.task(fetch, 1)
        raise RuntimeError("the cell fails after its task")
    with running_cell(store, iid, cell="t"):
        again = rb.task(fetch, 1)
    assert again == first and isinstance(again, tuple)  # recorded, exact type
    assert calls == ["cell/t@1/fetch[#0]@1"]
    store.rerun(iid, "cell/t", owner=owner("operator"), run_id="run-op")
    with running_cell(store, iid, cell="t"):
        fresh = rb.task(fetch, 1)
    assert calls == ["cell/t@1/fetch[#0]@1", "cell/t@2/fetch[#0]@1"]
    assert fresh[1] != first[1], "a new invocation needs a new idempotency key"
    check_store(store, iid)


_ADVANCER = """
import json, random, sys, time
from pathlib import Path
import nbrunbook as rb
from helpers.cells import Effects
from nbrunbook.engine import context
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import process_owner

location, iid, parent, effects_path, gate = sys.argv[1:6]
store = open_store(location)
effects = Effects(Path(effects_path))

def work(item):
    # Long enough (~0.5 s of work per process in all) that the other process,
    # released by the same gate, joins in even on a loaded 2-core machine.
    time.sleep(0.015 + random.random() / 50)
    effects.record(item=item)
    return f"item-{item}-by-{context.context().owner}"

ctx = context.StepContext(iid, parent, 1, 1, 1, "idem", {}, f"run-{process_owner()}", process_owner(), store)
print("ready", flush=True)
while not Path(gate).exists():
    time.sleep(0.002)
with context.bound(ctx):
    results = rb.map(work, range(80), max_workers=4)
store.close()
print(json.dumps(results), flush=True)
"""


def test_fm2_two_processes_advancing_the_same_fanout(store_path: Path, tmp_path: Path) -> None:
    """Two processes (two kernels) sharing the store through the store server drive the
    same fan-out cell at once: each branch's effect happens once, both see the same results."""
    import os
    import subprocess
    import sys

    from nbrunbook.engine.factory import open_store

    store_path.parent.mkdir(parents=True, exist_ok=True)
    location = f"server:{store_path}"
    store = open_store(location)
    try:
        store.open_instance("rb", "two", {}, manifest_version=0, owner=owner("creator"), run_id="run-0")
        parent = store.claim("two", "cell/fan", owner=owner("kernel-0"), run_id="run-0")
        effects_path, gate = tmp_path / "effects.jsonl", tmp_path / "gate"
        tests_dir = str(Path(__file__).resolve().parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
        args = [sys.executable, "-c", _ADVANCER, location, "two", parent.step_key, str(effects_path), str(gate)]
        children = [
            subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
        ]
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        gate.touch()
        outputs = [child.communicate(timeout=240) for child in children]
        for child, (_, err) in zip(children, outputs, strict=True):
            assert child.returncode == 0, err
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
        events = check_store(store, "two")
    finally:
        store.close()
    found = read_effects(effects_path)
    assert sorted(e["item"] for e in found) == list(range(80)), "a branch ran twice, or not at all"
    check_effects_once(found, branch_events(events))
    assert results[0] == results[1]
    owners = {e["owner"] for e in found}
    assert len(owners) == 2, "one process did everything: the race was not exercised"
