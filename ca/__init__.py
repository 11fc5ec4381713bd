# Raised with every release that changes what a user or an auditor sees: the inventory's
# schema, the audit log's lines, the API. daemon.start records it, with the schema.
__version__ = "0.3.8"
