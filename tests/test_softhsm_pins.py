"""SoftHSM token set-up keeps the PINs off every command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hsm.softhsm import module_path
from tests.conftest import hsmca

# Run in a child interpreter: an audit hook cannot be removed once added.
CHILD = """
import json, sys
from pathlib import Path
argvs = []
def hook(event, args):
    if event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.system"):
        argvs.append([str(a) for a in (args[1] if event == "subprocess.Popen" else args)])
sys.addaudithook(hook)
from hsm.softhsm import init_token, write_config
conf = write_config(Path(sys.argv[1]))
init_token(conf, "argvtest", Path(sys.argv[1]) / "pin")
print(json.dumps([conf.as_posix(), argvs]))
"""


def test_init_token_passes_no_pin_in_argv(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=True)
    conf, argvs = json.loads(proc.stdout)
    pin = (tmp_path / "pin").read_text().strip()
    assert any("--init-token" in argv for argv in argvs), argvs
    assert all(pin not in " ".join(argv) for argv in argvs)
    assert all("--pin" not in argv and "--so-pin" not in argv for argv in argvs)
    # The PIN in the file is the token's: `hsmca init` logs in with it.
    init = hsmca("init", "--state-dir", tmp_path / "ca", "--module", module_path(),
                 "--token", "argvtest", "--pin-file", tmp_path / "pin",
                 env={**os.environ, "SOFTHSM2_CONF": conf})
    assert "created a CA" in init.stdout and pin not in init.stdout + init.stderr
