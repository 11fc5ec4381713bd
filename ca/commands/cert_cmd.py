"""`hsmca cert list|show`: what the CA issued, from the inventory, through the running
daemon's admin API (GET /v1/inventory/certificates): the questions a service team
asks ("what does web1 have?", "which certificate is this serial from openssl?") without
curl and the admin credential by hand."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlencode

from ca.commands.output import table


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ca.commands.args import positive
    from ca.commands.client_cmd import admin_flags
    from ca.inventory_terms import CERT_STATUSES
    c = sub.add_parser("cert", help="the X.509 certificates the CA issued: list, show (admin)")
    csub = c.add_subparsers(dest="cert_command", metavar="SUBCOMMAND", required=True)
    ls = csub.add_parser(
        "list", help="certificates by name, serial or status, newest first",
        description="List X.509 certificates from the inventory, newest first: serial (as "
        "hsmca writes it: lower case, no leading zeros), status, role, kind (acme: issued "
        "over ACME), notAfter, names. --search matches names, subjects and serials "
        "(openssl's upper-case form too); --account lists what one ACME account got (to "
        "revoke after deactivating it, say).")
    ls.add_argument("--search", metavar="TEXT", help="a name, part of one, or a serial")
    ls.add_argument("--status", choices=CERT_STATUSES,
                    help="only these (expiring: in its last 7 days, or in its last third "
                    "when that is shorter)")
    ls.add_argument("--kind", choices=("acme", "x509"),
                    help="only those issued over ACME, or only the others")
    ls.add_argument("--account", metavar="ID",
                    help="only those issued to this ACME account (hsmca acme account list)")
    ls.add_argument("--issuer", metavar="LABEL",
                    help="only those this issuing key signed (hsmca key list): who must "
                    "enroll again once its CA certificate is revoked, say")
    ls.add_argument("--limit", type=positive, default=50, help="at most this many (default 50)")
    admin_flags(ls)
    ls.set_defaults(command_key="cert-list")
    sh = csub.add_parser(
        "show", help="one certificate, its renewals and its audit line",
        description="Show one certificate of the inventory: status, names, validity, its "
        "renewal family, the audit log line of its signature; with --pem, the certificate. "
        "SERIAL as hsmca prints it, with 0x, as 1a:2b:... (openssl x509 -text) or as "
        "serial=1A2B... (openssl x509 -serial).")
    sh.add_argument("serial", metavar="SERIAL")
    sh.add_argument("--pem", action="store_true", help="print the certificate (PEM) only")
    admin_flags(sh)
    sh.set_defaults(command_key="cert-show")


def _get(args: argparse.Namespace, path: str) -> Any:
    from ca.commands.client_cmd import admin_call
    return admin_call(args, "GET", path)


def _names(cert: dict[str, Any]) -> str:
    return " ".join(cert["names"]) or cert["subject"]


def list_certs(args: argparse.Namespace) -> int:
    query: dict[str, str | int] = {"limit": max(1, min(args.limit, 500))}
    if args.search:
        # openssl x509 -serial prints serial=...: searched for as the serial
        query["q"] = args.search.removeprefix("serial=")
    for name in ("status", "kind", "account", "issuer"):
        if getattr(args, name):
            query[name] = getattr(args, name)
    page = _get(args, f"/v1/inventory/certificates?{urlencode(query)}")
    shown = table(page["certificates"], "no certificate matches", [
        ("SERIAL", 40, lambda c: c["serial"]), ("STATUS", 8, lambda c: c["status"]),
        ("ROLE", 7, lambda c: c["role"]), ("KIND", 4, lambda c: c["kind"]),
        ("NOT_AFTER", 25, lambda c: c["not_after"]), ("NAMES", 0, _names)])
    if page["total"] > len(page["certificates"]):
        print(f"({page['total']} match; the newest {len(page['certificates'])} shown: "
              "narrow with --search, --status or --kind, or raise --limit)")
    return shown


def show_cert(args: argparse.Namespace) -> int:
    from ca.commands.client_cmd import parse_serial
    cert = _get(args, f"/v1/inventory/certificates/{parse_serial(args.serial)}")
    if args.pem:
        print(cert["pem"], end="")
        return 0
    rows = [("serial", cert["serial"]), ("status", cert["status"]), ("role", cert["role"]),
            ("subject", cert["subject"]), ("names", _names(cert)),
            ("not_before", cert["not_before"]), ("not_after", cert["not_after"]),
            ("issued_at", cert["issued_at"]), ("issuer", cert.get("issuer") or "-")]
    if cert.get("acme_order"):
        rows.append(("acme", f"account {cert.get('acme_account') or '-'}, order "
                     f"{cert['acme_order']}"))
    if cert.get("revoked_at"):
        rows.append(("revoked", f"{cert['revoked_at']} ({cert.get('reason') or 'unspecified'})"))
    if cert.get("audit_seq") is not None:
        rows.append(("audit", f"line {cert['audit_seq']} of the audit log "
                     f"{cert.get('audit_log') or ''}".rstrip()))
    for label, value in rows:
        print(f"{label:11} {value}")
    family = [c for c in cert.get("family", []) if c["serial"] != cert["serial"]]
    if family:
        print("renewals (the certificates it was renewed from, and those renewed from it):")
        for other in family:
            print(f"  {other['serial']:40} {other['status']:8} until {other['not_after']}")
    return 0
