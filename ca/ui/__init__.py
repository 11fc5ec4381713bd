"""`hsmca ui`: a small, local, read-only web view of a CA for its auditors and operators.

It runs on the auditor's own machine and talks to the daemon with the auditor's client
certificate (browsers never hold it). Before it shows anything it follows the audit
log with the auditor's saved state, with the same code as `hsmca audit verify --url`
(`ca.audit.remote.verify_remote`), and every page says what that found. A line of the
log is shown as verified only when the page checked it against the tree the auditor
verified: an inclusion proof from the daemon, checked here (`ca.audit.merkle`), or the
hash chain down from such a line (`ca.ui.proofs`).

Modules: `ca_api` (the daemon's API), `follow` (the verdict), `proofs` (lines checked
against it), `certs` (a certificate's chain, CRL, OCSP and audit lines), `metrics`,
`charts` (server-rendered SVG), `pages` (the routes), `app` (the aiohttp application:
headers, assets).
"""
