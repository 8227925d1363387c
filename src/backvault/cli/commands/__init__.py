"""The commands, one module per area; each module's ``register`` adds its commands to the
``backvault`` group."""

from __future__ import annotations

import click

from backvault.cli.commands import data, keys, maintenance, password, repo, schedule, vault


def register_all(group: click.Group) -> None:
    for module in (repo, keys, password, data, maintenance, schedule, vault):
        module.register(group)
