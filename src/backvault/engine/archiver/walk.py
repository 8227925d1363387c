"""The file-system side of a backup: what a path's entry becomes in a tree (``Node``),
the layout of the virtual tree from / down to the targets, and their total size."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from typing import Any

from backvault.repo import format as fmt
from backvault.repo.format import Node
from backvault.repo.timefmt import format_ns
from backvault.source.sqlite import walk_files


class UserNames:
    """User and group names by id, looked up once each."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = ""
        return self._users[uid]

    def group(self, gid: int) -> str:
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = ""
        return self._groups[gid]


def node_type(mode: int) -> str:
    """restic's name for the type of a file with this mode."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "chardev"
    if stat.S_ISBLK(mode):
        return "dev"
    return "irregular"


def node_from_stat(name: str, st: os.stat_result, names: UserNames) -> Node:
    """The tree entry of a file with this stat (content, subtree or link target to come)."""
    kind = node_type(st.st_mode)
    return Node(
        name=name,
        type=kind,
        mode=fmt.go_mode_from_unix(st.st_mode),
        mtime=format_ns(st.st_mtime_ns),
        atime=format_ns(st.st_atime_ns),
        ctime=format_ns(st.st_ctime_ns),
        uid=st.st_uid,
        gid=st.st_gid,
        user=names.user(st.st_uid),
        group=names.group(st.st_gid),
        inode=st.st_ino,
        device_id=st.st_dev,
        size=st.st_size if kind == "file" else 0,
        links=st.st_nlink if kind != "dir" else 0,
        content=[] if kind == "file" else None,
    )


def target_layout(targets: list[str]) -> dict[str, Any]:
    """The virtual tree from / down to each target: nested dicts by name, ``None`` where a
    target is (archive all of it). A target under another target is covered by it."""
    layout: dict[str, Any] = {}
    for target in targets:
        parts = [p for p in target.split(os.sep) if p]
        cursor = layout
        for part in parts[:-1]:
            child = cursor.setdefault(part, {})
            if child is None:  # an ancestor is itself a target: it covers this one
                break
            cursor = child
        else:
            cursor[parts[-1]] = None
    return layout


def total_size(targets: list[str]) -> int:
    """The bytes of the regular files under the targets (for a percentage and time left)."""
    total = 0
    for target in targets:
        if os.path.isfile(target) and not os.path.islink(target):
            total += os.lstat(target).st_size
            continue
        for directory, files, _links in walk_files(target):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(directory, name))
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
    return total
