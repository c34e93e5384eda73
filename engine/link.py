"""The connection of one process to one store server, shared by its threads.

Requests carry ids, so any number of threads (branch fan-outs) use one
socket. Whoever waits for an answer reads the socket itself (one thread at a
time holds the *reading role*), handing answers meant for other threads to
their futures and subscription pushes to a delivery thread: a lone caller
gets its answer without a thread hand-over (~0.1 ms on a 2-core machine). A
watcher thread per connection takes the role only when data arrives that no
caller is reading: answers nobody waits for yet, pushes, the connection's end.

When the connection is lost (server killed, restarted, stopped) the link
reconnects - starting a server if none runs - re-asserts its owners in the
hello, subscribes again from the last delivered seq, and sends the requests
that had no answer again, in their original order, before any new one. Only
requests that are safe to repeat are sent again (claims carry a token,
outcomes are matched by owner+epoch, see :data:`.protocol.RETRYABLE_WRITES`);
a lost ``rerun``/``resolve``/``append`` raises ``StoreUnavailable`` saying it
may or may not have been applied. With nothing waiting, it reconnects lazily
on the next call.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import model, protocol
from .errors import ProtocolError, RunbookError, StoreError, StoreUnavailable
from .keys import process_owner
from .launch import CONNECT_TIMEOUT, handshake, start_server
from .protocol import ServerPaths


class _Reply(Future[Any]):
    """The answer to one request; waiting for it reads the socket (see the module doc)."""

    def __init__(self, link: Link) -> None:
        super().__init__()
        self._link = link

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            timeout = self._link._await(self, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            timeout = self._link._await(self, timeout)
        return super().exception(timeout)


class _Wire:
    """One connection's socket, its buffered bytes and its reading role."""

    __slots__ = ("cv", "dead", "ended", "graceful", "holder", "poller", "reader", "sock")

    def __init__(self, sock: socket.socket, reader: protocol.SocketReader) -> None:
        self.sock = sock
        self.reader = reader
        self.poller = select.poll()  # the reader's, for waits with a timeout
        self.poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        self.cv = threading.Condition()
        self.holder: int | None = None  # thread ident of the one reading
        self.dead = False  # its end was seen (or the link closed it)
        self.graceful = False  # the server said bye first
        self.ended = threading.Event()  # set with ``dead``: ends the watcher's pauses

    def take(self, done: Callable[[], bool], deadline: float | None = None) -> bool:
        """Become the reader, unless ``done()`` turns true, the connection ends or the deadline passes."""
        with self.cv:
            while self.holder is not None and not self.dead and not done():
                if deadline is None:
                    self.cv.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cv.wait(remaining)
            if self.dead or done():
                return False
            self.holder = threading.get_ident()
            return True

    def give(self) -> None:
        with self.cv:
            self.holder = None
            self.cv.notify_all()

    def end(self) -> None:
        """Mark the connection over and wake its blocked reader (the watcher closes the socket)."""
        with self.cv:
            self.dead = True
            self.cv.notify_all()
        self.ended.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Pending:
    __slots__ = ("args", "future", "gen", "id", "op", "retry", "thread")

    def __init__(self, link: Link, rid: int, op: str, args: dict[str, Any], retry: bool) -> None:
        self.id = rid
        self.op = op
        self.args = args
        self.retry = retry
        self.thread = threading.get_ident()
        self.gen = 0  # connection generation it was last sent on (0: never)
        self.future: Future[Any] = _Reply(link)

    def frame(self) -> bytes:
        # ``th``: the calling thread, so the server can tell one client thread's requests from another's.
        return protocol.dumps({"t": "req", "id": self.id, "op": self.op, "args": self.args, "th": self.thread})


class _Sub:
    __slots__ = ("active", "callback", "id", "instance_id", "last_seq", "request")

    def __init__(self, sid: int, instance_id: str, callback: Callable[[list[model.Event]], None], since: int) -> None:
        self.id = sid
        self.instance_id = instance_id
        self.callback = callback
        self.last_seq = since
        self.active = True
        self.request: _Pending | None = None


_REJOIN_EVERY = 0.5
#: How long a connection's watcher leaves the reading to callers after it found
#: them reading: what arrives for nobody meanwhile (a push, an answer nobody
#: waits for yet, the connection's end) is read by the next caller or after it.
_WATCH_PAUSE = 0.02


class _NoServer(Exception):
    """No server listens (and this connection attempt may not start one)."""


class Link:
    """The process's connection to one store server."""

    def __init__(self, paths: ServerPaths, location: str) -> None:
        self.paths = paths
        self.location = location
        self.pid = os.getpid()
        self.refs = 0
        self.server_info: dict[str, Any] = {}
        self._lock = threading.Lock()  # pending, subs, owners
        self._send_lock = threading.RLock()  # the socket, its generation, (re)connecting
        self._sock: socket.socket | None = None
        self._wire: _Wire | None = None  # the current connection's reading side
        self._gen = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._subs: dict[int, _Sub] = {}
        self._owners: dict[str, None] = {process_owner(): None}
        self._closed = False
        self._deliveries: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._delivery = threading.Thread(target=self._deliver_loop, name="nbrunbook-client-deliver", daemon=True)
        self._delivery.start()
        try:
            with self._send_lock:
                self._connect()
        except BaseException:
            self._deliveries.put(None)
            raise
        atexit.register(self.close)

    # ------------------------------------------------------------- calls

    def call(self, op: str, args: dict[str, Any]) -> Future[Any]:
        """Send a request; the future gets the decoded answer (or the rebuilt error)."""
        return self._request(op, args).future

    def _request(self, op: str, args: dict[str, Any]) -> _Pending:
        wire = protocol.encode_args(op, args)
        with self._lock:
            if self._closed:
                raise StoreError(self.location, "the store is closed")
            p = _Pending(self, next(self._ids), op, wire, protocol.retryable(op, args))
            self._pending[p.id] = p
            if op in protocol.HOLDING_OPS and args.get("owner") not in self._owners:
                self._owners[str(args["owner"])] = None
        try:
            self._send(p)
        except BaseException:
            with self._lock:
                self._pending.pop(p.id, None)
            raise
        return p

    def _send(self, p: _Pending) -> None:
        with self._send_lock:
            if self._sock is None:
                self._connect()  # lazily after a loss; sends every pending request, ``p`` included
                return
            if p.gen == self._gen:
                return  # a reconnect already sent it
            p.gen = self._gen
            try:
                self._sock.sendall(p.frame())
            except OSError:
                # Not all of it left, so the server cannot have run it: it counts as
                # never sent. The reader sees the loss, reconnects and sends it.
                p.gen = 0

    # -------------------------------------------------------- connecting

    def _connect(self, *, start: bool = True) -> None:
        """Open a connection (starting a server if needed), then re-send what is unanswered."""
        with self._send_lock:
            if self._sock is not None:
                return
            sock, rfile, info = self._open(start)
            self._gen += 1
            gen = self._gen
            self.server_info = info
            with self._lock:
                pending = sorted(self._pending.values(), key=lambda p: p.id)
                subs = [s for s in self._subs.values() if s.active]
            lost: list[_Pending] = []
            frames = []
            for s in subs:
                if s.request is not None and not s.request.future.done():
                    continue  # its subscribe request is re-sent below
                frames.append(self._sub_frame(s))
            for p in pending:
                if p.gen and not p.retry:
                    lost.append(p)
                    continue
                p.gen = gen
                frames.append(p.frame())
            with self._lock:
                for p in lost:
                    self._pending.pop(p.id, None)
            for p in lost:
                p.future.set_exception(
                    StoreUnavailable(
                        self.location,
                        f"the connection to the store server was lost while {p.op} was in flight; it may or may "
                        "not have been applied (check the journal)",
                    )
                )
            try:
                sock.sendall(b"".join(frames))
            except OSError:
                pass  # lost again: the watcher notices and reconnects
            wire = _Wire(sock, rfile)
            self._sock = sock
            self._wire = wire
            threading.Thread(target=self._watch, args=(wire,), name="nbrunbook-client-read", daemon=True).start()

    def _sub_frame(self, s: _Sub) -> bytes:
        with self._lock:
            rid = next(self._ids)
        # The answer only acknowledges; nobody waits for it.
        args = {"sub": s.id, "instance_id": s.instance_id, "since_seq": s.last_seq}
        return protocol.dumps({"t": "req", "id": rid, "op": "subscribe", "args": args})

    def _open(self, start: bool) -> tuple[socket.socket, protocol.SocketReader, dict[str, Any]]:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                sock = protocol.connect_unix(self.paths.socket, timeout=30.0)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                last = exc
                if not start:
                    raise _NoServer() from None
                start_server(self.paths, self.location, deadline)
                continue
            except PermissionError as exc:
                raise StoreUnavailable(
                    self.location, f"cannot connect to the store server at {self.paths.socket}: {exc.strerror}"
                ) from None
            except OSError as exc:
                last = exc
                time.sleep(0.05)
                continue
            with self._lock:
                owners = list(self._owners)
            try:
                rfile, info = handshake(sock, self.location, self.paths, owners)
            except (OSError, EOFError) as exc:  # the server went away meanwhile (stopping, killed)
                sock.close()  # (handshake closed its reader)
                last = exc
                time.sleep(0.05)
                continue
            except BaseException:
                sock.close()
                raise
            return sock, rfile, info
        raise StoreUnavailable(
            self.location,
            f"cannot reach the store server at {self.paths.socket} within {CONNECT_TIMEOUT:g}s ({last}); "
            f"see its log {self.paths.log}",
        )

    # ----------------------------------------------------------- reading

    def _await(self, fut: Future[Any], timeout: float | None) -> float | None:
        """Read the socket in this thread until ``fut`` is answered; return the time left of ``timeout``.

        Returns early (the future then waits on its own) when not connected: a
        reconnect sends the request again and its watcher reads the answer.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not fut.done():
            if deadline is not None and time.monotonic() >= deadline:
                break
            wire = self._wire
            if wire is None:
                break
            if wire.holder == threading.get_ident():
                # Already the reader: a done-callback of an answer this thread is dispatching waits.
                self._pump(wire, deadline)
                continue
            if not wire.take(fut.done, deadline):
                continue  # answered, timed out, or that connection ended: the loop looks again
            try:
                self._pump(wire, deadline)
            finally:
                wire.give()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _pump(self, wire: _Wire, deadline: float | None = None) -> None:
        """As the reader: one ``recv``, then every complete frame dispatched; handles the end.

        With a deadline, nothing is read unless data arrives before it.
        """
        if deadline is not None and not wire.poller.poll(max(0, int((deadline - time.monotonic()) * 1000) + 1)):
            return
        try:
            more = wire.reader.fill()
            while more:
                msg = wire.reader.frame()
                if msg is None:
                    break
                self._dispatch(wire, msg)
        except (OSError, EOFError, ValueError, RunbookError):
            more = False
        if not more:
            self._lost(wire)

    def _dispatch(self, wire: _Wire, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == "res":
            self._resolve(msg)
        elif kind == "push":
            self._deliveries.put(msg)
        elif kind == "bye":
            wire.graceful = True

    def _watch(self, wire: _Wire) -> None:
        """Read what arrives while no caller is reading; close the socket when it is over.

        It owns the descriptor's closing: other threads only shut the socket
        down, so it never polls a number that meanwhile names another file.
        """
        poller = select.poll()
        poller.register(wire.sock.fileno(), select.POLLIN | select.POLLPRI)
        try:
            while not wire.dead:
                poller.poll()
                read = False
                with wire.cv:
                    if wire.holder is None and not wire.dead:
                        wire.holder = threading.get_ident()
                        read = True
                if read:
                    try:
                        # A caller may have read it meanwhile: read only if it would not block.
                        read = bool(poller.poll(0)) and not wire.dead
                        if read:
                            self._pump(wire)
                    finally:
                        wire.give()
                if not read:
                    # Callers are reading what arrives (answers they wait for): step aside a
                    # moment rather than wake with each of their answers.
                    wire.ended.wait(_WATCH_PAUSE)
        finally:
            try:
                wire.sock.close()
            except OSError:
                pass

    def _resolve(self, msg: dict[str, Any]) -> None:
        with self._lock:
            p = self._pending.pop(msg.get("id", -1), None)
        if p is None:
            return  # an acknowledgement nobody waits for
        if "err" in msg:
            p.future.set_exception(protocol.decode_error(msg["err"]))
            return
        try:
            p.future.set_result(protocol.decode_result(p.op, msg.get("ok")))
        except Exception as exc:  # noqa: BLE001 - a malformed answer reaches the caller
            p.future.set_exception(ProtocolError(self.location, f"malformed answer to {p.op}: {exc}"))

    def _lost(self, wire: _Wire) -> None:
        """The reader saw the connection end: reconnect if anybody needs it (see the module doc)."""
        graceful = wire.graceful
        with self._send_lock:
            if self._sock is wire.sock:
                self._sock = None
                self._wire = None
        wire.end()
        with self._lock:
            closed = self._closed
            waiting = bool(self._pending)
            listening = any(s.active for s in self._subs.values())
        if closed:
            self._fail_all(StoreError(self.location, "the store is closed"))
            return
        if not waiting and (graceful or not listening):
            # Nobody waits for an answer: the next call reconnects. After a
            # deliberate stop (``nbrunbook server stop``) a client that only
            # listens does not start a new server; it resumes when one runs.
            if listening:
                threading.Thread(target=self._rejoin, name="nbrunbook-client-rejoin", daemon=True).start()
            return
        try:
            self._connect()
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the reason
            self._fail_all(exc if isinstance(exc, RunbookError) else StoreUnavailable(self.location, str(exc)))

    def _rejoin(self) -> None:
        """Reconnect (subscriptions included) once a server runs again, without starting one."""
        while True:
            time.sleep(_REJOIN_EVERY)
            with self._lock:
                if self._closed or not any(s.active for s in self._subs.values()):
                    return
            if self._sock is not None:
                return  # a call reconnected meanwhile
            try:
                self._connect(start=False)
                return
            except (_NoServer, RunbookError):
                continue

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            if not p.future.done():
                p.future.set_exception(exc)

    # ------------------------------------------------------ subscriptions

    def subscribe(self, instance_id: str, callback: Callable[[list[model.Event]], None], since: int) -> _Sub:
        with self._lock:
            sid = next(self._ids)
            sub = _Sub(sid, instance_id, callback, since)
            self._subs[sid] = sub
        try:
            sub.request = self._request("subscribe", {"sub": sid, "instance_id": instance_id, "since_seq": since})
            sub.request.future.result()
        except BaseException:
            with self._lock:
                self._subs.pop(sid, None)
            raise
        return sub

    def unsubscribe(self, sub: _Sub) -> None:
        sub.active = False
        with self._lock:
            self._subs.pop(sub.id, None)
            closed = self._closed
        if not closed and self._sock is not None:
            try:
                self.call("unsubscribe", {"sub": sub.id})
            except RunbookError:
                pass

    def _deliver_loop(self) -> None:
        while True:
            msg = self._deliveries.get()
            if msg is None:
                return
            with self._lock:
                sub = self._subs.get(int(msg.get("sub", -1)))
            if sub is None or not sub.active:
                continue
            events = [e for e in protocol.decode_result("journal", msg.get("events")) if e.seq > sub.last_seq]
            if not events:
                continue
            sub.last_seq = events[-1].seq
            try:
                sub.callback(events)
            except Exception:  # noqa: BLE001 - a broken subscriber must not stop the others
                pass

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Flush, then end the connection (the server releases this process's owners)."""
        with self._lock:
            if self._closed:
                return
        atexit.unregister(self.close)
        if self._sock is not None:  # not connected: nothing is in flight, and no server is started to flush
            try:
                self.call("flush", {}).result(timeout=60)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        with self._lock:
            self._closed = True
        with self._send_lock:
            wire, self._wire, self._sock = self._wire, None, None
        if wire is not None:
            wire.end()  # its watcher closes the socket
        self._fail_all(StoreError(self.location, "the store is closed"))
        self._deliveries.put(None)

    def forget(self) -> None:
        """In a forked child: drop the parent's connection without touching it."""
        self._closed = True
        atexit.unregister(self.close)
        sock, self._sock, self._wire = self._sock, None, None
        if sock is not None:
            # Close only this process's copy of the descriptor (never shutdown():
            # the parent's connection is the same socket).
            try:
                os.close(sock.detach())
            except OSError:
                pass


_LINKS: dict[str, Link] = {}
_LINKS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # A child must never speak on (or keep alive) its parent's connection: the
    # server learns of the parent's death by this descriptor closing.
    global _LINKS_LOCK
    _LINKS_LOCK = threading.Lock()
    for link in list(_LINKS.values()):
        link.forget()
    _LINKS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def acquire(paths: ServerPaths, location: str) -> Link:
    with _LINKS_LOCK:
        link = _LINKS.get(paths.socket)
        if link is None or link.pid != os.getpid():
            link = Link(paths, location)
            _LINKS[paths.socket] = link
        link.refs += 1
        return link


def release(link: Link) -> None:
    with _LINKS_LOCK:
        link.refs -= 1
        if link.refs > 0:
            return
        if _LINKS.get(link.paths.socket) is link:
            del _LINKS[link.paths.socket]
    link.close()


# --------------------------------------------------------------- the store
