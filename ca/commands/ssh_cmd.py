"""`hsmca ssh host` and `hsmca ssh user`: SSH certificates over mutual TLS."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from ca.errors import CLIError
from ca.fileutil import write_atomic


def _cert_path(pubkey: Path) -> Path:
    name = pubkey.name.removesuffix(".pub")
    return pubkey.with_name(f"{name}-cert.pub")


async def _request(args: argparse.Namespace, path: str, body: dict[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    from ca import client  # aiohttp: not loaded by `serve`, which builds this parser too
    try:
        body["public_key"] = args.pubkey.read_text().strip()
    except OSError as exc:
        raise CLIError(f"cannot read {args.pubkey}: {exc.strerror}") from None
    ctx = client.ssl_context(args.ca, args.cert, args.key)
    url = args.url.rstrip("/")
    issued = await client.call("POST", f"{url}{path}", ctx, json_body=body, expect=201)
    cas = await client.call("GET", f"{url}/v1/ssh/ca", ctx)
    return issued, cas


def host(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.principal:
        body["principals"] = args.principal
    issued, cas = asyncio.run(_request(args, "/v1/ssh/host", body))
    cert = _cert_path(args.pubkey)
    write_atomic(cert, issued["certificate"] + "\n")
    user_ca = args.pubkey.with_name("hsmca_user_ca.pub")
    write_atomic(user_ca, cas["user"] + "\n")
    key = args.pubkey.with_name(args.pubkey.name.removesuffix(".pub"))
    print(f"wrote {cert} (serial {issued['serial']}) and {user_ca}. Add to sshd_config:\n"
          f"  HostKey {key}\n  HostCertificate {cert}\n  TrustedUserCAKeys {user_ca}\n"
          f"and to clients' known_hosts:\n  @cert-authority * {cas['host']}")
    return 0


def user(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"ttl": args.ttl}
    if args.principal:
        body["principals"] = args.principal
    issued, _ = asyncio.run(_request(args, "/v1/ssh/user", body))
    cert = _cert_path(args.pubkey)
    write_atomic(cert, issued["certificate"] + "\n")
    print(f"wrote {cert} (serial {issued['serial']}); ssh uses it automatically with its key")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("ssh", help="SSH host and user certificates")
    ssub = s.add_subparsers(dest="ssh_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser, default_pub: str) -> None:
        p.add_argument("--url", required=True, help="daemon URL")
        p.add_argument("--cert", required=True, type=Path, help="your hsmca client certificate")
        p.add_argument("--key", required=True, type=Path, help="its private key")
        p.add_argument("--ca", type=Path, help="root CA PEM to trust the daemon with")
        p.add_argument("--pubkey", type=Path, default=Path(default_pub).expanduser(),
                       help=f"SSH public key to certify (default {default_pub}); the "
                       "certificate is written beside it as <key>-cert.pub")
        p.add_argument("--principal", nargs="+", help="principals (default: all you may get)")

    h = ssub.add_parser("host", help="certify this host's SSH key (role host)",
                        description="Get an SSH host certificate for the host's enrolled DNS "
                        "names and print the sshd_config lines to use it.")
    common(h, "/etc/ssh/ssh_host_ed25519_key.pub")
    h.set_defaults(command_key="ssh-host")
    u = ssub.add_parser("user", help="get a short-lived SSH user certificate (role user)")
    common(u, "~/.ssh/id_ed25519.pub")
    u.add_argument("--ttl", default="8h", help="lifetime (default 8h, at most 24h)")
    u.set_defaults(command_key="ssh-user")
