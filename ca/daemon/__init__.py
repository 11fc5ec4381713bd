"""`hsmca serve`: a primary process (ca/daemon/primary.py) that writes the audit log,
and worker processes (ca/daemon/worker.py) that serve HTTPS and sign.

Nothing is imported here: a worker imports only what it runs, not the primary's
checkpointer, witnesses and supervisor (half a second of every worker's start)."""
