"""Code typed into a console attached to the notebook's kernel is not a step of the notebook.

A JupyterLab console on the notebook's kernel sends ``execute_request``\\ s
from its own kernel connection (its own ``header.session``) with a fresh
``cellId`` per console cell; a JupyterLab notebook sends its cells' ids and
``deletedCells`` in the metadata. Real kernels, two real ``jupyter_client``
connections. Oracles: the store's steps and journal invariants, the effects
file, and the notices on stderr.
"""

from __future__ import annotations

import queue
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient

from helpers.kernels import (  # noqa: F401 - fixtures
    TIMEOUT,
    Kernel,
    Kernels,
    Result,
    check_instance,
    effects,
    kernels_fixture,
    notebook_copy_fixture,
    start_code,
)
from nbrunbook.engine.factory import open_store

NOTICE = "is not a cell of effects.ipynb: it runs unguarded"


class Client:
    """Another connection to a running kernel (a console, or a reloaded notebook page)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kc: BlockingKernelClient = kernel.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=TIMEOUT)

    def execute(self, code: str, metadata: dict[str, Any]) -> Result:
        """Send one execute_request with this metadata; its outputs and reply."""
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False}
        msg = self.kc.session.msg("execute_request", content, metadata=metadata)
        self.kc.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        deadline = time.monotonic() + TIMEOUT
        outputs: list[dict[str, Any]] = []
        while True:
            try:
                m = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no idle status from the kernel") from None
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "stream":
                outputs.append({"output_type": "stream", "name": m["content"]["name"], "text": m["content"]["text"]})
            elif m["msg_type"] == "display_data":
                outputs.append({"output_type": "display_data", "data": m["content"]["data"]})
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                c = reply["content"]
                return Result(status=c["status"], ename=c.get("ename", ""), evalue=c.get("evalue", ""), outputs=outputs)

    def close(self) -> None:
        self.kc.stop_channels()


def _started(kernels: Kernels, notebook_copy: Any, tmp_path: Path) -> tuple[Kernel, Any, Path]:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k, ["setup", "a"])
    return k, nb, store


def _paths(store: Path) -> set[str]:
    with open_store(store) as s:
        return {st.path for st in s.steps("T1")}


def test_console_code_runs_unguarded_and_says_so_once(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    k, nb, store = _started(kernels, notebook_copy, tmp_path)
    console = Client(k)
    try:
        first = console.execute("print('inspect', x)\nprobe = x + 1", {"cellId": str(uuid.uuid4())})
        assert first.status == "ok" and first.text("stdout") == "inspect 41\n", first.error_text
        notices = [ln for ln in first.stderr.splitlines() if ln.startswith("nbrunbook")]
        assert len(notices) == 1 and NOTICE in notices[0], first.stderr
        assert "save the notebook" not in first.stderr
        # A side effect typed in the console runs every time: it is nobody's step.
        log = tmp_path / "console.log"
        for _ in range(2):
            again = console.execute(f"open({str(log)!r}, 'a').write('typed\\n')", {"cellId": str(uuid.uuid4())})
            assert again.status == "ok" and again.stderr == "", again.error_text + again.stderr  # said once
        assert log.read_text() == "typed\ntyped\n"
        no_id = console.execute("probe", {})  # a console that sends no cellId at all
        assert no_id.status == "ok" and no_id.stderr == "", no_id.stderr
    finally:
        console.close()
    # The notebook's own cells are still guarded, in the notebook's client.
    assert k.execute(nb.source("b"), cell_id="b").ok().stderr == ""
    assert k.value("probe") == 42
    k.execute("%runbook stop").ok()
    assert _paths(store) == {"cell/a", "cell/b"}  # no store rows for console code
    lines = effects(tmp_path)
    assert [e["step_key"] for e in lines if e["step_key"] != "cell/a@1" and e["step_key"] != "cell/b@1"] == []
    check_instance(store, "T1")


def test_a_new_unsaved_notebook_cell_stays_a_step(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    k, _, store = _started(kernels, notebook_copy, tmp_path)
    # Typed into the notebook itself (the attaching client), not saved yet: a step, run once.
    new = k.execute('effect("new")\nprint("new cell ran")', cell_id="not-saved-yet").ok()
    assert "cell not-saved-yet is not in the pinned runbook (a new cell? save the notebook" in new.stderr
    again = k.execute('effect("new")\nprint("new cell ran")', cell_id="not-saved-yet").ok()
    assert "new cell ran" in again.stdout and again.status_lines, again.outputs  # skipped and replayed
    # The notebook page reloaded: a new connection, but JupyterLab's notebook metadata says what it is.
    page = Client(k)
    try:
        res = page.execute('effect("after reload")', {"cellId": "typed-after-reload", "deletedCells": []})
        assert res.status == "ok" and "save the notebook to pin it" in res.stderr, res.stderr
        assert NOTICE not in res.stderr
    finally:
        page.close()
    k.execute("%runbook stop").ok()
    assert {"cell/not-saved-yet", "cell/typed-after-reload"} <= _paths(store)
    keys = [e["step_key"] for e in effects(tmp_path)]
    assert keys.count("cell/not-saved-yet@1") == 1 and keys.count("cell/typed-after-reload@1") == 1
    check_instance(store, "T1", effects(tmp_path))


def test_a_notebook_cell_sent_from_another_connection_is_still_guarded(
    kernels: Kernels, notebook_copy, tmp_path: Path
) -> None:
    k, nb, store = _started(kernels, notebook_copy, tmp_path)
    other = Client(k)  # e.g. a second browser tab on the same notebook
    try:
        done = other.execute(nb.source("a"), {"cellId": "a"})
        assert done.status == "ok" and done.status_lines
        # It sent a cell of this notebook, so it is the notebook's: a new cell from it is a step.
        new = other.execute('effect("tab")', {"cellId": "typed-in-tab"})
        assert new.status == "ok" and NOTICE not in new.stderr, new.stderr
    finally:
        other.close()
    k.execute("%runbook stop").ok()
    assert "cell/typed-in-tab" in _paths(store)
    assert [e["step_key"] for e in effects(tmp_path)].count("cell/a@1") == 1
    check_instance(store, "T1", effects(tmp_path))
