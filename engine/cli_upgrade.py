"""``nbrunbook upgrade NOTEBOOK``: write cell ids into a notebook that has none.

The ids written are the ones runs already use: when the store holds the
runbook (or the instance named with ``-i``), the notebook's cells are aligned
to that pinned manifest first (:func:`~nbrunbook.engine.notebook_ids.align`),
so an upgraded notebook resumes the same steps even if it was edited since.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .cli_common import add_store_arg
from .errors import InstanceNotFound
from .factory import default_store_path
from .keys import validate_instance_id
from .notebook_ids import pinned_cells, read_json, upgrade


def register(sub: Any) -> None:
    """Add the ``upgrade`` subcommand."""
    p = sub.add_parser(
        "upgrade",
        help="write stable cell ids into an nbformat 4.4 notebook (the only command that modifies a notebook)",
        description="Write cell ids into NOTEBOOK (nbformat 4.4 and older have none). Cells keep the ids their "
        "runs already use (the runbook's latest pinned cells in the store, or INSTANCE's), so instances resume "
        "the same steps.",
    )
    p.add_argument("notebook", metavar="NOTEBOOK")
    p.add_argument(
        "-i", "--instance", metavar="INSTANCE", help="keep the ids this instance uses (default: the runbook's latest)"
    )
    add_store_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Upgrade in place; say what happened."""
    path = os.path.abspath(args.notebook)
    read_json(path)  # a bad notebook is refused before the store is looked at
    instance = getattr(args, "instance", None)
    if instance is not None:
        validate_instance_id(instance)
    store = getattr(args, "store", None) or default_store_path(os.path.dirname(path))
    runbook = os.path.splitext(os.path.basename(path))[0]
    pinned = pinned_cells(store, instance=instance, runbook=None if instance else runbook)
    if instance is not None and pinned is None:
        # Named but unknown: writing order-derived ids would silently disown its steps.
        raise InstanceNotFound(instance)
    n = upgrade(args.notebook, pinned)
    if n:
        kept = "; cells keep the ids their instances use" if pinned else ""
        print(f"{args.notebook}: wrote ids for {n} cells (nbformat 4.5){kept}; instances keep their history")
    else:
        print(f"{args.notebook}: every cell already has an id; nothing changed")
    return 0
