"""``backvault import whatsapp`` and ``backvault export whatsapp``: WhatsApp's crypt15
backups in and out (the workflows: ``backvault.app.whatsapp``).

The WhatsApp key is asked for before the repository is opened, and every file is decrypted
and verified before it is (``staged_import``): a wrong key or a damaged file stops the
import with the repository untouched. The import holds a shared lock while it backs up, as
``backup`` does; the export none, as ``restore``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from backvault.app.errors import InvalidArgument
from backvault.app.whatsapp import (
    HEADER_REVEALS,
    export_backup,
    header_info,
    key_from_file,
    key_from_text,
    save_import,
    staged_import,
)
from backvault.cli.context import Context, pass_context
from backvault.cli.failures import EXIT_USAGE, fail
from backvault.cli.repository import Lock, opened
from backvault.cli.ui import human_bytes, progress_bar, shown
from backvault.device.paths import private_temp_dir
from backvault.hardening import secret_variable

KEY_VARIABLE = "BACKVAULT_WHATSAPP_KEY"


def whatsapp_key(key_file: str | None) -> bytes:
    """--key-file, else BACKVAULT_WHATSAPP_KEY, else a hidden prompt on a terminal."""
    if key_file is not None:
        return key_from_file(Path(key_file))
    from_env = secret_variable(KEY_VARIABLE)
    if from_env:
        return key_from_text(from_env)
    if not sys.stdin.isatty():
        fail(
            f"give the WhatsApp backup's 64-digit key in {KEY_VARIABLE} or --key-file "
            "(encrypted_backup.key), or run interactively",
            EXIT_USAGE,
        )
    return key_from_text(str(click.prompt("WhatsApp 64-digit key", hide_input=True)))


@click.group("import")
def import_group() -> None:
    """Bring another app's backup into the repository."""


@import_group.command("whatsapp")
@click.argument("path", type=click.Path())
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False),
    help="encrypted_backup.key (a rooted phone's key file) or a file of the 64 hex digits.",
)
@click.option("--info", is_flag=True, help="Show the files' plaintext headers; needs no key.")
@pass_context
def import_whatsapp(ctx: Context, path: str, key_file: str | None, info: bool) -> None:
    """Import a WhatsApp backup (PATH: the WhatsApp folder, or one *.crypt15 file) as a
    snapshot tagged 'whatsapp'. The key: --key-file, BACKVAULT_WHATSAPP_KEY or a prompt."""
    if info:
        show_info(ctx, Path(path))
        return
    root_key = whatsapp_key(key_file)
    temp_root = private_temp_dir()
    # Every file decrypted and verified first: only then is the repository opened.
    with (
        staged_import(Path(path), root_key, temp_root) as staged,
        opened(ctx, Lock.SHARED) as repo,
        progress_bar(ctx, "import") as reporter,
    ):
        result = save_import(repo, staged, temp_dir=temp_root, progress=reporter)
    ctx.emit_json(result.to_json())
    # Names and header text are anyone's (a header is not authenticated): every line shows
    # them with control characters and line breaks escaped.
    versions = ", ".join(shown(v) for v in staged.app_versions) or "unknown"
    ctx.out(
        f"snapshot {result.snapshot_id[:8]} saved: {len(staged.files)} WhatsApp files "
        f"decrypted and verified (app {versions}), {staged.other_files} other files; "
        f"{human_bytes(result.backup.bytes_added)} new data "
        f"({human_bytes(result.backup.bytes_stored)} stored)"
    )
    for imported in staged.files:
        ctx.out(
            f"  {shown(imported.source)} -> {shown(imported.stored_as)} "
            f"({human_bytes(imported.bytes)})"
        )
    for skipped, reason in staged.skipped:
        ctx.warn(f"warning: skipped {shown(skipped)}: {reason}")
    for odd in staged.untagged:
        ctx.warn(
            f"warning: {shown(odd.source)}'s header gives the app version "
            f"'{shown(str(odd.app_version))}', not a plain version number: the snapshot is not "
            "tagged with it"
        )


def show_info(ctx: Context, path: Path) -> None:
    found = header_info(path)
    ctx.emit_json(
        {"files": [vars(f) for f in found], "note": HEADER_REVEALS},
    )
    for item in found:
        if item.header is None:
            ctx.error_line(str(item.problem))
            continue
        header = item.header
        features = header["features"]
        assert isinstance(features, dict)
        on = sorted(name for name, value in features.items() if value)
        ctx.out(f"{shown(item.file)}:")
        ctx.out(f"  format          {header['format']}")
        ctx.out(f"  key type        {header['key_type']} ({header['key_type_name']})")
        ctx.out(f"  app version     {shown(str(header['app_version']))}")
        ctx.out(f"  phone number    …{shown(str(header['jid_suffix']))} (its last two digits)")
        ctx.out(f"  backup version  {header['backup_version']}")
        ctx.out(f"  header          {header['header_bytes']} bytes, IV {header['iv']}")
        ctx.out(f"  features        {len(on)} of {len(features)} set: {', '.join(on) or '-'}")
        if header["unknown_fields"]:
            ctx.out(f"  other fields    {header['unknown_fields']}")
    ctx.out("")
    ctx.out(HEADER_REVEALS)
    if any(item.header is None for item in found):
        raise InvalidArgument(f"{sum(i.header is None for i in found)} files could not be read")


@click.group("export")
def export_group() -> None:
    """Write a snapshot out in another app's backup format."""


@export_group.command("whatsapp")
@click.argument("snapshot")
@click.option("-t", "--target", required=True, type=click.Path(), help="A new or empty folder.")
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False),
    help="encrypted_backup.key (a rooted phone's key file) or a file of the 64 hex digits.",
)
@pass_context
def export_whatsapp(ctx: Context, snapshot: str, target: str, key_file: str | None) -> None:
    """Write SNAPSHOT (an ID, or 'latest' import) into TARGET as WhatsApp crypt15 files
    under the same 64-digit key, in the layout it was imported from."""
    root_key = whatsapp_key(key_file)
    with opened(ctx, Lock.NONE) as repo:
        result = export_backup(repo, snapshot, Path(target), root_key, private_temp_dir())
    ctx.emit_json(result.to_json())
    ctx.out(
        f"snapshot {result.snapshot_id[:8]} written into {shown(target)}: "
        f"{len(result.encrypted)} "
        f"crypt15 files, {result.copied} other files"
    )
