"""Kill at every named crash point, resume, check the invariants (DESIGN.md §3, §11).

Real ``nbrunbook run`` processes, real kernels, a real store server and DuckDB
file. A point is armed with ``NBRUNBOOK_CRASH_AT=<name>:<n>`` in the
environment of the process that must die there; who inherits what:

* the kernel is started by the runner (jupyter_client passes the runner's
  environment on), so ``after_claim`` / ``before_record`` - hit in the kernel's
  guard and in its ``rb.map`` fan-out - are armed in the runner's environment;
* a store server started on demand inherits the environment of the client
  that started it. So the kernel-side tests start the server first, from the
  (unarmed) test process, and the server-side tests (``inside_commit``,
  ``after_commit``, ``before_reply``) start an armed server themselves and run
  the runner unarmed: the server that clients start after the kill is clean.

Each test resumes to completion - with ``--rerun-interrupted``, a person's
``resolve --rerun``, or nothing at all for a retry-safe cell - and checks
the journal and cursor (:func:`helpers.oracle.check_store`), the effects file
(:func:`helpers.chaos.check_effects`: one effect per claim, exactly one per
step unless its attempt was interrupted, then at most two with the same
idempotency key), that nothing committed before the kill was lost, and that
an interrupted step was never re-run without retry-safe or a decision.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from helpers.chaos import (
    alive,
    check_effects,
    check_interrupted_not_rerun_silently,
    effects_notebook,
    journal_prefix_ok,
    read_lines,
    step_keys_of,
)
from helpers.oracle import check_store
from helpers.runbooks import Run, cli, digest
from helpers.servers import start_server
from nbrunbook.engine import faults, launch
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.model import Event

WIDTH = 4  # branches of the fan-out cell
# Hits of each kernel-side point in one clean run of the notebook (width 4):
#   after_claim:   prepare 1, fan 2, branches 3-6, report 7, final 8
#   before_record: prepare 1, branches 2-5, fan 6, report 7, final 8


class Case:
    """A notebook, its store and effects, and the runs made on one instance."""

    def __init__(self, tmp_path: Path, instance: str = "crash-1") -> None:
        self.dir = tmp_path
        self.effects = tmp_path / "effects.jsonl"
        self.runs_file = tmp_path / "runs.jsonl"
        self.nb = effects_notebook(tmp_path / "deploy.ipynb", self.effects, self.runs_file, width=WIDTH)
        self.store = tmp_path / "store" / "store.duckdb"
        self.instance = instance
        self.digest = digest(self.nb)
        self.flagged: list[int] = []  # indexes (in the runs file) of runs made with --rerun-interrupted

    def run(self, *extra: str, env: dict[str, str] | None = None) -> Run:
        if "--rerun-interrupted" in extra:
            self.flagged.append(len(read_lines(self.runs_file)))
        return cli(
            "run", str(self.nb), "-i", self.instance, "--store", str(self.store), "--no-progress", *extra, env=env
        )

    def journal(self) -> list[Event]:
        s = open_store(self.store)
        try:
            return check_store(s, self.instance)
        finally:
            s.close()

    def flagged_runs(self) -> set[str]:
        runs = read_lines(self.runs_file)
        return {runs[i]["run_id"] for i in self.flagged if i < len(runs)}

    def check(self, *, max_per_interrupted: int = 2) -> list[Event]:
        """Every invariant; returns the final journal."""
        events = self.journal()
        effects = read_lines(self.effects)
        problems = check_effects(
            self.instance,
            effects,
            events,
            expected_steps=step_keys_of(WIDTH),
            max_per_interrupted=max_per_interrupted,
        )
        problems += check_interrupted_not_rerun_silently(self.instance, events, self.flagged_runs())
        assert not problems, "\n".join(problems)
        s = open_store(self.store)
        try:
            status = s.instance_status(self.instance)
            assert status.status == "done", status.counts()
            assert {st.status for st in s.steps(self.instance)} == {"done"}
        finally:
            s.close()
        assert digest(self.nb) == self.digest  # the user's notebook is never modified
        return events


def _effects_of(case: Case, step_key: str) -> list[dict]:
    return [e for e in read_lines(case.effects) if e["step_key"] == step_key]


# --------------------------------------------------------------- in the kernel


#: (point, hit, the step it kills, whether its code ran, how the run is resumed)
KERNEL_CASES = [
    # the claim committed, the cell's code never ran: one effect in the end
    ("after_claim", 1, "cell/prepare@1", False, "flag"),
    ("after_claim", 2, "cell/fan@1", False, "resolve"),  # a person decides: resolve --rerun
    ("after_claim", 3, "cell/fan@1/branch[0]@1", False, "flag"),  # branches claimed, none ran
    ("after_claim", 3, "cell/fan@1/branch[0]@1", False, "resolve"),  # resolving the cell reruns its branches
    ("after_claim", 7, "cell/report@1", False, "retry-safe"),  # no decision needed
    # the code ran, its outcome was never recorded: two effects, one idempotency key
    ("before_record", 1, "cell/prepare@1", True, "flag"),
    ("before_record", 2, None, True, "flag"),  # the first branch to finish (any of them)
    ("before_record", 6, "cell/fan@1", True, "flag"),  # branches done: a retry does not re-run them
    ("before_record", 7, "cell/report@1", True, "retry-safe"),
]


@pytest.mark.parametrize(
    "point, hit, step, ran, resume",
    KERNEL_CASES,
    ids=[f"{c[0]}:{c[1]}-{c[4]}" for c in KERNEL_CASES],
)
def test_kernel_killed_at_a_crash_point_then_resumed(
    tmp_path: Path, point: str, hit: int, step: str | None, ran: bool, resume: str
) -> None:
    case = Case(tmp_path)
    launch.start_detached(case.store)  # from the unarmed test process: only the kernel is armed

    first = case.run(env={"NBRUNBOOK_CRASH_AT": f"{point}:{hit}"})
    assert first.code == 1, first.stderr
    assert "the kernel died" in first.stderr, first.stderr
    runs = read_lines(case.runs_file)
    assert len(runs) == 1 and not alive(runs[0]["kernel_pid"])  # it died at the point, by SIGKILL
    before = case.journal()  # what was committed before the kill
    snapshot = [(e.seq, e.event, e.step_key) for e in before]
    interrupted = [e.step_key for e in before if e.event == "interrupted"]
    assert interrupted, "the kill left no interrupted step"
    assert all("connection lost" in e.payload["reason"] for e in before if e.event == "interrupted")
    if step is None:  # the first branch to reach the point: whichever it was
        step = next(k for k in interrupted if k and "/branch[" in k and _effects_of(case, k))
    assert step in interrupted
    assert len(_effects_of(case, step)) == (1 if ran else 0)

    second = case.run()  # no decision yet
    if resume == "retry-safe":
        assert second.code == 0, second.stderr  # a retry-safe cell runs again by itself
    else:
        assert second.code == 5, second.stderr
        cell = step.split("/")[1].split("@")[0]
        assert f"nbrunbook resolve {case.instance} {cell} --rerun|--done|--skip" in second.stderr
        after_refusal = case.journal()
        assert not [e for e in after_refusal[len(before) :] if e.event == "claimed"]  # nothing was re-run
        if resume == "flag":
            third = case.run("--rerun-interrupted")
        else:
            decided = cli("resolve", case.instance, cell, "--rerun", "--store", str(case.store))
            assert decided.code == 0, decided.stderr
            third = case.run()
        assert third.code == 0, third.stderr

    events = case.check()
    assert journal_prefix_ok(snapshot, events), "events committed before the kill were lost or changed"
    effects = _effects_of(case, step)
    assert [e["attempt"] for e in effects] == ([1, 2] if ran else [2])
    assert len({e["key"] for e in effects}) == 1
    if resume == "resolve":
        decided = {e.step_key for e in events if e.event == "resolved" and e.payload["decision"] == "rerun"}
        assert step in decided or step.split("/branch[")[0] in decided
        # every interrupted step was decided: the cell, and its branches with it
        assert set(interrupted) <= decided, (interrupted, decided)
    if step == "cell/fan@1" and ran:
        # Attempt 2 of the fan-out cell found every branch done: none ran again.
        assert all(len(_effects_of(case, f"cell/fan@1/branch[{i}]@1")) == 1 for i in range(WIDTH))


# --------------------------------------------------------------- in the server


#: (point, hit) in the store server; commits of one run: pin_manifest 1, open_instance 2,
#: kernel_attached 3, claim prepare 4, its outcome 5, claim fan 6, fan-out declared 7, branch claims 8, ...
SERVER_CASES = [
    ("inside_commit", 4),  # the first claim's transaction: rolled back, the claim is sent again
    ("inside_commit", 8),  # the fan-out's claims (or its declaration)
    ("after_commit", 5),  # an outcome committed, its answer lost
    ("after_commit", 8),  # claims committed, the answer lost: the re-sent claim finds its own
    ("before_reply", 7),  # replies count reads too; these land on a claim and on outcomes
    ("before_reply", 12),
]


@pytest.mark.parametrize("point, hit", SERVER_CASES, ids=[f"{p}:{n}" for p, n in SERVER_CASES])
def test_server_killed_at_a_crash_point(tmp_path: Path, point: str, hit: int) -> None:
    case = Case(tmp_path)
    case.store.parent.mkdir()
    server, info = start_server(case.store, env={"NBRUNBOOK_CRASH_AT": f"{point}:{hit}"})
    try:
        first = case.run()  # unarmed: the server its clients start after the kill is clean
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == -signal.SIGKILL, f"the server did not die at {point}:{hit}"
    if first.code == 4:
        # A write that is not safe to repeat (the run's `kernel_attached` note) was in flight:
        # refused rather than applied twice, said clearly; running again resumes.
        assert re.search(r"lost while \w+ was in flight; it may or may not have been applied", first.stderr)
        again = case.run()
        assert again.code == 0, again.stderr
    else:
        assert first.code == 0, first.stderr
    new = launch.server_status(case.store)
    assert new is not None and new["pid"] != info["pid"]  # a client started a new server

    events = case.check(max_per_interrupted=1)
    # The kernel kept its claims through the restart: nothing was interrupted, every
    # step was claimed once (a re-sent claim found its own commit) and ran once.
    assert not [e for e in events if e.event in ("interrupted", "fenced")]
    claims = Counter(e.step_key for e in events if e.event == "claimed")
    assert set(claims.values()) == {1}, claims
    assert Counter(e["step_key"] for e in read_lines(case.effects)) == Counter(step_keys_of(WIDTH))


# ------------------------------------------------------------------- coverage


def test_every_crash_point_is_wired_and_tested() -> None:
    """Each point of faults.POINTS is called somewhere in the package and killed at above."""
    import ast

    import nbrunbook

    root = Path(nbrunbook.__file__).resolve().parent.parent
    wired: Counter[str] = Counter()
    for path in [*(root / "engine").glob("*.py"), *(root / "kernel_ext").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "crashpoint"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                wired[node.args[0].value] += 1
    assert set(wired) == set(faults.POINTS), wired
    tested = {c[0] for c in KERNEL_CASES} | {c[0] for c in SERVER_CASES}
    assert tested == set(faults.POINTS)


def test_unknown_crash_point_is_refused() -> None:
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "from nbrunbook.engine.faults import crashpoint; crashpoint('after_claim')"],
        env={**os.environ, "NBRUNBOOK_CRASH_AT": "after_clam"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "unknown crash point 'after_clam'" in out.stderr
