"""``format.decode_tree`` reads long content lists straight from a tree blob's bytes
(memory) and parses the rest with ``json``: for any tree, hostile ones included, it must
give exactly what ``json.loads`` and ``tree_nodes`` give, or refuse it alike. A parser
differential written by the red team of round two's third session."""

from __future__ import annotations

import json
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backvault.repo.format import FormatError, decode_tree, tree_nodes


def _reference(data: bytes) -> tuple[str, object]:
    try:
        return ("ok", tree_nodes(json.loads(data)))
    except (FormatError, ValueError, RecursionError) as exc:
        return ("error", type(exc).__name__)


def _actual(data: bytes) -> tuple[str, object]:
    try:
        return ("ok", decode_tree(data))
    except FormatError:
        return ("error", "FormatError")


def _ids(rng: random.Random, n: int) -> list[str]:
    return [rng.randbytes(32).hex() for _ in range(n)]


def _arr(ids: list[str]) -> str:
    return "[" + ",".join(f'"{i}"' for i in ids) + "]"


SIZES = [1, 1023, 1024, 1025, 8191, 8192, 8193, 16385]
MUTATIONS = [
    "none",
    "dup_content_long",
    "dup_content_short",
    "dup_content_null",
    "nested",
    "in_string_escaped",
    "in_string_raw",
    "dup_nodes",
    "space",
    "bom",
    "utf16",
    "utf32",
    "upper",
    "nondict_node",
    "toplevel_content",
    "truncate",
    "flip",
    "two_long_nodes",
    "dup_name",
    "content_string",
    "lead_space",
    "trailing_garbage",
    "dir_with_content",
    "empty_first",
]


def _doc(rng: random.Random, n: int, mutation: str) -> bytes:
    ids = _ids(rng, n)
    node = f'{{"name":"a","type":"file","mode":420,"size":{n},"content":{_arr(ids)}'
    extra = ""
    if mutation == "dup_content_long":
        extra = ',"content":' + _arr(_ids(rng, max(n, 1024)))
    elif mutation == "dup_content_short":
        extra = ',"content":' + _arr(_ids(rng, 3))
    elif mutation == "dup_content_null":
        extra = ',"content":null'
    elif mutation == "nested":
        extra = ',"x":{"content":' + _arr(_ids(rng, 1100)) + "}"
    elif mutation == "in_string_escaped":
        extra = ',"y":"' + (',"content":' + _arr(_ids(rng, 1100))).replace('"', '\\"') + '"'
    elif mutation == "in_string_raw":
        extra = ',"y":"q,"content":' + _arr(_ids(rng, 1100)) + '"'
    elif mutation == "content_string":
        extra = ',"content":"' + "0" * 64 + '"'
    node += extra + "}"
    nodes = [node]
    if mutation == "two_long_nodes":
        nodes.append(f'{{"name":"b","type":"file","size":0,"content":{_arr(_ids(rng, 1024))}}}')
    if mutation == "dup_name":
        nodes.append(f'{{"name":"a","type":"file","size":0,"content":{_arr(_ids(rng, 1024))}}}')
    if mutation == "nondict_node":
        nodes.append("5")
    if mutation == "dir_with_content":
        nodes.append(f'{{"name":"d","type":"dir","content":{_arr(_ids(rng, 1024))}}}')
    if mutation == "empty_first":
        nodes.insert(0, '{"name":"0","type":"file","size":0,"content":[]}')
    text = '{"nodes":[' + ",".join(nodes) + "]"
    if mutation == "dup_nodes":
        text += ',"nodes":[{"name":"z","type":"file","content":' + _arr(_ids(rng, 1024)) + "}]"
    if mutation == "toplevel_content":
        text += ',"content":' + _arr(_ids(rng, 1024))
    text += "}\n"
    if mutation == "trailing_garbage":
        text += '{"content":' + _arr(_ids(rng, 1024)) + "}"
    if mutation == "space":
        text = text.replace('"content":', '"content": ', 1)
    if mutation == "lead_space":
        text = " \t\n" + text
    if mutation == "upper":
        at = text.index('"content":[') + 12 + 67 * rng.randrange(max(n - 1, 1))
        text = text[:at] + text[at].upper().replace(text[at], "A") + text[at + 1 :]
    data = text.encode()
    if mutation == "bom":
        data = b"\xef\xbb\xbf" + data
    elif mutation == "utf16":
        data = text.encode(rng.choice(["utf-16", "utf-16-le", "utf-16-be"]))
    elif mutation == "utf32":
        data = text.encode(rng.choice(["utf-32", "utf-32-le", "utf-32-be"]))
    elif mutation == "truncate":
        data = data[: rng.randrange(len(data))]
    elif mutation == "flip":
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data))
            data = data[:at] + bytes([rng.choice(b'",[]{}:\\ 0aG\x00')]) + data[at + 1 :]
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**32), st.sampled_from(SIZES), st.sampled_from(MUTATIONS))
def test_decode_tree_equals_plain_json_on_hostile_trees(seed: int, n: int, mutation: str) -> None:
    """Generated trees, long content lists of every size around the thresholds, each
    with one way a hostile tree could try to make the two decodings differ."""
    data = _doc(random.Random(seed), n, mutation)
    assert _actual(data)[0] == _reference(data)[0]
    if _reference(data)[0] == "ok":
        assert _actual(data) == _reference(data)


def test_every_mutation_at_every_size_decodes_as_plain_json() -> None:
    """Each mutation at each size at least once (hypothesis samples them)."""
    rng = random.Random(1)
    for n in SIZES:
        for mutation in MUTATIONS:
            for _ in range(3 if mutation in ("flip", "truncate") else 1):
                data = _doc(rng, n, mutation)
                ref, got = _reference(data), _actual(data)
                assert got[0] == ref[0], (n, mutation)
                if ref[0] == "ok":
                    assert got == ref, (n, mutation)
