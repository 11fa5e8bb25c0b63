"""Dedup: byte and pixel copies map to the first name in sorted order, whatever the order."""

import pandas as pd
import pytest

from tasks.dedup import find_duplicates


def _frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["filename", "content_hash", "pixel_hash"])


# b is a byte copy of a (same bytes, so same pixels); d is a re-encoding of c (same pixels).
ROWS = [
    ("b.jpg", "bytes-1", "pixels-1"),
    ("a.jpg", "bytes-1", "pixels-1"),
    ("d.png", "bytes-3", "pixels-2"),
    ("c.png", "bytes-2", "pixels-2"),
    ("e.png", "bytes-4", "pixels-3"),
]


def test_byte_and_pixel_duplicates_map_to_the_first_name() -> None:
    assert find_duplicates(_frame(ROWS)) == {"b.jpg": "a.jpg", "d.png": "c.png"}


@pytest.mark.parametrize("order", [[4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 3, 0, 2, 4]])
def test_result_does_not_depend_on_row_order(order: list[int]) -> None:
    expected = find_duplicates(_frame(ROWS))
    assert find_duplicates(_frame([ROWS[i] for i in order])) == expected


def test_no_duplicates_gives_an_empty_map() -> None:
    assert find_duplicates(_frame([("a", "h1", "p1"), ("b", "h2", "p2")])) == {}
    assert find_duplicates(_frame([])) == {}


def test_chain_of_byte_copy_then_pixel_copy_maps_all_to_the_first_name() -> None:
    # A and B are byte-identical (so pixel-identical too); C has B's pixels, other bytes.
    rows = [("C", "h2", "p1"), ("B", "h1", "p1"), ("A", "h1", "p1")]
    assert find_duplicates(_frame(rows)) == {"B": "A", "C": "A"}


CHAIN = [("c.png", "h2", "p1"), ("b.png", "h2", "p1"), ("a.png", "h1", "p1")]


def test_chain_where_the_byte_original_is_a_pixel_copy_drops_all_but_the_first() -> None:
    # a.png and b.png: same pixels, other compression; c.png: a byte copy of b.png.
    assert set(find_duplicates(_frame(CHAIN))) == {"b.png", "c.png"}


def test_chain_maps_every_duplicate_to_a_kept_name() -> None:
    assert find_duplicates(_frame(CHAIN)) == {"b.png": "a.png", "c.png": "a.png"}
