"""`hsmca store move`: a single node's CA into PostgreSQL, so that more nodes can run
it (docs/cluster.md, "Growing from one node").

With the daemon stopped (the audit log's lock says so, as for a root rotation):

1. the move is recorded in the audit log (`store.move`, naming the database without
   its credentials), and a checkpoint signed by the audit key covers it;
2. in one PostgreSQL transaction: every inventory table row for row (PostgreSQL's
   schema is SQLite's migrations in its dialect), the CRL numbers carried on, and the
   audit log so far, byte for byte with that checkpoint, as the CA's ceremony log
   (`init`, the log `hsmca init --store-url` starts): every line the node ever wrote
   stays verifiable, through any node;
3. the config gains `[store] url`, and the SQLite file is renamed, kept but never
   opened again. Each node started with `hsmca serve --node NAME` then keeps a log of
   its own.

A failure before the commit leaves PostgreSQL empty and the node as it was (its log
then says that a move was tried).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    load_pem_public_key,
)

from ca.audit.checkpointer import Checkpointer, publish_key
from ca.audit.cluster import CEREMONIES
from ca.audit.cluster_tiles import copy_tiles
from ca.audit.log import TILES_DIR, AuditLog, AuditLogError, held
from ca.audit.tiles import FileTileStore, TileDamaged, stored_tiles
from ca.config import Config
from ca.daemon.keys import load_issuers
from ca.fileutil import write_atomic
from ca.issuance.pipeline import SigningPipeline
from ca.revocation.from_log import complete_from_log
from ca.store import open_store, refuse_another_files_wal
from ca.store.errors import CAExists, StoreUnavailable
from ca.store.sqlite import export_inventory

if TYPE_CHECKING:
    from ca.store.postgres import PostgresStore

log = structlog.get_logger("hsmca.store")


class MoveError(Exception):
    pass


@dataclass(frozen=True)
class Moved:
    rows: dict[str, int]  # by table, and the audit lines and tiles; empty: finished only
    database: str  # the URL without its credentials
    kept: Path  # the SQLite file, renamed


def database_name(url: str) -> str:
    """`url` as it may be written in a log or shown: its hosts, ports and database, as
    libpq reads them (no user, no password, no options). MoveError for what libpq
    cannot read, without quoting any of it."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        raise MoveError("--store-url is not a connection URL libpq can read: percent-encode "
                        "any '#', '?', '@', ':' or '/' inside its user name or password"
                        ) from None
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{parts.get('host') or 'localhost'}{port}/{parts.get('dbname', '')}"


async def move(config: Config, url: str) -> Moved:
    """Move `config`'s CA into the empty PostgreSQL database at `url`, or finish a move
    into it that stopped after PostgreSQL committed it."""
    if config.cluster:
        raise MoveError(f"the inventory of {config.path} is PostgreSQL already ([store] url)")
    name = database_name(url)
    new_config = _config_with_store(config.path, url)  # checked before anything moves
    if not config.db_path.exists() and not config.moved_db_path.exists():
        raise MoveError(f"no SQLite inventory at {config.db_path}")
    # Before the audit log's store.move line and anything PostgreSQL is asked: the move
    # reached this refusal only when it opened the inventory, its line written (a trial).
    refuse_another_files_wal(config.db_path)
    if config.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = config.softhsm_conf
    audit_key = load_pem_public_key(config.audit_key_pem.read_bytes())
    if not isinstance(audit_key, Ed25519PublicKey):
        raise MoveError(f"{config.audit_key_pem} is not an Ed25519 public key")
    import psycopg

    from ca.store.postgres import PostgresStore
    target = PostgresStore(url)  # reachable, and at this code's schema
    try:
        if await target.keys() or await target.audit_logs():
            with _locked(config.audit_log):
                if not _moved_there(target, config.audit_log):
                    raise CAExists("the database of --store-url already holds a CA (keys or "
                                   "audit lines): move into an empty database")
                # This move committed, then stopped: finish it.
                return Moved({}, name, _finish(config, new_config))
        if not config.db_path.exists():
            raise MoveError(f"no SQLite inventory at {config.db_path} (it was moved to "
                            f"{config.moved_db_path}, but not into {name})")
        note = await _record_move(config, audit_key, name)
        # The log's lock again, until PostgreSQL has it all: no daemon may start on
        # SQLite meanwhile. Every line goes, the logout after the checkpoint included.
        with _locked(config.audit_log):
            write_atomic(config.move_marker, f"{name}\n")
            try:
                rows = target.import_ca(export_inventory(config.db_path), CEREMONIES,
                                        _lines(config.audit_log),
                                        (int(note.split("\n")[1]), note))
            except psycopg.Error as exc:  # a refusal: the transaction left nothing
                config.move_marker.unlink(missing_ok=True)
                raise MoveError("PostgreSQL refused the move, which left it as it was: "
                                + " ".join(str(exc).split())) from None
            kept = _finish(config, new_config)
        # Last: tiles are made from lines and can be made again; a stop here costs
        # speed, not the move.
        rows["audit_tiles"] = _copy_tiles(config.audit_log.parent / TILES_DIR, target)
    finally:
        target.close()
    return Moved(rows, name, kept)


async def _record_move(config: Config, audit_key: Ed25519PublicKey, name: str) -> str:
    """The `store.move` line and a checkpoint over it, signed with the audit key in the
    HSM; the checkpoint's note. Opening the log takes its lock (the daemon must be
    stopped) and checks it."""
    audit = AuditLog.open(config.audit_log, config.checkpoint_path, audit_key)
    pipeline = SigningPipeline(config.hsm, audit)
    try:
        pipeline.start()
        store = open_store(config.store_location)
        try:
            # What the log records and the inventory lacks (a revocation cut short by a
            # stop, CRL numbers an older inventory would sign again) goes with the
            # inventory: once it is the `init` log in PostgreSQL, no node's start reads
            # this log again (ca/revocation/from_log.py).
            if completed := await complete_from_log(config.audit_log, store, ""):
                print(f"hsmca: warning: completed {len(completed)} revocation(s) the audit "
                      "log records and the inventory lacked (a stop between the two)",
                      file=sys.stderr)
            issuers = await load_issuers(store, pipeline)
        finally:
            store.close()
        await audit.append("store.move", to=name)
        await Checkpointer(audit, pipeline, [issuers.audit, *issuers.audit_previous],
                           config.audit_origin, config.checkpoint_path,
                           on_handover=publish_key(config.audit_key_pem)).checkpoint()
        return config.checkpoint_path.read_text()
    finally:
        pipeline.close()  # its logout goes into the log too
        audit.close()


def _moved_there(target: PostgresStore, log_path: Path) -> bool:
    """Whether PostgreSQL's `init` log is this node's log as a move left it: as many
    lines, the last one the same (a move that committed and then stopped)."""
    lines, last = 0, b""
    for lines, last in enumerate(_lines(log_path), start=1):  # noqa: B007
        pass
    return bool(lines) and target.audit_size_sync(CEREMONIES) == lines and \
        target.audit_lines_sync(CEREMONIES, lines - 1, 1) == [last]


def _finish(config: Config, new_config: str) -> Path:
    """After the commit: the SQLite inventory set aside first (a daemon started now
    refuses to start on SQLite rather than make an empty one), then the config."""
    kept = _set_aside(config)
    try:
        _write_config(config.path, new_config)
    except OSError as exc:
        raise MoveError(f"the CA is in PostgreSQL, but {config.path} could not be written "
                        f"({exc.strerror}): run `hsmca store move` again to finish, or add "
                        "its [store] url yourself") from None
    config.move_marker.unlink(missing_ok=True)  # finished
    return kept


def _config_with_store(path: Path, url: str) -> str:
    """The config's text with `[store] url` appended, everything the operator wrote kept;
    MoveError if that would not read back as this URL."""
    text = path.read_text()
    new = (text.rstrip("\n") + "\n\n# The inventory the nodes share (added by `hsmca store "
           "move`).\n" + tomli_w.dumps({"store": {"url": url}}))
    try:
        stored = tomllib.loads(new).get("store", {}).get("url")
    except tomllib.TOMLDecodeError:
        stored = None
    if stored != url:
        raise MoveError(f"{path} has a [store] table already: remove it, then move again")
    return new


def _write_config(path: Path, text: str) -> None:
    """Replace the config, keeping its mode and owner (a move run as root must leave
    it readable by the daemon's user)."""
    st = path.stat()
    write_atomic(path, text, stat.S_IMODE(st.st_mode))
    if os.geteuid() == 0:
        os.chown(path, st.st_uid, st.st_gid)


def _copy_tiles(directory: Path, target: PostgresStore) -> int:
    """The log's Merkle tiles to PostgreSQL, as a node copies its own, so that any node
    proves the `init` log from a handful of rows rather than from all its lines. They
    are made from the lines and can be made again: a failure here costs speed, not
    the move (0 tiles)."""
    try:
        store = FileTileStore(directory)
    except TileDamaged as exc:
        log.warning("the audit log's tiles were not copied", error=str(exc))
        return 0
    try:
        return copy_tiles(lambda since: stored_tiles(store, since), target, CEREMONIES)
    except (AuditLogError, TimeoutError, StoreUnavailable) as exc:  # copy_tiles' refusals
        log.warning("the audit log's tiles were not copied", error=str(exc))
        return 0
    finally:
        store.close()


def _lines(path: Path) -> Iterator[bytes]:
    """The log's lines, without their newlines."""
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return  # a torn last line is no line (the log's recovery cuts it)
            yield line[:-1]


def _locked(path: Path) -> contextlib.AbstractContextManager[None]:
    """The audit log's lock (the one `AuditLog.open` takes), held for the block."""
    return held(path, MoveError(f"the audit log {path} was locked again (a daemon "
                                "started?): nothing was moved; stop it and move again"))


def _set_aside(config: Config) -> Path:
    """Rename the SQLite inventory (with its WAL, if any), so nothing opens it again."""
    moved = config.moved_db_path
    for suffix in ("-wal", "-shm", ""):
        src = config.db_path.with_name(config.db_path.name + suffix)
        if src.exists():
            src.rename(moved.with_name(moved.name + suffix))
    return moved


