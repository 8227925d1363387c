"""Ids as people type them (repo/ids.py): a unique prefix of at least four hex digits
names one snapshot or key slot; messages say what did not match and where to look."""

from __future__ import annotations

import pytest

from backvault.repo.errors import RepositoryError
from backvault.repo.ids import AmbiguousPrefix, PrefixNotFound, resolve_prefix

IDS = ["1a2b3c4d" + "0" * 56, "1a2b9999" + "0" * 56, "ffee0000" + "1" * 56]


def test_a_unique_prefix_names_its_id() -> None:
    assert resolve_prefix(IDS, "1a2b3", "snapshot", "list them") == IDS[0]
    assert resolve_prefix(iter(IDS), "ffee", "key slot", "see the list") == IDS[2]


@pytest.mark.parametrize("prefix", ["1a2", "", "abcd", "ffee0000" + "2" * 56])
def test_no_match_or_a_prefix_under_four_digits_is_refused(prefix: str) -> None:
    with pytest.raises(PrefixNotFound, match=f"no key slot matches {prefix!r}; see `x`"):
        resolve_prefix(IDS, prefix, "key slot", "see `x`")


def test_an_ambiguous_prefix_asks_for_more_digits() -> None:
    with pytest.raises(AmbiguousPrefix, match="'1a2b' matches 2 snapshots; give more digits"):
        resolve_prefix(IDS, "1a2b", "snapshot", "list them")
    assert issubclass(AmbiguousPrefix, RepositoryError)
    assert issubclass(PrefixNotFound, RepositoryError)
