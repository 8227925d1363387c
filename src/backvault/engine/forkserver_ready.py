"""Imported last by the fork server worker processes start from (see
``parallel._process_context``), and only there.

Every worker is a fork of the fork server and shares its memory until it writes to it.
Python's garbage collector writes to every object it examines, so each worker's first
collections copied the pages of everything the fork server had imported (~3 MiB of heap
in each). Frozen here, those objects are never examined again: they stay shared."""

import gc

gc.freeze()
