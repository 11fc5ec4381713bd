"""RFC 5280 revocation reasons as cryptography names them, by their RFC names."""

from __future__ import annotations

from cryptography import x509

REASON_FLAGS: dict[str, x509.ReasonFlags] = {
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
# Inventories written before the RFC names were used hold cryptography's snake case.
REASON_FLAGS.update({f.name: f for f in x509.ReasonFlags})
