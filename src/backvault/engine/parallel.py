"""CPU-heavy blob work on every core.

Hashing, compressing, encrypting and decrypting blobs, and writing restored files, run in
worker processes: with threads, every hash, cipher call and write of a small blob
releases Python's GIL and takes it back, and on a 2-core machine the threads spent more
time handing the GIL to each other (a million futex calls for a 1 GB restore) than
working. Small jobs stay on threads in this process, where starting processes would cost
more than it saves.

Work reaches the pool in batches (``Batcher``): one task per small file would spend more
time passing tasks between processes than working, and a byte budget (``ByteBudget``)
bounds what is handed out and not yet finished with, so memory stays flat.

A worker process gets what it needs (the master key, for instance) once, through the pipe
that starts it, and keeps it in memory only, as the parent does. Processes are started
from a fork server (``_process_context``), or with ``spawn``, never as a ``fork`` of the
parent: it has threads (progress bars, storage clients) and a forked child could inherit
a lock one of them held.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from backvault.crypto.aead import Key
from backvault.hardening import disable_core_dumps
from backvault.repo.blobs import BlobReader
from backvault.storage import Backend, BackendSpec, open_backend_from_spec

T = TypeVar("T")
Payload = TypeVar("Payload")
Tag = TypeVar("Tag")
Outcome = TypeVar("Outcome")

# Below this much work, starting worker processes costs more than it saves.
PROCESS_THRESHOLD_BYTES = 32 * 1024 * 1024


_requested_processes: int | None = None


def configure(*, worker_processes: int | None) -> None:
    """The client's setting (``BACKVAULT_WORKER_PROCESSES``, read by device.settings): N
    worker processes for any amount of work, 0 threads only, None one per core."""
    global _requested_processes
    _requested_processes = worker_processes


def worker_processes() -> tuple[int, bool]:
    """How many worker processes heavy work may use (one per core, none on one core), and
    whether that was asked for (``configure``)."""
    requested = _requested_processes
    if requested is not None:
        return max(0, requested), True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores if cores and cores >= 2 else 0), False


_worker_context: Any = None
_worker_barrier: Any = None


def _process_context() -> Any:
    """How worker processes start: from a fork server (one process that imported the
    worker's modules once, started like ``spawn``, then forked for each worker: they
    share its memory and do not import everything again) where the system has one, else
    ``spawn``. Never a fork of this process, which has threads."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(_WORKER_MODULES))
        return context
    return multiprocessing.get_context("spawn")


# What worker processes run: imported once by the fork server (the first makes it, and
# so every worker from birth, not dumpable; the last keeps it shared with the workers).
_WORKER_MODULES = (
    "backvault.engine.forkserver_hardening",
    "backvault.engine.parallel",
    "backvault.engine.sealer",
    "backvault.engine.restorer.files",
    "backvault.engine.check",
    "backvault.storage",
    "backvault.engine.forkserver_ready",  # last: freezes what the others made
)


def _start_worker(
    make_context: Callable[..., Any], args: tuple[Any, ...], barrier: Any, parent: int
) -> None:
    # Ctrl-C reaches the whole process group: the parent decides what happens, so a worker
    # must not stop on its own half-way through a write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker holds the master key; exec made it dumpable again (the core-size limit of
    # 0 is inherited, but a core_pattern pipe need not honour it).
    disable_core_dumps()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    fix_mmap_threshold()
    global _worker_context, _worker_barrier
    _worker_context = make_context(*args)
    _worker_barrier = barrier


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1024 * 1024
_TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024


def fix_mmap_threshold() -> None:
    """Give buffers of 1 MiB and more (packs being filled, pieces read) mappings of their
    own, returned to the system when freed. glibc raises its threshold each time such a
    buffer is freed, after which they come from the heap and leave it fragmented: a
    worker process held about 14 MiB more. And keep up to 4 MiB free at the top of the
    heap (fixing the mmap threshold leaves glibc's trim threshold at 128 KiB): a worker
    frees and makes again buffers of up to 1 MiB all the time (a pack's next MiB, a
    sealed chunk), and every page given back and taken again is a page fault. A first
    backup of the 1.1 GB store made ~340 000-510 000 of them, restic ~34 000; 80 000-105 000
    now, ~0.6-1.5 CPU-s less, at the same peak memory. No effect where the C library has
    no mallopt."""
    with contextlib.suppress(OSError, AttributeError):
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def _exit_with_parent(parent: int) -> None:
    """A parent killed with SIGKILL cannot stop its workers, and they would wait for work
    for ever (holding its terminal's pipes open): they stop when it is gone. Their own
    parent is the fork server (which stops with it) or the parent itself."""
    started_by = os.getppid()
    while os.getppid() == started_by and _alive(parent):
        time.sleep(0.2)
    os._exit(1)


def _alive(pid: int) -> bool:
    """Whether the process runs: not gone, and not a zombie (a parent killed but not yet
    reaped by whoever started it: its workers, children of the fork server, must not wait
    for that)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (our parent's pid was reused)
        return False
    return True


def _on_each(fn: Callable[..., T], *args: Any) -> T:
    result = _in_worker(fn, *args)
    # Each worker waits here until all have run ``fn``: so no worker takes two of these
    # tasks, and every worker takes one.
    _worker_barrier.wait()
    return result


def _in_worker(fn: Callable[..., T], *args: Any) -> T:
    if _worker_context is None:
        raise RuntimeError("the worker process was not started with a context")
    return fn(_worker_context, *args)


class WorkerPool:
    """Runs ``fn(context, *args)``: on threads of this process with ``local_context``
    until ``threshold`` bytes of work were submitted, then in worker processes whose
    context ``make_context(*process_args())`` builds (``process_args`` is called when the
    processes start, so it can describe the state at that moment).

    ``fn`` must be a module-level function: worker processes import it by name.
    """

    def __init__(
        self,
        local_context: Any,
        threads: int,
        make_context: Callable[..., Any] | None = None,
        process_args: Callable[[], tuple[Any, ...]] | None = None,
        threshold: int = PROCESS_THRESHOLD_BYTES,
        processes: int | None = None,
    ) -> None:
        self._local_context = local_context
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="backvault-work")
        self._thread_count = threads
        self._make_context = make_context
        self._process_args = process_args
        self._threshold = threshold
        if processes is None:
            processes, asked = worker_processes()
            if asked:
                self._threshold = 0
        self._processes = processes
        if make_context is None or process_args is None:
            self._processes = 0
        self._process_pool: ProcessPoolExecutor | None = None
        self._barrier: Any = None  # the workers' barrier for ``on_each_process``
        self._submitted = 0
        self._lock = threading.Lock()

    @property
    def workers(self) -> int:
        """How many tasks run at once."""
        if self._process_pool is not None:
            return self._processes
        return self._thread_count

    def set_local_context(self, context: Any) -> None:
        """The context of the threads (for work submitted from now on)."""
        self._local_context = context

    @property
    def uses_processes(self) -> bool:
        return self._process_pool is not None

    def submit(self, fn: Callable[..., T], *args: Any, work_bytes: int = 0) -> Future[T]:
        pool = self._count(work_bytes)
        if pool is not None:
            return pool.submit(_in_worker, fn, *args)
        return self._threads.submit(fn, self._local_context, *args)

    def expect(self, work_bytes: int) -> None:
        """Work of this size is coming (a database being copied, say): if that passes the
        threshold, start the worker processes now, in the background, so that they are
        ready when it arrives (starting them takes a few tenths of a second)."""
        with self._lock:
            starting = self._process_pool is None
        pool = self._count(work_bytes)
        if starting and pool is not None:
            threading.Thread(target=self._warm_up, args=(pool,), daemon=True).start()

    def would_use_processes(self, work_bytes: int) -> bool:
        """Whether work of this size, submitted now or after ``expect(work_bytes)``, runs
        in worker processes."""
        with self._lock:
            return bool(self._processes) and (
                self._process_pool is not None or self._submitted + work_bytes >= self._threshold
            )

    def _warm_up(self, pool: ProcessPoolExecutor) -> None:
        # The pool starts a process per task submitted while none is idle.
        with contextlib.suppress(Exception):
            for future in [pool.submit(os.getpid) for _ in range(self._processes)]:
                future.result()

    def _count(self, work_bytes: int) -> ProcessPoolExecutor | None:
        """Count submitted work; the process pool, once the threshold is passed."""
        with self._lock:
            self._submitted += work_bytes
            if (
                self._process_pool is None
                and self._processes
                and self._submitted >= self._threshold
            ):
                assert self._make_context is not None and self._process_args is not None
                context = _process_context()
                self._barrier = context.Barrier(self._processes)
                self._process_pool = ProcessPoolExecutor(
                    self._processes,
                    mp_context=context,
                    initializer=_start_worker,
                    initargs=(
                        self._make_context,
                        self._process_args(),
                        self._barrier,
                        os.getpid(),
                    ),
                )
            return self._process_pool

    def on_each_process(self, fn: Callable[..., T], *args: Any) -> list[T]:
        """Run ``fn(context, *args)`` once in every worker process (none if the pool never
        started processes), after the work already submitted; their results."""
        with self._lock:
            pool = self._process_pool
        if pool is None:
            return []
        futures = [pool.submit(_on_each, fn, *args) for _ in range(self._processes)]
        return [future.result() for future in futures]

    def shutdown(self, cancel: bool = False) -> None:
        self._threads.shutdown(wait=True, cancel_futures=cancel)
        if self._process_pool is not None:
            if cancel:
                # A worker may wait at the barrier of ``on_each_process`` for a task that
                # is now cancelled: it would wait for ever, and this shutdown with it.
                self._barrier.abort()
            try:
                self._process_pool.shutdown(wait=True, cancel_futures=cancel)
            except RuntimeError:
                # A signal (SIGTERM, Ctrl-C) raised in the main thread while the pool was
                # starting: its manager thread never started ("cannot join thread before
                # it is started"), so nothing will stop its processes: stop them here,
                # and let the signal's exception, not this one, end the command.
                processes = getattr(self._process_pool, "_processes", None) or {}
                for process in list(processes.values()):
                    process.terminate()
                    process.join()


class ByteBudget:
    """Bounds the bytes handed to workers and not yet finished with.

    ``take`` blocks while the budget is spent; a single request larger than the whole
    budget is let through when nothing else is in flight, so it cannot deadlock.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self._limit:
                self._cond.wait()
            self._used += n

    def give(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    def wait_idle(self) -> None:
        """Block until every taken byte was given back."""
        with self._cond:
            while self._used:
                self._cond.wait()


class Batcher(Generic[Payload, Tag, Outcome]):
    """Groups pieces of work into tasks of about ``batch_bytes`` (or ``batch_items``
    pieces) for a pool, within a byte budget of ``budget_bytes`` in flight.

    ``add(payload, tag, size)`` queues a piece; a full batch goes to the pool as
    ``fn(context, payloads)``. When the task is done, ``on_done(tags, future, release)``
    runs on the pool's thread; ``release()`` gives the batch's bytes back to the budget and
    must be called once, when the results are dealt with (possibly later, on another
    thread). Each task is charged at least ``min_charge`` bytes. Safe to use from several
    threads.
    """

    def __init__(
        self,
        pool: WorkerPool,
        fn: Callable[..., Outcome],
        on_done: Callable[[list[Tag], Future[Outcome], Callable[[], None]], None],
        *,
        budget_bytes: int,
        batch_bytes: int,
        batch_items: int,
        min_charge: int = 0,
    ) -> None:
        self._pool = pool
        self._fn = fn
        self._on_done = on_done
        self._budget = ByteBudget(budget_bytes)
        self._batch_bytes_limit = batch_bytes
        self._batch_items = batch_items
        self._min_charge = min_charge
        self._payloads: list[Payload] = []
        self._tags: list[Tag] = []
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, payload: Payload, tag: Tag, size: int) -> None:
        with self._lock:
            self._payloads.append(payload)
            self._tags.append(tag)
            self._bytes += size
            full = self._bytes >= self._batch_bytes_limit or len(self._tags) >= self._batch_items
        if full:
            self.submit()

    def submit(self) -> None:
        """Hand what is queued to the pool now, as one task."""
        with self._lock:
            if not self._tags:
                return
            payloads, tags, size = self._payloads, self._tags, self._bytes
            self._payloads, self._tags, self._bytes = [], [], 0
        charge = max(size, self._min_charge)
        self._budget.take(charge)
        try:
            future = self._pool.submit(self._fn, payloads, work_bytes=size)
        except BaseException:
            self._budget.give(charge)
            raise
        release = functools.partial(self._budget.give, charge)
        on_done = self._on_done
        future.add_done_callback(lambda done: on_done(tags, done, release))

    def wait_idle(self) -> None:
        """Block until every task handed out was dealt with (released)."""
        self._budget.wait_idle()


def reader_pool(backend: Backend, key: Key, threads: int = 4) -> WorkerPool:
    """A pool for BlobReader work: worker processes for a backend with direct file I/O
    (they reopen the same backend stack from its spec) once enough work was submitted,
    threads otherwise (for remote storage the network, not the CPU, is the limit)."""
    if backend.capabilities.direct_file_io:
        return WorkerPool(
            BlobReader(backend, key),
            threads,
            make_context=_reader_in_worker,
            process_args=lambda: (key.to_json(), backend.spec()),
        )
    return WorkerPool(BlobReader(backend, key), threads)


def _reader_in_worker(key_doc: dict[str, Any], spec: BackendSpec) -> BlobReader:
    return BlobReader(open_backend_from_spec(spec), Key.from_json(key_doc))
