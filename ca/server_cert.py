"""The daemon's own TLS certificate: renewed at start-up when it is close to expiry
or no longer matches its key (e.g. a crash between the two file writes).

The key is a software key (it must be usable by OpenSSL for every handshake); the
certificate is signed by the issuing key in the HSM through the audited path.
"""

from __future__ import annotations

import datetime as dt

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ca.config import Config
from ca.fileutil import write_atomic
from ca.init import TLS_DAYS, software_leaf
from ca.store import Store
from hsm.signers import HSMKey
from hsm.worker import HSMWorker

RENEW_BEFORE = dt.timedelta(days=30)
log = structlog.get_logger("hsmca.tls")


def _needs_renewal(config: Config, now: dt.datetime) -> str | None:
    try:
        cert = x509.load_pem_x509_certificates(config.tls_cert.read_bytes())[0]
        key = load_pem_private_key(config.tls_key.read_bytes(), None)
    except (OSError, ValueError, IndexError) as exc:
        return f"unreadable ({exc})"
    if cert.public_key() != key.public_key():
        return "certificate and key do not match"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"expires {cert.not_valid_after_utc.isoformat()}"
    return None


async def ensure_server_cert(config: Config, worker: HSMWorker, issuing_key: HSMKey,
                             issuing: x509.Certificate, store: Store) -> bool:
    """Renew the listener's certificate if due; True if it was renewed."""
    why = _needs_renewal(config, dt.datetime.now(dt.UTC))
    if why is None:
        return False
    log.info("renewing the daemon's TLS certificate", reason=why)
    dns = [config.dns_name] + (["localhost"] if config.dns_name != "localhost" else [])
    cert_pem, key_pem = await software_leaf(
        worker, issuing_key, issuing, store, role="server", cn=config.dns_name, dns=dns,
        ips=["127.0.0.1", "::1"], purpose="tls", days=TLS_DAYS)
    chain = config.chain_pem.read_text()
    # Key first: a crash between the writes leaves a mismatch, which the next start
    # notices and repairs (above), never a certificate for a key that is gone.
    write_atomic(config.tls_key, key_pem, 0o600)
    write_atomic(config.tls_cert, cert_pem + chain)
    return True
