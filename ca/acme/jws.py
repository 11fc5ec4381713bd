"""JWS of ACME requests (RFC 8555 6.2-6.4), parsed and verified with josepy and the
`acme` package's JWS classes, in Boulder's order (wfe2/verify.go):

1. the body is one flattened JWS: no unprotected `header`, no `signatures` array;
2. the protected header names an allowed algorithm that matches the key;
3. the key: an embedded `jwk` (new accounts, revocation by the certificate's key),
   checked against the key policy, or a `kid` naming an existing account;
4. the signature verifies;
5. only then is the nonce redeemed (a forged request cannot burn a client's nonce);
6. the `url` header is the URL the request was sent to.

Every failure is an `AcmeProblem`; nothing here trusts josepy's `combined` header
(which would merge an unprotected header into the protected one).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import josepy as jose
from acme import jws as acme_jws
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca import strict_json
from ca.acme.nonces import Nonces
from ca.acme.problems import AcmeProblem, bad_algorithm
from ca.policy import RSA_EXPONENT
from ca.store import AcmeAccount

# RS256 and the ECDSA algorithms (RFC 8555 6.2: RS256 MUST, ES256 SHOULD); no HS*
# (a shared secret is no account key) and no "none".
ALGORITHMS: dict[str, tuple[jose.JWASignature, type]] = {
    "RS256": (jose.RS256, jose.JWKRSA), "ES256": (jose.ES256, jose.JWKEC),
    "ES384": (jose.ES384, jose.JWKEC), "ES512": (jose.ES512, jose.JWKEC),
}
_CURVE_OF = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
PROTECTED_FIELDS = frozenset({"alg", "jwk", "kid", "nonce", "url"})
JOSE_JSON = "application/jose+json"


@dataclass(frozen=True)
class Verified:
    payload: bytes
    jwk: jose.JWK
    account: AcmeAccount | None  # None when the JWS carried its own jwk
    url: str

    def post_as_get(self, what: str) -> None:
        """RFC 8555 6.3: a resource is read with an empty payload, not even {}."""
        if self.payload != b"":
            raise AcmeProblem("malformed", f"{what} is fetched with POST-as-GET: a JWS "
                              "with an empty payload")

    def json(self, empty_ok: bool = False) -> dict[str, Any] | None:
        """The payload as a JSON object; None for POST-as-GET's empty payload."""
        if self.payload == b"":
            if empty_ok:
                return None
            raise AcmeProblem("malformed", "this request needs a JSON object as its payload")
        obj = loads(self.payload, "JWS payload")
        if not isinstance(obj, dict):
            raise AcmeProblem("malformed", "the JWS payload must be a JSON object")
        return obj


_B64URL = re.compile(r"^[A-Za-z0-9_-]*\Z")


def b64decode(text: object, what: str) -> bytes:
    if not isinstance(text, str) or not _B64URL.match(text) or len(text) % 4 == 1:
        raise AcmeProblem("malformed", f"{what} must be base64url without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise AcmeProblem("malformed", f"{what} is not base64url") from None


def loads(raw: bytes, what: str) -> Any:
    """JSON from the client, as Unicode text (ca/strict_json.py); `malformed` if not."""
    try:
        return strict_json.loads(raw)
    except strict_json.NotUnicode as exc:
        raise AcmeProblem("malformed", f"the {what} {exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # nesting bombs included
        raise AcmeProblem("malformed", f"the {what} is not JSON") from None


def parse_flat(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step 1: (the JWS object, its decoded protected header)."""
    obj = loads(raw, "body")
    if not isinstance(obj, dict):
        raise AcmeProblem("malformed", "the body must be a flattened JWS object")
    if "header" in obj:
        raise AcmeProblem("malformed", "unprotected JWS headers are not accepted")
    if "signatures" in obj:
        raise AcmeProblem("malformed", "one flattened JWS, not a JWS with several signatures")
    if set(obj) != {"protected", "payload", "signature"}:
        raise AcmeProblem("malformed", "a flattened JWS has exactly protected, payload and "
                          "signature")
    if not all(isinstance(obj[k], str) for k in obj):
        raise AcmeProblem("malformed", "protected, payload and signature are strings")
    protected = loads(b64decode(obj["protected"], "protected"), "protected header")
    if not isinstance(protected, dict):
        raise AcmeProblem("malformed", "the protected header must be a JSON object")
    extra = set(protected) - PROTECTED_FIELDS
    if extra:
        raise AcmeProblem("malformed", f"unexpected protected header field(s): "
                          f"{', '.join(sorted(extra))[:100]}")
    return obj, protected


def crypto_key(jwk: jose.JWK) -> Any:
    """The cryptography key inside a JWK (josepy wraps it in a ComparableKey)."""
    return getattr(jwk.key, "_wrapped", jwk.key)


def check_key(jwk: jose.JWK, alg_name: str) -> None:
    """Step 2's second half and the key policy for a new key."""
    _, kty = ALGORITHMS[alg_name]
    if not isinstance(jwk, kty):
        raise bad_algorithm(f"{alg_name} does not fit a {type(jwk).__name__[3:]} key",
                            ALGORITHMS)
    key = crypto_key(jwk)
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, _CURVE_OF[alg_name]):
            raise bad_algorithm(f"{alg_name} does not fit a key on {key.curve.name}",
                                ALGORITHMS)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeProblem("badPublicKey", "the jwk is a private key")
    elif isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 4096 or key.public_numbers().e != RSA_EXPONENT:
            # Before any signature is checked: a huge e makes each check costly.
            raise AcmeProblem("badPublicKey", "RSA account keys are 2048 to 4096 bits, "
                              "with e = 65537")
    else:
        raise AcmeProblem("badPublicKey", "account keys are ECDSA or RSA public keys")


def _words(exc: Exception) -> str:
    """josepy's words for what it could not read, without the values it quotes: the
    repr of a header field's dict (a jwk's members: a trial's bogus private "d" came
    back in the answer and the daemon's log)."""
    if isinstance(exc, KeyError):
        return f"a member is missing: {exc}"
    said = re.sub(r"\s*\(\{.*\}\)", "", str(exc))
    return re.sub(r",? full message: \{.*\}", "", said)


# RFC 7518 6.2.2 and 6.3.2: the members only a private key has. (A symmetric key's "k"
# is refused by its algorithm, as before; _words keeps its value out of the answer.)
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


def thumbprint(jwk: jose.JWK) -> str:
    return base64.urlsafe_b64encode(jwk.thumbprint()).rstrip(b"=").decode()


async def verify(raw: bytes, content_type: str, url: str, nonces: Nonces, *,
                 want: str, account_of: Callable[[str], Awaitable[AcmeAccount | None]],
                 account_prefix: str) -> Verified:
    """Steps 1-6. want: "jwk" (the JWS carries its key), "kid" (an account's), or
    "either". `account_prefix` is the URL accounts have, followed by their id."""
    if content_type != JOSE_JSON:
        raise AcmeProblem("malformed", f"ACME requests are sent as {JOSE_JSON}", 415)
    obj, protected = parse_flat(raw)
    alg_name = protected.get("alg")
    if not isinstance(alg_name, str) or alg_name not in ALGORITHMS:
        raise bad_algorithm(f"the algorithm must be one of {', '.join(ALGORITHMS)}, not "
                            f"{str(alg_name)[:20]!r}", ALGORITHMS)
    nonce_text = protected.get("nonce")
    if nonce_text is not None and (not isinstance(nonce_text, str)
                                   or not _B64URL.match(nonce_text)):
        # RFC 8555 6.5.2: a nonce that is not base64url is malformed, not a bad nonce.
        raise AcmeProblem("malformed", "the nonce header must be base64url without padding")
    has_jwk, has_kid = "jwk" in protected, "kid" in protected
    if has_jwk == has_kid:
        raise AcmeProblem("malformed", "the protected header has exactly one of jwk and kid")
    if want == "jwk" and not has_jwk:
        raise AcmeProblem("malformed", "this request is signed with the key in a jwk header")
    if want == "kid" and not has_kid:
        raise AcmeProblem("malformed", "this request is signed by an account (kid header)")
    if has_jwk:
        jwk_given = protected.get("jwk")
        if not isinstance(jwk_given, dict):
            raise AcmeProblem("malformed", "the jwk header is not a JWK (a JSON object)")
        if private := sorted(PRIVATE_MEMBERS & jwk_given.keys()):
            # Before josepy reads it: its errors quote the header's dict, private members
            # and all, into the answer and the daemon's log (an HTTP trial's bogus "d").
            raise AcmeProblem("badPublicKey", f"the jwk is a private key (it has "
                              f"{', '.join(private)}): send the public key alone")
    try:  # josepy reads the JWS and its header fields (nonce, url, kid, jwk)
        jws = acme_jws.JWS.from_json(obj)
        sig = jws.signature
        header = acme_jws.Header.json_loads(sig.protected)
    except Exception as exc:  # josepy raises many kinds for hostile input; all are 400
        raise AcmeProblem("malformed", f"the JWS cannot be parsed: {_words(exc)[:160]}") \
            from None
    account: AcmeAccount | None = None
    if has_jwk:
        jwk = header.jwk
        if not isinstance(jwk, jose.JWK):
            raise AcmeProblem("malformed", "the jwk header is not a JWK")
        check_key(jwk, alg_name)
    else:
        kid = header.kid
        if not isinstance(kid, str) or not kid.startswith(account_prefix):
            raise AcmeProblem("accountDoesNotExist", "the kid is not an account URL of this "
                              "server", 400)
        account = await account_of(kid[len(account_prefix):])
        if account is None:
            raise AcmeProblem("accountDoesNotExist", "no such account", 400)
        try:
            jwk = jose.JWK.json_loads(account.jwk)
        except Exception:  # a stored key always parses; never a 500 if not
            raise AcmeProblem("serverInternal", "the account's key cannot be read", 500) \
                from None
        check_key(jwk, alg_name)
    try:
        good = sig.verify(jws.payload, jwk)
    except Exception:  # malformed signatures raise from deep inside
        good = False
    if not good:
        if account is not None:  # most often a client still using a key it changed
            raise AcmeProblem("malformed", "the JWS signature does not verify with this "
                              "account's key (after a key change, sign with the new key)")
        raise AcmeProblem("malformed", "the JWS signature does not verify")
    nonce = header.nonce
    if not isinstance(nonce, bytes) or not await nonces.redeem(nonce):
        raise AcmeProblem("badNonce", "the nonce is missing, unknown, expired or used")
    if header.url != url:
        raise AcmeProblem("unauthorized", f"the JWS url header is not this request's URL "
                          f"({url})", 401)
    if account is not None and account.status != "valid":
        # RFC 8555 7.3.6: a deactivated account's requests get 401 unauthorized.
        # A revocation can go on at once, signed with the certificate's own key (an
        # ACME trial's lego was sent to the operator for a new EAB key to revoke)
        now = (": to revoke one of its certificates now, sign with that certificate's "
               "key (certbot revoke --cert-path CERT --key-path KEY)"
               if url.endswith("/revoke-cert") else "")
        raise AcmeProblem("unauthorized", f"the account is {account.status}: ask the CA's "
                          "operator for a new EAB key and register a new account with it "
                          "(docs/acme.md, \"Replacing an account\"); certificates it got "
                          f"stay valid until they expire or are revoked{now}", 401)
    return Verified(jws.payload, jwk, account, url)


def verify_inner(obj: object, outer_url: str) -> tuple[jose.JWK, dict[str, Any]]:
    """key-change's inner JWS (RFC 8555 7.3.5): signed by the new key, with its jwk, no
    nonce, the same url. Returns (new key, payload)."""
    if not isinstance(obj, dict):
        raise AcmeProblem("malformed", "the payload must be the inner JWS object")
    obj, protected = parse_flat(json.dumps(obj).encode())
    alg_name = protected.get("alg")
    if not isinstance(alg_name, str) or alg_name not in ALGORITHMS:
        raise bad_algorithm("the inner JWS's algorithm is not allowed", ALGORITHMS)
    if "jwk" not in protected or "kid" in protected or "nonce" in protected:
        raise AcmeProblem("malformed", "the inner JWS carries the new jwk, no kid, no nonce")
    try:
        jws = acme_jws.JWS.from_json(obj)
        sig = jws.signature
        header = acme_jws.Header.json_loads(sig.protected)
        jwk = header.jwk
        if isinstance(jwk, jose.JWK):
            check_key(jwk, alg_name)  # before the signature: a huge e makes it costly
        good = isinstance(jwk, jose.JWK) and sig.verify(jws.payload, jwk)
    except AcmeProblem:
        raise
    except Exception:
        good, jwk = False, None
    if not good or jwk is None:
        raise AcmeProblem("malformed", "the inner JWS signature does not verify")
    if header.url != outer_url:
        raise AcmeProblem("malformed", "the inner JWS url must be the outer one's")
    payload = loads(jws.payload, "inner JWS payload")
    if not isinstance(payload, dict):
        raise AcmeProblem("malformed", "the inner JWS payload must be a JSON object")
    return jwk, payload


def verify_eab(eab: object, account_jwk: jose.JWK, new_account_url: str
               ) -> tuple[str, Callable[[bytes], bool]]:
    """externalAccountBinding (RFC 8555 7.3.4): (kid, a check of its MAC with a key).
    The MAC is checked by the caller once it has the key for that kid."""
    if not isinstance(eab, dict):
        raise AcmeProblem("malformed", "externalAccountBinding must be a flattened JWS")
    obj, protected = parse_flat(json.dumps(eab).encode())
    if protected.get("alg") not in ("HS256", "HS384", "HS512"):
        raise bad_algorithm("the EAB is MACed with HS256, HS384 or HS512",
                            ("HS256", "HS384", "HS512"))
    if set(protected) != {"alg", "kid", "url"}:
        raise AcmeProblem("malformed", "the EAB's protected header has alg, kid and url, no "
                          "nonce")
    if protected.get("url") != new_account_url:
        raise AcmeProblem("unauthorized", "the EAB's url must be the newAccount URL", 403)
    kid = protected.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= 100:
        raise AcmeProblem("malformed", "the EAB kid must be a string")
    try:
        jws = acme_jws.JWS.from_json(obj)
        sig = jws.signature
        bound = jose.JWK.json_loads(jws.payload)
    except Exception:
        raise AcmeProblem("malformed", "the EAB cannot be parsed") from None
    if thumbprint(bound) != thumbprint(account_jwk):
        raise AcmeProblem("unauthorized", "the EAB binds another key than the account's", 403)

    def check(mac_key: bytes) -> bool:
        try:
            return bool(sig.verify(jws.payload, jose.JWKOct(key=mac_key)))
        except Exception:
            return False
    return kid, check
