"""The run's kernel: its manager and client, and starting it before the rest of the run is ready.

Kept apart from :mod:`.runner` because it needs only jupyter_client: ``nbrunbook
run`` starts the kernel process first and imports nbclient and nbformat
(seconds of imports in a Jupyter environment, most of it jsonschema's format
checkers) while the kernel boots on the other core - see :func:`start_early`.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import typing as t

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from traitlets import Any as AnyTrait
from traitlets import DottedObjectName, Type

from . import protocol
from .errors import RunbookError

#: What nbclient passes to a kernel it starts (its ``ipython_hist_file`` default):
#: no history database on disk for a headless run.
HISTORY_ARGS = ("--HistoryManager.hist_file=:memory:",)


class MetadataKernelClient(AsyncKernelClient):
    """An ``AsyncKernelClient`` whose next ``execute`` carries request metadata.

    jupyter_client's ``execute`` cannot set the request's metadata, which is
    where JupyterLab puts ``cellId``; this is the one place we build the
    ``execute_request`` ourselves, with the same content jupyter_client builds.
    """

    next_metadata = AnyTrait(default_value=None, allow_none=True)

    def execute(
        self,
        code: str,
        silent: bool = False,
        store_history: bool = True,
        user_expressions: dict[str, t.Any] | None = None,
        allow_stdin: bool | None = None,
        stop_on_error: bool = True,
    ) -> str:
        """Send an execute_request with :attr:`next_metadata` (then cleared)."""
        metadata, self.next_metadata = self.next_metadata or {}, None
        content = {
            "code": code,
            "silent": silent,
            "store_history": store_history and not silent,
            "user_expressions": user_expressions or {},
            "allow_stdin": self.allow_stdin if allow_stdin is None else allow_stdin,
            "stop_on_error": stop_on_error,
        }
        msg = self.session.msg("execute_request", content, metadata=metadata)
        self.shell_channel.send(msg)
        return str(msg["header"]["msg_id"])


def _ipc_prefix() -> str | None:
    """Where the run's kernel puts its ZMQ sockets; ``None`` keeps Jupyter's default (TCP).

    The store server's private runtime directory (0700, checked; see
    :func:`.protocol.runtime_dir`) already holds Unix sockets, so it can hold
    these too; ZMQ adds ``-1`` ... ``-5`` to the prefix.
    """
    if os.name != "posix":
        return None
    try:
        directory = protocol.runtime_dir()
    except RunbookError:
        return None
    prefix = os.path.join(directory, f"kernel-{secrets.token_hex(6)}")
    return prefix if len(os.fsencode(prefix)) + 2 <= protocol.SOCKET_PATH_MAX else None


class RunbookKernelManager(AsyncKernelManager):
    """An ``AsyncKernelManager`` handing out :class:`MetadataKernelClient` s, over IPC.

    Jupyter's default transport is TCP on 127.0.0.1: every local user can
    subscribe to the kernel's IOPub port and read its outputs (messages are
    signed, not encrypted), and ipykernel warns about it on stderr at every
    start. A headless run needs no remote client, so its kernel listens on
    Unix sockets in the user's private runtime directory instead (unless
    configured otherwise, or where there are none).
    """

    client_class = DottedObjectName("nbrunbook.engine.kernel.MetadataKernelClient")
    client_factory = Type(MetadataKernelClient, klass=AsyncKernelClient)

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        configured = "transport" in kwargs or "transport" in self.config.get("KernelManager", {})
        prefix = None if configured else _ipc_prefix()
        if prefix is not None:
            self.transport = "ipc"
            self.ip = prefix
        self.stderr_file: t.IO[bytes] | None = None
        self.stderr_tail = ""

    async def _async_start_kernel(self, **kw: t.Any) -> None:
        """Start the kernel with its process's stderr in an anonymous file (see :func:`kernel_stderr`).

        The kernel's own stderr is its log (cell output reaches the notebook
        over IOPub, fd-level writes included): shown on the terminal it is
        noise at best - "KeyboardInterrupt caught in kernel" when jupyter_client
        interrupts it on shutdown - and at worst a 30-line ZMQ traceback under
        a one-line refusal, when a kernel started alongside a refused run is
        torn down while still sending. It is kept for whoever needs it (a
        kernel that died) instead. The file has no name: nothing is left behind.
        """
        if "stderr" not in kw:
            if self.stderr_file is None:
                self.stderr_file = tempfile.TemporaryFile()
            kw["stderr"] = self.stderr_file
        await super()._async_start_kernel(**kw)

    # jupyter_client binds its public names to the private coroutines the same way.
    start_kernel: t.Callable[..., t.Awaitable[None]] = _async_start_kernel

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        """jupyter_client's cleanup, and the stderr file once the kernel is gone for good.

        Overrides the private name because ``shutdown_kernel`` calls it, not ``cleanup_resources``.
        """
        await super()._async_cleanup_resources(restart=restart)
        if not restart and self.stderr_file is not None:
            self.stderr_tail = kernel_stderr(self)  # kept: a dead kernel's last words are read after this
            self.stderr_file.close()
            self.stderr_file = None

    cleanup_resources: t.Callable[..., t.Awaitable[None]] = _async_cleanup_resources


def kernel_stderr(km: RunbookKernelManager, limit: int = 4000) -> str:
    """The last ``limit`` characters the kernel process wrote to its stderr (kept after its cleanup)."""
    fh = km.stderr_file
    if fh is None or fh.closed:
        return km.stderr_tail[-limit:]
    try:
        fh.flush()
        size = os.fstat(fh.fileno()).st_size
        data = os.pread(fh.fileno(), limit * 4, max(0, size - limit * 4))
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-limit:]


def start_early(kernel_name: str, cwd: str) -> RunbookKernelManager:
    """Launch the run's kernel now and return its manager, without waiting for it to be ready.

    The kernel boots in its own process while the caller finishes preparing
    the run; :class:`.runner.RunbookClient` then connects to it (and shuts it
    down at the end, as nbclient does with a kernel it started). The same
    arguments as nbclient's own start: the kernel, its working directory, no
    history file. If the run is abandoned before that hand-over, the caller
    must :func:`stop` it.
    """
    km = RunbookKernelManager(kernel_name=kernel_name)
    run_sync(km.start_kernel)(cwd=cwd, extra_arguments=list(HISTORY_ARGS))
    return km


def stop(km: RunbookKernelManager) -> None:
    """Kill a kernel from :func:`start_early` that is still running, and remove its files.

    A no-op for a kernel its client already shut down.
    """
    if not km.has_kernel:
        return
    try:
        run_sync(km.shutdown_kernel)(now=True)
    finally:
        run_sync(km.cleanup_resources)()


def last_words(km: t.Any) -> str:
    """The line a dead kernel's stderr ends with that says why (not a traceback frame), or ""."""
    if not isinstance(km, RunbookKernelManager):
        return ""
    lines = [ln.strip() for ln in kernel_stderr(km).splitlines() if ln.strip() and not ln[:1].isspace()]
    # ipykernel's own log lines ("[IPKernelApp] ...") are not why it died.
    lines = [ln for ln in lines if not ln.startswith("[IPKernelApp]") and not ln.startswith("Traceback")]
    return lines[-1][:300] if lines else ""
