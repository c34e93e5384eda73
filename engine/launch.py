"""Finding, starting and stopping store server processes (client side, no DuckDB).

* :func:`start_server` starts a detached server (own session, stderr to its
  log) unless one answers. Clients hold the *start lock* (``fcntl.flock``)
  meanwhile, so clients racing to start one start exactly one; the server
  itself holds the *server lock* for its whole life, so even two servers
  started by hand cannot both serve a file. The server reports ready - or
  the error that stopped it, such as ``StoreLocked`` naming the process that
  holds the DuckDB file - on a pipe, and that error is raised here as is.
* :func:`server_status`, :func:`stop_server`, :func:`stop_all` back
  ``nbrunbook server status|stop`` and the test suite's clean-up.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import allocator, protocol
from .errors import ProtocolError, RunbookError, StoreUnavailable
from .protocol import ServerPaths, ServerRunning
from .store import DEFAULT_LEASE

#: Seconds a client keeps trying to reach (or start) the server before giving up.
CONNECT_TIMEOUT = 120.0
# How long a spawned server may wait for a previous one that is shutting down.
_LOCK_WAIT = 30.0
_LOG_LIMIT = 1 << 20


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        return default


def handshake(
    sock: socket.socket, location: str, paths: ServerPaths, owners: Sequence[str], *, control: bool = False
) -> tuple[protocol.SocketReader, dict[str, Any]]:
    """Exchange hellos; raise the server's refusal or a version mismatch as one clear error.

    ``control``: a short-lived connection of ``nbrunbook server status|stop``,
    not a client (not listed, holds no owners).
    """
    ours = protocol.hello(owners=list(owners), store=location, control=control)
    sock.settimeout(60.0)
    try:
        sock.sendall(protocol.dumps(ours))
    except (BrokenPipeError, ConnectionResetError):
        pass  # a server that refuses us answers and hangs up at once: read why below
    # Not ``makefile``: the link reads on from this reader and must see all it buffered.
    rfile = protocol.SocketReader(sock)
    try:
        try:
            reply = protocol.read_frame(rfile)
        except ValueError:
            raise ProtocolError(location, f"{paths.socket} does not speak the nbrunbook store protocol") from None
        if reply is None:
            raise EOFError("the store server closed the connection")
        if reply.get("t") != "hello":
            raise ProtocolError(location, f"{paths.socket} does not speak the nbrunbook store protocol")
        if "error" in reply:
            raise protocol.decode_error(reply["error"])
        if reply.get("protocol") != protocol.PROTOCOL_VERSION:
            raise protocol.version_mismatch(location, ours, reply, paths.socket)
    except BaseException:
        rfile.close()
        raise
    sock.settimeout(None)
    return rfile, reply


def start_server(paths: ServerPaths, location: str, deadline: float) -> None:
    """Start a detached server for ``location`` unless one runs; raise its start-up error.

    Clients hold the start lock while starting, so racing clients start one
    server; the server itself holds the server lock for its whole life.
    """
    fd = os.open(paths.start_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        location, f"timed out waiting for another client to start the server ({paths.start_lock})"
                    ) from None
                time.sleep(0.01)
        if protocol.can_connect(paths.socket):
            return  # another client started it while we waited
        _spawn(paths, location, deadline)
    finally:
        os.close(fd)  # releases the start lock


def server_environment(location: str) -> dict[str, str]:
    """This process's environment as a server process starts with it (its allocator: engine/allocator.py).

    A bad ``NBRUNBOOK_SERVER_MALLOC`` is one clear error, before anything starts.
    """
    try:
        return allocator.server_environment(os.environ)
    except ValueError as bad:
        raise StoreUnavailable(location, f"cannot start the store server: {bad}") from None


def _spawn(paths: ServerPaths, location: str, deadline: float) -> None:
    idle = _env_float("NBRUNBOOK_SERVER_IDLE", protocol.DEFAULT_IDLE)
    grace = _env_float("NBRUNBOOK_SERVER_GRACE", DEFAULT_LEASE)
    if os.path.exists(paths.log) and os.path.getsize(paths.log) > _LOG_LIMIT:
        os.truncate(paths.log, 0)
    env = server_environment(location)
    r, w = os.pipe()
    try:
        with open(paths.log, "ab") as log:
            os.chmod(paths.log, 0o600)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nbrunbook.engine.server",
                    "--store",
                    location,
                    "--idle-timeout",
                    repr(idle),
                    "--grace",
                    repr(grace),
                    "--lock-wait",
                    repr(_LOCK_WAIT),
                    "--ready-fd",
                    str(w),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=(w,),
                start_new_session=True,  # not killed with the client's terminal or process group
                cwd="/",
                env=env,
            )
    finally:
        os.close(w)
    # Reap it when it exits, so no zombie stays behind while this process lives.
    threading.Thread(target=proc.wait, name="nbrunbook-server-reaper", daemon=True).start()
    try:
        line = _read_line(r, deadline)
    finally:
        os.close(r)
    if line is None:
        raise StoreUnavailable(location, f"the store server did not start in time; see its log {paths.log}")
    if not line:
        code = proc.poll()
        raise StoreUnavailable(
            location, f"the store server exited while starting (exit code {code}): {_last_log_line(paths.log)}"
        )
    msg = json.loads(line)
    if "error" in msg:
        exc = protocol.decode_error(msg["error"])
        if isinstance(exc, ServerRunning):
            return  # someone else's server is up: connect to it
        raise exc


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One line from ``fd``; ``b""`` at end of file, ``None`` at the deadline."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    return data


def _last_log_line(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            lines = [ln for ln in fh.read()[-8192:].decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"(no log at {path})"
    return lines[-1] if lines else f"(empty log {path})"


# ------------------------------------------------------------------ control


def _control(paths: ServerPaths, location: str, op: str, timeout: float = 30.0) -> Any:
    sock = protocol.connect_unix(paths.socket, timeout=timeout)
    rfile: protocol.Readable | None = None
    try:
        rfile, _ = handshake(sock, location, paths, [], control=True)
        sock.settimeout(timeout)
        sock.sendall(protocol.dumps({"t": "req", "id": 1, "op": op, "args": {}}))
        while True:
            msg = protocol.read_frame(rfile)
            if msg is None:
                raise EOFError("the store server closed the connection")
            if msg.get("t") == "res" and msg.get("id") == 1:
                if "err" in msg:
                    raise protocol.decode_error(msg["err"])
                return msg.get("ok")
    finally:
        if rfile is not None:
            rfile.close()
        sock.close()


def server_status(store_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The running server's status for this store, or ``None`` if none runs."""
    location = os.path.abspath(os.fspath(store_path))
    paths = protocol.server_paths(location)
    if not protocol.lock_held(paths):
        return None
    try:
        info: dict[str, Any] = _control(paths, location, "status")
    except (OSError, EOFError):
        # Alive (it holds the lock) but not answering: starting, stopping or hung.
        return {**protocol.read_lock_info(paths), "responding": False}
    return {**info, "responding": True}


def start_detached(store_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Start the server for this store if none runs; return its status."""
    location = os.path.abspath(os.fspath(store_path))
    paths = protocol.server_paths(location)
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        if protocol.can_connect(paths.socket):
            info: dict[str, Any] = _control(paths, location, "status")
            return info
        if time.monotonic() >= deadline:
            raise StoreUnavailable(location, f"the store server did not come up; see its log {paths.log}")
        start_server(paths, location, deadline)


def stop_server(
    store_path: str | os.PathLike[str] | None = None, *, paths: ServerPaths | None = None, timeout: float = 30.0
) -> dict[str, Any] | None:
    """Stop the server of this store (gracefully, else by signal); ``None`` if none ran."""
    location = os.path.abspath(os.fspath(store_path)) if store_path is not None else ""
    paths = paths or protocol.server_paths(location)
    if not protocol.lock_held(paths):
        return None
    info = protocol.read_lock_info(paths)
    location = location or str(info.get("store", ""))
    try:
        _control(paths, location, "shutdown", timeout=min(timeout, 10.0))
    except (OSError, EOFError, RunbookError):
        _signal(info.get("pid"), signal.SIGTERM)
    if not _wait_unlocked(paths, timeout):
        _signal(info.get("pid"), signal.SIGKILL)
        _wait_unlocked(paths, 10.0)
    _wait_gone(info.get("pid"), 10.0)  # the lock goes a moment before the process
    return info


def stop_all(directory: str | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Stop every server whose lock lives in ``directory`` (default: the runtime directory)."""
    directory = directory or protocol.runtime_dir()
    stopped: list[dict[str, Any]] = []
    if not os.path.isdir(directory):
        return stopped
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".lock"):
            continue
        base = os.path.join(directory, name[: -len(".lock")])
        paths = ServerPaths("", directory, base + ".sock", base + ".lock", base + ".start", base + ".log")
        info = stop_server(paths=paths, timeout=timeout)
        if info is not None:
            stopped.append(info)
    return stopped


def _wait_unlocked(paths: ServerPaths, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while protocol.lock_held(paths):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _is_server(pid: Any) -> bool:
    """Is ``pid`` a live store server process? (A PID may have been reused.)"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"nbrunbook.engine.server" in fh.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def _wait_gone(pid: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _is_server(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _signal(pid: Any, sig: int) -> None:
    if not _is_server(pid):
        return
    try:
        os.kill(pid, sig)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
