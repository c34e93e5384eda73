"""Run the example runbooks with nbval: plain ``pytest`` and ``pytest --nbval-lax notebooks/`` alike.

Three things make nbval fit a runbook notebook:

* **Collection.** nbval collects ``*.ipynb`` only when ``--nbval``/``--nbval-lax``
  is given, and then everywhere (``tests/files/*.ipynb``, ``widgets/dashboard.ipynb``
  included). So without those flags, :func:`pytest_collect_file` below collects
  the notebooks of this directory alone, in lax mode (outputs are not compared:
  they hold times, run ids and random secrets). With a flag, nbval's own hook
  collects them and this one steps aside.
* **The execute request.** nbval sends each cell with ``store_history=False``,
  which the cell guard deliberately ignores (it is how tools run code behind
  the user's back), so every cell would run unguarded. Before each cell,
  :func:`pytest_runtest_call` makes the kernel client send what JupyterLab
  sends: ``store_history=True`` and the cell's ``cellId`` and tags in the
  request metadata.
* **Isolation.** One fresh store and one work directory per test session:
  ``$NBRUNBOOK_STORE`` and ``$NBRUNBOOK_EXAMPLES_WORKDIR`` (which the notebooks'
  ``workdir`` parameter defaults to), inherited by the kernels nbval starts;
  store servers run from a private runtime directory and are stopped at the
  end. The release example needs a person's approval: here the session
  approves it up front (its headless test shows the refusal and the resume).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from nbval.plugin import IPyNbCell, IPyNbFile

from nbrunbook.engine.launch import stop_all

HERE = Path(__file__).resolve().parent
#: Approval the release example waits for (see release.ipynb, "Approval gate").
RELEASE_APPROVAL = Path("release", "approvals", "release-2.3.0.txt")

collect_ignore_glob = ["_work*"]  # what interactive runs leave behind

_session: dict[str, str] = {}
#: A runtime directory the session inherited (the user's own): never ours to stop servers in.
_INHERITED_RUNTIME = os.environ.get("NBRUNBOOK_RUNTIME_DIR")


def pytest_configure(config: pytest.Config) -> None:
    base = tempfile.mkdtemp(prefix="nbrb-examples-")
    _session["base"] = base
    os.environ["NBRUNBOOK_STORE"] = os.path.join(base, "store", "store.duckdb")
    os.environ["NBRUNBOOK_EXAMPLES_WORKDIR"] = os.path.join(base, "work")
    if os.environ.get("NBRUNBOOK_RUNTIME_DIR") == _INHERITED_RUNTIME:
        # unless tests/conftest.py has set its own already (the whole suite runs), use a private one
        runtime = os.path.join(base, "run")
        os.makedirs(runtime, mode=0o700)
        os.environ["NBRUNBOOK_RUNTIME_DIR"] = runtime
    approval = Path(base, "work") / RELEASE_APPROVAL
    approval.parent.mkdir(parents=True)
    approval.write_text("nbval (the test session approves the example release)\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    base = _session.pop("base", "")
    if not base:
        return
    for directory in {os.path.join(base, "run"), os.environ.get("NBRUNBOOK_RUNTIME_DIR", "")}:
        if directory and directory != _INHERITED_RUNTIME:
            stop_all(directory)  # no store server may outlive the session
    shutil.rmtree(base, ignore_errors=True)


class LaxNotebook(IPyNbFile):
    """nbval's notebook collector in ``--nbval-lax`` mode, without the global flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compare_outputs = False


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    option = parent.config.option
    if option.nbval or option.nbval_lax:
        return None  # nbval's own hook collects it
    if file_path.suffix == ".ipynb" and file_path.parent == HERE:
        collector: pytest.Collector = LaxNotebook.from_parent(parent, path=file_path)
        return collector
    return None


def _execute_like_jupyterlab(kernel: Any, cell: Any, code: str, allow_stdin: bool | None = None) -> str:
    """nbval's ``execute_cell_input``, sending the request JupyterLab sends for ``cell``."""
    content = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": False,
    }
    metadata = {"cellId": cell.get("id"), "tags": list(cell.get("metadata", {}).get("tags", []))}
    msg = kernel.kc.session.msg("execute_request", content, metadata=metadata)
    kernel.kc.shell_channel.send(msg)
    return str(msg["header"]["msg_id"])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    if isinstance(item, IPyNbCell):
        cell: Any = item  # nbval is untyped
        kernel = getattr(cell.parent, "kernel", None)  # started when the notebook's first cell is set up
        if kernel is not None:
            kernel.execute_cell_input = functools.partial(_execute_like_jupyterlab, kernel, cell.cell)
    return (yield)
