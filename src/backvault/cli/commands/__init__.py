"""The commands, one module per area. A module is imported only when one of its commands
runs (or ``--help`` lists them all): a daily backup does not load the code of the vault, the
password or the key commands. A new command is one line in ``COMMANDS``."""

from __future__ import annotations

import importlib

import click

# Each top-level command: the module (in this package) that defines it, and its name there.
COMMANDS = {
    "init": ("repo", "init"),
    "config": ("repo", "config"),
    "forget-device": ("repo", "forget_device"),
    "demo": ("repo", "demo"),
    "key": ("keys", "key"),
    "password": ("password", "password"),
    "backup": ("data", "backup"),
    "snapshots": ("data", "snapshots"),
    "ls": ("data", "ls_command"),
    "restore": ("data", "restore"),
    "check": ("maintenance", "check"),
    "forget": ("maintenance", "forget"),
    "prune": ("maintenance", "prune"),
    "repair": ("maintenance", "repair"),
    "unlock": ("maintenance", "unlock"),
    "schedule": ("schedule", "schedule"),
    "vault": ("vault", "vault"),
    "import": ("whatsapp", "import_group"),
    "export": ("whatsapp", "export_group"),
}


class LazyGroup(click.Group):
    """A group whose commands are loaded from their module when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module_name, attribute = COMMANDS[cmd_name]
            module = importlib.import_module(f"{__name__}.{module_name}")
            command = getattr(module, attribute)
            if not isinstance(command, click.Command) or command.name != cmd_name:
                raise RuntimeError(f"COMMANDS[{cmd_name!r}] names {module_name}.{attribute}")
            self.add_command(command)
        return self.commands.get(cmd_name)
