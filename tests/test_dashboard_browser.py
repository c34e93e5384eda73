"""The store dashboard in a real browser: Voilà on localhost, Debian's chromium
driven by Playwright (no downloaded browser). A screenshot is saved as a test
artifact under test-artifacts/."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.keys import branch_path
from nbrunbook.engine.model import ManifestCell

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
OWNER = "ops@dash-host:7:abc"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seed(path: Path) -> None:
    store = EmbeddedStore(str(path))
    try:
        cells = [ManifestCell("imports", 0, kind="always")] + [
            ManifestCell(f"step{i}", i + 1, name=f"step {i}") for i in range(4)
        ]
        m = store.pin_manifest("release", cells)
        store.open_instance(
            "release", "rel-42", {"version": "4.2"}, manifest_version=m.version, owner=OWNER, run_id="r"
        )
        for i in range(3):
            c = store.claim("rel-42", f"cell/step{i}", owner=OWNER, run_id="r")
            if i == 1:
                paths = [branch_path(c.step_key, "check", str(n)) for n in range(40)]
                for n, b in enumerate(store.claim_many("rel-42", paths, owner=OWNER, run_id="r")):
                    if n == 13:
                        store.fail("rel-42", b.step_key, owner=OWNER, epoch=b.state.epoch, run_id="r", error={})
                    else:
                        store.complete("rel-42", b.step_key, owner=OWNER, epoch=b.state.epoch, run_id="r")
            store.complete("rel-42", c.step_key, owner=OWNER, epoch=c.state.epoch, run_id="r")
        c = store.claim("rel-42", "cell/step3", owner=OWNER, run_id="r")
        store.fail("rel-42", c.step_key, owner=OWNER, epoch=c.state.epoch, run_id="r", error={"type": "Timeout"})
    finally:
        store.close()


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[str]:
    store = tmp_path / "store.duckdb"
    _seed(store)
    port = _free_port()
    log = (tmp_path / "voila.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbrunbook.engine.cli",
            "dashboard",
            "--store",
            str(store),
            "--port",
            str(port),
            "--instance",
            "rel-42",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "NBRUNBOOK_STORE": str(store)},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                # Only connect: a GET of the page would start a dashboard kernel of its own.
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise AssertionError("voila did not start:\n" + (tmp_path / "voila.log").read_text()) from None
                time.sleep(0.5)
        yield url
    except BaseException:
        log.flush()
        print((tmp_path / "voila.log").read_text())
        raise
    finally:
        proc.terminate()  # Voilà (exec'd) shuts its kernels down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the session
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


def test_dashboard_in_chromium(dashboard: str) -> None:
    if not os.path.exists(CHROMIUM):
        message = "Debian's chromium is not installed (.ci/run installs it with apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must run the browser test")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            messages: list[str] = []
            page.on("console", lambda m: messages.append(m.text))
            page.goto(dashboard, timeout=120_000)
            try:
                page.wait_for_selector(".nbrb-instances", timeout=120_000)
            except Exception:
                print("page text:", page.inner_text("body")[:3000], "\nconsole:", messages[-30:])
                raise
            page.wait_for_selector(".nbrb-cells", timeout=120_000)
            text = page.inner_text("body")
            assert "rel-42" in text and "release" in text
            assert "3/4 done" in text and "1 failed" in text
            assert page.locator('.nbrb-row[data-status="done"]').count() == 3
            assert page.locator('.nbrb-row[data-status="failed"]').count() == 1
            fan = page.inner_text(".nbrb-fanout")
            assert "40 branches" in fan and "39 done" in fan and "check[13]" in fan
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
