"""Per-thread zstd compressors and decompressors.

A zstd context is not safe to share between threads and is costly to make (it holds its
tables and window): each thread keeps one of its own, made on first use.
"""

from __future__ import annotations

import threading

import zstandard


class ThreadCompressors:
    """This thread's zstd compressor (at ``level``) and decompressor."""

    def __init__(self, level: int = 3) -> None:
        self.level = level
        self._local = threading.local()

    def compressor(self) -> zstandard.ZstdCompressor:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "zstd", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self.level)
            self._local.zstd = compressor
        return compressor

    def decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._local, "unzstd", None)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor()
            self._local.unzstd = decompressor
        return decompressor
