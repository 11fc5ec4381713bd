"""The issuing side: the signing pipeline, the issuers, their profiles."""
