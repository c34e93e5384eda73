"""``nbrunbook dashboard``: serve the store dashboard with Voilà on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DASHBOARD = Path(__file__).with_name("dashboard.ipynb")


def voila_command(port: int) -> list[str]:
    """The Voilà command line serving the shipped, read-only dashboard notebook."""
    return [
        sys.executable,
        "-m",
        "voila",
        str(DASHBOARD),
        f"--port={port}",
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        "--show_tracebacks=True",
    ]


def serve(store: str, port: int, instance: str | None = None) -> int:
    """Become Voilà (exec) in the foreground until interrupted.

    Exec, not a child process: a signal to ``nbrunbook dashboard`` reaches Voilà
    itself, which shuts its kernels down, so nothing is left behind.
    """
    try:
        import voila  # noqa: F401
    except ImportError:
        from nbrunbook.engine.errors import RunbookError

        raise RunbookError("the dashboard needs Voilà: pip install 'nbrunbook[dashboard]'") from None
    from nbrunbook.engine.factory import canonical_location

    env = {**os.environ, "NBRUNBOOK_STORE": canonical_location(store)}
    if instance:
        env["NBRUNBOOK_DASHBOARD_INSTANCE"] = instance
    print(
        f"nbrunbook dashboard: http://127.0.0.1:{port}/ (store {env['NBRUNBOOK_STORE']}); Ctrl-C stops it", flush=True
    )
    sys.stdout.flush()
    command = voila_command(port)
    os.execve(command[0], command, env)
    return 1  # not reached
