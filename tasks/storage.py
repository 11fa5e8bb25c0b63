"""One storage interface for every read and write of the pipeline.

Steps never open paths: they ask a `Storage` rooted at the input or output URL for keys
relative to that root (`photos/a.jpg`, `/` separators). A key is a name (`tasks.naming`):
the backends escape what a listing finds and unescape what they are asked for, so a file
name with a newline or bytes that are not UTF-8 is a plain line of text past this layer.
Listing is lazy and in key order (the order buckets list in), so shards come out the same
on every backend; `scan` also says what a listing had to leave out (a broken symlink, a
FIFO, a folder it may not read), so that nothing vanishes silently. Each backend
counts the bytes it reads and the retries it needed, so the report can say what every
step cost in traffic, and tells the run's monitor while a read is in flight (so the
report can say which step waited on storage). Writes are atomic (a reader sees the old
object or the new one, never half of one). Transient failures are retried with
exponential backoff and jitter; a missing object is a FileNotFoundError; anything the
user must fix is a CurateError naming the URL.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import random
import shutil
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlparse

from tasks.errors import CurateError, foreign
from tasks.monitor import reading, step_threads
from tasks.naming import escape_name, unescape_name
from tasks.stop import raise_if_stopped


@dataclass(frozen=True)
class ObjectInfo:
    """An object's identity: a change in any field means new content."""

    key: str
    size: int
    version: str  # mtime (local), ETag (S3), generation (GCS), ETag (Azure)


@dataclass(frozen=True)
class Unreadable:
    """What a listing found but cannot offer as an object, and why: a broken or looping
    symlink, one that leads out of the root or to a folder, a FIFO, socket or device
    (never opened: a FIFO would block the reader), a file or folder this process may not
    read. Folders' keys end in `/`."""

    key: str
    reason: str


class NotRegularFile(OSError):
    """The key names something other than a regular file now (it was one when listed)."""


def unreadable_reason(exc: BaseException) -> str | None:
    """The reason to list an object with when reading it failed for good (its access
    rights, what it is), or None for a failure that is not the object's (the disk, the
    network): those stop the run, and a rerun tries again."""
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    if isinstance(exc, (NotRegularFile, IsADirectoryError)):
        return "not a regular file"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symlink loop"
    return None


T = TypeVar("T")

# Attempts of one operation before a transient failure is given up on, and the backoff.
MAX_ATTEMPTS = 8
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 10.0


class Storage(ABC):
    """A root location; every key is relative to it."""

    # Concurrent reads worth having in flight: high for remote stores (latency-bound),
    # low for local disks.
    read_concurrency = 4
    # Attempts per operation in `_retrying`; 1 where the client library retries itself.
    attempts = MAX_ATTEMPTS

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._bytes_read = 0
        self._retries = 0

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    @property
    def retries(self) -> int:
        return self._retries

    def _count(self, n: int) -> None:
        with self._lock:
            self._bytes_read += n

    def _count_retries(self, n: int) -> None:
        with self._lock:
            self._retries += n

    def is_transient(self, exc: BaseException) -> bool:
        """Worth retrying: throttling, timeouts, resets. Backends add their own types."""
        return isinstance(exc, (ConnectionError, TimeoutError))

    def _retrying(self, operation: Callable[[], T], where: str) -> T:
        """Run `operation`, retrying transient failures with full-jitter exponential
        backoff; when they persist, the storage is unreachable: a CurateError."""
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except Exception as exc:
                if not self.is_transient(exc):
                    raise
                if attempt == self.attempts:
                    raise CurateError(
                        f"{where}: unreachable after {attempt} attempt(s) ({foreign(exc, 160)})"
                    ) from None
                self._count_retries(1)
                delay = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
                time.sleep(random.uniform(0, delay))
        raise AssertionError("unreachable")  # pragma: no cover

    def read_many(
        self, keys: Iterable[str], concurrency: int | None = None
    ) -> Iterator[tuple[str, bytes | Exception]]:
        """(key, bytes or the exception) for each key, in order, with up to
        `concurrency` reads in flight and no more than that many objects held ahead."""
        window = concurrency or self.read_concurrency
        with ThreadPoolExecutor(max_workers=window, initializer=step_threads()) as pool:
            yield from _in_order(((key, pool.submit(self.read, key)) for key in keys), window)

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under `prefix`, lazily, in key order."""

    def scan(self, prefix: str = "") -> Iterator[ObjectInfo | Unreadable]:
        """`list`, with what it leaves out in its place (a bucket's listing holds objects
        only; a folder's can hold more)."""
        yield from self.list(prefix)

    def prefix_of(self, other: Storage) -> str | None:
        """The key prefix (`out/`) under which `other`'s root lies inside this root, ""
        when both are the same place, None when `other` is not inside."""
        return None

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

    def write_stream(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Create or atomically replace the object from chunks (backends that can,
        stream them instead of joining)."""
        self.write(key, b"".join(chunks))

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create the object only if there is none: True if this call created it, False if
        it existed. Of writers racing for one key exactly one gets True, and the object is
        never seen half-written: the primitive under locks and never-reused names.

        Give each writer's `data` something unique (a token). A remote create can be
        retried (by us or by the client library) after its first attempt did land; the
        retry then fails its precondition, so the object is read back and compared, and
        identical bytes from another writer would pass for our own."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def probe(self) -> None:
        """A CurateError unless the location can be used with the credentials at hand; a
        local folder that does not exist yet is fine (the first write makes it)."""
        self.exists("LATEST")

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; missing objects are fine."""

    def delete_folder(self, folder: str) -> None:
        """Remove every object under `folder` (a missing one is fine)."""
        for obj in list(self.list(_folder(folder) + "/")):
            self.delete(obj.key)

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether the object exists with exactly `data` (see `create_exclusive`)."""
        try:
            return self.read(key) == data
        except FileNotFoundError:
            return False

    def read_text(self, key: str) -> str:
        return self.read(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write(key, text.encode("utf-8"))

    def join(self, key: str) -> str:
        """The URL of a key, for messages and references."""
        return self.url.rstrip("/") + "/" + key


def process_objects(
    storage: Storage, keys: Iterable[str], work: Callable[[str, bytes], T], workers: int
) -> Iterator[tuple[str, T | Exception]]:
    """Read `keys` with the storage's concurrency and run `work(key, data)` on `workers`
    threads (Pillow and numpy release the GIL); (key, result or exception) in key order.
    Both stages run a bounded window ahead, so memory holds a few dozen objects."""
    with ThreadPoolExecutor(max_workers=workers, initializer=step_threads()) as pool:
        submitted = (
            (key, data if isinstance(data, Exception) else pool.submit(work, key, data))
            for key, data in storage.read_many(keys)
        )
        yield from _in_order(submitted, 2 * workers)


def _in_order(
    submitted: Iterable[tuple[str, Future[Any] | Exception]], window: int
) -> Iterator[tuple[str, Any]]:
    """Results of lazily submitted work, in submission order, never more than `window`
    submissions ahead of the consumer (the generator is only advanced when one is due)."""
    pending: deque[tuple[str, Future[Any] | Exception]] = deque()
    for item in submitted:
        raise_if_stopped()
        pending.append(item)
        if len(pending) >= window:
            yield _outcome(*pending.popleft())
    while pending:
        raise_if_stopped()
        yield _outcome(*pending.popleft())


def _outcome(key: str, future: Future[Any] | Exception) -> tuple[str, Any]:
    if isinstance(future, Exception):
        return key, future
    try:
        return key, future.result()
    except Exception as exc:
        return key, exc


class RangeReader(io.RawIOBase):
    """A seekable stream over an object that reads it by ranges (for remote stores)."""

    def __init__(self, storage: Storage, key: str, size: int) -> None:
        self._storage, self._key, self._size = storage, key, size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        end = min(self._size, self._position + len(buffer))
        if end <= self._position:
            return 0
        data = self._storage.read_range(self._key, self._position, end)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def open_ranges(storage: Storage, key: str, size: int, buffer_size: int = 1 << 20) -> BinaryIO:
    """A buffered seekable stream: each remote request fetches at least `buffer_size`."""
    return io.BufferedReader(RangeReader(storage, key, size), buffer_size)  # type: ignore[return-value]


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
        with reading():
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
        path = unescape_name(key)
        if path.startswith("/") or ".." in path.split("/") or "\x00" in path:
            raise CurateError(f"{key}: outside the storage root {self.url}")
        return self.root / path

    def prefix_of(self, other: Storage) -> str | None:
        if not isinstance(other, LocalStorage) or not other.root.is_relative_to(self.root):
            return None
        inside = other.root.relative_to(self.root).as_posix()
        return "" if inside == "." else escape_name(inside) + "/"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return (o for o in self.scan(prefix) if isinstance(o, ObjectInfo))

    def scan(self, prefix: str = "") -> Iterator[ObjectInfo | Unreadable]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            raise CurateError(f"{self.join(prefix)}: no such folder")
        if not os.access(base, os.R_OK | os.X_OK, **_EFFECTIVE):
            raise CurateError(f"{self.join(prefix)}: cannot list the folder (permission denied)")
        relative = base.relative_to(self.root).as_posix()
        yield from self._walk(base, "" if relative == "." else escape_name(relative) + "/")

    def _walk(self, directory: Path, key_prefix: str) -> Iterator[ObjectInfo | Unreadable]:
        """Depth first, in plain string order of the full keys: a folder sorts as
        `name/`, which puts `a.jpg` before `a/b.jpg` before `a0.jpg`, as buckets do."""
        try:
            entries = list(os.scandir(directory))
        except PermissionError:
            yield Unreadable(key_prefix, "unreadable folder: permission denied")
            return
        except OSError:
            return  # removed while listing
        named = [(escape_name(e.name), e) for e in entries]
        folders = {e.name for e in entries if e.is_dir(follow_symlinks=False)}
        for name, entry in sorted(named, key=lambda n: n[0] + "/" * (n[1].name in folders)):
            if entry.name in folders:
                yield from self._walk(Path(entry.path), key_prefix + name + "/")
            elif (found := self._entry(entry, key_prefix + name)) is not None:
                yield found

    def _entry(self, entry: os.DirEntry[str], key: str) -> ObjectInfo | Unreadable | None:
        """A listed non-folder: a regular file to read (through a symlink that stays in
        the root), or what it is instead; None when it was removed while listing."""
        try:
            info = entry.stat()  # through a symlink
        except FileNotFoundError:
            return Unreadable(key, "broken symlink") if entry.is_symlink() else None
        except OSError as exc:
            return Unreadable(key, unreadable_reason(exc) or f"unreadable: {exc.strerror}")
        if entry.is_symlink():
            to_folder = stat.S_ISDIR(info.st_mode)
            where = key + "/" if to_folder else key
            if not Path(os.path.realpath(entry.path)).is_relative_to(self.root):
                return Unreadable(where, "symlink leads outside the folder (not followed)")
            if to_folder:
                return Unreadable(where, "symlink to a folder (not followed)")
        if not stat.S_ISREG(info.st_mode):
            return Unreadable(key, f"not a regular file ({_kind(info.st_mode)})")
        # Root reads anything; others are told here, before a check would cache a verdict.
        if not os.access(entry.path, os.R_OK, **_EFFECTIVE):
            return Unreadable(key, "unreadable: permission denied")
        return ObjectInfo(key=key, size=info.st_size, version=str(info.st_mtime_ns))

    def _open(self, key: str) -> int:
        """A descriptor of the regular file `key`. Opened without blocking, so a name that
        became a FIFO since the listing is refused instead of waited on."""
        fd = os.open(self._path(key), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotRegularFile(errno.EINVAL, "not a regular file", key)
        return fd

    def read(self, key: str) -> bytes:
        with reading(), os.fdopen(self._open(key), "rb") as f:
            data = f.read()
        self._count(len(data))
        return data

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with reading(), os.fdopen(self._open(key), "rb") as f:
            f.seek(start)
            data = f.read(max(0, end - start))
        self._count(len(data))
        return data

    def open(self, key: str) -> BinaryIO:
        raw = os.fdopen(self._open(key), "rb", buffering=0)
        return io.BufferedReader(_CountingReader(raw, self._count))  # type: ignore[arg-type]

    def write(self, key: str, data: bytes) -> None:
        self.write_stream(key, [data])

    def write_stream(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
        try:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
        try:
            tmp.write_bytes(data)
            # A hard link publishes the finished file under its name, and fails rather than
            # replaces when the name exists (os.replace would replace, open("x") would
            # show the file half-written).
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_folder(self, folder: str) -> None:
        # The folder goes too (a bucket has no empty folders), with any temporary files
        # that a killed writer left in it.
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._path(_folder(folder)))


# Access checks by the effective user (what an open would be checked against).
_EFFECTIVE = {"effective_ids": True} if os.access in os.supports_effective_ids else {}

_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def _temporary(path: Path) -> Path:
    """A name beside `path` that no other writer (process, thread) uses at the same time,
    within the 255 bytes a file name may have however long `path`'s name is (its start,
    then a hash of all of it)."""
    own = f".{os.getpid()}.{threading.get_ident()}.tmp"
    name = path.name
    if len(f".{name}{own}".encode("utf-8", "surrogateescape")) > 255:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        start = name.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "ignore")
        name = f"{start}~{digest}"
    return path.with_name(f".{name}{own}")


def _folder(folder: str) -> str:
    """`folder` without its trailing slash; never the root (`delete_folder` would empty
    the whole location)."""
    if not folder.strip("/"):
        raise ValueError("delete_folder needs a folder, not the root")
    return folder.rstrip("/")


def open_storage(url: str) -> Storage:
    """The backend for a URL; the only place that looks at URL schemes."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return LocalStorage(url)
    from tasks.cloud import BACKENDS

    if scheme not in BACKENDS:
        raise CurateError(
            f"{url}: unsupported scheme {scheme}:// (use a folder, file://, s3://, gs://, az://)"
        )
    return BACKENDS[scheme](url)
