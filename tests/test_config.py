"""hsmca.toml: written by a TOML writer, read strictly (an unknown setting is an error)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from ca.config import SCHEMA, ConfigError, Policy, load, render
from tests.conftest import InitialisedCA, hsmca

KEYS = {"root": "pkcs11:object=root-ca", "issuing": "pkcs11:object=issuing-ca",
        "ssh_user": "pkcs11:object=ssh-user-ca", "ssh_host": "pkcs11:object=ssh-host-ca",
        "audit": "pkcs11:object=audit"}


def rendered(tmp: Path, **over: str) -> Path:
    args = {"module": "/usr/lib/softhsm/libsofthsm2.so", "token": "hsmca",
            "pin_source": "file:/srv/hsmca/pin", "softhsm_conf": "/srv/hsmca/softhsm2.conf",
            "keys": KEYS, "dns_name": "ca.example", "audit_origin": "ca.example/hsmca-audit",
            **over}
    path = tmp / "hsmca.toml"
    path.write_text(render(**args))  # type: ignore[arg-type]
    return path


def test_rendered_config_loads_and_holds_every_setting_with_comments(tmp_path: Path) -> None:
    path = rendered(tmp_path, token='odd "label" \\ with ünïcode', module="/opt/a b/p11.so")
    cfg = load(path)
    assert cfg.hsm.token == 'odd "label" \\ with ünïcode' and cfg.hsm.module == "/opt/a b/p11.so"
    assert cfg.policy == Policy(reserved=("ca-server.hsmca.invalid", "ca.example"))  # its own names
    raw = tomllib.loads(path.read_text())
    # Every setting the loader knows is in the file init writes, except the optional
    # public-url and http-listen (documented in a comment instead).
    for section, keys in SCHEMA.items():
        if section in ("acme", "store"):  # on when present, so written commented out
            continue
        missing = keys - set(raw[section]) - {"public-url", "http-listen"}
        assert not missing, (section, missing)
    text = path.read_text()
    assert "# [acme]" in text and "acme" not in raw
    assert "# [store]" in text and "store" not in raw  # SQLite unless a cluster is asked
    assert "public-url" in text and "http-listen" in text
    assert text.count("\n# ") >= 10  # explanations kept


def test_an_unknown_setting_is_refused_with_its_name_and_line(tmp_path: Path) -> None:
    path = rendered(tmp_path)
    text = path.read_text().replace("heartbeat-s = 60", "heartbeat_s = 60")
    path.write_text(text)
    line = text.splitlines().index("heartbeat_s = 60") + 1
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert f"{path}:{line}:" in msg and "'heartbeat_s'" in msg and "[audit]" in msg
    assert "did you mean 'heartbeat-s'" in msg and "\n" not in msg


def test_a_pin_pasted_as_pin_source_is_not_repeated_in_the_error(tmp_path: Path) -> None:
    """A trial pasted the PIN itself as pin-source: taken for a file name, it went into
    "cannot read the PIN file .../1234", and so into the journal."""
    path = rendered(tmp_path, pin_source="739201")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "739201" not in str(err.value), err.value
    assert "pin-source names no file that exists" in str(err.value)
    assert "[hsm]" in str(err.value) and "env:NAME" in str(err.value)
    (tmp_path / "pin").write_text("739201\n")  # a bare name of a file that exists: taken
    assert load(rendered(tmp_path, pin_source="pin")).hsm.pin_source == \
        f"file:{tmp_path / 'pin'}"


def test_a_pin_pasted_after_env_or_file_is_not_repeated_either() -> None:
    """A config trial pasted the PIN after `env:` and after `file:`: the start said
    "environment variable 580d25f3... is not set" and "cannot read the PIN file
    .../580d25f3...". Names that could be a PIN are not repeated; a variable's or a
    file's name that could not be still is."""
    from hsm.errors import HSMError
    from hsm.session import read_pin
    for source in ("env:580d25f3c1a9", "env:a80d25f3c1a9", "file:/nowhere/580d25f3c1a9"):
        with pytest.raises(HSMError) as err:
            read_pin(source)
        assert "580d25f3c1a9" not in str(err.value) and "80d25f3c1a9" not in str(err.value)
        assert "in case it is the PIN itself" in str(err.value), err.value
    for source, named in (("env:HSMCA_PIN_UNSET", "env:HSMCA_PIN_UNSET"),
                          ("file:/nowhere/hsm.pin", "/nowhere/hsm.pin"),
                          ("file:/nowhere/pin", "/nowhere/pin")):
        with pytest.raises(HSMError) as err:
            read_pin(source)
        assert named in str(err.value), err.value


def test_a_file_with_no_hsm_section_is_said_to_be_no_config_of_init(tmp_path: Path) -> None:
    """A docs trial passed an empty file as --config: "[hsm]: missing setting
    'pin-source'", even to `token create`, which needs no PIN."""
    for text in ("", "[server]\nlisten = \"127.0.0.1:8443\"\n"):
        path = tmp_path / "other.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load(path)
        assert str(err.value) == (f"{path} has no [hsm] section: not a config `hsmca init` "
                                  "wrote (pass the hsmca.toml in the CA's state directory, "
                                  "or run `hsmca init` first)"), err.value


def test_a_mistyped_pin_source_prefix_is_refused_not_read_as_a_file(tmp_path: Path) -> None:
    """A docs trial wrote `fiel:/srv/pin`: taken for a relative file name, it got "cannot
    read the PIN file .../ca/fiel:/srv/pin" at the start."""
    (tmp_path / "pin").write_text("739201\n")
    for typo in (f"fiel:{tmp_path / 'pin'}", f"File:{tmp_path / 'pin'}", "evn:HSM_PIN"):
        with pytest.raises(ConfigError) as err:
            load(rendered(tmp_path, pin_source=typo))
        msg = str(err.value)
        assert "pin-source begins with a prefix hsmca does not know" in msg, msg
        assert "file:/path" in msg and "env:NAME" in msg and "\n" not in msg
        assert typo.split(":")[0] not in msg.split(": pin-source")[1], msg  # not quoted


def test_a_default_lifetime_above_its_maximum_is_refused_not_cut(tmp_path: Path) -> None:
    path = rendered(tmp_path)
    text = path.read_text()
    assert "x509-default-ttl-s = 86400\n" in text and "x509-max-ttl-s = 2592000\n" in text
    path.write_text(text.replace("x509-default-ttl-s = 86400", "x509-default-ttl-s = 9999999"))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "x509-default-ttl-s (9999999) must be positive and at most x509-max-ttl-s " \
        "(2592000)" in str(err.value)
    line = text[:text.index("x509-default-ttl-s = ")].count("\n") + 1
    assert str(err.value).startswith(f"{path}:{line} [policy]: "), err.value  # to the line
    # A maximum lowered below the default written beside it: the same, named.
    path.write_text(text.replace("x509-max-ttl-s = 2592000", "x509-max-ttl-s = 3600"))
    with pytest.raises(ConfigError, match=r"x509-default-ttl-s \(86400\)"):
        load(path)
    # Without a default written, a lower maximum alone is accepted (the registration
    # authority caps the built-in default at it: test_ra's lifetime caps).
    path.write_text(text.replace("x509-default-ttl-s = 86400\n", "").replace(
        "x509-max-ttl-s = 2592000", "x509-max-ttl-s = 3600"))
    assert load(path).policy.x509_max_ttl_s == 3600


def test_ssh_user_certificates_live_at_most_a_day(tmp_path: Path) -> None:
    path = rendered(tmp_path)
    text = path.read_text()
    assert "ssh-user-max-ttl-s = 86400\n" in text
    path.write_text(text.replace("ssh-user-max-ttl-s = 86400", "ssh-user-max-ttl-s = 2592000"))
    line = text[:text.index("ssh-user-max-ttl-s = ")].count("\n") + 1
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line} \[policy\]: "
                       r"ssh-user-max-ttl-s \(2592000\) must be positive "
                       r"and at most 86400 \(24 h\)"):
        load(path)
    path.write_text(text.replace("ssh-user-max-ttl-s = 86400", "ssh-user-max-ttl-s = 43200"
                                 ).replace("ssh-user-default-ttl-s = 57600\n", ""))
    assert load(path).policy.ssh_user_max_ttl_s == 43200


@pytest.mark.parametrize(("extra", "needle"), [
    ("[bogus]\nx = 1\n", "section [bogus]"),
    ("[server.tls]\nx = 1\n", "table [server.tls]"),
    ('[policy.ssh]\n', "table [policy.ssh]"),
])
def test_an_unknown_section_is_refused_with_its_line(tmp_path: Path, extra: str,
                                                     needle: str) -> None:
    path = rendered(tmp_path)
    text = path.read_text() + extra
    path.write_text(text)
    line = len(text.splitlines()) - extra.count("\n") + 1
    with pytest.raises(ConfigError, match=rf":{line}: unknown {re.escape(needle)}"):
        load(path)


def test_a_setting_before_any_section_is_refused(tmp_path: Path) -> None:
    path = rendered(tmp_path)
    path.write_text('listen = "0.0.0.0:1"\n' + path.read_text())
    with pytest.raises(ConfigError, match=r":1: unknown setting 'listen' outside any section"):
        load(path)


def test_serve_exits_with_one_line_naming_the_unknown_setting(ca: InitialisedCA,
                                                               tmp_path: Path) -> None:
    text = (ca.state / "hsmca.toml").read_text().replace("heartbeat-s = 60",
                                                          "heartbeat_s = 5")
    cfg = tmp_path / "hsmca.toml"
    cfg.write_text(text)
    proc = hsmca("serve", "--config", cfg, "--listen", "127.0.0.1:0", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "heartbeat_s" in lines[0] and f"{cfg}:" in lines[0] and "Traceback" not in lines[0]


def test_serve_says_what_is_wrong_with_where_its_config_points(ca: InitialisedCA,
                                                                tmp_path: Path) -> None:
    """The CA's files are read from the config's directory: a config copied elsewhere, a
    directory given as --config and a softhsm-conf that is gone each get one line that
    says what to do, not an errno."""
    text = (ca.state / "hsmca.toml").read_text()
    assert "softhsm-conf" in text
    moved = tmp_path / "elsewhere.toml"
    moved.write_text(text)
    gone = ca.state / "gone-softhsm.toml"
    gone.write_text(re.sub(r'softhsm-conf = ".*"', 'softhsm-conf = "nowhere/softhsm2.conf"',
                           text))
    config = ca.state / "hsmca.toml"
    try:
        for cfg, extra, says in (
                (moved, (), "keep elsewhere.toml in the state directory"),
                (ca.state, (), f"is a directory: give the config file in it (--config "
                               f"{ca.state.resolve() / 'hsmca.toml'})"),
                (gone, (), "nowhere/softhsm2.conf is not a file"),
                # A node's name given to a CA on SQLite, which has one unnamed node.
                (config, ("--node", "ca-3"), "has no [store] section (one node on SQLite, "
                                             "which has no name): leave --node out")):
            # (--workers takes "auto" as the config's workers does)
            proc = hsmca("serve", "--config", cfg, "--listen", "127.0.0.1:0", "--workers",
                         "auto", *extra, check=False)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr
            assert says in lines[0] and "Errno" not in lines[0], lines[0]
        # An old copy of the config (no [store]) in a state directory moved to
        # PostgreSQL would start an empty CA beside the cluster.
        (ca.state / "nodes").mkdir()
        proc = hsmca("serve", "--config", config, "--listen", "127.0.0.1:0", check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "belongs to a CA on PostgreSQL (it has nodes/), but" in proc.stderr
    finally:
        gone.unlink()
        if (ca.state / "nodes").exists():
            (ca.state / "nodes").rmdir()


def test_acme_is_off_without_its_section_and_on_with_it(tmp_path: Path) -> None:
    from ca.config import AcmeConfig
    path = rendered(tmp_path)
    assert load(path).acme is None
    path.write_text(path.read_text() + "[acme]\n")
    assert load(path).acme == AcmeConfig()
    path.write_text(path.read_text() + 'http-01-port = 8080\nresolver = "10.0.0.53:5353"\n'
                    '[acme.hosts]\n"web.internal.example" = "10.0.0.7"\n')
    acme = load(path).acme
    assert acme is not None and acme.http01_port == 8080 and acme.eab_required
    assert acme.resolver == ("10.0.0.53", 5353)
    assert acme.host("web.internal.example") == "10.0.0.7" and acme.host("x") is None


@pytest.mark.parametrize(("setting", "words"), [
    ("http-01-port = 0", "port from 1 to 65535"),
    ("tls-alpn-01-port = 70000", "port from 1 to 65535"),
    ('resolver = "dns.example"', "resolver must be an IP address"),
    ('resolver = "10.0.0.53:x"', "the port is not a number"),
    ("eab-required = 1", "'eab-required' must be true or false, not 1"),
    ("max-validations = 0", "greater than 0"),
    ("orders-per-hour = -5", "greater than 0"),
    ("validation-timeout = 3", "unknown setting 'validation-timeout' in [acme]"),
    ('hosts = { "a.test" = "not an address" }', "must map to an IP address"),
])
def test_bad_acme_settings_are_refused_by_name(tmp_path: Path, setting: str,
                                               words: str) -> None:
    path = rendered(tmp_path)
    path.write_text(path.read_text() + f"[acme]\n{setting}\n")
    line = path.read_text().count("\n")  # the setting is the last line
    with pytest.raises(ConfigError) as err:
        load(path)
    assert words in str(err.value) and "[acme]" in str(err.value)
    assert str(err.value).startswith(f"{path}:{line}"), err.value  # to the line


def test_witnesses_are_files_or_urls_and_url_witnesses_need_their_keys(tmp_path: Path) -> None:
    import tomli_w
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ca.audit.cosignature import cosigner_key
    from ca.audit.note import verifier_key
    vkey = str(cosigner_key("w.example/w1", Ed25519PrivateKey.generate().public_key()))
    note_vkey = verifier_key("w.example/w1", Ed25519PrivateKey.generate().public_key())
    path = rendered(tmp_path)

    def with_audit(**values: object) -> Path:
        doc = tomllib.loads(path.read_text())
        doc["audit"].update(values)
        out = tmp_path / "witnessed.toml"
        out.write_text(tomli_w.dumps(doc))
        return out

    cfg = load(with_audit(witnesses=["https://w.example/w1", "share/checkpoint"],
                          **{"witness-keys": [vkey]}))
    assert cfg.witness_urls == ("https://w.example/w1",) and cfg.witness_keys == (vkey,)
    assert cfg.witnesses == (tmp_path / "share" / "checkpoint",)
    for audit, why in [({"witnesses": ["http://w.example"]}, "'witness-keys' is empty"),
                       ({"witnesses": ["ftp://w.example"]}, "only http:// and https://"),
                       # not a file named so in the state directory that nodes share
                       ({"witnesses": ["127.0.0.1:36069"]}, 'write "http://127.0.0.1:36069"'),
                       ({"witnesses": ["w.example:443/w1"]}, "reads as host:port"),
                       ({"witness-keys": ["w+00000000+AQ=="]}, "witness-keys: "),
                       # a log's note key (type 0x01) is not a witness's cosignature key
                       ({"witness-keys": [note_vkey]}, "has type 0x01; expected a witness")]:
        with pytest.raises(ConfigError, match=why):
            load(with_audit(**audit))


def test_the_request_timeout_is_a_sane_number_of_seconds(tmp_path: Path) -> None:
    path = rendered(tmp_path)
    text = path.read_text()
    assert load(path).request_timeout_s == 15.0  # init writes the default
    for bad in ("0", "-1", "301", '"10s"'):
        path.write_text(text.replace("request-timeout-s = 15.0", f"request-timeout-s = {bad}"))
        with pytest.raises(ConfigError) as err:
            load(path)
        assert "[server]" in str(err.value) and "request-timeout-s" in str(err.value)
        if bad != '"10s"':
            assert "must be more than 0 and at most 300 seconds" in str(err.value)
    path.write_text(text.replace("request-timeout-s = 15.0", "request-timeout-s = 2"))
    assert load(path).request_timeout_s == 2.0


@pytest.mark.parametrize(("key", "value", "said"), [
    ("allow", "[1]", "allow holds strings in quotes, not 1"),
    ("allow", '["*.internal.example "]', "contains spaces"),
    ("allow", '["10.0.0.0/8x"]', "'10.0.0.0/8x' is not a CIDR"),
    ("deny", '["foo bar"]', "contains spaces"),
    ("deny", '["Example.com"]', "must be lower case"),
    ("allow", '["1.2.3"]', "looks like an IP address"),
    ("ssh-host-ttl-s", "0", "ssh-host-ttl-s must be a number of seconds greater than 0"),
    ("token-max-ttl-s", "-1", "token-max-ttl-s must be a number of seconds greater than 0"),
    ("x509-max-ttl-s", "0", "x509-max-ttl-s must be a number of seconds greater than 0"),
    # (a config trial: taken, then a 500 for a date past the year 9999, and a token of
    # 273 years)
    ("x509-max-ttl-s", "9999999999999", "and at most 315360000 (10 years), not 9999999999999"),
    ("token-max-ttl-s", "999999999999", "and at most 315360000 (10 years)"),
    ("ssh-host-ttl-s", "99999999999999", "and at most 315360000 (10 years)"),
    ("ssh-user-extensions", '["permit-ptyy"]', "did you mean 'permit-pty'?"),
    ("ssh-user-extensions", '["permit-pty", 7]', "holds strings in quotes"),
])
def test_a_policy_no_request_could_meet_is_refused_with_its_line(
        tmp_path: Path, key: str, value: str, said: str) -> None:
    """Entries and numbers that load as TOML but make no sense as policy (each once
    started a daemon that then refused the whole fleet, or issued host certificates
    that were never valid) are refused at start and at a reload, with the line."""
    path = rendered(tmp_path)
    text, n = re.subn(rf"(?m)^{key} = (\[[^\]]*\]|.*)$", f"{key} = {value}", path.read_text())
    assert n == 1
    path.write_text(text)
    line = next(i for i, x in enumerate(text.splitlines(), 1) if x.startswith(f"{key} = "))
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line} [policy]: {key}") and said in msg, msg


def test_policy_entries_a_careful_operator_writes_are_taken(tmp_path: Path) -> None:
    path = rendered(tmp_path)
    text = path.read_text()
    text = re.sub(r"(?m)^allow = .*$", 'allow = ["*.internal.example", "example.com", '
                  '"10.0.0.0/8", "192.0.2.7", "fd00::/8"]', text)
    text = re.sub(r"(?ms)^ssh-user-extensions = \[.*?\]",
                  'ssh-user-extensions = ["permit-pty", "login@github.com"]', text)
    path.write_text(text)
    policy = load(path).policy
    assert policy.allow == ("*.internal.example", "example.com", "10.0.0.0/8", "192.0.2.7",
                            "fd00::/8")
    assert policy.ssh_user_extensions == ("permit-pty", "login@github.com")


def refused_with(tmp: Path, old: str, new: str) -> str:
    """What `load` says of the config `init` writes with `old` replaced by `new`."""
    path = rendered(tmp)
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load(path)
    return str(err.value)


@pytest.mark.parametrize("value", ["0", "-5", "0.5", "100000"])
def test_a_checkpoint_heartbeat_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    said = refused_with(tmp_path, "heartbeat-s = 60", f"heartbeat-s = {value}")
    assert re.search(r"heartbeat-s \(.*\) must be from 1 to 86400", said), said


def test_a_listen_address_without_a_port_is_refused_as_the_files(tmp_path: Path) -> None:
    said = refused_with(tmp_path, 'listen = "127.0.0.1:8443"', 'listen = "127.0.0.1"')
    text = (tmp_path / "hsmca.toml").read_text()
    line = text[:text.index('listen = "127.0.0.1"')].count("\n") + 1
    assert said.startswith(f"{tmp_path / 'hsmca.toml'}:{line} [server]: listen must be "
                           "HOST:PORT"), said


@pytest.mark.parametrize(("old", "new", "said"), [
    ("x509-default-ttl-s = 86400", 'x509-default-ttl-s = "12h"',
     "[policy]: 'x509-default-ttl-s' must be a whole number, not '12h'"),
    ("allow-wildcards = false", 'allow-wildcards = "no"',
     "[policy]: 'allow-wildcards' must be true or false, not 'no'"),
    ("heartbeat-s = 60", "heartbeat-s = true", "[audit]: 'heartbeat-s' must be a number, not True"),
    ('dns-name = "ca.example"', "dns-name = 5", "[server]: 'dns-name' must be a string in quotes"),
    ("witnesses = []", 'witnesses = "w.txt"', "[audit]: 'witnesses' must be a list in [ ]"),
])
def test_a_value_of_the_wrong_type_is_refused_to_its_line_in_plain_words(
        tmp_path: Path, old: str, new: str, said: str) -> None:
    """An operator who writes `"12h"` for seconds is told which line, and what the
    setting takes in words of the file, not Python's (`must be a int`)."""
    text = rendered(tmp_path).read_text()
    line = text[:text.index(old)].count("\n") + 1
    msg = refused_with(tmp_path, old, new)
    assert msg.startswith(f"{tmp_path / 'hsmca.toml'}:{line} {said}"), msg


@pytest.mark.parametrize(("old", "new", "said"), [
    ('dns-name = "ca.example"', 'dns-name = "Bad Name"', "[server]: dns-name: name 'Bad Name'"),
    ('origin = "ca.example/hsmca-audit"', 'origin = ""', "[audit]: origin must be"),
    ('origin = "ca.example/hsmca-audit"', 'origin = "ca example"', "[audit]: origin must be"),
    ("[server]\n", '[server]\npublic-url = "ftp://ca.example"\n', "[server]: public-url must"),
    ("[server]\n", '[server]\npublic-url = "ca.example:8443"\n', "[server]: public-url must"),
    ("[server]\n", '[server]\npublic-url = "https://ca.example/?x=1"\n', "public-url must"),
])
def test_names_that_go_into_certificates_and_checkpoints_are_checked(
        tmp_path: Path, old: str, new: str, said: str) -> None:
    """What the daemon writes into every certificate (the CRL and OCSP addresses) or
    every checkpoint (the origin) cannot be taken back once issued: a bad one is refused
    at start, not discovered in the fleet's certificates."""
    error = refused_with(tmp_path, old, new)
    assert said in error, error


def test_a_ca_name_an_older_release_took_is_refused_with_advice_for_the_ca(
        tmp_path: Path) -> None:
    """An upgrade trial: a CA named `ca.lab.10` by a release before 0.2.0 stopped at the
    new release's first start, told to "give an IP as an IP", which fits a name asked
    for, not the CA's own. It is told to rename the CA and what that keeps."""
    error = refused_with(tmp_path, 'dns-name = "ca.example"', 'dns-name = "ca.lab.10"')
    assert "'ca.lab.10' looks like an IP address" in error, error
    assert "give an IP as an IP" not in error and "give it another" in error, error
    assert "Upgrading" in error and "\n" not in error, error


def test_a_public_url_with_a_trailing_slash_makes_no_double_slash(tmp_path: Path) -> None:
    path = rendered(tmp_path)
    path.write_text(path.read_text().replace(
        "[server]\n", '[server]\npublic-url = "https://ca.example:8443/"\n', 1))
    assert load(path).public_url == "https://ca.example:8443"
    # Names know no case: a hand-edited config in capitals still loads, as before.
    path.write_text(path.read_text().replace('"https://ca.example:8443/"',
                                             '"HTTPS://CA.Example:8443/PKI"').replace(
        'dns-name = "ca.example"', 'dns-name = "CA.Example."'))
    cfg = load(path)
    assert (cfg.public_url, cfg.dns_name) == ("https://ca.example:8443/PKI", "ca.example")


@pytest.mark.parametrize("url", ["https://ca.example/p%20ki", "http://ca.example/a/../pki",
                                 "http://ca.example/v1", "https://ca.example/acme/x"])
def test_a_public_url_path_the_listeners_could_not_serve_is_refused(tmp_path: Path,
                                                                    url: str) -> None:
    """The CRLs and OCSP are served under public-url's path as written (a review): a
    path that only decodes to another, or one of the daemon's own, would put addresses
    into certificates that answer 404 or something else."""
    path = rendered(tmp_path)
    path.write_text(path.read_text().replace("[server]\n", f'[server]\npublic-url = "{url}"\n',
                                             1))
    with pytest.raises(ConfigError, match=r"public-url's path .* must be plain words"):
        load(path)


def test_a_sqlite_inventory_is_made_only_when_asked(tmp_path: Path) -> None:
    """Only init makes the file: any other open of a missing one fails, and makes
    nothing (a worker's start raced a deletion of the inventory)."""
    from ca.store.sqlite import SQLiteStore
    with pytest.raises(FileNotFoundError):
        SQLiteStore(tmp_path / "gone.sqlite3", create=False)
    assert not (tmp_path / "gone.sqlite3").exists()


@pytest.mark.parametrize(("url", "said"), [
    ("mysql://ca@db/hsmca", "must be a postgresql:// URL"),
    ("postgresql://ca:s3cret@db/hsmca?sslmod=require", 'invalid URI query parameter: "sslmod"'),
    ("postgresql://ca:s3cret@[::1:5432/hsmca", "IPv6 host address"),
    ("postgresql://ca:s3cret%@db/hsmca", "percent-encode any '%'"),  # libpq quotes it
    ("postgresql://ca@db/hsmca?password=s3cret%", "percent-encode"),
    ("postgresql://ca:s3c@ret@db/hsmca", "has an '@' after its user name and password"),
])
def test_a_store_url_postgresql_would_refuse_is_one_line_without_its_password(
        tmp_path: Path, url: str, said: str) -> None:
    """As libpq reads it, before anything connects: a misspelt parameter once came out
    of `hsmca serve` and `hsmca init` as a 50-line traceback quoting the URL whole."""
    path = rendered(tmp_path)
    path.write_text(path.read_text() + f'\n[store]\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert said in str(err.value) and "s3c" not in str(err.value), err.value
    init = hsmca("init", "--state-dir", tmp_path / "new", "--module", "/nonexistent.so",
                 "--token", "t", "--pin-file", tmp_path / "pin", "--store-url", url,
                 check=False)
    assert init.returncode == 1 and said in init.stderr, init.stderr
    assert len(init.stderr.splitlines()) == 1 and "s3c" not in init.stderr


def test_a_log_level_is_one_of_three_said_to_its_line(tmp_path: Path) -> None:
    text = rendered(tmp_path).read_text()
    line = text[:text.index('log-level = "info"')].count("\n") + 1
    said = refused_with(tmp_path, 'log-level = "info"', 'log-level = "debug"')
    assert said == (f"{tmp_path / 'hsmca.toml'}:{line} [server]: log-level must be one of "
                    "info, warning, error (the least severe lines written), not 'debug'")
    assert load(rendered(tmp_path)).log_level == "info"
