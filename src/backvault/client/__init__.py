"""Backup and restore orchestration, key slots, the device key cache."""
