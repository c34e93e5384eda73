"""One client connection inside the store server.

Replies are written by the thread that ran the request (one hand-over less
on the request's path); messages produced on the writer or subscription
threads (answers to ``wait=False`` outcomes, pushed events) go through a
sender thread instead, so those threads never block on a slow client. The
in-flight count lets the server finish a vanished client's requests before
it releases the client's owners.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import protocol
from .faults import crashpoint


class Connection:
    """One client connection: its first reader thread, a sender thread, its owners."""

    def __init__(self, sock: socket.socket, conn_id: int, pid: int, serve: Callable[[Connection], None]) -> None:
        self.sock = sock
        self.id = conn_id
        self.pid = pid
        self.rfile: protocol.Readable = sock.makefile("rb", buffering=65536)
        self.out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.owners: dict[str, None] = {}
        self.subs: dict[int, Callable[[], None]] = {}
        self.closed = False
        self.control = False  # a status/stop connection, not a client
        self.inflight = 0
        self.cv = threading.Condition()
        self._wlock = threading.Lock()
        self._tail = b""  # under _wlock: bytes of a frame send_soon could not finish
        self.reader = threading.Thread(target=serve, args=(self,), name=f"nbrunbook-conn-{conn_id}", daemon=True)
        self.sender = threading.Thread(target=self._send_loop, name=f"nbrunbook-send-{conn_id}", daemon=True)

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a message for the sender thread (never blocks: writer and dispatcher threads use it)."""
        if not self.closed:
            if msg.get("t") == "res":  # an answer (e.g. to an outcome committed by the writer)
                crashpoint("before_reply")
            self.out.put(protocol.dumps(msg))

    def send_now(self, msg: dict[str, Any]) -> None:
        """Write a message from this thread (a request's own thread answers: one hand-over less)."""
        if not self.closed:
            crashpoint("before_reply")  # the request is done (a write: committed), its answer not yet sent
            self._write([protocol.dumps(msg)])

    def send_soon(self, msg: dict[str, Any]) -> None:
        """Write a message from this thread if the socket takes it at once, else queue it (never blocks).

        The writer thread answers claims with it right after their commit:
        one thread writes all of a group's answers (a few µs each) instead of
        waking one thread per claim, which on two cores spread the answers of
        a group of 8 over ~1.6 ms. A client that does not read cannot stall
        the writer: what the socket does not take goes, in order, to the
        sender thread, and nothing else is written directly until it is out.
        """
        if self.closed:
            return
        crashpoint("before_reply")
        data = protocol.dumps(msg)
        if self._wlock.acquire(blocking=False):
            try:
                if not self._tail:
                    try:
                        sent = self.sock.send(data, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        self.closed = True
                        return
                    if sent == len(data):
                        return
                    self._tail = data[sent:]  # the rest of this frame goes out before anything else
                    data = b""  # wakes the sender thread, which writes the tail first
            finally:
                self._wlock.release()
        self.out.put(data)

    def _send_loop(self) -> None:
        while True:
            item = self.out.get()
            if item is None:
                return
            chunks = [item]
            size = len(item)
            while size < 1 << 20:  # coalesce replies that are ready into one write
                try:
                    more = self.out.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._write(chunks)
                    return
                chunks.append(more)
                size += len(more)
            if not self._write(chunks):
                return

    def _write(self, chunks: list[bytes]) -> bool:
        try:
            with self._wlock:
                if self._tail:  # the unsent rest of a frame begun by send_soon
                    self.sock.sendall(self._tail)
                    self._tail = b""
                self.sock.sendall(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        except OSError:
            self.closed = True
            return False
        return True

    def begin(self) -> None:
        """A request that must finish before this connection's owners may be released started."""
        with self.cv:
            self.inflight += 1

    def end(self) -> None:
        """That request finished."""
        with self.cv:
            self.inflight -= 1
            if self.inflight == 0:
                self.cv.notify_all()

    def drain(self, timeout: float) -> None:
        """Wait until no request of this connection is executing."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while self.inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.cv.wait(remaining)
