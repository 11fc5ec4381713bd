"""`hsmca acme eab create`: an ACME external account binding key, from the running
daemon (admin API, audited as acme.eab.create; the HMAC key is printed once)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ca.errors import CLIError


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    a = sub.add_parser("acme", help="the ACME server (admin)")
    asub = a.add_subparsers(dest="acme_command", metavar="SUBCOMMAND", required=True)
    e = asub.add_parser("eab", help="external account binding keys")
    esub = e.add_subparsers(dest="eab_command", metavar="SUBCOMMAND", required=True)
    c = esub.add_parser(
        "create", help="print a single-use EAB key (kid=..., hmac=...)",
        description="Ask the running daemon for an ACME external account binding key. The "
        "ACME account that binds it may order only names matching --names. Prints two "
        "lines, kid=... and hmac=... (base64url, no padding), for certbot's --eab-kid and "
        "--eab-hmac-key or lego's --kid and --hmac. The HMAC key is shown once; the CA "
        "erases it when an account binds it.")
    c.add_argument("--names", required=True, nargs="+", metavar="PATTERN",
                   help="DNS names the account may order: example.com exactly, or "
                   "*.example.com for every name below it")
    c.add_argument("--ttl", default="24h", help="how long the key may be bound (default 24h)")
    c.add_argument("--config", type=Path, default=Path("hsmca.toml"),
                   help="config whose admin credential to use (default ./hsmca.toml)")
    c.add_argument("--url", help="daemon URL (default: the URL the daemon serving this "
                   "config wrote to STATE_DIR/serve.url)")
    c.add_argument("--ca", type=Path, help="root CA PEM (default from config)")
    c.set_defaults(command_key="acme-eab-create")


def eab_create(args: argparse.Namespace) -> int:
    from ca import client
    from ca.commands.client_cmd import _admin
    url, ctx = _admin(args)
    try:
        out = asyncio.run(client.call("POST", f"{url}/v1/acme/eab", ctx, expect=201,
                                      json_body={"names": args.names, "ttl": args.ttl}))
    except client.ClientError as exc:
        if exc.status == 404:
            raise CLIError("the daemon serves no ACME: add an [acme] section to its config "
                           "(docs/acme.md) and restart it") from None
        raise
    print(f"kid={out['kid']}")
    print(f"hmac={out['hmac']}")
    for warning in out.get("warnings", []):
        print(f"hsmca: warning: {warning}", file=sys.stderr)
    return 0
