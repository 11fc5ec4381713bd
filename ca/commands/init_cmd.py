"""`hsmca init`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from ca.config import check_store_url
from ca.fileutil import apply_modes
from ca.init import InitOptions, run_init
from hsm.errors import HSMError

# The mode of everything `init` leaves, whatever the umask it ran under. Not listed
# (the state directory itself, admin/, tls/, the inventory and its WAL files, the
# config, the private keys): 0700 for directories, 0600 for files.
STATE_MODES = {
    "x509": 0o755, "ssh": 0o755, "audit": 0o755,
    "x509/root.pem": 0o644, "x509/issuing.pem": 0o644, "x509/chain.pem": 0o644,
    "ssh/user_ca.pub": 0o644, "ssh/host_ca.pub": 0o644,
    "audit/audit_key.pem": 0o644, "audit/checkpoint": 0o644, "audit/log.jsonl": 0o640,
    "tls/server.pem": 0o644, "admin/cert.pem": 0o644,
}


def run(args: argparse.Namespace) -> int:
    softhsm_conf = os.environ.get("SOFTHSM2_CONF")
    opts = InitOptions(state_dir=args.state_dir, module=args.module, token=args.token,
                       pin_file=args.pin_file, key_type=args.key_type, dns_name=args.dns_name,
                       softhsm_conf=os.path.abspath(softhsm_conf) if softhsm_conf else None,
                       store_url=args.store_url, name=args.name)
    if args.store_url is not None:
        try:
            parts = check_store_url(args.store_url)
        except ValueError as exc:
            raise ValueError(f"--store-url {exc}") from None
        if parts.get("password"):
            print("hsmca init: warning: the database password in --store-url goes into "
                  "hsmca.toml (mode 0600) and every node's copy of it; libpq can read it "
                  "from ~/.pgpass or PGPASSWORD instead (docs/cluster.md)", file=sys.stderr)
    # Whatever init creates without naming a mode (directories, the SQLite inventory)
    # starts private under this umask; apply_modes then sets every mode explicitly.
    old_umask = os.umask(0o077)
    try:
        written = asyncio.run(run_init(opts))
        state = args.state_dir.resolve()
        apply_modes(state, STATE_MODES)
    except HSMError as exc:
        if "no token labelled" not in str(exc) or "softhsm" not in args.module.lower():
            raise
        if "tokens present: none" not in str(exc):  # it sees tokens: the label is off
            raise HSMError(f"{exc}: check --token (labels are case-sensitive)") from None
        # SoftHSM finds tokens through SOFTHSM2_CONF; a shell without the variable the
        # token was created under sees none of them, which is the usual cause.
        where = (f"SOFTHSM2_CONF={softhsm_conf}" if softhsm_conf
                 else "SOFTHSM2_CONF is unset, so /etc/softhsm/softhsm2.conf is read")
        raise HSMError(f"{exc}; {where}: export SOFTHSM2_CONF=<the softhsm2.conf the token "
                       "was created with> and run init again") from None
    finally:
        os.umask(old_umask)
    print(f"created a CA in {state} with keys generated inside token {args.token!r}:")
    for path in written:
        print(f"  {path.relative_to(state)}")
    _print_anchors(state)
    node = " --node NAME  (on each node; NAME defaults to the host name)" \
        if args.store_url else ""
    print(f"next: hsmca serve --config {state / 'hsmca.toml'}{node}")
    return 0


def _print_anchors(state: Path) -> None:
    """What relying parties, auditors and witnesses pin, to be handed over out of band
    and compared there (an auditor trial found nothing to compare the files with)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from ca.audit.note import verifier_key
    from ca.config import load
    from ca.subject import spki_sha256
    cfg = load(state / "hsmca.toml")
    root = x509.load_pem_x509_certificate(cfg.root_pem.read_bytes())
    audit = load_pem_public_key(cfg.audit_key_pem.read_bytes())
    print("to pin, compared out of band (docs/audit-log.md):")
    print(f"  root certificate SHA-256:    {root.fingerprint(hashes.SHA256()).hex(':').upper()}")
    print(f"  audit public key SHA-256:    {spki_sha256(audit)} (audit/audit_key.pem)")
    if not cfg.cluster:  # a cluster's logs are named by node: GET /v1/audit/logs/NODE/key
        print(f"  audit verifier key:          {verifier_key(cfg.audit_origin, audit)}")  # type: ignore[arg-type]
