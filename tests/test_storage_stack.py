"""Backend stacks: capabilities pass through wrappers, and a stack reopens from its spec
(what worker processes do) with every wrapper and its options, after a round trip
through pickle."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from backvault.storage import (
    Backend,
    BackendWrapper,
    FileType,
    LocalBackend,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    open_backend,
    open_backend_from_spec,
)
from backvault.storage.faults import KillAfterWrites
from backvault.storage.rest import RestBackend
from backvault.storage.retry import RetryingBackend, RetryPolicy


def reopened(backend: Backend) -> Backend:
    # What a worker process gets through its pipe: our own bytes, not untrusted data.
    return open_backend_from_spec(pickle.loads(pickle.dumps(backend.spec())))  # noqa: S301


def test_a_local_folder_has_direct_file_io_and_reopens_at_the_same_root(tmp_path: Path) -> None:
    backend = open_backend(str(tmp_path / "repo"))
    backend.create()
    backend.save(FileType.DATA, "ab" * 32, b"payload")
    assert backend.capabilities.direct_file_io
    again = reopened(backend)
    assert isinstance(again, LocalBackend) and again.location == backend.location
    into = memoryview(bytearray(4))
    assert again.load_into(FileType.DATA, "ab" * 32, 3, into) == 4
    assert bytes(into) == b"load"


def test_wrappers_keep_their_options_and_the_capabilities_of_what_they_wrap(
    tmp_path: Path,
) -> None:
    stack = KillAfterWrites(
        RetryingBackend(LocalBackend(tmp_path), attempts=3, base_delay=0.5, connections=2), 5
    )
    stack.save(FileType.SNAPSHOT, "aa" * 32, b"x")  # one write of the five is spent
    assert stack.capabilities.direct_file_io
    again = reopened(stack)
    assert isinstance(again, KillAfterWrites) and again.wrapper_options() == {"writes": 4}
    retry = again.inner
    assert isinstance(retry, RetryingBackend)
    assert (retry.policy.attempts, retry.policy.base_delay, retry.connections) == (3, 0.5, 2)
    assert isinstance(retry.inner, LocalBackend) and retry.inner.root == tmp_path


def test_a_remote_backend_has_no_direct_file_io_and_its_spec_shows_no_password() -> None:
    backend = RestBackend("https://user:secret@example.invalid/repo/")
    try:
        assert not backend.capabilities.direct_file_io
        assert not RetryingBackend(backend).capabilities.direct_file_io
        assert "secret" not in repr(RetryingBackend(backend).spec())
    finally:
        backend.close()


def test_the_default_load_into_reads_through_load(tmp_path: Path) -> None:
    class Plain(BackendWrapper):
        """Hides the local backend's own load_into."""

        def load_into(self, kind: FileType, name: str, offset: int, into: memoryview) -> int:
            return Backend.load_into(self, kind, name, offset, into)

    local = LocalBackend(tmp_path)
    local.create()
    local.save(FileType.INDEX, "cd" * 32, b"0123456789")
    into = memoryview(bytearray(8))
    assert Plain(local).load_into(FileType.INDEX, "cd" * 32, 6, into) == 4
    assert bytes(into[:4]) == b"6789"


def test_the_retry_policy_retries_transient_failures_with_capped_jittered_waits() -> None:
    policy = RetryPolicy(attempts=4, base_delay=1.0, max_delay=3.0)
    waits: list[float] = []
    heard: list[int] = []
    failures = iter([TransientStorageError("503"), TransientStorageError("reset")])

    def flaky() -> str:
        for failure in failures:
            raise failure
        return "done"

    result = policy.call(flaky, on_retry=lambda n, d, e: heard.append(n), sleep=waits.append)
    assert result == "done" and heard == [1, 2]
    assert 0 <= waits[0] <= 1.0 and 0 <= waits[1] <= 2.0
    assert all(policy.delay(n) <= 3.0 for n in range(1, 30))


def test_the_retry_policy_gives_up_after_its_attempts_and_never_retries_other_errors() -> None:
    calls: list[int] = []

    def always(exc: Exception) -> None:
        calls.append(1)
        raise exc

    with pytest.raises(TransientStorageError):
        RetryPolicy(attempts=3).call(
            lambda: always(TransientStorageError("x")), sleep=lambda _: None
        )
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError):
        RetryPolicy(attempts=3).call(lambda: always(StorageError("denied")), sleep=lambda _: None)
    assert len(calls) == 1


def test_a_retrying_backend_names_the_storage_when_it_gives_up(tmp_path: Path) -> None:
    class Down(BackendWrapper):
        def stat(self, kind: FileType, name: str) -> int:
            raise TransientStorageError("503")

    backend = RetryingBackend(Down(LocalBackend(tmp_path)), attempts=2, sleep=lambda _: None)
    with pytest.raises(StorageError, match="kept failing \\(2 attempts at data/"):
        backend.stat(FileType.DATA, "ab" * 32)
    assert backend.retries == 2


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_local_range_reader_keeps_a_few_packs_open_and_reads_each_as_it_is(
    tmp_path: Path,
) -> None:
    """A restore's runs alternate between a few packs: the local reader keeps up to 16
    open (the least recently read closed first), reads every range as ``load_into``
    does, and closes them all."""
    local = LocalBackend(tmp_path / "repo")
    local.create()
    names = [bytes([i]).hex() * 32 for i in range(40)]
    for i, name in enumerate(names):
        local.save(FileType.DATA, name, bytes([i]) * 100 + name.encode())
    before = _open_descriptors()
    reader = local.range_reader(FileType.DATA)
    order = [0, 1, 0, 2, 0, 3, *range(4, 40), 0, 39, 5]
    for i in order:
        into = memoryview(bytearray(10))
        assert reader.read_into(names[i], 98, into) == 10
        assert bytes(into) == bytes([i]) * 2 + names[i][:8].encode()
        assert _open_descriptors() - before <= 16
    # past the end: what is there, as load_into gives it
    into = memoryview(bytearray(100))
    assert reader.read_into(names[7], 150, into) == 14
    reader.close()
    reader.close()
    assert _open_descriptors() == before
    with local.range_reader(FileType.DATA) as again:
        with pytest.raises(ObjectNotFound, match="missing from the repository"):
            again.read_into("ee" * 32, 0, memoryview(bytearray(1)))
        (tmp_path / "repo" / "data" / "ff").mkdir(exist_ok=True)
        (tmp_path / "repo" / "data" / "ff" / ("ff" * 32)).mkdir()
        with pytest.raises(StorageError, match="cannot read"):
            again.read_into("ff" * 32, 0, memoryview(bytearray(1)))
        assert again.read_into(names[3], 0, memoryview(bytearray(1))) == 1
    assert _open_descriptors() == before


def test_a_wrapper_range_reader_reads_through_the_wrapper(tmp_path: Path) -> None:
    """A wrapped backend's range reader goes through the wrapper's ``load_into`` (a
    fault-injecting or retrying wrapper sees every read), not around it."""
    seen: list[tuple[str, int, int]] = []

    class Watched(BackendWrapper):
        def load_into(self, kind: FileType, name: str, offset: int, into: memoryview) -> int:
            seen.append((name, offset, len(into)))
            return super().load_into(kind, name, offset, into)

    local = LocalBackend(tmp_path)
    local.create()
    local.save(FileType.DATA, "ab" * 32, b"0123456789")
    with Watched(local).range_reader(FileType.DATA) as reader:
        into = memoryview(bytearray(3))
        assert reader.read_into("ab" * 32, 4, into) == 3 and bytes(into) == b"456"
        assert reader.read_into("ab" * 32, 8, into) == 2
    assert seen == [("ab" * 32, 4, 3), ("ab" * 32, 8, 3)]
