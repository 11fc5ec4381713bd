"""`hsmca init`."""

from __future__ import annotations

import argparse
import asyncio
import os

from ca.init import InitOptions, run_init


def run(args: argparse.Namespace) -> int:
    softhsm_conf = os.environ.get("SOFTHSM2_CONF")
    opts = InitOptions(state_dir=args.state_dir, module=args.module, token=args.token,
                       pin_file=args.pin_file, key_type=args.key_type, dns_name=args.dns_name,
                       softhsm_conf=os.path.abspath(softhsm_conf) if softhsm_conf else None)
    written = asyncio.run(run_init(opts))
    state = args.state_dir.resolve()
    print(f"created a CA in {state} with keys generated inside token {args.token!r}:")
    for path in written:
        print(f"  {path.relative_to(state)}")
    print(f"next: hsmca serve --config {state / 'hsmca.toml'}")
    return 0
