"""The engine: backup (``archiver``), restore (``restorer``), ``check`` and ``prune`` over an
open repository, with what they share: the one tree walker (``walk``), the worker pool,
batching and byte budget (``parallel``), and the sealing of chunks (``sealer``).

The caller holds the repository lock a command needs; the engine takes none.
"""
