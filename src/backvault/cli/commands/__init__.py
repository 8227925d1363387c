"""The commands, one module per area; each module's ``register`` adds its commands to the
``backvault`` group. A module is imported only when one of its commands runs (or ``--help``
lists them all): a daily backup does not load the code of the vault, the password or the
key commands."""

from __future__ import annotations

import importlib

import click

# Each top-level command, and the module (in this package) that defines it.
MODULE_OF = {
    "init": "repo",
    "config": "repo",
    "forget-device": "repo",
    "demo": "repo",
    "key": "keys",
    "password": "password",
    "backup": "data",
    "snapshots": "data",
    "ls": "data",
    "restore": "data",
    "check": "maintenance",
    "forget": "maintenance",
    "prune": "maintenance",
    "repair": "maintenance",
    "unlock": "maintenance",
    "schedule": "schedule",
    "vault": "vault",
}


class LazyGroup(click.Group):
    """A group whose commands are registered by their module when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(MODULE_OF)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in MODULE_OF:
            module = importlib.import_module(f"{__name__}.{MODULE_OF[cmd_name]}")
            module.register(self)
        return self.commands.get(cmd_name)
