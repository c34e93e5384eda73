"""The store server's C allocator: jemalloc where the machine has it, the system's on request.

Real server processes; what they run with is read from ``/proc/PID/maps``
(the libraries mapped into the process), not from what the server says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.servers import foreground_cli_server
from nbrunbook.engine import allocator, launch, protocol
from nbrunbook.engine.errors import StoreUnavailable
from nbrunbook.engine.factory import open_store

JEMALLOC = allocator.jemalloc_library()


def _mapped_jemalloc(pid: int) -> bool:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        return any("libjemalloc" in line for line in fh)


def _served(path: Path) -> int:
    """Open a client (starting the server on demand) and return the server's pid."""
    store = open_store(f"server:{path}")
    try:
        info = launch.server_status(str(path))
        assert info is not None
        assert info["pid"] == store.server_info["pid"]  # type: ignore[attr-defined]
        pid = int(info["pid"])
        assert info["malloc"] == ("jemalloc" if _mapped_jemalloc(pid) else "system")
        store.open_instance("rb", "i", {}, manifest_version=0, owner="t@h:1:x", run_id="r")
        return pid
    finally:
        store.close()


def test_server_started_on_demand_uses_jemalloc_where_the_machine_has_it(tmp_path: Path) -> None:
    pid = _served(tmp_path / "store.duckdb")
    assert _mapped_jemalloc(pid) is (JEMALLOC is not None)
    if "jemalloc" not in os.environ.get("LD_PRELOAD", ""):
        assert not _mapped_jemalloc(os.getpid())  # the client's own process is left as it was started


def test_system_allocator_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.ENV, "system")
    pid = _served(tmp_path / "store.duckdb")
    assert not _mapped_jemalloc(pid)


def test_bad_allocator_choice_is_one_clear_error_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.duckdb"
    monkeypatch.setenv(allocator.ENV, "tcmalloc")
    with pytest.raises(StoreUnavailable) as err:
        open_store(f"server:{path}")
    message = str(err.value)
    assert allocator.ENV in message and "'tcmalloc'" in message and "auto, jemalloc, system" in message
    assert not protocol.can_connect(protocol.server_paths(str(path)).socket)
    assert not path.exists()


def test_foreground_server_becomes_the_process_with_the_allocator(tmp_path: Path) -> None:
    """``nbrunbook server`` re-executes itself once with the allocator: same pid, still in the foreground."""
    path = tmp_path / "store.duckdb"
    with foreground_cli_server(path) as proc:
        info = launch.server_status(str(path))
        assert info is not None and info["pid"] == proc.pid
        assert _mapped_jemalloc(proc.pid) is (JEMALLOC is not None)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0


def test_foreground_server_refuses_a_bad_allocator_choice(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    done = subprocess.run(
        [sys.executable, "-m", "nbrunbook.engine.cli", "server", "--store", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, allocator.ENV: "fast"},
    )
    assert done.returncode != 0
    assert f"{allocator.ENV}='fast'" in done.stderr and "Traceback" not in done.stderr
    assert not path.exists()


# ------------------------------------------------------- the environment


def test_environment_prepends_jemalloc_and_keeps_the_users_preloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "libjemalloc.so.2")
    env = allocator.server_environment({"LD_PRELOAD": "/opt/libfoo.so:/opt/libbar.so", "HOME": "/h"})
    assert env == {"LD_PRELOAD": "libjemalloc.so.2 /opt/libfoo.so /opt/libbar.so", "HOME": "/h"}
    assert allocator.server_environment(env) == env  # once: a re-executed server does not loop
    mine = {"LD_PRELOAD": "/usr/local/lib/libjemalloc.so"}
    assert allocator.server_environment(mine) == mine  # the user's own jemalloc is kept as it is


def test_environment_without_jemalloc_or_with_system_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"PATH": "/bin", "LD_PRELOAD": "/opt/libfoo.so"}
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    assert allocator.server_environment(base) == base
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "libjemalloc.so.2")
    assert allocator.server_environment({**base, allocator.ENV: " System "}) == {**base, allocator.ENV: " System "}
    assert allocator.choice({allocator.ENV: "jemalloc"}) == "auto"
    assert allocator.choice({}) == "auto"
    with pytest.raises(ValueError, match="expected one of auto, jemalloc, system"):
        allocator.choice({allocator.ENV: "yes"})


def test_in_use_reads_the_mapped_libraries(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.in_use(str(maps)) == "system"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.in_use(str(maps)) == "jemalloc"
    assert allocator.in_use(str(tmp_path / "absent")) == "system"
