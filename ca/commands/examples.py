"""Examples at the end of each command's --help.

A docs trial found example commands only in `hsmca --help`: each command's own help
said what its flags are, not how they go together. Every example here is parsed by the
command's own parser in the test suite (tests/test_client_cli.py), so none names a flag
the command does not have.
"""

from __future__ import annotations

import argparse
from typing import Any

HEADING = "examples:"

EXAMPLES: dict[str, tuple[str, ...]] = {
    "init": (
        "hsmca init --state-dir var/ca --module /usr/lib/softhsm/libsofthsm2.so \\\n"
        "    --token hsmca --pin-file var/pin",
        "hsmca init --state-dir /srv/hsmca/ca --module /usr/lib/softhsm/libsofthsm2.so \\\n"
        "    --token hsmca --pin-file /srv/hsmca/pin --dns-name ca.example \\\n"
        "    --key-type ec-p384 --name 'Example staging'",
    ),
    "serve": (
        "hsmca serve --config var/ca/hsmca.toml --listen 127.0.0.1:8443",
        "hsmca serve --config /srv/hsmca/ca/hsmca.toml --listen 0.0.0.0:8443 --workers 1",
    ),
    "token create": (
        "(umask 077 && hsmca token create --config hsmca.toml --role service \\\n"
        "    --name api.internal.example --ttl 1h > api.token)",
        "hsmca token create --config hsmca.toml --role user --name alice@example.com \\\n"
        "    --principal alice deploy",
    ),
    "enroll": (
        "hsmca enroll --url https://ca.example:8443 --ca root.pem --token-file svc.token \\\n"
        "    --name svc.internal.example --out svc",
    ),
    "renew": (
        "hsmca renew --daemon --url https://ca.example:8443 --ca root.pem \\\n"
        "    --cert svc/cert.pem --key svc/key.pem --exec 'systemctl reload nginx'",
        "hsmca renew --url https://ca.example:8443 --ca root.pem \\\n"
        "    --cert /etc/api/tls/cert.pem --key /etc/api/tls/key.pem",
    ),
    "revoke": (
        "hsmca revoke 4f3a9c0e12 --reason keyCompromise --config hsmca.toml",
        "hsmca revoke --identity alice@example.com --config hsmca.toml",
        "hsmca revoke --url https://ca.example:8443 --ca root.pem --cert cert.pem "
        "--key key.pem",
    ),
    "cert list": (
        "hsmca cert list --config hsmca.toml --search internal.example --status valid",
    ),
    "cert show": ("hsmca cert show 4f3a9c0e12 --pem --config hsmca.toml",),
    "ssh host": (
        "hsmca ssh host --url https://ca.example:8443 --ca root.pem --cert host/cert.pem \\\n"
        "    --key host/key.pem --install /etc/ssh/sshd_config.d --renew",
    ),
    "ssh user": (
        "hsmca ssh user --url https://ca.example:8443 --ca root.pem \\\n"
        "    --cert ~/.hsmca/cert.pem --key ~/.hsmca/key.pem --ttl 8h --agent",
    ),
    "ssh known-hosts": (
        "hsmca ssh known-hosts --url https://ca.example:8443 --ca root.pem \\\n"
        "    --hosts '*.internal.example' --out ~/.ssh/known_hosts.d/hsmca",
    ),
    "ssh revoke": (
        "hsmca ssh revoke --key-id alice@example.com:4242 --config hsmca.toml",
        "hsmca ssh revoke --pubkey stolen_id_ed25519.pub --config hsmca.toml",
    ),
    "ssh list": ("hsmca ssh list --config hsmca.toml --type host --status valid",),
    "key list": ("hsmca key list --config hsmca.toml",),
    "status": (
        "hsmca status --config hsmca.toml",
        "hsmca status --url https://ca.example:8443 --ca root.pem --json",
    ),
    "key rotate": (
        "hsmca key rotate issuing --config hsmca.toml",
        "hsmca key rotate ssh-user --stage --config hsmca.toml",
    ),
    "key rotate-root": (
        "runuser -u hsmca -- hsmca key rotate-root --config /srv/hsmca/ca/hsmca.toml",
    ),
    # (after a rotation: the key init made; `hsmca key list` names them all)
    "key retire": ("hsmca key retire issuing-ca --config hsmca.toml",),
    "key destroy": ("hsmca key destroy issuing-ca --config hsmca.toml",),
    "key revoke": ("hsmca key revoke issuing-ca --reason cACompromise --config hsmca.toml",),
    "acme eab create": (
        "hsmca acme eab create --config hsmca.toml --names '*.web.internal.example' --ttl 7d",
    ),
    "acme eab list": ("hsmca acme eab list --config hsmca.toml",),
    "acme eab withdraw": ("hsmca acme eab withdraw eab-9d2e41c07a --config hsmca.toml",),
    "acme account list": ("hsmca acme account list --config hsmca.toml",),
    "acme account deactivate": ("hsmca acme account deactivate Yx4hQ2 --config hsmca.toml",),
    "audit verify": (
        "hsmca audit verify --log var/ca/audit/log.jsonl --key var/ca/audit/audit_key.pem",
        "hsmca audit verify --url https://ca.example:8443 --ca root.pem "
        "--client-cert a/cert.pem \\\n"
        "    --client-key a/key.pem --key audit_key.pem --state audit-state.json",
    ),
    "audit show": (
        "hsmca audit show --config hsmca.toml --from 1200",
        "hsmca audit show --url https://ca.example:8443 --ca root.pem --cert a/cert.pem \\\n"
        "    --key a/key.pem --follow",
    ),
    "audit prove": (
        "hsmca audit prove --url https://ca.example:8443 --ca root.pem \\\n"
        "    --client-cert a/cert.pem --client-key a/key.pem --key audit_key.pem \\\n"
        "    --cert-file api/cert.pem",
    ),
    "witness serve": (
        "hsmca witness serve --key-file /srv/witness/witness.key --name witness.example/w1 \\\n"
        "    --log ca.example/hsmca-audit=ca.example/hsmca-audit+8ff839b8+AQOh... --new-state",
        "hsmca witness serve --key-file /srv/witness/witness.key --name witness.example/w1 \\\n"
        "    --log ca.example/hsmca-audit=ca.example/hsmca-audit+8ff839b8+AQOh...",
    ),
    "ui": (
        "hsmca ui --url https://ca.example:8443 --ca root.pem --cert a/cert.pem "
        "--key a/key.pem \\\n"
        "    --audit-key audit_key.pem --state audit-state.json --listen 127.0.0.1:8480",
    ),
    "store move": (
        "hsmca store move --config hsmca.toml --store-url postgresql://hsmca@db.example/hsmca",
    ),
    "backup": ("hsmca backup --config /srv/hsmca/ca/hsmca.toml --out /var/backups/hsmca",),
}


# `hsmca --help`'s examples: a tour, one or two of each command's own (so the suite's
# check of those covers them too), by command and index.
TOUR = (("init", 0), ("serve", 0), ("enroll", 0), ("renew", 0), ("audit verify", 0),
        ("audit verify", 1), ("ui", 0))


def shown(examples: tuple[str, ...]) -> str:
    """`examples` as a help text ends: a heading, then each line indented."""
    return HEADING + "\n" + "\n".join(
        "  " + line for example in examples for line in example.splitlines())


def tour() -> str:
    return shown(tuple(EXAMPLES[name][i] for name, i in TOUR))


class HelpFormatter(argparse.HelpFormatter):
    """argparse's own, but for the examples, whose lines are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(HEADING):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def commands(parser: argparse.ArgumentParser,
             path: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every command that runs something (no subcommands of its own), by its words."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {" ".join(path): parser}
    found: dict[str, argparse.ArgumentParser] = {}
    choices: dict[str, Any] = subs[0].choices
    for name, sub in choices.items():
        found.update(commands(sub, (*path, name)))
    return found


def add_examples(top: argparse.ArgumentParser) -> None:
    for name, parser in commands(top).items():
        if examples := EXAMPLES.get(name):
            parser.formatter_class = HelpFormatter
            parser.epilog = shown(examples)
