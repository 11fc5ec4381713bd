"""What the CA publishes passes DigiCert's pkilint, the linter relying parties' tooling
is checked with: the root, the issuing CA, leaves of every role (a service with DNS,
IP and SPIFFE names, a person with an e-mail address, a host), the daemon's own TLS
certificate, the CRL with a revocation in it, and both pre-signed OCSP responses, good
and revoked. Any finding at WARNING or worse fails the test with pkilint's own words,
except two that are the linter's, not ours, listed in KNOWN."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from tests.conftest import Daemon, hsmca, init_ca, set_config, start_daemon
from tests.helpers import ask_ocsp, enroll, request_for, signed


def linter(name: str) -> str:
    found = shutil.which(name) or str(Path(__file__).resolve().parents[1] / ".venv/bin" / name)
    assert Path(found).exists(), f"{name} (pkilint) is not installed: run scripts/setup --test"
    return found


# pkilint 0.13 checks URIs with `validators.url`, which knows a dozen schemes (http,
# ftp, ssh, ...), so a SPIFFE ID, a valid RFC 3986 URI, is an "invalid URI"; and it
# wants a dNSName of two labels or more, while RFC 5280 takes RFC 1034's preferred
# syntax, in which `localhost` is a name (the daemon's TLS certificate names it, so
# that clients on the CA's machine can reach it as https://localhost).
KNOWN = {
    'pkix.invalid_uri_syntax (ERROR): Invalid URI syntax: '
    '"spiffe://internal.example/ns/prod/sa/api"',
    'pkix.invalid_domain_name_syntax (ERROR): Invalid domain name syntax: "localhost"',
}


def lint(tool: str, path: Path, *args: str) -> list[str]:
    """pkilint's findings at WARNING or worse, one line each ([] when clean)."""
    proc = subprocess.run([linter(tool), "lint", *args, "-s", "WARNING", "-f", "TEXT", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    # TEXT: "Validator @ path" then an indented "code (SEVERITY): message" per finding
    return [line.strip() for line in proc.stdout.splitlines() if line.startswith(" ")]


@pytest.fixture(scope="module")
def linted_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A CA of its own with a public URL, so leaves carry their CRL and OCSP addresses."""
    ca = init_ca(tmp_path_factory.mktemp("lint"))
    set_config(ca.state, "server", "public-url", "https://ca.internal.example:8443")
    d = start_daemon(ca.state)
    yield d
    assert d.stop() == 0


def pem_files(path: Path, out: Path) -> list[Path]:
    """Each certificate of a PEM file in a file of its own (pkilint lints one), named
    after the file and its folder."""
    files = []
    for i, cert in enumerate(x509.load_pem_x509_certificates(path.read_bytes())):
        f = out / f"{path.parent.name}-{path.stem}-{i}.der"
        assert not f.exists()
        f.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        files.append(f)
    return files


def test_the_ca_certificates_and_every_kind_of_leaf_lint_clean(
        linted_ca: Daemon, tmp_path: Path) -> None:
    d = linted_ca
    leaves = [
        enroll(d, tmp_path, "service", ["api.internal.example", "10.1.2.3",
                                        "spiffe://internal.example/ns/prod/sa/api"])[0],
        enroll(d, tmp_path, "user", ["alice@internal.example"], ["alice"])[0],
        enroll(d, tmp_path, "host", ["web1.internal.example"])[0],
    ]
    files = [*pem_files(d.state / "x509/root.pem", tmp_path),
             *pem_files(d.state / "x509/issuing.pem", tmp_path),
             *pem_files(d.state / "tls/server.pem", tmp_path)[:1],
             # each cert.pem holds its leaf, then the issuing CA linted above
             *(pem_files(leaf, tmp_path)[0] for leaf in leaves)]
    assert len(files) == 6
    findings = {f.name: lint("lint_pkix_cert", f) for f in files}
    service, tls = files[3].name, files[2].name
    expected = {f.name: [] for f in files} | {
        service: [k for k in KNOWN if "spiffe" in k],
        tls: [k for k in KNOWN if "localhost" in k]}
    assert findings == expected


def test_the_crl_and_both_ocsp_responses_lint_clean(linted_ca: Daemon, tmp_path: Path) -> None:
    d = linted_ca
    good_path, _ = enroll(d, tmp_path, "service", ["good.internal.example"])
    bad_path, _ = enroll(d, tmp_path, "service", ["revoked.internal.example"])
    good, bad = (x509.load_pem_x509_certificate(p.read_bytes()) for p in (good_path, bad_path))
    hsmca("revoke", format(bad.serial_number, "x"), "--reason", "keyCompromise",
          "--config", d.state / "hsmca.toml")
    crl = tmp_path / "crl.der"
    crl.write_bytes(_get(d, "/v1/x509/crl"))
    assert x509.load_der_x509_crl(crl.read_bytes()).get_revoked_certificate_by_serial_number(
        bad.serial_number) is not None
    assert lint("lint_crl", crl, "-t", "CRL", "-p", "PKIX") == []

    issuer = x509.load_pem_x509_certificate((d.state / "x509/issuing.pem").read_bytes())
    for cert, status in ((good, ocsp.OCSPCertStatus.GOOD), (bad, ocsp.OCSPCertStatus.REVOKED)):
        asyncio.run(signed(d, cert, status))
        for algorithm in (hashes.SHA1(), hashes.SHA256()):
            resp, _ = asyncio.run(ask_ocsp(d, request_for(cert, issuer, algorithm)))
            assert resp.certificate_status == status
            f = tmp_path / f"ocsp-{status.name}-{algorithm.name}.der"
            f.write_bytes(resp.public_bytes(serialization.Encoding.DER))
            assert lint("lint_ocsp_response", f) == [], f.name


def _get(d: Daemon, path: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(d.url + path, context=d.ssl(), timeout=30) as r:
        assert r.status == 200
        return bytes(r.read())
