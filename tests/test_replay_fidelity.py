"""A resume looks exactly like the first run (issue 25), checked against nbclient's own output.

One notebook holds each thing the issue names - interleaved streams, a figure
before the result, ``clear_output(wait=True)`` (in a loop and left pending at
the end), ``display_id`` updates from a later cell, an ``ipywidgets.Output``
capture, ``interact``, a plain widget as a result - and is run three times in
one test: by nbclient, by ``nbrunbook run`` and by ``nbrunbook run`` again on
the same instance (every cell skipped and replayed). The three output
notebooks must agree output for output, widget state included, apart from
nbrunbook's status outputs, which must be there (once, first, plain text) on
the resume only. The kernel tests check what a frontend sees over the wire:
replayed widget models get fresh comm ids, an Output widget captures the
current request, and the status - restored values and the ones that could not
be - is said once, never in the cell's streams.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

from helpers.kernels import TIMEOUT, Kernel, Kernels, kernels_fixture, start_code  # noqa: F401
from helpers.runbooks import cli, read_output, write_notebook
from nbrunbook.kernel_ext.replay import STATUS_MIME

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_UUID = re.compile(r"[0-9a-f]{32}|0x[0-9a-f]{6,}")

CELLS: list[tuple[str, str, list[str]]] = [
    ("imports", "import sys\nimport ipywidgets as w\nfrom IPython.display import HTML, SVG, clear_output, display", []),
    (
        "streams",
        "print('out 1')\nprint('err 1', file=sys.stderr)\nsys.stdout.flush()\nsys.stderr.flush()\n"
        "print('out 2')\nsys.stderr.write('err 2\\n')\nsys.stderr.flush()\nprint('out 3')\ntotal = 6\ntotal",
        [],
    ),
    (
        "figure",
        'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\'))\n'
        "print('after the figure')\ntotal * 7",
        [],
    ),
    # matplotlib's inline backend shows the figure after the result (a post_execute hook).
    ("plot", "import matplotlib.pyplot as plt\nplt.plot([1, 2, 4])", []),
    ("progress", "for i in range(4):\n    clear_output(wait=True)\n    print('step', i)\ndone_steps = i + 1", []),
    ("pending", "print('kept: a wait=True clear with nothing after it clears nothing')\nclear_output(wait=True)", []),
    ("cleared", "print('gone')\nclear_output()\nprint('shown after the clear')", []),
    ("handle", "h = display(HTML('<b>one</b>'), display_id=True)\nprint('displayed')", []),
    ("update", "h.update(HTML('<b>two</b>'))\nprint('updated')", []),
    (
        "capture",
        "out = w.Output()\ndisplay(out)\nwith out:\n    print('inside the widget')\n    display(HTML('<i>in</i>'))\n"
        "print('outside the widget')",
        [],
    ),
    ("slider", "slider = w.IntSlider(value=5, description='n')\nslider", []),
    ("interact", "shown = w.interact(lambda n: print('n is', n), n=(0, 10))\n'interacted'", []),
    ("later", "print(total, done_steps)", []),
]


def _normal(value: Any) -> Any:
    """Widget model ids are uuids chosen anew by each kernel: compare their shape, not their value."""
    return json.loads(_UUID.sub("ID", json.dumps(value, sort_keys=True)))


def _outputs(nb: Any) -> dict[str, list[Any]]:
    """Each cell's outputs without nbrunbook's status outputs and what must differ between runs."""
    cells: dict[str, list[Any]] = {}
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            if STATUS_MIME in out.get("data", {}):
                continue
            out = {k: v for k, v in out.items() if k not in ("execution_count", "transient")}
            kept.append(_normal(out))
        cells[cell.id] = kept
    return cells


def _widgets(nb: Any) -> list[Any]:
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    models = [_normal({"name": m["model_name"], "state": m["state"]}) for m in state.values()]
    return sorted(models, key=lambda m: json.dumps(m, sort_keys=True))


def _statuses(cell: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(i, o["data"]) for i, o in enumerate(cell.get("outputs", [])) if STATUS_MIME in o.get("data", {})]


def test_a_resume_shows_what_nbclient_shows_output_for_output(tmp_path: Path, matplotlib_ready: None) -> None:
    source = write_notebook(tmp_path / "fidelity.ipynb", CELLS)
    reference = nbformat.read(str(source), as_version=4)
    NotebookClient(reference, timeout=int(TIMEOUT), kernel_name="python3", store_widget_state=True).execute(
        cwd=str(tmp_path)
    )
    store = tmp_path / "store.duckdb"
    runs = []
    for n in (1, 2):
        out = tmp_path / f"run{n}.ipynb"
        run = cli("run", str(source), "-i", "fid-1", "--store", str(store), "-o", str(out), "--no-progress")
        assert run.code == 0, run.stderr
        runs.append(read_output(out))
    first, resumed = runs

    expected = _outputs(reference)
    assert expected["streams"][0]["text"] == "out 1\n"  # the case is real: nbclient shows interleaved chunks
    assert [o["output_type"] for o in expected["progress"]] == ["stream"] and "step 3" in str(expected["progress"])
    assert "kept" in str(expected["pending"]) and "gone" not in str(expected["cleared"])
    assert "<b>two</b>" in str(expected["handle"])  # updated by the later cell
    assert [o["output_type"] for o in expected["plot"]] == ["execute_result", "display_data"]
    for nb in (first, resumed):
        assert _outputs(nb) == expected
        assert _widgets(nb) == _widgets(reference) != []

    guarded = [cid for cid, _, _ in CELLS if cid != "imports"]
    for cell in first.cells:
        assert not _statuses(cell), cell.id  # a first run shows no status
    for cell in resumed.cells:
        if cell.id not in guarded:
            continue
        assert cell.metadata["nbrunbook"]["run"] == "skipped", cell.id
        (where, status), *more = _statuses(cell)
        assert not more and where == 0, (cell.id, cell.outputs)  # said once, as the first output
        line = status["text/plain"]
        assert "already done in run" in line and status[STATUS_MIME]["status"] == "done"
        # Plain text that reads right without an emoji font.
        assert not any(0x2300 <= ord(ch) <= 0x2BFF or ord(ch) >= 0x1F000 for ch in line), line
        for out in cell.outputs:
            assert "already done" not in out.get("text", ""), cell.id  # nothing in the cell's streams
    by_id = {c.id: c for c in resumed.cells}
    assert by_id["streams"].metadata["nbrunbook"]["run"] == "skipped"
    restored = _statuses(by_id["streams"])[0][1][STATUS_MIME]["restored"]
    assert restored == ["total"]


def _raw(kernel: Kernel, code: str, cell_id: str) -> tuple[str, list[dict[str, Any]]]:
    """Send one cell; its msg_id and every IOPub message it caused, as the frontend receives them."""
    msg_id = kernel.send(code, cell_id=cell_id)
    messages = []
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
        messages.append(msg)
    while kernel.kc.get_shell_msg(timeout=TIMEOUT)["parent_header"].get("msg_id") != msg_id:
        pass
    return msg_id, messages


def test_replayed_widgets_get_fresh_ids_and_capture_the_current_request(kernels: Kernels, tmp_path: Path) -> None:
    """Run All twice in one kernel: the second pass replays, and must not reopen the live models' ids."""
    source = write_notebook(tmp_path / "w.ipynb", [c for c in CELLS if c[0] in ("imports", "capture", "slider")])
    k = kernels.start()
    k.execute(start_code(source, tmp_path / "store.duckdb", "w-1")).ok()
    passes = []
    for _ in range(2):
        seen = {}
        for cid, code, _tags in CELLS:
            if cid in ("imports", "capture", "slider"):
                seen[cid] = _raw(k, code, cid)
        passes.append(seen)
    first, second = passes

    def opened(messages: list[dict[str, Any]]) -> list[str]:
        return [m["content"]["comm_id"] for m in messages if m["msg_type"] == "comm_open"]

    for cid in ("capture", "slider"):
        live, replayed = opened(first[cid][1]), opened(second[cid][1])
        assert len(live) == len(replayed) > 0 and not set(live) & set(replayed), cid
        # The view shown names the replayed model, not the live one.
        views = [
            m["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
            for m in second[cid][1]
            if m["msg_type"] in ("display_data", "execute_result")
            and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
        ]
        assert views and set(views) <= set(replayed), cid
    msg_id, messages = second["capture"]
    captures = [
        m["content"]["data"]["state"]["msg_id"]
        for m in messages
        if m["msg_type"] == "comm_msg" and "msg_id" in m["content"]["data"].get("state", {})
    ]
    assert captures == [msg_id, ""]  # captured this request's output, then stopped: as on the first run
    statuses = [m for m in messages if m["msg_type"] == "display_data" and STATUS_MIME in m["content"]["data"]]
    shown = [m for m in messages if m["msg_type"] not in ("status", "execute_input")]
    assert len(statuses) == 1 and shown.index(statuses[0]) == 0


def test_what_a_skip_restores_and_what_it_cannot_is_said_once_in_its_status(kernels: Kernels, tmp_path: Path) -> None:
    code = "handle = open('v.ipynb')\nkept = [1, 2]\nprint('opened')"
    source = write_notebook(tmp_path / "v.ipynb", [("open", code, [])])
    k = kernels.start()
    k.execute(start_code(source, tmp_path / "store.duckdb", "v-1")).ok()
    first = k.execute(code, cell_id="open").ok()
    assert first.stdout == "opened\n" and not first.statuses
    k.restart()
    k.execute(start_code(source, tmp_path / "store.duckdb", "v-1")).ok()
    again = k.execute(code, cell_id="open").ok()
    (status,) = again.statuses
    info = status[STATUS_MIME]
    assert info["restored"] == ["kept"] and list(info["not_restored"]) == ["handle"] and not info["notes"], info
    line = status["text/plain"]
    assert line.startswith("nbrunbook: ") and "restored kept" in line and "not restored: handle" in line, line
    assert "runbook: always" in line  # how to get an open resource back
    assert again.stdout == "opened\n" and again.stderr == ""  # the cell's own streams, nothing of ours
    assert k.value("kept") == [1, 2]
