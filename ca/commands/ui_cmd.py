"""`hsmca ui`: the local, read-only web view (ca/ui/) for auditors and operators."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import ssl
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ca.commands.args import state_file
from ca.errors import CLIError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from ca.audit.cosignature import VerifierKey
    from ca.ui.ca_api import CA

DEFAULT_LISTEN = "127.0.0.1:8480"


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    u = sub.add_parser(
        "ui", help="a local, read-only web view that verifies the audit log it shows",
        description="Serve a read-only web view of the CA at --url for auditors and "
        "operators, on this machine: it talks to the daemon with your client certificate "
        "(role auditor or admin), so the browser never handles it. Before it shows "
        "anything it follows the audit log with your saved --state, like `hsmca audit "
        "verify --url`, and every page says 'verified up to seq N' in green or 'FAILED at "
        "seq N: why' in red; audit lines are marked verified only when checked against "
        "the tree you verified. Listens on loopback only, unless --listen-public with "
        "--tls-cert and --tls-key. Prints its URL and serves until SIGTERM. It reads a "
        "running daemon only: a log file or a backup is verified with `hsmca audit "
        "verify --log FILE` instead.")
    u.add_argument("--url", required=True, help="the daemon's URL (https://HOST:PORT)")
    u.add_argument("--ca", type=Path, required=True,
                   help="root.pem: the CA root you pinned (for TLS, and the chains shown)")
    u.add_argument("--cert", "--client-cert", dest="cert", type=Path, required=True,
                   help="your client certificate, role auditor or admin")
    u.add_argument("--key", "--client-key", dest="key", type=Path, required=True,
                   help="its private key")
    u.add_argument("--audit-key", type=str, required=True, metavar="AUDIT_PUB",
                   help="the audit public key you pinned (audit/audit_key.pem)")
    u.add_argument("--state", type=state_file,
                   help="your auditor state (as for `hsmca audit verify --url --state`): what "
                   "was verified before, so a rewrite since is caught; updated as the log is "
                   "verified. On a cluster, one file per node's log beside it "
                   "(auditor.NODE.state, as `hsmca audit verify --url` keeps them). Without "
                   "it, a temporary one for this run only")
    u.add_argument("--origin", help="expected checkpoint origin (default: from the state or "
                   "the daemon's checkpoint)")
    u.add_argument("--witness-key", dest="witness_keys", action="append", default=[],
                   metavar="VKEY", help="a witness's verifier key (<name>+<id>+<key>) whose "
                   "cosignatures count; repeat for more")
    u.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve (default {DEFAULT_LISTEN}; port 0 picks one); a "
                   "loopback address unless --listen-public")
    u.add_argument("--listen-public", action="store_true",
                   help="allow a non-loopback --listen; needs --tls-cert and --tls-key, and "
                   "anyone who reaches it reads what your certificate can read")
    u.add_argument("--tls-cert", type=Path, help="with --listen-public: the view's own TLS "
                   "certificate chain (PEM)")
    u.add_argument("--tls-key", type=Path, help="with --listen-public: its private key")
    u.set_defaults(command_key="ui")


def _listen(args: argparse.Namespace) -> tuple[str, int]:
    from ca.config import split_listen  # (not for the parser: a start's tenth)
    try:
        host, port = split_listen(args.listen, need_host=True)
    except ValueError as exc:
        raise CLIError(f"--listen {exc}") from None
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback and not args.listen_public:
        raise CLIError(f"--listen {args.listen} is not a loopback address: the view shows the "
                       "CA's inventory and log to whoever reaches it; pass --listen-public "
                       "with --tls-cert and --tls-key to serve beyond this machine")
    if args.listen_public and (args.tls_cert is None or args.tls_key is None):
        raise CLIError("--listen-public needs --tls-cert and --tls-key (the view serves "
                       "HTTPS beyond this machine, never plain HTTP)")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CLIError("--tls-cert and --tls-key go together")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    from ca import client
    from ca.audit.cosignature import ALG_COSIGNATURE, parse_verifier_key
    from ca.commands.audit_cmd import _audit_key
    from ca.logs import configure

    host, port = _listen(args)
    client.check_credential(args.cert, args.key)
    ctx = client.ssl_context(args.ca, args.cert, args.key)
    root = client.load_certificates(args.ca, "--ca")[0]
    audit_key = _audit_key(args.audit_key)
    witness_keys = []
    for text in args.witness_keys:
        try:
            witness_keys.append(parse_verifier_key(text, ALG_COSIGNATURE))
        except ValueError as exc:
            raise CLIError(f"--witness-key: {exc}") from None
    tls = None
    if args.tls_cert is not None:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise CLIError(f"cannot load --tls-cert/--tls-key: {exc}") from None
    configure()
    with tempfile.TemporaryDirectory(prefix="hsmca-ui-") as scratch:
        state = args.state
        if state is None:
            state = Path(scratch) / "auditor.state"
            print("hsmca ui: no --state: verifying from the first line, and a rewrite of what "
                  "an earlier run verified cannot be caught", file=sys.stderr)
        asyncio.run(_serve(args.url, ctx, root, audit_key, state, args.origin, witness_keys,
                           host, port, tls, args.listen_public))
    return 0


async def _check_role(ca: CA) -> None:
    """A certificate the daemon knows under another role, or refuses (revoked, say),
    would get a 403 on every page: say so now (a web view trial's revoked certificate
    served amber pages, "the daemon could not be asked"). A daemon that cannot be
    reached yet is the view's to show and retry."""
    from ca.client import ClientError
    try:
        role = (await ca.json("/v1/whoami")).get("role")
    except ClientError as exc:
        if exc.status in (401, 403):
            await ca.close()
            raise CLIError(f"the daemon refuses --cert: {exc}") from None
        return
    if role not in ("auditor", "admin"):
        await ca.close()
        raise CLIError(f"--cert has role {role}: the web view reads the audit log and the "
                       "inventory, which need role auditor or admin (hsmca token create "
                       "--role auditor, then hsmca enroll)")


async def _serve(url: str, ctx: ssl.SSLContext, root: x509.Certificate,
                 audit_key: Ed25519PublicKey, state: Path, origin: str | None,
                 witness_keys: list[VerifierKey], host: str, port: int,
                 tls: ssl.SSLContext | None, public: bool) -> None:

    from ca.ui import peer
    from ca.ui.app import build_app
    from ca.ui.ca_api import CA
    from ca.ui.follow import Logs
    from ca.ui.pages import UI, environment

    ca = CA(url, ctx)
    await _check_role(ca)
    logs = Logs(ca, audit_key, state, origin, witness_keys)
    ui = UI(ca, logs, root, audit_key, witness_keys, environment())
    from ca.http_server import app_runner, listen_failure, tcp_site
    runner = app_runner(build_app(ui))
    await runner.setup()
    site = tcp_site(runner, host, port, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CLIError(listen_failure(exc, host, port)) from None
    bound = runner.addresses[0]
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    if not public:
        # Only the names this server is reached by on this machine (DNS rebinding).
        ui.allowed_hosts = {f"{name}:{bound[1]}" for name in (shown, "localhost", "127.0.0.1",
                                                              "[::1]")}
        # Only its own user's connections (and root's): see ca/ui/peer.py.
        if peer.TABLES[0].exists():
            ui.local_users = frozenset({os.getuid(), 0})
        else:
            print("hsmca ui: no /proc/net/tcp here to tell which user connects: every "
                  "local user can read through this view", file=sys.stderr)
    logs.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {'https' if tls else 'http'}://{shown}:{bound[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
