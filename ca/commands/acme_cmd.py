"""`hsmca acme eab create|list|withdraw` and `hsmca acme account list|deactivate`: the
ACME server's external account binding keys and accounts, through the running daemon's
admin API (each change audited: acme.eab.create, acme.eab.withdraw,
acme.account.deactivate; an HMAC key is printed once, when it is made)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ca.commands.output import table
from ca.errors import CLIError


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ca.commands.client_cmd import admin_flags
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
    c.add_argument("--names", required=True, nargs="+", action="extend", metavar="PATTERN",
                   help="DNS names the account may order: example.com exactly, or "
                   "*.example.com for every name below it")
    c.add_argument("--ttl", default="24h", help="how long the key may be bound (default 24h)")
    admin_flags(c)
    c.set_defaults(command_key="acme-eab-create")
    def admin_command(parent: Any, name: str, key: str, help_: str, description: str,
                      *positionals: tuple[str, str]) -> None:
        cmd = parent.add_parser(name, help=help_, description=description)
        for arg, arg_help in positionals:
            cmd.add_argument(arg, help=arg_help)
        admin_flags(cmd)
        cmd.set_defaults(command_key=key)

    admin_command(esub, "list", "acme-eab-list", "the EAB keys made, and what became of each",
                  "List the latest 1,000 EAB keys, newest first: kid, state (unused, used, "
                  "expired, withdrawn), the account that bound it, ENDS (until when an unused "
                  "key can be bound; when a used one was bound, a withdrawn one withdrawn, "
                  "an expired one expired), the name patterns. Never a MAC key.")
    admin_command(esub, "withdraw", "acme-eab-withdraw", "withdraw an EAB key not yet bound",
                  "Erase the MAC key of an EAB key no account has bound yet (handed to the "
                  "wrong person, or leaked), so none can. One already bound: deactivate its "
                  "account (hsmca acme account deactivate). Audited as acme.eab.withdraw.",
                  ("kid", "the key's kid (kid=... as `eab create` printed it)"))
    acct = asub.add_parser("account", help="ACME accounts")
    accsub = acct.add_subparsers(dest="account_command", metavar="SUBCOMMAND", required=True)
    admin_command(accsub, "list", "acme-account-list", "the ACME accounts",
                  "List the latest 1,000 ACME accounts, newest first: id, status, the EAB key "
                  "it bound, its name patterns, contact.")
    admin_command(accsub, "deactivate", "acme-account-deactivate", "deactivate an ACME account",
                  "Deactivate an ACME account, as its holder could (RFC 8555 7.3.6): it "
                  "orders, finalizes and revokes nothing more, and its pending authorizations "
                  "end. Its certificates stay valid: revoke them apart. Audited as "
                  "acme.account.deactivate.",
                  ("account", "the account's id (hsmca acme account list); one that "
                   "begins with '-' goes after --: deactivate -- -Xy3..."))


def _ask(args: argparse.Namespace, method: str, path: str, body: Any = None,
         expect: int = 200) -> Any:
    """One admin request to the daemon's ACME admin API."""
    from ca import client
    from ca.commands.client_cmd import admin_call
    try:
        return admin_call(args, method, path, body, expect)
    except client.ClientError as exc:
        if exc.status == 404 and "no such endpoint" in str(exc):
            raise CLIError("the daemon serves no ACME: add an [acme] section to its config "
                           "(docs/acme.md) and restart it") from None
        raise


def eab_create(args: argparse.Namespace) -> int:
    out = _ask(args, "POST", "/v1/acme/eab", {"names": args.names, "ttl": args.ttl}, 201)
    print(f"kid={out['kid']}")
    print(f"hmac={out['hmac']}")
    for warning in out.get("warnings", []):
        print(f"hsmca: warning: {warning}", file=sys.stderr)
    return 0


def eab_list(args: argparse.Namespace) -> int:
    return table(_ask(args, "GET", "/v1/acme/eab")["eab"],
                  "no EAB keys (make one: hsmca acme eab create --names PATTERN)", [
                      ("KID", 24, lambda e: e["kid"]), ("STATE", 9, lambda e: e["state"]),
                      ("ACCOUNT", 24, lambda e: e["account"] or "-"),
                      ("ENDS", 25, _eab_end),
                      ("NAMES", 0, lambda e: " ".join(e["names"]))])


def _eab_end(e: dict[str, str]) -> str:
    """When a key's use ends or ended: its binding for a used key (its expiry no longer
    matters), else its expiry, which a withdrawal sets to the withdrawal's time."""
    return e["used_at"] if e["state"] == "used" and e.get("used_at") else e["expires"]


def eab_withdraw(args: argparse.Namespace) -> int:
    _ask(args, "POST", "/v1/acme/eab/withdraw", {"kid": args.kid})
    print(f"withdrew {args.kid}: no account can bind it")
    return 0


def account_list(args: argparse.Namespace) -> int:
    return table(_ask(args, "GET", "/v1/acme/accounts")["accounts"], "no ACME accounts", [
        ("ACCOUNT", 24, lambda a: a["id"]), ("STATUS", 11, lambda a: a["status"]),
        ("EAB", 24, lambda a: a["eab_kid"] or "-"), ("CREATED", 25, lambda a: a["created_at"]),
        ("CONTACT", 30, _contacts),
        ("NAMES", 0, lambda a: " ".join(a["names"]) or "(the CA lists alone)")])


def _contacts(account: dict[str, Any]) -> str:
    """Its e-mail addresses; one stored before they had to be printable is shown escaped,
    never written raw to the admin's terminal."""
    shown = [c.removeprefix("mailto:") for c in account.get("contact", [])]
    return ",".join(c if c.isprintable() else ascii(c) for c in shown) or "-"


def account_deactivate(args: argparse.Namespace) -> int:
    _ask(args, "POST", "/v1/acme/accounts/deactivate", {"account": args.account})
    print(f"deactivated ACME account {args.account}: it orders and revokes nothing more; "
          "its certificates stay valid until revoked")
    return 0
