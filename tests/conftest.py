"""Fixtures shared by the whole suite: stores on real DuckDB files in tmp_path."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import new_run_id
from nbrunbook.engine.launch import stop_all
from nbrunbook.engine.store import Store

# Every store implementation the contract suite runs against.
STORE_KINDS = ["embedded", "server"]


def pytest_configure(config: pytest.Config) -> None:
    # Every store server the suite starts (in this process or in children, which
    # inherit the environment) keeps its socket and lock here, so the fixture
    # below can find and stop them all; auto-started ones also exit when idle.
    os.environ["NBRUNBOOK_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="nbrb-run-")
    os.environ.setdefault("NBRUNBOOK_SERVER_IDLE", "30")


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = os.environ.get("NBRUNBOOK_RUNTIME_DIR", "")
    if os.path.basename(directory).startswith("nbrb-run-") and os.path.isdir(directory):
        stop_all(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def _stop_store_servers() -> Iterator[None]:
    """No test leaves a store server running (each holds its DuckDB file open)."""
    yield
    stop_all(os.environ["NBRUNBOOK_RUNTIME_DIR"])


@pytest.fixture(autouse=True)
def _isolated_store_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may touch a developer's real default store.
    monkeypatch.setenv("NBRUNBOOK_STORE", str(tmp_path / "default-store.duckdb"))


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "store.duckdb"


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_kind(store_kind: str, store_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens (another handle on) the test's store, of the parametrised kind."""
    opened: list[Store] = []

    def opener() -> Store:
        s = open_store(f"{store_kind}:{store_path}")
        opened.append(s)
        return s

    yield opener
    for s in reversed(opened):
        s.close()


@pytest.fixture
def store(open_kind: Callable[[], Store]) -> Store:
    return open_kind()


@pytest.fixture
def run_id() -> str:
    return new_run_id()


def owner(name: str) -> str:
    """A simulated owner on another host: neither live nor gone, its lease decides."""
    return f"{name}@sim-host:{abs(hash(name)) % 30000 + 2}:{name.encode().hex()[:12] or 'x'}"


@pytest.fixture
def new_instance(store: Store, run_id: str) -> Callable[..., str]:
    """Create an instance (no manifest unless cells given) and return its id."""
    counter = [0]

    def make(instance_id: str | None = None, params: dict | None = None, **options: object) -> str:
        counter[0] += 1
        iid = instance_id or f"inst-{counter[0]}"
        store.open_instance(
            "rb", iid, params or {}, manifest_version=0, owner=owner("creator"), run_id=run_id, options=options
        )
        return iid

    return make


def pytest_report_header(config: pytest.Config) -> str:
    from nbrunbook.engine.allocator import jemalloc_library

    malloc = jemalloc_library() or "nothing (no jemalloc on this machine: the system malloc)"
    kinds = ", ".join(STORE_KINDS)
    return f"nbrunbook store kinds under test: {kinds}; store servers preload {malloc}; pid {os.getpid()}"


@pytest.fixture(scope="session")
def matplotlib_ready() -> None:
    """matplotlib imported once in a child first: its first import builds a font cache and says so
    on stderr, an output that would show in one of the runs a comparison test makes and not in the
    others."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], check=True, capture_output=True)
