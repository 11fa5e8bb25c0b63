"""Discover: which keys are images, which are relevant, and stable content-defined shards."""

from pathlib import Path

import pytest

from tasks.discover import (
    MAX_SHARD_FACTOR,
    cut_shards,
    discover,
    is_relevant,
    parse_patterns,
)
from tasks.errors import CurateError
from tasks.naming import is_image
from tasks.shards import read_manifest
from tasks.storage import ObjectInfo, open_storage


@pytest.mark.parametrize(
    "key",
    ["a.jpg", "b/c.JPEG", "x.png", "x.Bmp", "x.gif", "x.tif", "x.TIFF", "d/e/f.webp"],
)
def test_is_image_accepts_image_extensions_in_any_case(key: str) -> None:
    assert is_image(key)


@pytest.mark.parametrize("key", ["a.txt", "jpg", "a.jpg.bak", "photos.jpg/readme", "a.svg", "a"])
def test_is_image_rejects_other_names(key: str) -> None:
    assert not is_image(key)


def test_parse_patterns_skips_comments_and_blank_lines() -> None:
    text = "# keep cats\n\ncats/*\n  !cats/bad.jpg  \n/dogs/a.jpg\n"
    assert parse_patterns(text) == [(True, "cats/*"), (False, "cats/bad.jpg"), (True, "dogs/a.jpg")]


def test_directory_glob_includes_and_negation_excludes() -> None:
    patterns = parse_patterns("cats/*\n!cats/bad.jpg\n")
    assert is_relevant("cats/good.jpg", patterns)
    assert not is_relevant("cats/bad.jpg", patterns)
    assert not is_relevant("dogs/a.jpg", patterns)  # include patterns exist: no match excludes


def test_last_matching_pattern_wins() -> None:
    assert is_relevant("cats/bad.jpg", parse_patterns("!cats/bad.jpg\ncats/*\n"))
    assert not is_relevant("cats/bad.jpg", parse_patterns("cats/*\n!cats/bad.jpg\n"))


def test_only_exclusions_include_everything_else() -> None:
    patterns = parse_patterns("# drop one\n!cats/bad.jpg\n")
    assert is_relevant("dogs/a.jpg", patterns)
    assert not is_relevant("cats/bad.jpg", patterns)
    assert is_relevant("anything.png", [])


def _objects(keys: list[str]) -> list[ObjectInfo]:
    return [ObjectInfo(key, 100, "v") for key in sorted(keys)]


def _shards(objects: list[ObjectInfo], size: int) -> list[tuple[str, ...]]:
    return [tuple(o.key for o in shard) for shard in cut_shards(objects, size)]


def test_inserting_one_object_changes_at_most_two_shards() -> None:
    keys = [f"photos/img_{i:05d}.jpg" for i in range(5000)]
    before = _shards(_objects(keys), 100)
    for new in ("photos/img_02500_b.jpg", "a_first.jpg", "zz_last.jpg"):
        after = _shards(_objects([*keys, new]), 100)
        assert len(set(after) - set(before)) <= 2
        assert len(set(before) - set(after)) <= 2
        assert sum(len(s) for s in after) == 5001


def test_no_shard_exceeds_the_max_factor_and_order_is_kept() -> None:
    objects = _objects([f"k{i:05d}" for i in range(5000)])
    shards = list(cut_shards(objects, 50))
    assert max(len(s) for s in shards) <= 50 * MAX_SHARD_FACTOR
    assert len(shards) > 10
    assert [o for s in shards for o in s] == objects


def test_a_run_without_boundaries_is_cut_at_the_max_factor() -> None:
    # the same key over and over never hits a boundary (its hash is not 0 mod 1000)
    shards = list(cut_shards([ObjectInfo("same.jpg", 1, "v")] * 10_000, 1000))
    assert [len(s) for s in shards] == [4000, 4000, 2000]


def test_cut_shards_of_nothing_is_no_shard() -> None:
    assert list(cut_shards([], 10)) == []


def test_discover_writes_readable_manifests_and_counts(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for name in ["cats/a.jpg", "cats/b.PNG", "cats/skip.jpg", "dogs/c.webp", "notes.txt"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"x" * 10)
    output = open_storage(str(out))
    patterns = parse_patterns("cats/*\ndogs/*\n!cats/skip.jpg\n")
    found = discover(open_storage(str(src)), output, shard_size=2, patterns=patterns)
    assert (found.discovered, found.skipped, found.total_bytes) == (3, 2, 30)
    listed = [o for shard in found.shards for o in read_manifest(output, shard.manifest)]
    assert sorted(o.key for o in listed) == ["cats/a.jpg", "cats/b.PNG", "dogs/c.webp"]
    assert all(o.size == 10 and o.version for o in listed)
    assert [s.count for s in found.shards] == [
        len(read_manifest(output, s.manifest)) for s in found.shards
    ]
    again = discover(open_storage(str(src)), output, shard_size=2, patterns=patterns)
    assert [s.identity for s in again.shards] == [s.identity for s in found.shards]


def test_discover_without_images_raises(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("hi")
    with pytest.raises(CurateError, match="no images or videos found"):
        discover(open_storage(str(tmp_path / "in")), open_storage(str(tmp_path / "out")), 10)


def test_relevant_filenames_file_is_read_from_the_input_then_the_output(tmp_path: Path) -> None:
    from tasks.discover import load_patterns

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    output.mkdir()
    (output / "relevant.txt").write_text("a/*\n")
    in_storage, out_storage = open_storage(str(source)), open_storage(str(output))
    assert load_patterns("relevant.txt", in_storage, out_storage) == [(True, "a/*")]
    (source / "relevant.txt").write_text("!b/*\n")
    assert load_patterns("relevant.txt", in_storage, out_storage) == [(False, "b/*")]
    with pytest.raises(CurateError, match="relevant_filenames_file"):
        load_patterns("missing.txt", in_storage, out_storage)


def test_the_first_shard_is_handed_out_before_the_listing_ends(tmp_path: Path) -> None:
    from tasks.discover import Discovery, discover_shards
    from tasks.storage import LocalStorage

    class CountingStorage(LocalStorage):
        """The real local backend, counting how far its listing has been read."""

        listed = 0

        def scan(self, prefix: str = ""):  # type: ignore[no-untyped-def]
            for obj in super().scan(prefix):
                CountingStorage.listed += 1
                yield obj

    source = tmp_path / "in"
    source.mkdir()
    for i in range(3000):
        (source / f"img_{i:05d}.jpg").write_bytes(b"x")
    found = Discovery()
    shards = discover_shards(
        CountingStorage(str(source)), open_storage(str(tmp_path / "out")), 100, None, found
    )
    first = next(shards)
    assert CountingStorage.listed < 3000 / 2  # only as far as the first boundary
    assert found.shards == [first]
    rest = list(shards)
    assert CountingStorage.listed == 3000
    assert found.discovered == 3000 == sum(s.count for s in [first, *rest])
