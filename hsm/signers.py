"""cryptography private-key classes whose `sign()` runs inside the HSM.

cryptography's builders (X.509 certificates, CRLs, OCSP responses, SSH
certificates) call `sign()` on whatever key object they are given, so these
classes let the rest of the code sign without knowing where the key lives (the
django-ca habit). Everything that would reveal the private key raises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from pkcs11 import MGF, Mechanism

if TYPE_CHECKING:
    from hsm.worker import HSMWorker


@dataclass(frozen=True)
class Signature:
    """One signature as the HSM produced it, kept so the caller can audit and check it."""

    message: bytes
    signature: bytes
    check: Callable[[], None]  # raises InvalidSignature if the HSM returned garbage

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.message).hexdigest()

    @property
    def signature_digest(self) -> str:
        return hashlib.sha256(self.signature).hexdigest()


def _refuse(*_: Any, **__: Any) -> NoReturn:
    raise TypeError("this key lives in the HSM and cannot be exported or used for that")


class HSMKeyMixin:
    """State shared by every HSM key class; the worker does the PKCS#11 work."""

    label: str
    uri: str
    key_type: str
    _worker: HSMWorker

    def _init(self, worker: HSMWorker, label: str, uri: str, key_type: str, pub: Any) -> None:
        self._worker, self.label, self.uri, self.key_type, self._pub = (
            worker, label, uri, key_type, pub)

    def mechanism_name(self, hash_name: str = "sha256") -> str:
        raise NotImplementedError

    def _hsm_sign(self, message: bytes, mechanism: Mechanism, data: bytes,
                  param: Any, check: Callable[[bytes], None]) -> bytes:
        return self._worker.sign_raw(self, message, mechanism, data, param, check)

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self

    private_bytes = _refuse
    private_numbers = _refuse


class HSMEllipticCurveKey(HSMKeyMixin, ec.EllipticCurvePrivateKey):
    """SoftHSM offers raw CKM_ECDSA only: hash here, sign the digest there, DER-encode."""

    def __init__(self, worker: HSMWorker, label: str, uri: str, key_type: str,
                 pub: ec.EllipticCurvePublicKey) -> None:
        self._init(worker, label, uri, key_type, pub)

    def mechanism_name(self, hash_name: str = "sha256") -> str:
        return "CKM_ECDSA"

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._pub.curve

    @property
    def key_size(self) -> int:
        return self._pub.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._pub

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA is supported")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = data
            algorithm = algorithm._algorithm
        else:
            h = hashes.Hash(algorithm)
            h.update(data)
            digest = h.finalize()
        pub = self._pub

        def check(der: bytes) -> None:
            pub.verify(der, digest, _prehashed_ecdsa(algorithm))

        return self._hsm_sign(data, Mechanism.ECDSA, digest, None, check)

    exchange = _refuse


class HSMEd25519Key(HSMKeyMixin, ed25519.Ed25519PrivateKey):
    def __init__(self, worker: HSMWorker, label: str, uri: str, key_type: str,
                 pub: ed25519.Ed25519PublicKey) -> None:
        self._init(worker, label, uri, key_type, pub)

    def mechanism_name(self, hash_name: str = "sha256") -> str:
        return "CKM_EDDSA"

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._pub

    def sign(self, data: bytes) -> bytes:
        pub = self._pub

        def check(sig: bytes) -> None:
            pub.verify(sig, data)

        return self._hsm_sign(data, Mechanism.EDDSA, data, None, check)

    private_bytes_raw = _refuse


_RSA_PKCS = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS,
             "sha512": Mechanism.SHA512_RSA_PKCS}
_RSA_PSS = {"sha256": (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256, MGF.SHA256),
            "sha384": (Mechanism.SHA384_RSA_PKCS_PSS, Mechanism.SHA384, MGF.SHA384),
            "sha512": (Mechanism.SHA512_RSA_PKCS_PSS, Mechanism.SHA512, MGF.SHA512)}


class HSMRSAKey(HSMKeyMixin, rsa.RSAPrivateKey):
    """RSA PKCS#1 v1.5 or PSS; the HSM hashes (CKM_SHAxxx_RSA_PKCS[_PSS])."""

    def __init__(self, worker: HSMWorker, label: str, uri: str, key_type: str,
                 pub: rsa.RSAPublicKey) -> None:
        self._init(worker, label, uri, key_type, pub)

    def mechanism_name(self, hash_name: str = "sha256") -> str:
        return f"CKM_{hash_name.upper()}_RSA_PKCS"

    @property
    def key_size(self) -> int:
        return self._pub.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._pub

    def sign(self, data: bytes, padding_: padding.AsymmetricPadding,
             algorithm: hashes.HashAlgorithm | utils.Prehashed) -> bytes:
        if isinstance(algorithm, utils.Prehashed):
            raise TypeError("pre-hashed RSA signing is not supported by the HSM signer")
        name = algorithm.name
        if name not in _RSA_PKCS:
            raise TypeError(f"unsupported hash {name} for RSA")
        pub = self._pub
        if isinstance(padding_, padding.PKCS1v15):
            mech, param = _RSA_PKCS[name], None
        elif isinstance(padding_, padding.PSS):
            mech, hash_mech, mgf = _RSA_PSS[name]
            # Salt length = digest length, the usual choice and what cryptography's
            # DIGEST_LENGTH means; anything else is refused rather than guessed.
            salt = padding_._salt_length
            if salt not in (padding.PSS.DIGEST_LENGTH, algorithm.digest_size):
                raise TypeError("PSS with the HSM signer needs salt length = digest length")
            param = (hash_mech, mgf, algorithm.digest_size)
            padding_ = padding.PSS(padding.MGF1(algorithm), algorithm.digest_size)
        else:
            raise TypeError("RSA padding must be PKCS1v15 or PSS")
        pad = padding_

        def check(sig: bytes) -> None:
            pub.verify(sig, data, pad, algorithm)

        return self._hsm_sign(data, mech, data, param, check)

    decrypt = _refuse


HSMKey = HSMEllipticCurveKey | HSMEd25519Key | HSMRSAKey


def _prehashed_ecdsa(algorithm: hashes.HashAlgorithm) -> ec.ECDSA:
    """ECDSA over an already computed digest, built once per hash (every check needs one)."""
    found = _PREHASHED.get(algorithm.name)
    if found is None:
        found = _PREHASHED[algorithm.name] = ec.ECDSA(utils.Prehashed(algorithm))
    return found


_PREHASHED: dict[str, ec.ECDSA] = {}
