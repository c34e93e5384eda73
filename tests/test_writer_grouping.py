"""When a group of fire-and-forget outcomes waits for its caller's next operation.

The decision is deterministic given the observed gaps, so it is tested here
directly, with fixed clock values; no wall-clock assertion.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.writer import _Gaps, _Op


def _op(caller: int, sync: bool = False) -> _Op:
    return _Op(lambda batch: None, Future(), sync, caller, time.monotonic())


def test_gaps_learn_each_callers_follow_up_delay() -> None:
    gaps = _Gaps()
    gaps.sync_queued(1, 5.0)  # a sync op with no outcome before it teaches nothing
    assert gaps.average == {}
    gaps.outcome_queued(1, 10.0)
    gaps.sync_queued(1, 10.0004)
    assert abs(gaps.average[1] - 0.0004) < 1e-9
    gaps.outcome_queued(2, 10.0)
    gaps.sync_queued(2, 10.02)
    assert abs(gaps.average[2] - 0.02) < 1e-9
    # A moving average: one slow follow-up moves a quick caller only part of the way.
    gaps.outcome_queued(1, 20.0)
    gaps.sync_queued(1, 20.01)
    assert 0.0004 < gaps.average[1] < 0.01


def test_only_quick_followers_make_outcomes_wait(tmp_path: Path) -> None:
    store = EmbeddedStore(str(tmp_path / "s.duckdb"))
    try:
        w = store.writer
        assert w._linger_for([_op(1)]) == 0.0  # never seen: commit at once
        w.gaps.average.update({1: 0.0003, 2: 0.050})
        wait = w._linger_for([_op(1)])
        assert 0.0 < wait <= w.linger  # a kernel running cells back to back
        assert w._linger_for([_op(2)]) == 0.0  # a headless run: its next claim is a kernel round trip away
        assert w._linger_for([_op(1), _op(2)]) == 0.0  # anyone slow in the group: no wait
        w.linger = 0.0
        assert w._linger_for([_op(1)]) == 0.0  # lingering switched off
    finally:
        store.close()


def test_gaps_stay_bounded_as_callers_come_and_go() -> None:
    gaps = _Gaps()
    for caller in range(10_000):  # server connections that ended with an outcome, or with a claim
        gaps.outcome_queued(caller, 1.0)
        if caller % 2:
            gaps.sync_queued(caller, 1.001)
    assert len(gaps._pending) <= 4096 and len(gaps.average) <= 4096


def test_group_inserts_send_shared_columns_once_and_write_every_row(tmp_path: Path) -> None:
    import duckdb

    from nbrunbook.engine.writer import _insert

    con = duckdb.connect(str(tmp_path / "t.duckdb"), config={"autoinstall_known_extensions": False})
    con.execute("CREATE TABLE t (a VARCHAR, b BIGINT, c DOUBLE, d VARCHAR, e BLOB)")
    groups: list[list[tuple[object, ...]]] = [
        [("x", 1, 1.5, None, b"v")],  # one row: a VALUES statement
        [("x", k, 2.0, None, b"v") for k in range(3)],
        [("x", k, 2.0, None if k % 2 else "s", b"v") for k in range(8)],  # shared a, c, e
        [("same", 7, 0.5, None, b"") for _ in range(5)],  # every column shared: still five rows
        [("m", 1, float(k % 2) or 1, None, b"w") for k in range(4)],  # 1 and 1.0 differ in type: not shared
    ]
    written: list[tuple[object, ...]] = []
    for rows in groups:
        sql, params = _insert("t", rows)
        if len(rows) > 3:
            assert "unnest($1)" not in sql or rows[0][0] == "same", sql  # column a is one scalar
        con.execute(sql, params)
        written.extend(rows)
    got = con.execute("SELECT a, b, c, d, e FROM t").fetchall()
    assert sorted(got, key=repr) == sorted(written, key=repr)
    con.close()
