"""A runbook with a fan-out and effect cells, and the oracles the reliability tests apply to it.

The notebook (:func:`effects_notebook`) is what the crash-point and soak tests
run with ``nbrunbook run``. Every guarded step - each cell and each branch of
its ``rb.map`` - appends one JSON line to an *effects file* when its code runs
(step key, idempotency key, attempt, epoch, owner, run id), and the first
(``always``) cell appends one line per run to a *runs file* (run id, kernel and
runner PIDs, and ``$RUNBOOK_TEST_TAG`` - the runner's environment reaches the
kernel - so a test can tell which of its runs it was), so the oracles can tie every effect and every claim to the
process that made it.

:func:`check_effects` is stricter than :func:`helpers.oracle.check_effects_once`:
it checks effects against the claims, not only the count per step.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from helpers.runbooks import write_notebook
from nbrunbook.engine.keys import idempotency_key, split_step_key
from nbrunbook.engine.model import Event

#: Cell ids of :func:`effects_notebook`, in order; ``report`` is retry-safe.
GUARDED_CELLS = ("prepare", "fan", "report", "final")
RETRY_SAFE_CELLS = ("report",)

_SETUP = """\
#| runbook: always
import json, os, time
import nbrunbook as rb
from nbrunbook.kernel_ext import current as _rb_session

def effect(note=""):
    ctx = rb.context()
    line = {"instance": ctx.instance_id, "step_key": ctx.step_key, "key": ctx.idempotency_key,
            "attempt": ctx.attempt, "epoch": ctx.epoch, "owner": ctx.owner, "run_id": ctx.run_id,
            "pid": os.getpid(), "note": note}
    with open(EFFECTS, "a") as fh:  # one short O_APPEND write per effect
        fh.write(json.dumps(line) + "\\n")

with open(RUNS, "a") as fh:
    fh.write(json.dumps({"run_id": _rb_session(get_ipython()).run_id, "kernel_pid": os.getpid(),
                         "runner_pid": os.getppid(), "tag": os.environ.get("RUNBOOK_TEST_TAG")}) + "\\n")
"""

_BRANCH = """\
def branch(i):
    effect()
    time.sleep(PAUSE)
    return i * i

squares = rb.map(branch, list(range(WIDTH)), max_workers=3)
effect()
total = sum(squares)
"""


def effects_notebook(
    path: Path, effects: Path, runs: Path, *, width: int = 6, pause: float = 0.0, cell_pause: float = 0.0
) -> Path:
    """params / setup (always) / prepare / fan (``rb.map`` of ``width`` branches) / report (retry-safe) / final."""
    params = f"EFFECTS = {str(effects)!r}\nRUNS = {str(runs)!r}\nWIDTH = {width}\nPAUSE = {pause!r}\n"
    sleep = f"time.sleep({cell_pause!r})\n" if cell_pause else ""
    return write_notebook(
        path,
        [
            ("params", params, ["parameters"]),
            ("setup", _SETUP, []),
            ("prepare", f"effect()\n{sleep}base = 10\n", []),
            ("fan", _BRANCH, []),
            ("report", f"#| runbook: retry-safe\neffect()\n{sleep}print('total', total + base)\n", []),
            ("final", f"effect()\n{sleep}print('done')\n", []),
        ],
    )


def read_lines(path: Path) -> list[dict[str, Any]]:
    """JSON lines of a file (a torn last line, from a kill mid-write, is reported, not skipped)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_retry_safe(step_key: str) -> bool:
    """A step of a retry-safe cell (the cell itself or one of its branches)."""
    return any(step_key.startswith(f"cell/{c}@") for c in RETRY_SAFE_CELLS)


def check_effects(
    instance: str,
    effects: list[dict[str, Any]],
    events: list[Event],
    *,
    expected_steps: Iterable[str] = (),
    max_per_interrupted: int | None = None,
) -> list[str]:
    """Effects of one instance against its journal; returns the violations (DESIGN.md §11).

    * every effect belongs to a claim: a ``claimed`` event with its step key, epoch, attempt and owner;
    * at most one effect per claim (step key, epoch): a claim runs its code once;
    * every effect of a step key carries the step's idempotency key (the same on every attempt);
    * every ``done`` step has the effect of the claim that completed it (nothing acknowledged lost);
    * a step never interrupted has exactly one effect once done; one interrupted ``n`` times at most
      ``n + 1`` (``max_per_interrupted`` caps it further, e.g. 2 when a test interrupts once);
    * ``expected_steps`` (step keys) are all done.
    """
    problems: list[str] = []
    mine = [e for e in effects if e.get("instance") == instance]
    claims = {(e.step_key, e.epoch): e for e in events if e.event == "claimed"}
    per_claim = Counter((e["step_key"], e["epoch"]) for e in mine)
    per_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for eff in mine:
        per_key[eff["step_key"]].append(eff)
        claim = claims.get((eff["step_key"], eff["epoch"]))
        if claim is None:
            problems.append(f"{instance}: effect without a claim: {eff}")
        elif (claim.owner, claim.attempt) != (eff["owner"], eff["attempt"]):
            problems.append(
                f"{instance}: effect {eff} does not match its claim (owner {claim.owner}, attempt {claim.attempt})"
            )
        if eff["key"] != idempotency_key(instance, eff["step_key"]):
            problems.append(f"{instance}: effect with a wrong idempotency key: {eff}")
    for (key, epoch), n in per_claim.items():
        if n > 1:
            problems.append(f"{instance}: {n} effects for one claim of {key} (epoch {epoch})")
    interrupted = Counter(e.step_key for e in events if e.event == "interrupted")
    done = {e.step_key: e for e in events if e.event == "done"}
    for key, ev in done.items():
        effs = per_key.get(key, [])
        if not any(f["epoch"] == ev.epoch and f["owner"] == ev.owner for f in effs):
            problems.append(f"{instance}: {key} is done (epoch {ev.epoch}) but that claim left no effect")
        n_int = interrupted.get(key, 0)
        limit = 1 + n_int if max_per_interrupted is None or n_int == 0 else min(1 + n_int, max_per_interrupted)
        if len(effs) > limit or (n_int == 0 and len(effs) != 1):
            problems.append(f"{instance}: {key} has {len(effs)} effects, interrupted {n_int} time(s)")
        if len({f["key"] for f in effs}) > 1:
            problems.append(f"{instance}: {key} effects carry different idempotency keys")
    missing = [k for k in expected_steps if k not in done]
    if missing:
        problems.append(f"{instance}: steps not done: {missing}")
    return problems


def check_interrupted_not_rerun_silently(
    instance: str, events: list[Event], allowed_runs: set[str], *, resolved_ok: bool = True
) -> list[str]:
    """A claim taken *after* an interruption is allowed only for a retry-safe step or a run
    started with ``--rerun-interrupted`` (``allowed_runs``); a person's ``resolve --rerun``
    makes the step pending, so its next claim is not one taken after an interruption."""
    problems = []
    for e in events:
        if e.event != "claimed" or e.payload.get("after") != "interrupted":
            continue
        assert e.step_key is not None
        if is_retry_safe(e.step_key) or e.run_id in allowed_runs:
            continue
        problems.append(
            f"{instance}: {e.step_key} re-run after an interruption by run {e.run_id} (seq {e.seq}) "
            "without retry-safe, --rerun-interrupted or a decision"
        )
    return problems


def step_keys_of(width: int) -> list[str]:
    """The step keys a finished first invocation of :func:`effects_notebook` has."""
    keys = [f"cell/{c}@1" for c in GUARDED_CELLS]
    keys += [f"cell/fan@1/branch[{i}]@1" for i in range(width)]
    return keys


def journal_prefix_ok(snapshot: list[tuple[int, str, str | None]], final: list[Event]) -> bool:
    """An earlier read of a journal is a prefix of the final journal (nothing committed was lost)."""
    now = [(e.seq, e.event, e.step_key) for e in final[: len(snapshot)]]
    return now == snapshot


def path_of(step_key: str) -> str:
    """The step path (without ``@invocation``)."""
    return split_step_key(step_key)[0]


# ------------------------------------------------------------------ processes


def cmdline(pid: int) -> str:
    """A process's command line ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill9(pid: int, must_contain: str) -> bool:
    """SIGKILL ``pid`` if it is still the process we mean (its command line names it); True if sent."""
    if must_contain not in cmdline(pid):
        return False  # gone (or the PID was reused by something else: never kill that)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"
