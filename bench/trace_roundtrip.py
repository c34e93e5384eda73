"""Where one claim's round trip through the store server goes, and the floor under it.

    python bench/trace_roundtrip.py [--claims 200] [--pause 0.005]

A diagnostic, not a target. Two parts, each request sent after ``--pause``
seconds of idleness (a kernel's claim follows the previous cell's run, so
both processes are idle and their caches cold when it leaves):

- ``floor_ms``: two bare Python processes on a socketpair ping-ponging a
  claim-sized frame, with no framing (``raw``), with ``json.dumps`` /
  ``json.loads`` (``stdlib_json``) and with the server's codec
  (``wirejson``), plus the same hot (no pause). Medians.
- ``segments_ms``: a store server in this process (its reading, writer and
  answering steps stamped with ``time.monotonic``, which the client process
  shares) and one client process claiming new steps one by one. Medians of:
  client sends -> server has read the request; read -> writer starts the
  group; writer start -> SQL starts; SQL; SQL end -> answer handed to the
  socket; answer -> client has the decoded claim.

Only the sum of the first and the last segment (minus the embedded store's
own wake-up of its caller) is what the server adds to a claim.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_server  # the in-process server is bench_server's

from nbrunbook.engine import connection, protocol, server, wirejson, writer

_HEADER = struct.Struct(">I")
_REQUEST = {"t": "req", "id": 5, "op": "claim", "args": {"instance_id": "rt", "path": "cell/x1", "owner": "o"}}
_ANSWER = {
    "t": "res",
    "id": 5,
    "ok": {
        "outcome": "claimed",
        "state": {
            "instance_id": "rt",
            "path": "cell/x1",
            "parent": None,
            "invocation": 1,
            "attempt": 1,
            "epoch": 1,
            "status": "running",
            "owner": "o",
            "run_id": "r",
            "lease_until": 1796297530.3448534,
            "claimed_at": 1796297500.3448534,
            "finished_at": None,
        },
        "missing": [],
        "max_attempts": 10,
    },
}
_CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    "raw": (lambda _m: b"x" * 300, lambda b: b),
    "stdlib_json": (lambda m: json.dumps(m, separators=(",", ":")).encode(), json.loads),
    "wirejson": (wirejson.encode, wirejson.decode),
}


def _ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def floor(codec: str, n: int, pause: float) -> float:
    """Median ms of a ping-pong of claim-sized frames between two bare processes."""
    enc, dec = _CODECS[codec]
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echoing peer: read a frame, decode it, answer
        a.close()
        stream = b.makefile("rb")
        while head := stream.read(_HEADER.size):
            dec(stream.read(_HEADER.unpack(head)[0]))
            body = enc(_ANSWER)
            b.sendall(_HEADER.pack(len(body)) + body)
        os._exit(0)
    b.close()
    times = []
    with a, a.makefile("rb") as stream:
        for _ in range(n):
            if pause:
                time.sleep(pause)
            t = time.perf_counter()
            body = enc(_REQUEST)
            a.sendall(_HEADER.pack(len(body)) + body)
            dec(stream.read(_HEADER.unpack(stream.read(_HEADER.size))[0]))
            times.append(time.perf_counter() - t)
        a.shutdown(socket.SHUT_WR)
    os.waitpid(pid, 0)
    return _ms(times)


def client(store: str, n: int, pause: float) -> None:
    """The client process: warm up, then ``n`` claims of new steps, each after a pause; prints their times."""
    from nbrunbook.engine.factory import open_store

    s = open_store(f"server:{store}")
    for i in range(30):
        s.claim("rt", f"cell/warm{i}", owner="o", run_id="r")
    out = []
    for i in range(n):
        time.sleep(pause)
        t0 = time.monotonic()
        s.claim("rt", f"cell/x{i}", owner="o", run_id="r")
        out.append((t0, time.monotonic()))
    s.close()
    print(json.dumps(out))


def segments(n: int, pause: float) -> dict[str, float]:
    """Medians of the round trip's segments, server in this process, client in another."""
    stamps: dict[str, list[float]] = {k: [] for k in ("read", "exec", "sql0", "sql1", "sent")}
    read_frame, execute, commit = protocol.read_frame, writer.Writer._execute, writer.Writer._commit
    send_soon = connection.Connection.send_soon

    def timed_read(stream: protocol.Readable) -> dict[str, Any] | None:
        msg = read_frame(stream)
        if msg is not None and msg.get("op") == "claim":
            stamps["read"].append(time.monotonic())
        return msg

    def timed_execute(self: writer.Writer, ops: list[Any]) -> None:
        stamps["exec"].append(time.monotonic())
        execute(self, ops)

    def timed_commit(self: writer.Writer, batch: writer.Batch) -> None:
        stamps["sql0"].append(time.monotonic())
        commit(self, batch)
        stamps["sql1"].append(time.monotonic())

    def timed_send(self: connection.Connection, msg: dict[str, Any]) -> None:
        stamps["sent"].append(time.monotonic())  # before: the client may have it before send returns
        send_soon(self, msg)

    server.protocol.read_frame = timed_read
    writer.Writer._execute = timed_execute
    writer.Writer._commit = timed_commit
    connection.Connection.send_soon = timed_send

    with bench_server.server_in_this_process("rt") as path:
        cmd = [sys.executable, __file__, "--client", str(path), "--claims", str(n), "--pause", str(pause)]
        claims = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    parts: dict[str, list[float]] = {k: [] for k in ("send_to_read", "read_to_writer", "writer_to_sql", "sql")}
    parts.update({"sql_to_answer": [], "answer_to_client": [], "total": []})
    for t0, t1 in claims:
        # Claims are sequential: each stamp of this claim lies between its send and its answer.
        got = {k: [t for t in v if t0 <= t <= t1] for k, v in stamps.items()}
        if not all(got.values()):
            continue
        read, ex, sql0 = got["read"][0], got["exec"][0], got["sql0"][0]
        sql1, sent = got["sql1"][-1], got["sent"][-1]
        for name, value in (
            ("send_to_read", read - t0),
            ("read_to_writer", ex - read),
            ("writer_to_sql", sql0 - ex),
            ("sql", sql1 - sql0),
            ("sql_to_answer", sent - sql1),
            ("answer_to_client", t1 - sent),
            ("total", t1 - t0),
        ):
            parts[name].append(value)
    return {k: _ms(v) for k, v in parts.items()} | {"claims_traced": len(parts["total"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--claims", type=int, default=200)
    ap.add_argument("--pause", type=float, default=0.005, help="seconds idle before each request")
    ap.add_argument("--client", metavar="STORE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client(args.client, args.claims, args.pause)
        return
    result: dict[str, Any] = {"pause_s": args.pause, "floor_ms": {}}
    for codec in _CODECS:
        result["floor_ms"][codec] = floor(codec, args.claims * 2, args.pause)
        result["floor_ms"][f"{codec}_hot"] = floor(codec, args.claims * 2, 0.0)
    result["segments_ms"] = segments(args.claims, args.pause)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
