"""Datapool: what earlier runs into the same output already processed and selected.

A scheduled run skips input objects the datapool knows with the same identity (key, size,
version) and selects new samples against the ones already selected. It lives in
`<output>/datapool/`:

    CURRENT                   the published version's name; writing it is the commit point
    LOCK                      held by the one run allowed to commit (DatapoolLock)
    v000007/objects.parquet   one row per processed input object, with its outcome
    v000007/selected.parquet  one row per selected sample (a video gives several per object;
                              a frame's row keeps its pixel hash, so copies are duplicates)
    v000007/embeddings.npy    float32, rows aligned with selected.parquet
    v000007/manifest.json     written last: parent, model, counts, each file's size and sha256

A version folder is written once, under a number never used before, and published by one
atomic write of CURRENT: a run killed at any moment leaves the previous version current,
and the next commit prunes what it left. Loading verifies every file against the manifest
and fails loudly: a datapool silently ignored would reselect everything it holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from tasks.errors import CurateError
from tasks.formats import npy_bytes, read_parquet_bytes, to_parquet_bytes
from tasks.storage import ObjectInfo, Storage

log = logging.getLogger(__name__)

DIR = "datapool"
CURRENT = f"{DIR}/CURRENT"
LOCK = f"{DIR}/LOCK"
FORMAT = 1
STATUSES = ("selected", "not_selected", "corrupt", "duplicate")
FILES = ("objects.parquet", "selected.parquet", "embeddings.npy")
_VERSION = re.compile(r"v(\d{6,})")

OBJECTS_SCHEMA = pa.DataFrameSchema(
    {
        "key": pa.Column(str, unique=True),
        "size": pa.Column("int64", pa.Check.ge(0)),
        "version": pa.Column(str),
        "status": pa.Column(str, pa.Check.isin(STATUSES)),
        "reason": pa.Column(str, nullable=True),
        "duplicate_of": pa.Column(str, nullable=True),
        "content_hash": pa.Column(str, nullable=True),
        "pixel_hash": pa.Column(str, nullable=True),
        "run_id": pa.Column(str),
    },
    strict=True,
    ordered=True,
    coerce=True,
)
SELECTED_SCHEMA = pa.DataFrameSchema(
    {
        "name": pa.Column(str, unique=True),
        "key": pa.Column(str),
        "run_id": pa.Column(str),
        # A selected video frame's pixel hash, so that copies of it in later runs are
        # duplicates of it (an image's hashes are its object's).
        "pixel_hash": pa.Column(str, nullable=True),
    },
    strict=True,
    ordered=True,
    coerce=True,
)


@dataclass(eq=False)
class Datapool:
    """One version of the datapool, in memory."""

    version: str | None  # None: not published (no datapool yet, or merged, not committed)
    objects: pd.DataFrame  # OBJECTS_SCHEMA
    selected: pd.DataFrame  # SELECTED_SCHEMA
    embeddings: np.ndarray  # float32 (len(selected), dim); (0, 0) when there are none
    model: dict[str, Any] | None  # identity of the model that made the embeddings
    run_id: str | None = None  # the run that committed this version
    _identities: dict[str, tuple[int, str]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def empty(cls) -> Datapool:
        objects = OBJECTS_SCHEMA.validate(pd.DataFrame(columns=list(OBJECTS_SCHEMA.columns)))
        selected = SELECTED_SCHEMA.validate(pd.DataFrame(columns=list(SELECTED_SCHEMA.columns)))
        return cls(None, objects, selected, np.zeros((0, 0), dtype=np.float32), None)

    @property
    def size(self) -> int:
        return len(self.objects)

    def is_known(self, obj: ObjectInfo) -> bool:
        """Processed before with the same identity: nothing about it can have changed.
        Asked once per listed object (millions), so the lookup is a dict built once."""
        if self._identities is None:
            rows = self.objects[["key", "size", "version"]].itertuples(index=False)
            self._identities = {key: (int(size), version) for key, size, version in rows}
        return self._identities.get(obj.key) == (obj.size, obj.version)

    def known_keys(self) -> set[str]:
        return set(self.objects["key"])


def merge(
    previous: Datapool,
    processed: pd.DataFrame,
    selected: pd.DataFrame,
    embeddings: np.ndarray,
    model: dict[str, Any],
) -> Datapool:
    """`previous` updated with one run. Rows of `processed` replace the rows of their keys
    (an object whose identity changed, or every object with process_all), and the
    samples selected from a replaced object go with their embeddings: the run has judged
    it anew. `selected` and `embeddings` (this run's picks) are appended; `model` becomes
    the identity (a caller that changed the model re-embedded what it keeps)."""
    processed = OBJECTS_SCHEMA.validate(processed)
    selected = SELECTED_SCHEMA.validate(selected)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(selected):
        raise ValueError(
            f"{len(selected)} selected samples but embeddings of shape {embeddings.shape}"
        )
    replaced = previous.objects["key"].isin(processed["key"])
    objects = pd.concat([previous.objects[~replaced], processed], ignore_index=True)
    objects = objects.sort_values("key", ignore_index=True)
    kept = ~previous.selected["key"].isin(processed["key"]).to_numpy()
    old = previous.embeddings[kept]
    if len(old) and embeddings.shape[1] and old.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embeddings of dimension {embeddings.shape[1]} cannot join the datapool's "
            f"{old.shape[1]} (model {previous.model}); re-embed the datapool's samples"
        )
    dim = embeddings.shape[1] or old.shape[1] or previous.embeddings.shape[1]
    vectors = np.concatenate([old.reshape(len(old), dim), embeddings.reshape(len(embeddings), dim)])
    samples = pd.concat([previous.selected[kept], selected], ignore_index=True)
    if samples["name"].duplicated().any():
        names = sorted(set(samples["name"][samples["name"].duplicated()]))[:5]
        raise ValueError(f"samples selected twice: {names}")
    if missing := set(samples["key"]) - set(objects["key"]):
        raise ValueError(f"selected samples of objects not in the datapool: {sorted(missing)[:5]}")
    return Datapool(None, OBJECTS_SCHEMA.validate(objects), samples, vectors, dict(model))


def load_datapool(storage: Storage) -> Datapool:
    """The published version under `storage` (the output root), every file verified."""
    version = _current(storage)
    if version is None:
        return Datapool.empty()
    if not _VERSION.fullmatch(version):
        raise _untrusted(storage, CURRENT, f"names no version ({version[:40]!r})")
    manifest_key = f"{DIR}/{version}/manifest.json"
    try:
        manifest = json.loads(_read(storage, manifest_key))
        files = manifest["files"]
        valid = manifest["format"] == FORMAT and set(files) == set(FILES)
        valid = valid and all(isinstance(entry, dict) for entry in files.values())
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise _untrusted(storage, manifest_key, "is not a format-1 datapool manifest")
    data = {n: _read(storage, f"{DIR}/{version}/{n}", m) for n, m in manifest["files"].items()}
    try:
        objects = OBJECTS_SCHEMA.validate(read_parquet_bytes(data["objects.parquet"]))
        selected = read_parquet_bytes(data["selected.parquet"])
        if "pixel_hash" not in selected:  # written before frames' hashes were kept
            selected["pixel_hash"] = None
        selected = SELECTED_SCHEMA.validate(selected)
        vectors = np.load(io.BytesIO(data["embeddings.npy"]), allow_pickle=False)
    except (ValueError, OSError, pa.errors.SchemaError) as exc:
        raise _untrusted(
            storage, f"{DIR}/{version}", f"does not parse ({str(exc)[:120]})"
        ) from None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != len(selected):
        raise _untrusted(storage, f"{DIR}/{version}/embeddings.npy", "does not match selected")
    return Datapool(
        version, objects, selected, vectors, manifest.get("model"), manifest.get("run_id")
    )


def committed_run(storage: Storage) -> str | None:
    """The id of the run that committed the published version (None without one); reads
    its manifest only, unverified: for telling a committed run from a failed one."""
    version = _current(storage)
    if version is None or not _VERSION.fullmatch(version):
        return None
    try:
        manifest = json.loads(storage.read(f"{DIR}/{version}/manifest.json"))
    except (FileNotFoundError, ValueError):
        return None
    run_id = manifest.get("run_id") if isinstance(manifest, dict) else None
    return run_id if isinstance(run_id, str) else None


def discard_run(storage: Storage, run_id: str) -> None:
    """Remove the folder of a run that failed before it committed the datapool, so that
    failed runs do not pile up half-written folders (a committed run's folder stays: it
    is the datapool's, and LATEST is repaired to it). Best effort: the run's own error is
    what the user must see."""
    try:
        if committed_run(storage) != run_id:
            storage.delete_folder(f"runs/{run_id}")
    except (OSError, CurateError) as exc:
        log.warning("could not remove the failed run's folder runs/%s (%s)", run_id, exc)


def _current(storage: Storage) -> str | None:
    try:
        return storage.read_text(CURRENT).strip()
    except FileNotFoundError:
        return None


def _read(storage: Storage, key: str, expected: dict[str, Any] | None = None) -> bytes:
    """A file of the published version, checked against its manifest entry."""
    try:
        data = storage.read(key)
    except FileNotFoundError:
        raise _untrusted(storage, key, "is missing") from None
    if expected is not None and (
        len(data) != expected.get("size") or _sha256(data) != expected.get("sha256")
    ):
        raise _untrusted(storage, key, "is corrupt (size or sha256 differs from the manifest)")
    return data


def _untrusted(storage: Storage, key: str, problem: str) -> CurateError:
    return CurateError(
        f"datapool {storage.join(key)} {problem}; restore it, or delete {storage.join(DIR)} "
        "to start a new datapool (every object is then processed again)"
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def next_version(storage: Storage, previous: Datapool) -> str:
    """The name the next commit after `previous` publishes (stable while the lock is
    held): one past every version folder there is, published or left by a crash."""
    existing = _version_folders(storage)
    return f"v{max([_number(previous.version)] + [_number(v) for v in existing]) + 1:06d}"


def commit(
    storage: Storage,
    previous: Datapool,
    new: Datapool,
    run_id: str,
    keep_history: int,
    version: str | None = None,
) -> str:
    """Publish `new` as the version after `previous` (named `version`, by default
    `next_version`); returns its name. Files first, the manifest last, then CURRENT: until
    that write, readers see `previous` whole."""
    if keep_history < 1:
        raise ValueError("keep_history must keep at least the current version")
    if new.embeddings.ndim != 2 or len(new.embeddings) != len(new.selected):
        raise ValueError(f"{len(new.selected)} samples, embeddings {new.embeddings.shape}")
    existing = _version_folders(storage)
    version = version or next_version(storage, previous)
    if version in existing:
        raise ValueError(f"datapool version {version} exists already")
    files = {
        "objects.parquet": to_parquet_bytes(OBJECTS_SCHEMA.validate(new.objects)),
        "selected.parquet": to_parquet_bytes(SELECTED_SCHEMA.validate(new.selected)),
        "embeddings.npy": npy_bytes(np.asarray(new.embeddings, dtype=np.float32)),
    }
    for name, data in files.items():
        storage.write(f"{DIR}/{version}/{name}", data)
    counts = {"objects": len(new.objects), "selected_samples": len(new.selected)}
    counts |= {s: int((new.objects["status"] == s).sum()) for s in STATUSES}
    manifest = {
        "format": FORMAT,
        "version": version,
        "parent": previous.version,
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": new.model,
        "counts": counts,
        "embedding_dim": int(new.embeddings.shape[1]),
        "files": {n: {"size": len(d), "sha256": _sha256(d)} for n, d in files.items()},
    }
    storage.write_text(f"{DIR}/{version}/manifest.json", json.dumps(manifest, indent=1))
    # The lock keeps runs apart; this catches one that committed without it (a lost update).
    if (current := _current(storage)) != previous.version:
        raise CurateError(
            f"datapool {storage.join(DIR)} moved to {current} while this run worked from "
            f"{previous.version}; another run committed: run again to build on its version"
        )
    storage.write_text(CURRENT, version + "\n")
    _prune(storage, version, previous.version, existing, keep_history)
    return version


def _version_folders(storage: Storage) -> set[str]:
    try:
        listing = list(storage.list(DIR + "/"))
    except CurateError:
        if storage.exists(CURRENT):
            raise
        return set()  # a local folder not made yet
    parts = (o.key.split("/") for o in listing)
    return {p[1] for p in parts if len(p) == 3 and _VERSION.fullmatch(p[1])}


def _number(version: str | None) -> int:
    match = _VERSION.fullmatch(version or "")
    return int(match.group(1)) if match else 0


def _prune(
    storage: Storage, version: str, parent: str | None, existing: set[str], keep: int
) -> None:
    """Keep the newest `keep` published versions (the parent chain from `version`);
    delete the older ones and the folders of commits that died before CURRENT. Only
    folders listed before this commit: a newer one may be another writer's. Failures
    only leave folders for the next commit to prune."""
    kept = [version]
    try:
        while parent and len(kept) < keep:
            kept.append(parent)
            parent = json.loads(storage.read_text(f"{DIR}/{parent}/manifest.json"))["parent"]
        for folder in sorted(existing - set(kept)):
            storage.delete_folder(f"{DIR}/{folder}")
    except (CurateError, OSError, ValueError, KeyError) as exc:
        log.warning("datapool %s: pruning old versions failed (%s)", storage.join(DIR), exc)


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot ("" when unknown): a pid
    reused by a new process has another start."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _this_machine() -> dict[str, Any]:
    """What identifies this boot of this machine: a lock written here can be judged by
    its pid alone (hostnames repeat across containers; machine and boot ids do not)."""
    return {
        "host": socket.gethostname(),
        "machine": _read_first_line("/etc/machine-id"),
        "boot": _read_first_line("/proc/sys/kernel/random/boot_id"),
    }


def holder_is_dead(fields: dict[str, Any]) -> bool:
    """Whether the process that wrote a lock provably no longer runs: it ran on this
    machine (same machine id) and either the machine rebooted since or its pid is gone
    or belongs to a newer process. A lock from elsewhere is never judged dead here."""
    here = _this_machine()
    if not here["machine"] or fields.get("machine") != here["machine"]:
        return False
    if fields.get("boot") != here["boot"]:
        return True
    pid = fields.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = fields.get("pid_start")
    return bool(started) and _process_start(pid) not in ("", started)


class DatapoolLock:
    """`with DatapoolLock(storage, owner):` one run at a time reads and commits the
    datapool. The lock object carries a heartbeat that a daemon thread refreshes every
    `stale_after / 10`, like a lease: a lock goes stale only when its holder died, and
    the next run takes it over. A holder on this machine whose process is gone (SIGKILL,
    the OOM killer, a reboot) is dead at once; one on another machine after `stale_after`
    without a heartbeat (which compares clocks: keep it well above their skew)."""

    def __init__(
        self,
        storage: Storage,
        owner: str,
        stale_after: float = 90.0,
        heartbeat: float | None = None,
    ) -> None:
        self.storage, self.stale_after = storage, stale_after
        self.heartbeat = heartbeat if heartbeat is not None else stale_after / 10
        self.where = storage.join(DIR)
        # The token tells our lock from another's, even one of the same owner.
        self._fields: dict[str, Any] = {
            "owner": owner,
            "token": uuid.uuid4().hex,
            **_this_machine(),
            "pid_start": _process_start(os.getpid()),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(self._fields | {"pid": os.getpid(), "heartbeat": time.time()}).encode()

    def _held(self) -> tuple[bytes, dict[str, Any]] | None:
        """The lock's bytes and fields, or None when there is none. A lock that does not
        parse counts as one without a heartbeat: stale."""
        try:
            data = self.storage.read(LOCK)
        except FileNotFoundError:
            return None
        try:
            fields = dict(json.loads(data))
            for name in ("heartbeat", "acquired"):
                fields[name] = float(fields.get(name, 0.0))
        except (ValueError, TypeError):
            fields = {"heartbeat": 0.0, "acquired": 0.0}
        return data, fields

    def __enter__(self) -> DatapoolLock:
        self._fields["acquired"] = time.time()
        if not self.storage.create_exclusive(LOCK, self._record()):
            held = self._held()
            if held is not None:
                age = time.time() - held[1]["heartbeat"]
                dead = holder_is_dead(held[1])
                if age <= self.stale_after and not dead:
                    raise CurateError(self._locked_message(held[1]))
                log.warning(
                    "datapool %s: taking over the lock of %s (%s)",
                    self.where,
                    held[1].get("owner", "?"),
                    f"its process {held[1].get('pid')} is gone"
                    if dead
                    else f"silent for {age:.0f} s",
                )
                # Of two runs taking over one stale lock, the second finds it changed.
                again = self._held()
                if again is not None and again[0] == held[0]:
                    self.storage.delete(LOCK)
            if not self.storage.create_exclusive(LOCK, self._record()):
                raise CurateError(f"datapool {self.where}: another run took the lock just now")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="datapool-lock", daemon=True)
        self._thread.start()
        return self

    def _locked_message(self, fields: dict[str, Any]) -> str:
        since = datetime.fromtimestamp(fields["acquired"], UTC).isoformat(timespec="seconds")
        return (
            f"datapool {self.where} is locked by {fields.get('owner', '?')} "
            f"({fields.get('host', '?')}, pid {fields.get('pid', '?')}) since {since}; "
            f"it is considered stale after {self.stale_after:.0f} s without a heartbeat"
        )

    def _ours(self) -> bool:
        held = self._held()
        return held is not None and held[1].get("token") == self._fields["token"]

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                if not self._ours():
                    log.error("datapool %s: the lock is no longer ours", self.where)
                    return
                self.storage.write(LOCK, self._record())
            except Exception as exc:  # whatever failed, the next beat tries again
                log.warning("datapool %s: heartbeat failed (%s)", self.where, exc)

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._ours():
                self.storage.delete(LOCK)
        except (CurateError, OSError) as exc:
            log.warning("datapool %s: the lock stays until it is stale (%s)", self.where, exc)


@dataclass(frozen=True)
class RunOutcome:
    """One run's contribution to the datapool, ready for `merge`."""

    objects: pd.DataFrame  # OBJECTS_SCHEMA rows of the objects this run processed
    selected: pd.DataFrame  # SELECTED_SCHEMA rows of this run's picks
    embeddings: np.ndarray  # rows aligned with `selected`


def run_outcome(
    identities: list[ObjectInfo],
    metadata: pd.DataFrame,
    corrupt: dict[str, str],
    duplicates: dict[str, str],
    selected: list[str],
    vectors: np.ndarray,
    run_id: str,
) -> RunOutcome:
    """What a run decided about each object it processed: corrupt (with its reason), a
    duplicate (of which), selected (any of its samples: a video's frames) or not.
    `metadata` holds the run's samples (`filename`, `video`, hashes); `vectors` the
    embeddings of the selected samples, rows in `selected`'s order."""
    objects_of = metadata["video"].fillna(metadata["filename"])  # a frame's is its video
    key_of = dict(zip(metadata["filename"], objects_of, strict=True))
    chosen = {key_of[name] for name in selected}
    images = metadata[metadata["video"].isna()].set_index("filename")
    frame_hashes = metadata[metadata["video"].notna()].set_index("filename")["pixel_hash"]
    rows = []
    for obj in identities:
        status = "not_selected"
        if obj.key in chosen:  # a corrupt video's kept frames can be chosen too
            status = "selected"
        elif obj.key in corrupt:
            status = "corrupt"
        elif obj.key in duplicates:
            status = "duplicate"
        image = images.loc[obj.key] if obj.key in images.index else None
        rows.append(
            {
                "key": obj.key,
                "size": obj.size,
                "version": obj.version,
                "status": status,
                "reason": corrupt.get(obj.key),
                "duplicate_of": duplicates.get(obj.key),
                "content_hash": None if image is None else image["content_hash"],
                "pixel_hash": None if image is None else image["pixel_hash"],
                "run_id": run_id,
            }
        )
    objects = OBJECTS_SCHEMA.validate(pd.DataFrame(rows, columns=list(OBJECTS_SCHEMA.columns)))
    picks = pd.DataFrame(
        {
            "name": selected,
            "key": [key_of[name] for name in selected],
            "run_id": run_id,
            "pixel_hash": [frame_hashes.get(name) for name in selected],
        },
        columns=list(SELECTED_SCHEMA.columns),
    )
    return RunOutcome(objects, SELECTED_SCHEMA.validate(picks), vectors.astype(np.float32))


def prior_for(pool: Datapool, replaced: set[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """What a run selects against: the datapool's selected embeddings and the hashes of
    its selected images and video frames, less those of objects this run processes again.
    A frame's hashes are both its pixel hash, as in the metadata."""
    kept = ~pool.selected["key"].isin(replaced).to_numpy()
    images = pool.objects[
        (pool.objects["status"] == "selected")
        & pool.objects["content_hash"].notna()
        & ~pool.objects["key"].isin(replaced)
    ]
    frames = pool.selected[kept & pool.selected["pixel_hash"].notna().to_numpy()]
    hashes = pd.DataFrame(
        {
            "filename": [*images["key"], *frames["name"]],
            "content_hash": [*images["content_hash"], *frames["pixel_hash"]],
            "pixel_hash": [*images["pixel_hash"], *frames["pixel_hash"]],
        }
    )
    return pool.embeddings[kept], hashes
