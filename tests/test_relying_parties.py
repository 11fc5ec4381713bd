"""What relying parties fetch, as they fetch it: with `[server] http-listen` and an
http:// `public-url`, the certificates name CRL and OCSP addresses over plain HTTP, and
OpenSSL's own fetchers (`ocsp -url`, `verify -crl_download`) use them as written. A
service team's trial found https-only addresses that nginx's ssl_ocsp and ssl_stapling
and OpenSSL's -crl_download refuse. The plain-HTTP port serves those and nothing else."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import hsmca, init_ca, set_config, start_daemon
from tests.helpers import enroll
from tests.ports import free_port

NAME = "svc.internal.example"


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def _ocsp_status(url: str, state: Path, leaf: Path) -> str:
    """What `openssl ocsp` says of the leaf, asking the address the certificate names."""
    proc = _openssl("ocsp", "-issuer", state / "x509/issuing.pem", "-cert", leaf, "-url", url,
                    "-CAfile", state / "x509/root.pem")
    return proc.stdout + proc.stderr


# With a path too: the addresses written into certificates are public-url's, and a
# relying-party trial's "/pki" got 404 from every one of them.
@pytest.mark.parametrize("path", ["", "/pki"])
def test_openssl_fetches_crls_and_ocsp_over_plain_http_from_the_addresses_in_a_cert(
        tmp_path: Path, path: str) -> None:
    ca = init_ca(tmp_path)
    port = free_port()
    set_config(ca.state, "server", "public-url", f"http://127.0.0.1:{port}{path}")
    set_config(ca.state, "server", "http-listen", f"127.0.0.1:{port}")
    d = start_daemon(ca.state)
    try:
        assert d.wait_stderr(lambda: any(f'"http_url": "http://127.0.0.1:{port}"' in x
                                         for x in d.stderr)), "".join(d.stderr)
        cert, _ = enroll(d, tmp_path, "service", [NAME])
        leaf = tmp_path / "leaf.pem"
        leaf.write_text(cert.read_text().split("-----END CERTIFICATE-----")[0]
                        + "-----END CERTIFICATE-----\n")
        url = _openssl("x509", "-in", leaf, "-noout", "-ocsp_uri").stdout.strip()
        assert url == f"http://127.0.0.1:{port}{path}/v1/x509/ocsp"
        cdp = _openssl("x509", "-in", leaf, "-noout", "-ext", "crlDistributionPoints").stdout
        assert f"URI:http://127.0.0.1:{port}{path}/v1/x509/crl/" in cdp, cdp
        # OCSP as the certificate says to ask it: good once pre-signed (within seconds)
        deadline = time.monotonic() + 30
        while f"{leaf}: good" not in (said := _ocsp_status(url, ca.state, leaf)):
            assert "trylater" in said.lower() and time.monotonic() < deadline, said
        assert "Response verify OK" in said
        # The CRL, downloaded by OpenSSL itself from the distribution point
        verify = ("verify", "-crl_check", "-crl_download", "-CAfile", ca.state / "x509/root.pem",
                  "-untrusted", ca.state / "x509/issuing.pem", leaf)
        proc = _openssl(*verify)
        assert proc.returncode == 0 and f"{leaf}: OK" in proc.stdout, proc.stdout + proc.stderr
        serial = _openssl("x509", "-in", leaf, "-noout", "-serial").stdout.split("=")[1].strip()
        hsmca("revoke", serial, "--config", ca.state / "hsmca.toml", "--url", d.url,
              "--reason", "keyCompromise")
        assert f"{leaf}: revoked" in _ocsp_status(url, ca.state, leaf)
        proc = _openssl(*verify)
        assert proc.returncode != 0 and "certificate revoked" in proc.stdout + proc.stderr
        # Nothing else is there: no token, name or key goes over plain HTTP
        for method, where in (("GET", "/health"), ("GET", "/v1/whoami"),
                              ("POST", "/v1/x509/enroll"), ("POST", "/v1/tokens"),
                              ("GET", "/v1/x509/roots"), ("GET", "/v1/ssh/krl"),
                              ("GET", f"{path}/v1/whoami")):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{where}", method=method,
                                             data=b"{}" if method == "POST" else None)
            try:
                urllib.request.urlopen(request, timeout=30)
                raise AssertionError(f"{method} {where} answered over plain HTTP")
            except urllib.error.HTTPError as exc:
                assert exc.code in (404, 405), (where, exc.code)
                assert json.loads(exc.read())["type"].endswith(("not-found", "no-route",
                                                                "method-not-allowed")), where
    finally:
        assert d.stop() == 0


def test_every_crl_a_chain_needs_comes_in_one_file_after_a_rotation_too(
        tmp_path: Path) -> None:
    """A relying-party trial: nginx's ssl_crl takes one file and refuses every client
    whose chain lacks a CRL; after an issuing-key rotation a file of "both CRLs" lacked
    the new key's (renewed clients refused), and the current CRL alone lacked the old
    key's (the others refused). /v1/x509/crls.pem holds every CRL in use."""
    ca = init_ca(tmp_path)
    port = free_port()
    set_config(ca.state, "server", "http-listen", f"127.0.0.1:{port}")
    d = start_daemon(ca.state)
    try:
        old_cert, _ = enroll(d, tmp_path, "service", [NAME])
        hsmca("key", "rotate", "issuing", "--config", ca.state / "hsmca.toml")
        new_cert, _ = enroll(d, tmp_path, "service", ["other." + NAME])
        crls = tmp_path / "crls.pem"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/x509/crls.pem",
                                    timeout=30) as answer:
            assert answer.headers["Content-Type"] == "application/x-pem-file"
            crls.write_bytes(answer.read())
        assert crls.read_text().count("-----BEGIN X509 CRL-----") == 3  # old, new, root
        bundle = tmp_path / "bundle.pem"  # every issuing CA in use, then the root
        with urllib.request.urlopen(urllib.request.Request(
                f"{d.url}/v1/x509/bundle"), context=d.ssl(), timeout=30) as answer:
            bundle.write_bytes(answer.read())
        for cert in (old_cert, new_cert):  # what nginx checks: every link, one file
            proc = _openssl("verify", "-crl_check_all", "-CRLfile", crls, "-CAfile", bundle,
                            cert)
            assert proc.returncode == 0 and ": OK" in proc.stdout, proc.stdout + proc.stderr
    finally:
        assert d.stop() == 0


def test_an_http_public_url_without_http_listen_is_refused_in_one_line(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "public-url", "http://ca.example:8080")
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "public-url is http://" in proc.stderr and "set http-listen" in proc.stderr
