"""The Backup Key Vault: OPAQUE over HTTP, an exact guess limit, records sealed at rest.

Where things are:

- service.py: the guess-limit state machine (registration, login start and finish,
  forgiveness); records.py: the record store and the erasure rule it shares with
  accounts.py (tokens), status.py, deletion.py (and the sweep), jwt_migration.py;
  outcomes.py: what they return and raise; opaque_keys.py: the vault's OPAQUE keys;
  realm.py: realm mode (docs/realms.md), the threshold realm's state machine.
- api/: the HTTP API (schemas, routes, errors, middleware); logging.py: the JSON log lines.
- sealing/: sealing at rest (formats, check values, key versions; key files or an HSM);
  key_versions.py, sealed_columns.py, rotation.py: recording, re-sealing and destroying
  key versions.
- schema.py, store.py: the database; config.py: the settings; server.py: a node built
  from them; housekeeping.py, metrics.py, ratelimit.py, retry.py, files.py: the rest.
"""
