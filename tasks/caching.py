"""What every step shares as a Prefect task: content-identity caching, retries, memory.

A step's cache key is the identity of the objects it reads (key, size, version), its own
settings and `PIPELINE_VERSION`. Prefect's `TASK_SOURCE` policy hashes only a task's own
text, not the helpers it calls, so the version constant is bumped whenever step logic
changes. Artifacts (Parquet, .npy) live in the output location under the same key, and so
do Prefect's cache records (`OutputResults` for buckets), so the two never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hashlib
import inspect
from collections.abc import Callable
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Task, get_run_logger, task
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.exceptions import MissingContextError
from prefect.filesystems import WritableFileSystem
from prefect.tasks import exponential_backoff

from tasks.keys import CACHE_PREFIX, step_key
from tasks.monitor import step_activity
from tasks.storage import LocalStorage, Storage, open_storage

P = ParamSpec("P")
R = TypeVar("R")


def task_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`."""
    return step_key(context.task.name, parameters)


# Failures worth a retry: the network or the file system hiccuped. A missing object, a
# permission problem or a user error will fail the same way again.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) and not isinstance(
        exc, _PERMANENT_OS_ERRORS
    )


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


class OutputResults(WritableFileSystem):
    """Prefect's cache records, kept in the output location through our storage layer:
    next to the artifacts they point to, on any backend, readable by every worker."""

    _block_type_name = "Curate Output Results"
    url: str

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self._storage().read, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:  # type: ignore[override]  # Prefect's own pattern
        return self._storage().read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        await asyncio.to_thread(self._storage().write, path, content)
        return path

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:  # type: ignore[override]
        self._storage().write(path, content)
        return path

    def _storage(self) -> Storage:
        return _results_storage(self.url)


@functools.lru_cache(maxsize=16)
def _results_storage(url: str) -> Storage:
    """One client per output for all cache records (building one costs ~0.1 s)."""
    return open_storage(f"{url.rstrip('/')}/{CACHE_PREFIX}/results")


def result_storage(output: Storage) -> Path | OutputResults:
    """Prefect's cache records live next to the artifacts they point to, so deleting the
    output deletes both, and a cache hit never points at a missing file."""
    if isinstance(output, LocalStorage):
        return output.root / CACHE_PREFIX / "results"
    # Prefect wants result storage saved server-side (so workers elsewhere can load it);
    # the block holds the URL only, credentials stay in each machine's environment.
    block = OutputResults(url=output.url)
    block.save(
        f"curate-results-{hashlib.sha256(output.url.encode()).hexdigest()[:16]}", overwrite=True
    )
    return block


def release_memory() -> None:
    """Give memory freed by a step back to the OS. Decoding on many threads fragments
    glibc's per-thread heaps, and a long run would otherwise keep every step's peak."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_current_key: ContextVar[str] = ContextVar("current_step_key")


def current_step_key() -> str:
    """The cache key of the step run in progress (set by `cached_step`, from the same
    arguments Prefect's cache key is made of): it names the step's artifacts."""
    return _current_key.get()


# The step wrapper reaches the context variable through these: a task sent to another
# process (Ray) carries its wrapper pickled by value, and a ContextVar cannot be pickled,
# while module functions travel by reference.
def _enter_step(key: str) -> Token[str]:
    return _current_key.set(key)


def _leave_step(token: Token[str]) -> None:
    _current_key.reset(token)


def _as_step(name: str, fn: Callable[P, R], monitor_as: str) -> Callable[P, R]:
    """`fn` with its cache key in `current_step_key`, its activity reported to the run's
    monitor (as step `monitor_as`, on the GPU when its `device` argument is CUDA), a log
    line of what it did (the result's `summary`, when it has one) and its freed memory
    given back."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        token = _enter_step(step_key(name, dict(bound.arguments)))
        on_gpu = str(bound.arguments.get("device", "")).startswith("cuda")
        try:
            with step_activity(monitor_as, uses_gpu=on_gpu):
                result = fn(*args, **kwargs)
        finally:
            _leave_step(token)
            release_memory()
        summary = getattr(result, "summary", None)
        if summary:
            with contextlib.suppress(MissingContextError):  # called outside a run (tests)
                get_run_logger().info("%s", summary)
        return result

    return wrapper


def cached_step(
    name: str, retries: int = 3, monitor_as: str | None = None
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A pipeline step as a Prefect task named `name`: content-identity cache (the key
    also names its artifacts: `current_step_key()`), persisted result, retries with
    backoff and jitter for transient failures only, a log line per run. The monitor and
    report.json know it as `monitor_as` (default: `name`)."""

    def decorate(fn: Callable[P, R]) -> Task[P, R]:
        return step_task(_as_step(name, fn, monitor_as or name))

    step_task = task(
        name=name,
        cache_key_fn=task_cache_key,
        persist_result=True,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0.5,
        retry_condition_fn=retry_if_transient,
    )
    return decorate
