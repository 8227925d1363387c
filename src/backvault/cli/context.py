"""The state every command shares (the global options, the consoles, the settings they
resolve to) and ``pass_context``, which hands it to a command and lets the global options
follow the command name too."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from backvault.cli.failures import EXIT_USAGE, fail
from backvault.cli.ui import shown
from backvault.device.settings import Settings, SettingsError, VaultSettings

if TYPE_CHECKING:
    from rich.console import Console


@functools.cache
def stderr_console() -> Console:
    """Standard error through rich (one, made when first used: rich is ~7 MiB that a quiet
    run that goes well never needs)."""
    from rich.console import Console

    return Console(stderr=True)


@dataclass
class Context:
    repo: str | None
    json: bool
    quiet: bool
    vault_url: str | None = None
    account: str | None = None
    insecure_vault: bool = False
    # The vault this command talks to, once it asked for one: how a vault error that
    # reaches the exit-code table is explained.
    vault: VaultSettings | None = None

    @functools.cached_property
    def console(self) -> Console:
        """Standard output, through rich, made when first used (a quiet run needs none)."""
        from rich.console import Console

        return Console()

    @functools.cached_property
    def errors(self) -> Console:
        """Standard error, through rich, made when first used."""
        return stderr_console()

    def settings(self) -> Settings:
        try:
            return Settings.resolve(
                {
                    "repository": self.repo,
                    "vault.url": self.vault_url,
                    "vault.account": self.account,
                },
                allow_plain_http=self.insecure_vault,
            )
        except SettingsError as exc:
            fail(str(exc), EXIT_USAGE)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.errors.print(
                shown(message, keep_newlines=True), highlight=False, markup=False, soft_wrap=True
            )

    def out(self, message: str = "") -> None:
        if not self.quiet and not self.json:
            self.console.print(
                shown(message, keep_newlines=True), highlight=False, markup=False, soft_wrap=True
            )

    def show(self, renderable: Any) -> None:
        """A rich renderable (a table) on stdout, unless --quiet or --json."""
        if not self.quiet and not self.json:
            self.console.print(renderable)

    def error_line(self, message: str) -> None:
        """A line on stderr even with --quiet (damage, errors)."""
        self.errors.print(shown(message), highlight=False, markup=False, soft_wrap=True)

    def emit_json(self, doc: Any) -> None:
        if self.json:
            click.echo(json.dumps(doc, indent=2))

    def require_repo(self) -> str:
        repository = self.settings().repository
        if not repository:
            fail(
                "no repository given: pass --repo PATH, set BACKVAULT_REPO, or "
                "`backvault config set repository PATH`",
                EXIT_USAGE,
            )
        return repository

    def require_vault(self) -> VaultSettings:
        """The vault, complete and safe to use (a usage error otherwise)."""
        try:
            self.vault = self.settings().require_vault()
        except SettingsError as exc:
            fail(str(exc), EXIT_USAGE)
        return self.vault

    def optional_vault(self) -> VaultSettings | None:
        """The vault when one is configured (opening a repository may use it)."""
        vault = self.settings().vault
        if vault is not None:
            self.vault = vault
        return vault


_pass_context_object = click.make_pass_decorator(Context)
F = TypeVar("F", bound=Callable[..., Any])


def _set_field(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(click_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value not in (None, False):
            setattr(click_ctx.find_object(Context), name, value)

    return callback


INSECURE_VAULT_HELP = (
    "Allow a plain http:// vault URL that is not on this machine (the token and the login "
    "cross the network unencrypted)."
)


# The options every command accepts, before its name or after it (`backvault backup --json
# PATH`, as restic does): declarations, the Context field they set, flag or not, help.
GLOBAL_OPTIONS: list[tuple[tuple[str, ...], str, bool, str]] = [
    (("-r", "--repo"), "repo", False, "Repository location (or BACKVAULT_REPO)."),
    (("--json", "as_json"), "json", True, "Machine-readable output on stdout."),
    (("-q", "--quiet"), "quiet", True, "Print only errors."),
    (
        ("--vault", "vault_url"),
        "vault_url",
        False,
        "Vault URL (or BACKVAULT_VAULT_URL, or config).",
    ),
    (("--account",), "account", False, "Vault account (or BACKVAULT_ACCOUNT, or config)."),
    (("--insecure-vault",), "insecure_vault", True, INSECURE_VAULT_HELP),
]


def global_options(*, on_group: bool = False) -> Callable[[F], F]:
    """A decorator adding the global options: on the group as its parameters (it makes the
    Context from them), on a command as callbacks that set the Context's fields."""

    def add(command: F) -> F:
        for declarations, field, is_flag, help_text in reversed(GLOBAL_OPTIONS):
            if on_group:
                option = click.option(*declarations, is_flag=is_flag, help=help_text)
            else:
                option = click.option(
                    *declarations,
                    is_flag=is_flag,
                    help=help_text,
                    expose_value=False,
                    callback=_set_field(field),
                )
            command = option(command)
        return command

    return add


def pass_context(command: F) -> F:
    """Pass the Context, and accept the global options after the command name too."""
    return global_options()(_pass_context_object(command))  # type: ignore[return-value]
