"""Which client sent the execute_request being handled: the notebook, or something else on its kernel.

Every Jupyter client stamps its own session id into each message header
(``header.session``): a JupyterLab notebook panel and a console attached to
the same kernel have separate kernel connections, hence separate ids, and so
do the headless runner and any other ``jupyter_client``. A JupyterLab console
also sends a ``cellId`` (a fresh uuid per console cell, from
``CodeCell.execute``), so the id alone cannot tell a console cell from a new
notebook cell that was not saved yet; the sender can. A JupyterLab notebook
also sends ``deletedCells`` in the request metadata (its console never does),
which identifies a notebook whose connection is new (a reloaded page).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Origin:
    """The sender of the current request.

    ``client``: the header's session id (None outside a kernel, e.g. a plain
    ``InteractiveShell``). ``notebook_frontend``: the request carries
    JupyterLab's notebook-only metadata.
    """

    client: str | None = None
    notebook_frontend: bool = False


def current_origin(shell: Any) -> Origin:
    """The origin of the execute_request the kernel is handling now (never raises)."""
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return Origin()
    try:
        parent = kernel.get_parent("shell")
    except (AttributeError, TypeError, LookupError):
        parent = getattr(kernel, "_parent_header", None)
    if not isinstance(parent, dict):
        return Origin()
    header = parent.get("header")
    client = header.get("session") if isinstance(header, dict) else None
    meta = parent.get("metadata")
    return Origin(
        client=client if isinstance(client, str) and client else None,
        notebook_frontend=isinstance(meta, dict) and "deletedCells" in meta,
    )
