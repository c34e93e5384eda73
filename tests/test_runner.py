"""``nbrunbook run``: resume, exit codes, parameters, output notebooks (real kernels, CLI subprocesses).

Oracles: an effects file written by the cells (one JSON line per side effect
with its step key and idempotency key) and the journal/cursor invariants.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers.oracle import check_effects_once, check_store, read_effects
from helpers.runbooks import cli, digest, effect_cell, read_output, standard, start_cli, write_notebook
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import idempotency_key
from nbrunbook.kernel_ext.replay import STATUS_MIME


@pytest.fixture
def rb(tmp_path: Path) -> dict[str, Path]:
    effects = tmp_path / "effects.jsonl"
    nb = standard(tmp_path / "release.ipynb", effects)
    return {"nb": nb, "effects": effects, "store": tmp_path / "store.duckdb", "dir": tmp_path}


def _events(store: Path, instance: str) -> list:
    s = open_store(store)
    try:
        return check_store(s, instance)
    finally:
        s.close()


def test_fail_then_resume(rb: dict[str, Path]) -> None:
    before = digest(rb["nb"])
    (rb["dir"] / "fail.flag").touch()
    out = rb["dir"] / "out.ipynb"
    first = cli("run", str(rb["nb"]), "-i", "rel-1", "--store", str(rb["store"]), "-o", str(out), "--no-progress")
    assert first.code == 1, first.stderr
    assert any("flag set" in line for line in first.lines)
    partial = read_output(out)  # written on failure, partial outputs kept
    assert "first ran hello" in "".join(o.get("text", "") for o in partial.cells[2].outputs)
    assert partial.cells[3].metadata["nbrunbook"]["status"] == "failed"
    assert partial.cells[3].outputs[-1].output_type == "error"
    assert "nbrunbook" not in partial.cells[4].metadata or partial.cells[4].metadata["nbrunbook"].get("run") is None

    (rb["dir"] / "fail.flag").unlink()
    second = cli("run", str(rb["nb"]), "-i", "rel-1", "--store", str(rb["store"]), "-o", str(out), "--no-progress")
    assert second.code == 0, second.stderr
    final = read_output(out)
    meta = [c.metadata["nbrunbook"] for c in final.cells]
    assert [m["run"] for m in meta] == ["always", "always", "skipped", "ran", "ran"]
    assert [m.get("status") for m in meta[2:]] == ["done", "done", "done"]
    status, *replayed = final.cells[2].outputs
    assert "already done" in status.data["text/plain"] and STATUS_MIME in status.data  # its own output
    assert "".join(o.get("text", "") for o in replayed) == "first ran hello\n"  # outputs replayed
    assert "third sees 42 1" in "".join(o.get("text", "") for o in final.cells[4].outputs)  # value restored
    assert digest(rb["nb"]) == before  # the user's notebook is never modified

    effects = read_effects(rb["effects"])
    events = _events(rb["store"], "rel-1")
    second_cell = [e for e in effects if e["step_key"] == "cell/second@1"]
    assert [e["attempt"] for e in second_cell] == [1, 2]
    assert len({e["key"] for e in second_cell}) == 1  # same idempotency key across attempts
    others = [e for e in effects if e["step_key"] != "cell/second@1"]
    check_effects_once(others, [e for e in events if e.step_key != "cell/second@1"])
    assert sorted({e["step_key"] for e in effects}) == ["cell/first@1", "cell/second@1", "cell/third@1"]


def test_kill9_kernel_then_resolve(tmp_path: Path) -> None:
    effects = tmp_path / "effects.jsonl"
    pidfile = tmp_path / "kernel.pid"
    nb = write_notebook(
        tmp_path / "long.ipynb",
        [
            ("imports", f"import json, os, time\nEFFECTS = {str(effects)!r}", []),
            ("quick", effect_cell(), []),
            ("slow", effect_cell(f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n"), []),
            ("after", effect_cell(), []),
        ],
    )
    store = tmp_path / "store.duckdb"
    proc = start_cli("run", str(nb), "-i", "long-1", "--store", str(store), "--no-progress")
    deadline = time.monotonic() + 300
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the slow cell never started"
        time.sleep(0.2)
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err

    resumed = cli("run", str(nb), "-i", "long-1", "--store", str(store), "--no-progress")
    assert resumed.code == 5, resumed.stderr
    assert f"nbrunbook resolve long-1 slow --rerun|--done|--skip --store {store}" in resumed.stderr
    pidfile.write_text("")
    nb.write_text(nb.read_text().replace("time.sleep(600)", "pass"))
    again = cli(
        "run",
        str(nb),
        "-i",
        "long-1",
        "--store",
        str(store),
        "--no-progress",
        "--rerun-interrupted",
        "--on-changed",
        "rerun",
    )
    assert again.code == 0, again.stderr
    events = _events(store, "long-1")
    slow = [e for e in events if e.step_key and e.step_key.startswith("cell/slow")]
    names = [e.event for e in slow]
    assert names[:3] == ["claimed", "interrupted", "claimed"]
    assert slow[1].payload["reason"].startswith("connection lost")  # at once, not after the lease
    assert slow[2].attempt == 2
    effects_seen = read_effects(effects)
    assert [e["step_key"] for e in effects_seen].count("cell/quick@1") == 1
    assert [e["step_key"] for e in effects_seen].count("cell/after@1") == 1


def test_two_concurrent_runs_of_one_instance(rb: dict[str, Path]) -> None:
    procs = [
        start_cli(
            "run",
            str(rb["nb"]),
            "-i",
            "same",
            "--store",
            str(rb["store"]),
            "--no-progress",
            "-o",
            str(rb["dir"] / f"out{n}.ipynb"),
        )
        for n in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    effects = read_effects(rb["effects"])
    assert len(effects) == 3
    check_effects_once(effects, _events(rb["store"], "same"))


def test_ten_instances_of_one_notebook_at_once(rb: dict[str, Path]) -> None:
    procs = [
        start_cli(
            "run", str(rb["nb"]), "-i", f"inst-{n}", "--store", str(rb["store"]), "--no-progress", "-p", "count", str(n)
        )
        for n in range(10)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, [r[1][-1500:] for r in results if r]
    effects = read_effects(rb["effects"])
    assert len(effects) == 30 and len({e["key"] for e in effects}) == 30
    for n in range(10):
        events = _events(rb["store"], f"inst-{n}")
        mine = [e for e in effects if e["key"] == idempotency_key(f"inst-{n}", e["step_key"])]
        assert len(mine) == 3
        check_effects_once(mine, events)
        assert events[0].payload["params"] == {"count": n}


def test_parameters_like_papermill(rb: dict[str, Path]) -> None:
    yaml_file = rb["dir"] / "p.yaml"
    yaml_file.write_text("greeting: from-file\nextra: [1, 2]\n")
    out = rb["dir"] / "p.ipynb"
    run = cli(
        "run",
        str(rb["nb"]),
        "-i",
        "p1",
        "--store",
        str(rb["store"]),
        "-f",
        str(yaml_file),
        "-p",
        "count",
        "7",
        "-y",
        "ratio: 0.5",
        "-r",
        "label",
        "007",
        "-o",
        str(out),
        "--no-progress",
    )
    assert run.code == 0, run.stderr
    nb = read_output(out)
    injected = nb.cells[2]
    assert injected.metadata.tags == ["injected-parameters"] and nb.cells[1].metadata.tags == ["parameters"]
    ns: dict = {}
    exec(injected.source, ns)
    assert (ns["count"], ns["greeting"], ns["extra"], ns["ratio"], ns["label"]) == (7, "from-file", [1, 2], 0.5, "007")
    assert "third sees 42 7" in "".join(o.get("text", "") for o in nb.cells[5].outputs)
    # A resume without -p keeps the instance's parameters; other values are refused (exit 2).
    again = cli("run", str(rb["nb"]), "-i", "p1", "--store", str(rb["store"]), "-o", str(out), "--no-progress")
    assert again.code == 0, again.stderr
    assert "count = 7" in read_output(out).cells[2].source
    refused = cli("run", str(rb["nb"]), "-i", "p1", "--store", str(rb["store"]), "-p", "count", "8", "--no-progress")
    assert refused.code == 2 and "parameters of an instance are fixed" in refused.stderr
    assert len(read_effects(rb["effects"])) == 3  # nothing ran again


def test_parameters_without_a_parameters_cell(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "np.ipynb", [("show", "print('x is', x)", [])])
    out = tmp_path / "o.ipynb"
    run = cli(
        "run",
        str(nb),
        "-i",
        "np1",
        "--store",
        str(tmp_path / "s.duckdb"),
        "-p",
        "x",
        "True",
        "-o",
        str(out),
        "--no-progress",
    )
    assert run.code == 0, run.stderr
    result = read_output(out)
    assert result.cells[0].metadata.tags == ["injected-parameters"]  # injected first
    assert "x is True" in "".join(o.get("text", "") for o in result.cells[1].outputs)


def test_nbformat_44_notebook_runs_with_derived_ids_then_upgrade(tmp_path: Path) -> None:
    effects = tmp_path / "e.jsonl"
    nb = write_notebook(
        tmp_path / "old.ipynb",
        [("a", f"import json\nEFFECTS = {str(effects)!r}", []), ("b", effect_cell(), [])],
        v44=True,
    )
    store = str(tmp_path / "s.duckdb")
    first = cli("run", str(nb), "-i", "o1", "--store", store, "--no-progress")
    assert first.code == 0 and "no cell ids (nbformat 4.4)" in first.stderr and "nbrunbook upgrade" in first.stderr
    assert cli("upgrade", str(nb)).code == 0
    assert json.loads(nb.read_text())["nbformat_minor"] == 5
    second = cli("run", str(nb), "-i", "o1", "--store", store, "--no-progress")
    assert second.code == 0 and "no cell ids" not in second.stderr
    assert len(read_effects(effects)) == 1  # same ids after the upgrade: skipped, not re-run


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, ["missing.ipynb"], "no such file"),
        ("text", ["bad.ipynb"], "not valid JSON"),
        ("list", ["bad.ipynb"], "not a Jupyter notebook"),
        ("nb", ["good.ipynb", "--kernel", "no-such-kernel"], "kernel 'no-such-kernel' is not installed"),
        ("nb", ["good.ipynb", "-i", "bad/id;drop"], "invalid instance id"),
        ("nb", ["good.ipynb", "-p", "1x", "2"], "not a valid Python name"),
        ("dup", ["dup.ipynb"], "duplicate cell ids in the notebook: a"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, make: str | None, args: list[str], message: str) -> None:
    if make == "text":
        (tmp_path / "bad.ipynb").write_text("{ not json")
    elif make == "list":
        (tmp_path / "bad.ipynb").write_text("[1, 2]")
    elif make == "nb":
        write_notebook(tmp_path / "good.ipynb", [("a", "print(1)", [])])
    elif make == "dup":
        write_notebook(tmp_path / "dup.ipynb", [("a", "print(1)", []), ("a", "print(2)", [])])
    store = tmp_path / "store" / "s.duckdb"
    run = cli("run", *args, "--store", str(store), "--no-progress", cwd=tmp_path)
    assert run.code == 2, run.stderr
    errors = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert not store.parent.exists()  # nothing written to the store
    assert not (tmp_path / ".nbrunbook").exists()


def test_jupyter_runbook_entry_point(tmp_path: Path) -> None:
    import shutil
    import subprocess

    exe = shutil.which("jupyter-runbook")
    assert exe, "the jupyter-runbook entry point is not installed"
    out = subprocess.run(["jupyter", "runbook", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout and "resolve" in out.stdout


def test_nbconvert_execute_with_the_runbook_preprocessor(rb: dict[str, Path]) -> None:
    import subprocess
    import sys

    def convert() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "jupyter",
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                "--NotebookExporter.default_preprocessors=nbrunbook.engine.nbconvert.RunbookPreprocessor",
                "--RunbookPreprocessor.instance=nbc-1",
                f"--RunbookPreprocessor.store={rb['store']}",
                str(rb["nb"]),
                "--output",
                "converted.ipynb",
            ],
            capture_output=True,
            text=True,
            cwd=rb["dir"],
        )

    (rb["dir"] / "fail.flag").touch()
    failed = convert()
    assert failed.returncode != 0 and "flag set" in failed.stderr
    (rb["dir"] / "fail.flag").unlink()
    ok = convert()
    assert ok.returncode == 0, ok.stderr
    nb = read_output(rb["dir"] / "converted.ipynb")
    assert [c.metadata["nbrunbook"]["run"] for c in nb.cells[2:]] == ["skipped", "ran", "ran"]
    effects = read_effects(rb["effects"])
    assert [e["attempt"] for e in effects if e["step_key"] == "cell/second@1"] == [1, 2]
    assert [e["step_key"] for e in effects].count("cell/first@1") == 1


def test_the_kernel_listens_on_private_unix_sockets_not_tcp(tmp_path: Path) -> None:
    """A headless run's kernel uses IPC in the private runtime directory: no port for other users to read."""
    from nbrunbook.engine.protocol import runtime_dir

    seen = tmp_path / "connection.json"
    nb = write_notebook(
        tmp_path / "ipc.ipynb",
        [
            (
                "look",
                "from ipykernel.connect import get_connection_info\n"
                f"open({str(seen)!r}, 'w').write(get_connection_info())",
                [],
            )
        ],
    )
    run = cli("run", str(nb), "-i", "ipc-1", "--store", str(tmp_path / "s.duckdb"), "--no-progress", cwd=tmp_path)
    assert run.code == 0, run.stderr
    info = json.loads(seen.read_text())
    directory = runtime_dir()
    assert info["transport"] == "ipc" and info["ip"].startswith(directory + os.sep), info
    assert "running over TCP" not in run.stderr
    prefix = os.path.basename(info["ip"])
    assert not [n for n in os.listdir(directory) if n.startswith(prefix)], "the kernel's sockets were left behind"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("kernel-")], "sockets were made in the working dir"


def _processes_with(marker: str) -> dict[int, str]:
    """Live processes whose environment holds ``marker`` (a run's kernel inherits it): pid -> command line."""
    found = {}
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read():
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                found[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def test_a_notebook_refused_by_its_schema_leaves_no_kernel_behind(tmp_path: Path) -> None:
    """The kernel starts while nbformat validates the notebook; when validation refuses it, the kernel goes too."""
    corpus = Path(__file__).parent / "corpus" / "bad-cell-id.ipynb"
    data = json.loads(corpus.read_text())
    # Valid JSON with valid ids (a bad id is refused before the kernel starts) that nbformat cannot
    # read (nbclient runs most schema violations with a warning, and so does nbrunbook: not this one).
    data["cells"][0].update(id="cell-1")
    data["nbformat_minor"] = "five"
    nb = tmp_path / "bad-schema.ipynb"
    nb.write_text(json.dumps(data))
    marker = f"early-{os.getpid()}-{time.monotonic_ns()}"
    temp = tmp_path / "tmp"  # where jupyter_client writes the kernel's connection file
    private = tmp_path / "private-runtime"  # where its IPC sockets go
    temp.mkdir()
    env = {"NBRB_TEST_MARK": marker, "TMPDIR": str(temp), "NBRUNBOOK_RUNTIME_DIR": str(private)}
    store = tmp_path / "store" / "s.duckdb"
    proc = start_cli("run", str(nb), "-i", "early-1", "--store", str(store), "--no-progress", cwd=tmp_path, env=env)
    kernels_seen: set[int] = set()
    while proc.poll() is None:
        kernels_seen |= {pid for pid, cmd in _processes_with(marker).items() if "ipykernel" in cmd}
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbrunbook: error: ") and "is not a valid notebook" in lines[0]
    assert kernels_seen, "no kernel was started before the refusal: the test did not exercise the early start"
    # ... and it was stopped: no process, no connection file, no socket left; the store never touched.
    assert _processes_with(marker) == {}
    assert list(temp.iterdir()) == [], "the kernel's connection file was left behind"
    assert not [p.name for p in private.iterdir() if p.name.startswith("kernel-")], "its sockets were left behind"
    assert not store.parent.exists()
