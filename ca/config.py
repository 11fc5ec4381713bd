"""`hsmca.toml` -> frozen dataclasses, validated once at load.

Relative paths are relative to the directory holding the config file, so a state
directory can be moved as a whole. The PIN is never in this file: `pin-source`
names a file (`file:/path`) or an environment variable (`env:NAME`).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ca.decimal_text import is_decimal
from ca.policy import AS_IP, Policy, Refused, name_pattern, ssh_extension, uri
from ca.policy import dns_name as valid_dns_name
from hsm.config import HSMConfig
from hsm.uri import URIError
from hsm.uri import parse as parse_uri

KEY_LABELS = {"root": "root-ca", "issuing": "issuing-ca", "ssh_user": "ssh-user-ca",
              "ssh_host": "ssh-host-ca", "audit": "audit"}
SSH_USER_TTL_CEILING_S = 24 * 3600  # SPEC 8: SSH user certificates live at most a day


class ConfigError(ValueError):
    """The config cannot be used; the message names the file and the setting."""


# Every setting `load` reads, by section. Anything else in the file is refused with its
# line: a misspelt setting (`heartbeat_s` for `heartbeat-s`) must not silently fall back
# to the default. docs/operator.md's reference lists exactly these (tests/test_docs.py).
# How long a client may take to send a whole request, and to finish its TLS handshake
# (ca/http_server.py). Go's servers are usually given 10-30 s; nginx allows 60.
REQUEST_TIMEOUT_S = 15.0
# How long a worker's event loop may leave the primary's pings unanswered before it is
# killed and started again (ca/daemon/control.py): long enough for a loaded worker (a
# garbage collection, a swap storm), short enough that its share of the connections
# does not hang for good.
WORKER_TIMEOUT_S = 30.0
# Connections one client address may hold in one worker (ca/listener.py); 0: no bound.
PER_ADDRESS = 1024
SCHEMA: dict[str, frozenset[str]] = {
    "hsm": frozenset({"module", "token", "pin-source", "softhsm-conf"}),
    "keys": frozenset(p.replace("_", "-") for p in KEY_LABELS),
    "server": frozenset({"listen", "dns-name", "public-url", "tls-cert", "tls-key",
                         "metrics-allow", "workers", "request-timeout-s",
                         "max-connections-per-address", "worker-timeout-s",
                         "log-level", "http-listen"}),
    "audit": frozenset({"origin", "heartbeat-s", "witnesses", "witness-keys"}),
    # Several nodes on PostgreSQL (docs/cluster.md); no section: the embedded SQLite file.
    "store": frozenset({"url"}),
    "policy": frozenset({"allow", "deny", "allow-wildcards", "x509-default-ttl-s",
                         "x509-max-ttl-s", "ssh-user-default-ttl-s", "ssh-user-max-ttl-s",
                         "ssh-host-ttl-s", "ssh-user-extensions", "token-max-ttl-s"}),
    # ACME is on whenever the section exists (docs/acme.md); [acme.hosts] is its table
    # of name = address.
    "acme": frozenset({"eab-required", "http-01-port", "tls-alpn-01-port", "resolver",
                       "hosts", "validation-timeout-s", "max-validations",
                       "orders-per-hour", "failed-validations-per-hour",
                       "accounts-per-hour", "pending-authorizations"}),
}
_HEADER_LINE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")


def _line_of(text: str, section: str | None, key: str) -> int | None:
    """The line (1-based) where `key` is set in `section` (None: before any table), or
    where the table `[section.key]` (or `[key]` at the top) starts. tomllib keeps no
    positions, and an operator needs the line of a misspelt setting to fix it."""
    table = f"{section}.{key}" if section else key
    key_re = re.compile(rf"^\s*([\"']?){re.escape(key)}\1\s*[.=]")
    current: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER_LINE.match(line)
        if header:
            current = header.group(1).replace(" ", "").replace('"', "").replace("'", "")
            if current == table:
                return number
            continue
        if current == section and key_re.match(line):
            return number
    return None


class Where(str):
    """Where a section's settings are written, as errors say it: "PATH [section]", and
    `at(key)`, "PATH:LINE [section]" for the line that sets `key` (every refused setting
    names its line, so an operator goes straight to it)."""

    path: Path
    text: str
    section: str

    def __new__(cls, path: Path, text: str, section: str) -> Where:
        self = super().__new__(cls, f"{path} [{section}]")
        self.path, self.text, self.section = path, text, section
        return self

    def at(self, key: str) -> str:
        line = _line_of(self.text, self.section, key)
        return f"{self.path}:{line} [{self.section}]" if line else str(self)


def _at(where: str, key: str) -> str:
    return where.at(key) if isinstance(where, Where) else where


# How a refused value's expected type is said (not Python's `int`, `str`).
_KINDS = {int: "a whole number", float: "a number", str: "a string in quotes",
          bool: "true or false", list: "a list in [ ]", dict: "a table"}


def _check_known(path: Path, text: str, raw: dict[str, Any]) -> None:
    """Refuse the first setting or section `load` would not read, naming it and its line."""
    def refuse(section: str | None, key: str, known: frozenset[str] | set[str]) -> None:
        line = _line_of(text, section, key)
        where = f"{path}:{line}" if line else str(path)
        value = raw[section][key] if section else raw[key]
        if section is None:
            what = (f"section [{key}]" if isinstance(value, dict)
                    else f"setting {key!r} outside any section")
        else:
            what = (f"table [{section}.{key}]" if isinstance(value, dict)
                    else f"setting {key!r} in [{section}]")
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: unknown {what} ({hint}known: {', '.join(sorted(known))})")

    for section, table in raw.items():
        if section not in SCHEMA or not isinstance(table, dict):
            refuse(None, section, set(SCHEMA))
        for key in table:
            if key not in SCHEMA[section] and not (section == "hsm" and key == "pin"):
                refuse(section, key, SCHEMA[section])


@dataclass(frozen=True)
class AcmeConfig:
    """[acme]: the ACME server (docs/acme.md)."""

    eab_required: bool = True
    http01_port: int = 80
    tls_alpn01_port: int = 443
    resolver: tuple[str, int] | None = None  # (address, port) for dns-01 and lookups
    hosts: tuple[tuple[str, str], ...] = ()  # name -> address, consulted before DNS
    validation_timeout_s: float = 10.0
    max_validations: int = 16  # validations under way at once, per worker
    orders_per_hour: int = 300  # new orders, per account and per client address
    # names an account may have waiting for validation at once (each is an
    # authorization, kept until it expires): what its orders can fill the inventory with
    pending_authorizations: int = 300
    failed_validations_per_hour: int = 60  # per account and per client address
    accounts_per_hour: int = 20  # without a binding, per client address

    def host(self, name: str) -> str | None:
        """The address [acme.hosts] pins `name` to (DNS names are case-blind, and a
        trailing dot names the same host)."""
        return dict(self.hosts).get(name.lower().rstrip("."))


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    hsm: HSMConfig
    softhsm_conf: str | None
    keys: dict[str, str]  # purpose -> PKCS#11 URI of the private key
    listen: str
    dns_name: str
    public_url: str | None
    tls_cert: Path
    tls_key: Path
    audit_origin: str
    checkpoint_heartbeat_s: float
    witnesses: tuple[Path, ...] = ()  # file witnesses
    witness_urls: tuple[str, ...] = ()  # C2SP tlog-witness submission prefixes
    witness_keys: tuple[str, ...] = ()  # their cosignature verifier keys (vkeys)
    metrics_allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    workers: int = 0  # worker processes serving HTTPS; 0: one per CPU (at most 8)
    request_timeout_s: float = REQUEST_TIMEOUT_S
    max_connections_per_address: int = PER_ADDRESS  # per worker; 0: no bound
    worker_timeout_s: float = WORKER_TIMEOUT_S
    log_level: str = "info"  # the least severe level the daemon's log says
    # Where the CRLs and OCSP are served over plain HTTP too (and nothing else): what
    # nginx, OpenSSL's -crl_download and most relying parties can fetch. None: HTTPS only.
    http_listen: str | None = None
    policy: Policy = field(default_factory=Policy)
    acme: AcmeConfig | None = None  # None: no [acme] section, no ACME server
    store_url: str | None = None  # [store] url: PostgreSQL, several nodes; None: SQLite
    node: str | None = None  # the node's name (`serve --node`), in cluster mode only
    node_from_host: bool = False  # that name is the host's, no --node given
    # Each setting as written, by "[section] key": what a reload names when one that
    # only a restart applies has changed (never logged with its value).
    written: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def cluster(self) -> bool:
        """Several nodes share a PostgreSQL store: what a node keeps locally is named by
        its node name (nodes may share one state directory)."""
        return self.store_url is not None

    def for_node(self, node: str, from_host: bool = False) -> Config:
        """This config as node `node` runs it. In cluster mode its audit log, run files
        and URL file are its own, and its checkpoints' origin names it; on SQLite there
        is one node, and everything keeps its single-node name."""
        from dataclasses import replace
        if not self.cluster:
            return self
        check_node_name(node)
        return replace(self, node=node, audit_origin=f"{self.audit_origin}/{node}",
                       node_from_host=from_host)

    @property
    def local_dir(self) -> Path:
        """Where this node keeps its own files (the state directory on SQLite)."""
        return self.state_dir / "nodes" / self.node if self.node else self.state_dir

    @property
    def store_location(self) -> str:
        """What `open_store` opens: the PostgreSQL URL, or the SQLite file."""
        return self.store_url or str(self.db_path)

    @property
    def audit_log(self) -> Path:
        return self.local_dir / "audit" / "log.jsonl"

    @property
    def withheld_path(self) -> Path:
        """Certificates withheld after their "ok" outcome, for the next start to revoke
        (ca/issuance/withheld.py)."""
        return self.local_dir / "audit" / "withheld.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.local_dir / "audit" / "checkpoint"

    @property
    def cosigned_checkpoint_path(self) -> Path:
        """The latest checkpoint with the witnesses' cosignatures."""
        return self.local_dir / "audit" / "checkpoint.cosigned"

    @property
    def audit_key_pem(self) -> Path:
        return self.state_dir / "audit" / "audit_key.pem"

    @property
    def url_file(self) -> Path:
        """Where a running daemon writes the URL it listens on."""
        return self.local_dir / "serve.url"

    @property
    def not_running(self) -> bool:
        """A single node whose daemon does not run: it writes `url_file` while it runs
        (and removes it at its stop). `local_url` is then only the configured address,
        where another CA's daemon may answer (a new user's trial: its admin commands
        reached the quickstart's daemon and blamed root.pem)."""
        return not self.cluster and not self.url_file.exists()

    @property
    def local_url(self) -> str:
        try:
            own = self.url_file.read_text().strip()
        except OSError:
            own = None
        # On a cluster a node killed (-9) leaves its file behind: another node that
        # answers serves as well (a review: "no node runs" while one did)
        if own is not None and (not self.cluster or answers(own)):
            return own
        # Cluster mode, a command without a node: any node running on this state dir.
        # A node killed (-9) leaves its file behind: the first that takes a connection.
        found = [own] if own is not None else []
        for other in sorted((self.state_dir / "nodes").glob("*/serve.url")):
            try:
                found.append(other.read_text().strip())
            except OSError:
                continue
        for url in found:
            if answers(url):
                return url
        return found[0] if found else f"https://{self.listen}"

    @property
    def hsm_session(self) -> HSMConfig:
        """The HSM as the daemon's processes open it: their logins take turns through a
        file of this node's run directory, so that a PIN the token refused is offered
        once, not once per process (hsm.session.HSMConfig.login_gate)."""
        from dataclasses import replace
        return replace(self.hsm, login_gate=str(self.local_dir / "run" / "pin-login"))

    @property
    def generations_path(self) -> Path:
        """Change counters the daemon's processes share while it runs."""
        return self.local_dir / "run" / "generations"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "hsmca.sqlite3"

    @property
    def moved_db_path(self) -> Path:
        """The SQLite inventory once `hsmca store move` put the CA into PostgreSQL: kept
        for the operator's records, never opened again."""
        return self.state_dir / "hsmca.sqlite3.moved-to-postgresql"

    @property
    def move_marker(self) -> Path:
        """Written by `hsmca store move` before PostgreSQL commits, removed once the move
        is finished: while it exists, no daemon starts on SQLite (the move may have
        committed, and an SQLite daemon would leave PostgreSQL behind)."""
        return self.state_dir / "store-move-under-way"

    @property
    def root_pem(self) -> Path:
        return self.state_dir / "x509" / "root.pem"

    @property
    def bundle_pem(self) -> Path:
        """Every issuing CA certificate and the root: what the TLS layer trusts for
        client certificates (rewritten at every key rotation)."""
        return self.state_dir / "x509" / "bundle.pem"

    @property
    def chain_pem(self) -> Path:
        return self.state_dir / "x509" / "chain.pem"

    @property
    def issuing_pem(self) -> Path:
        return self.state_dir / "x509" / "issuing.pem"

    @property
    def admin_cert(self) -> Path:
        return self.state_dir / "admin" / "cert.pem"

    @property
    def admin_key(self) -> Path:
        return self.state_dir / "admin" / "key.pem"

    def key_label(self, purpose: str) -> str:
        label = parse_uri(self.keys[purpose]).object
        assert label is not None  # checked at load
        return label


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing setting {key!r}")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{_at(where, key)}: {key!r} must be "
                          f"{_KINDS.get(kind, kind.__name__)}, not {value!r}")
    return value


def load(path: Path, data: bytes | None = None) -> Config:
    """The config in `path`, or in `data` when the caller has read it already (a
    reload judges and reads one open file)."""
    path = Path(path).resolve()
    try:
        if data is None:
            text = path.read_text(encoding="utf-8")
        else:  # as read_text does: universal newlines
            text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (run `hsmca init` first, or pass "
                          "--config)") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a directory: give the config file in it "
                          f"(--config {path / 'hsmca.toml'})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _check_known(path, text, raw)
    base = path.parent

    def rel(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else (base / q).resolve()

    if "hsm" not in raw:
        # An empty file, or another program's: every config `hsmca init` writes has
        # [hsm] (a docs trial got "missing setting 'pin-source'" from an empty one).
        raise ConfigError(f"{path} has no [hsm] section: not a config `hsmca init` wrote "
                          "(pass the hsmca.toml in the CA's state directory, or run "
                          "`hsmca init` first)")
    hsm = raw.get("hsm", {})
    where = Where(path, text, "hsm")
    if "pin" in hsm:
        raise ConfigError(f"{where.at('pin')}: a PIN must not be in the config; use pin-source = "
                          "\"file:/path\" or \"env:NAME\"")
    pin_source = _get(hsm, "pin-source", str, where)
    if pin_source.startswith("file:"):
        pin_source = "file:" + str(rel(pin_source[5:]))
    elif not pin_source.startswith("env:"):
        if re.match(r"[A-Za-z][\w+.-]*:", pin_source) and not _exists(rel(pin_source)):
            # A mistyped prefix ("fiel:/srv/pin") was read as a relative file name (a
            # docs trial). Not quoted either: the part before the colon may be a PIN's.
            raise ConfigError(f"{where.at('pin-source')}: pin-source begins with a prefix "
                              "hsmca does not know, and names no file that exists: give "
                              "file:/path to a file of mode 0600 holding the PIN, or env:NAME")
        if "/" not in pin_source and not _exists(rel(pin_source)):
            # Not quoted: a PIN pasted here went into the error, and so into the journal
            # (a trial). A value with a slash, or given as file:PATH, is a path: quoted
            # when it cannot be read, as it surely is one.
            raise ConfigError(f"{where.at('pin-source')}: pin-source names no file that "
                              "exists (the value is not repeated, in case it is the PIN "
                              "itself): give file:/path to a file of mode 0600 holding the "
                              "PIN, or env:NAME")
        pin_source = "file:" + str(rel(pin_source))
    softhsm_conf = hsm.get("softhsm-conf")
    hsm_cfg = HSMConfig(module=_get(hsm, "module", str, where),
                        token=_get(hsm, "token", str, where), pin_source=pin_source)
    keys_raw = raw.get("keys", {})
    keys: dict[str, str] = {}
    wk = Where(path, text, "keys")
    for purpose in KEY_LABELS:
        name = purpose.replace("_", "-")
        uri = _get(keys_raw, name, str, wk)
        try:
            parsed = parse_uri(uri)
        except URIError as exc:
            raise ConfigError(f"{wk.at(name)} {purpose}: {exc}") from None
        if not parsed.object:
            raise ConfigError(f"{wk.at(name)} {purpose}: the URI must name the key with "
                              "object=")
        if parsed.token not in (None, hsm_cfg.token):
            raise ConfigError(f"{wk.at(name)} {purpose}: token {parsed.token!r} differs from "
                              f"[hsm] token {hsm_cfg.token!r}")
        keys[purpose] = uri
    server = raw.get("server", {})
    where = Where(path, text, "server")
    audit = raw.get("audit", {})
    wa = Where(path, text, "audit")
    pol = raw.get("policy", {})
    wp = Where(path, text, "policy")
    default = Policy()
    dns_name = _server_name(_get(server, "dns-name", str, where, "localhost"), where)
    public_url = _public_url(_get(server, "public-url", str, where, None), where)
    at = wp.at
    def ttl(key: str, default_s: int) -> int:
        value = _get(pol, key, int, at(key), default_s)
        if not 0 < value <= TTL_CEILING_S:
            # A config trial's 9999999999999 was taken, then failed requests with a 500
            # (a date past the year 9999) and made a bootstrap token of 273 years.
            raise ConfigError(f"{at(key)}: {key} must be a number of seconds greater than 0 "
                              f"and at most {TTL_CEILING_S} (10 years), not {value}")
        return value

    def entries(key: str, check: Callable[[str], str], default: list[str]
                ) -> tuple[str, ...]:
        out = []
        for value in _get(pol, key, list, at(key), default):
            if not isinstance(value, str):
                raise ConfigError(f"{at(key)}: {key} holds strings in quotes, not {value!r}")
            try:
                out.append(check(value))
            except Refused as exc:
                raise ConfigError(f"{at(key)}: {key}: {exc.detail}") from None
        return tuple(out)

    policy = Policy(
        allow=entries("allow", name_pattern, []),
        reserved=reserved_names(dns_name, public_url),
        deny=entries("deny", name_pattern, []),
        allow_wildcards=_get(pol, "allow-wildcards", bool, wp, False),
        x509_default_ttl_s=_get(pol, "x509-default-ttl-s", int, wp, default.x509_default_ttl_s),
        x509_max_ttl_s=ttl("x509-max-ttl-s", default.x509_max_ttl_s),
        ssh_user_default_ttl_s=_get(pol, "ssh-user-default-ttl-s", int, wp,
                                    default.ssh_user_default_ttl_s),
        ssh_user_max_ttl_s=_get(pol, "ssh-user-max-ttl-s", int, wp, default.ssh_user_max_ttl_s),
        ssh_host_ttl_s=ttl("ssh-host-ttl-s", default.ssh_host_ttl_s),
        ssh_user_extensions=entries("ssh-user-extensions", ssh_extension,
                                    list(default.ssh_user_extensions)),
        token_max_ttl_s=ttl("token-max-ttl-s", default.token_max_ttl_s),
    )
    for lifetime in ("x509", "ssh-user"):
        name = lifetime.replace("-", "_")
        short, long_ = (getattr(policy, f"{name}_{k}_ttl_s") for k in ("default", "max"))
        # A default written above the maximum would be cut to it silently: say so. (The
        # built-in default follows a maximum lowered below it.)
        if f"{lifetime}-default-ttl-s" in pol and not 0 < short <= long_:
            raise ConfigError(f"{at(f'{lifetime}-default-ttl-s')}: {lifetime}-default-ttl-s "
                              f"({short}) must be positive "
                              f"and at most {lifetime}-max-ttl-s ({long_})")
    if not 0 < policy.ssh_user_max_ttl_s <= SSH_USER_TTL_CEILING_S:
        # A person's SSH certificate is short-lived by design: nothing revokes it on the
        # servers until their KRL is fetched again.
        raise ConfigError(f"{at('ssh-user-max-ttl-s')}: ssh-user-max-ttl-s "
                          f"({policy.ssh_user_max_ttl_s}) must be "
                          f"positive and at most {SSH_USER_TTL_CEILING_S} (24 h)")
    return Config(
        written={f"[{section}] {key}": value for section, table in raw.items()
                 for key, value in table.items()},
        path=path, state_dir=base, hsm=hsm_cfg,
        softhsm_conf=str(rel(softhsm_conf)) if softhsm_conf else None,
        keys=keys,
        listen=_listen(_get(server, "listen", str, where, "127.0.0.1:8443"), where),
        dns_name=dns_name,
        public_url=public_url,
        tls_cert=rel(_get(server, "tls-cert", str, where, "tls/server.pem")),
        tls_key=rel(_get(server, "tls-key", str, where, "tls/server.key")),
        metrics_allow=_networks(_get(server, "metrics-allow", list, where,
                                     ["127.0.0.0/8", "::1/128"]), where),
        workers=_workers(server.get("workers", "auto"), where),
        request_timeout_s=_request_timeout(_get(server, "request-timeout-s", float, where,
                                                REQUEST_TIMEOUT_S), where),
        max_connections_per_address=_per_address(server.get("max-connections-per-address",
                                                            PER_ADDRESS), where),
        worker_timeout_s=_worker_timeout(_get(server, "worker-timeout-s", float, where,
                                              WORKER_TIMEOUT_S), where),
        log_level=_log_level(_get(server, "log-level", str, where, "info"), where),
        http_listen=_http_listen(_get(server, "http-listen", str, where, None), public_url,
                                 where),
        audit_origin=_origin(_get(audit, "origin", str, wa), wa),
        checkpoint_heartbeat_s=_heartbeat(_get(audit, "heartbeat-s", float, wa, 60.0), wa),
        **_witnesses(_get(audit, "witnesses", list, wa, []),
                     _get(audit, "witness-keys", list, wa, []), rel, wa),
        policy=policy,
        acme=(_acme(acme, Where(path, text, "acme"))
              if (acme := raw.get("acme")) is not None else None),
        store_url=_store_url(raw.get("store", {}), Where(path, text, "store")),
    )


def _store_url(table: dict[str, Any], where: str) -> str | None:
    where = _at(where, "url")  # errors name the line that sets it
    url = _get(table, "url", str, where, None)
    if url is not None:
        try:
            check_store_url(url)
        except ValueError as exc:
            raise ConfigError(f"{where}: url {exc} (without [store], the inventory is the "
                              "state directory's SQLite file)") from None
    return url


def check_store_url(url: str) -> dict[str, Any]:
    """A PostgreSQL URL libpq takes, as its parts; ValueError says what is wrong with it
    (after "url", "--store-url" or the variable that gave it), never quoting it: a
    part libpq could not read may be the password."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URL")
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict
    hint = ("percent-encode any '%', '@', ':', '/', '?' or '#' inside the user name or "
            "password")
    try:
        parts = conninfo_to_dict(url)
    except Error as exc:  # a misspelt parameter, an unclosed [, a bare %
        # libpq quotes what it could not read; only a parameter's name is shown again
        names = {kv.split("=", 1)[0] for kv in url.partition("?")[2].split("&")}
        why = re.sub(r'"([^"]*)"', lambda m: m.group(0) if m.group(1) in names else "...",
                     str(exc).strip().splitlines()[0])
        raise ValueError(f"is not a URL PostgreSQL takes ({why}): {hint}") from None
    if "@" in str(parts.get("host", "")):
        raise ValueError(f"has an '@' after its user name and password: {hint}")
    return parts


NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # fullmatch: '$' takes a '\n' too


def check_node_name(node: str) -> str:
    """A node name names files and directories, and goes into checkpoint origins and
    ?log= queries: letters, digits, '.', '_' and '-' only."""
    if node == "init":
        raise ConfigError("--node init: that name is the log of the offline ceremonies "
                          "(hsmca init); give the node another name")
    if not NODE_NAME.fullmatch(node):
        raise ConfigError(f"--node {node!r}: a node name is 1 to 63 letters, digits, '.', "
                          "'_' or '-', starting with a letter or digit")
    return node


def _port(value: int, key: str, where: str) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{_at(where, key)}: {key!r} must be a port from 1 to 65535, not {value}")
    return value


TTL_CEILING_S = 10 * 365 * 86400  # any lifetime the policy allows, at most


def _positive(value: Any, key: str, where: str) -> Any:
    if value <= 0:
        raise ConfigError(f"{_at(where, key)}: {key!r} must be greater than 0, not {value}")
    return value


def _acme(table: dict[str, Any], where: str) -> AcmeConfig:
    import ipaddress
    default = AcmeConfig()
    resolver = None
    text = _get(table, "resolver", str, where, None)
    at_resolver = _at(where, "resolver")
    if text is not None:
        host, port = text, 53
        if text.count(":") == 1 or text.startswith("["):  # a.b.c.d:port, [v6]:port
            host, _, p = text.rpartition(":")
            if not is_decimal(p) or not 1 <= int(p) <= 65535:
                raise ConfigError(f"{at_resolver}: resolver {text!r}: the port is not a number "
                                  "from 1 to 65535")
            port = int(p)
        try:
            resolver = (str(ipaddress.ip_address(host.strip("[]"))), port)
        except ValueError:
            raise ConfigError(f"{at_resolver}: resolver must be an IP address with an optional "
                              f":port (like \"10.0.0.53\" or \"10.0.0.53:5353\"), not "
                              f"{text!r}") from None
    hosts = _get(table, "hosts", dict, where, {})
    for name, address in hosts.items():
        try:
            ipaddress.ip_address(address if isinstance(address, str) else "")
        except ValueError:
            line = isinstance(where, Where) and (
                _line_of(where.text, "acme.hosts", name) or _line_of(where.text, "acme", "hosts"))
            at_host = f"{where.path}:{line} [acme]" if line else where
            raise ConfigError(f"{at_host} hosts: {name!r} must map to an IP address, not "
                              f"{address!r}") from None
    return AcmeConfig(
        eab_required=_get(table, "eab-required", bool, where, default.eab_required),
        http01_port=_port(_get(table, "http-01-port", int, where, default.http01_port),
                          "http-01-port", where),
        tls_alpn01_port=_port(_get(table, "tls-alpn-01-port", int, where,
                                   default.tls_alpn01_port), "tls-alpn-01-port", where),
        resolver=resolver,
        hosts=tuple(sorted((str(k).lower().rstrip("."), str(v)) for k, v in hosts.items())),
        validation_timeout_s=_positive(_get(table, "validation-timeout-s", float, where,
                                            default.validation_timeout_s),
                                       "validation-timeout-s", where),
        max_validations=_positive(_get(table, "max-validations", int, where,
                                       default.max_validations), "max-validations", where),
        orders_per_hour=_positive(_get(table, "orders-per-hour", int, where,
                                       default.orders_per_hour), "orders-per-hour", where),
        failed_validations_per_hour=_positive(_get(
            table, "failed-validations-per-hour", int, where,
            default.failed_validations_per_hour), "failed-validations-per-hour", where),
        accounts_per_hour=_positive(_get(table, "accounts-per-hour", int, where,
                                         default.accounts_per_hour), "accounts-per-hour",
                                    where),
        pending_authorizations=_positive(_get(
            table, "pending-authorizations", int, where, default.pending_authorizations),
            "pending-authorizations", where))


def _witnesses(entries: list[Any], keys: list[Any], rel: Any, where: str) -> dict[str, Any]:
    """`witnesses`: file paths, or http(s) URLs of C2SP tlog-witnesses; `witness-keys`:
    the verifier keys whose cosignatures are kept (one or more per URL witness)."""
    from ca.audit.cosignature import ALG_COSIGNATURE, parse_verifier_key
    at_urls, at_keys = _at(where, "witnesses"), _at(where, "witness-keys")
    files: list[Path] = []
    urls: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"{at_urls}: each of 'witnesses' is a file path or a URL, not "
                              f"{entry!r}")
        if re.match(r"^[a-z][a-z0-9+.-]*://", entry, re.IGNORECASE):
            if not re.match(r"^https?://[^/\s]+", entry, re.IGNORECASE):
                raise ConfigError(f"{at_urls}: witness {entry!r}: only http:// and https:// "
                                  "witnesses are known")
            urls.append(entry)
        elif re.match(r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):\d+(/|$)", entry):
            # It would be a file of that name in the state directory, which every node
            # of a cluster shares: not the witness server it names.
            raise ConfigError(f"{at_urls}: witness {entry!r} reads as host:port: write "
                              f"\"http://{entry}\" for a witness server, or a path such as "
                              f"\"./{entry}\" for a file")
        else:
            files.append(rel(entry))
    for key in keys:
        if not isinstance(key, str):
            raise ConfigError(f"{at_keys}: each of 'witness-keys' is a verifier key string, not "
                              f"{key!r}")
        try:
            parse_verifier_key(key, ALG_COSIGNATURE)
        except ValueError as exc:
            raise ConfigError(f"{at_keys}: witness-keys: {exc}") from None
    if urls and not keys:
        raise ConfigError(f"{at_urls}: 'witnesses' has URLs but 'witness-keys' is empty: give "
                          "each witness's verifier key (`hsmca witness serve` prints it)")
    return {"witnesses": tuple(files), "witness_urls": tuple(urls),
            "witness_keys": tuple(str(k).strip() for k in keys)}


def check_state(cfg: Config) -> None:
    """What the daemon needs before it starts, beyond the config's own text: the CA's
    state in the config's directory, and the SoftHSM config it names (without which
    SoftHSM fails to load with no reason given)."""
    if not cfg.audit_key_pem.exists():
        raise ConfigError(
            f"{cfg.state_dir} holds no CA ({cfg.audit_key_pem} is missing): hsmca reads the "
            f"CA's files from the directory its config is in, so keep {cfg.path.name} in "
            "the state directory `hsmca init` made, and pass --config there")
    if cfg.softhsm_conf and not Path(cfg.softhsm_conf).is_file():
        raise ConfigError(f"{cfg.path} [hsm] softhsm-conf: {cfg.softhsm_conf} is not a file "
                          "(the softhsm2.conf the token was created with)")
    if (not cfg.cluster and (cfg.state_dir / "nodes").is_dir()
            and not cfg.moved_db_path.exists()):
        # An old copy of the config, from before the cluster: it would start an empty CA
        # on SQLite beside it, refusing every client. (After `hsmca store move`, the
        # daemon's own check says more: finish the move.)
        raise ConfigError(
            f"{cfg.state_dir} belongs to a CA on PostgreSQL (it has nodes/), but {cfg.path} "
            "has no [store] section: use the config that names the cluster's database")


def trusted_paths(cfg: Config) -> list[Path]:
    """What the daemon runs on and records into, which nobody else may write: the
    config, the state directory and this node's, the audit log and its directory, the
    inventory, the SoftHSM config and the PKCS#11 module."""
    paths = [cfg.path, cfg.state_dir, cfg.local_dir, cfg.audit_log.parent, cfg.audit_log,
             Path(cfg.hsm.module)]
    if not cfg.cluster:
        paths.append(cfg.db_path)
    if cfg.softhsm_conf:
        paths.append(Path(cfg.softhsm_conf))
    return paths


def secret_files(cfg: Config) -> list[Path]:
    """The files whose readers could sign or impersonate: the PIN file (when the PIN
    comes from one), the daemon's TLS key and the admin key."""
    files = [cfg.tls_key, cfg.admin_key]
    if cfg.hsm.pin_source.startswith("file:"):
        files.insert(0, Path(cfg.hsm.pin_source[5:]))
    return files


MAX_WORKERS = 64
_LOOPBACK = ("localhost", "127.0.0.1", "::1")
# A name only the daemon's own TLS certificate carries (in .invalid, which no DNS
# resolves: RFC 6761). Loopback names are no proof of being the CA, since hosts are
# certified for them; so a client reaching the CA at a loopback address checks this
# name instead (ca.client.ssl_context): an SSH trial had a fleet host's credential for
# 127.0.0.1 answer `hsmca ssh revoke` and `ssh known-hosts` in the CA's place.
CA_SERVER_NAME = "ca-server.hsmca.invalid"


def reserved_names(dns_name: str, public_url: str | None) -> tuple[str, ...]:
    """The CA's own names, which no certificate it issues to anyone else may carry: its
    DNS name, the host of its public URL and CA_SERVER_NAME. Loopback names are left
    out: hosts are named `localhost` for SSH over loopback, and clients of the CA at a
    loopback address check CA_SERVER_NAME instead."""
    from urllib.parse import urlsplit
    names = {dns_name, CA_SERVER_NAME}
    if public_url:
        host = urlsplit(public_url).hostname
        if host:
            names.add(host)
    return tuple(sorted(n for n in names if n not in _LOOPBACK and not n.endswith(".localhost")))


def _server_name(value: str, where: str) -> str:
    """The daemon's name in its TLS certificate (as `hsmca init --dns-name` takes it;
    DNS names know no case, so an edited `CA.Example.com` is taken as lower case)."""
    where = _at(where, "dns-name")  # errors name the line that sets it
    taken = value.lower().removesuffix(".") if value.isascii() else value
    try:
        return valid_dns_name(taken)
    except Refused as exc:  # said of the value as written
        detail = exc.detail.replace(repr(taken), repr(value))
        if detail.endswith(AS_IP):
            # The CA's own name, which releases before 0.2.0 let pass: an upgrade trial's
            # CA stopped at its first start with advice that did not fit.
            detail = (detail.removesuffix(AS_IP) + ": the CA's name must be a DNS name; "
                      "give it another that clients reach it by (releases before 0.2.0 "
                      "took this one). The next start renews the listener's certificate "
                      "for it; the admin credential and the audit log's origin keep their "
                      "names (docs/operator.md, Upgrading)")
        raise ConfigError(f"{where}: dns-name: {detail}") from None


def _public_url(value: str | None, where: str) -> str | None:
    """The base of the CRL and OCSP addresses written into every certificate: a
    wrong one cannot be taken back from what was issued."""
    where = _at(where, "public-url")  # errors name the line that sets it
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if sep:  # scheme and host know no case: `HTTPS://CA.Example.com/pki` is taken
        host, slash, path = rest.partition("/")
        value = f"{scheme.lower()}://{host.lower()}{slash}{path}"
    try:
        uri(value)
        if value.split("://", 1)[0] not in ("http", "https") or "?" in value or "#" in value:
            raise Refused("")
    except Refused:
        raise ConfigError(f"{where}: public-url must be an http:// or https:// URL like "
                          f"\"https://ca.example:8443\" (it goes into every certificate's CRL "
                          f"and OCSP addresses), not {value!r}") from None
    path = value.split("://", 1)[1].partition("/")[2].rstrip("/")
    segments = path.split("/") if path else []
    if any(not re.fullmatch(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*", s) or s in (".", "..")
           for s in segments) or (segments and segments[0] in ("v1", "acme", ".well-known")):
        # The listeners serve the CRLs and OCSP under this path as written (a path that
        # only decodes to it, or one of the daemon's own, would name addresses that
        # answer 404 or answer something else).
        raise ConfigError(f"{where}: public-url's path {'/' + path!r} must be plain words "
                          "(letters, digits, '-', '_', '.', '~') and not begin with v1, acme "
                          "or .well-known, the daemon's own paths")
    return value.rstrip("/")


def _origin(value: str, where: str) -> str:
    """The checkpoint origin, also the audit key's name in signed notes (c2sp.org/
    signed-note): non-empty, no spaces, no '+'."""
    where = _at(where, "origin")  # errors name the line that sets it
    if not value or "+" in value or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(f"{where}: origin must be a non-empty name without spaces, '+' or "
                          f"control characters (like \"ca.example/hsmca-audit\"), not {value!r}")
    return value


def split_listen(text: str, need_host: bool = False) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port), the host empty unless
    `need_host`; ValueError saying what it must be (after the flag or setting that
    gave it)."""
    host, sep, port = text.rpartition(":")
    if not sep or not is_decimal(port) or not 0 <= int(port) <= 65535 or (
            need_host and not host.strip("[]")):
        raise ValueError(f"must be HOST:PORT (like \"127.0.0.1:8443\" or \"[::]:8443\"), not "
                         f"{text!r}")
    return host.strip("[]"), int(port)


def _listen(value: str, where: str) -> str:
    where = _at(where, "listen")  # errors name the line that sets it
    try:
        split_listen(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: listen {exc}") from None
    return value


def _http_listen(value: str | None, public_url: str | None, where: str) -> str | None:
    """[server] http-listen; a public-url of http:// needs it: certificates would name
    CRL and OCSP addresses that nothing serves."""
    if value is None:
        if public_url is not None and public_url.startswith("http://"):
            raise ConfigError(f"{_at(where, 'public-url')}: public-url is http://, so the "
                              "certificates' CRL and OCSP addresses are plain HTTP, but "
                              "nothing serves them: set http-listen (like "
                              "\"0.0.0.0:8080\") in [server] to serve them there")
        return None
    try:
        split_listen(value)
    except ValueError as exc:
        raise ConfigError(f"{_at(where, 'http-listen')}: http-listen {exc}") from None
    return value


def _heartbeat(value: float, where: str) -> float:
    where = _at(where, "heartbeat-s")  # errors name the line that sets it
    if not 1 <= value <= 86400:
        raise ConfigError(f"{where}: heartbeat-s ({value:g}) must be from 1 to 86400 seconds "
                          "(each checkpoint is a signature in the HSM and a line in the log)")
    return value


def _request_timeout(value: float, where: str) -> float:
    where = _at(where, "request-timeout-s")  # errors name the line that sets it
    if not 0 < value <= 300:
        raise ConfigError(f"{where}: request-timeout-s ({value:g}) must be more than 0 and at "
                          "most 300 seconds (how long a client may take to send a request)")
    return float(value)


def _worker_timeout(value: float, where: str) -> float:
    where = _at(where, "worker-timeout-s")  # errors name the line that sets it
    if not 5 <= value <= 3600:
        raise ConfigError(f"{where}: worker-timeout-s ({value:g}) must be from 5 to 3600 "
                          "seconds (how long a worker may leave the primary's pings "
                          "unanswered before it is killed and started again)")
    return float(value)


LOG_LEVELS = ("info", "warning", "error")


def _log_level(value: str, where: str) -> str:
    where = _at(where, "log-level")  # errors name the line that sets it
    if value.lower() not in LOG_LEVELS:
        raise ConfigError(f"{where}: log-level must be one of {', '.join(LOG_LEVELS)} (the "
                          f"least severe lines written), not {value!r}")
    return value.lower()


def answers(url: str) -> bool:
    """Whether something listens where `url` (a daemon's own serve.url) points."""
    import socket
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname or "", parts.port or 443), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _per_address(value: Any, where: str) -> int:
    where = _at(where, "max-connections-per-address")  # errors name the line that sets it
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise ConfigError(f"{where}: max-connections-per-address must be a number of "
                          f"connections from 0 (no bound) to 1000000, not {value!r}")
    return value


def _workers(value: Any, where: str) -> int:
    where = _at(where, "workers")  # errors name the line that sets it
    if value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"{where}: 'workers' must be \"auto\" or a number from 1 to "
                          f"{MAX_WORKERS}, not {value!r}")
    return value


def worker_count(configured: int) -> int:
    """How many worker processes to run: as configured, or one per CPU (at most 8)."""
    if configured:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _networks(values: list[Any], where: str) -> tuple[str, ...]:
    where = _at(where, "metrics-allow")  # errors name the line that sets it
    import ipaddress
    try:
        return tuple(str(ipaddress.ip_network(v, strict=False)) for v in values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: metrics-allow: {exc}") from None


# What `render` writes above each section: the settings it holds and what they do.
# The full reference, defaults included, is docs/operator.md section 6.
_HEADER = """\
# hsmca configuration, written by `hsmca init`. Relative paths are relative to this
# file's directory. An unknown section or setting is refused at start, with its line.
# Every setting is described in docs/operator.md ("Configuration reference").
"""
_NOTES = {
    "hsm": ["module: the PKCS#11 library; token: the token's label.",
            "pin-source: the user PIN, never stored here: file:/path (mode 0600) or",
            "env:NAME. softhsm-conf: SOFTHSM2_CONF for the daemon (SoftHSM only)."],
    "keys": ["RFC 7512 URIs of the private keys, one per purpose."],
    "server": ["listen: HOST:PORT. dns-name: the daemon's name in its TLS certificate.",
               "tls-cert, tls-key: the listener's credential (the key must be mode 0600).",
               "public-url = \"https://ca.example:8443\" (unset by default) adds the CRL",
               "distribution point and OCSP address to issued certificates; most relying",
               "parties fetch those over plain HTTP only: public-url = \"http://HOST:8080\"",
               "with http-listen = \"0.0.0.0:8080\" serves the CRLs and OCSP there, alone.",
               "metrics-allow: client networks that may read /metrics.",
               "workers: processes serving HTTPS, each with its own HSM session (\"auto\":",
               "one per CPU, at most 8). The primary process alone writes the audit log.",
               "request-timeout-s: how long a client may take over its TLS handshake, and",
               "over each request from its first byte (slower ones get a 408).",
               "max-connections-per-address: connections one client address may hold in",
               "each worker (0: no bound; behind a TCP load balancer, every client has the",
               "balancer's address).",
               "worker-timeout-s: a worker whose event loop leaves the",
               "primary's pings unanswered that long is killed and started again.",
               "log-level: info, warning or error, the least severe lines written to",
               "stderr (warning leaves out each request refused and each certificate",
               "issued)."],
    "audit": ["origin: the checkpoint origin line and signing key name.",
              "heartbeat-s: seconds between checkpoints when the log is idle.",
              "witnesses: files, or URLs of C2SP witnesses (`hsmca witness serve`), to which",
              "every checkpoint is pushed; each refuses one that does not extend the",
              "checkpoint it holds (keep them off this host). witness-keys: the verifier",
              "keys of the URL witnesses, whose cosignatures are published."],
    "store": ["url: the PostgreSQL database that several nodes share (docs/cluster.md);",
              "without this section the inventory is the state directory's SQLite file."],
    "policy": ["allow, deny: names a bootstrap token may grant (DNS patterns such as",
               "\"*.internal.example\", and CIDRs); an empty allow list allows any name.",
               "allow-wildcards: whether \"*.\" names may be granted.",
               "Lifetimes in seconds: x509-default-ttl-s, x509-max-ttl-s (leaf certificates),",
               "ssh-user-default-ttl-s, ssh-user-max-ttl-s, ssh-host-ttl-s, token-max-ttl-s.",
               "ssh-user-extensions: the extensions SSH user certificates carry."],
}


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a directory this user cannot search: read (and said) at login
        return True


def render(*, module: str, token: str, pin_source: str, softhsm_conf: str | None,
           keys: dict[str, str], dns_name: str, audit_origin: str,
           listen: str = "127.0.0.1:8443", store_url: str | None = None) -> str:
    """The config `hsmca init` writes, every value written by tomli_w (so that paths and
    labels are always escaped correctly), each section under a comment that says what
    its settings do. Defaults come from the dataclasses above, so they cannot drift."""
    import tomli_w  # only init writes a config; `serve` never loads the writer

    default = Policy()
    hsm: dict[str, Any] = {"module": module, "token": token, "pin-source": pin_source}
    if softhsm_conf:
        hsm["softhsm-conf"] = softhsm_conf
    doc: dict[str, dict[str, Any]] = {
        "hsm": hsm,
        "keys": {purpose.replace("_", "-"): uri for purpose, uri in keys.items()},
        "server": {"listen": listen, "dns-name": dns_name, "tls-cert": "tls/server.pem",
                   "tls-key": "tls/server.key", "metrics-allow": ["127.0.0.0/8", "::1/128"],
                   "workers": "auto", "request-timeout-s": REQUEST_TIMEOUT_S,
                   "max-connections-per-address": PER_ADDRESS,
                   "worker-timeout-s": WORKER_TIMEOUT_S, "log-level": "info"},
        "audit": {"origin": audit_origin, "heartbeat-s": 60, "witnesses": [],
                  "witness-keys": []},
        "policy": {
            "allow": list(default.allow), "deny": list(default.deny),
            "allow-wildcards": default.allow_wildcards,
            "x509-default-ttl-s": default.x509_default_ttl_s,
            "x509-max-ttl-s": default.x509_max_ttl_s,
            "ssh-user-default-ttl-s": default.ssh_user_default_ttl_s,
            "ssh-user-max-ttl-s": default.ssh_user_max_ttl_s,
            "ssh-host-ttl-s": default.ssh_host_ttl_s,
            "token-max-ttl-s": default.token_max_ttl_s,
            "ssh-user-extensions": list(default.ssh_user_extensions),
        },
    }
    if store_url is not None:
        doc["store"] = {"url": store_url}
    for section, table in doc.items():
        unknown = set(table) - SCHEMA[section]
        assert not unknown, f"render writes {unknown} that load would refuse"
    parts = [_HEADER]
    for section, table in doc.items():
        parts.append("".join(f"# {line}\n" for line in _NOTES[section])
                     + tomli_w.dumps({section: table}))
    if store_url is None:
        parts.append(_STORE_EXAMPLE)
    parts.append(_ACME_EXAMPLE)
    return "\n".join(parts)


# Without [store], the inventory is the state directory's SQLite file.
_STORE_EXAMPLE = """\
# Several nodes on PostgreSQL (docs/cluster.md): `hsmca init --store-url` writes this
# for a new CA, `hsmca store move` when it moves this one there; run each node with
# `hsmca serve --node NAME`.
# [store]
# url = "postgresql://hsmca@db.internal.example/hsmca"
"""

# ACME is on whenever the section exists, so init writes it commented out.
_ACME_EXAMPLE = """\
# ACME (docs/acme.md): uncomment to serve /acme/directory. Every setting is optional.
# [acme]
# eab-required = true          # accounts need `hsmca acme eab create`
# http-01-port = 80
# tls-alpn-01-port = 443
# resolver = "10.0.0.53"       # dns-01 and lookups; unset: no dns-01, the system's
# [acme.hosts]                 # name = address, consulted before DNS
# "web.internal.example" = "10.0.0.7"
"""
