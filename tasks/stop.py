"""A stop requested by the user (Ctrl-C, SIGTERM): every loop over objects or batches
asks `raise_if_stopped()` between items, so a run stops within one item instead of
finishing the shard (or the whole run) a worker thread had started.

Only the main thread gets a signal in Python; the worker threads of Prefect's task runner
and of the decode pools learn of it here. The stop is an `Interrupted`, a
KeyboardInterrupt: never caught as a bad object or a failed step, never retried.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

requested = threading.Event()


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop."""


def raise_if_stopped() -> None:
    if requested.is_set():
        raise Interrupted("stop requested")


received: list[int] = []  # the signals `on_signal` was given, in order


def on_signal(signum: int, _frame: FrameType | None) -> None:
    """The first signal stops the run cleanly (the datapool lock is released, nothing is
    half-committed); a second one exits at once."""
    if received:
        os._exit(128 + received[0])
    received.append(signum)
    requested.set()
    name = signal.Signals(signum).name
    print(f"{name}: stopping (again to quit at once)", file=sys.stderr, flush=True)
    raise Interrupted(name)


def exit_code() -> int:
    """The shell's code for a command that a signal stopped: 128 + its number."""
    return 128 + (received[0] if received else signal.SIGINT)


@contextmanager
def stop_threads_on_sigterm() -> Iterator[None]:
    """For a flow run's duration: a SIGTERM (a worker cancelling the run, a container
    stopping) also stops the worker threads at their next item. Prefect's own handler,
    installed for the run, turns it into the run's end in the main thread only, and would
    wait for each running task to finish its whole shard."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stop_then_previous(signum: int, frame: FrameType | None) -> None:
        requested.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, stop_then_previous)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is stop_then_previous:
            signal.signal(signal.SIGTERM, previous)


def install_handlers() -> Callable[[], None]:
    """SIGINT and SIGTERM stop the run; returns a function restoring the old handlers."""
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore
