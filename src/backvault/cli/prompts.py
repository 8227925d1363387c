"""Asking for secrets: the 64-digit key, passwords, the vault token. Scripts give them in
BACKVAULT_* variables (read once through hardening.secret_variable, which also keeps them
from child processes); people type them at hidden prompts."""

from __future__ import annotations

import sys

import click

from backvault.cli.context import Context
from backvault.cli.failures import EXIT_USAGE, fail
from backvault.hardening import secret_variable


def ask_key() -> str:
    return str(click.prompt("64-digit key (or repository password)", hide_input=True))


def key_from_env() -> str | None:
    return secret_variable("BACKVAULT_KEY")


def key_from_env_or_prompt() -> str | None:
    """BACKVAULT_KEY, else a hidden prompt on a terminal, else None."""
    return key_from_env() or (ask_key() if sys.stdin.isatty() else None)


def read_password(prompt: str = "Password") -> str | None:
    """BACKVAULT_PASSWORD (for scripts), else a hidden prompt on a terminal, else None."""
    from_env = secret_variable("BACKVAULT_PASSWORD")
    if from_env:
        return from_env
    if sys.stdin.isatty():
        return str(click.prompt(prompt, hide_input=True, default="", show_default=False))
    return None


def read_new_password(ctx: Context, env_name: str = "BACKVAULT_PASSWORD") -> str:
    """A new password: asked twice on a terminal, with strength feedback; weak ones are
    refused (the vault allows only a few guesses, so the password must not be among them)."""
    # Here, not at the top: every command loads this module, few set a password, and the
    # password slot code brings OPAQUE with it.
    from backvault.vaultclient.slots import WeakPassword, check_strength

    from_env = secret_variable(env_name)
    if from_env:
        try:
            ctx.warn(check_strength(from_env))
        except WeakPassword as exc:
            fail(f"{env_name}: {exc}", EXIT_USAGE)
        return from_env
    if not sys.stdin.isatty():
        fail(f"give the new password in {env_name} or run interactively", EXIT_USAGE)
    while True:
        first = str(click.prompt("New password", hide_input=True))
        try:
            ctx.warn(check_strength(first))
        except WeakPassword as exc:
            ctx.warn(f"{exc}; try another")
            continue
        if str(click.prompt("Repeat the password", hide_input=True)) == first:
            return first
        ctx.warn("the two passwords differ; try again")


def read_token(value: str | None) -> str:
    """The vault token from a hidden prompt (no VALUE) or standard input (VALUE "-")."""
    if value not in (None, "-"):
        fail(
            "refusing to take the vault token from the command line, where other users and "
            "your shell history can read it: run `backvault config set vault.token` and "
            "paste it at the prompt, or pipe it into `backvault config set vault.token -`",
            EXIT_USAGE,
        )
    if value == "-":
        token = sys.stdin.readline().strip()
    elif sys.stdin.isatty():
        token = str(click.prompt("Vault token", hide_input=True)).strip()
    else:
        fail(
            "give the vault token on standard input: `… | backvault config set vault.token -`",
            EXIT_USAGE,
        )
    if not token or any(c.isspace() for c in token):
        fail(
            "that is not a vault token (empty, or with spaces inside); nothing was stored",
            EXIT_USAGE,
        )
    return token
