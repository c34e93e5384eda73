"""The store server with real client processes (DESIGN.md §4, §11).

Barrier races between processes, clients and servers killed with ``kill -9``
at any moment, racing server starts, a foreign process holding the file.
Oracles are the journal invariants (``check_store``), the effects each client
logs, and what each client was told (its acknowledged claims and outcomes):
nothing acknowledged may be missing afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from helpers.holders import foreign_holder
from helpers.oracle import check_effects_once, check_store, read_effects
from helpers.servers import client, read_json, start_server, wait_until
from nbrunbook.engine import launch, protocol
from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.errors import StoreError, StoreLocked
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import new_run_id, process_owner
from nbrunbook.engine.model import ClaimOutcome
from nbrunbook.engine.store import Store

CLIENTS = 8
STEPS = 50


def _server_store(path: Path) -> Store:
    return open_store(f"server:{path}")


def _new_instance(store: Store, iid: str = "i") -> str:
    store.open_instance("rb", iid, {}, manifest_version=0, owner=process_owner(), run_id=new_run_id())
    return iid


def test_barrier_race_of_client_processes(tmp_path: Path) -> None:
    """8 processes released together onto the same 50 steps: one claim per step,
    every loser sees busy then the winner's result, seq gap-free."""
    path = tmp_path / "store.duckdb"
    store = _server_store(path)
    iid = _new_instance(store)
    barriers = [os.pipe() for _ in range(STEPS // 10)]
    reads = tuple(r for r, _ in barriers)
    procs = [client("race", path, iid, tmp_path, CLIENTS, *reads, fds=reads) for _ in range(CLIENTS)]
    for r in reads:
        os.close(r)
    try:
        for k, (_, w) in enumerate(barriers):
            for p in procs:
                assert read_json(p) == {"ready": 10 * k}
            os.close(w)  # every client blocked on this pipe sees end-of-file at once
        reports = [read_json(p) for p in procs]
        assert [p.wait(timeout=300) for p in procs] == [0] * CLIENTS
    finally:
        for p in procs:
            p.kill()
            p.wait()
            assert p.stdout is not None
            p.stdout.close()

    effects = read_effects(tmp_path / "effects.jsonl")
    winners = Counter(e["step_key"] for e in effects)
    assert len(winners) == STEPS and set(winners.values()) == {1}, winners
    by_key = {e["step_key"]: e["owner"] for e in effects}
    for report in reports:
        log = report["log"]
        for step in range(STEPS):
            mine = [what for p, what in log if p == f"cell/s{step}"]
            if mine == ["won"]:
                continue
            assert mine[-1] == f"result:{by_key[f'cell/s{step}@1']}", (report["owner"], step, mine)
            assert all(w == "busy" for w in mine[:-1]), mine
            if step % 10 == 0:
                assert mine[0] == "busy", (report["owner"], step, mine)  # released together: busy first
    events = check_store(store, iid)
    claimed = [e for e in events if e.event == "claimed"]
    assert len(claimed) == STEPS
    assert {(e.step_key, e.owner) for e in claimed} == set(by_key.items())
    check_effects_once(effects, events)
    store.close()


def test_kill9_of_a_client_interrupts_its_steps_at_once(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    store = _server_store(path)
    iid = _new_instance(store)
    holder = client("hold", path, iid, 3, 3600, stdin=True)  # a lease of an hour: only liveness can end it
    try:
        held = read_json(holder)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
        for f in (holder.stdin, holder.stdout):
            assert f is not None
            f.close()
    for i in range(3):
        st = store.wait(iid, f"cell/h{i}", timeout=120)
        assert st is not None and st.status == "interrupted"
        assert st.finished_at is not None and st.claimed_at is not None
    events = check_store(store, iid)
    interrupted = [e for e in events if e.event == "interrupted"]
    assert sorted(e.step_key or "" for e in interrupted) == sorted(held["keys"])
    for e in interrupted:
        assert e.owner == held["owner"] and e.payload["previous_owner"] == held["owner"]
        assert e.payload["reason"] == f"connection lost (client pid {held['pid']})"
    me, run = process_owner(), new_run_id()
    plain = store.claim(iid, "cell/h1", owner=me, run_id=run)
    assert plain.outcome is ClaimOutcome.INTERRUPTED  # not retry-safe: a person decides
    again = store.claim(iid, "cell/h0", owner=me, run_id=run, retry_safe=True)
    assert again.outcome is ClaimOutcome.CLAIMED and again.state.attempt == 2
    assert again.state.epoch == held["epochs"][0] + 1
    store.close()


def test_owner_with_another_live_connection_is_not_released(tmp_path: Path) -> None:
    """An owner id shared by two processes (a worker claiming for its parent)
    is gone only when its last connection ends."""
    path = tmp_path / "store.duckdb"
    store = _server_store(path)
    iid = _new_instance(store)
    shared = f"{process_owner()}-shared"
    mine = store.claim(iid, "cell/p", owner=shared, run_id=new_run_id(), lease=3600)
    assert mine.outcome is ClaimOutcome.CLAIMED
    worker = client("hold", path, iid, 2, 3600, shared, stdin=True)
    try:
        held = read_json(worker)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        _end(worker)

    def worker_gone() -> bool:
        status = launch.server_status(path)
        return status is not None and held["pid"] not in [c["pid"] for c in status["clients"]]

    wait_until(worker_gone, what="the server to notice the worker's death")
    store.flush()
    assert [s.status for s in store.steps(iid)] == ["running", "running", "running"]  # the owner lives on here
    store.close()  # its last connection: now it is gone
    store = _server_store(path)
    for p in ("cell/h0", "cell/h1", "cell/p"):
        st = store.wait(iid, p, timeout=120)
        assert st is not None and st.status == "interrupted"
    check_store(store, iid)
    store.close()


def _end(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()


@pytest.mark.parametrize("how", ["kill9", "after_commit:41", "after_commit:42", "inside_commit:41"])
def test_server_killed_mid_claims_loses_nothing(tmp_path: Path, how: str) -> None:
    """4 clients race over 40 steps; the server dies (kill -9, or SIGKILL at a
    crash point inside/after the n-th commit) and a client restarts it: every
    client finishes, nothing acknowledged is lost, no step runs twice or stalls.

    ``after_commit`` is the lost reply: the claim or outcome committed, the
    client never heard, it sends it again to the next server and must be
    recognised as its own (a claim by its token, an outcome by owner+epoch) -
    otherwise it would wait on itself until its lease ran out (``interrupted``)
    or be fenced."""
    path = tmp_path / "store.duckdb"
    env = {"NBRUNBOOK_CRASH_AT": how} if how != "kill9" else None
    server, info = start_server(path, env=env)
    store = _server_store(path)
    iid = _new_instance(store)
    store.close()
    effects = tmp_path / "effects.jsonl"
    procs = [client("stream", path, iid, 40, effects) for _ in range(4)]
    acks: list[dict[str, Any]] = []
    lock = threading.Lock()

    def collect(p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            with lock:
                acks.append(json.loads(line))

    readers = [threading.Thread(target=collect, args=(p,)) for p in procs]
    for t in readers:
        t.start()
    try:
        if how == "kill9":
            wait_until(lambda: len(acks) >= 30, what="30 acknowledged operations")
            os.kill(server.pid, signal.SIGKILL)
        assert server.wait(timeout=300) == -signal.SIGKILL  # killed by the test or by its crash point
        assert [p.wait(timeout=300) for p in procs] == [0] * 4
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for t in readers:
            t.join()
        server.kill()
        server.wait()
        for p in procs:
            assert p.stdout is not None
            p.stdout.close()

    assert sum(1 for a in acks if a.get("finished")) == 4
    store = _server_store(path)
    assert store.server_info["pid"] != info["pid"]  # type: ignore[attr-defined]  # a client restarted it
    events = check_store(store, iid)
    claimed = {(e.step_key, e.epoch, e.owner) for e in events if e.event == "claimed"}
    done = {(e.step_key, e.epoch, e.owner) for e in events if e.event == "done"}
    for a in acks:
        if "ack" in a:
            key = (a["step_key"], a["epoch"], a["owner"])
            assert key in (claimed if a["ack"] == "claimed" else done), f"acknowledged but lost: {a}"
    assert {e.step_key for e in events if e.event == "done"} == {f"cell/s{i}@1" for i in range(40)}
    assert not [e for e in events if e.event in ("interrupted", "fenced")]  # clients came back in time
    check_effects_once(read_effects(effects), events)
    assert Counter(e["step_key"] for e in read_effects(effects)) == Counter(f"cell/s{i}@1" for i in range(40))
    store.close()


def test_clients_starting_the_server_at_once_start_one(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    r, w = os.pipe()
    procs = [client("open", path, r, fds=(r,)) for _ in range(4)]
    os.close(r)
    try:
        os.close(w)  # go
        pids = {read_json(p)["server_pid"] for p in procs}
        assert [p.wait(timeout=300) for p in procs] == [0] * 4
    finally:
        for p in procs:
            p.kill()
            p.wait()
            assert p.stdout is not None
            p.stdout.close()
    assert len(pids) == 1
    paths = protocol.server_paths(str(path))
    status = launch.server_status(path)
    assert status is not None and status["pid"] in pids
    with open(paths.log) as fh:
        assert sum(" serving " in line for line in fh) == 1  # one server ever started


def test_foreign_process_holding_the_file(tmp_path: Path) -> None:
    """The server cannot open the file: the client raises the same StoreLocked
    (naming the holder's PID) as an embedded open would, and nothing is lost."""
    path = tmp_path / "store.duckdb"
    s = EmbeddedStore(str(path))
    s.open_instance("rb", "kept", {"x": 1}, manifest_version=0, owner="a@h:1:x", run_id="r")
    s.close()
    with foreign_holder(path) as holder:
        with pytest.raises(StoreLocked) as embedded_error:
            EmbeddedStore(str(path))
        with pytest.raises(StoreLocked) as info:
            _server_store(path)
        assert str(info.value) == str(embedded_error.value)
        assert f"PID {holder.pid}" in str(info.value) and str(path) in str(info.value)
        assert info.value.holder == embedded_error.value.holder
        assert not protocol.lock_held(protocol.server_paths(str(path)))  # the server gave up and exited
    store = _server_store(path)
    assert store.get_instance("kept").params == {"x": 1}
    store.close()


def test_bad_files_give_the_embedded_error(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    EmbeddedStore(str(path)).close()
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as embedded_error:
        EmbeddedStore(str(path))
    with pytest.raises(StoreError) as info:
        _server_store(path)
    assert type(info.value) is type(embedded_error.value)
    assert str(info.value) == str(embedded_error.value)
