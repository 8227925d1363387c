"""What the command line shows: text made safe for a terminal, table cells, progress bars,
times and sizes for people, the 64-digit key in groups."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from backvault.crypto import recovery_key
from backvault.engine.progress import human_bytes
from backvault.storage import without_password

# rich is imported where it is used: a quiet run (a scheduled backup) shows nothing with
# it, and it is ~7 MiB of a process that holds a database's index too.
if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table
    from rich.text import Text

    from backvault.cli.context import Context

__all__ = ["cell", "human_bytes", "progress_bar", "recovery_key_block", "shown", "table", "when"]

# What a terminal would act on rather than show: C0 and C1 controls (escape sequences,
# OSC 52 clipboard writes, carriage returns), bidirectional overrides, and the lone
# surrogates that stand for undecodable bytes in file names.
_UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def shown(text: str, keep_newlines: bool = False) -> str:
    """Text that came from a snapshot, the storage or the vault, safe to print: every
    character a terminal would act on becomes a visible escape (\\x1b, \\u202e)."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    # A repository URL may carry a password (rest:https://user:secret@host/).
    return _UNSHOWABLE.sub(escape, without_password(text))


def cell(text: str) -> Text:
    """A table cell that is shown as it is (rich would read [..] in a str as markup)."""
    from rich.text import Text

    return Text(shown(text, keep_newlines=True))


def table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> Table:
    """A rich table whose every cell is shown as it is."""
    from rich.table import Table

    result = Table(*headers)
    for row in rows:
        result.add_row(*(cell(value) for value in row))
    return result


def when(timestamp: str) -> str:
    """An RFC 3339 time as a person reads it: 2026-01-02 03:04:05."""
    return timestamp[:19].replace("T", " ")


def recovery_key_block(secret: bytes) -> str:
    groups = recovery_key.display(secret).split(" ")
    rows = [" ".join(groups[i : i + 4]) for i in range(0, len(groups), 4)]
    return "\n".join(f"    {row}" for row in rows)


@contextmanager
def progress_bar(ctx: Context, description: str) -> Iterator[Any]:
    """A rich progress bar on stderr (bytes, bytes/s, ETA), only on a terminal."""
    enabled = not ctx.quiet and not ctx.json and ctx.errors.is_terminal

    class Reporter:
        def __init__(self, bar: Progress | None) -> None:
            self.bar = bar
            self.task = bar.add_task(description, total=None) if bar else None

        def start(self, total_bytes: int | None, description: str) -> None:
            if self.bar is not None and self.task is not None:
                self.bar.update(self.task, total=total_bytes, description=description)

        def advance(self, nbytes: int) -> None:
            if self.bar is not None and self.task is not None:
                self.bar.advance(self.task, nbytes)

        def note(self, message: str) -> None:
            if not ctx.quiet and not ctx.json:
                ctx.warn(message)

        def finish(self) -> None:
            pass

    if not enabled:
        yield Reporter(None)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=ctx.errors,
        transient=True,
    )
    with bar:
        yield Reporter(bar)
