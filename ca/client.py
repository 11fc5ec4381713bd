"""Client side of the CLI: enroll, renew, revoke, tokens, over (mutual) TLS."""

from __future__ import annotations

import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.fileutil import write_atomic

TIMEOUT = aiohttp.ClientTimeout(total=60)


class ClientError(Exception):
    """The daemon refused or could not be reached; the message says which and why."""


def ssl_context(ca: Path | None, cert: Path | None = None,
                key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ClientError(f"cannot load the client certificate {cert} / key {key}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
    return ctx


async def _request(session: aiohttp.ClientSession, method: str, url: str,
                   ctx: ssl.SSLContext, *, json_body: Any = None,
                   headers: dict[str, str] | None = None, expect: int = 200
                   ) -> tuple[str, bytes]:
    """(content type, body bytes) of a response with status `expect`; every failure,
    the daemon's problem+json detail included, becomes one ClientError line."""
    try:
        async with session.request(method, url, json=json_body, headers=headers,
                                   ssl=ctx) as r:
            body = await r.read()
            if r.status != expect:
                detail = body.decode("utf-8", "replace").strip()[:300]
                if r.content_type == "application/problem+json":
                    try:
                        detail = json.loads(body).get("detail", detail)
                    except (ValueError, AttributeError):
                        pass
                raise ClientError(f"{method} {url}: {r.status} {r.reason}: {detail}")
            return r.content_type, body
    except aiohttp.ClientConnectorCertificateError as exc:
        raise ClientError(f"cannot connect to {url}: the server's certificate is not trusted "
                          f"({exc.certificate_error}); pass --ca with the CA's root.pem") from None
    except aiohttp.ClientConnectorError as exc:
        raise ClientError(f"cannot connect to {url}: {exc.os_error.strerror or exc}; is "
                          "`hsmca serve` running there?") from None
    except TimeoutError:
        raise ClientError(f"{method} {url}: no answer within {TIMEOUT.total:.0f} s") from None
    except aiohttp.ClientError as exc:
        raise ClientError(f"{method} {url} failed: {exc}") from None


async def call(method: str, url: str, ctx: ssl.SSLContext, *, json_body: Any = None,
               headers: dict[str, str] | None = None, expect: int = 200) -> Any:
    """One request on a fresh session; JSON bodies decoded, others as text."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        ctype, body = await _request(s, method, url, ctx, json_body=json_body,
                                     headers=headers, expect=expect)
    return json.loads(body) if ctype.endswith("json") else body.decode("utf-8", "replace")


def make_csr(names: list[str], key: Any) -> str:
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if "://" in n:
                sans.append(x509.UniformResourceIdentifier(n))
            elif "@" in n:
                sans.append(x509.RFC822Name(n))
            else:
                sans.append(x509.DNSName(n))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_credential(out: Path, issued: dict[str, Any], key: Any | None,
                     cert_name: str = "cert.pem", key_name: str = "key.pem") -> None:
    out.mkdir(parents=True, exist_ok=True)
    if key is not None:
        write_atomic(out / key_name, key_pem(key), 0o600)
    write_atomic(out / cert_name, issued["certificate"])
    write_atomic(out / "chain.pem", issued["chain"])


async def enroll(url: str, token: str, names: list[str], out: Path, ca: Path | None
                 ) -> dict[str, Any]:
    key = new_key()
    issued = await call("POST", f"{url}/v1/x509/enroll", ssl_context(ca),
                        json_body={"csr": make_csr(names, key)},
                        headers={"Authorization": f"Bearer {token}"}, expect=201)
    write_credential(out, issued, key)
    return issued


async def renew(url: str, cert: Path, key: Path, ca: Path | None, rekey: bool
                ) -> dict[str, Any]:
    ctx = ssl_context(ca, cert, key)
    body: dict[str, Any] = {}
    new = None
    if rekey:
        current = x509.load_pem_x509_certificate(cert.read_bytes())
        san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
        new = new_key()
        body["csr"] = make_csr(names, new)
    issued = await call("POST", f"{url}/v1/x509/renew", ctx, json_body=body, expect=201)
    if new is not None:
        write_atomic(key, key_pem(new), 0o600)
    write_atomic(cert, issued["certificate"])
    write_atomic(cert.parent / "chain.pem", issued["chain"])
    return issued


async def get_bytes(session: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext) -> bytes:
    """GET `url` and return the body exactly as sent.

    Audit log lines must reach the verifier unchanged, tampered or not, so nothing is
    decoded. The caller owns `session`, so paging through a long log reuses one TLS
    connection.
    """
    return (await _request(session, "GET", url, ctx))[1]
