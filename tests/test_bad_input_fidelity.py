"""Bad input and faults found by trying to break ``nbrunbook run`` (issue 24 E), on real subprocesses.

Every bad input must end in one clear line, the documented exit code, and
no change anywhere: the notebook, the store (absent stays absent, present
stays byte-identical), the output notebook of an earlier run, and no stray
temp file. The oracle for "nothing ran twice" is the effects file the cells
append to.

Faults are real: a second run waiting on the first one's claim (released
from inside the waiting kernel once it is in the store's wait), a disk that
fills up during the run (a tmpfs mounted for the test), a kernel that
writes to its process's stderr, the runtime directories after every kind
of ending. The last test drives a real kernel the way JupyterLab does (the
start cell run again, skipped cells with values that cannot be saved).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from helpers.kernels import Kernels, kernels_fixture, start_code  # noqa: F401 - fixtures
from helpers.runbooks import cli, effect_cell, read_output, start_cli, write_notebook
from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.launch import stop_all
from nbrunbook.engine.params import MAX_DEPTH, MAX_VALUES
from nbrunbook.engine.schema import CURRENT_VERSION


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (directories as such)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nbrunbook: error: "), stderr
    return lines[0]


def _simple(tmp: Path) -> Path:
    effects = tmp / "effects.jsonl"
    return write_notebook(
        tmp / "rb.ipynb",
        [
            ("setup", f"import json\nEFFECTS = {str(effects)!r}", []),
            ("params", "x = 1", ["parameters"]),
            ("work", effect_cell("print('x is', x)\n"), []),
        ],
    )


# ------------------------------------------------------------------ parameters

BILLION_LAUGHS = "\n".join(
    [f"a: &a [{', '.join(['lol'] * 9)}]"]
    + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
)

BAD_PARAMETERS = {
    # name: (how the parameter is given, the message expected)
    "deep-json-file": ("file", '{"x": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested more than"),
    "deep-yaml-file": ("file", "x: " + "[" * 3_000 + "]" * 3_000, "nested more than"),
    "just-too-deep": ("yaml", "x: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"more than {MAX_DEPTH} levels"),
    "alias-bomb": ("file", BILLION_LAUGHS, f"expands to more than {MAX_VALUES:,} values"),
    "alias-cycle": ("file", "x: &x [*x]", "parameter x: "),
    "surrogate-escape-in-yaml": ("file", 'x: "\\ud800"', "parameter x: not valid Unicode text (lone surrogate"),
    "surrogate-key-in-yaml": ("file", '"\\udcff": 1', "not valid Unicode text (lone surrogate '\\udcff'"),
    "surrogate-from-argv": ("p", "x \udcff", "parameter x: not valid Unicode text (lone surrogate '\\udcff'"),
    "surrogate-raw-from-argv": ("r", "x a\udcffb", "lone surrogate '\\udcff' at position 1"),
    "file-not-utf8": ("bytes", b"x: \xff\xfe\n", "the parameters file is not UTF-8 text (byte 3)"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMETERS))
def test_bad_parameters_are_one_line_exit_2_and_nothing_written(tmp_path: Path, case: str) -> None:
    how, given, message = BAD_PARAMETERS[case]
    nb = _simple(tmp_path)
    args: list[str]
    if how in ("file", "bytes"):
        pfile = tmp_path / "params.yaml"
        if isinstance(given, bytes):
            pfile.write_bytes(given)
        else:
            pfile.write_text(given, encoding="utf-8")
        args = ["-f", str(pfile)]
    elif how == "yaml":
        args = ["-y", str(given)]
    else:
        name, value = str(given).split(" ", 1)
        args = [f"-{how}", name, value]
    before = _tree(tmp_path)
    # argv carries the surrogateescape'd byte as the byte itself, as a shell passes $'\xff'.
    run = cli("run", str(nb), "-i", "p1", *args, "--no-progress", cwd=tmp_path, timeout=120)
    assert run.code == 2, run.stderr
    assert message in _one_error_line(run.stderr), run.stderr
    assert _tree(tmp_path) == before  # no store (not even its directory), no output, no temp file


# ------------------------------------------------------- a refused run writes nothing


def test_a_run_refused_for_its_parameters_leaves_the_earlier_output_as_it_was(tmp_path: Path) -> None:
    nb = _simple(tmp_path)
    store = tmp_path / "store" / "store.duckdb"
    out = tmp_path / "store" / "out" / "rb" / "fixed.ipynb"
    first = cli("run", str(nb), "-i", "fixed", "-p", "x", "7", "--store", str(store), "--no-progress", cwd=tmp_path)
    assert first.code == 0, first.stderr
    assert out.exists()
    before = _tree(tmp_path)
    mtime = out.stat().st_mtime_ns
    refused = cli("run", str(nb), "-i", "fixed", "-p", "x", "8", "--store", str(store), "--no-progress", cwd=tmp_path)
    assert refused.code == 2, refused.stderr
    line = _one_error_line(refused.stderr)
    assert "ParamsMismatch" in line and "(differing: x); parameters of an instance are fixed" in line
    assert out.stat().st_mtime_ns == mtime
    assert _tree(tmp_path) == before  # the store too: a refusal adds no journal row
    assert "x is 7" in "".join(o.get("text", "") for o in read_output(out).cells[3].outputs)
    assert len((tmp_path / "effects.jsonl").read_text().splitlines()) == 1


# ------------------------------------------------- waited for another run, then skipped

# In the second run only (NBRUNBOOK_TEST_RELEASE set), a thread watches the kernel's main
# thread and releases the first run's held cell once this kernel is inside the store's
# wait for it: no sleeps, the wait is certain to have happened.
WATCHER = """
import os, sys, threading, time
def _release_when_waiting(path):
    main = threading.main_thread().ident
    while True:
        frame = sys._current_frames().get(main)
        while frame is not None:
            code = frame.f_code
            if code.co_name == 'wait' and os.sep + 'engine' + os.sep in code.co_filename:
                open(path, 'w').close()
                return
            frame = frame.f_back
        time.sleep(0.01)
if os.environ.get('NBRUNBOOK_TEST_RELEASE'):
    threading.Thread(target=_release_when_waiting, args=(os.environ['NBRUNBOOK_TEST_RELEASE'],), daemon=True).start()
"""


def test_a_run_that_waited_for_another_owner_then_skipped_says_skipped(tmp_path: Path) -> None:
    effects = tmp_path / "effects.jsonl"
    release = tmp_path / "release"
    nb = write_notebook(
        tmp_path / "wait.ipynb",
        [
            ("setup", f"#| runbook: always\nimport json, os, time\nEFFECTS = {str(effects)!r}\n{WATCHER}", []),
            (
                "held",
                effect_cell(
                    # Bounded, so that a broken watcher fails the test instead of hanging it.
                    f"for _ in range(15000):\n    if os.path.exists({str(release)!r}):\n        break\n"
                    "    time.sleep(0.02)\nelse:\n    raise TimeoutError('never released')\nprint('held done')\n"
                ),
                [],
            ),
            ("after", effect_cell("print('after ran')\n"), []),
        ],
    )
    store = tmp_path / "store.duckdb"
    out_a, out_b = tmp_path / "a.ipynb", tmp_path / "b.ipynb"
    common = ["-i", "w1", "--store", str(store), "--no-progress"]
    first = start_cli("run", str(nb), *common, "-o", str(out_a), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (effects.exists() and effects.read_text().count("\n") >= 1):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never started its held cell"
            time.sleep(0.05)
        second = cli(
            "run", str(nb), *common, "-o", str(out_b), cwd=tmp_path, env={"NBRUNBOOK_TEST_RELEASE": str(release)}
        )
        _, first_err = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, first_err
    assert second.code == 0, second.stderr
    assert "ran      " in next(ln for ln in first_err.splitlines() if "(held)" in ln)
    # The second run waited on "held" (its notice is in the cell), then found it done: skipped.
    held = read_output(out_b).cells[1]
    texts = [str(o.get("text", "")) for o in held.outputs]
    assert any("is running in" in t and "waiting up to" in t for t in texts), texts
    assert held.metadata["nbrunbook"]["run"] == "skipped", held.metadata
    # "after" is free for whichever run gets there first; "held" counts as skipped in the summary.
    assert "skipped 0 of" not in second.stderr, second.stderr
    assert "skipped  " in next(ln for ln in second.stderr.splitlines() if "(held)" in ln)
    keys = [json.loads(line)["step_key"] for line in effects.read_text().splitlines()]
    assert sorted(keys) == ["cell/after@1", "cell/held@1"]


# ------------------------------------------------- the runtime directory after any run

CORPUS_DIR = Path(__file__).parent / "corpus"


def _scenario(tmp: Path, kind: str) -> tuple[list[str], int]:
    """The run's arguments for one ending, and the exit code it must end with."""
    nb = _simple(tmp)
    store = tmp / "store" / "store.duckdb"
    args = [str(nb), "-i", "rt", "--store", f"embedded:{store}", "--no-progress"]
    if kind == "ok":
        return args, 0
    if kind == "failed":
        failing = write_notebook(tmp / "fail.ipynb", [("boom", "raise RuntimeError('boom')", [])])
        return [str(failing), *args[1:]], 1
    if kind == "kernel-died":
        dying = write_notebook(tmp / "die.ipynb", [("die", "import os\nos._exit(1)", [])])
        return [str(dying), *args[1:]], 1
    if kind == "ok-server":  # a plain path: the store server's socket stays (until it idles), no kernel file
        return [str(nb), "-i", "rt", "--store", str(store), "--no-progress"], 0
    if kind == "refused-params":
        assert cli("run", *args, "-p", "x", "1", cwd=tmp).code == 0
        return [*args, "-p", "x", "2"], 2
    if kind == "refused-store":
        store.parent.mkdir()
        store.write_bytes((CORPUS_DIR / "garbage-store.bin").read_bytes())
        return args, 4
    if kind == "invalid-notebook":  # refused by nbformat's schema after the kernel started
        return [str(CORPUS_DIR / "bad-cell-id.ipynb"), *args[1:]], 2
    assert kind == "bad-parameter"
    return [*args, "-y", "x: [1"], 2


@pytest.mark.parametrize(
    "kind",
    [
        "ok",
        "ok-server",
        "failed",
        "kernel-died",
        "refused-params",
        "refused-store",
        "invalid-notebook",
        "bad-parameter",
    ],
)
def test_no_connection_file_or_socket_is_left_in_the_runtime_dirs(tmp_path: Path, kind: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args, code = _scenario(work, kind)
    jupyter_rt, nbrunbook_rt, tmpdir = tmp_path / "jupyter-rt", tmp_path / "nbrunbook-rt", tmp_path / "tmp"
    for d in (jupyter_rt, nbrunbook_rt, tmpdir):
        d.mkdir()
    env = {"JUPYTER_RUNTIME_DIR": str(jupyter_rt), "NBRUNBOOK_RUNTIME_DIR": str(nbrunbook_rt), "TMPDIR": str(tmpdir)}
    run = cli("run", *args, cwd=work, env=env)
    assert run.code == code, run.stderr
    # Connection files (jupyter_client writes them to the runtime dir or TMPDIR) and the
    # kernel's IPC sockets (nbrunbook's runtime dir) all go with the kernel.
    assert os.listdir(jupyter_rt) == [] and os.listdir(tmpdir) == []
    left = os.listdir(nbrunbook_rt)
    if kind == "ok-server":
        stop_all(str(nbrunbook_rt))  # its lock and log files are the server's own (kept for the next one)
        left = [name for name in os.listdir(nbrunbook_rt) if name.startswith("kernel-") or name.endswith(".sock")]
    assert left == [], left


# ------------------------------------------------------------- the kernel's own stderr

# A python3 kernel that writes to its process's stderr as soon as it starts and while it
# exits, the way ipykernel's logger and ZMQ tracebacks do.
NOISY_KERNEL = (
    "import atexit, os, sys\n"
    "os.write(2, b'KERNEL-NOISE at start\\n')\n"
    # fd 9 stays the process's stderr after ipykernel captures fd 2 for cells: a cell can write there
    # the way a crashing library or the interpreter itself would.
    "os.dup2(2, 9, inheritable=True)\n"
    "atexit.register(lambda: os.write(2, b'KERNEL-NOISE at exit\\n'))\n"
    "from ipykernel import kernelapp\n"
    "kernelapp.launch_new_instance()\n"
)


def _noisy_kernel(tmp: Path) -> dict[str, str]:
    spec = tmp / "share" / "kernels" / "noisy"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-c", NOISY_KERNEL, "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "noisy", "language": "python"}))
    return {"JUPYTER_PATH": str(tmp / "share")}


@pytest.mark.parametrize("ending", ["ok", "failed", "refused-newer-store", "refused-params"])
def test_the_kernel_process_stderr_never_reaches_the_terminal(tmp_path: Path, ending: str) -> None:
    env = _noisy_kernel(tmp_path)
    nb = _simple(tmp_path)
    if ending == "failed":
        nb = write_notebook(tmp_path / "fail.ipynb", [("boom", "raise RuntimeError('boom')", [])])
    store = tmp_path / "store" / "store.duckdb"
    args = ["run", str(nb), "-i", "n1", "--kernel", "noisy", "--store", str(store), "--no-progress"]
    if ending == "refused-newer-store":
        EmbeddedStore(str(store)).close()
        con = duckdb.connect(str(store))
        con.execute("INSERT INTO schema_version VALUES (?, 0)", [CURRENT_VERSION + 1])
        con.close()
    if ending == "refused-params":
        assert cli(*args, "-p", "x", "1", cwd=tmp_path, env=env).code == 0
        args += ["-p", "x", "2"]
    run = cli(*args, cwd=tmp_path, env=env)
    assert run.code == {"ok": 0, "failed": 1, "refused-newer-store": 4, "refused-params": 2}[ending], run.stderr
    assert "KERNEL-NOISE" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    if ending.startswith("refused"):
        _one_error_line(run.stderr)


# ------------------------------------------------------------------- a full disk

# Fills the disk the store is on (64 KiB, then 4 KiB, then 1-byte writes until ENOSPC), then
# prints 256 KiB: the cell's outcome (its outputs are recorded) cannot fit in the store.
FILL = (
    "fd = os.open(FILLER, os.O_WRONLY | os.O_CREAT)\n"
    "for size in (65536, 4096, 1):\n"
    "    try:\n"
    "        while True:\n"
    "            os.write(fd, b'x' * size)\n"
    "    except OSError:\n"
    "        pass\n"
    "os.close(fd)\n"
    "print('y' * 262144)\n"
)


@contextlib.contextmanager
def _small_disk(where: Path, size: str = "8m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where`` (the CI machine runs the suite as root)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs (needs root): {mounted.stderr!r}"
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("kind", ["embedded", "server"])
def test_a_full_disk_is_the_store_unavailable_exit_4_saying_so(tmp_path: Path, kind: str) -> None:
    effects = tmp_path / "effects.jsonl"
    with _small_disk(tmp_path / "disk") as disk:
        filler, store = disk / "filler", disk / "store.duckdb"
        nb = write_notebook(
            tmp_path / "full.ipynb",
            [
                ("setup", f"import json, os\nEFFECTS = {str(effects)!r}\nFILLER = {str(filler)!r}", []),
                ("a", effect_cell("print('a ran')\n"), []),
                ("fill", effect_cell(FILL), []),
                ("b", effect_cell("print('b ran')\n"), []),
            ],
        )
        spec = f"{kind}:{store}"
        try:
            run = cli("run", str(nb), "-i", "full", "--store", spec, "--no-progress", cwd=tmp_path)
            assert run.code == 4, run.stderr
            errors = [ln for ln in run.stderr.splitlines() if "rror" in ln]
            assert errors and all("the disk is full" in ln for ln in errors), run.stderr
            assert "OrderViolation" not in run.stderr and "Traceback" not in run.stderr, run.stderr
            # The output notebook beside the store did not fit either: said, and no temp file left.
            assert "cannot write the output notebook" in run.stderr and "output not written" in run.stderr
            assert not [p for p in disk.rglob("*") if ".tmp-" in p.name]
            ran = [json.loads(line)["step_key"] for line in effects.read_text().splitlines()]
            assert ran == ["cell/a@1", "cell/fill@1"]  # b never started
            # Room again: the resume never repeats a step; fill's lost outcome is a decision (exit 5).
            filler.unlink()
            stop_all(os.environ["NBRUNBOOK_RUNTIME_DIR"])
            again = cli("run", str(nb), "-i", "full", "--store", spec, "--no-progress", cwd=tmp_path)
            assert again.code in (0, 5), again.stderr
            ran = [json.loads(line)["step_key"] for line in effects.read_text().splitlines()]
            assert len(ran) == len(set(ran)), ran
        finally:
            stop_all(os.environ["NBRUNBOOK_RUNTIME_DIR"])  # the server holds the file on the tmpfs


# ------------------------------------------ in a kernel: the start cell again, unsaved handles


def test_rerunning_the_start_cell_is_quiet_and_unsaved_handles_get_rebuild_advice(
    kernels: Kernels, tmp_path: Path
) -> None:
    nb = tmp_path / "handles.ipynb"
    store = tmp_path / "store.duckdb"
    start = "#| runbook: always\n" + start_code(nb, store, instance="H1")
    opened = (
        "import os, socket\n"
        "fh = open(os.devnull, 'w')\n"
        "sock = socket.socket()\n"
        "count = 3\n"
        "class Plain:\n    pass\n"
        "plain = Plain()\n"
    )
    explicit = "#| runbook: save=log\nlog = open(os.devnull, 'w')\n"
    write_notebook(nb, [("start", start, []), ("open", opened, []), ("explicit", explicit, [])])
    k = kernels.start()
    first = [k.execute(start, cell_id="start").ok(), k.execute(opened, cell_id="open").ok()]
    saved_now = k.execute(explicit, cell_id="explicit").ok()
    # save= of an open file: named, with the rebuild advice, never "pickle" for it.
    assert "cannot record 'log'" in saved_now.stderr and "runbook: always" in saved_now.stderr, saved_now.stderr
    assert "opt in to pickle" not in saved_now.stderr and ":pickle" not in saved_now.stderr, saved_now.stderr
    # The start cell again (every resume does it): no "already loaded ... %reload_ext" noise.
    again = k.execute(start, cell_id="start").ok()
    texts = "".join(o.get("text", "") for r in [*first, again] for o in r.outputs)
    assert "already loaded" not in texts and "reload_ext" not in texts, texts
    k.execute("del fh, sock, count, plain").ok()
    skipped = k.execute(opened, cell_id="open").ok()
    (line,) = skipped.status_lines
    assert "restored count" in line, line
    assert (
        "not restored: fh, sock (open resources, which cannot be saved: "
        "re-create them in a cell marked `#| runbook: always`)" in line
    ), line
    assert "plain (" in line and "save=plain:pickle" in line, line  # plain data may be pickled
    assert "save=fh" not in line and "save=sock" not in line, line
    # %unload_ext still unloads (IPython still knows the extension is loaded), %load_ext loads again.
    unloaded = k.execute("%unload_ext nbrunbook").ok()
    assert unloaded.outputs == [], unloaded.outputs
    assert "not found" in k.execute("%runbook status").error_text
    reloaded = k.execute("%load_ext nbrunbook").ok()
    assert reloaded.outputs == [] and k.execute("%runbook status").ename == "UsageError"


def test_a_kernel_that_dies_says_its_last_words_in_the_one_line(tmp_path: Path) -> None:
    env = _noisy_kernel(tmp_path)
    nb = write_notebook(
        tmp_path / "dies.ipynb",
        [("dies", "import os\nos.write(9, b'  File x\\nFatal: out of widgets\\n')\nos._exit(1)", [])],
    )
    store = tmp_path / "store" / "store.duckdb"
    run = cli(
        "run", str(nb), "-i", "d1", "--kernel", "noisy", "--store", str(store), "--no-progress", cwd=tmp_path, env=env
    )
    assert run.code == 1, run.stderr
    assert "nbrunbook: the kernel died: Kernel died (Fatal: out of widgets)" in run.stderr.splitlines(), run.stderr
    assert "KERNEL-NOISE" not in run.stderr and "File x" not in run.stderr
