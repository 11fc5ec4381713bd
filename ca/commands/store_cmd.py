"""`hsmca store move`: a single node's CA into PostgreSQL (ca/store_move.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from ca.commands.args import confirm
from ca.errors import CLIError

URL_ENV = "HSMCA_STORE_URL"


def move(args: argparse.Namespace) -> int:
    from ca.config import check_store_url, load
    from ca.logs import configure
    from ca.store_move import MoveError, database_name, move
    url = args.store_url or os.environ.get(URL_ENV)
    if not url:
        raise CLIError(f"name the PostgreSQL database: --store-url URL, or {URL_ENV} (which "
                       "keeps a password off the command line)")
    try:
        check_store_url(url)
    except ValueError as exc:
        raise CLIError(f"{'--store-url' if args.store_url else URL_ENV} {exc}") from None
    # Warnings (tiles not copied) go to stderr, not into the summary; the schema's
    # set-up in the new database is no news.
    configure(logging.WARNING)
    try:
        name = database_name(url)
        config = load(args.config)
        from ca.audit.log import ensure_unlocked
        ensure_unlocked(config.audit_log)  # a running daemon: said before the question
        if not args.yes:
            confirm(f"Move the CA of {config.path} into {name}? The daemon must be stopped; "
                    "afterwards every node runs with `--node NAME`.", "nothing moved")
        done = asyncio.run(move(config, url))
    except MoveError as exc:
        raise CLIError(str(exc)) from None
    if not done.rows:
        print(f"finished the move into {done.database}, which had committed before it "
              f"stopped: {config.path} has [store] url, the SQLite inventory is kept as "
              f"{done.kept}")
    else:
        rows = ", ".join(f"{table} {n}" for table, n in sorted(done.rows.items()) if n)
        print(f"moved into {done.database}: {rows}")
        print(f"  the audit log so far is the CA's `init` log there ({done.rows['audit_lines']} "
              "lines, with its checkpoint); each node keeps a log of its own from now on")
        print(f"  the SQLite inventory is kept as {done.kept}; nothing opens it again")
        print(f"  {config.path} has [store] url")
    print(f"Start each node: hsmca serve --config {config.path} --node NAME (docs/cluster.md)")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("store", help="the inventory: move a single node's CA into PostgreSQL")
    ssub = s.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    m = ssub.add_parser(
        "move", help="a single node's CA into PostgreSQL, so more nodes can run it",
        description="With the daemon stopped: record the move in the audit log and sign a "
        "checkpoint over it, then copy, in one PostgreSQL transaction, every inventory table "
        "and the audit log so far (as the CA's `init` log, byte for byte with its "
        "checkpoint) into an empty database; add [store] url to the config and keep the "
        "SQLite file under a new name. Then start each node with `hsmca serve --node NAME` "
        "(docs/cluster.md, \"Growing from one node\").")
    m.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                   help="the CA's config (default ./hsmca.toml)")
    m.add_argument("--store-url", metavar="URL",
                   help=f"the empty PostgreSQL database, postgresql://... (or {URL_ENV}); it "
                   "goes into the config as [store] url")
    m.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    m.set_defaults(command_key="store-move")
