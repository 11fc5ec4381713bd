"""`hsmca backup`: a consistent copy of a single node's CA (ca/backup.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ca.errors import CLIError


def run(args: argparse.Namespace) -> int:
    from ca.backup import BackupError, backup
    from ca.config import ConfigError, load
    try:
        config = load(args.config)
        done = backup(config, args.out)
    except (BackupError, ConfigError) as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"cannot write the backup: {exc.strerror}: {exc.filename}") from None
    print(f"backed up the CA of {config.path} to {done.out}:")
    print(f"  inventory: {done.certificates} certificates, as of one moment "
          f"({config.db_path.name})")
    print(f"  audit log: {done.lines} lines, each chained to the one before; the copied "
          f"checkpoint, signed by the copied audit key, covers the first {done.signed}"
          + (f" (should `hsmca audit verify` call the {done.lines - done.signed} after it "
             "unsigned: the restored daemon's first checkpoint covers them, and "
             "--allow-unsigned accepts them meanwhile)" if done.lines > done.signed + 2
             else ""))
    print(f"  {done.files} more files: the config, the CA certificates, the admin and TLS "
          "credentials")
    print("not in it:")
    print(f"  the keys, which never leave the HSM: back up token {config.hsm.token!r} by the "
          f"HSM's own means{_softhsm_hint(config.softhsm_conf)}")
    pin = config.hsm.pin_source
    inside = pin.startswith("file:") and Path(pin[5:]).resolve().is_relative_to(
        config.state_dir.resolve())
    if inside:
        print(f"  the PIN: except that its file {pin[5:]} is inside the state directory, so "
              "the copy holds it: keep the backup as secret as the PIN, or move the file out")
    else:
        print(f"  the PIN ({pin})")
    print(f"to restore: with this CA stopped, put {done.out} where the state directory was "
          f"and run hsmca serve --config <there>/{config.path.name} (beside the running CA, "
          "the copy would be a second CA on the same keys); what the CA did after this "
          "backup is not in it (docs/operator.md, \"Backup and restore\")")
    return 0


def _softhsm_hint(conf: str | None) -> str:
    if conf is None:
        return ""
    try:
        text = Path(conf).read_text()
    except OSError:
        return f" (SoftHSM: the token directory {conf} names)"
    found = re.search(r"^\s*directories\.tokendir\s*=\s*(\S+)", text, re.MULTILINE)
    where = found.group(1) if found else f"the token directory {conf} names"
    return f" (SoftHSM: copy {where} while no process has the token open)"


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    b = sub.add_parser(
        "backup", help="copy a single node's CA, consistently, while it runs or not",
        description="Copy the CA's inventory (an SQLite snapshot of one moment), its audit "
        "log up to its last whole line with the latest checkpoint, and the config, "
        "certificates and credentials it needs to start, into a new directory. The daemon "
        "may be running: nothing it does waits for the backup, and a revocation or key "
        "rotation that lands meanwhile makes it copy again. The copy is checked: every line "
        "of its log chains to the one before, and its checkpoint, signed by its audit key "
        "(one its inventory knows), covers its first lines. The keys stay in the HSM and the PIN "
        "where pin-source keeps it: back those up by their own means. Restore by putting "
        "the directory where the state directory was and starting `hsmca serve` "
        "(docs/operator.md, \"Backup and restore\"). Several nodes on PostgreSQL: back up "
        "the database instead.")
    b.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                   help="the CA's config (default ./hsmca.toml)")
    b.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="a new (or empty) directory for the copy; made with mode 0700")
    b.set_defaults(command_key="backup")
