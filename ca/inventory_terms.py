"""The inventory's search words (`hsmca cert list --status`, `GET /v1/inventory/...`),
apart from the store's records so that building the command line's parser does not
load the store."""

CERT_STATUSES = ("valid", "expiring", "expired", "revoked")
CERT_SORTS = ("issued", "expires", "serial", "subject", "role")
SSH_SORTS = ("issued", "expires", "serial", "key_id")
