"""``%runbook``: start or attach an instance, look at it, decide about its steps.

Every mistake (bad arguments, no instance attached, an engine refusal such as
``ParamsMismatch``) is raised as IPython's ``UsageError``, which shows one
line instead of a traceback. Settings are traits, so they can be set in
IPython config as ``c.RunbookMagics.wait_timeout = 60``.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.utils.process import arg_split
from traitlets import Enum, Float, Int

from nbrunbook.engine.errors import RunbookError
from nbrunbook.engine.keys import CELL_ID_RE
from nbrunbook.engine.store import DEFAULT_LEASE

from . import defaults
from .errors import NoInstance, UnknownCell

if TYPE_CHECKING:
    from nbrunbook.engine.store import Store

    from .guard import Guard
    from .session import Options, Session

# Marks found in every text font (DejaVu, Liberation, the browsers' defaults): status text must read
# right without an emoji font.
_MARKS = {"done": "✓", "skipped": "»", "running": "▶", "failed": "✗", "interrupted": "!", "pending": "·"}


def _parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(prog="%runbook", description="Durable, run-once notebook cells.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=MagicArgumentParser)

    p = sub.add_parser("start", help="start (or resume) an instance of this notebook")
    p.add_argument("-i", "--instance", metavar="ID", help="instance id (default: a new generated id)")
    p.add_argument("--store", metavar="S", help="store path (default: .nbrunbook/store.duckdb beside the notebook)")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="a parameter")
    p.add_argument("--notebook", metavar="PATH", help="the notebook file (default: found from the session)")
    p.add_argument("--unordered", action="store_true", help="allow cells to run out of order")
    p.add_argument("--force-params", action="store_true", help="resume even if the parameters differ")

    p = sub.add_parser("attach", help="attach an existing instance")
    p.add_argument("instance", metavar="ID")
    p.add_argument("--store", metavar="S")
    p.add_argument("--notebook", metavar="PATH")

    sub.add_parser("status", help="progress of the attached instance")
    p = sub.add_parser("journal", help="the last events of the attached instance")
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many events (default 20)")
    p = sub.add_parser("instances", help="instances in the store")
    p.add_argument("--runbook", metavar="NAME")
    p.add_argument("--store", metavar="S")
    p = sub.add_parser("rerun", help="run a done cell again (a new invocation)")
    p.add_argument("cell", nargs="?", metavar="CELL", help="cell id, name or step key (default: the last cell)")
    p = sub.add_parser("resolve", help="decide about an interrupted or failed cell")
    p.add_argument("cell", metavar="CELL")
    group = p.add_mutually_exclusive_group(required=True)
    for decision in ("rerun", "done", "skip"):
        group.add_argument(f"--{decision}", dest="decision", action="store_const", const=decision)
    p.add_argument("--note", default="", metavar="TEXT")
    sub.add_parser("stop", help="detach the instance from this kernel")
    p = sub.add_parser("dashboard", help="show the instance dashboard")
    p.add_argument("--text", action="store_true", help="a text summary instead of the widget")
    return parser


@functools.cache
def _the_parser() -> MagicArgumentParser:
    return _parser()


def _typed(value: str) -> Any:
    from nbrunbook.engine.params import resolve_type

    return resolve_type(value)


@contextmanager
def _usage() -> Iterator[None]:
    """Engine errors become one-line UsageErrors."""
    try:
        yield
    except RunbookError as exc:
        raise UsageError(str(exc)) from None


@magics_class
class RunbookMagics(Magics):
    """The ``%runbook`` line magic (see ``%runbook?``)."""

    wait_timeout = Float(
        defaults.WAIT_TIMEOUT, help="Seconds a cell waits for the same cell running in another kernel."
    ).tag(config=True)
    lease = Float(DEFAULT_LEASE, help="Lease of a running cell in seconds; renewed by a heartbeat.").tag(config=True)
    on_changed = Enum(
        list(defaults.ON_CHANGED), "skip", help="A done cell whose source changed: skip (with a warning), error, rerun."
    ).tag(config=True)
    output_limit = Int(defaults.OUTPUT_LIMIT, help="Bytes of output recorded per cell.").tag(config=True)
    value_limit = Int(defaults.VALUE_LIMIT, help="Bytes per saved value.").tag(config=True)
    max_attempts = Int(None, allow_none=True, help="Attempts per invocation (default: the store's).").tag(config=True)

    def __init__(self, shell: Any = None, guard: Guard | None = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.guard = guard

    # ------------------------------------------------------------ dispatch

    @line_magic
    def runbook(self, line: str) -> None:
        """%runbook COMMAND ...

        start [--instance ID] [--store S] [-p NAME VALUE]... [--notebook PATH] [--unordered] [--force-params]
        attach ID [--store S] [--notebook PATH]
        status | journal [-n N] | instances [--runbook NAME] [--store S]
        rerun [CELL] | resolve CELL --rerun|--done|--skip [--note TEXT]
        stop | dashboard [--text]
        """
        # posix splitting: quotes group words and are removed (IPython's default keeps them)
        args = _the_parser().parse_args(arg_split(line, posix=True))
        if not args.command:
            raise UsageError("%runbook needs a command: " + ", ".join(self._commands()) + " (see %runbook?)")
        with _usage():
            getattr(self, f"_cmd_{args.command}")(args)

    @staticmethod
    def _commands() -> list[str]:
        for action in _the_parser()._actions:
            if isinstance(action, argparse._SubParsersAction):
                return list(action.choices)
        return []

    def _options(self, **extra: Any) -> Options:
        from .session import Options

        return Options.from_mapping(
            {
                "wait_timeout": self.wait_timeout,
                "lease": self.lease,
                "on_changed": self.on_changed,
                "output_limit": self.output_limit,
                "value_limit": self.value_limit,
                "max_attempts": self.max_attempts,
                **extra,
            }
        )

    def _session(self) -> Session:
        session = self.guard.session if self.guard is not None else None
        if session is None:
            raise NoInstance()
        self.guard.settle()  # type: ignore[union-attr]
        return session

    # ------------------------------------------------------------ commands

    def _headless_keeps(self, what: str) -> bool:
        """A headless run (``nbrunbook run``) attached its instance before the first cell: keep it."""
        session = self.guard.session if self.guard is not None else None
        if session is None or session.options.mode != "headless":
            return False
        print(f"nbrunbook: {what} ignored: this kernel advances instance {session.instance_id} for `nbrunbook run`")
        return True

    def _cmd_start(self, args: argparse.Namespace) -> None:
        from .session import attach

        if self._headless_keeps("%runbook start"):
            return

        params: dict[str, Any] = {}
        for name, value in args.param:
            if not name.isidentifier():
                raise UsageError(f"-p {name} {value}: {name!r} is not a valid parameter name")
            params[name] = _typed(value)
        session = attach(
            self.shell,
            args.instance,
            store=args.store,
            notebook=args.notebook,
            params=params if args.param else None,
            options=self._options(unordered=args.unordered),
            force_params=args.force_params,
        )
        self._announce(session, "started" if session.created else "resumed")

    def _cmd_attach(self, args: argparse.Namespace) -> None:
        from .session import attach

        if self._headless_keeps("%runbook attach"):
            return

        session = attach(
            self.shell,
            args.instance,
            store=args.store,
            notebook=args.notebook,
            options=self._options(),
            create=False,
            require_notebook=False,
        )
        self._announce(session, "attached")

    def _announce(self, session: Session, verb: str) -> None:
        status = session.store.instance_status(session.instance_id)
        counts = status.counts()
        finished = counts["done"] + counts["skipped"]
        extra = "".join(f", {counts[k]} {k}" for k in ("running", "failed", "interrupted") if counts.get(k))
        params = ", ".join(f"{k}={v!r}" for k, v in session.params.items())
        version = session.manifest.version if session.manifest else 0
        print(
            f"nbrunbook: {verb} instance {session.instance_id} of runbook {session.instance.runbook!r} "
            f"(manifest v{version}): {finished}/{counts['total']} steps done{extra}"
            + (f"; params {params}" if params else "")
        )
        print(f"  store {session.store.location}; after a restart resume with: %runbook attach {session.instance_id}")
        nb = session.notebook
        if nb is not None and nb.derived_ids:
            print(
                f"  note: {os.path.basename(nb.path)} has no cell ids (nbformat 4.4); cells are identified by "
                f"order and source hash. `nbrunbook upgrade {nb.path}` writes stable ids into the file."
            )

    def _cmd_status(self, args: argparse.Namespace) -> None:
        session = self._session()
        print(self.status_text(session))

    def status_text(self, session: Session) -> str:
        """The text status of the attached instance."""
        st = session.store.instance_status(session.instance_id)
        counts = st.counts()
        finished = counts["done"] + counts["skipped"]
        lines = [
            f"instance {st.instance.instance_id} · runbook {st.instance.runbook!r} "
            f"(manifest v{st.manifest.version if st.manifest else 0}) · {st.status} · "
            f"{finished}/{counts['total']} done"
        ]
        if st.instance.params:
            lines.append("params: " + ", ".join(f"{k}={v!r}" for k, v in st.instance.params.items()))
        for cell, state in st.cells():
            status = state.status if state else "pending"
            if cell.kind != "guarded":
                status = cell.kind
            mark = _MARKS.get(status, " ")
            detail = ""
            if state is not None:
                detail = f"attempt {state.attempt}"
                if state.invocation > 1:
                    detail += f", invocation {state.invocation}"
                if state.finished_at:
                    detail += ", " + time.strftime("%H:%M:%S", time.localtime(state.finished_at))
                if state.duration is not None:
                    detail += f", {state.duration:.2f} s"
                if state.status == "running":
                    from .replay import who

                    detail += f", in {who(state.owner)}"
            lines.append(f"  {mark} {status:<11} {session.label(cell.cell_id):<40} {detail}")
        return "\n".join(lines)

    def _cmd_journal(self, args: argparse.Namespace) -> None:
        if args.n < 1:
            raise UsageError("-n must be at least 1")
        session = self._session()
        last = session.store.instance_status(session.instance_id).last_seq
        for e in session.store.journal(session.instance_id, since_seq=max(0, last - args.n)):
            when = time.strftime("%H:%M:%S", time.localtime(e.ts))
            payload = {k: v for k, v in e.payload.items() if k not in ("duration",)}
            text = str(payload)
            print(
                f"{e.seq:>5} {when} {e.event:<16} {e.step_key or '-':<24} "
                f"a{e.attempt if e.attempt is not None else '-'} e{e.epoch if e.epoch is not None else '-'} "
                f"{e.run_id or '-'} {text[:100] if payload else ''}"
            )

    def _cmd_instances(self, args: argparse.Namespace) -> None:
        session = self.guard.session if self.guard is not None else None
        store: Store
        if args.store or session is None:
            from nbrunbook.engine.factory import open_store

            store = open_store(args.store)
            owned = True
        else:
            self._session()
            store = session.store
            owned = False
        try:
            rows = store.instances(runbook=args.runbook)
        finally:
            if owned:
                store.close()
        if not rows:
            print("no instances")
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))
            print(f"{r.instance_id:<30} {r.runbook:<20} {r.status:<12} {r.done}/{r.total} done  {when}")

    def _path(self, session: Session, cell: str | None) -> str:
        if cell is None:
            if session.last_cell is None:
                raise UsageError("which cell? no guarded cell ran yet in this kernel: %runbook rerun CELL")
            return f"cell/{session.last_cell}"
        if cell.startswith("cell/"):
            return cell.split("@", 1)[0] if "/" not in cell[5:] else cell
        ids = {c.cell_id for c in session.cells()}
        if cell in ids:
            return f"cell/{cell}"
        if "@" in cell and cell.split("@", 1)[0] in ids:
            return f"cell/{cell.split('@', 1)[0]}"
        named = [c.cell_id for c in session.cells() if c.name == cell]
        if len(named) == 1:
            return f"cell/{named[0]}"
        if len(named) > 1:
            raise UnknownCell(cell, f"several cells are named so: {', '.join(named)}; use the id")
        if CELL_ID_RE.fullmatch(cell) and session.store.step(session.instance_id, f"cell/{cell}") is not None:
            return f"cell/{cell}"
        raise UnknownCell(cell, "use a cell id, a cell name or a step key; see %runbook status")

    def _cmd_rerun(self, args: argparse.Namespace) -> None:
        session = self._session()
        path = self._path(session, args.cell)
        state = session.store.rerun(
            session.instance_id, path, owner=session.owner, run_id=session.run_id, reason="%runbook rerun"
        )
        print(f"nbrunbook: {session.label(path)} reopened as {state.step_key}: it runs again when executed")

    def _cmd_resolve(self, args: argparse.Namespace) -> None:
        session = self._session()
        path = self._path(session, args.cell)
        state = session.store.resolve(
            session.instance_id, path, args.decision, owner=session.owner, run_id=session.run_id, note=args.note
        )
        print(f"nbrunbook: {session.label(path)} resolved --{args.decision}: now {state.status}")

    def _cmd_stop(self, args: argparse.Namespace) -> None:
        session = self.guard.detach() if self.guard is not None else None
        if session is None:
            raise NoInstance()
        print(f"nbrunbook: detached instance {session.instance_id}; cells run unguarded from now on")

    def _cmd_dashboard(self, args: argparse.Namespace) -> None:
        session = self._session()
        if not args.text:
            try:
                from IPython.display import display

                from nbrunbook.widgets.instance import InstanceDashboard

                dashboard = InstanceDashboard(session.store, session.instance_id)
                session.on_close.append(dashboard.stop)  # its live thread reads the store we close
                display(dashboard.widget)
                return
            except ImportError:
                pass
        print(self.status_text(session))
