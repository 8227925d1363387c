"""The Backup Key Vault: OPAQUE over HTTP, an exact guess limit, records sealed at rest."""
