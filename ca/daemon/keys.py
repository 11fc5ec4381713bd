"""The keys and issuers a process of the daemon signs with, checked against the state
directory at start (a swapped token or state directory is refused)."""

from __future__ import annotations

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ca.config import KEY_LABELS, Config
from ca.issuance import issuers
from ca.issuance.pipeline import SigningPipeline


async def load_issuers(config: Config, pipeline: SigningPipeline) -> issuers.Issuers:
    """Every key found and checked non-exportable, every certificate matched to its key."""
    keys = {purpose: await pipeline.load_key(config.key_label(purpose))
            for purpose in KEY_LABELS}
    if keys["audit"].key_type != "ed25519":
        raise ValueError("the audit key must be Ed25519 (C2SP signed notes)")
    if load_pem_public_key(config.audit_key_pem.read_bytes()) != keys["audit"].public_key:
        raise ValueError(f"{config.audit_key_pem} does not belong to the audit key in the HSM")
    return issuers.load(config.root_pem, config.issuing_pem, keys)
