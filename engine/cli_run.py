"""``nbrunbook run NOTEBOOK``: advance an instance headless; resume by running again."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from . import cli
from .cli_common import add_store_arg
from .errors import DuplicateCellIds, OutputNotWritten, RunbookError
from .factory import canonical_location, default_store_path, split_location
from .keys import new_instance_id, validate_instance_id
from .notebook_ids import NotebookError, derive_for_run, read_json
from .params import collect, inject

if TYPE_CHECKING:
    from .runner import RunbookClient

ON_CHANGED = ("error", "rerun", "skip")


def register(sub: Any) -> None:
    """Add the ``run`` subcommand."""
    p = sub.add_parser(
        "run",
        help="execute a notebook as a runbook instance (resume: run the same instance again)",
        description="Execute NOTEBOOK headless as one advance of an instance: done cells are skipped and "
        "replayed, the failed cell is retried, nothing runs twice. The notebook file is never modified.",
    )
    p.add_argument("notebook", metavar="NOTEBOOK")
    p.add_argument("-i", "--instance", metavar="INSTANCE", help="instance id (default: a new generated id)")
    p.add_argument(
        "-p",
        "--parameters",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter, typed like papermill's -p (True/False/None/int/float/str)",
    )
    p.add_argument(
        "-r",
        "--parameters_raw",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter kept as a string",
    )
    p.add_argument(
        "-f", "--parameters_file", action="append", default=[], metavar="FILE", help="a YAML file of parameters"
    )
    p.add_argument("-y", "--parameters_yaml", action="append", default=[], metavar="YAML", help="YAML parameters")
    p.add_argument(
        "-o", "--output", metavar="OUTPUT", help="output notebook (default: .nbrunbook/out/<runbook>/<instance>.ipynb)"
    )
    p.add_argument("--kernel", metavar="NAME", help="kernel name (default: the notebook's, else python3)")
    p.add_argument("--cwd", metavar="DIR", help="the kernel's working directory (default: the notebook's)")
    p.add_argument(
        "--cell-timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="seconds a cell may run; then it is interrupted and the run stops with exit 5 (default: no limit)",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds to wait for a cell another run is executing (default 600; exit 3 after)",
    )
    p.add_argument(
        "--on-changed",
        choices=ON_CHANGED,
        default="error",
        help="a done cell whose source changed: error (default), rerun it, or skip it",
    )
    p.add_argument(
        "--rerun-interrupted",
        action="store_true",
        help="run interrupted cells again instead of stopping for a decision",
    )
    p.add_argument(
        "--allow-errors",
        action="store_true",
        help="go on past failed cells (like `jupyter execute --allow-errors`); they stay failed and are retried "
        "by the next run",
    )
    p.add_argument("--force-params", action="store_true", help="resume with other parameters than the instance's")
    p.add_argument("--max-attempts", type=int, default=None, metavar="N", help="attempts per cell before giving up")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    add_store_arg(p)
    p.set_defaults(func=run)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


class Progress:
    """A tqdm bar on a terminal; one log line per cell otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.ran = 0
        self.skipped = 0
        self.started = time.monotonic()
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True)

    def grow(self, total: int) -> None:
        """The notebook got an injected-parameters cell after the bar was made."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def start(self, index: int, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(name[:30])

    def finish(self, outcome: Any) -> None:
        self.done += 1
        replayed = bool(outcome.step.get("replayed"))  # an early end seen again on a resume
        if outcome.status == "ran" or (outcome.status == "ended" and not replayed):
            self.ran += 1
        elif outcome.status == "skipped" or replayed:
            self.skipped += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"ran {self.ran} skipped {self.skipped}")
            self.bar.update(1)
        else:
            took = f"{outcome.seconds:.2f}s"
            extra = f" {outcome.ename}" if outcome.ename else ""
            if outcome.status in ("ran", "skipped") and outcome.ename:
                extra += " (expected: raises-exception)"
            elif outcome.step.get("reason"):
                extra += f" ({outcome.step['reason']})"
            print(
                f"nbrunbook: [{self.done}/{self.total}] {outcome.status:8s} {outcome.name} "
                f"({outcome.cell_id}) {took}{extra}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Checked(NamedTuple):
    """A run's inputs, checked without nbformat (see :func:`check`)."""

    raw: dict[str, Any]  # the notebook's JSON, with derived ids if it had none
    path: str
    params: dict[str, Any]
    derived: str  # the note on derived ids ("" if the notebook has ids)
    cwd: str


def check(args: argparse.Namespace) -> Checked:
    """Check every input that needs no nbformat; sets ``args.kernel`` to the kernel to start.

    Raises ``RunbookError`` (exit 2) before anything is started or written.
    """
    path = os.path.abspath(args.notebook)
    raw = read_json(path)
    from .nb_validation import unrunnable

    problem = unrunnable(raw)  # before a kernel starts: nbclient could not run it either
    if problem is not None:
        raise NotebookError(path, f"cannot be run: {problem}")
    ids = [str(c["id"]) for c in raw["cells"] if c.get("id") is not None]
    dups = [i for i in ids if ids.count(i) > 1]
    if dups:
        # nbformat.reads would silently "repair" them; a step's identity is its id.
        raise DuplicateCellIds(dups)
    if args.instance is not None:
        validate_instance_id(args.instance)
    params = collect(
        yaml_strings=args.parameters_yaml,
        files=args.parameters_file,
        raw=[tuple(p) for p in args.parameters_raw],
        typed=[tuple(p) for p in args.parameters],
    )
    metadata = raw.get("metadata")
    spec = metadata.get("kernelspec") if isinstance(metadata, dict) else None
    named = spec.get("name") if isinstance(spec, dict) else None
    kernel = args.kernel or (named if isinstance(named, str) and named else "python3")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise NotebookError(path, f"kernel {kernel!r} is not installed (see `jupyter kernelspec list`)") from None
    args.kernel = kernel
    if args.cwd is not None and not os.path.isdir(args.cwd):
        raise NotebookError(args.cwd, "--cwd is not a directory")
    # One spelling per store (prefix kept, file made real): two runs naming one
    # store differently must share it, and the kernel gets a cwd-free name.
    args.store = canonical_location(args.store or default_store_path(os.path.dirname(path)))
    # Last, once every input is good: it may read the store for the instance's pinned ids.
    derived = derive_for_run(raw, args.notebook, args.store, args.instance)
    return Checked(raw, path, params, derived, os.path.abspath(args.cwd or os.path.dirname(path)))


def validated(checked: Checked, warn: bool = False) -> Any:
    """The checked notebook as an nbformat node with the parameters injected.

    As lenient as nbclient (see :mod:`.nb_validation`): a schema violation
    nbclient runs with is one warning line on stderr when ``warn``; a notebook
    that cannot run at all is a ``NotebookError``.
    """
    from .nb_validation import read_lenient

    nb, problem = read_lenient(checked.raw, checked.path)
    if problem is not None and warn:
        print(
            f"nbrunbook: warning: {checked.path} is not a valid notebook ({problem}); running it as nbclient does",
            file=sys.stderr,
        )
    return inject(nb, checked.params)


def prepare(args: argparse.Namespace) -> tuple[Any, str, dict[str, Any], str]:
    """Validate everything before a kernel starts or the store is touched.

    Returns (notebook with injected parameters and ids, notebook path,
    parameters, the note on derived ids or ""). Raises ``RunbookError`` (exit 2).
    """
    checked = check(args)
    return validated(checked), checked.path, checked.params, checked.derived


def run(args: argparse.Namespace) -> int:
    """``nbrunbook run``."""
    from .run_signals import Stopped, outside_the_loop

    try:
        with outside_the_loop():
            return _run_checked(args, check(args))
    except Stopped as exc:
        # Ctrl-C / SIGTERM before the first cell: nothing ran; the kernel is stopped.
        print(f"nbrunbook: stopped by {exc}; no cell ran", file=sys.stderr)
        return exc.code


def _run_checked(args: argparse.Namespace, checked: Checked) -> int:
    """Start the kernel and advance the instance (``checked``: the run's validated inputs)."""
    # The kernel boots (~1 s) in its own process while this one imports nbformat
    # and nbclient (~1-2 s here, mostly jsonschema's format checkers) and
    # validates the notebook: it is started before them, not after. If the
    # notebook then turns out invalid, it is killed; nothing else was touched.
    from . import kernel as run_kernel

    try:
        km = run_kernel.start_early(args.kernel, checked.cwd)
    except OSError as exc:  # the kernelspec's argv cannot be started at all
        print(f"nbrunbook: the kernel {args.kernel!r} could not be started: {exc}", file=sys.stderr)
        return cli.EXIT_FAILED
    try:
        return _advance(args, checked, validated(checked, warn=True), km)
    finally:
        run_kernel.stop(km)  # a no-op once the client shut it down; else nothing is left running


def _advance(args: argparse.Namespace, checked: Checked, nb: Any, km: Any) -> int:
    """Run the validated notebook on the started kernel ``km``: one advance of the instance."""
    from .runner import AttachRefused, KernelStartFailed, RunbookClient, RunnerError, write_notebook  # while it boots

    path, params, derived = checked.path, checked.params, checked.derived
    if derived:
        print(f"nbrunbook: {derived}", file=sys.stderr)
    instance = args.instance or new_instance_id()
    runbook = os.path.splitext(os.path.basename(path))[0]
    store = args.store  # canonical, see check()
    output = args.output or os.path.join(os.path.dirname(split_location(store)[1]), "out", runbook, f"{instance}.ipynb")
    options = {
        "mode": "headless",
        "on_changed": args.on_changed,
        "rerun_interrupted": args.rerun_interrupted,
        "wait_timeout": args.wait_timeout,
    }
    if args.allow_errors:
        options["allow_errors"] = True
    if args.max_attempts is not None:
        options["max_attempts"] = args.max_attempts
    # The first look at the store starts its server when none runs (~0.5 s: a
    # process, DuckDB, the file): it goes on while the kernel finishes its start
    # and the client connects, instead of before. The inputs were all validated
    # above, so the store may be touched now; if it refuses, the run ends as if
    # that had come first (one error line - the kernel, on IPC, prints nothing -
    # and no output).
    stored_future = _in_background(_stored_params, store, args.instance)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    progress = Progress(len(code_cells), enabled=not args.no_progress)
    if not args.instance:
        print(f"nbrunbook: new instance {instance} (resume with -i {instance})", file=sys.stderr)

    async def settle_parameters(c: RunbookClient) -> None:
        try:
            stored = await asyncio.wrap_future(stored_future)
        except RunbookError as exc:
            raise _StoreRefused(exc) from None
        if stored is not None and not params:
            # A resume without -p runs with the instance's own parameters.
            c.nb.cells = inject(c.nb, stored).cells
            c.params = None
            progress.grow(sum(1 for cell in c.nb.cells if cell.cell_type == "code"))

    client = RunbookClient(
        nb,
        notebook_path=path,
        instance_id=instance,
        store=store,
        params=params,
        options=options,
        force_params=args.force_params,
        runbook=runbook,
        kernel_name=args.kernel,
        timeout=args.cell_timeout,
        allow_errors=args.allow_errors,
        km=km,
        resources={"metadata": {"path": checked.cwd}},
        before_cell=lambda i, cell: progress.start(i, str(cell.get("id"))),
        on_cell=lambda outcome, i: progress.finish(outcome),
        before_attach=settle_parameters,
    )
    code = cli.EXIT_OK
    message = ""
    resolve: str | None = None
    refused: RunbookError | KernelStartFailed | None = None
    attach_refused: AttachRefused | None = None
    unwritten: OutputNotWritten | None = None
    try:
        code = client.run()
    except _StoreRefused as exc:
        refused = exc.error
    except KernelStartFailed as exc:
        refused = exc  # no cell ran: no output, no summary
    except AttachRefused as exc:
        attach_refused = exc  # nothing ran: no file changes (an earlier run's output stays as it was)
    except RunnerError as exc:
        code, message, resolve = exc.code, exc.message, exc.resolve
    except RunbookError as exc:
        code, message = cli.exit_code_for(exc), str(exc)
    finally:
        progress.close()
        if refused is None and attach_refused is None:
            nb = client.nb
            _step_metadata(nb, store, instance)
            nb.metadata["nbrunbook"] = {
                "instance_id": instance,
                "store": store,
                "exit_code": code,
                "parameters": params,
                **_run_notes(client),
            }
            try:
                write_notebook(nb, output)
            except OutputNotWritten as exc:
                unwritten = exc  # said after the run's own lines; the store has the run
    if isinstance(refused, KernelStartFailed):
        print(f"nbrunbook: {refused.message}", file=sys.stderr)
        return refused.code
    if refused is not None:
        raise refused  # nothing ran and nothing was written, as when the store refused up front
    if attach_refused is not None:
        print(f"nbrunbook: error: {attach_refused.message}", file=sys.stderr)
        return attach_refused.code
    store_arg = f" --store {store}"  # the default store is beside the notebook, not in the cwd
    if resolve is not None:
        # Cut off by a timeout or a signal: the advice belongs to the same line.
        message += f": decide with nbrunbook resolve {instance} {resolve} --rerun|--done|--skip{store_arg}"
    if message:
        print(f"nbrunbook: {message}", file=sys.stderr)
    if code == cli.EXIT_INTERRUPTED and resolve is None:
        stopped = next((o for o in reversed(client.outcomes) if o.ename == "StepInterrupted"), None)
        cell = stopped.cell_id if stopped else "CELL"
        print(
            f"nbrunbook: decide, then run again: nbrunbook resolve {instance} {cell} --rerun|--done|--skip{store_arg}",
            file=sys.stderr,
        )
    summary = f"ran {progress.ran}, skipped {progress.skipped} of {progress.total} cells"
    if unwritten is not None:
        print(f"nbrunbook: error: {unwritten}", file=sys.stderr)
        code = code or cli.EXIT_FAILED
    ended = _how_it_ended(client, code)
    print(
        f"nbrunbook: instance {instance}: {ended}; {summary}; output {output if unwritten is None else 'not written'}",
        file=sys.stderr,
    )
    return code


def _run_notes(client: RunbookClient) -> dict[str, Any]:
    """For the output notebook: where ``sys.exit`` ended the run, which failed cells were let through."""
    notes: dict[str, Any] = {}
    if client.ended is not None:
        notes["ended_early_at"] = client.ended.cell_id
    failed = [o.cell_id for o in client.outcomes if o.status == "failed"]
    if failed:
        notes["failed_cells"] = failed
    return notes


def _how_it_ended(client: RunbookClient, code: int) -> str:
    """The summary's verdict: done, ended early by ``sys.exit``, failures let through, or stopped."""
    if code != cli.EXIT_OK:
        return f"stopped (exit {code})"
    verdict = "done"
    if client.ended is not None:
        e = client.ended
        value = e.evalue.strip() if e.evalue and e.evalue.strip() not in ("", "None") else ""
        verdict = f"ended early at cell {e.name!r} ({e.cell_id}): SystemExit({value})"
    failed = [o for o in client.outcomes if o.status == "failed"]
    if failed:
        names = ", ".join(f"{o.name!r} ({o.cell_id}) {o.ename}" for o in failed)
        verdict += f"; {len(failed)} failed, let through by --allow-errors (the next run retries them): {names}"
    return verdict


class _StoreRefused(Exception):
    """The store refused the run's first look while the kernel was starting."""

    def __init__(self, error: RunbookError) -> None:
        super().__init__(str(error))
        self.error = error


def _in_background(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """Run ``fn(*args)`` on a daemon thread; its result (or error) in a future."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def work() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered to whoever awaits it
            future.set_exception(exc)

    threading.Thread(target=work, name="nbrunbook-store-first-look", daemon=True).start()
    return future


def _stored_params(store: str, instance: str | None) -> dict[str, Any] | None:
    """The parameters of an existing instance (``None`` if it does not exist yet)."""
    if instance is None:
        return None
    from .errors import InstanceNotFound
    from .factory import open_store

    st = open_store(store)
    try:
        return dict(st.get_instance(instance).params)
    except InstanceNotFound:
        return None
    finally:
        st.close()


def _step_metadata(nb: Any, store: str, instance: str) -> None:
    """Each code cell's step as the store has it now, under ``metadata.nbrunbook``."""
    from .factory import open_store

    try:
        st = open_store(store)
    except RunbookError:
        return  # the store is gone: the run's own notes stay
    try:
        steps = {s.path: s for s in st.steps(instance)}
    except RunbookError:
        steps = {}
    finally:
        st.close()
    for cell in nb.cells:
        state = steps.get(f"cell/{cell.get('id')}") if cell.cell_type == "code" else None
        if state is not None:
            cell.metadata.setdefault("nbrunbook", {}).update(
                status=state.status,
                step_key=state.step_key,
                attempt=state.attempt,
                idempotency_key=state.idempotency_key,
                run_id=state.run_id,
            )
