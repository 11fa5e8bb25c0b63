"""LocalStorage: relative keys, counted reads, atomic writes, and a root nothing escapes."""

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.errors import CurateError
from tasks.storage import LocalStorage, Storage, open_storage


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "top.bin").write_bytes(b"0123456789")
    (tmp_path / "a" / "one.txt").write_bytes(b"one")
    (tmp_path / "a" / "b" / "two.txt").write_bytes(b"two!")
    return open_storage(str(tmp_path))


def test_open_storage_of_a_folder_or_file_url_is_local(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert open_storage(f"file://{tmp_path}").root == tmp_path.resolve()  # type: ignore[attr-defined]


def test_list_gives_relative_slash_keys_with_size_and_version(storage: Storage) -> None:
    objects = {o.key: o for o in storage.list()}
    assert set(objects) == {"top.bin", "a/one.txt", "a/b/two.txt"}
    assert objects["a/b/two.txt"].size == 4
    assert all(o.version for o in objects.values())


def test_list_under_a_prefix_keeps_keys_relative_to_the_root(storage: Storage) -> None:
    assert sorted(o.key for o in storage.list("a/b")) == ["a/b/two.txt"]


def test_list_of_a_missing_folder_raises(storage: Storage) -> None:
    with pytest.raises(CurateError, match="no such folder"):
        list(storage.list("nope"))


def test_reads_return_the_right_bytes_and_are_counted(storage: Storage) -> None:
    assert storage.read("top.bin") == b"0123456789"
    assert storage.read_range("top.bin", 2, 5) == b"234"
    assert storage.read_text("a/one.txt") == "one"
    assert storage.bytes_read == 10 + 3 + 3


def test_open_is_seekable_and_counts_what_it_reads(storage: Storage) -> None:
    with storage.open("top.bin") as f:
        f.seek(6)
        assert f.read(2) == b"67"
        f.seek(-1, io.SEEK_END)
        assert f.read() == b"9"
        assert f.seekable()
    assert 3 <= storage.bytes_read <= 10


def test_write_creates_parents_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    storage.write("x/y/z.bin", b"old")
    storage.write("x/y/z.bin", b"new")
    assert (tmp_path / "x/y/z.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["z.bin"]


def test_write_stream_joins_the_chunks(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    storage.write_stream("s/out.bin", iter([b"ab", b"", b"cd"]))
    assert storage.read("s/out.bin") == b"abcd"
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["out.bin"]


def test_failed_write_stream_keeps_the_old_object_and_no_temp_file(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    storage.write("k.bin", b"old")

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        storage.write_stream("k.bin", chunks())
    assert storage.read("k.bin") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k.bin"]


def test_exists_and_delete_and_deleting_a_missing_key_is_fine(storage: Storage) -> None:
    assert storage.exists("a/one.txt")
    assert not storage.exists("a")  # a folder is not an object
    storage.delete("a/one.txt")
    assert not storage.exists("a/one.txt")
    storage.delete("a/one.txt")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd"])
def test_a_key_escaping_the_root_raises(storage: Storage, key: str) -> None:
    with pytest.raises(CurateError, match="outside the storage root"):
        storage.read(key)
    with pytest.raises(CurateError):
        storage.write(key, b"no")


def test_unsupported_scheme_raises_naming_the_url() -> None:
    with pytest.raises(CurateError, match=r"ftp://x.*unsupported scheme"):
        open_storage("ftp://x")
