"""rb.task / rb.map / rb.parallel: keys, nesting, context, declarations, status."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import nbrunbook as rb
from helpers.cells import Effects, branch_events, running_cell
from helpers.oracle import check_effects_once, check_store, read_effects
from nbrunbook.engine import context
from nbrunbook.engine.branches import (
    DuplicateBranchKeys,
    FanoutChanged,
    NotInStep,
    branch_status,
    group_key,
)
from nbrunbook.engine.errors import InvalidName, RunbookError
from nbrunbook.engine.store import Store


def here() -> str:
    return context.context().step_key


def test_outside_a_step_is_a_clear_error_and_runs_nothing() -> None:
    ran: list[int] = []
    assert context.current() is None
    for call in (
        lambda: rb.task(ran.append, 1),
        lambda: rb.map(ran.append, [1, 2]),
        lambda: rb.parallel({"a": lambda: ran.append(1)}),
    ):
        with pytest.raises(RunbookError, match=r"needs a running runbook step") as info:
            call()
        assert isinstance(info.value, NotInStep)
    assert ran == []


def test_public_names_resolve_to_the_branch_api() -> None:
    from nbrunbook.engine import branches

    assert rb.task is branches.task and rb.map is branches.map and rb.parallel is branches.parallel


def test_keys_names_and_call_counters(store: Store, new_instance: Callable[..., str]) -> None:
    """Keys come from names, explicit keys and call-time counters only."""
    iid = new_instance()

    def check(host: str) -> str:
        return here()

    with running_cell(store, iid, cell="k") as cell:
        first = rb.map(check, ["web-1", "db/2"], key=str)
        second = rb.map(check, ["x", "y"])
        third = rb.map(check, ["z"], name="probe")
        tasks = [rb.task(here), rb.task(here), rb.task(here, key="final"), rb.task(here, name="n", key=7)]
        par = rb.parallel({"left": here, "right": here})
        lam = rb.map(lambda item: here(), [0])
    p = cell.step_key
    assert first == [f"{p}/check[web-1]@1", f"{p}/check[db%2F2]@1"]  # reserved characters escaped
    assert second == [f"{p}/check#1[0]@1", f"{p}/check#1[1]@1"]
    assert third == [f"{p}/probe[0]@1"]
    assert tasks == [f"{p}/here[#0]@1", f"{p}/here[#1]@1", f"{p}/here[final]@1", f"{p}/n[7]@1"]
    assert par == {"left": f"{p}/parallel[left]@1", "right": f"{p}/parallel[right]@1"}
    assert lam == [f"{p}/<lambda>[0]@1"]
    declared = [e for e in check_store(store, iid) if e.event == "fanout_declared"]
    assert [e.step_key for e in declared] == [
        group_key(p, "check"),
        group_key(p, "check#1"),
        group_key(p, "probe"),
        group_key(p, "parallel"),
        group_key(p, "<lambda>"),
    ]
    assert declared[0].payload["keys"] == ["web-1", "db/2"]
    assert declared[1].payload["count"] == 2 and len(declared[1].payload["items"]) == 2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rb.map(str, [1, 2, 3], key=lambda i: i % 2), "same key"),
        (lambda: rb.map(str, [1], key=lambda i: 1.5), "invalid branch key"),
        (lambda: rb.map(str, [1], key=lambda i: "#3"), "reserved"),
        (lambda: rb.map(str, [1], key=lambda i: ""), "invalid branch key"),
        (lambda: rb.task(str, name="a#b"), "invalid branch name"),
        (lambda: rb.map(str, [1], executor="fibers"), "executor must be"),
        (lambda: rb.map(str, [1], key="name"), "must be a function"),
        (lambda: rb.parallel({1: str}), "string keys"),
    ],
)
def test_bad_keys_and_arguments_are_refused_before_anything_runs(
    store: Store, new_instance: Callable[..., str], call: Callable[[], object], match: str
) -> None:
    iid = new_instance()
    with pytest.raises((ValueError, TypeError, RunbookError), match=match), running_cell(store, iid):
        call()
    assert not [s for s in store.steps(iid) if "[" in s.path], "a branch was claimed"
    if match == "same key":
        with pytest.raises(DuplicateBranchKeys):
            with running_cell(store, iid):
                call()
    if "invalid" in match:
        with pytest.raises(InvalidName), running_cell(store, iid):
            call()


def test_branch_context_and_contextvars_reach_worker_threads(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance(params={"region": "eu"})
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")

    def probe(item: int) -> dict[str, object]:
        ctx = rb.context()
        return {
            "var": request_id.get(),
            "thread": threading.current_thread().name,
            "key": ctx.step_key,
            "idem": ctx.idempotency_key,
            "params": dict(ctx.params),
            "run": ctx.run_id,
            "attempt": ctx.attempt,
            "epoch": ctx.epoch,
        }

    with running_cell(store, iid, run_id="run-ctx", params={"region": "eu"}) as cell:
        request_id.set("req-42")
        results = rb.map(probe, range(4), max_workers=2)
        assert rb.context() is cell  # the cell's context is back after the fan-out
    assert {r["var"] for r in results} == {"req-42"}
    assert all(str(r["thread"]).startswith("nbrunbook-branch") for r in results)
    assert [r["key"] for r in results] == [f"{cell.step_key}/probe[{i}]@1" for i in range(4)]
    assert len({r["idem"] for r in results} | {cell.idempotency_key}) == 5
    assert {(r["run"], r["attempt"], r["epoch"]) for r in results} == {("run-ctx", 1, 1)}
    assert all(r["params"] == {"region": "eu"} for r in results)


def test_nested_branches_sit_under_their_branch_and_resume(
    store: Store, new_instance: Callable[..., str], tmp_path: Path
) -> None:
    """A task and a map inside a branch get keys under the branch's key; a retry of the
    cell re-runs only the nested branch that failed."""
    iid = new_instance()
    effects = Effects(tmp_path / "effects.jsonl")
    broken = {("b", 1)}

    def leaf(pair: tuple[str, int]) -> str:
        effects.record()
        if pair in broken:
            raise ValueError(f"leaf {pair} broke")
        return here()

    def region(name: str) -> dict[str, object]:
        effects.record()
        setup = rb.task(lambda: here(), name="setup")
        leaves = rb.map(leaf, [(name, 0), (name, 1)], key=lambda p: p[1])
        return {"setup": setup, "leaves": leaves}

    with pytest.raises(ExceptionGroup) as info, running_cell(store, iid, cell="n"):
        rb.map(region, ["a", "b"], key=str)
    outer = info.value
    assert "cell/n@1/region[b]@1" in str(outer)
    inner = outer.exceptions[0]
    assert isinstance(inner, ExceptionGroup) and "cell/n@1/region[b]@1/leaf[1]@1" in str(inner)
    assert isinstance(inner.exceptions[0], ValueError)

    broken.clear()
    with running_cell(store, iid, cell="n"):
        results = rb.map(region, ["a", "b"], key=str)
    assert results[1] == {
        "setup": "cell/n@1/region[b]@1/setup[#0]@1",
        "leaves": ["cell/n@1/region[b]@1/leaf[0]@1", "cell/n@1/region[b]@1/leaf[1]@1"],
    }
    ran = [e["step_key"] for e in read_effects(tmp_path / "effects.jsonl")]
    # region[b] ran twice (it failed), leaf[1] of b ran twice, everything else once.
    assert sorted(ran) == sorted(
        [
            "cell/n@1/region[a]@1",
            "cell/n@1/region[b]@1",
            "cell/n@1/region[b]@1",
            "cell/n@1/region[a]@1/leaf[0]@1",
            "cell/n@1/region[a]@1/leaf[1]@1",
            "cell/n@1/region[b]@1/leaf[0]@1",
            "cell/n@1/region[b]@1/leaf[1]@1",
            "cell/n@1/region[b]@1/leaf[1]@1",
        ]
    )
    events = check_store(store, iid)
    check_effects_once(read_effects(tmp_path / "effects.jsonl"), [e for e in events if "leaf[0]" in (e.step_key or "")])
    assert [s.path for s in store.steps(iid, parent="cell/n@1/region[b]@1")] == [
        "cell/n@1/region[b]@1/leaf[0]",
        "cell/n@1/region[b]@1/leaf[1]",
        "cell/n@1/region[b]@1/setup[#0]",
    ]


def test_results_round_trip_exactly_and_data_frames_via_arrow(store: Store, new_instance: Callable[..., str]) -> None:
    import pyarrow as pa

    iid = new_instance()
    values = [None, 1, 2.5, "ü", [1, (2, 3)], {"a": (None,)}, (), pa.table({"x": [1, 2]})]
    ran: list[int] = []

    def produce(i: int) -> object:
        ran.append(i)
        return values[i]

    with pytest.raises(RuntimeError), running_cell(store, iid, cell="v"):
        first = rb.map(produce, range(len(values)))
        raise RuntimeError("fail the cell so the retry replays")
    with running_cell(store, iid, cell="v"):
        replayed = rb.map(produce, range(len(values)))
    assert sorted(ran) == list(range(len(values)))  # the retry ran nothing
    assert replayed[:-1] == values[:-1] == first[:-1]
    assert [type(v) for v in replayed[:-1]] == [type(v) for v in values[:-1]]
    assert replayed[-1].equals(values[-1])


def test_changed_fanout_list_on_resume_is_an_error_naming_the_difference(
    store: Store, new_instance: Callable[..., str]
) -> None:
    iid = new_instance()
    ran: list[object] = []
    failing = ["b"]

    def work(item: object) -> object:
        ran.append(item)
        if item in failing:
            raise RuntimeError("b failed")
        return item

    with pytest.raises(ExceptionGroup), running_cell(store, iid, cell="c"):
        with pytest.raises(ExceptionGroup):
            rb.map(work, ["a", "b", "c"], key=str, name="first")
        rb.map(work, [10, 20, 30, "b"], name="second")
    ran.clear()
    failing.clear()
    # Explicit keys: the keys added and removed are named; nothing runs.
    with pytest.raises(FanoutChanged, match=r"keys added: d; keys removed: b") as info:
        with running_cell(store, iid, cell="c"):
            rb.map(work, ["a", "c", "d"], key=str, name="first")
    assert info.value.added == ["d"] and info.value.removed == ["b"] and ran == []
    # The same keys in another order are the same branches; index keys notice changed items.
    with pytest.raises(FanoutChanged, match=r"items changed at: 1, 3"):
        with running_cell(store, iid, cell="c"):
            assert rb.map(work, ["c", "b", "a"], key=str, name="first") == ["c", "b", "a"]
            rb.map(work, [10, 25, 30, "c"], name="second")
    assert ran == ["b"]
    with pytest.raises(FanoutChanged, match=r"keys removed: 3"), running_cell(store, iid, cell="c"):
        rb.map(work, ["a", "b", "c"], key=str, name="first")
        rb.map(work, [10, 20, 30], name="second")
    with running_cell(store, iid, cell="c"):
        assert rb.map(work, ["a", "b", "c"], key=str, name="first") == ["a", "b", "c"]
        assert rb.map(work, [10, 20, 30, "b"], name="second") == [10, 20, 30, "b"]
    assert ran == ["b", "b"]
    check_store(store, iid)


def test_branch_status_counts_and_failed_keys(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()

    def odd_fails(i: int) -> int:
        if i % 2:
            raise ValueError(i)
        return i

    with pytest.raises(ExceptionGroup), running_cell(store, iid, cell="s") as cell:
        rb.map(odd_fails, range(5))
    status = branch_status(store, iid, cell.step_key)
    assert status.counts["done"] == 3 and status.counts["failed"] == 2 and status.counts["total"] == 5
    assert status.failed == [f"{cell.step_key}/odd_fails[1]@1", f"{cell.step_key}/odd_fails[3]@1"]
    assert status.interrupted == [] and len(status.branches) == 5
    # With the journal, declared branches nobody claimed yet count as pending.
    store.append(
        iid,
        "fanout_declared",
        owner="o",
        run_id="r",
        step_key=group_key(cell.step_key, "later"),
        payload={"kind": "map", "parent": cell.step_key, "name": "later", "call": 0, "count": 4, "items": []},
        once=True,
    )
    with_events = branch_status(store, iid, cell.step_key, events=store.journal(iid))
    assert with_events.counts["pending"] == 4 and with_events.counts["total"] == 9


def test_empty_fanouts_return_empty_results(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    with running_cell(store, iid):
        assert rb.map(str, []) == []
        assert rb.parallel({}) == {}
    check_store(store, iid)


def test_many_branches_are_claimed_in_chunks_not_all_at_once(
    store: Store, new_instance: Callable[..., str], tmp_path: Path
) -> None:
    """A long fan-out is claimed a window at a time, so a slow branch list does not sit
    claimed (shown running) long before it starts; every branch still runs once."""
    iid = new_instance()
    running_seen: list[int] = []
    effects = Effects(tmp_path / "effects.jsonl")

    def slow(i: int) -> int:
        effects.record()
        time.sleep(0.01)
        running_seen.append(sum(1 for s in store.steps(iid) if s.status == "running"))
        return i

    with running_cell(store, iid, cell="w") as cell:
        assert rb.map(slow, range(200), max_workers=2) == list(range(200))
    assert max(running_seen) < 200  # never all claimed at once
    check_effects_once(read_effects(tmp_path / "effects.jsonl"), branch_events(check_store(store, iid)))
    assert branch_status(store, iid, cell.step_key).counts["done"] == 200
