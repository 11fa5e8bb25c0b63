"""Discover: list the input, keep the images and videos, cut the list into shards.

A shard is the unit of Prefect work: a few thousand objects whose identities are written
to a manifest in the output location; Prefect only sees the manifest's key and the
shard's content hash. Shard boundaries are content-defined (a boundary follows every key
whose hash is 0 modulo the shard size), so a new object changes one shard, not every
shard after it, and a rerun finds every other shard in the cache. A video is a shard of
its own: it holds thousands of samples (its frames), and its check decodes it start to end.

Every relevant image or video the listing finds ends up in a shard or, with its reason, in
`unreadable`: a broken symlink, a FIFO, a folder it may not read, a bucket key that is not
a clean relative path. The output is never listed as input, even when it lies inside it.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from tasks.errors import ConfigError, CurateError
from tasks.keys import artifact_key, content_key
from tasks.naming import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    is_image,
    is_sample_source,
    name_problem,
)
from tasks.shards import Shard, manifest_bytes
from tasks.storage import ObjectInfo, Storage, Unreadable, open_storage

# A shard is cut at a content-defined boundary, or at this multiple of the shard size so
# that an unlucky run of keys cannot make one huge shard.
MAX_SHARD_FACTOR = 4


def parse_patterns(text: str) -> list[tuple[bool, str]]:
    """`relevant_filenames_file` lines: (include?, glob). Blank lines and `#` are ignored;
    as in gitignore, `\\#` and `\\!` start a pattern with a literal `#` or `!`."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("\\#", "\\!")):
            patterns.append((True, line[1:]))
            continue
        include = not line.startswith("!")
        pattern = line.lstrip("!").strip().lstrip("/")
        patterns.append((include, pattern))
    return patterns


def pattern_for(key: str) -> str:
    """A line of a relevant-filenames file that matches exactly `key`."""
    line = glob.escape(key)
    return "\\" + line if line.startswith(("#", "!")) else line


def is_relevant(key: str, patterns: list[tuple[bool, str]]) -> bool:
    """gitignore semantics: the last matching pattern decides; no match means excluded
    when there are include patterns, included otherwise."""
    decision = not any(include for include, _ in patterns)
    for include, pattern in patterns:
        if fnmatch.fnmatchcase(key, pattern):
            decision = include
    return decision


def load_patterns(
    location: str, input_storage: Storage, output_storage: Storage
) -> list[tuple[bool, str]]:
    """Read a relevant-filenames file: a URL or absolute path, or a name relative to the
    input location, else to the output location."""
    try:
        if "://" in location or location.startswith("/"):
            parent, name = location.rstrip("/").rsplit("/", 1)
            text = open_storage(parent or "/").read_text(name)
        elif input_storage.exists(location):
            text = input_storage.read_text(location)
        else:
            text = output_storage.read_text(location)
    except (OSError, UnicodeDecodeError) as exc:
        raise CurateError(
            f"datasource.relevant_filenames_file: cannot read {location} ({exc})"
        ) from None
    return parse_patterns(text)


def output_inside(input_storage: Storage, output_storage: Storage) -> str | None:
    """The key prefix (`out/`) of the output inside the input, which discovery leaves out,
    or None when it lies elsewhere. The output cannot be the input itself: its runs, cache
    and datapool would sit among the inputs."""
    inside = input_storage.prefix_of(output_storage)
    if inside == "":
        raise ConfigError(
            f"output {output_storage.url}: is the input itself; use another folder (one "
            "inside the input is fine: discovery leaves it out)"
        )
    return inside


def _is_boundary(key: str, shard_size: int) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_size == 0


def cut_shards(objects: Iterable[ObjectInfo], shard_size: int) -> Iterator[list[ObjectInfo]]:
    """Group objects, in order, at content-defined boundaries."""
    current: list[ObjectInfo] = []
    for obj in objects:
        current.append(obj)
        if _is_boundary(obj.key, shard_size) or len(current) >= shard_size * MAX_SHARD_FACTOR:
            yield current
            current = []
    if current:
        yield current


@dataclass
class Discovery:
    """What a listing found; filled in while its shards are handed out."""

    shards: list[Shard] = field(default_factory=list)
    discovered: int = 0  # images and videos found (after relevant-filename filtering)
    videos: int = 0
    skipped: int = 0  # objects that are neither or not relevant
    known: int = 0  # relevant objects the datapool holds unchanged: not processed again
    # Relevant names listed but not offered as objects, with why (`Unreadable`, unsafe
    # bucket keys); they are in no shard and not in the datapool, so each run lists them.
    unreadable: dict[str, str] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)  # of the objects in the shards
    total_bytes: int = 0
    retries: int = 0
    seconds: float = 0.0  # spent listing and writing manifests, not waiting on the consumer


def discover_shards(
    input_storage: Storage,
    output_storage: Storage,
    shard_size: int,
    patterns: list[tuple[bool, str]] | None,
    found: Discovery,
    is_known: Callable[[ObjectInfo], bool] | None = None,
) -> Iterator[Shard]:
    """List the input lazily and yield each shard as soon as its manifest is written, so
    work on the first shards starts while a large bucket is still being listed. Objects
    `is_known` says were processed before (the datapool, same identity) are left out."""

    videos: deque[ObjectInfo] = deque()
    output_prefix = output_inside(input_storage, output_storage)

    def images() -> Iterator[ObjectInfo]:
        """Relevant images, in listing order; relevant videos are put aside in `videos`
        as they pass, so each becomes a shard just before the image shard it was listed
        in (which is cut only when complete)."""
        for obj in input_storage.scan():
            if output_prefix is not None and obj.key.startswith(output_prefix):
                continue  # our own runs, cache and datapool: never an input
            relevant = patterns is None or is_relevant(obj.key, patterns)
            # A folder that cannot be read may hold anything: listed whatever its name.
            folder = isinstance(obj, Unreadable) and obj.key.endswith("/")
            wanted = folder or is_sample_source(obj.key)
            if not relevant or not wanted:
                found.skipped += 1
            elif isinstance(obj, Unreadable):
                found.unreadable[obj.key] = obj.reason
            elif problem := name_problem(obj.key):
                found.unreadable[obj.key] = problem
            elif is_known is not None and is_known(obj):
                found.known += 1
            elif is_image(obj.key):
                yield obj
            else:
                videos.append(obj)

    def groups() -> Iterator[tuple[str, list[ObjectInfo]]]:
        for objects in cut_shards(images(), shard_size):
            while videos:
                yield "video", [videos.popleft()]
            yield "images", objects
        while videos:
            yield "video", [videos.popleft()]

    started = time.perf_counter()
    for index, (kind, objects) in enumerate(groups()):
        data = manifest_bytes(objects)
        identity = content_key("shard", input=input_storage.url, manifest=data.decode())
        manifest = artifact_key("shards", identity, ".jsonl")
        if not output_storage.exists(manifest):
            output_storage.write(manifest, data)
        total = sum(o.size for o in objects)
        shard = Shard(
            index, identity, manifest, len(objects), total, kind, objects[0].key, objects[-1].key
        )
        found.shards.append(shard)
        found.discovered += shard.count
        found.keys.update(o.key for o in objects)
        found.videos += shard.count if kind == "video" else 0
        found.total_bytes += shard.total_bytes
        found.retries = input_storage.retries + output_storage.retries
        found.seconds += time.perf_counter() - started
        yield shard
        started = time.perf_counter()
    found.seconds += time.perf_counter() - started
    found.retries = input_storage.retries + output_storage.retries
    if found.discovered == 0 and found.known == 0 and not found.unreadable:
        raise CurateError(
            f"input {input_storage.url}: no images or videos found "
            f"({', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))})"
        )


def discover(
    input_storage: Storage,
    output_storage: Storage,
    shard_size: int,
    patterns: list[tuple[bool, str]] | None = None,
) -> Discovery:
    """The whole listing at once (for tools and tests; the flow streams it)."""
    found = Discovery()
    for _ in discover_shards(input_storage, output_storage, shard_size, patterns, found):
        pass
    return found
