"""One storage interface for every read and write of the pipeline.

Steps never open paths: they ask a `Storage` rooted at the input or output URL for keys
relative to that root (`photos/a.jpg`, `/` separators). Each backend counts the bytes it
reads, so the report can say what every step cost in traffic. Writes are atomic (a
reader sees the old object or the new one, never half of one).
"""

from __future__ import annotations

import io
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from tasks.errors import CurateError


@dataclass(frozen=True)
class ObjectInfo:
    """An object's identity: a change in any field means new content."""

    key: str
    size: int
    version: str  # mtime (local), ETag (S3), generation (GCS), ETag (Azure)


class Storage(ABC):
    """A root location; every key is relative to it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._bytes_read = 0

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def _count(self, n: int) -> None:
        with self._lock:
            self._bytes_read += n

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under `prefix`, lazily, in no particular order."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A seekable binary stream over the object."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Create or atomically replace the object."""

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> None:
        """Create or atomically replace the object from chunks (backends that can,
        stream them instead of joining)."""
        self.write(key, b"".join(chunks))

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; missing objects are fine."""

    def read_text(self, key: str) -> str:
        return self.read(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write(key, text.encode("utf-8"))

    def join(self, key: str) -> str:
        """The URL of a key, for messages and references."""
        return self.url.rstrip("/") + "/" + key


class _CountingReader(io.RawIOBase):
    """A seekable file wrapper that adds what it reads to its storage's count."""

    def __init__(self, raw: BinaryIO, count: object) -> None:
        self._raw = raw
        self._count_fn = count

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        self._count_fn(n or 0)  # type: ignore[operator]
        return n or 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()
        super().close()


class LocalStorage(Storage):
    """A folder on a local or mounted file system."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parsed = urlparse(url)
        self.root = Path(parsed.path if parsed.scheme == "file" else url).expanduser().resolve()

    def _path(self, key: str) -> Path:
        # A lexical check (no syscalls, unlike resolve()): keys come from our own listing
        # or manifests, so `..` and absolute keys are the only ways out of the root.
        if key.startswith("/") or ".." in key.split("/"):
            raise CurateError(f"{key}: outside the storage root {self.url}")
        return self.root / key

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            raise CurateError(f"{self.join(prefix)}: no such folder")
        for dirpath, dirnames, filenames in os.walk(base, onerror=None):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                try:
                    stat = path.stat()
                except OSError:
                    continue  # removed while listing
                if not path.is_file():
                    continue
                key = path.relative_to(self.root).as_posix()
                yield ObjectInfo(key=key, size=stat.st_size, version=str(stat.st_mtime_ns))

    def read(self, key: str) -> bytes:
        data = self._path(key).read_bytes()
        self._count(len(data))
        return data

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with self._path(key).open("rb") as f:
            f.seek(start)
            data = f.read(max(0, end - start))
        self._count(len(data))
        return data

    def open(self, key: str) -> BinaryIO:
        raw = self._path(key).open("rb", buffering=0)
        return io.BufferedReader(_CountingReader(raw, self._count))  # type: ignore[arg-type]

    def write(self, key: str, data: bytes) -> None:
        self.write_stream(key, [data])

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def open_storage(url: str) -> Storage:
    """The backend for a URL; the only place that looks at URL schemes."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return LocalStorage(url)
    raise CurateError(
        f"{url}: the {scheme}:// scheme is not supported yet (supported: a folder, file://)"
    )
