"""`hsmca init` as an operator runs it: files, chain, SSH CA keys, refusals."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from cryptography import x509

from tests.conftest import HSMCA, InitialisedCA, hsmca, init_ca, new_softhsm_token, require


def test_init_lays_out_the_state_directory(ca: InitialisedCA) -> None:
    s = ca.state
    for rel in ("hsmca.toml", "x509/root.pem", "x509/chain.pem", "ssh/user_ca.pub",
                "ssh/host_ca.pub", "audit/audit_key.pem", "admin/cert.pem", "admin/key.pem",
                "tls/server.pem", "tls/server.key", "audit/log.jsonl", "audit/checkpoint"):
        assert (s / rel).is_file(), rel
    for secret in ("admin/key.pem", "tls/server.key", "hsmca.toml"):
        assert stat.S_IMODE((s / secret).stat().st_mode) == 0o600, secret
    assert "hsmca serve --config" in ca.stdout


def test_no_pin_in_config_output_or_log(ca: InitialisedCA) -> None:
    pin = ca.token.pin_file.read_text().strip()
    for rel in ("hsmca.toml", "audit/log.jsonl"):
        assert pin not in (ca.state / rel).read_text(), rel
    assert pin not in ca.stdout
    cfg = tomllib.loads((ca.state / "hsmca.toml").read_text())
    assert cfg["hsm"]["pin-source"] == f"file:{ca.token.pin_file.resolve()}"
    assert cfg["keys"]["issuing"] == f"pkcs11:token={ca.token.label};object=issuing-ca;type=private"


def test_init_prints_what_to_pin_out_of_band(ca: InitialisedCA) -> None:
    """An auditor trial had nothing to compare root.pem and audit_key.pem with: init
    prints the root's fingerprint as openssl shows it and the audit verifier key, as
    GET /v1/audit/key and witnesses give it."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from ca.audit.note import verifier_key
    from ca.config import load
    shown = subprocess.run([require("openssl"), "x509", "-noout", "-fingerprint", "-sha256",
                            "-in", ca.state / "x509/root.pem"], capture_output=True,
                           text=True, check=True).stdout.strip().split("=", 1)[1]
    assert f"root certificate SHA-256:    {shown}\n" in ca.stdout, ca.stdout
    key = load_pem_public_key((ca.state / "audit/audit_key.pem").read_bytes())
    vkey = verifier_key(load(ca.state / "hsmca.toml").audit_origin, key)  # type: ignore[arg-type]
    assert f"audit verifier key:          {vkey}\n" in ca.stdout, ca.stdout


def test_chain_verifies_with_openssl(ca: InitialisedCA) -> None:
    openssl = require("openssl")
    s = ca.state
    issuing = s / "x509" / "issuing.pem"
    for leaf in ("admin/cert.pem", "tls/server.pem"):
        proc = subprocess.run([openssl, "verify", "-CAfile", s / "x509/root.pem", "-untrusted",
                               issuing, s / leaf], capture_output=True, text=True)
        assert proc.returncode == 0 and ": OK" in proc.stdout, proc.stdout + proc.stderr
    chain = x509.load_pem_x509_certificates((s / "x509/chain.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=hsmca Issuing CA",
                                                            "CN=hsmca Root CA"]
    assert chain[0].extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert chain[1].extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1


def test_ssh_ca_keys_parse_with_ssh_keygen(ca: InitialisedCA) -> None:
    ssh_keygen = require("ssh-keygen")
    for name in ("user_ca.pub", "host_ca.pub"):
        out = subprocess.run([ssh_keygen, "-l", "-f", ca.state / "ssh" / name],
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith("256 SHA256:") and "(ECDSA)" in out, out


def test_second_init_on_same_state_refused(ca: InitialisedCA) -> None:
    before = (ca.state / "audit/log.jsonl").read_bytes()
    proc = hsmca("init", "--state-dir", ca.state, "--module", ca.token.module, "--token",
                 ca.token.label, "--pin-file", ca.token.pin_file, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "refusing to overwrite" in proc.stderr
    assert (ca.state / "audit/log.jsonl").read_bytes() == before


def test_a_state_dir_holding_the_pin_file_is_not_called_an_existing_ca(
        ca: InitialisedCA, tmp_path: Path) -> None:
    """The docs' layout keeps the PIN file beside the state directory; an operator who
    gave the PIN's directory as --state-dir was told "an existing CA?" (docs review)."""
    home = tmp_path / "srv"
    home.mkdir()
    pin = home / "pin"
    pin.write_text(ca.token.pin_file.read_text())
    pin.chmod(0o600)
    proc = hsmca("init", "--state-dir", home, "--module", ca.token.module, "--token",
                 ca.token.label, "--pin-file", pin, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds pin" in proc.stderr and f"--state-dir {home / 'ca'}" in proc.stderr
    assert "existing CA" not in proc.stderr


def test_existing_keys_in_token_refused(ca: InitialisedCA, tmp_path: Path) -> None:
    proc = hsmca("init", "--state-dir", tmp_path / "other", "--module", ca.token.module,
                 "--token", ca.token.label, "--pin-file", ca.token.pin_file, check=False)
    assert proc.returncode == 1
    assert "already holds keys labelled root-ca" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_pin_missing_module_missing_token(tmp_path: Path) -> None:
    token = new_softhsm_token()
    bad_pin = tmp_path / "bad.pin"
    bad_pin.write_text("not-the-pin\n")
    bad_pin.chmod(0o600)
    shared_pin = tmp_path / "shared.pin"
    shared_pin.write_text(token.pin_file.read_text())
    shared_pin.chmod(0o644)
    cases = {
        "wrong PIN": (["--module", token.module, "--token", token.label, "--pin-file", bad_pin],
                      f"wrong PIN for token '{token.label}'"),
        "no module": (["--module", "/nonexistent/libx.so", "--token", token.label, "--pin-file",
                       token.pin_file], "PKCS#11 module not found: /nonexistent/libx.so"),
        # Other tokens are there: the label is what to check, not SOFTHSM2_CONF.
        "no token": (["--module", token.module, "--token", "nosuchtoken", "--pin-file",
                      token.pin_file], "no token labelled 'nosuchtoken'"),
        "label off": (["--module", token.module, "--token", "nosuchtoken", "--pin-file",
                       token.pin_file], "check --token (labels are case-sensitive)"),
        "no pin file": (["--module", token.module, "--token", token.label, "--pin-file",
                         tmp_path / "missing.pin"], "PIN file not found"),
        # `serve` would refuse it: init says so before it makes any key.
        "readable PIN file": (["--module", token.module, "--token", token.label, "--pin-file",
                               shared_pin], f"{shared_pin} has mode 0644"),
    }
    for i, (what, (args, message)) in enumerate(cases.items()):
        proc = hsmca("init", "--state-dir", tmp_path / f"s{i}", *args, check=False)
        assert proc.returncode == 1, what
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (what, proc.stderr)
        assert "not-the-pin" not in proc.stderr
        assert not (tmp_path / f"s{i}").exists(), what


def test_a_ca_name_that_cannot_be_a_common_name_is_refused(tmp_path: Path) -> None:
    token = new_softhsm_token()
    for bad in ("", "x" * 33, "a,b", "tab\there"):
        proc = hsmca("init", "--state-dir", tmp_path / "s", "--module", token.module,
                     "--token", token.label, "--pin-file", token.pin_file, "--name", bad,
                     check=False)
        assert proc.returncode == 2 and "argument --name: must be 1 to 32 printable" in \
            proc.stderr, (bad, proc.stderr)
        assert not (tmp_path / "s").exists()


def test_ed25519_and_rsa_cas(tmp_path: Path) -> None:
    openssl = require("openssl")
    for key_type in ("ed25519", "rsa-3072"):
        ca = init_ca(tmp_path / key_type, key_type=key_type)
        proc = subprocess.run([openssl, "verify", "-CAfile", ca.state / "x509/root.pem",
                               "-untrusted", ca.state / "x509/issuing.pem",
                               ca.state / "admin/cert.pem"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert os.path.exists(tmp_path / "rsa-3072" / "ca" / "ssh" / "user_ca.pub")


def test_a_failed_init_can_be_retried(tmp_path: Path) -> None:
    """A wrong PIN or a bad --dns-name fails before any key is made: fix it, run again."""
    token = new_softhsm_token()
    state = tmp_path / "ca"
    bad_pin = tmp_path / "bad.pin"
    bad_pin.write_text("wrong\n")
    base = ["init", "--state-dir", state, "--module", token.module, "--token", token.label]
    assert hsmca(*base, "--pin-file", bad_pin, check=False).returncode == 1
    proc = hsmca(*base, "--pin-file", token.pin_file, "--dns-name", "bad name", check=False)
    assert proc.returncode == 1 and "--dns-name" in proc.stderr, proc.stderr
    proc = hsmca(*base, "--pin-file", token.pin_file, "--dns-name", "a" * 70 + ".example",
                 check=False)
    assert proc.returncode == 1 and "--dns-name" in proc.stderr, proc.stderr
    assert not state.exists() or not any(state.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ca.init-")]
    hsmca(*base, "--pin-file", token.pin_file, "--dns-name", "ca.internal.example")
    assert (state / "hsmca.toml").is_file()


def test_init_into_a_state_dir_that_is_a_mount_point(tmp_path: Path) -> None:
    """A fault trial: --state-dir on a volume of its own (the usual layout) made every
    key, then failed with "Device or resource busy" (a mount point cannot be replaced
    by a rename), leaving the CA in a hidden directory and the token unusable. init
    builds the CA inside it. (A bind mount in a mount namespace of its own: the test
    leaves no mount behind, and the files stay in the directory mounted.) A volume made
    for another user is the CA's user's once init is done: a review's volume stayed
    theirs, and they swapped the config."""
    token = new_softhsm_token()
    volume, state = tmp_path / "volume", tmp_path / "ca"
    volume.mkdir()
    os.chown(volume, 65534, 65534)  # made for nobody (a tmpfs with uid=, say)
    (volume / "lost+found").mkdir()  # as a fresh ext4 volume has: it counts as empty
    state.mkdir()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", volume, state, *HSMCA,
         "init",
         "--state-dir", state, "--module", token.module, "--token", token.label,
         "--pin-file", token.pin_file], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (volume / "hsmca.toml").is_file() and (volume / "x509" / "root.pem").is_file()
    assert not [p for p in volume.iterdir() if ".init-" in p.name]
    assert (volume / "lost+found").is_dir()
    assert not [p for p in tmp_path.iterdir() if ".init-" in p.name]
    assert stat.S_IMODE(volume.stat().st_mode) == 0o700
    assert (volume.stat().st_uid, volume.stat().st_gid) == (os.geteuid(), os.getegid())
    assert not any(state.iterdir())  # the mount point itself, unmounted with its namespace


def test_serve_refuses_a_key_that_could_be_exported(tmp_path: Path) -> None:
    ca = init_ca(tmp_path, private_hsm=True)
    script = '''
import sys, pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters
lib = pkcs11.lib(sys.argv[1])
s = lib.get_token(token_label=sys.argv[2]).open(rw=True, user_pin=open(sys.argv[3]).read().strip())
s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="issuing-ca").destroy()
p = s.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS:
    encode_named_curve_parameters("secp256r1")}, local=True)
p.generate_keypair(store=True, label="issuing-ca", id=b"weak",
                   private_template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
'''
    env = {**os.environ, "SOFTHSM2_CONF": str(tmp_path / "softhsm" / "softhsm2.conf")}
    subprocess.run([sys.executable, "-c", script, ca.token.module, ca.token.label,
                    ca.token.pin_file], check=True, env=env, capture_output=True)
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1
    assert "could leave the HSM" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_usage_errors_are_one_line() -> None:
    for args in (["init"], ["bogus"], ["token", "create", "--role", "x", "--name", "a"],
                 ["audit", "show", "--from", "-5"]):
        proc = hsmca(*args, check=False)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], proc.stderr


def test_serve_names_a_missing_token_directory_and_the_softhsm_config(tmp_path: Path) -> None:
    """SoftHSM says nothing when its token directory is gone: hsmca names it, and when
    the directory is there but empty, which config SoftHSM read."""
    ca = init_ca(tmp_path, private_hsm=True)
    conf = tmp_path / "softhsm" / "softhsm2.conf"
    tokens = tmp_path / "softhsm" / "tokens"
    serve = ("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0")
    tokens.rename(tmp_path / "tokens.away")
    try:
        proc = hsmca(*serve, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"its token directory {tokens.resolve()} (directories.tokendir in {conf}) " \
               "does not exist" in proc.stderr, proc.stderr
        tokens.mkdir()
        proc = hsmca(*serve, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"(tokens present: none; SoftHSM reads {conf})" in proc.stderr, proc.stderr
    finally:
        tokens.rmdir() if tokens.exists() else None
        (tmp_path / "tokens.away").rename(tokens)
