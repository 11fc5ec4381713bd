"""`hsmca`: the command line. Every expected failure is one line on stderr."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ca.commands.args import state_file
from ca.commands.examples import add_examples, tour
from ca.decimal_text import is_decimal
from ca.errors import ClientError, CLIError
from hsm.errors import AuditUnavailable, HSMError

# Each command's help ends with its own examples (ca/commands/examples.py); this one
# with a tour of them, and where the rest are.
EPILOG = tour() + """

Run `hsmca COMMAND --help` for the flags of one command, and more examples.
"""


# command -> "module:function", imported only when that command runs (fast --help).
COMMANDS = {
    "init": "init_cmd:run", "audit-verify": "audit_cmd:verify", "audit-show": "audit_cmd:show",
    "audit-prove": "audit_prove:prove",
    "serve": "client_cmd:serve", "token-create": "client_cmd:token_create",
    "enroll": "client_cmd:enroll", "renew": "client_cmd:renew", "revoke": "client_cmd:revoke",
    "status": "client_cmd:status",
    "ssh-host": "ssh_cmd:host", "ssh-user": "ssh_cmd:user", "ssh-revoke": "ssh_cmd:revoke",
    "ssh-list": "ssh_cmd:list_certs",
    "ssh-known-hosts": "ssh_cmd:known_hosts",
    "key": "key_cmd:run",
    "acme-eab-create": "acme_cmd:eab_create", "acme-eab-list": "acme_cmd:eab_list",
    "acme-eab-withdraw": "acme_cmd:eab_withdraw", "acme-account-list": "acme_cmd:account_list",
    "acme-account-deactivate": "acme_cmd:account_deactivate",
    "cert-list": "cert_cmd:list_certs", "cert-show": "cert_cmd:show_cert",
    "witness-serve": "witness_cmd:serve",
    "ui": "ui_cmd:run", "store-move": "store_cmd:move", "backup": "backup_cmd:run",
}


def _command(key: str) -> Callable[[argparse.Namespace], int]:
    module, func = COMMANDS[key].split(":")
    return getattr(importlib.import_module(f"ca.commands.{module}"), func)  # type: ignore[no-any-return]


def _ca_name(text: str) -> str:
    """A CA name for the certificates' common names: printable, short enough that a
    rotated issuing key's name still fits in a common name."""
    from ca.issuance.profiles import MAX_CA_NAME
    text = text.strip()
    if not 0 < len(text) <= MAX_CA_NAME or not text.isprintable() or "," in text:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_CA_NAME} printable characters, "
                                         "without commas, e.g. \"Example Corp staging\"")
    return text


def _non_negative(text: str) -> int:
    if not is_decimal(text):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return int(text)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (docs/operator.md), pointing at --help."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice: 'stop'" in message:  # (an operator's trial looked for one)
            message += ("; a running `hsmca serve` stops on SIGTERM: `systemctl stop "
                        "hsmca`, `kill PID`, or Ctrl-C")
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        # Extra arguments are found by the top parser, which named its own --help; the
        # command's says which flags it has (an operator's trial: --tokn-file).
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            words = [self.prog]
            word = getattr(parsed, "command", None)
            while word:  # `hsmca acme eab create`: each level's choice is <word>_command
                words.append(word)
                word = getattr(parsed, f"{word}_command", None)
            prog = " ".join(words)
            self.exit(2, f"{self.prog}: error: unrecognized arguments: {' '.join(extra)} "
                      f"(see `{prog} --help`)\n")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="hsmca", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="A certificate authority whose keys never leave a PKCS#11 HSM.")
    p.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    i = sub.add_parser("init", help="create the CA keys in the HSM and a state directory",
                       description="Generate non-exportable keys inside the HSM (root CA, "
                       "issuing CA, SSH user CA, SSH host CA, audit key), sign the CA "
                       "certificates, and write the state directory. Refuses to overwrite "
                       "existing keys or state. With SoftHSM, the token is found through "
                       "SOFTHSM2_CONF as exported now (the config records it for serve). "
                       "The PIN file must be mode 0600 (serve refuses anything looser); the "
                       "daemon reads its state from the directory its config is in.")
    i.add_argument("--state-dir", required=True, type=Path, help="directory to create the CA in")
    i.add_argument("--module", required=True, help="path of the PKCS#11 module (.so)")
    i.add_argument("--token", required=True, help="label of the (initialised) token")
    i.add_argument("--pin-file", required=True, type=Path,
                   help="file holding the token's user PIN, mode 0600 (the config records "
                   "its path, never the PIN)")
    i.add_argument("--key-type", default="ec-p256",
                   choices=["ec-p256", "ec-p384", "ed25519", "rsa-3072"],
                   help="type of the CA keys (default ec-p256; the audit key is always "
                   "Ed25519)")
    i.add_argument("--name", type=_ca_name, default="hsmca", metavar="NAME",
                   help="the CA's name: its certificates are 'NAME Root CA' and 'NAME "
                   "Issuing CA', so relying parties and errors tell this CA from another "
                   "(staging from production); default hsmca")
    i.add_argument("--dns-name", default="localhost",
                   help="DNS name of the daemon, in its TLS certificate (default localhost)")
    i.add_argument("--store-url", metavar="URL",
                   help="a postgresql:// URL: the inventory is that database, shared by "
                   "several nodes (docs/cluster.md), and goes into the config as [store] url "
                   "(default: SQLite in the state directory)")
    i.set_defaults(command_key="init")

    from ca.commands import acme_cmd, cert_cmd, client_cmd, key_cmd, ssh_cmd
    client_cmd.add_parsers(sub)
    cert_cmd.add_parsers(sub)
    ssh_cmd.add_parsers(sub)
    key_cmd.add_parsers(sub)
    acme_cmd.add_parsers(sub)

    a = sub.add_parser("audit", help="verify or read the operation log")
    asub = a.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    v = asub.add_parser(
        "verify", help="verify the log offline, or a running daemon's log incrementally",
        description="Recompute every line hash, the chain, intent/outcome pairing, the Merkle "
        "root of every checkpoint and its signature with the pinned audit key. With --state, "
        "also prove the log still holds every line verified last time, unchanged, whether a "
        "checkpoint covered it or not. With --url, fetch the lines from the daemon (auditor "
        "or admin client certificate): after the first run only the lines added since, "
        "checked with the daemon's consistency proof. Exit 0 only if all holds; otherwise "
        "name the first bad line. With --log, lines that no checkpoint covers are UNSIGNED "
        "and exit 1 too, unless --allow-unsigned; except the final checkpoint's own intent "
        "and outcome and the hsm.logout after them, with which every stopped daemon's log "
        "ends (no checkpoint can cover its own signing).")
    source = v.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", type=Path, help="the log file (log.jsonl)")
    source.add_argument("--url", help="the daemon's URL, to verify its log remotely "
                        "(needs --state, --client-cert and --client-key)")
    # --key names the pinned audit key here (as it always has), so the client key is
    # --client-key only; --cert is accepted for --client-cert as in other commands.
    v.add_argument("--key", "--audit-key", dest="key", type=str, required=True,
                   metavar="AUDIT_KEY",
                   help="the audit public key PEM (audit/audit_key.pem), pinned by the "
                   "auditor (--audit-key is the same flag)")
    v.add_argument("--checkpoint", type=Path,
                   help="with --log: latest checkpoint file (default: 'checkpoint' beside the "
                   "log; with --witness-key, 'checkpoint.cosigned')")
    v.add_argument("--witness-key", action="append", default=[], metavar="VKEY",
                   help="a witness's verifier key (name+id+key, as `hsmca witness serve` "
                   "prints it); the cosigned checkpoint (with --log the --checkpoint file, "
                   "with --url the daemon's checkpoint.cosigned) must carry a valid "
                   "cosignature by it. Repeat for each witness that must have cosigned. "
                   "With --url a cosigned checkpoint the verified log does not extend fails "
                   "the run whether or not this is given: the audit key signed two histories")
    v.add_argument("--origin", help="expected checkpoint origin (default: taken from the log)")
    v.add_argument("--state", type=state_file,
                   help="file remembering every line verified (their number, Merkle root and "
                   "last hash) and the last verified checkpoint; created if missing, updated "
                   "when all holds (required with --url)")
    v.add_argument("--allow-unsigned", action="store_true",
                   help="with --log: accept lines no checkpoint covers yet (a copy of a "
                   "running or crashed daemon's log), say how many on stderr, exit 0 and "
                   "record them in --state")
    _remote_flags(v, key_alias=False)
    v.set_defaults(command_key="audit-verify")
    s = asub.add_parser(
        "show", help="print the log in a human-readable form",
        description="Print the audit log one line per entry (seq, time, event, actor, the "
        "fields that matter), from the file of --config or --log, or from the daemon at "
        "--url with an auditor or admin certificate; --follow keeps printing new lines. "
        "It shows, it does not verify: `hsmca audit verify` does.")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--log", type=Path, help="the log file (default: from --config)")
    where.add_argument("--url", help="read the log from the daemon at this URL (needs "
                       "--client-cert and --client-key)")
    s.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                   help="config whose audit log to read (default ./hsmca.toml)")
    s.add_argument("--from", dest="start", type=_non_negative, default=0, metavar="SEQ",
                   help="first seq to show (default 0, the first line)")
    s.add_argument("--follow", action="store_true",
                   help="keep printing new lines as they are written, until interrupted")
    s.add_argument("--node", metavar="NAME",
                   help="on a CA of several nodes: whose log to show; with --url the "
                   "default is the answering node's own, named on stderr (GET "
                   "/v1/audit/logs lists them), with --config the log of init's "
                   "ceremonies")
    _remote_flags(s, key_alias=True)
    s.set_defaults(command_key="audit-show")
    from ca.commands import audit_prove
    audit_prove.add_parser(asub, _remote_flags)

    from ca.commands import backup_cmd, store_cmd, ui_cmd, witness_cmd
    witness_cmd.add_parsers(sub)
    ui_cmd.add_parsers(sub)
    store_cmd.add_parsers(sub)
    backup_cmd.add_parsers(sub)
    add_examples(p)
    return p


def _remote_flags(p: argparse.ArgumentParser, key_alias: bool) -> None:
    """The client credential for --url. Other commands call it --cert/--key; both
    spellings work wherever they do not clash with another flag."""
    p.add_argument("--client-cert", "--cert", dest="client_cert", type=Path, metavar="CERT",
                   help="with --url: client certificate of role auditor or admin (--cert is "
                   "the same flag)")
    if key_alias:
        p.add_argument("--client-key", "--key", dest="client_key", type=Path, metavar="KEY",
                       help="with --url: its private key (--key is the same flag)")
    else:
        p.add_argument("--client-key", dest="client_key", type=Path, metavar="KEY",
                       help="with --url: its private key (not --key: here that is the "
                       "audit key)")
    p.add_argument("--ca", type=Path,
                   help="with --url: root.pem to trust for the daemon's TLS certificate")


def _version() -> str:
    # The code's own, as daemon.start logs it: the installed metadata stays at the
    # version pip installed, and a checkout updated since (its venv kept: setup installs
    # again only for a changed pyproject.toml) said 0.3.1 while running 0.3.3.
    from ca import __version__
    return __version__


class _VersionAction(argparse.Action):
    """--version, looked up only when asked: importlib.metadata took a tenth of every
    command's start when the parser was built with the version in it."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help=kwargs.get("help"))  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"hsmca {_version()}")  # on stdout, as argparse's own version action
        parser.exit()


# What to do after a Ctrl-C, by command: one stopped silently with the token spent, and
# its user was told by the next try to ask an admin for another (an operator trial).
INTERRUPTED = {
    "enroll": "if the CA took the token already, run the same enroll again with the same "
              "--out: it uses the key it kept beside it, and the token lets that key in again",
    "renew": "run renew again: it finishes or undoes a replacement of the files cut "
             "short, and renews",
    "ssh-user": "the certificate file is whole; run it again for a new certificate",
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # (a Ctrl-C while Python loads: a traceback before)
        print("hsmca: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "url", None) is not None:
        # Every --url is checked here, once, before a command can connect anywhere.
        from ca.commands.args import check_url
        try:
            args.url = check_url(args.url)
        except ValueError as exc:
            print(f"hsmca: error: --url {exc}", file=sys.stderr)
            return 2
    # Who a PostgreSQL connection is, in pg_stat_activity (libpq reads PGAPPNAME); a
    # daemon's processes name themselves more closely (ca/daemon).
    os.environ.setdefault("PGAPPNAME", f"hsmca {args.command_key}")
    # cryptography's deprecation notices about certificates it was given (a CA bundle's
    # root with a negative serial, as --ca /etc/ssl/certs/ca-certificates.crt holds) are
    # for developers: a user got two lines of Python before the one-line error (a
    # service team's trial). The daemon's log turns the warnings it keeps into JSON.
    import warnings

    from cryptography.utils import CryptographyDeprecationWarning
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    # A write past RLIMIT_FSIZE must fail with EFBIG (and the log fail closed), not kill us.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if args.command_key == "serve":
        # A reload before the daemon's handler exists would kill it (a config trial's
        # SIGHUP 0.2 s after launch: exit 129); the start reads the config anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return _command(args.command_key)(args)
    except KeyboardInterrupt:
        then = INTERRUPTED.get(args.command_key)
        print(f"hsmca: interrupted{f': {then}' if then else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if not _expected(exc):
            raise
        said = _with_setting(exc, getattr(args, "config", None))
        print(f"hsmca: error: {said}", file=sys.stderr)
        return exc.exit_status if isinstance(exc, CLIError) else 1


# The HSM's errors know nothing of hsmca.toml (hsm/ is a plain executor); a docs trial
# read "PKCS#11 module not found" with nothing on where the path came from.
_HSM_SETTINGS = (("PKCS#11 module not found", "module"),
                 ("cannot load PKCS#11 module", "module"),
                 ("no token labelled", "token (and, for SoftHSM, softhsm-conf)"),
                 ("wrong PIN", "pin-source: the file or variable it names"))


def _with_setting(exc: BaseException, config: object) -> str:
    """`exc`'s message, naming the hsmca.toml setting behind it where it is the HSM's."""
    text = str(exc)
    if isinstance(exc, HSMError) and isinstance(config, Path):
        for start, setting in _HSM_SETTINGS:
            if text.startswith(start):
                return f"{text} (check [hsm] {setting} in {config})"
    return text


# Expected failures defined beside the code that raises them: an exception of one of
# these can only exist if its module was loaded, so only loaded modules are looked in
# (importing them all cost every failed command a fifth of a second).
_EXPECTED_ELSEWHERE = (("ca.audit.log", "AuditLogError"), ("ca.init", "InitError"),
                       ("ca.store.errors", "StoreUnavailable"), ("ca.store.errors", "SchemaTooNew"),
                       ("ca.store.errors", "CAExists"), ("ca.store.errors", "NoInventory"))


def _expected(exc: BaseException) -> bool:
    """Whether `exc` is a failure to report in one line, not a bug's traceback (a
    ConfigError or URIError is a ValueError)."""
    if isinstance(exc, CLIError | HSMError | AuditUnavailable | OSError | ClientError
                  | ValueError):
        return True
    return any(isinstance(exc, getattr(sys.modules[module], name, ()))
               for module, name in _EXPECTED_ELSEWHERE if module in sys.modules)


if __name__ == "__main__":
    sys.exit(main())
