"""Kill -9 soak: runners, kernels and the store server die at random moments; nothing breaks.

Several ``nbrunbook run`` processes advance a rolling set of instances of a
runbook with an ``rb.map`` fan-out and effect cells (:mod:`helpers.chaos`),
while a chaos loop ``kill -9``s a random kernel, runner or store server every
few seconds. Half the runs are started with ``--rerun-interrupted``; a run
that stops for a decision (exit 5) sometimes gets one (``nbrunbook resolve
--rerun``), as a person would. Then every instance is resumed to completion
with ``--rerun-interrupted`` and every invariant of DESIGN.md §11 is checked:
journal and cursor (seq gap-free and unique, one claim per epoch, cursor ==
journal), effects (one per claim, exactly one per step unless an attempt was
interrupted, every done step's effect present), interrupted steps re-run only
by retry-safe cells or runs told to, and every journal read during the chaos
still a prefix of the final journal (nothing committed lost).

The counts go to ``test-artifacts/soak.json`` (see RELIABILITY.md). Knobs:
``NBRUNBOOK_SOAK_SECONDS`` (chaos duration, default 120), ``NBRUNBOOK_SOAK_SEED``
(the seed is printed with any failure, so a run can be replayed as far as
timing allows).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers.chaos import (
    alive,
    check_effects,
    check_interrupted_not_rerun_silently,
    effects_notebook,
    journal_prefix_ok,
    kill9,
    read_lines,
    step_keys_of,
)
from helpers.oracle import check_store
from nbrunbook.engine import protocol
from nbrunbook.engine.errors import RunbookError
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import parse_owner

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "test-artifacts" / "soak.json"
CHAOS_SECONDS = float(os.environ.get("NBRUNBOOK_SOAK_SECONDS", "120"))
SLOTS = 3  # runner processes at once (2 cores: each is a runner plus a kernel)
OPEN_INSTANCES = 3  # instances being advanced at once; a finished one is replaced
MAX_INSTANCES = 12
WIDTH = 6  # branches of the fan-out cell
KILL_EVERY = (1.5, 5.0)  # seconds between kills, uniform
KIND_WEIGHTS = {"kernel": 4, "runner": 3, "server": 3}
RUN_TIMEOUT = 240.0  # a runner older than this is a hang: killed and reported


@dataclass
class Runner:
    """One ``nbrunbook run`` process of the soak."""

    index: int
    instance: str
    flagged: bool
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    phase: str

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Soak:
    """The soak's state and counts."""

    tmp: Path
    seed: int
    rng: random.Random
    nb: Path
    store: Path
    effects: Path
    runs_file: Path
    instances: list[str] = field(default_factory=list)
    open: list[str] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    runners: list[Runner] = field(default_factory=list)
    finished: list[Runner] = field(default_factory=list)
    killed: Counter[str] = field(default_factory=Counter)
    missed: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    resolves: Counter[str] = field(default_factory=Counter)
    snapshots: list[tuple[str, list[tuple[int, str, str | None]]]] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    next_run: int = 0

    # ------------------------------------------------------------ runners

    def new_instance(self) -> None:
        iid = f"soak-{len(self.instances)}"
        self.instances.append(iid)
        self.open.append(iid)

    def spawn(self, instance: str, flagged: bool, phase: str) -> Runner:
        index = self.next_run
        self.next_run += 1
        log = self.tmp / "logs" / f"run-{index:03d}.log"
        args = ["run", str(self.nb), "-i", instance, "--store", str(self.store), "--no-progress"]
        args += ["--wait-timeout", "30", "--cell-timeout", "120"]
        if flagged:
            args.append("--rerun-interrupted")
        env = {**os.environ, "RUNBOOK_TEST_TAG": f"{index}:{int(flagged)}"}
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nbrunbook.engine.cli", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fh,
                env=env,
            )
        runner = Runner(index, instance, flagged, proc, log, time.monotonic(), phase)
        self.runners.append(runner)
        return runner

    def reap(self) -> list[Runner]:
        """Runners that exited since the last call (their exit codes counted)."""
        done = [r for r in self.runners if r.proc.poll() is not None]
        for r in done:
            self.runners.remove(r)
            self.finished.append(r)
            code = r.proc.returncode
            self.exits[f"{r.phase}:{'killed' if code == -9 else code}"] += 1
        for r in list(self.runners):
            if time.monotonic() - r.started > RUN_TIMEOUT:
                self.hangs.append(f"run {r.index} on {r.instance} ran over {RUN_TIMEOUT:g}s:\n{r.stderr()[-2000:]}")
                r.proc.kill()
        return done

    def decide(self, runner: Runner) -> None:
        """What a person does with exit 5: resolve the named cell with --rerun (sometimes)."""
        m = re.search(r"nbrunbook resolve (\S+) (\S+) --rerun\|--done\|--skip", runner.stderr())
        if not m:
            return
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "nbrunbook.engine.cli",
                "resolve",
                *m.groups(),
                "--rerun",
                "--store",
                str(self.store),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.resolves[str(out.returncode)] += 1

    # -------------------------------------------------------------- chaos

    def holders(self, reader: Any) -> list[int]:
        """PIDs of the kernels holding a running step now (mid-cell or mid-branch)."""
        pids = []
        try:
            for iid in self.open:
                for st in reader.steps(iid):
                    owner = parse_owner(st.owner or "") if st.status == "running" else None
                    if owner is not None:
                        pids.append(owner[2])
        except RunbookError:
            return []  # the server is down right now: pick at random
        return sorted(set(pids))

    def kill_one(self, reader: Any) -> None:
        """Kill -9 one kernel, runner or store server; mostly one holding a running step."""
        kinds = list(KIND_WEIGHTS)
        kind = self.rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
        runs = read_lines(self.runs_file)
        kernel_of = {int(str(run.get("tag", "-1:0")).split(":")[0]): run["kernel_pid"] for run in runs}
        live = [r for r in self.runners if r.proc.poll() is None]
        if kind in ("kernel", "runner") and self.rng.random() < 0.7:
            holding = set(self.holders(reader))
            busy = [r for r in live if kernel_of.get(r.index) in holding]
            live = busy or live
        if kind == "runner":
            if live:
                self.rng.choice(live).proc.kill()
                self.killed["runner"] += 1
                return
        elif kind == "kernel":
            pids = [kernel_of[r.index] for r in live if r.index in kernel_of and alive(kernel_of[r.index])]
            if pids and kill9(self.rng.choice(pids), "ipykernel"):
                self.killed["kernel"] += 1
                return
        else:
            pid = protocol.read_lock_info(protocol.server_paths(str(self.store))).get("pid")
            if isinstance(pid, int) and kill9(pid, "nbrunbook.engine.server"):
                self.killed["server"] += 1
                return
        self.missed[kind] += 1

    def snapshot(self, reader: Any, iid: str | None = None) -> None:
        """Read a journal now; it must still be there, unchanged, at the end."""
        if not self.instances:
            return
        iid = iid or self.rng.choice(self.instances)
        try:
            events = reader.journal(iid)
        except RunbookError:
            return  # not created yet, or the server went away mid-read
        self.snapshots.append((iid, [(e.seq, e.event, e.step_key) for e in events]))


def _flagged_runs(soak: Soak) -> set[str]:
    flagged = {r.index for r in soak.finished if r.flagged}
    out = set()
    for run in read_lines(soak.runs_file):
        index, _, flag = str(run.get("tag", "")).partition(":")
        if flag == "1" and index.isdigit() and int(index) in flagged:
            out.add(run["run_id"])
    return out


def _stop_all_runners(soak: Soak) -> None:
    for r in soak.runners:
        if r.proc.poll() is None:
            r.proc.kill()
            soak.killed["runner (end of chaos)"] += 1
    for r in soak.runners:
        r.proc.wait(timeout=60)
    soak.reap()
    # Their kernels exit within a second or two (ipykernel polls its parent); make sure.
    deadline = time.monotonic() + 20
    kernels = [run["kernel_pid"] for run in read_lines(soak.runs_file)]
    while any(alive(p) for p in kernels) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in kernels:
        if alive(pid) and kill9(pid, "ipykernel"):
            soak.killed["kernel (left over)"] += 1


def _resume_all(soak: Soak) -> dict[str, int]:
    """Run every instance with --rerun-interrupted until it is done (at most 4 tries each)."""
    tries: Counter[str] = Counter()
    pending = list(soak.instances)
    final: dict[str, int] = {}
    while pending or soak.runners:
        while pending and len(soak.runners) < SLOTS:
            iid = pending.pop(0)
            tries[iid] += 1
            soak.spawn(iid, flagged=True, phase="resume")
        time.sleep(0.2)
        for r in soak.reap():
            final[r.instance] = r.proc.returncode
            if r.proc.returncode != 0 and tries[r.instance] < 4:
                pending.append(r.instance)
    return final


def _check(soak: Soak, resumed: dict[str, int]) -> tuple[list[str], dict[str, Any]]:
    violations: list[str] = []
    effects = read_lines(soak.effects)
    allowed = _flagged_runs(soak)
    counts: Counter[str] = Counter()
    per_step: Counter[int] = Counter()
    journals = {}
    reader = open_store(soak.store)
    try:
        for iid in soak.instances:
            if resumed.get(iid) != 0:
                violations.append(f"{iid}: could not be resumed to completion (last exit {resumed.get(iid)})")
            try:
                events = check_store(reader, iid)
            except AssertionError as exc:
                violations.append(f"{iid}: journal/cursor invariant: {exc}")
                events = reader.journal(iid)
            journals[iid] = events
            violations += check_effects(iid, effects, events, expected_steps=step_keys_of(WIDTH))
            violations += check_interrupted_not_rerun_silently(iid, events, allowed)
            status = reader.instance_status(iid)
            if status.status != "done":
                violations.append(f"{iid}: status {status.status} at the end: {status.counts()}")
            counts["steps"] += sum(1 for s in reader.steps(iid) if s.status == "done")
            for name in ("claimed", "done", "interrupted", "failed", "fenced", "resolved"):
                counts[name] += sum(1 for e in events if e.event == name)
            counts["events"] += len(events)
            mine = Counter(e["step_key"] for e in effects if e["instance"] == iid)
            per_step.update(mine.values())
    finally:
        reader.close()
    for iid, snap in soak.snapshots:
        if not journal_prefix_ok(snap, journals.get(iid, [])):
            violations.append(f"{iid}: a journal read during the chaos ({len(snap)} events) is not a prefix now")
    violations += soak.hangs
    summary = {
        "steps_done": counts["steps"],
        "journal_events": counts["events"],
        "claims": counts["claimed"],
        "interrupted_events": counts["interrupted"],
        "failed_events": counts["failed"],
        "fenced_events": counts["fenced"],
        "resolved_events": counts["resolved"],
        "effects": len(effects),
        "steps_by_effect_count": {str(k): v for k, v in sorted(per_step.items())},
        "journal_snapshots_checked": len(soak.snapshots),
    }
    return violations, summary


@pytest.mark.soak
@pytest.mark.timeout(CHAOS_SECONDS + 900)
def test_kill9_soak(tmp_path: Path) -> None:
    seed = int(os.environ.get("NBRUNBOOK_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))
    (tmp_path / "logs").mkdir()
    effects, runs = tmp_path / "effects.jsonl", tmp_path / "runs.jsonl"
    soak = Soak(
        tmp=tmp_path,
        seed=seed,
        rng=random.Random(seed),
        nb=effects_notebook(tmp_path / "soak.ipynb", effects, runs, width=WIDTH, pause=0.8, cell_pause=1.2),
        store=tmp_path / "store" / "store.duckdb",
        effects=effects,
        runs_file=runs,
    )
    print(f"soak seed {seed} (replay: NBRUNBOOK_SOAK_SEED={seed})")
    for _ in range(OPEN_INSTANCES):
        soak.new_instance()
    started = time.monotonic()
    reader = open_store(soak.store)  # the test's own client: reads journals during the chaos
    try:
        next_kill = started + soak.rng.uniform(*KILL_EVERY)
        next_read = started + 2.0
        while time.monotonic() - started < CHAOS_SECONDS:
            for r in soak.reap():
                if r.proc.returncode == 0:
                    soak.snapshot(reader, r.instance)  # acknowledged: all of it must still be there at the end
                if r.proc.returncode == 0 and r.instance in soak.open:
                    soak.acknowledged.add(r.instance)
                    soak.open.remove(r.instance)
                    if len(soak.instances) < MAX_INSTANCES:
                        soak.new_instance()
                elif r.proc.returncode == 5 and soak.rng.random() < 0.5:
                    soak.decide(r)
            while len(soak.runners) < SLOTS and soak.open:
                soak.spawn(soak.rng.choice(soak.open), flagged=soak.rng.random() < 0.5, phase="chaos")
            now = time.monotonic()
            if now >= next_kill:
                soak.kill_one(reader)
                next_kill = now + soak.rng.uniform(*KILL_EVERY)
            if now >= next_read:
                soak.snapshot(reader)
                next_read = now + soak.rng.uniform(1.0, 4.0)
            time.sleep(0.1)
        chaos_took = time.monotonic() - started
        _stop_all_runners(soak)
    finally:
        reader.close()
        for r in soak.runners:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()

    resume_started = time.monotonic()
    resumed = _resume_all(soak)
    resume_took = time.monotonic() - resume_started
    violations, summary = _check(soak, resumed)
    report = {
        "command": "pytest tests/test_reliability_soak.py -m soak",
        "seed": seed,
        "chaos_seconds": round(chaos_took, 1),
        "resume_seconds": round(resume_took, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "instances": len(soak.instances),
        "instances_done_during_chaos": len(soak.acknowledged),
        "runner_processes": soak.next_run,
        "killed": dict(soak.killed),
        "kill_attempts_without_a_target": dict(soak.missed),
        "runner_exits": dict(sorted(soak.exits.items())),
        "resolve_decisions": dict(soak.resolves),
        **summary,
        "violations": len(violations),
        "violation_details": violations[:50],
    }
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    assert not violations, f"soak seed {seed}: {len(violations)} violation(s):\n" + "\n".join(violations[:20])
    assert soak.killed["kernel"] and soak.killed["runner"] and soak.killed["server"], (
        f"soak seed {seed}: the chaos did not kill every kind of process: {dict(soak.killed)}"
    )
