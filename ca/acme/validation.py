"""Challenge validation: http-01 (RFC 8555 8.3), tls-alpn-01 (RFC 8737) and dns-01
(RFC 8555 8.4), with timeouts and a bound on how many run at once.

The slots are shared: one account holds at most a quarter of a worker's slots at once,
and what it asks beyond waits in its own lane, so an account that sends hundreds of
challenges to a host that never answers delays its own validations far more than
anyone else's (others wait at most for its quarter). Several such accounts together
can still fill every slot. A validation that has not started within QUEUE_FACTOR
timeouts fails (rateLimited); it never ran, so it does not count as a failed
validation.

Where a name is reached: its address in [acme.hosts] if listed, else from the
[acme] resolver (or the system's, without one); http-01 on [acme] http-01-port with
`Host: name`, tls-alpn-01 on tls-alpn-01-port with SNI `name`. http-01 follows at
most a few redirects, and only to http on the http-01 port or https on the
tls-alpn-01 port; it reads at most MAX_BODY bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import josepy as jose
from acme import challenges
from cryptography import x509

from ca.config import AcmeConfig
from ca.http_body import read_at_most

MAX_BODY = 4096
MAX_REDIRECTS = 5
ALPN = "acme-tls/1"
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
QUEUE_FACTOR = 3  # validation timeouts a validation may wait for a slot


def longest_s(cfg: AcmeConfig) -> float:
    """The longest a validation runs, from the challenge's POST: its wait, then its
    work. A validation still processing long after that was orphaned (its worker
    went away)."""
    return cfg.validation_timeout_s * (QUEUE_FACTOR + 1)


def _http_why(exc: Exception, addr: str, port: int) -> str:
    """Why a fetch failed, without aiohttp's own wording ("ssl:default [Connect call
    failed ...]")."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        code = exc.os_error.errno  # asyncio's strerror is "Connect call failed (...)"
        why = os.strerror(code) if code else str(exc.os_error) or "no connection"
        return f"cannot connect to {addr} port {port}: {why}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without an answer"
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return f"the answer is not valid HTTP ({str(exc)[:120]})"
    return str(exc)[:200]


@dataclass
class Failed(Exception):
    """A validation failed: the ACME error type and what the client should fix."""

    kind: str  # connection | incorrectResponse | tls | dns | rateLimited (RFC 8555 6.7)
    detail: str

    def __str__(self) -> str:
        return self.detail


def key_authorization(token: str, jwk: jose.JWK) -> str:
    """token "." base64url(thumbprint): the acme package's definition, shared by the
    three challenge types."""
    return challenges.HTTP01(token=jose.decode_b64jose(token)).key_authorization(jwk)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
# Clouds' metadata services outside link-local: AWS's over IPv6, Alibaba's
_METADATA = (ipaddress.IPv6Address("fd00:ec2::254"), ipaddress.IPv4Address("100.100.100.200"))


def _reachable(name: str, address: str) -> str:
    """`address`, unless it is one no validated host has: link-local (169.254.169.254 is
    most clouds' metadata service), a few other clouds' metadata addresses, unspecified,
    multicast or broadcast (also inside NAT64's 64:ff9b::/96). An account that
    controls its name's DNS record pointed the validator there and read the answer's
    status back (a security trial). Loopback stays: the CA's own host answers only on
    the validation ports, and tests and single-host setups name it."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    elif isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64:  # the IPv4 inside
        ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip in _METADATA or \
            ip == ipaddress.IPv4Address("255.255.255.255"):
        raise Failed("dns", f"{name} resolves to {address}, an address no host to validate "
                     "has (link-local, a cloud's metadata service, unspecified, multicast or "
                     "broadcast): the CA does not connect there; pin the name in "
                     "[acme.hosts] if it is meant")
    return address


class Validator:
    def __init__(self, cfg: AcmeConfig) -> None:
        self.cfg = cfg
        self._slots = asyncio.Semaphore(cfg.max_validations)
        self._per_account = max(1, cfg.max_validations // 4)
        self._lanes: dict[str, tuple[asyncio.Semaphore, int]] = {}  # account: (lane, users)

    @contextlib.asynccontextmanager
    async def _lane(self, account: str) -> AsyncIterator[None]:
        lane, users = self._lanes.get(account) or (asyncio.Semaphore(self._per_account), 0)
        self._lanes[account] = (lane, users + 1)
        try:
            async with lane:
                yield
        finally:
            lane, users = self._lanes[account]
            if users == 1:
                del self._lanes[account]
            else:
                self._lanes[account] = (lane, users - 1)

    async def validate(self, kind: str, name: str, token: str, jwk: jose.JWK,
                       account: str = "") -> None:
        """Return if the challenge is met; raise Failed otherwise (or on timeout)."""
        key_authz = key_authorization(token, jwk)
        waited = self.cfg.validation_timeout_s * QUEUE_FACTOR
        async with contextlib.AsyncExitStack() as held:
            try:
                async with asyncio.timeout(waited):
                    await held.enter_async_context(self._lane(account))
                    await held.enter_async_context(self._slots)
            except TimeoutError:
                raise Failed("rateLimited", f"{kind} for {name} did not start within "
                             f"{waited:g} s: the CA's validation slots were all taken (by "
                             "this account's own, or by others'); ask again later") from None
            try:
                async with asyncio.timeout(self.cfg.validation_timeout_s):
                    if kind == "http-01":
                        await self._http01(name, token, key_authz)
                    elif kind == "tls-alpn-01":
                        await self._tls_alpn01(name, key_authz)
                    elif kind == "dns-01":
                        await self._dns01(name, key_authz)
                    else:
                        raise Failed("malformed", f"unknown challenge type {kind}")
            except TimeoutError:
                raise Failed("connection", f"{kind} for {name}: no answer within "
                             f"{self.cfg.validation_timeout_s:g} s") from None

    # ---- where a name is ------------------------------------------------------------------

    def _resolver(self) -> object:
        import dns.asyncresolver
        assert self.cfg.resolver is not None
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [self.cfg.resolver[0]]
        r.port = self.cfg.resolver[1]
        return r

    def _dns_why(self, exc: Exception) -> str:
        """A lookup's failure in an operator's words (dnspython's say "answered ...
        timed out" of a resolver that never answered)."""
        import dns.resolver
        assert self.cfg.resolver is not None
        host, port = self.cfg.resolver
        resolver = f"the resolver {host}:{port} ([acme] resolver)"
        if isinstance(exc, dns.resolver.LifetimeTimeout):
            waited = getattr(exc, "kwargs", {}).get("timeout")
            return f"{resolver} did not answer" + (f" within {waited:.1f} s" if waited else "")
        if isinstance(exc, dns.resolver.NoNameservers):
            return f"{resolver} refused or failed the query (SERVFAIL or REFUSED)"
        return str(exc)[:200]

    async def address(self, name: str) -> str:
        """Where to reach `name`: the address [acme.hosts] pins it to (the operator's
        word, any address), else the one DNS gives, which must be one a host can have."""
        mapped = self.cfg.host(name)
        if mapped is not None:
            return mapped
        return _reachable(name, await self._looked_up(name))

    async def _looked_up(self, name: str) -> str:
        if self.cfg.resolver is not None:
            import dns.exception
            import dns.resolver
            r = self._resolver()
            for rdtype in ("A", "AAAA"):
                try:
                    answer = await r.resolve(name, rdtype)  # type: ignore[attr-defined]
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue
                except dns.exception.DNSException as exc:
                    raise Failed("dns", f"looking up {name}: {self._dns_why(exc)}") from None
                for rr in answer:
                    return str(rr.address)
            raise Failed("dns", f"{name} has no A or AAAA record")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None,
                                                                  type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            # "dns", not the drafts' "unknownHost", which RFC 8555 does not define
            raise Failed("dns", f"cannot resolve {name}: {exc.strerror}") from None
        return str(infos[0][4][0])

    # ---- http-01 -------------------------------------------------------------------------

    async def _http01(self, name: str, token: str, key_authz: str) -> None:
        scheme, host, port = "http", name, self.cfg.http01_port
        path = f"/.well-known/acme-challenge/{token}"
        timeout = aiohttp.ClientTimeout(total=self.cfg.validation_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as s:
            for _ in range(MAX_REDIRECTS + 1):
                addr = await self.address(host)
                shown = f"[{addr}]" if ":" in addr else addr
                url = f"{scheme}://{shown}:{port}{path}"
                try:
                    async with s.get(url, headers={"Host": host, "Accept": "*/*"},
                                     allow_redirects=False,
                                     ssl=False if scheme == "https" else None,
                                     server_hostname=host if scheme == "https" else None) as r:
                        if r.status in (301, 302, 303, 307, 308):
                            scheme, host, port, path = self._redirect(
                                r.headers.get("Location", ""), scheme, host)
                            continue
                        body = await read_at_most(r.content, MAX_BODY + 1)
                        status = r.status
                except aiohttp.ClientError as exc:
                    raise Failed("connection", f"http-01 for {name}: fetching {scheme}://"
                                 f"{host}:{port}{path}: {_http_why(exc, addr, port)}"
                                 ) from None
                if status != 200:
                    raise Failed("incorrectResponse", f"http-01 for {name}: {scheme}://{host}:"
                                 f"{port}{path} answered {status}")
                if len(body) > MAX_BODY:
                    raise Failed("incorrectResponse", f"http-01 for {name}: the answer is "
                                 f"longer than {MAX_BODY} bytes")
                if body.strip().decode(errors="replace") != key_authz:
                    raise Failed("incorrectResponse", f"http-01 for {name}: the answer is not "
                                 "the key authorization")
                return
        raise Failed("connection", f"http-01 for {name}: more than {MAX_REDIRECTS} redirects")

    def _redirect(self, location: str, scheme: str, host: str) -> tuple[str, str, int, str]:
        """Where a redirect may lead: http on the http-01 port, https on the tls-alpn-01
        port (the configured "HTTPS port"), on the name being validated (`host`)."""
        try:
            u = urlsplit(location)
            port = u.port
        except ValueError:
            raise Failed("connection", f"redirect to an invalid URL {location[:100]!r}") \
                from None
        if not u.scheme and u.netloc:
            # Scheme-relative ("//NAME:PORT/path", RFC 3986 4.2): this one's scheme, then
            # checked as any other (an ACME trial's was refused as "not http(s)")
            return self._redirect(f"{scheme}:{location}", scheme, host)
        if not u.scheme and not u.netloc:  # relative: same scheme, host and port
            port = self.cfg.http01_port if scheme == "http" else self.cfg.tls_alpn01_port
            return scheme, host, port, (u.path or "/") + (f"?{u.query}" if u.query else "")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise Failed("connection", f"redirect to {location[:100]!r}: only http(s) URLs "
                         "are followed")
        # The name being validated only, as its own scheme and port rules allow: another
        # name, an address literal (127.0.0.2, [::1], 2130706434) or a single label
        # (localhost) would let an account point the CA at any host it can reach on a
        # private network, a name resolving to one included (a security review), and
        # read its answers' status.
        if u.hostname.lower().rstrip(".") != host.lower():
            raise Failed("connection", f"redirect to {location[:100]!r}: redirects are followed "
                         f"only on the name being validated ({host}), not to another host")
        allowed = self.cfg.http01_port if u.scheme == "http" else self.cfg.tls_alpn01_port
        wanted = port if port is not None else (80 if u.scheme == "http" else 443)
        if wanted != allowed:
            raise Failed("connection", f"redirect to {location[:100]!r}: {u.scheme} is followed "
                         f"only to port {allowed}")
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        # The name validated, not the URL's spelling of it: "NAME." or "Name" looked up
        # apart from [acme.hosts], which pins NAME (a security trial steered the second
        # hop to DNS's address instead of the pinned one).
        return u.scheme, host, allowed, path

    # ---- tls-alpn-01 -----------------------------------------------------------------------

    async def _tls_alpn01(self, name: str, key_authz: str) -> None:
        addr = await self.address(name)
        port = self.cfg.tls_alpn01_port
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the certificate is self-signed by design
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols([ALPN])
        try:
            _reader, writer = await asyncio.open_connection(addr, port, ssl=ctx,
                                                             server_hostname=name)
        except ssl.SSLError as exc:
            raise Failed("tls", f"tls-alpn-01 for {name}: the TLS handshake with {addr} "
                         f"port {port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            # asyncio's strerror is "Connect call failed ('127.0.0.1', 443)": the errno's
            # own words instead, as http-01 says them (an ACME trial)
            why = os.strerror(exc.errno) if exc.errno else str(exc) or "no connection"
            raise Failed("connection", f"tls-alpn-01 for {name}: cannot connect to {addr} "
                         f"port {port}: {why}") from None
        try:
            sslobj = writer.get_extra_info("ssl_object")
            alpn = sslobj.selected_alpn_protocol() if sslobj else None
            der = sslobj.getpeercert(binary_form=True) if sslobj else None
        finally:
            writer.close()
        if alpn != ALPN:
            raise Failed("tls", f"tls-alpn-01 for {name}: the server did not negotiate {ALPN}")
        if not der:
            raise Failed("tls", f"tls-alpn-01 for {name}: no certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
            extensions = cert.extensions
        except ValueError:
            raise Failed("incorrectResponse", f"tls-alpn-01 for {name}: the certificate "
                         "cannot be parsed") from None
        # Each missing part named in words (cryptography's text quoted an ObjectIdentifier
        # object: an ACME trial)
        try:
            sans = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise Failed("incorrectResponse", f"tls-alpn-01 for {name}: the certificate "
                         "has no subjectAltName extension") from None
        try:
            ext = extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
        except x509.ExtensionNotFound:
            raise Failed("incorrectResponse", f"tls-alpn-01 for {name}: the certificate "
                         "has no acmeIdentifier extension (1.3.6.1.5.5.7.1.31, RFC 8737 "
                         "3)") from None
        if list(sans) != [x509.DNSName(name)]:
            raise Failed("incorrectResponse", f"tls-alpn-01 for {name}: the certificate must "
                         f"name exactly {name}")
        digest = hashlib.sha256(key_authz.encode()).digest()
        value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
        if not ext.critical or value != b"\x04\x20" + digest:
            raise Failed("incorrectResponse", f"tls-alpn-01 for {name}: the acmeIdentifier "
                         "extension is not critical or holds the wrong digest")

    # ---- dns-01 ----------------------------------------------------------------------------

    async def _dns01(self, name: str, key_authz: str) -> None:
        import dns.exception
        import dns.resolver
        if self.cfg.resolver is None:
            raise Failed("dns", "dns-01 needs [acme] resolver")
        expected = jose.b64encode(hashlib.sha256(key_authz.encode()).digest()).decode()
        record = f"_acme-challenge.{name}"
        try:
            answer = await self._resolver().resolve(record, "TXT")  # type: ignore[attr-defined]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise Failed("dns", f"dns-01 for {name}: no TXT record at {record}") from None
        except dns.exception.DNSException as exc:
            raise Failed("dns", f"dns-01 for {name}: looking up {record}: "
                         f"{self._dns_why(exc)}") from None
        texts = {b"".join(rr.strings).decode(errors="replace") for rr in answer}
        if expected not in texts:
            raise Failed("incorrectResponse", f"dns-01 for {name}: no TXT record at {record} "
                         "holds the expected value")


