"""The store server's transport: a private socket, a versioned protocol, one
connection per process, subscriptions, the command line (DESIGN.md §4, §9, §11)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from helpers.oracle import check_store
from helpers.servers import foreground_cli_server, start_server, wait_until
from nbrunbook.engine import launch, protocol
from nbrunbook.engine.cli import main as cli_main
from nbrunbook.engine.errors import ProtocolError, StoreUnavailable
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import new_run_id, process_owner
from nbrunbook.engine.model import ClaimOutcome, Event

ME = process_owner()


def _open(path: Path):  # type: ignore[no-untyped-def]
    return open_store(f"server:{path}")


# ------------------------------------------------------------------ privacy


def test_socket_and_directory_are_private(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    store = _open(path)
    paths = protocol.server_paths(str(path))
    for p, mode in ((paths.directory, 0o700), (paths.socket, 0o600), (paths.lock, 0o600), (paths.log, 0o600)):
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == mode, (p, oct(st.st_mode))
        assert st.st_uid == os.getuid()
    assert stat.S_ISSOCK(os.stat(paths.socket).st_mode)
    store.close()


def _connect_as(uid: int, socket_path: str) -> str:
    """Try to connect from a child process running as ``uid``; what happened, as text."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only does syscalls
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = protocol.connect_unix(socket_path, timeout=30)
            try:
                sock.sendall(protocol.dumps(protocol.hello(owners=[])))
            except BrokenPipeError:
                pass  # refused at once; its answer is still there to read
            reply = protocol.read_frame(sock.makefile("rb"))
            text = "reply " + json.dumps(reply)
        except OSError as exc:
            text = f"oserror {exc.errno}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            text = f"error {exc!r}"
        os.write(w, text.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        text = fh.read().decode()
    os.waitpid(pid, 0)
    return text


def test_another_user_cannot_connect(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    store = _open(path)
    paths = protocol.server_paths(str(path))
    assert protocol.peer_allowed(os.getuid()) and not protocol.peer_allowed(os.getuid() + 1)
    if os.getuid() != 0:
        # No second user to be: the modes (above test) and the peer check itself are what we can check.
        a, b = socket.socketpair()
        with a, b:
            assert protocol.peer_credentials(a)[1:] == (os.getuid(), os.getgid())
        store.close()
        return
    nobody = 65534
    # The directory (0700) keeps other users out before the socket is even reached.
    assert _connect_as(nobody, paths.socket) == "oserror 13"
    # Open both up as if misconfigured: the server still refuses the peer by its uid.
    os.chmod(paths.directory, 0o711)
    os.chmod(paths.socket, 0o666)
    try:
        text = _connect_as(nobody, paths.socket)
    finally:
        os.chmod(paths.directory, 0o700)
        os.chmod(paths.socket, 0o600)
    assert text.startswith("reply "), text
    reply = json.loads(text[len("reply ") :])
    assert reply["error"]["type"] == "StoreUnavailable"
    assert f"refuses uid {nobody}" in reply["error"]["message"]
    # And the store's own user is still served.
    assert store.instances() == []
    store.close()


def test_socket_path_longer_than_the_os_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / ("r" * 60) / ("u" * 60)
    monkeypatch.setenv("NBRUNBOOK_RUNTIME_DIR", str(runtime))
    path = tmp_path / "store.duckdb"
    try:
        store = _open(path)
        paths = protocol.server_paths(str(path))
        assert len(os.fsencode(paths.socket)) > 108 and os.path.exists(paths.socket)
        store.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id="r")
        assert store.claim("i", "cell/a", owner=ME, run_id="r").outcome is ClaimOutcome.CLAIMED
        assert launch.server_status(path) is not None
        store.close()
    finally:
        launch.stop_all(str(runtime))


# ----------------------------------------------------------------- protocol


def test_client_of_another_protocol_gets_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "store.duckdb"
    _open(path).close()  # a server of this version runs
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", 999)
    with pytest.raises(ProtocolError) as info:
        _open(path)
    message = str(info.value)
    assert "speaks protocol 1" in message and "speaks protocol 999" in message
    assert "nbrunbook server stop" in message and str(path) in message


def test_server_of_another_protocol_gets_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    paths = protocol.server_paths(str(path))
    listener = protocol.bind_unix(paths.socket)

    def future_server() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as rfile:
            protocol.read_frame(rfile)
            conn.sendall(protocol.dumps({"t": "hello", "protocol": 2, "version": "9.0", "pid": 4242}))
            rfile.read(1)  # until the client hangs up

    t = threading.Thread(target=future_server)
    t.start()
    try:
        with pytest.raises(ProtocolError, match=r"PID 4242, nbrunbook 9\.0\) speaks protocol 2, this client"):
            _open(path)
    finally:
        t.join(timeout=30)
        listener.close()
        os.unlink(paths.socket)


def test_client_never_imports_duckdb(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from nbrunbook.engine.factory import open_store\n"
        f"s = open_store('server:{tmp_path / 'store.duckdb'}')\n"
        "s.open_instance('rb', 'i', {}, manifest_version=0, owner='a@h:1:x', run_id='r')\n"
        "c = s.claim('i', 'cell/a', owner='a@h:1:x', run_id='r')\n"
        "s.complete('i', c.step_key, owner='a@h:1:x', epoch=c.state.epoch, run_id='r')\n"
        "s.close()\n"
        "print('duckdb' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False"


def test_one_connection_per_process(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    a, b = _open(path), _open(path)
    a.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id="r")
    threads = [threading.Thread(target=lambda n=n: b.claim("i", f"cell/t{n}", owner=ME, run_id="r")) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = launch.server_status(path)
    assert status is not None and [c["pid"] for c in status["clients"]] == [os.getpid()]
    assert len(check_store(a, "i")) == 17
    a.close()
    assert b.step("i", "cell/t0") is not None  # the other handle keeps the connection
    b.close()


def test_forked_child_gets_its_own_connection(tmp_path: Path) -> None:
    # In a subprocess: forking pytest itself is not wise.
    code = f"""
import os, sys
from nbrunbook.engine.factory import open_store
s = open_store('server:{tmp_path / "store.duckdb"}')
s.open_instance('rb', 'i', {{}}, manifest_version=0, owner='p@h:1:x', run_id='r')
assert s.claim('i', 'cell/parent', owner='p@h:1:x', run_id='r').outcome.value == 'claimed'
pid = os.fork()
if pid == 0:
    c = s.claim('i', 'cell/child', owner='c@h:2:y', run_id='r')
    os._exit(0 if c.outcome.value == 'claimed' else 1)
_, code = os.waitpid(pid, 0)
assert code == 0, code
st = s.wait('i', 'cell/child', timeout=120)  # the child's connection ended with it
print(st.status, s.step('i', 'cell/parent').status)
s.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["interrupted", "running"]


def test_one_reading_caller_serves_the_others(tmp_path: Path) -> None:
    """Whoever waits reads the shared socket: a caller blocked on a long ``wait``
    hands the answers of other threads and the pushes on; none waits for it."""
    path = tmp_path / "store.duckdb"
    store = _open(path)
    store.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id="r")
    held = store.claim("i", "cell/held", owner=ME, run_id="r")
    waited: list[object] = []
    waiter = threading.Thread(target=lambda: waited.append(store.wait("i", "cell/held", timeout=300)))
    waiter.start()
    seen: list[int] = []
    stop = store.subscribe("i", lambda events: seen.extend(e.seq for e in events))

    def claims(n: int) -> None:
        for k in range(10):
            assert store.claim("i", f"cell/t{n}-{k}", owner=ME, run_id="r").outcome is ClaimOutcome.CLAIMED

    workers = [threading.Thread(target=claims, args=(n,)) for n in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=300)
    wait_until(lambda: len(seen) == 2 + 40, what="the pushed events")
    assert waiter.is_alive() and not waited  # the claims and pushes did not wait for the long wait
    store.complete("i", held.step_key, owner=ME, epoch=held.state.epoch, run_id="r")
    waiter.join(timeout=300)
    assert [getattr(st, "status", None) for st in waited] == ["done"]
    stop()
    check_store(store, "i")
    store.close()


def test_an_answer_waited_for_with_a_timeout(tmp_path: Path) -> None:
    """``result(timeout)`` on a request gives up in time, and the answer still arrives later."""
    path = tmp_path / "store.duckdb"
    store = _open(path)
    store.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id="r")
    held = store.claim("i", "cell/held", owner=ME, run_id="r")
    fut = store._link.call("wait", {"instance_id": "i", "path": "cell/held", "timeout": 300})  # type: ignore[attr-defined]
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.2)
    assert not fut.done()
    store.complete("i", held.step_key, owner=ME, epoch=held.state.epoch, run_id="r")
    assert fut.result(timeout=300).status == "done"
    store.close()


def test_a_request_the_server_cannot_handle_is_answered(tmp_path: Path) -> None:
    """A request that breaks the server's handling gets an error back; the connection goes on."""
    path = tmp_path / "store.duckdb"
    _open(path).close()  # a server runs (until idle)
    paths = protocol.server_paths(str(path))
    sock = protocol.connect_unix(paths.socket, timeout=60)
    try:
        rfile, _ = launch.handshake(sock, str(path), paths, [])
        sock.settimeout(60)
        answers = {}
        for rid, args in ((1, [1, 2]), (2, {})):  # claim with a list for arguments, then a ping
            sock.sendall(protocol.dumps({"t": "req", "id": rid, "op": "claim" if rid == 1 else "ping", "args": args}))
            msg = protocol.read_frame(rfile)
            assert msg is not None and msg.get("id") == rid, msg
            answers[rid] = msg
        assert answers[1]["err"]["type"] == "StoreError" and "AttributeError" in answers[1]["err"]["message"]
        assert answers[2]["ok"]["pid"] > 0
    finally:
        sock.close()


# ------------------------------------------------------------ life cycle


def test_idle_server_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBRUNBOOK_SERVER_IDLE", "0.5")
    path = tmp_path / "store.duckdb"
    store = _open(path)
    paths = protocol.server_paths(str(path))
    store.close()
    wait_until(lambda: not protocol.lock_held(paths), what="the idle server to exit")
    with open(paths.log) as fh:
        assert "stopped (idle for" in fh.read()


def test_subscription_follows_through_a_server_restart(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    server, _ = start_server(path)
    store = _open(path)
    store.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id="r")
    got: list[Event] = []
    lock = threading.Lock()

    def on_events(events: list[Event]) -> None:
        with lock:
            got.extend(events)

    stop = store.subscribe("i", on_events)
    for n in range(5):
        store.append("i", "tick", owner=ME, run_id="r", payload={"n": n})
    wait_until(lambda: len(got) == 6, what="the first events")
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    for n in range(5, 10):  # reconnects (starting a server), subscribes again from seq 6
        store.append("i", "tick", owner=ME, run_id="r", payload={"n": n})
    wait_until(lambda: len(got) == 11, what="the events after the restart")
    stop()
    store.append("i", "tick", owner=ME, run_id="r", payload={"n": 99})
    store.flush()
    assert [e.seq for e in got] == list(range(1, 12))
    assert [e.payload.get("n") for e in got[1:]] == list(range(10))
    store.close()


def test_listener_does_not_restart_a_stopped_server_but_resumes(tmp_path: Path) -> None:
    """After ``nbrunbook server stop`` a client that only listens starts no server;
    when one runs again (another client needed it) the subscription resumes."""
    path = tmp_path / "store.duckdb"
    store = _open(path)
    store.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id="r")
    got: list[int] = []
    stop = store.subscribe("i", lambda events: got.extend(e.seq for e in events))
    wait_until(lambda: got == [1], what="the backlog")
    assert launch.stop_server(path) is not None
    time.sleep(1.5)  # room for a wrong reconnect to start a server (it would hold the lock below)
    server, _ = start_server(path)  # fails if the listener had started one
    try:
        code = (
            "from nbrunbook.engine.factory import open_store\n"
            f"s = open_store('server:{path}')\n"
            "s.append('i', 'ping', owner='o@h:1:x', run_id='r')\n"
            "s.close()\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
        wait_until(lambda: got == [1, 2], what="the event from the other client")
        assert store.server_info["pid"] == server.pid  # type: ignore[attr-defined]
        stop()
        store.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def test_lost_rerun_is_reported_not_repeated(tmp_path: Path) -> None:
    """A rerun is not idempotent: if its reply is lost, the client says so instead of sending it again."""
    path = tmp_path / "store.duckdb"
    # Commits: instance, claim, complete, rerun <- the server dies right after this one.
    server, _ = start_server(path, env={"NBRUNBOOK_CRASH_AT": "after_commit:4"})
    store = _open(path)
    try:
        store.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id="r")
        c = store.claim("i", "cell/a", owner=ME, run_id="r")
        store.complete("i", c.step_key, owner=ME, epoch=c.state.epoch, run_id="r")
        with pytest.raises(StoreUnavailable, match="while rerun was in flight; it may or may not have been applied"):
            store.rerun("i", "cell/a", owner=ME, run_id="r")
        assert server.wait(timeout=120) == -signal.SIGKILL
        events = check_store(store, "i")  # a new server; the rerun committed exactly once
        assert [e.event for e in events].count("reopened") == 1
    finally:
        server.kill()
        server.wait()
        store.close()


# -------------------------------------------------------------------- CLI


def test_cli_start_status_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "store.duckdb"
    assert cli_main(["server", "status", "--store", str(path)]) == 1
    assert "no store server runs" in capsys.readouterr().out
    assert cli_main(["server", "start", "--store", str(path), "--json"]) == 0
    started = json.loads(capsys.readouterr().out)
    assert started["running"] and started["store"] == str(path)
    assert cli_main(["server", "status", "--store", str(path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["pid"] == started["pid"] and status["protocol"] == protocol.PROTOCOL_VERSION
    assert cli_main(["server", "start", "--store", str(path)]) == 0  # already running: same server
    assert f"pid {started['pid']}" in capsys.readouterr().out
    assert cli_main(["server", "stop", "--store", str(path)]) == 0
    assert f"pid {started['pid']}" in capsys.readouterr().out
    assert launch.server_status(path) is None
    assert cli_main(["server", "stop", "--store", str(path)]) == 0
    assert "no store server runs" in capsys.readouterr().out


def test_cli_foreground_server(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    with foreground_cli_server(path) as proc:
        assert proc.stderr is not None
        store = _open(path)  # connects to it, starts nothing
        assert store.server_info["pid"] == proc.pid  # type: ignore[attr-defined]
        store.open_instance("rb", "i", {}, manifest_version=0, owner=ME, run_id=new_run_id())
        second = subprocess.run(
            [sys.executable, "-m", "nbrunbook.engine.cli", "server", "--store", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 4 and f"already serves this file (PID {proc.pid}" in second.stderr
        store.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "stopped (signal" in proc.stderr.read()


def test_send_soon_never_blocks_and_keeps_frames_whole_and_in_order() -> None:
    """The writer thread answers claims with ``send_soon``: a client that stops reading must not stall it.

    Far more than the socket buffer is sent while the peer reads nothing; every
    call returns, and once the peer reads, each frame arrives whole and in the
    order sent (what the socket did not take went through the sender thread).
    """
    from nbrunbook.engine.connection import Connection

    ours, theirs = socket.socketpair()
    conn = Connection(ours, 1, os.getpid(), lambda c: None)
    conn.sender.start()
    payload = "x" * 100_000
    sent = threading.Event()

    def flood() -> None:
        for i in range(60):  # ~6 MB: far beyond a Unix socket's buffer
            conn.send_soon({"t": "res", "id": i, "ok": payload})
        sent.set()

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    assert sent.wait(60), "send_soon blocked on a peer that does not read"
    rfile = theirs.makefile("rb")
    got = [protocol.read_frame(rfile) for _ in range(60)]
    assert [m["id"] for m in got if m] == list(range(60))
    assert all(m is not None and m["ok"] == payload for m in got)
    conn.out.put(None)
    conn.sender.join(10)
    for f in (rfile, conn.rfile, ours, theirs):
        f.close()
