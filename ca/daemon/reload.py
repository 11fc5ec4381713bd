"""SIGHUP: the daemon takes a new `[policy]` without a restart.

A name added to the deny list, a shorter maximum lifetime or a principal taken away
applies to the next request (SPEC 11), so an operator should not have to drop every
connection to say so. The primary reads the config file again, strictly, as at start:
- a file that does not load changes nothing, and the error says why (the policy in
  force stays; the daemon never runs on half a file);
- a changed `[policy]` is recorded first (`policy.reload`, with the config's digest
  and each setting that changed), then sent to every worker (ca/daemon/control.py);
  a reload the audit log cannot record is not applied;
- other settings (the listen address, keys, the store ...) need a restart, and the
  reload names them, so an operator is not left believing they took effect.
The CA's reserved names follow `[server]`, which only a restart changes, so they stay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any, Protocol

import structlog

from ca.config import Config, ConfigError, load
from ca.daemon.control import PolicyFeed
from ca.errors import CLIError
from ca.fileutil import read_trusted
from ca.policy import Policy, settings

log = structlog.get_logger("hsmca.reload")
WORKER_WAIT_S = 5.0


class Recorder(Protocol):
    """What records the reload: the audit log's `append`."""

    async def append(self, event: str, **fields: Any) -> Any: ...


def changed_settings(old: Policy, new: Policy) -> dict[str, Any]:
    """The policy settings that differ, by their names in the config file."""
    before = settings(old)
    return {name: value for name, value in settings(new).items() if before[name] != value}


def needs_restart(old: Config, new: Config) -> list[str]:
    """The settings outside [policy] that differ, as the file names them ("[acme]
    orders-per-hour"): they take effect at the next start."""
    fields = [f.name for f in dataclasses.fields(Config)
              if f.compare and f.name != "policy"  # `written` is bookkeeping
              and getattr(old, f.name) != getattr(new, f.name)]
    if not fields:  # the file changed in words only (a default written out, a comment)
        return []
    written = sorted(k for k in old.written.keys() | new.written.keys()
                     if not k.startswith("[policy]")
                     and old.written.get(k, _ABSENT) != new.written.get(k, _ABSENT))
    return written or [f.replace("_", "-") for f in fields]


_ABSENT = object()


def say_policy_gaps(config: Config, policy: Policy) -> None:
    """What the policy allows and the rest of the config makes impossible, said when it
    is put in force: wildcards were refused at each ACME order instead (an ACME trial)."""
    if config.acme is not None and policy.allow_wildcards and config.acme.resolver is None:
        log.warning("[policy] allow-wildcards is on, but ACME orders for wildcard names are "
                    "refused: they need dns-01 validation, which needs [acme] resolver "
                    "(tokens may still be made for wildcards)")


async def reload_policy(config: Config, policies: PolicyFeed, audit: Recorder) -> bool:
    """Read the config again and put its [policy] in force; whether the policy changed."""
    try:
        # As the start does: a policy others could have written is not put in force (a
        # fault trial's reload took `allow` from a file made 0666).
        # Judged, hashed and parsed from one read of one open file.
        raw = await asyncio.to_thread(read_trusted, config.path)
        fresh = await asyncio.to_thread(load, config.path, raw)
        if config.node:  # named as the start named it (a review: from the host, every
            # reload said a setting "node-from-host" needed a restart)
            fresh = fresh.for_node(config.node, config.node_from_host)
    except (ConfigError, OSError, CLIError) as exc:
        log.error("reload refused: the policy in force is unchanged", error=str(exc))
        return False
    later = needs_restart(config, fresh)
    if later:
        log.warning("reload: these settings changed but take effect only at the next start "
                    "(`systemctl restart hsmca`)", settings=later)
    policy = dataclasses.replace(fresh.policy, reserved=policies.current.reserved)
    changed = changed_settings(policies.current, policy)
    if not changed:
        log.info("reloaded: the policy is unchanged")
        return False
    try:
        await audit.append("policy.reload", config_sha256=hashlib.sha256(raw).hexdigest(),
                           changed=changed)
    except Exception as exc:  # the log is away: a decision rule it does not show is not made
        log.error("reload not applied: the audit log cannot record it; send SIGHUP again "
                  "once /health is ok", error=str(exc))
        return False
    lagging = await policies.publish(policy, WORKER_WAIT_S)
    if lagging:  # busy or stuck: it takes it when it reads its channel, or dies
        log.warning("reloaded, but not every worker has taken the new policy yet",
                    workers_lagging=lagging, changed=sorted(changed))
    else:
        log.info("reloaded: the new policy is in force in every process",
                 changed=sorted(changed))
    say_policy_gaps(config, policy)  # [acme] as it runs: it changes at a restart
    return True
