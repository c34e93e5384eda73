"""Server restarts and the owners' grace period (DESIGN.md §3, §4).

A restarted server finds steps still ``running``. Their owners may be alive
and about to reconnect, so they get a grace period (one lease by default)
during which they count as live; an owner whose process is gone is released
at once; one that does not come back is released when the grace ends. Every
release is journaled with its reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.oracle import check_store
from helpers.servers import client, read_json, start_server
from nbrunbook.engine import launch
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import new_run_id, process_owner
from nbrunbook.engine.model import ClaimOutcome
from nbrunbook.engine.store import Store

ME = process_owner()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store.duckdb"


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _holder(path: Path, store: Store) -> tuple[subprocess.Popen[str], dict[str, object]]:
    store.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id=new_run_id())
    holder = client("hold", path, "i", 2, 3600, stdin=True)  # an hour's lease: only liveness decides
    return holder, read_json(holder)


def _end(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()


def _kill(server: subprocess.Popen[bytes]) -> None:
    os.kill(server.pid, signal.SIGKILL)
    server.wait()


def test_owner_whose_process_died_meanwhile_is_released_at_start(
    path: Path, servers: list[subprocess.Popen[bytes]]
) -> None:
    first, _ = start_server(path)
    servers.append(first)
    store = open_store(f"server:{path}")
    holder, held = _holder(path, store)
    try:
        _kill(first)  # the server goes first, so nobody sees the holder's connection end...
        os.kill(holder.pid, signal.SIGKILL)  # ...then the holder dies while no server runs
        holder.wait()
    finally:
        _end(holder)
    # The next call starts a new server, which finds the dead owner's running steps.
    for i in range(2):
        st = store.step("i", f"cell/h{i}")
        assert st is not None and st.status == "interrupted"
    events = check_store(store, "i")
    reasons = {e.payload["reason"] for e in events if e.event == "interrupted"}
    assert reasons == {"owner process gone (found when the store server started)"}
    assert {e.owner for e in events if e.event == "interrupted"} == {held["owner"]}
    store.close()


def test_live_owner_keeps_its_steps_during_grace_then_loses_them(
    path: Path, servers: list[subprocess.Popen[bytes]]
) -> None:
    first, _ = start_server(path)
    servers.append(first)
    store = open_store(f"server:{path}")
    holder, held = _holder(path, store)
    try:
        os.kill(holder.pid, signal.SIGSTOP)  # alive, but it cannot reconnect
        _kill(first)
        second, _ = start_server(path, grace=600)
        servers.append(second)
        status = launch.server_status(path)
        assert status is not None and held["owner"] in status["grace_owners"]
        busy = store.claim("i", "cell/h0", owner=ME, run_id=new_run_id())
        assert busy.outcome is ClaimOutcome.BUSY and busy.state.owner == held["owner"]  # live during grace
        _kill(second)
        third, _ = start_server(path, grace=0.5)
        servers.append(third)
        st = store.wait("i", "cell/h0", timeout=120)  # the grace ends without a reconnect
        assert st is not None and st.status == "interrupted"
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        _end(holder)
    events = check_store(store, "i")
    interrupted = [e for e in events if e.event == "interrupted"]
    assert len(interrupted) == 2
    assert {e.payload["reason"] for e in interrupted} == {
        "did not reconnect within the grace period after the store server restarted"
    }
    store.close()


def test_owner_that_reconnects_keeps_its_claims(path: Path, servers: list[subprocess.Popen[bytes]]) -> None:
    first, _ = start_server(path)
    servers.append(first)
    store = open_store(f"server:{path}")
    holder, held = _holder(path, store)
    assert holder.stdin is not None
    try:
        _kill(first)
        second, _ = start_server(path, grace=600)
        servers.append(second)
        holder.stdin.write("renew\n")  # its heartbeat: reconnects, re-asserts its owner, renews
        holder.stdin.flush()
        assert read_json(holder) == {"renewed": ["running", "running"]}
        status = launch.server_status(path)
        assert status is not None and held["owner"] not in status["grace_owners"]
        assert [held["owner"] in c["owners"] for c in status["clients"]].count(True) == 1
        busy = store.claim("i", "cell/h1", owner=ME, run_id=new_run_id())
        assert busy.outcome is ClaimOutcome.BUSY
        holder.stdin.write("complete\n")
        holder.stdin.flush()
        assert read_json(holder) == {"completed": ["done", "done"]}
    finally:
        _end(holder)
    events = check_store(store, "i")
    assert [e.event for e in events].count("done") == 2
    assert not [e for e in events if e.event in ("interrupted", "fenced")]
    store.close()
