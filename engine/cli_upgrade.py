"""``nbrunbook upgrade NOTEBOOK``: write cell ids into a notebook that has none."""

from __future__ import annotations

import argparse
from typing import Any

from .notebook_ids import upgrade


def register(sub: Any) -> None:
    """Add the ``upgrade`` subcommand."""
    p = sub.add_parser(
        "upgrade",
        help="write stable cell ids into an nbformat 4.4 notebook (the only command that modifies a notebook)",
    )
    p.add_argument("notebook", metavar="NOTEBOOK")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Upgrade in place; say what happened."""
    n = upgrade(args.notebook)
    if n:
        print(f"{args.notebook}: wrote ids for {n} cells (nbformat 4.5); instances keep their history")
    else:
        print(f"{args.notebook}: every cell already has an id; nothing changed")
    return 0
