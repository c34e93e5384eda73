"""``nbrunbook dashboard [--store S] [--port P]``."""

from __future__ import annotations

import argparse
from typing import Any

from .cli_common import add_store_arg
from .factory import default_store_path


def register(sub: Any) -> None:
    """Add the ``dashboard`` subcommand."""
    p = sub.add_parser("dashboard", help="serve the store dashboard (Voilà) on 127.0.0.1")
    p.add_argument("--port", type=int, default=8866, metavar="P", help="port (default 8866)")
    p.add_argument("--instance", metavar="INSTANCE", help="open this instance's dashboard first")
    add_store_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    from nbrunbook.widgets.serve import serve

    return serve(args.store or default_store_path(), args.port, args.instance)
