"""Branch failures: exception groups, interrupted and exhausted branches, unrecordable
results, Ctrl-C (in a branch, and SIGINT to a real process), and lease renewal."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import nbrunbook as rb
from conftest import owner
from helpers.branch_work import Widget, make_widget
from helpers.cells import Effects, branch_events, running_cell
from helpers.oracle import check_effects_once, check_store, read_effects
from nbrunbook.engine import context
from nbrunbook.engine.errors import AttemptsExhausted, StepInterrupted, ValueNotSerializable
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import branch_path
from nbrunbook.engine.model import ClaimOutcome
from nbrunbook.engine.store import Store

TESTS = Path(__file__).resolve().parent


def test_failures_let_the_others_finish_then_raise_one_group_naming_each_key(
    store: Store, new_instance: Callable[..., str], tmp_path: Path
) -> None:
    iid = new_instance()
    effects = Effects(tmp_path / "effects.jsonl")

    def check(i: int) -> int:
        effects.record()
        if i == 1:
            raise ValueError("disk full on host 1")
        if i == 5:
            raise KeyError("host 5")
        return i * 10

    with pytest.raises(ExceptionGroup) as info, running_cell(store, iid, cell="g") as cell:
        rb.map(check, range(8), max_workers=3)
    group = info.value
    keys = [f"{cell.step_key}/check[1]@1", f"{cell.step_key}/check[5]@1"]
    assert str(group).startswith(f"rb.map 'check' under {cell.step_key}: 2 of 8 branches failed: {', '.join(keys)}")
    assert [type(e) for e in group.exceptions] == [ValueError, KeyError]
    assert [e.__notes__ for e in group.exceptions] == [[f"in branch {k}"] for k in keys]
    # The others finished and were recorded; each effect once.
    states = {s.path: s.status for s in store.steps(iid, parent=cell.step_key)}
    assert Counter(states.values()) == {"done": 6, "failed": 2}
    events = check_store(store, iid)
    check_effects_once(read_effects(tmp_path / "effects.jsonl"), branch_events(events))
    failed = {e.step_key: e.payload["error"] for e in events if e.event == "failed"}
    assert [failed[k]["type"] for k in keys] == ["ValueError", "KeyError"]
    assert "disk full on host 1" in failed[keys[0]]["traceback"]
    # except* picks them apart like any group.
    try:
        raise group
    except* KeyError as only_keys:
        assert len(only_keys.exceptions) == 1
    except* ValueError:
        pass


def test_a_failing_task_raises_its_own_exception_and_is_recorded(
    store: Store, new_instance: Callable[..., str]
) -> None:
    iid = new_instance()

    def boom() -> None:
        raise ConnectionError("api down")

    with pytest.raises(ConnectionError, match="api down"), running_cell(store, iid, cell="t") as cell:
        rb.task(boom)
    (row,) = store.steps(iid, parent=cell.step_key)
    assert (row.path, row.status) == (f"{cell.step_key}/boom[#0]", "failed")
    check_store(store, iid)


def test_unrecordable_results_fail_the_branch_naming_the_type(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()

    def build(i: int) -> object:
        return Widget(i) if i == 2 else i

    with pytest.raises(ExceptionGroup) as info, running_cell(store, iid, cell="u") as cell:
        rb.map(build, range(4))
    (exc,) = info.value.exceptions
    assert isinstance(exc, ValueNotSerializable)
    assert "helpers.branch_work.Widget" in str(exc) and f"{cell.step_key}/build[2]@1" in str(exc)
    with pytest.raises(ValueNotSerializable, match=r"builtins\.object"), running_cell(store, iid, cell="u2"):
        rb.task(object)
    # Opting in to pickle records it, and the retry replays it (decoding opted in too).
    with running_cell(store, iid, cell="u"):
        assert rb.map(build, range(4), allow_pickle=True) == [0, 1, Widget(2), 3]
    store.rerun(iid, "cell/u", owner=owner("op"), run_id="r-op")
    with pytest.raises(RuntimeError), running_cell(store, iid, cell="u"):
        first = rb.task(make_widget, 7, allow_pickle=True)
        raise RuntimeError("retry me")
    with running_cell(store, iid, cell="u"):
        assert rb.task(make_widget, 7, allow_pickle=True) == first == Widget(7)
    check_store(store, iid)


def test_interrupted_branch_is_not_silently_rerun(store: Store, new_instance: Callable[..., str]) -> None:
    """A branch whose owner died mid-run raises StepInterrupted (with the resolve command)
    unless the step's options make its branches retry-safe."""
    iid = new_instance()
    ran: list[int] = []
    ghost = owner("ghost")

    def work(i: int) -> int:
        ran.append(i)
        return i

    with pytest.raises(ExceptionGroup) as info, running_cell(store, iid, cell="i") as cell:
        # A previous kernel claimed branch 1, then died.
        c = store.claim(iid, branch_path(cell.step_key, "work", "1"), owner=ghost, run_id="run-ghost")
        assert c.outcome is ClaimOutcome.CLAIMED
        store.release_owner(ghost, reason="kernel died", run_id="run-ghost")
        rb.map(work, range(3))
    (exc,) = info.value.exceptions
    assert isinstance(exc, StepInterrupted) and exc.step == "cell/i@1/work[1]@1"
    assert "nbrunbook resolve" in str(exc)
    assert sorted(ran) == [0, 2]
    with pytest.raises(StepInterrupted), running_cell(store, iid, cell="i"):
        rb.task(work, 1, name="work", key=1)  # the same step, reached as a task
    with running_cell(store, iid, cell="i", options={"retry_safe": True}):
        assert rb.map(work, range(3)) == [0, 1, 2]
    assert sorted(ran) == [0, 1, 2]
    check_store(store, iid)


def test_exhausted_branch_names_its_attempts(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()

    def never(i: int) -> int:
        raise RuntimeError("still broken")

    for _ in range(2):
        with pytest.raises(ExceptionGroup), running_cell(store, iid, cell="x", options={"max_attempts": 2}):
            rb.map(never, [0])
    with pytest.raises(ExceptionGroup) as info, running_cell(store, iid, cell="x", options={"max_attempts": 2}):
        rb.map(never, [0])
    (exc,) = info.value.exceptions
    assert isinstance(exc, AttemptsExhausted) and (exc.attempts, exc.limit) == (2, 2)
    check_store(store, iid)


def _settle(store: Store, iid: str) -> None:
    """Wait until no step is running (branch threads still finishing after Ctrl-C)."""
    for s in store.steps(iid):
        if s.status == "running":
            store.wait(iid, s.path, timeout=60)


def _outcomes(store: Store, iid: str, parent: str) -> dict[str, str]:
    """Branch path -> done | not_started | failed."""
    events = store.journal(iid)
    not_started = {
        e.step_key
        for e in events
        if e.event == "failed" and e.payload.get("error", {}).get("not_started") and e.step_key
    }
    out = {}
    for s in store.steps(iid, parent=parent):
        out[s.path] = "not_started" if s.status == "failed" and s.step_key in not_started else s.status
    return out


def test_keyboard_interrupt_in_a_branch_cancels_pending_branches(
    store: Store, new_instance: Callable[..., str], tmp_path: Path
) -> None:
    iid = new_instance()
    effects = Effects(tmp_path / "effects.jsonl")
    interrupt = {4}

    def work(i: int) -> int:
        effects.record()
        if i in interrupt:
            raise KeyboardInterrupt
        time.sleep(0.01)
        return i

    with pytest.raises(KeyboardInterrupt), running_cell(store, iid, cell="k") as cell:
        rb.map(work, range(120), max_workers=2)
    _settle(store, iid)
    outcomes = _outcomes(store, iid, cell.step_key)
    ran = Counter(e["step_key"].rsplit("@", 1)[0] for e in read_effects(tmp_path / "effects.jsonl"))
    assert outcomes[f"{cell.step_key}/work[4]"] == "failed"
    not_started = [p for p, o in outcomes.items() if o == "not_started"]
    unclaimed = [f"{cell.step_key}/work[{i}]" for i in range(120) if f"{cell.step_key}/work[{i}]" not in outcomes]
    assert not_started and unclaimed, "nothing was pending when Ctrl-C came: the test proves nothing"
    assert not any(p in ran for p in not_started + unclaimed), "a cancelled branch ran"
    assert all(outcomes[p] == "done" for p in ran if p != f"{cell.step_key}/work[4]")

    interrupt.clear()
    with running_cell(store, iid, cell="k"):
        assert rb.map(work, range(120), max_workers=2) == list(range(120))
    ran = Counter(e["step_key"] for e in read_effects(tmp_path / "effects.jsonl"))
    assert ran.pop(f"{cell.step_key}/work[4]@1") == 2  # interrupted mid-run, then run again
    assert set(ran.values()) == {1} and len(ran) == 119  # every other branch exactly once
    check_store(store, iid)


_SIGINT_CHILD = """
import faulthandler, signal, sys, time
faulthandler.dump_traceback_later(50)  # a hang shows its stacks in the test failure
# Python keeps SIGINT ignored if it started that way (a suite run as a background job of a
# non-interactive shell); this test is about Ctrl-C becoming KeyboardInterrupt, so say so.
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
import nbrunbook as rb
from helpers.cells import Effects, running_cell
from nbrunbook.engine.factory import open_store

location, effects_path, gate = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
store = open_store(location)
store.open_instance("rb", "sig", {}, manifest_version=0, owner="creator@h:1:a", run_id="run-c")
effects = Effects(effects_path)

def work(i):
    effects.record()
    print("started", i, flush=True)
    while not gate.exists():
        time.sleep(0.005)
    return i

try:
    with running_cell(store, "sig", cell="fan", run_id="run-child"):
        rb.map(work, range(40), max_workers=2)
except KeyboardInterrupt:
    print("interrupted", flush=True)
gate.touch()  # let the branches that were running finish and record themselves
for s in store.steps("sig"):
    if s.status == "running":
        store.wait("sig", s.path, timeout=60)
store.close()
faulthandler.cancel_dump_traceback_later()
print("closed", flush=True)
"""


def test_sigint_to_a_process_running_a_fanout(store_kind: str, store_path: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the driving thread even while it waits on branches: pending branches
    are recorded not started (or never claimed), running ones finish, and a retry in
    another process runs exactly the rest."""
    store_path.parent.mkdir(parents=True, exist_ok=True)
    location = f"{store_kind}:{store_path}"
    effects_path, gate = tmp_path / "effects.jsonl", tmp_path / "gate"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(
        [sys.executable, "-c", _SIGINT_CHILD, location, str(effects_path), str(gate)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout or ()], daemon=True)
        reader.start()
        out = ""
        try:
            while out.count("started") < 2:
                try:
                    out += lines.get(timeout=60)
                except queue.Empty:
                    child.kill()
                    pytest.fail(f"the child did not start its branches: {out!r} {child.stderr.read()}")
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
                pytest.fail(f"the child hung after SIGINT: {out!r} {child.stderr.read()}")
            reader.join(timeout=10)
            while not lines.empty():
                out += lines.get()
            err = child.stderr.read()
        finally:
            if child.poll() is None:
                child.kill()
    assert child.returncode == 0, err
    assert "interrupted" in out and "closed" in out, out + err

    store = open_store(location)
    try:
        parent = "cell/fan@1"
        outcomes = _outcomes(store, "sig", parent)
        ran = {e["step_key"].rsplit("@", 1)[0] for e in read_effects(effects_path)}
        assert len(ran) == 2 and all(outcomes[p] == "done" for p in ran)
        pending = [p for p, o in outcomes.items() if o != "done"]
        assert all(outcomes[p] == "not_started" for p in pending)
        assert len(outcomes) < 40 or pending, "nothing was pending when Ctrl-C came"
        effects = Effects(effects_path)

        def work(i: int) -> int:
            effects.record()
            return i

        with running_cell(store, "sig", cell="fan", run_id="run-retry") as cell:
            assert (cell.invocation, cell.attempt) == (1, 2)
            assert rb.map(work, range(40), max_workers=2) == list(range(40))
        events = check_store(store, "sig")
        found = read_effects(effects_path)
        assert len(found) == 40
        check_effects_once(found, branch_events(events))
    finally:
        store.close()


@pytest.mark.parametrize("via", ["map", "task"])
def test_leases_of_long_branches_are_renewed(store: Store, new_instance: Callable[..., str], via: str) -> None:
    """A branch running for longer than its lease keeps it: another advancer finds it busy
    the whole time, never interrupted (the process heartbeat renews it)."""
    iid = new_instance()
    stop, started = threading.Event(), threading.Event()
    seen: list[str] = []

    def intruder(path: str) -> None:
        started.wait(60)
        while not stop.is_set():
            c = store.claim(iid, path, owner=owner("intruder"), run_id="run-x")
            seen.append(c.outcome.value)
            stop.wait(0.2)

    def slow(i: int) -> int:
        started.set()
        time.sleep(4.0)
        return i

    with running_cell(store, iid, cell="l", options={"lease": 1.5}) as cell:
        key = "0" if via == "map" else "#0"
        t = threading.Thread(target=intruder, args=(branch_path(cell.step_key, "slow", key),))
        t.start()
        try:
            assert (rb.map(slow, [0]) if via == "map" else [rb.task(slow, 0)]) == [0]
        finally:
            stop.set()
            t.join()
    assert set(seen) <= {"busy", "done"} and "busy" in seen
    events = check_store(store, iid)
    assert not [e for e in events if e.event == "interrupted"]
    assert context.current() is None
