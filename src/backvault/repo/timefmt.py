"""Timestamps as restic writes them: Go's RFC 3339 with nanoseconds, kept as integer ns."""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime, timedelta, timezone

_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9})\d*)?([Zz]|[+-]\d\d:\d\d)$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_ns(ns: int, local: bool = True) -> str:
    """Format ns since the epoch like Go's time.RFC3339Nano (trailing zeros trimmed)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    whole = _whole_seconds(seconds, local)
    if whole is None:
        return _format_ns_by_datetime(ns, local)
    text, zone = whole
    if fraction:
        return f"{text}.{fraction:09d}".rstrip("0") + zone
    return text + zone


@functools.lru_cache(maxsize=1 << 16)
def _whole_seconds(seconds: int, local: bool) -> tuple[str, str] | None:
    """A time's text to the second, and its zone; None for times ``time`` cannot take.
    A backup formats three times of every file (a no-change backup of 20 000 files spent
    0.2 s in datetime's way): files copied or made together share their seconds, and
    these are time's C calls. (The zone is read once per process: a test that changes TZ
    clears this cache.)"""
    try:
        if local:
            dst = time.localtime(seconds).tm_isdst > 0
            offset = -(time.altzone if dst else time.timezone)
        else:
            offset = 0
        fields = time.gmtime(seconds + offset)
    except (OverflowError, OSError, ValueError):
        return None
    if not 1 <= fields.tm_year <= 9999:
        return None
    text = (
        f"{fields.tm_year:04d}-{fields.tm_mon:02d}-{fields.tm_mday:02d}T"
        f"{fields.tm_hour:02d}:{fields.tm_min:02d}:{fields.tm_sec:02d}"
    )
    if not offset:
        return text, "Z"
    minutes = offset // 60
    sign = "+" if minutes >= 0 else "-"
    return text, f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _format_ns_by_datetime(ns: int, local: bool) -> str:
    """``format_ns`` through datetime (times ``time``'s calls do not take)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    dt = _EPOCH + timedelta(seconds=seconds)
    if local:
        offset = timedelta(seconds=-(time.altzone if _is_dst(seconds) else time.timezone))
        dt = dt.astimezone(timezone(offset))
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    utc_offset = dt.utcoffset()
    if not utc_offset:
        return text + "Z"
    minutes = int(utc_offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _is_dst(seconds: int) -> bool:
    try:
        return bool(time.localtime(seconds).tm_isdst > 0)
    except (OverflowError, OSError, ValueError):
        return False


def parse_ns(text: str) -> int:
    """Parse an RFC 3339 timestamp (any number of fraction digits) into ns since the epoch."""
    match = _RFC3339.match(text)
    if not match:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if zone in ("Z", "z"):
        tz = UTC
    else:
        sign = 1 if zone[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz)
    delta = dt - _EPOCH
    whole = (delta.days * 86400 + delta.seconds) * 1_000_000_000
    return whole + int((fraction or "0").ljust(9, "0"))


def now_ns() -> int:
    return time.time_ns()
