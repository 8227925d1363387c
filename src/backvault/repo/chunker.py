"""Splitting file contents into blobs.

- Ordinary files: content-defined chunking with FastCDC 2020 (``pyfastcdc``, Cython),
  512 KiB to 8 MiB, about 1 MiB on average like restic. The gear table is keyed with a
  value derived from the master key, so chunk boundaries reveal nothing about content to
  someone who sees only blob sizes (restic keys its Rabin polynomial the same way).
- SQLite databases: fixed runs of whole pages (8 KiB unless the repository's config says
  otherwise: ``Config.sqlite_chunk_bytes``; a multiple of the database's page size).
  SQLite changes a database in place, page by page, and appends new pages at the end, so
  with page-aligned chunks a day of new messages touches only the chunks holding the pages
  it changed; content-defined cuts would straddle pages and gain nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import os
from collections.abc import Iterator

from pyfastcdc import FastCDC

from backvault.crypto.aead import Key

MIN_SIZE = 512 * 1024
AVG_SIZE = 1024 * 1024
MAX_SIZE = 8 * 1024 * 1024
READ_SIZE = 8 * 1024 * 1024


def chunker_seed(master: Key) -> int:
    digest = hmac.new(
        master.mac_k + master.mac_r, b"backvault chunker gear seed v1", hashlib.sha256
    )
    # 63 bits: pyfastcdc shifts the seed left by one into a uint64.
    return (int.from_bytes(digest.digest()[:8], "little") >> 1) or 1


class ContentChunker:
    def __init__(
        self,
        seed: int,
        min_size: int = MIN_SIZE,
        avg_size: int = AVG_SIZE,
        max_size: int = MAX_SIZE,
    ) -> None:
        # pyfastcdc's average is avg_size + min_size (cut-point skipping): compensate.
        self._cdc = FastCDC(
            avg_size - min_size if avg_size - min_size >= min_size else avg_size,
            min_size=min_size,
            max_size=max_size,
            normalized_chunking=1,
            seed=seed,
        )

    def cut(self, data: bytes | memoryview) -> list[memoryview]:
        """The chunks of data held in memory, as views (no copies). Buffers, not streams:
        pyfastcdc's stream reader is about ten times slower than cutting a buffer."""
        view = memoryview(data)
        return [view[c.offset : c.offset + c.length] for c in self._cdc.cut_buf(view)]

    def boundaries(self, path: str) -> list[tuple[int, int]]:
        """(offset, length) of each chunk of a file (mapped, not read): the same cuts as
        ``cut`` of its content."""
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return []
            with (
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
                memoryview(mapped) as view,
            ):
                return [(c.offset, c.length) for c in self._cdc.cut_buf(view)]


def page_ranges(total_size: int, page_size: int, target: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of fixed chunks of whole pages, ``target`` bytes rounded up to a
    page multiple. The target is small (the repository's setting, 8 KiB by default)
    because SQLite rewrites single pages all over the file (b-tree and index updates): a
    chunk is uploaded again whenever any of its pages changed. Chosen by measurement
    (docs/performance.md)."""
    size = max(page_size, (target + page_size - 1) // page_size * page_size)
    return ((offset, min(size, total_size - offset)) for offset in range(0, total_size, size))
