"""cryptography private-key classes whose `sign()` runs inside the HSM.

cryptography's builders (X.509 certificates, CRLs, OCSP responses, SSH
certificates) call `sign()` on whatever key object they are given, so these
classes let the rest of the code sign without knowing where the key lives (the
django-ca habit). Everything that would reveal the private key raises.

A signer is made for one durable intent line and signs once: `HSM.sign` refuses a
second signature for the same intent. It keeps what it signed (`signed`), so that
the caller can write the outcome line with the digests of the exact bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from hsm.session import HSM, KeyInfo, Scheme


@dataclass(frozen=True)
class Signed:
    """One signature as the HSM made it: SHA-256 of the message and of the signature."""

    digest: str
    signature_digest: str


def _refuse(*_: Any, **__: Any) -> NoReturn:
    raise TypeError("this key lives in the HSM and cannot be exported or used for that")


class _HSMSigner:
    _hsm: HSM
    _info: KeyInfo
    _intent: int
    signed: list[Signed]

    def _bind(self, hsm: HSM, info: KeyInfo, intent_seq: int) -> None:
        self._hsm, self._info, self._intent, self.signed = hsm, info, intent_seq, []

    @property
    def info(self) -> KeyInfo:
        return self._info

    @property
    def intent_seq(self) -> int:
        """The seq of the intent line this signer signs for."""
        return self._intent

    def _sign(self, scheme: Scheme, message: bytes) -> bytes:
        sig = self._hsm.sign(self._info.label, scheme, message, self._intent)
        self.signed.append(Signed(hashlib.sha256(message).hexdigest(),
                                  hashlib.sha256(sig).hexdigest()))
        return sig

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self

    private_bytes = _refuse
    private_numbers = _refuse


class HSMEllipticCurveKey(_HSMSigner, ec.EllipticCurvePrivateKey):
    """SoftHSM offers raw CKM_ECDSA only: the HSM layer hashes, signs the digest and
    DER-encodes the signature."""

    def __init__(self, hsm: HSM, info: KeyInfo, intent_seq: int) -> None:
        self._bind(hsm, info, intent_seq)

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._info.public_key.curve  # type: ignore[union-attr]

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._info.public_key  # type: ignore[return-value]

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA is supported")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            raise TypeError("pre-hashed ECDSA is not supported by the HSM signer")
        return self._sign(Scheme("ecdsa", algorithm.name), data)

    exchange = _refuse


class HSMEd25519Key(_HSMSigner, ed25519.Ed25519PrivateKey):
    def __init__(self, hsm: HSM, info: KeyInfo, intent_seq: int) -> None:
        self._bind(hsm, info, intent_seq)

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._info.public_key  # type: ignore[return-value]

    def sign(self, data: bytes) -> bytes:
        return self._sign(Scheme("eddsa"), data)

    private_bytes_raw = _refuse


class HSMRSAKey(_HSMSigner, rsa.RSAPrivateKey):
    """RSA PKCS#1 v1.5 or PSS (salt length = digest length); the HSM hashes."""

    def __init__(self, hsm: HSM, info: KeyInfo, intent_seq: int) -> None:
        self._bind(hsm, info, intent_seq)

    @property
    def key_size(self) -> int:
        return self._info.public_key.key_size  # type: ignore[union-attr]

    def public_key(self) -> rsa.RSAPublicKey:
        return self._info.public_key  # type: ignore[return-value]

    def sign(self, data: bytes, padding_: padding.AsymmetricPadding,
             algorithm: hashes.HashAlgorithm | utils.Prehashed) -> bytes:
        if isinstance(algorithm, utils.Prehashed):
            raise TypeError("pre-hashed RSA signing is not supported by the HSM signer")
        if algorithm.name not in ("sha256", "sha384", "sha512"):
            raise TypeError(f"unsupported hash {algorithm.name} for RSA")
        if isinstance(padding_, padding.PKCS1v15):
            return self._sign(Scheme("rsa-pkcs1", algorithm.name), data)
        if isinstance(padding_, padding.PSS):
            # Salt length = digest length, the usual choice and what cryptography's
            # DIGEST_LENGTH means; anything else is refused rather than guessed.
            if padding_._salt_length not in (padding.PSS.DIGEST_LENGTH, algorithm.digest_size):
                raise TypeError("PSS with the HSM signer needs salt length = digest length")
            return self._sign(Scheme("rsa-pss", algorithm.name), data)
        raise TypeError("RSA padding must be PKCS1v15 or PSS")

    decrypt = _refuse


HSMKey = HSMEllipticCurveKey | HSMEd25519Key | HSMRSAKey


def signer(hsm: HSM, info: KeyInfo, intent_seq: int) -> HSMKey:
    """A cryptography private key for `info` that signs once, for `intent_seq`."""
    if info.key_type == "ed25519":
        return HSMEd25519Key(hsm, info, intent_seq)
    if info.key_type.startswith("rsa"):
        return HSMRSAKey(hsm, info, intent_seq)
    return HSMEllipticCurveKey(hsm, info, intent_seq)


def mechanism_name(info: KeyInfo, hash_name: str | None) -> str:
    """The PKCS#11 mechanism a signature of `info` with `hash_name` uses (for the
    intent line, written before the builder has asked for anything)."""
    if info.key_type == "ed25519":
        return Scheme("eddsa").mechanism_name
    if info.key_type.startswith("rsa"):
        return Scheme("rsa-pkcs1", hash_name).mechanism_name
    return Scheme("ecdsa", hash_name).mechanism_name
