"""rb.map with process executors: the parent claims and records, workers only run."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import pytest

import nbrunbook as rb
from helpers.branch_work import fail_on_three, identity, nested_task, square_in_worker
from helpers.cells import running_cell
from helpers.oracle import check_store
from nbrunbook.engine.branches import NotInStep
from nbrunbook.engine.store import Store


def test_process_executor_runs_in_workers_and_records_in_the_parent(
    store: Store, new_instance: Callable[..., str]
) -> None:
    iid = new_instance()
    with running_cell(store, iid, cell="p") as cell:
        results = rb.map(square_in_worker, range(5), executor="process", max_workers=2)
    assert [r["square"] for r in results] == [0, 1, 4, 9, 16]
    assert os.getpid() not in {r["pid"] for r in results}
    # The worker saw the branch's own context (no store: it only runs the function).
    assert [r["key"] for r in results] == [f"{cell.step_key}/square_in_worker[{i}]@1" for i in range(5)]
    assert len({r["idem"] for r in results}) == 5
    events = check_store(store, iid)
    done = [e for e in events if e.event == "done" and "[" in (e.step_key or "")]
    assert {e.owner for e in done} == {cell.owner} and len(done) == 5  # the parent recorded them


def test_process_failures_group_and_retry_only_the_failed(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        with pytest.raises(ExceptionGroup) as info, running_cell(store, iid, cell="q") as cell:
            rb.map(fail_on_three, range(6), executor=pool)
        (exc,) = info.value.exceptions
        assert isinstance(exc, ValueError) and f"{cell.step_key}/fail_on_three[3]@1" in str(info.value)
        # The caller's executor is used, not shut down: it runs the retry too.
        with running_cell(store, iid, cell="q"):
            assert rb.map(abs, range(6), executor=pool, name="fail_on_three") == [0, 1, 2, 3, 4, 5]
    rows = {s.path: s for s in store.steps(iid, parent="cell/q@1")}
    assert rows["cell/q@1/fail_on_three[3]"].attempt == 2
    assert {s.attempt for p, s in rows.items() if not p.endswith("[3]")} == {1}  # not re-run
    check_store(store, iid)


def test_process_branches_cannot_nest_or_take_unpicklable_work(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    lock = threading.Lock()
    with pytest.raises(ExceptionGroup) as info, running_cell(store, iid, cell="n"):
        rb.parallel(
            {"nested": partial(nested_task, 2), "fine": partial(abs, -1), "lock": partial(identity, lock)},
            executor="process",
            max_workers=2,
        )
    errors = {str(e.__notes__[-1]).rsplit("[", 1)[1].split("]")[0]: e for e in info.value.exceptions}
    assert set(errors) == {"nested", "lock"}
    assert isinstance(errors["nested"], NotInStep) and "worker process" in str(errors["nested"])
    assert "lock" in str(errors["lock"]).lower() and "pickle" in str(errors["lock"]).lower()
    status = {s.path.rsplit("[", 1)[1]: s.status for s in store.steps(iid, parent="cell/n@1")}
    assert status == {"fine]": "done", "nested]": "failed", "lock]": "failed"}
    check_store(store, iid)


def test_functions_defined_interactively_reach_process_workers(store: Store, new_instance: Callable[..., str]) -> None:
    """A lambda (like a function defined in a notebook's ``__main__``) cannot be pickled by
    reference: with cloudpickle installed it is shipped by value, without it the branch
    fails with the pickling error - never silently run in this process."""
    iid = new_instance()
    offset = 10
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        with pytest.raises(ExceptionGroup, match="2 of 2 branches failed"), running_cell(store, iid):
            rb.map(lambda x: x + offset, [1, 2], executor="process", max_workers=1, name="add")
    else:
        with running_cell(store, iid):
            assert rb.map(lambda x: (x + offset, os.getpid()), [1, 2], executor="process", max_workers=1)[0][1] != (
                os.getpid()
            )
    check_store(store, iid)
