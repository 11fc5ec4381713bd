"""Key generation templates, look-up and the non-export check.

Every CA key is generated inside the token as a token object that is private,
sensitive, not extractable and not modifiable; `check_non_exportable` reads the
attributes back (plus the ones only the token can set: NEVER_EXTRACTABLE,
ALWAYS_SENSITIVE, LOCAL) and refuses a key that could ever have left the HSM.
"""

from __future__ import annotations

from typing import Any

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from hsm.errors import HSMError, KeyExportable, KeyNotFound

KEY_TYPES = ("ec-p256", "ec-p384", "ed25519", "rsa-3072")
_CURVES: dict[str, tuple[str, ec.EllipticCurve]] = {
    "ec-p256": ("secp256r1", ec.SECP256R1()),
    "ec-p384": ("secp384r1", ec.SECP384R1()),
}
# DER OBJECT IDENTIFIER 1.3.101.112 (id-Ed25519), the EC_PARAMS SoftHSM expects.
ED25519_PARAMS = bytes.fromhex("06032b6570")

# What must read back from a private key for it to count as non-exportable.
REQUIRED_ATTRS: dict[str, tuple[Attribute, bool]] = {
    "token": (Attribute.TOKEN, True),
    "private": (Attribute.PRIVATE, True),
    "sensitive": (Attribute.SENSITIVE, True),
    "always_sensitive": (Attribute.ALWAYS_SENSITIVE, True),
    "extractable": (Attribute.EXTRACTABLE, False),
    "never_extractable": (Attribute.NEVER_EXTRACTABLE, True),
    "modifiable": (Attribute.MODIFIABLE, False),
    "local": (Attribute.LOCAL, True),  # generated in this token, never imported
}

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


def _private_template() -> dict[Attribute, Any]:
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }


def _public_template() -> dict[Attribute, Any]:
    return {Attribute.TOKEN: True, Attribute.MODIFIABLE: False, Attribute.VERIFY: True,
            Attribute.ENCRYPT: False, Attribute.WRAP: False}


def generate(session: pkcs11.Session, label: str, key_type: str) -> None:
    """Create a key pair inside the token under `label` (also its CKA_ID)."""
    if key_type not in KEY_TYPES:
        raise HSMError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    if find_private(session, label, required=False) is not None:
        raise HSMError(f"the token already holds a key labelled {label!r}; refusing to "
                       "overwrite it")
    common = {"label": label, "id": label.encode(), "store": True,
              "private_template": _private_template(), "public_template": _public_template()}
    if key_type in _CURVES:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type][0])},
            local=True)
        params.generate_keypair(**common)
    elif key_type == "ed25519":
        params = session.create_domain_parameters(
            KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: ED25519_PARAMS}, local=True)
        params.generate_keypair(**common)
    else:
        session.generate_keypair(KeyType.RSA, 3072, **common)


def find_private(session: pkcs11.Session, label: str, required: bool = True) -> Any:
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                      Attribute.LABEL: label}))
    if len(found) > 1:
        raise HSMError(f"the token holds {len(found)} private keys labelled {label!r}; "
                       "labels must be unique")
    if not found:
        if required:
            raise KeyNotFound(f"no private key labelled {label!r} in the token "
                           "(was `hsmca init` run against this token?)")
        return None
    return found[0]


def key_labels(session: pkcs11.Session, public: bool = False) -> list[str]:
    """The label of every private (or public) key in the token (a key without one:
    '')."""
    return sorted(str(k.label or "") for k in session.get_objects({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY if public else ObjectClass.PRIVATE_KEY}))


def find_objects(session: pkcs11.Session, label: str, public: bool) -> list[Any]:
    """Every public (or private) key object labelled `label`."""
    return list(session.get_objects({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY if public else ObjectClass.PRIVATE_KEY,
        Attribute.LABEL: label}))


def find_public(session: pkcs11.Session, label: str) -> Any:
    found = find_objects(session, label, public=True)
    if not found:
        raise KeyNotFound(f"no public key labelled {label!r} in the token")
    if len(found) > 1:
        raise HSMError(f"expected one public key labelled {label!r} in the token, "
                       f"found {len(found)}")
    return found[0]


def check_non_exportable(private_key: Any, label: str) -> dict[str, bool]:
    """Read the protective attributes back; raise KeyExportable if any is wrong."""
    seen: dict[str, bool] = {}
    for name, (attr, wanted) in REQUIRED_ATTRS.items():
        try:
            value = bool(private_key[attr])
        except pkcs11.PKCS11Error as exc:
            raise KeyExportable(f"key {label!r}: cannot read {name} ({type(exc).__name__}); "
                                "refusing a key whose protection cannot be checked") from exc
        seen[name] = value
        if value != wanted:
            raise KeyExportable(f"key {label!r} has {name}={value}; a CA key must have "
                                f"{name}={wanted} or it could leave the HSM. Generate a new "
                                "key with `hsmca init`.")
    return seen


def public_key_of(public_obj: Any) -> tuple[str, PublicKey]:
    """The key type name and the cryptography public key of a PKCS#11 public object."""
    key_type = public_obj[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        n = int.from_bytes(public_obj[Attribute.MODULUS], "big")
        e = int.from_bytes(public_obj[Attribute.PUBLIC_EXPONENT], "big")
        pub = rsa.RSAPublicNumbers(e, n).public_key()
        return f"rsa-{pub.key_size}", pub
    point = _unwrap_octet_string(public_obj[Attribute.EC_POINT])
    if key_type == KeyType.EC_EDWARDS:
        return "ed25519", ed25519.Ed25519PublicKey.from_public_bytes(point[-32:])
    if key_type == KeyType.EC:
        params = public_obj[Attribute.EC_PARAMS]
        for name, (oid_name, curve) in _CURVES.items():
            if params == encode_named_curve_parameters(oid_name):
                return name, ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        raise HSMError("EC key on a curve hsmca does not support")
    raise HSMError(f"unsupported key type {key_type!r}")


def _unwrap_octet_string(data: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the point (PKCS#11 2.40 section 2.3.3)."""
    if len(data) < 2 or data[0] != 0x04:
        return data
    length = data[1]
    offset = 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[2:2 + n], "big")
        offset = 2 + n
    if offset + length == len(data):
        return data[offset:]
    return data  # a raw uncompressed point that merely starts with 0x04
