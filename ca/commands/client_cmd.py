"""Client commands: serve, token create, enroll, renew, revoke."""

from __future__ import annotations

import argparse
import asyncio
import ssl
from pathlib import Path

from ca.config import Config, load


def _config(args: argparse.Namespace) -> Config:
    return load(args.config)


def _admin(args: argparse.Namespace) -> tuple[str, ssl.SSLContext]:
    """URL and admin mTLS context from --config (the credential `hsmca init` made)."""
    from ca import client  # aiohttp: not loaded by `serve`
    cfg = _config(args)
    url = args.url or cfg.local_url
    ca = args.ca or cfg.root_pem
    return url.rstrip("/"), client.ssl_context(ca, cfg.admin_cert, cfg.admin_key)


def _worker_count(text: str) -> int:
    from ca.config import MAX_WORKERS
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be a number from 1 to {MAX_WORKERS}")
    return int(text)


def serve(args: argparse.Namespace) -> int:
    from ca.config import secret_files
    from ca.daemon import main
    from ca.fileutil import check_private
    from ca.logs import configure
    cfg = _config(args)
    # Before anything is started: a readable PIN or key file is refused, by name.
    check_private(secret_files(cfg))
    configure()
    return main(cfg, args.listen, args.workers)


def token_create(args: argparse.Namespace) -> int:
    from ca import client  # aiohttp: not loaded by `serve`, which shares this module
    url, ctx = _admin(args)
    body = {"role": args.role, "names": args.name, "ttl": args.ttl}
    if args.principal:
        body["principals"] = args.principal
    out = asyncio.run(client.call("POST", f"{url}/v1/tokens", ctx, json_body=body, expect=201))
    print(out["token"])
    return 0


def enroll(args: argparse.Namespace) -> int:
    from ca import client  # aiohttp: not loaded by `serve`
    issued = asyncio.run(client.enroll(args.url.rstrip("/"), args.token, args.name, args.out,
                                       args.ca))
    print(f"enrolled: serial {issued['serial']}, valid until {issued['not_after']}; wrote "
          f"{args.out / 'key.pem'} (0600), {args.out / 'cert.pem'}, {args.out / 'chain.pem'}")
    return 0


def renew(args: argparse.Namespace) -> int:
    from ca import client  # aiohttp: not loaded by `serve`
    issued = asyncio.run(client.renew(args.url.rstrip("/"), args.cert, args.key, args.ca,
                                      args.rekey))
    print(f"renewed: serial {issued['serial']}, valid until {issued['not_after']}"
          f"{' (new key)' if args.rekey else ''}")
    return 0


def revoke(args: argparse.Namespace) -> int:
    from ca import client  # aiohttp: not loaded by `serve`
    url, ctx = _admin(args)
    body = {"serial": args.serial}
    if args.reason:
        body["reason"] = args.reason
    out = asyncio.run(client.call("POST", f"{url}/v1/x509/revoke", ctx, json_body=body))
    print(f"revoked {out['serial']} at {out['revoked_at']}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("serve", help="run the daemon",
                       description="Run the CA daemon: one HTTPS listener (TLS 1.2+), mutual "
                       "TLS for clients, served by worker processes that each hold their own "
                       "HSM session; this (primary) process writes the audit log and the "
                       "checkpoints. The first line of stdout is 'listening on URL'.")
    s.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                   help="config file (default ./hsmca.toml; `hsmca init` writes "
                   "STATE_DIR/hsmca.toml)")
    s.add_argument("--listen", help="HOST:PORT to listen on (port 0 picks a free port); "
                   "default from the config")
    s.add_argument("--workers", type=_worker_count, metavar="N",
                   help="worker processes (default: [server] workers in the config, "
                   "\"auto\" = one per CPU, at most 8)")
    s.set_defaults(command_key="serve")

    def admin_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                       help="config whose admin credential to use (default ./hsmca.toml)")
        p.add_argument("--url", help="daemon URL (default: the URL the daemon serving this "
                       "config wrote to STATE_DIR/serve.url, else https://<listen from config>)")
        p.add_argument("--ca", type=Path, help="root CA PEM (default from config)")

    t = sub.add_parser("token", help="bootstrap tokens (admin)")
    tsub = t.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    tc = tsub.add_parser("create", help="print a one-time bootstrap token",
                         description="Ask the daemon for a one-time bootstrap token that lets "
                         "its holder enroll once for the given role and names. The secret is "
                         "printed once and never stored by the CA.")
    tc.add_argument("--role", required=True,
                    choices=["service", "host", "user", "auditor", "admin"])
    tc.add_argument("--name", required=True, nargs="+",
                    help="names the certificate may carry (DNS, IP, URI; e-mail for users)")
    tc.add_argument("--principal", nargs="+", help="SSH logins a user may get (role user)")
    tc.add_argument("--ttl", default="15m", help="how long the token is valid (default 15m)")
    admin_flags(tc)
    tc.set_defaults(command_key="token-create")

    e = sub.add_parser("enroll", help="enroll with a bootstrap token",
                       description="Make a P-256 key locally, enroll with a bootstrap token, "
                       "and write key.pem (0600), cert.pem and chain.pem to --out.")
    e.add_argument("--url", required=True, help="daemon URL, e.g. https://ca.example:8443")
    e.add_argument("--token", required=True, help="the bootstrap token")
    e.add_argument("--name", required=True, nargs="+", help="names to put in the certificate")
    e.add_argument("--out", required=True, type=Path, help="directory to write to")
    e.add_argument("--ca", type=Path, help="root CA PEM to trust the daemon with")
    e.set_defaults(command_key="enroll")

    r = sub.add_parser("renew", help="renew a certificate over mutual TLS",
                       description="Renew CERT with the daemon, authenticating with CERT and "
                       "KEY. The names are copied from the current certificate. --rekey makes "
                       "a new key. Files are replaced atomically; safe to run from cron.")
    r.add_argument("--url", required=True)
    r.add_argument("--cert", required=True, type=Path)
    r.add_argument("--key", required=True, type=Path)
    r.add_argument("--ca", type=Path, help="root CA PEM to trust the daemon with")
    r.add_argument("--rekey", action="store_true", help="generate a new key")
    r.set_defaults(command_key="renew")

    v = sub.add_parser("revoke", help="revoke a certificate (admin)")
    v.add_argument("serial", help="serial number in hex")
    v.add_argument("--reason", choices=["key_compromise", "ca_compromise", "affiliation_changed",
                                        "superseded", "cessation_of_operation",
                                        "certificate_hold", "privilege_withdrawn",
                                        "aa_compromise"])
    admin_flags(v)
    v.set_defaults(command_key="revoke")
