"""Consistent copies of the databases a backup stores, made on a thread of their own.

Copies of databases are the chat history in clear: they go to a folder of this run's
own, inside a folder only this user may enter (the caller's ``temp_root``), and it goes
away on every way out (an error, Ctrl-C, SIGTERM, which the command line turns into an
exception); a run killed outright leaves it for the next run to remove.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from backvault.source.sqlite import DatabaseImage, consistent_image

T = TypeVar("T")


class DatabaseCopy(NamedTuple):
    stack: contextlib.ExitStack[bool | None]  # closing it removes the copy (or ends the hold)
    image: DatabaseImage  # a copy, or the database itself held in a read transaction
    state: list[Any]  # the database's state, taken before the copy was made


class DatabaseCopier:
    """One thread that copies databases (and stores them, through ``submit``); copies
    started early, while the index loads, wait in ``early`` for the walk to reach them."""

    def __init__(self, temp_root: Path) -> None:
        # ``in_place(size)``: whether a database of that size may be read where it is,
        # under a read transaction (only if its readers are other processes: see
        # ``source.sqlite``). The caller sets it before the first copy.
        self.in_place: Callable[[int], bool] = lambda _size: False
        remove_copies_of_dead_runs(temp_root)
        self.folder = Path(tempfile.mkdtemp(prefix=f"backup-{os.getpid()}-", dir=temp_root))
        self.cancelled = threading.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="backvault-sqlite")
        self._early: dict[str, Future[DatabaseCopy]] = {}

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the copier's thread."""
        return self._thread.submit(fn, *args)

    def start_early(self, path: str, state: list[Any]) -> None:
        """Start copying ``path`` now; ``take`` gives the copy."""
        self._early[path] = self._thread.submit(self.copy, path, state)

    def take(self, path: str, state: list[Any]) -> DatabaseCopy:
        """The copy started early, or a new one (on the calling thread)."""
        early = self._early.pop(path, None)
        return early.result() if early is not None else self.copy(path, state)

    def copy(self, path: str, state: list[Any]) -> DatabaseCopy:
        """A consistent copy of ``path``; ``state`` was taken before it was made (so that
        a change during the copy is seen by the next backup)."""
        stack = contextlib.ExitStack()
        try:
            image = stack.enter_context(
                consistent_image(path, self.folder, self.cancelled, self.in_place(state[0]))
            )
        except BaseException:
            stack.close()
            raise
        return DatabaseCopy(stack, image, state)

    def shutdown(self, cancel: bool = False) -> None:
        """Wait for the thread (or, with ``cancel``, stop the copies under way)."""
        if cancel:
            self.cancelled.set()
        self._thread.shutdown(cancel_futures=cancel)

    def close(self) -> None:
        """Stop, and remove every copy (those no one used, after an error, too)."""
        self.cancelled.set()
        self._thread.shutdown(cancel_futures=True)
        for future in self._early.values():
            if not future.cancelled() and future.exception() is None:
                future.result().stack.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def remove_copies_of_dead_runs(root: Path) -> None:
    """Remove the copy folders of runs whose process is gone (killed with SIGKILL, or the
    machine lost power): nothing else would."""
    for folder in root.glob("backup-*-*"):
        try:
            pid = int(folder.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or a live process of another user
