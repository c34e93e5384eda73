"""Real IPython kernels for the kernel-extension tests (no mocked IPython).

Kernels start with jupyter_client's ``KernelManager`` and are driven with a
``BlockingKernelClient``. :meth:`Kernel.execute` sends an ``execute_request``
whose metadata carries ``cellId`` (and optionally ``tags``) exactly as
JupyterLab and the headless runner send them, then collects the iopub outputs
of that request into nbformat-shaped dicts.

Test modules import the fixtures (``kernels``, ``notebook_copy``) with
``from helpers.kernels import kernels_fixture, notebook_copy_fixture  # noqa: F401``.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from nbrunbook.kernel_ext.replay import STATUS_MIME

FILES = Path(__file__).resolve().parent.parent / "files"
#: Generous: two cores shared with other test runs.
TIMEOUT = 180.0


@dataclass
class Result:
    """The reply and outputs of one execute_request."""

    status: str
    ename: str = ""
    evalue: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    execution_count: int | None = None
    user_expressions: dict[str, Any] = field(default_factory=dict)

    def text(self, name: str) -> str:
        """Everything written to one stream."""
        return "".join(o["text"] for o in self.outputs if o["output_type"] == "stream" and o["name"] == name)

    @property
    def stdout(self) -> str:
        """The stdout text (the guard never writes to it)."""
        return self.text("stdout")

    @property
    def stderr(self) -> str:
        """The stderr text."""
        return self.text("stderr")

    @property
    def statuses(self) -> list[dict[str, Any]]:
        """The guard's status outputs (a skipped cell's own display of STATUS_MIME)."""
        return [o["data"] for o in self.outputs if o["output_type"] == "display_data" and STATUS_MIME in o["data"]]

    @property
    def status_lines(self) -> list[str]:
        """The text/plain lines of the guard's status outputs (one per skipped cell)."""
        return [str(data["text/plain"]) for data in self.statuses]

    @property
    def displays(self) -> list[dict[str, Any]]:
        """The display_data outputs, the guard's status outputs aside."""
        return [o for o in self.outputs if o["output_type"] == "display_data" and STATUS_MIME not in o["data"]]

    @property
    def result(self) -> dict[str, Any] | None:
        """The execute_result's data, if any."""
        for o in self.outputs:
            if o["output_type"] == "execute_result":
                data: dict[str, Any] = o["data"]
                return data
        return None

    @property
    def error_text(self) -> str:
        """The error's name and value (for assertion messages)."""
        return f"{self.ename}: {self.evalue}"

    def ok(self) -> Result:
        """Assert the cell succeeded; return self."""
        assert self.status == "ok", f"cell failed: {self.error_text}\nstderr: {self.stderr}"
        return self


class Kernel:
    """One running kernel with a client."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd), env=env)
        self.kc: BlockingKernelClient = self._client()
        self._buffer: list[dict[str, Any]] = []

    def _client(self) -> BlockingKernelClient:
        self._buffer = []
        kc = self.km.blocking_client()
        kc.start_channels()
        kc.wait_for_ready(timeout=TIMEOUT)
        return kc

    @property
    def pid(self) -> int:
        """The kernel process id."""
        return int(self.km.provisioner.pid)  # type: ignore[union-attr]

    # --------------------------------------------------------------- execute

    def send(
        self,
        code: str,
        *,
        cell_id: str | None = None,
        tags: Sequence[str] | None = None,
        silent: bool = False,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
    ) -> str:
        """Send an execute_request (with JupyterLab-style metadata); return its msg_id."""
        content = {
            "code": code,
            "silent": silent,
            "store_history": store_history,
            "user_expressions": user_expressions or {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        metadata: dict[str, Any] = {}
        if cell_id is not None:
            metadata["cellId"] = cell_id
        if tags is not None:
            metadata["tags"] = list(tags)
        msg = self.kc.session.msg("execute_request", content, metadata=metadata)
        self.kc.shell_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def poll(self, seconds: float) -> list[dict[str, Any]]:
        """Read the iopub messages that arrive within ``seconds`` (kept for :meth:`collect`)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._buffer.append(self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                return self._buffer
            if time.monotonic() >= deadline:
                return self._buffer

    def streamed(self, msg_id: str, name: str = "stderr") -> str:
        """Stream text of a running request seen so far by :meth:`poll`."""
        return "".join(
            m["content"]["text"]
            for m in self._buffer
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    def _next_iopub(self, deadline: float) -> dict[str, Any]:
        if self._buffer:
            return self._buffer.pop(0)
        msg: dict[str, Any] = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        return msg

    def collect(self, msg_id: str, timeout: float = TIMEOUT) -> Result:
        """Outputs and reply of a request sent with :meth:`send`."""
        deadline = time.monotonic() + timeout
        outputs: list[dict[str, Any]] = []
        idle = False
        while not idle:
            msg = self._next_iopub(deadline)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            content = msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                idle = True
            elif kind == "stream":
                outputs.append({"output_type": "stream", "name": content["name"], "text": content["text"]})
            elif kind in ("display_data", "execute_result"):
                outputs.append({"output_type": kind, "data": content["data"], "metadata": content.get("metadata", {})})
            elif kind == "error":
                outputs.append(
                    {
                        "output_type": "error",
                        "ename": content["ename"],
                        "evalue": content["evalue"],
                        "traceback": content.get("traceback", []),
                    }
                )
            elif kind == "clear_output":
                outputs.clear()
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        c = reply["content"]
        return Result(
            status=c["status"],
            ename=c.get("ename", ""),
            evalue=c.get("evalue", ""),
            outputs=outputs,
            execution_count=c.get("execution_count"),
            user_expressions=c.get("user_expressions", {}),
        )

    def execute(self, code: str, *, timeout: float = TIMEOUT, **kwargs: Any) -> Result:
        """Run code and wait for its reply."""
        return self.collect(self.send(code, **kwargs), timeout=timeout)

    def value(self, expression: str) -> Any:
        """Evaluate a JSON-able expression in the kernel (silently, unguarded)."""
        code = f"import json as _j; _nbrb_value = _j.dumps({expression})"
        res = self.execute(code, silent=True, user_expressions={"v": "_nbrb_value"})
        assert res.status == "ok", res.error_text
        v = res.user_expressions["v"]
        assert v["status"] == "ok", v
        return json.loads(ast.literal_eval(v["data"]["text/plain"]))  # the repr of a str

    # ------------------------------------------------------------- lifecycle

    def restart(self) -> None:
        """Restart the kernel (a fresh process; the old one shuts down cleanly)."""
        self.kc.stop_channels()
        self.km.restart_kernel(now=False)
        self.kc = self._client()

    def kill(self) -> None:
        """Kill the kernel process (SIGKILL) and start a new one."""
        self.kc.stop_channels()
        self.km.restart_kernel(now=True)
        self.kc = self._client()

    def interrupt(self) -> None:
        """Send SIGINT the way JupyterLab's stop button does."""
        self.km.interrupt_kernel()

    def shutdown(self) -> None:
        """Stop the kernel; waits for it to exit (so it releases the store file)."""
        try:
            self.kc.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=False)


class Notebook:
    """A test notebook's code cells, to send to a kernel one by one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = json.loads(path.read_text())
        self.cells = [c for c in data["cells"] if c["cell_type"] == "code"]

    def source(self, cell_id: str) -> str:
        """The source of the cell with this id."""
        for c in self.cells:
            if c["id"] == cell_id:
                src = c["source"]
                return "".join(src) if isinstance(src, list) else str(src)
        raise KeyError(cell_id)

    @property
    def ids(self) -> list[str]:
        """The code cells' ids in order."""
        return [c["id"] for c in self.cells]

    def run(self, kernel: Kernel, ids: Sequence[str] | None = None, *, stop_on_error: bool = True) -> dict[str, Result]:
        """Execute cells (all, or ``ids``) in order with their ids and tags, like 'Run All'."""
        results: dict[str, Result] = {}
        for cid in ids or self.ids:
            cell = next(c for c in self.cells if c["id"] == cid)
            tags = cell.get("metadata", {}).get("tags")
            res = kernel.execute(self.source(cid), cell_id=cid, tags=tags)
            results[cid] = res
            if stop_on_error and res.status != "ok":
                break
        return results


class Kernels:
    """Starts kernels for a test and always shuts them down."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Kernel] = []

    def env(self, **extra: str) -> dict[str, str]:
        """The kernels' environment: this interpreter's, with test paths added."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JPY_", "PYTEST_"))}
        env["NBRUNBOOK_TEST_EFFECTS"] = str(self.root / "effects.jsonl")
        env.update(extra)
        return env

    def start(self, **env: str) -> Kernel:
        """A new kernel whose working directory is the test's directory."""
        k = Kernel(self.root, self.env(**env))
        self.started.append(k)
        return k

    def close(self) -> None:
        for k in self.started:
            try:
                k.shutdown()
            except Exception as exc:  # noqa: BLE001 - shut the others down anyway
                print(f"kernel shutdown failed: {exc}", file=sys.stderr)


@pytest.fixture(name="kernels")
def kernels_fixture(tmp_path: Path) -> Iterator[Kernels]:
    """Start kernels with ``kernels.start()``; all are shut down after the test."""
    k = Kernels(tmp_path)
    try:
        yield k
    finally:
        k.close()


@pytest.fixture(name="notebook_copy")
def notebook_copy_fixture(tmp_path: Path) -> Any:
    """Copy a notebook from tests/files into the test directory: ``notebook_copy("effects.ipynb")``."""

    def copy(name: str) -> Notebook:
        dest = tmp_path / name
        shutil.copy(FILES / name, dest)
        return Notebook(dest)

    return copy


def effects(root: Path) -> list[dict[str, Any]]:
    """The effects file the test notebooks' cells append to."""
    path = root / "effects.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_code(notebook: Path, store: Path, instance: str = "T1", extra: str = "") -> str:
    """The cell a person runs first: load the extension and start (or resume) an instance."""
    return f"%load_ext nbrunbook\n%runbook start --instance {instance} --notebook {notebook} --store {store} {extra}"


def check_instance(store: Path, instance_id: str, effect_lines: list[dict[str, Any]] | None = None) -> list[Any]:
    """Every journal/cursor invariant, and exactly one effect per done step key.

    Attempts that *failed* after writing their effect (a cell that raises) are
    legitimately repeated with the same key; only those are excused. Open the
    store only once the kernels released it (shut down or ``%runbook stop``).
    """
    from helpers.oracle import check_effects_once, check_store
    from nbrunbook.engine.factory import open_store
    from nbrunbook.engine.keys import is_cell_path, split_step_key

    with open_store(store) as s:
        events = check_store(s, instance_id)
    if effect_lines is not None:
        failed = {(e.step_key, e.attempt) for e in events if e.event == "failed"}
        kept = [e for e in effect_lines if (e["step_key"], e["attempt"]) not in failed]
        # Cells write the effects; branches inside them (rb.map/rb.task) are checked by their own suite.
        cells = [e for e in events if e.step_key is None or is_cell_path(split_step_key(e.step_key)[0])]
        check_effects_once(kept, cells)
    return events


def wait_until(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until true (a bound against hangs, never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
