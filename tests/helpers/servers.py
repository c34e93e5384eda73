"""Test-side helpers for store server processes: start one, start client processes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLIENT = Path(__file__).parent / "server_client.py"


def start_server(
    store: Path, *, env: dict[str, str] | None = None, grace: float | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """A server process owned by the test (foreground, no idle exit); returns it once it listens."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "nbrunbook.engine.server", "--store", str(store), "--idle-timeout", "0"]
    if grace is not None:
        cmd += ["--grace", repr(grace)]
    proc = subprocess.Popen([*cmd, "--ready-fd", str(w)], pass_fds=(w,), env={**os.environ, **(env or {})})
    os.close(w)
    try:
        line = _read_line(r, timeout=120)
    finally:
        os.close(r)
    msg = json.loads(line)
    assert "ok" in msg, msg
    return proc, msg["ok"]


@contextlib.contextmanager
def foreground_cli_server(store: Path) -> Iterator[subprocess.Popen[str]]:
    """``nbrunbook server --store STORE`` as a user types it, once it says it is serving; killed at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbrunbook.engine.cli", "server", "--store", str(store)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert " serving " in proc.stderr.readline()
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _read_line(fd: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the server did not report ready"
        chunk = os.read(fd, 4096)
        assert chunk, "the server exited before it was ready"
        data += chunk
    return data


def client(
    mode: str, store: Path, *args: object, fds: tuple[int, ...] = (), stdin: bool = False
) -> subprocess.Popen[str]:
    """Start ``helpers/server_client.py MODE STORE ARGS...`` with JSON lines on its stdout."""
    return subprocess.Popen(
        [sys.executable, str(CLIENT), mode, str(store), *map(str, args)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        text=True,
        pass_fds=fds,
    )


def read_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The next JSON line a client printed (fails if it exited first)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"client {proc.pid} exited (code {proc.wait()}) before answering"
    result: dict[str, Any] = json.loads(line)
    return result


def wait_until(predicate: Any, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll ``predicate`` (a guard against hanging tests, never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)
