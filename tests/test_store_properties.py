"""Property-based state-machine test of the claim protocol (Hypothesis).

Several simulated owners claim, renew, complete, fail, die, get fenced after
lease expiry, rerun and resolve three steps in random interleavings on a real
DuckDB file with a controllable clock. After every step the journal and the
cursor must satisfy the invariants of DESIGN.md §11 (see helpers.oracle), and
an outcome may be applied only by the holder the cursor names.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conftest import owner
from helpers.oracle import check_store
from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.errors import InvalidTransition, StepFenced
from nbrunbook.engine.model import ClaimOutcome

PATHS = ["cell/a", "cell/b", "cell/a@1/map[0]"]
OWNERS = 3
LEASE = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class ClaimProtocol(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="nbrb-prop-"))
        self.clock = Clock()
        self.store = EmbeddedStore(str(self.dir / "s.duckdb"), clock=self.clock, linger=0)
        self.store.open_instance("rb", "i", {}, manifest_version=0, owner=owner("setup"), run_id="run-0")
        self.generation = [0] * OWNERS  # bumped when an owner "dies" and comes back as a new process
        # (owner, path) -> (step key, epoch) of the last claim that owner won
        self.held: dict[tuple[str, str], tuple[str, int]] = {}
        self.applied: set[tuple[str, int]] = set()  # (key, epoch) whose outcome was applied

    def who(self, n: int) -> str:
        return owner(f"o{n}g{self.generation[n]}")

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(n=st.integers(0, OWNERS - 1), path=st.sampled_from(PATHS), retry_safe=st.booleans())
    def claim(self, n: int, path: str, retry_safe: bool) -> None:
        me = self.who(n)
        c = self.store.claim("i", path, owner=me, run_id=f"run-{n}", lease=LEASE, retry_safe=retry_safe)
        if c.outcome is ClaimOutcome.CLAIMED:
            assert c.state.owner == me and c.state.status == "running"
            self.held[(me, path)] = (c.step_key, c.state.epoch)
        elif c.outcome is ClaimOutcome.BUSY:
            # (Busy for ``me`` too: another call of the same process holds it.)
            assert c.state.lease_until is not None and c.state.lease_until >= self.clock.now

    def _finish(self, n: int, path: str, how: str) -> None:
        me = self.who(n)
        held = self.held.get((me, path))
        if held is None:
            return
        key, epoch = held
        row = self.store.step("i", path)
        holder_ok = (
            row is not None
            and row.status == "running"
            and row.owner == me
            and row.epoch == epoch
            and row.step_key == key
        )
        try:
            if how == "done":
                self.store.complete("i", key, owner=me, epoch=epoch, run_id=f"run-{n}")
            else:
                self.store.fail("i", key, owner=me, epoch=epoch, run_id=f"run-{n}", error={"type": "E"})
        except StepFenced:
            assert not holder_ok, "the current holder was fenced"
            del self.held[(me, path)]
            return
        already = (key, epoch) in self.applied
        assert holder_ok or already, "a stale holder's outcome was applied"
        self.applied.add((key, epoch))
        del self.held[(me, path)]

    @rule(n=st.integers(0, OWNERS - 1), path=st.sampled_from(PATHS))
    def complete(self, n: int, path: str) -> None:
        self._finish(n, path, "done")

    @rule(n=st.integers(0, OWNERS - 1), path=st.sampled_from(PATHS))
    def fail(self, n: int, path: str) -> None:
        self._finish(n, path, "fail")

    @rule(n=st.integers(0, OWNERS - 1), path=st.sampled_from(PATHS))
    def renew(self, n: int, path: str) -> None:
        me = self.who(n)
        held = self.held.get((me, path))
        if held is None:
            return
        try:
            self.store.renew("i", held[0], owner=me, epoch=held[1], lease=LEASE)
        except StepFenced:
            pass

    @rule(n=st.integers(0, OWNERS - 1))
    def owner_dies(self, n: int) -> None:
        me = self.who(n)
        for s in self.store.release_owner(me, reason="killed"):
            assert s.status == "interrupted"
        self.generation[n] += 1  # it restarts as a new process with a new owner id

    @rule(seconds=st.sampled_from([1.0, 6.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(path=st.sampled_from(PATHS))
    def rerun(self, path: str) -> None:
        before = self.store.step("i", path)
        try:
            after = self.store.rerun("i", path, owner=owner("person"), run_id="run-p")
        except (InvalidTransition, LookupError):
            return
        assert before is not None and after.invocation == before.invocation + 1 and after.attempt == 0

    @rule(path=st.sampled_from(PATHS), decision=st.sampled_from(["rerun", "done", "skip"]))
    def resolve(self, path: str, decision: str) -> None:
        try:
            self.store.resolve("i", path, decision, owner=owner("person"), run_id="run-p")
        except (InvalidTransition, LookupError):
            return

    @invariant()
    def journal_and_cursor_agree(self) -> None:
        check_store(self.store, "i")

    @invariant()
    def at_most_one_holder(self) -> None:
        for path in PATHS:
            row = self.store.step("i", path)
            holders = [
                k
                for k, (key, epoch) in self.held.items()
                if k[1] == path
                and row is not None
                and row.status == "running"
                and row.owner == k[0]
                and row.epoch == epoch
            ]
            assert len(holders) <= 1


ClaimProtocol.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestClaimProtocol = ClaimProtocol.TestCase
