"""`hsmca serve`: a primary process (ca/daemon/primary.py) that writes the audit log,
and worker processes (ca/daemon/worker.py) that serve HTTPS and sign."""

from ca.daemon.primary import main, serve

__all__ = ["main", "serve"]
