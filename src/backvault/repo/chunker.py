"""Splitting file contents into blobs.

- Ordinary files: content-defined chunking with FastCDC 2020 (``pyfastcdc``, Cython),
  512 KiB to 8 MiB, about 1 MiB on average like restic. The gear table is keyed with a
  value derived from the master key, so chunk boundaries reveal nothing about content to
  someone who sees only blob sizes (restic keys its Rabin polynomial the same way).
- SQLite databases: fixed runs of whole pages (8 KiB: a multiple of the database's page size).
  SQLite changes a database in place, page by page, and appends new pages at the end, so
  with page-aligned chunks a day of new messages touches only the chunks holding the pages
  it changed; content-defined cuts would straddle pages and gain nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from typing import BinaryIO

from pyfastcdc import FastCDC

from ..crypto.aead import Key

MIN_SIZE = 512 * 1024
AVG_SIZE = 1024 * 1024
MAX_SIZE = 8 * 1024 * 1024
# Bytes per SQLite chunk, rounded to whole pages. Small, because SQLite rewrites single
# pages all over the file (b-tree and index updates): a chunk is uploaded again whenever
# any of its pages changed. Chosen by measurement (docs/performance.md);
# BACKVAULT_SQLITE_CHUNK_KIB overrides it.
SQLITE_CHUNK_TARGET = int(os.environ.get("BACKVAULT_SQLITE_CHUNK_KIB", "8")) * 1024
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

    def chunks(self, stream: BinaryIO) -> Iterator[bytes]:
        for chunk in self._cdc.cut_stream(stream):
            yield bytes(chunk.data)


def page_chunks(
    stream: BinaryIO, page_size: int, target: int = SQLITE_CHUNK_TARGET
) -> Iterator[bytes]:
    """Fixed chunks of whole pages, ``target`` bytes rounded up to a page multiple."""
    size = max(page_size, (target + page_size - 1) // page_size * page_size)
    while True:
        data = stream.read(size)
        if not data:
            return
        yield data
