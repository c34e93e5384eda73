"""The store server: one process owns the DuckDB file, clients talk over a Unix socket.

    python -m nbrunbook.engine.server --store PATH [--idle-timeout S] [--grace S]

(``nbrunbook server`` runs it in the foreground; clients start it on demand,
see :mod:`.launch`). The wire is described in :mod:`.protocol`, one client
connection in :mod:`.connection`, owner liveness in :mod:`.liveness`.

Liveness (DESIGN.md §3, §4): a client's connection is its owners' life line.
Every claim-holding request names its owner, and the server maps connection
-> owners. When a connection ends (the process died or closed the store),
each of its owners that has no other live connection is released at once:
its running steps turn ``interrupted``, journaled with the reason. Leases
still expire for clients that hang with the connection open.

Restart: owners found holding ``running`` steps when the server starts get a
grace period (one lease by default) during which they count as live, so
clients can reconnect and re-assert them (their hello lists their owners;
their heartbeats renew). Owners whose process is provably gone are released
at once; the rest are released when the grace ends. Retried operations are
recognised by claim token and owner+epoch (see :mod:`.machine`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import functools
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import allocator, model, protocol
from .connection import Connection
from .embedded import EmbeddedStore, LocalLiveness
from .errors import RunbookError, StoreUnavailable
from .liveness import ServerLiveness
from .machine import GONE
from .protocol import DEFAULT_IDLE, OPS, ServerPaths, ServerRunning
from .store import DEFAULT_LEASE
from .writer import set_caller

_WAIT_SLICE = 1.0  # a blocked ``wait`` notices shutdown / a dead client this often
#: How long the writer waits for recently answered callers to ask again before
#: it commits (see :mod:`.writer`). A client process answered by one commit
#: needs a socket round trip and a few thread hand-overs (~1 ms on a busy
#: 2-core machine) to send its next claim; 3 ms lets 8 clients share each
#: commit (~8 claims per commit instead of ~4.5, about 1.6x the claims/s).
#: A lone client never waits: there is nobody else to wait for.
GROUP_GATHER = 0.003


class _Abandon(Exception):
    """A request dropped without a reply (shutdown, dead client): the client retries it."""


class StoreServer:
    """Serves one store file to the clients of one user (see module doc)."""

    def __init__(
        self,
        store_path: str,
        *,
        idle_timeout: float = DEFAULT_IDLE,
        grace: float = DEFAULT_LEASE,
        lock_wait: float = 0.0,
        runtime_dir: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.store_path = os.path.abspath(store_path)
        self.paths: ServerPaths = protocol.server_paths(self.store_path, runtime_dir)
        self.idle_timeout = idle_timeout
        self.grace = grace
        self.lock_wait = lock_wait
        self.liveness = ServerLiveness()
        self.store: EmbeddedStore | None = None
        self.started = time.time()
        self.malloc = allocator.in_use()  # read once: ``info`` also answers every ping
        self._log_fn = log or _stderr_log
        self._conns: dict[int, Connection] = {}
        self._conns_lock = threading.Lock()
        self._next_conn = 0
        self._last_activity = time.monotonic()
        self._stopping = threading.Event()
        self._stop_reason = ""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Requests, and each connection's reading role, run here; threads start on demand.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1024, thread_name_prefix="nbrunbook-op")
        self._lock_fd: int | None = None
        self._socket_ino: int | None = None

    # ----------------------------------------------------------- lifecycle

    def log(self, message: str) -> None:
        """One line to the server log (stderr)."""
        self._log_fn(message)

    def request_stop(self, reason: str) -> None:
        """Ask the server to shut down (thread- and signal-safe)."""
        if not self._stopping.is_set():
            self._stop_reason = reason
            self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    @property
    def stopping(self) -> bool:
        """True once shutdown began: new requests are dropped (clients retry them elsewhere)."""
        return self._stopping.is_set()

    def serve(self, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Take the lock, open the store, listen; return after shutdown. Raises if it cannot start."""
        listener = None
        try:
            self._take_lock()
            self.store = EmbeddedStore(self.store_path, liveness=self.liveness)
            self.store.writer.gather = GROUP_GATHER
            self._start_grace()
            listener = self._listen()
            info = self.info()
            self._write_lock_info(info)
            self.log(f"serving {self.store_path} on {self.paths.socket} (pid {os.getpid()})")
            if on_ready is not None:
                on_ready(info)
            self._accept_loop(listener)
        finally:
            self._shutdown(listener)

    def info(self) -> dict[str, Any]:
        """What ``nbrunbook server status`` shows."""
        with self._conns_lock:
            clients = [{"pid": c.pid, "owners": list(c.owners)} for c in self._conns.values() if not c.control]
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "store": self.store_path,
            "socket": self.paths.socket,
            "protocol": protocol.PROTOCOL_VERSION,
            "version": protocol.hello()["version"],
            "started": self.started,
            "uptime": time.time() - self.started,
            "idle_timeout": self.idle_timeout,
            "grace": self.grace,
            "malloc": self.malloc,
            "clients": clients,
            "commits": self.store.writer.groups if self.store is not None else 0,
            "operations": self.store.writer.grouped_ops if self.store is not None else 0,
            "grace_owners": {o: round(until - now, 3) for o, until in self.liveness.grace_owners().items()},
        }

    def _take_lock(self) -> None:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                serving = protocol.can_connect(self.paths.socket)
                if serving or time.monotonic() >= deadline:
                    os.close(fd)
                    raise ServerRunning(
                        self.store_path, protocol.read_lock_info(self.paths).get("pid"), self.paths.socket
                    ) from None
                # Its holder is starting up or shutting down: wait for it.
                time.sleep(0.05)
        self._lock_fd = fd
        self._write_lock_info(self.info())  # at once: status and stop must find this PID

    def _write_lock_info(self, info: dict[str, Any]) -> None:
        assert self._lock_fd is not None
        data = json.dumps({k: info[k] for k in ("pid", "store", "socket", "protocol", "version", "started")}).encode()
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, data, 0)

    def _listen(self) -> socket.socket:
        # We hold the lock, so a socket file left here is stale (a killed server's).
        try:
            os.unlink(self.paths.socket)
        except FileNotFoundError:
            pass
        listener = protocol.bind_unix(self.paths.socket)
        self._socket_ino = os.stat(self.paths.socket).st_ino
        return listener

    def _start_grace(self) -> None:
        assert self.store is not None
        owners = self.store.running_owners()
        dead = [o for o in owners if LocalLiveness().owner_state(o) == GONE]
        for owner in dead:
            changed = self.store.release_owner(owner, reason="owner process gone (found when the store server started)")
            self.log(f"released {owner}: process gone, {len(changed)} step(s) interrupted")
        waiting = [o for o in owners if o not in dead]
        if waiting:
            self.liveness.grant_grace(waiting, self.grace)
            self.log(f"grace of {self.grace:g}s for {len(waiting)} owner(s) holding running steps")

    def _accept_loop(self, listener: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping:
                for key, _ in sel.select(self._next_timeout()):
                    if key.data == "wake":
                        os.read(self._wake_r, 4096)
                    else:
                        self._accept(listener)
                self._expire_grace()
                self._check_idle()
        finally:
            sel.close()

    def _next_timeout(self) -> float:
        timeout = 5.0
        grace = self.liveness.grace_owners()
        now = time.monotonic()
        if grace:
            timeout = min(timeout, max(0.0, min(grace.values()) - now) + 0.01)
        if self.idle_timeout > 0:
            timeout = min(timeout, max(0.0, self._last_activity + self.idle_timeout - now) + 0.01)
        return timeout

    def _check_idle(self) -> None:
        if self.idle_timeout <= 0 or self.liveness.grace_owners():
            return
        with self._conns_lock:
            if self._conns:
                return
            idle = time.monotonic() - self._last_activity
        if idle >= self.idle_timeout:
            self.request_stop(f"idle for {idle:.0f}s with no clients")

    def _expire_grace(self) -> None:
        for owner in self.liveness.end_grace(time.monotonic()):
            self._release(owner, "did not reconnect within the grace period after the store server restarted")

    def _release(self, owner: str, reason: str) -> None:
        if self.store is None or self.stopping:
            return
        try:
            changed = self.store.release_owner(owner, reason=reason, unless_live=True)
        except RunbookError as exc:
            self.log(f"could not release {owner}: {exc}")
            return
        if changed:
            self.log(f"released {owner} ({reason}): {len(changed)} step(s) interrupted")

    def _shutdown(self, listener: socket.socket | None) -> None:
        self._stopping.set()
        if listener is not None:
            listener.close()
            try:
                if os.stat(self.paths.socket).st_ino == self._socket_ino:
                    os.unlink(self.paths.socket)
            except FileNotFoundError:
                pass
        with self._conns_lock:
            conns = list(self._conns.values())
        for conn in conns:
            conn.drain(timeout=30)  # let executing requests answer
        for conn in conns:
            conn.send({"t": "bye", "reason": self._stop_reason or "shutdown"})
            conn.out.put(None)
        for conn in conns:
            conn.sender.join(timeout=10)
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.reader.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.store is not None:
            self.store.close()
            self.log(f"stopped ({self._stop_reason or 'shutdown'})")
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock: the next server may start
            self._lock_fd = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --------------------------------------------------------- connections

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        sock.setblocking(True)
        try:
            pid, uid, _ = protocol.peer_credentials(sock)
        except OSError:
            sock.close()
            return
        if not protocol.peer_allowed(uid):
            self.log(f"refused a connection from uid {uid} (pid {pid}): the server serves uid {os.getuid()} only")
            err = protocol.encode_error(
                StoreUnavailable(self.store_path, f"the store server refuses uid {uid}: it serves its own user only"),
                self.store_path,
            )
            try:
                sock.sendall(protocol.dumps(protocol.hello(error=err)))
            except OSError:
                pass
            sock.close()
            return
        with self._conns_lock:
            self._next_conn += 1
            conn = Connection(sock, self._next_conn, pid, self._serve_conn)
            self._conns[conn.id] = conn
        conn.sender.start()
        conn.reader.start()

    def _serve_conn(self, conn: Connection) -> None:
        """The connection's first thread: the hello, then the reading role."""
        try:
            first = protocol.read_frame(conn.rfile)
            greeted = first is not None and self._greet(conn, first)
        except (OSError, EOFError, ValueError, RunbookError):
            greeted = False
        if greeted:
            self._read_requests(conn)
        else:
            self._disconnected(conn)

    def _read_requests(self, conn: Connection) -> None:
        """Hold the connection's reading role until a request must block.

        Such a request runs on this very thread, at once; the reading role
        moves to a pooled thread, whose wake-up is thus off the request's path.
        Requests are read (and quick ones handled) strictly in order.
        """
        try:
            while True:
                msg = protocol.read_frame(conn.rfile)
                if msg is None:
                    break
                try:
                    job = self._handle(conn, msg)
                except Exception as exc:  # noqa: BLE001 - a bug answers this request; the connection lives on
                    self._reply_error(conn, msg.get("id"), exc)
                    continue
                if job is None:
                    continue
                try:
                    self._pool.submit(self._read_requests, conn)
                except RuntimeError:  # the pool is shut down (stopping): keep reading here
                    job()
                    continue
                job()
                return
        except (OSError, EOFError, ValueError, RunbookError) as exc:
            if not self.stopping:
                self.log(f"connection of pid {conn.pid} ended: {type(exc).__name__}: {exc}")
        self._disconnected(conn)

    def _greet(self, conn: Connection, msg: dict[str, Any]) -> bool:
        ours = protocol.hello(store=self.store_path, socket=self.paths.socket, started=self.started)
        if msg.get("t") != "hello" or msg.get("protocol") != protocol.PROTOCOL_VERSION:
            err = protocol.version_mismatch(self.store_path, msg, ours, self.paths.socket)
            self.log(f"refused pid {conn.pid}: protocol {msg.get('protocol')} (ours {protocol.PROTOCOL_VERSION})")
            conn.send({**ours, "error": protocol.encode_error(err, self.store_path)})
            return False
        conn.control = bool(msg.get("control"))
        for owner in msg.get("owners") or ():
            self._attach(conn, str(owner))
        conn.send(ours)
        return True

    def _attach(self, conn: Connection, owner: str) -> None:
        if owner not in conn.owners:
            conn.owners[owner] = None
        self.liveness.attach(owner, conn.id)

    def _handle(self, conn: Connection, msg: dict[str, Any]) -> Callable[[], None] | None:
        """Handle a quick request here; return a blocking one as a job to run."""
        if msg.get("t") != "req":
            return None
        rid = msg.get("id")
        op = str(msg.get("op"))
        args = msg.get("args") or {}
        if self.stopping:
            return None  # no reply: the client sends it again to the next server
        if op not in OPS:
            self._reply_error(conn, rid, protocol.ProtocolError(self.store_path, f"unknown operation {op!r}"))
            return None
        owner = args.get("owner")
        if op in protocol.HOLDING_OPS and isinstance(owner, str):
            # Before the operation runs: if the connection dies meanwhile, the release sees it.
            self._attach(conn, owner)
        caller = hash((conn.id, msg.get("th")))
        if op == "claim" and self._answer_settled(conn, rid, args):
            pass
        elif op == "claim" or (op in ("complete", "fail") and args.get("wait") is False):
            set_caller(caller)  # group commit learns this client thread's pace
            try:
                self._submit_async(conn, rid, op, args)
            finally:
                set_caller(None)
        elif op == "subscribe":
            self._subscribe(conn, rid, args)
        elif op == "unsubscribe":
            unsub = conn.subs.pop(int(args.get("sub", -1)), None)
            if unsub is not None:
                unsub()
            conn.send({"t": "res", "id": rid, "ok": None})
        elif op in ("status", "ping"):
            conn.send_now({"t": "res", "id": rid, "ok": self.info()})
        elif op == "shutdown":
            conn.send({"t": "res", "id": rid, "ok": None})
            self.request_stop(f"stopped by a client (pid {conn.pid})")
        else:
            counted = op != "wait"  # a wait holds nothing; the others must finish before a release
            if counted:
                conn.begin()
            return functools.partial(self._run, conn, rid, op, args, counted, caller)
        return None

    def _answer_settled(self, conn: Connection, rid: Any, args: dict[str, Any]) -> bool:
        """Answer a claim of a step committed as finished here, on the reading thread.

        It writes nothing and does not wait for the writer (see
        ``EmbeddedStore.settled_claim``): a skipped cell's claim costs no
        hand-over of the reading role. Anything else goes the usual way.
        """
        assert self.store is not None
        try:
            claim = self.store.settled_claim(
                str(args["instance_id"]),
                str(args["path"]),
                max_attempts=args.get("max_attempts"),
                with_values=bool(args.get("with_values")),
            )
        except (KeyError, TypeError, ValueError, RunbookError):
            return False  # malformed or unreadable: the usual path answers with the error
        if claim is None:
            return False
        conn.send_now({"t": "res", "id": rid, "ok": protocol.encode_result("claim", claim)})
        return True

    def _submit_async(self, conn: Connection, rid: Any, op: str, args: dict[str, Any]) -> None:
        """Queue a claim or an outcome in the writer; answer it from the writer thread after the commit.

        Neither blocks in the store (a busy step is an answer; waiting is the
        separate ``wait``), so neither needs a thread of its own: the reading
        thread goes on reading (later requests of the same client thread commit
        after it), and no thread wakes per request.
        """
        assert self.store is not None
        conn.begin()
        try:
            call = protocol.decode_args(op, args)
            with_values = op == "claim" and bool(call.pop("with_values", False))
            fut = self.store.submit_claim(**call) if op == "claim" else getattr(self.store, op)(**call)
        except BaseException as exc:  # noqa: BLE001 - answered to the client
            conn.end()
            self._reply_error(conn, rid, exc)
            return

        def answer(f: concurrent.futures.Future[Any]) -> None:
            handed_on = False
            try:
                result = f.result()
                if with_values and result.outcome is model.ClaimOutcome.DONE:
                    # Reading the values is a query: off the writer thread.
                    try:
                        self._pool.submit(self._answer_with_values, conn, rid, result)
                    except RuntimeError:  # the pool is shut down (stopping): answer here
                        self._answer_with_values(conn, rid, result)
                    handed_on = True
                else:
                    conn.send_soon({"t": "res", "id": rid, "ok": protocol.encode_result(op, result)})
            except BaseException as exc:  # noqa: BLE001 - answered to the client
                self._reply_error(conn, rid, exc)
            finally:
                if not handed_on:
                    conn.end()

        fut.add_done_callback(answer)

    def _answer_with_values(self, conn: Connection, rid: Any, claim: model.Claim) -> None:
        assert self.store is not None
        try:
            conn.send_now({"t": "res", "id": rid, "ok": protocol.encode_result("claim", self.store.with_values(claim))})
        except BaseException as exc:  # noqa: BLE001 - answered to the client
            self._reply_error(conn, rid, exc)
        finally:
            conn.end()

    def _subscribe(self, conn: Connection, rid: Any, args: dict[str, Any]) -> None:
        assert self.store is not None
        sid = int(args["sub"])

        def push(events: list[model.Event]) -> None:
            conn.send({"t": "push", "sub": sid, "events": protocol.encode_result("journal", events)})

        old = conn.subs.pop(sid, None)
        if old is not None:
            old()
        conn.subs[sid] = self.store.subscribe(str(args["instance_id"]), push, since_seq=int(args.get("since_seq", 0)))
        conn.send({"t": "res", "id": rid, "ok": None})

    def _run(self, conn: Connection, rid: Any, op: str, args: dict[str, Any], counted: bool, caller: int) -> None:
        set_caller(caller)  # group commit sees the client thread, not this pooled one
        try:
            call = protocol.decode_args(op, args)
            if op == "wait":
                result = self._wait(conn, **call)
            else:
                result = getattr(self.store, op)(**call)
            conn.send_now({"t": "res", "id": rid, "ok": protocol.encode_result(op, result)})
        except _Abandon:
            pass
        except BaseException as exc:  # noqa: BLE001 - answered to the client
            self._reply_error(conn, rid, exc)
        finally:
            if counted:
                conn.end()

    def _wait(self, conn: Connection, instance_id: str, path: str, timeout: float) -> model.StepState | None:
        # In slices, so a shutdown or a vanished client frees this thread soon.
        assert self.store is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            st = self.store.wait(instance_id, path, timeout=max(0.0, min(remaining, _WAIT_SLICE)))
            if st is None or st.status != model.RUNNING or remaining <= _WAIT_SLICE:
                return st
            if self.stopping or conn.closed:
                raise _Abandon()

    def _reply_error(self, conn: Connection, rid: Any, exc: BaseException) -> None:
        if not isinstance(exc, (RunbookError, ValueError, TypeError, LookupError)):
            self.log(f"operation failed: {type(exc).__name__}: {exc}")
        conn.send({"t": "res", "id": rid, "err": protocol.encode_error(exc, self.store_path)})

    def _disconnected(self, conn: Connection) -> None:
        conn.closed = True
        for unsub in list(conn.subs.values()):
            unsub()
        conn.subs.clear()
        if not self.stopping:
            # Requests the client sent before it went away commit first; then its owners are released.
            conn.drain(timeout=60)
            for owner in self.liveness.detach(conn.id, list(conn.owners)):
                self._release(owner, f"connection lost (client pid {conn.pid})")
        else:
            self.liveness.detach(conn.id, list(conn.owners))
        conn.out.put(None)
        conn.sender.join(timeout=5)  # a refusal (hello with an error) is sent before closing
        try:
            conn.rfile.close()
            conn.sock.close()
        except OSError:
            pass
        with self._conns_lock:
            self._conns.pop(conn.id, None)
            self._last_activity = time.monotonic()
        self.request_stop_if_idle_soon()

    def request_stop_if_idle_soon(self) -> None:
        """Wake the accept loop so it recomputes the idle deadline."""
        try:
            os.write(self._wake_w, b"i")
        except OSError:
            pass


# ------------------------------------------------------------------ helpers


def _stderr_log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} nbrunbook-server[{os.getpid()}] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m nbrunbook.engine.server``."""
    p = argparse.ArgumentParser(prog="python -m nbrunbook.engine.server", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="the DuckDB store file to serve")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE,
        help=f"exit after this many seconds with no client; 0 = never (default {DEFAULT_IDLE:g})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_LEASE,
        help=f"seconds owners of running steps get to reconnect after a restart (default {DEFAULT_LEASE:g})",
    )
    p.add_argument("--lock-wait", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run a server in this process until it is stopped or idle."""
    args = build_parser().parse_args(argv)
    # Every file this process creates is private: DuckDB re-creates the store's WAL after each
    # checkpoint with the process umask (0644 under the usual 022), exposing recent commits.
    os.umask(0o077)
    server = StoreServer(args.store, idle_timeout=args.idle_timeout, grace=args.grace, lock_wait=args.lock_wait)
    ready_fd: int | None = args.ready_fd

    def report(msg: dict[str, Any]) -> None:
        nonlocal ready_fd
        if ready_fd is None:
            return
        try:
            os.write(ready_fd, json.dumps(msg).encode() + b"\n")
            os.close(ready_fd)
        except OSError:
            pass
        ready_fd = None

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: server.request_stop(f"signal {signum}"))
    try:
        server.serve(on_ready=lambda info: report({"ok": info}))
    except RunbookError as exc:
        report({"error": protocol.encode_error(exc, server.store_path)})
        print(f"nbrunbook server: error: {exc}", file=sys.stderr, flush=True)
        return 4
    return 0


if __name__ == "__main__":  # pragma: no cover - python -m nbrunbook.engine.server
    sys.exit(main())
