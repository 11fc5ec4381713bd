"""ACME (RFC 8555) for services: certbot, lego, Caddy and cert-manager get and renew
certificates from hsmca (docs/acme.md).

The routes (server.py) parse and answer; every order, finalization and revocation is
decided by the registration authority (ca/ra.py) and every certificate is signed and
recorded by ca/issuance like any other. JWS are parsed and verified with josepy and
the `acme` package's message types (jws.py), in Boulder's order of checks; nonces are
valid on every worker (nonces.py); challenges are validated here (validation.py).
"""
