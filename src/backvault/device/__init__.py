"""What this device keeps: the client's settings (settings, environment), its folders
(paths), its small secrets (secretstore: the key cache's and the vault token's), the key
cache (keycache), what it knows of its vault records (vault_state), the daily schedule
(schedule). Files go through hardening.private_files."""
