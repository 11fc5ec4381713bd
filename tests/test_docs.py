"""The operator docs agree with the code: every setting is in the reference, the
systemd units pass systemd-analyze, defaults match the server's, secrets stay off
command lines."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ca.config import SCHEMA, Policy
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def reference() -> str:
    text = (DOCS / "operator.md").read_text()
    return text[text.index("## 6. Configuration reference"):text.index("## 7.")]


def keys_read_by_load() -> set[str]:
    """Every string `ca.config.load` passes as a key to `_get(table, KEY, ...)`,
    `table.get(KEY)`, `ttl(KEY, ...)` or `entries(KEY, ...)`: what the code reads, found
    in the code itself."""
    tree = ast.parse((ROOT / "ca" / "config.py").read_text())
    # load, and _acme and _store_url, which read the [acme] and [store] sections for it
    readers = [n for n in tree.body if isinstance(n, ast.FunctionDef)
               and n.name in ("load", "_acme", "_store_url")]
    keys: set[str] = set()
    for node in (n for reader in readers for n in ast.walk(reader)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "_get" and len(node.args) > 1:
            arg = node.args[1]
        elif isinstance(func, ast.Attribute) and func.attr == "get" and node.args:
            arg = node.args[0]
        elif isinstance(func, ast.Name) and func.id in ("ttl", "entries") and node.args:
            arg = node.args[0]  # load's own readers of [policy], which check values too
        else:
            continue
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            keys.add(arg.value)
    return keys


def test_every_setting_the_code_reads_is_in_the_schema_and_the_reference() -> None:
    schema = {k for keys in SCHEMA.values() for k in keys} | set(SCHEMA)
    read = keys_read_by_load()
    # The loop over key purposes reads [keys] through a computed name; SCHEMA has them.
    assert read - schema == set(), "load reads settings the schema would refuse"
    assert (schema - read) - SCHEMA["keys"] == set(), "the schema allows settings nobody reads"
    ref = reference()
    for section, keys in SCHEMA.items():
        for key in keys:
            assert f"`{section}.{key}`" in ref, f"{section}.{key} missing from the reference"
    documented = set(re.findall(r"`([a-z]+)\.([a-z0-9-]+)`", ref))
    assert {(s, k) for s, k in documented if s in SCHEMA} <= {
        (s, k) for s, keys in SCHEMA.items() for k in keys}, "the reference lists a setting " \
        "the code refuses"


def units() -> dict[str, str]:
    """Every unit file shown in the docs: an indented block whose first line is the
    comment `# /etc/systemd/system/NAME`."""
    found: dict[str, str] = {}
    for doc in (DOCS / "operator.md", DOCS / "ssh.md"):
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^(\s+)# /etc/systemd/system/(\S+)$", line)
            if not m:
                continue
            indent = m.group(1)
            block = []
            for follow in lines[i + 1:]:
                if (follow and not follow.startswith(indent)) or re.match(
                        r"^\s+# /etc/systemd/system/", follow):
                    break
                block.append(follow[len(indent):])
            while block and not block[-1].strip():
                block.pop()
            found[m.group(2)] = "\n".join(block) + "\n"
    return found


def test_docs_show_the_units_they_promise() -> None:
    names = set(units())
    assert {"hsmca.service", "hsmca-renew-api.service", "hsmca-renew-api-once.service",
            "hsmca-renew-api-once.timer", "hsmca-ssh-host.service"} <= names
    serve = units()["hsmca.service"]
    assert "Wants=network-online.target" in serve and "User=hsmca" in serve
    operator = (DOCS / "operator.md").read_text()
    assert "useradd --system" in operator and "chown -R hsmca:hsmca /srv/hsmca" in operator
    assert "install -d -m 0700 /srv/hsmca /srv/hsmca/tokens" in operator


def test_units_in_the_docs_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require("systemd-analyze")
    assert units(), "the docs lost their unit files"
    root = tmp_path / "root"
    # An offline root: the distribution's units (targets the docs' units name), the
    # docs' units, and a stand-in for every program their Exec lines start.
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system",
                    symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in units().items():
        (unit_dir / name).write_text(text)
        for program in re.findall(r"^Exec\w*=[-@:+!]*(/\S+)", text, re.M):
            stub = root / program.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    proc = subprocess.run([analyze, "verify", f"--root={root}", "--man=no",
                           *sorted(units())], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0"}, timeout=120)
    findings = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if any(name in ln for name in units())]
    assert proc.returncode == 0 and not findings, proc.stdout + proc.stderr


def test_the_renewal_timer_looks_several_times_within_the_last_third_of_a_life() -> None:
    """`renew --if-due` renews once two thirds of the life have passed: a timer whose
    runs are as far apart as that last third, each late by its random delay, let about
    one renewal in six find the certificate expired (an enrollment trial's simulation
    of the 8-hour timer the docs showed). At least three looks in the last third of a
    default certificate's life."""
    import datetime as dt
    import itertools
    timer = units()["hsmca-renew-api-once.timer"]
    calendar = re.search(r"^OnCalendar=(.+)$", timer, re.M)[1]  # type: ignore[index]
    delay = re.search(r"^RandomizedDelaySec=(\d+)m$", timer, re.M)
    out = subprocess.run([require("systemd-analyze"), "calendar", "--iterations=6",
                          calendar], capture_output=True, text=True, check=True).stdout
    runs = [dt.datetime.strptime(m, "%Y-%m-%d %H:%M:%S")
            for m in re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+)", out)]
    gap = max(b - a for a, b in itertools.pairwise(runs))
    late = dt.timedelta(minutes=int(delay[1]) if delay else 0) + dt.timedelta(minutes=1)
    last_third = dt.timedelta(seconds=Policy().x509_default_ttl_s / 3)
    assert 3 * (gap + late) <= last_third, (calendar, gap, late, last_third)


def test_ssh_user_default_lifetime_is_the_servers_everywhere() -> None:
    from ca.cli import build_parser
    hours = Policy().ssh_user_default_ttl_s // 3600
    assert f"by default for {hours} h" in (DOCS / "ssh.md").read_text()
    assert f"{hours} h SSH user" in (DOCS / "security.md").read_text()
    args = build_parser().parse_args(["ssh", "user", "--url", "https://x", "--cert", "c",
                                      "--key", "k"])
    assert args.ttl is None  # not sent: the server's policy decides


@pytest.mark.parametrize("path", ["README.md", "docs/operator.md", "docs/ssh.md",
                                  "scripts/quickstart"])
def test_docs_hand_tokens_over_in_files(path: str) -> None:
    text = (ROOT / path).read_text()
    assert not re.search(r"--token\s+\"?\$", text), "a token on the command line"
    assert "Bearer $TOKEN" not in text
    assert "--pin " not in text and "--so-pin " not in text


def problem_types_in_code() -> set[str]:
    """Every problem type the daemon's API can answer: the registration authority's
    reasons, the fixed types by status, and each literal type given to Problem() or
    problem() in ca/ (ACME's own answers are RFC 8555's, documented in acme.md)."""
    from ca.policy import Reason
    from ca.server.problems import KINDS
    kinds = {r.type for r in Reason} | set(KINDS.values())
    for path in (ROOT / "ca").rglob("*.py"):
        if "acme" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name in ("Problem", "problem") and len(node.args) > 3 and isinstance(
                    node.args[3], ast.Constant) and isinstance(node.args[3].value, str):
                kinds.add(node.args[3].value)
    # the bootstrap token's refusals, chosen from a table by why (ca/server/x509_routes.py)
    return kinds | {"token-spent", "token-expired"}


def test_every_problem_type_is_in_the_api_doc() -> None:
    """An API client's trial found the types only by reading the source: docs/api.md
    lists each, with its status and whether a retry can help."""
    text = (DOCS / "api.md").read_text()
    table = text[text.index("## Problem types"):text.index("## Sending a request again")]
    listed = set(re.findall(r"`([a-z]+(?:-[a-z]+)*)`", table))
    missing = problem_types_in_code() - listed
    assert not missing, f"problem types not in docs/api.md: {sorted(missing)}"
