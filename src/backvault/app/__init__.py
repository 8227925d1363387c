"""Workflows the CLI (or any other front end) runs: no click, no rich, typed errors."""
