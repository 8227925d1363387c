"""backvault: end-to-end encrypted backups for chat histories in standard restic repositories."""

__version__ = "0.1.0"
