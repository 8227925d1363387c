"""Progress reporting without a UI dependency: the CLI plugs rich in, tests plug nothing."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total_bytes: int | None, description: str) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def note(self, message: str) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, total_bytes: int | None, description: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
