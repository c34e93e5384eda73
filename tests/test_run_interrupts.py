"""``nbrunbook run`` cut off by a cell timeout, Ctrl-C (SIGINT) or SIGTERM (real kernels, CLI subprocesses).

The cell was cut off at an arbitrary point, so its step is ``interrupted``
(DESIGN.md §3): the run says so in one line, exits with the documented code
(5 for a timeout, 130 / 143 for the signals), writes the partial output
notebook and leaves no kernel behind; the next run stops at the step for a
person's decision. Every wait is on a file a cell writes, never on the clock;
the cell timeouts are generous (the cell's claim counts) and the cells they cut
off sleep far longer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.kernels import check_instance
from helpers.oracle import read_effects
from helpers.runbooks import Run, cli, effect_cell, read_output, start_cli, write_notebook
from nbrunbook.engine.factory import open_store

#: Generous: two cores shared with other test runs.
DEADLINE = 300.0


def _notebook(tmp_path: Path, slow_body: str) -> tuple[Path, Path, Path]:
    """imports / first / slow (writes its kernel's pid to a flag file, then ``slow_body``) / after."""
    effects, flag = tmp_path / "effects.jsonl", tmp_path / "started.pid"
    body = f"open({str(flag)!r}, 'w').write(str(os.getpid()))\n{slow_body}"
    nb = write_notebook(
        tmp_path / "long.ipynb",
        [
            ("imports", f"import json, os, signal, time\nEFFECTS = {str(effects)!r}", []),
            ("first", "# first\n" + effect_cell("print('first ran')\n"), []),
            ("slow", "# slow\n" + effect_cell(body), []),
            ("after", "# after\n" + effect_cell(), []),
        ],
    )
    return nb, effects, flag


def _wait_for(path: Path, proc: subprocess.Popen[str] | None = None) -> str:
    deadline = time.monotonic() + DEADLINE
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        assert proc is None or proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    return path.read_text()


def _gone(pid: int) -> bool:
    """True once the process has exited (waits; a kernel takes a moment to go)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _status(store: Path, instance: str) -> dict[str, str]:
    with open_store(store) as s:
        return {st.path: st.status for st in s.steps(instance)}


def _lines(stderr: str, needle: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if needle in ln]


def _no_traceback_of_ours(stderr: str) -> bool:
    """No traceback from the runner's process (its frames are in nbrunbook's engine or nbclient).

    The kernel's own stderr (a ZMQ traceback while it is torn down, say) is not
    the runner's output; keeping it off the terminal is the kernel module's job.
    """
    return "/engine/" not in stderr and "nbclient/" not in stderr and "CellTimeoutError" not in stderr


def _resume_stops_for_a_decision(nb: Path, instance: str, store: Path, effects: Path) -> None:
    before = read_effects(effects)
    resumed = cli("run", str(nb), "-i", instance, "--store", str(store), "--no-progress")
    assert resumed.code == 5, resumed.stderr
    assert f"nbrunbook resolve {instance} slow --rerun|--done|--skip --store {store}" in resumed.stderr
    assert read_effects(effects) == before  # nothing ran again


def test_cell_timeout_interrupts_the_step(tmp_path: Path) -> None:
    nb, effects, flag = _notebook(tmp_path, "time.sleep(600)\n")
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    run = cli(
        "run", str(nb), "-i", "tmo-1", "--store", str(store), "-o", str(out), "--no-progress", "--cell-timeout", "15.5"
    )
    assert run.code == 5, run.stderr
    assert _lines(run.stderr, "timed out") == [
        f"nbrunbook: cell 'slow' (slow) timed out after 15.5 s; the step is interrupted: "
        f"decide with nbrunbook resolve tmo-1 slow --rerun|--done|--skip --store {store}"
    ]
    assert _no_traceback_of_ours(run.stderr), run.stderr
    assert _status(store, "tmo-1") == {"cell/first": "done", "cell/slow": "interrupted"}
    output = read_output(out)
    assert output.cells[2].metadata["nbrunbook"]["run"] == "interrupted"
    assert output.cells[2].metadata["nbrunbook"]["status"] == "interrupted"
    assert output.cells[3].outputs == []  # not run
    assert _gone(int(flag.read_text()))
    assert [e["step_key"] for e in read_effects(effects)] == ["cell/first@1", "cell/slow@1"]
    _resume_stops_for_a_decision(nb, "tmo-1", store, effects)
    check_instance(store, "tmo-1")


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "soon"])
def test_a_cell_timeout_that_is_not_a_positive_number_is_refused(tmp_path: Path, value: str) -> None:
    nb, effects, _ = _notebook(tmp_path, "")
    store = tmp_path / "store.duckdb"
    run = cli("run", str(nb), "--store", str(store), "--cell-timeout", value)
    assert run.code == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("nbrunbook run: error: argument --cell-timeout: ")
    assert not store.exists() and not effects.exists() and not (tmp_path / ".nbrunbook").exists()


def test_cell_timeout_kills_a_kernel_that_does_not_answer_the_interrupt(tmp_path: Path) -> None:
    nb, effects, flag = _notebook(tmp_path, "signal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(600)\n")
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    run = cli(
        "run",
        str(nb),
        "-i",
        "tmo-2",
        "--store",
        str(store),
        "-o",
        str(out),
        "--no-progress",
        "--cell-timeout",
        "15",
        env={"NBRUNBOOK_INTERRUPT_GRACE": "2"},
    )
    assert run.code == 5, run.stderr
    assert _lines(run.stderr, "timed out") == [
        f"nbrunbook: cell 'slow' (slow) timed out after 15 s (the kernel did not answer the interrupt and was "
        f"killed); the step is interrupted: decide with nbrunbook resolve tmo-2 slow --rerun|--done|--skip "
        f"--store {store}"
    ]
    assert _gone(int(flag.read_text()))
    assert _status(store, "tmo-2")["cell/slow"] == "interrupted"  # the dead owner's step
    assert read_output(out).cells[2].metadata["nbrunbook"]["run"] == "interrupted"
    _resume_stops_for_a_decision(nb, "tmo-2", store, effects)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_interrupts_the_running_step_and_writes_the_output(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    nb, effects, flag = _notebook(tmp_path, "time.sleep(600)\n")
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    proc = start_cli("run", str(nb), "-i", "sig-1", "--store", str(store), "-o", str(out), "--no-progress")
    pid = int(_wait_for(flag, proc))
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == code, err
    run = Run(proc.returncode, "", err)
    assert [ln for ln in run.lines if "stopped by" in ln] == [
        f"nbrunbook: stopped by {signum.name} during cell 'slow' (slow); the step is interrupted: "
        f"decide with nbrunbook resolve sig-1 slow --rerun|--done|--skip --store {store}"
    ]
    assert _no_traceback_of_ours(err), err
    output = read_output(out)  # the partial output notebook
    assert "first ran" in "".join(o.get("text", "") for o in output.cells[1].outputs)
    assert output.cells[2].metadata["nbrunbook"]["run"] == "interrupted"
    assert output.metadata["nbrunbook"]["exit_code"] == code
    assert _status(store, "sig-1") == {"cell/first": "done", "cell/slow": "interrupted"}
    assert _gone(pid)  # no kernel left running
    _resume_stops_for_a_decision(nb, "sig-1", store, effects)
    check_instance(store, "sig-1")


def test_a_second_ctrl_c_kills_a_kernel_that_ignores_the_first(tmp_path: Path) -> None:
    got = tmp_path / "got-sigint"
    handler = f"signal.signal(signal.SIGINT, lambda *a: open({str(got)!r}, 'w').write('1'))\ntime.sleep(600)\n"
    nb, effects, flag = _notebook(tmp_path, handler)
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    # A grace far longer than the test: only the second Ctrl-C can end the cell.
    proc = start_cli(
        "run",
        str(nb),
        "-i",
        "sig-2",
        "--store",
        str(store),
        "-o",
        str(out),
        "--no-progress",
        env={"NBRUNBOOK_INTERRUPT_GRACE": "3600"},
    )
    pid = int(_wait_for(flag, proc))
    proc.send_signal(signal.SIGINT)
    _wait_for(got, proc)  # the kernel got the interrupt and went on
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, err
    assert _lines(err, "stopped by") == [
        "nbrunbook: stopped by SIGINT during cell 'slow' (slow) (the kernel did not answer the interrupt and was "
        f"killed); the step is interrupted: decide with nbrunbook resolve sig-2 slow --rerun|--done|--skip "
        f"--store {store}"
    ]
    assert _gone(pid)
    assert _status(store, "sig-2")["cell/slow"] == "interrupted"
    assert read_output(out).cells[2].metadata["nbrunbook"]["run"] == "interrupted"
    _resume_stops_for_a_decision(nb, "sig-2", store, effects)


def test_a_signal_after_a_cell_finished_cuts_nothing_off(tmp_path: Path) -> None:
    """The cell takes the interrupt and finishes normally: it is done, and the next cell never starts."""
    got, release = tmp_path / "got-sigint", tmp_path / "release"
    body = (
        f"signal.signal(signal.SIGINT, lambda *a: open({str(got)!r}, 'w').write('1'))\n"
        f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.05)\n"
    )
    nb, effects, flag = _notebook(tmp_path, body)
    store, out = tmp_path / "store.duckdb", tmp_path / "out.ipynb"
    proc = start_cli("run", str(nb), "-i", "sig-3", "--store", str(store), "-o", str(out), "--no-progress")
    pid = int(_wait_for(flag, proc))
    proc.send_signal(signal.SIGTERM)
    _wait_for(got, proc)  # the runner passed the interrupt on; the cell goes on and ends normally
    release.write_text("1")
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 143, err
    assert _lines(err, "stopped by") == ["nbrunbook: stopped by SIGTERM; no cell was cut off"]
    assert _status(store, "sig-3") == {"cell/first": "done", "cell/slow": "done"}
    assert [e["step_key"] for e in read_effects(effects)] == ["cell/first@1", "cell/slow@1"]
    assert read_output(out).cells[3].outputs == []  # `after` never started
    assert _gone(pid)
    check_instance(store, "sig-3", read_effects(effects))


def test_ctrl_c_while_the_kernel_starts_runs_nothing(tmp_path: Path) -> None:
    """A kernel slow to start (a stand-in that never answers): Ctrl-C ends the run at once, exit 130."""
    import json
    import sys

    flag = tmp_path / "kernel.pid"
    spec = tmp_path / "jupyter" / "kernels" / "slow-start"
    spec.mkdir(parents=True)
    # It binds its shell socket and writes the flag once the runner asked for its
    # kernel_info: the runner is then waiting for the kernel to be ready.
    code = (
        "import json, os, signal, sys, time, zmq\n"
        "signal.signal(signal.SIGINT, lambda *a: os._exit(1))\n"  # an interrupt ends it, quietly
        "cf = json.load(open(next(a for a in sys.argv if a.endswith('.json'))))\n"
        "sep = '-' if cf['transport'] == 'ipc' else ':'\n"
        "shell = zmq.Context().socket(zmq.ROUTER)\n"
        "shell.bind(f\"{cf['transport']}://{cf['ip']}{sep}{cf['shell_port']}\")\n"
        "shell.recv_multipart()\n"
        f"open({str(flag)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(3600)\n"
    )
    argv = [sys.executable, "-c", code, "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "slow", "language": "python"}))
    nb = write_notebook(tmp_path / "nb.ipynb", [("only", "print('never')", [])])
    out = tmp_path / "out.ipynb"
    proc = start_cli(
        "run",
        str(nb),
        "--kernel",
        "slow-start",
        "--store",
        str(tmp_path / "store.duckdb"),
        "-o",
        str(out),
        "--no-progress",
        env={"JUPYTER_PATH": str(tmp_path / "jupyter")},
    )
    pid = int(_wait_for(flag, proc))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, err
    assert _lines(err, "stopped by") == ["nbrunbook: stopped by SIGINT while the kernel was starting; no cell ran"]
    assert _no_traceback_of_ours(err) and not out.exists(), err
    assert _gone(pid)
