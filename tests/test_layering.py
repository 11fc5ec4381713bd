"""The layering the design promises (docs/design.md): hsm/ is a plain executor that
knows nothing of ca/; the decisions load no HSM code; issuers and the audit log know
nothing of the HTTP server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(package: str) -> dict[str, set[str]]:
    """Every module each file of `package` imports (absolute names), at any depth."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("hsm", "ca"),
    ("ca.issuance", "ca.server"),
    ("ca.audit", "ca.server"),
    ("ca.store", "ca.server"),
])
def test_no_upward_imports(package: str, forbidden: str) -> None:
    bad = {f: sorted(m for m in mods if m == forbidden or m.startswith(forbidden + "."))
           for f, mods in imports_of(package).items()}
    assert not {f: m for f, m in bad.items() if m}, f"{package} imports {forbidden}"


@pytest.mark.parametrize("module", ["ca.ra", "ca.policy"])
def test_the_decisions_load_no_hsm_code(module: str) -> None:
    probe = (f"import sys, {module}; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('pkcs11', '_pkcs11', 'hsm')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "[]", f"importing {module} loads {out}"
