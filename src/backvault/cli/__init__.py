"""The command line: parsing, prompts, output and exit codes. Workflows live in ``app``."""

from backvault.cli.main import main, run

__all__ = ["main", "run"]
