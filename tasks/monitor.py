"""Monitoring: what each step used while it ran, and what bound it (I/O, CPU or GPU).

A sampler thread wakes every `interval` seconds and reads from /proc the CPU time of each
of this process's threads (and of the child processes the run started), the process's
RSS, and, while a step on a CUDA device runs, the GPU's utilisation and memory (NVML).
Steps say when they run (`step_activity`: every cached step, discover, export, the
report's drawing) and the storage layer says when a read is in flight (`reading`), so a
step's wall time, its time waiting on reads and its bytes read are exact, not sampled.

How CPU is attributed when steps overlap (on a GPU the check of shard i+1 runs while
shard i embeds, and discover lists while the first shards are checked): a thread belongs
to the step it runs, the step's task thread and the pool threads it starts
(`step_threads`), and that thread's CPU goes to that step. The rest (torch's and
ffmpeg's own threads, threads that ended between two samples, Prefect's bookkeeping,
child processes the run started) is shared among the steps active in that interval, in
proportion to how long each was active in it. GPU figures go to the steps whose `device`
is a CUDA device only. A step's CPU figure counts the time its threads ran and the time
they were runnable but waited for a core (the kernel's run-queue delay, from schedstat):
on a machine shared with other work, a step that wants every core is CPU-bound even
when it got few of them.

Everything here is plain Python over /proc: no Prefect, torch or step imports, so the
storage layer may use it. Off Linux (no /proc) the sampler records nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_INTERVAL = 0.25  # seconds between samples: ~0.3 % of one core, see `overhead`

# The verdict's thresholds, as shares of what the step had (cores, GPU, its wall time).
GPU_BOUND = 0.6  # the GPU busy (a kernel running) this share of the samples
CPU_BOUND = 0.7  # threads running or runnable on this share of the cores
IO_BOUND = 0.5  # a read in flight this share of the step's time, more than the cores' share
ONE_CORE = 0.8  # a step that keeps one core this busy and waits on nothing else
CHILDREN_EVERY = 4  # samples between look-ups of the run's child processes
ROUGH_SECONDS = 0.5  # a step shorter than two samples gets a rough figure, and says so

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def available_cores() -> float:
    """The CPUs this process may use: its affinity mask capped by a cgroup CPU quota
    (the machine's facts live in tasks/resources.py)."""
    from tasks.resources import usable_cpus

    return max(1.0, usable_cpus())


class _Busy:
    """Wall time during which at least one of possibly overlapping spans was open."""

    def __init__(self) -> None:
        self.open = 0
        self.since = 0.0
        self.total = 0.0

    def enter(self, now: float) -> None:
        if self.open == 0:
            self.since = now
        self.open += 1

    def leave(self, now: float) -> None:
        self.open -= 1
        if self.open == 0:
            self.total += now - self.since

    def at(self, now: float) -> float:
        return self.total + (now - self.since if self.open else 0.0)


@dataclass
class _Step:
    """What one step accumulated over the run."""

    active: _Busy = field(default_factory=_Busy)
    reads: _Busy = field(default_factory=_Busy)
    read_seconds: float = 0.0  # summed over concurrent reads
    uses_gpu: bool = False
    cpu_seconds: float = 0.0
    wait_seconds: float = 0.0  # runnable, waiting for a core
    rss_peak: int = 0
    gpu_busy: float = 0.0  # utilisation x seconds
    gpu_seconds: float = 0.0  # seconds the GPU was sampled while the step ran
    gpu_memory_peak: int = 0
    samples: int = 0
    seen: float = 0.0  # `active.at` at the previous sample


# /proc readers: each returns zeros when the file is gone (a thread or child ended).


def _read(path: str) -> str:
    try:  # os-level: a third of the cost of open().read() for these small files
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.read(fd, 4096).decode()
        finally:
            os.close(fd)
    except OSError:
        return ""


def _stat_cpu(path: str) -> tuple[float, float]:
    """(own CPU seconds, waited-for children's CPU seconds) from a /proc stat file."""
    text = _read(path)
    if not text:
        return 0.0, 0.0
    fields = text[text.rindex(")") + 2 :].split()
    own = (int(fields[11]) + int(fields[12])) / _TICKS
    return own, (int(fields[13]) + int(fields[14])) / _TICKS


def _schedstat(path: str) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a thread."""
    parts = _read(path).split()
    if len(parts) < 2:
        return 0.0, 0.0
    return int(parts[0]) / 1e9, int(parts[1]) / 1e9


def _rss(pid: int | str) -> int:
    parts = _read(f"/proc/{pid}/statm").split()
    return int(parts[1]) * _PAGE if len(parts) > 1 else 0


def _child_pids(tids: list[str]) -> set[int]:
    pids: set[int] = set()
    for tid in tids:
        pids.update(int(pid) for pid in _read(f"/proc/self/task/{tid}/children").split())
    return pids


class _Gpu:
    """The GPUs' utilisation and memory in use, from NVML (nvidia-ml-py); None where
    there is no NVIDIA driver. Every visible device is read: the busiest one's
    utilisation and the memory in use on all of them together, by every process."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            if self._handles:
                self.name = str(pynvml.nvmlDeviceGetName(self._handles[0]))
            self._nvml = pynvml
        except Exception:  # no library, no driver, no device: no GPU figures
            self._handles = []

    def sample(self) -> tuple[float, int] | None:
        """(utilisation 0..1, bytes in use) now, or None."""
        if not self._handles:
            return None
        try:
            rates = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            used = sum(int(self._nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles)
        except Exception:
            return None
        return max(rates) / 100.0, used

    def close(self) -> None:
        if self._handles:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


class Monitor:
    """The run's sampler and what each step accumulated; see the module docstring.
    `start` it, run the steps, `stop` it, then `figures()`."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        self.cores = available_cores()
        self.samples = 0
        self.overhead = 0.0  # the sampler thread's own CPU seconds
        self.started = 0.0
        self.stopped: float | None = None
        self._steps: dict[str, _Step] = {}
        self._owner: dict[int, str] = {}  # native thread id -> step it works for
        # CPU read since the last sample: all of it, and what no step owned
        self._counted = self._shared_cpu = self._shared_wait = 0.0
        self._lock = threading.Lock()  # the steps' figures and the thread owners
        self._sampling = threading.Lock()  # one sample at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu: _Gpu | None = None
        self._proc = os.path.isdir("/proc/self/task")
        self._last_cpu: dict[str, tuple[float, float]] = {}
        self._last_total = 0.0
        self._foreign: set[int] = set()  # children that predate the run (servers)
        self._children: set[int] = set()  # the run's own, as last looked up
        self._last_at = 0.0
        self._sampler = ""  # the sampler thread's native id

    # Lifecycle.

    def start(self) -> Monitor:
        self.started = self._last_at = time.perf_counter()
        if self._proc:
            tids = os.listdir("/proc/self/task")
            self._foreign = _child_pids(tids)
            self._last_cpu = {tid: _schedstat(f"/proc/self/task/{tid}/schedstat") for tid in tids}
            own, reaped = _stat_cpu("/proc/self/stat")
            self._last_total = own + reaped
            self._thread = threading.Thread(target=self._run, name="curate-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and self.stopped is None:
            self._stop.set()
            self._thread.join()
        self.stopped = time.perf_counter()  # sample_now does nothing from here on
        if self._gpu is not None:
            self._gpu.close()

    def _run(self) -> None:
        self._sampler = str(threading.get_native_id())
        while not self._stop.wait(self.interval):
            self.sample_now()
        self.sample_now()  # the last partial interval

    def sample_now(self) -> None:
        """Take a sample (the sampler's; and before figures are read, so that they hold
        the time since its last one). Its cost counts as the monitor's overhead."""
        if self._thread is None or self.stopped is not None:
            return
        with self._sampling:
            spent = time.thread_time()
            self._sample()
            self.overhead += time.thread_time() - spent

    # What steps and the storage layer report.

    def enter(self, name: str, uses_gpu: bool) -> None:
        now = time.perf_counter()
        with self._lock:
            step = self._steps.setdefault(name, _Step())
            step.active.enter(now)
            step.uses_gpu = step.uses_gpu or uses_gpu

    def leave(self, name: str) -> None:
        now = time.perf_counter()
        with self._lock:
            self._steps[name].active.leave(now)

    def own(self, tid: int, name: str | None) -> None:
        """Thread `tid` works for step `name` from now (None: for none). What it used
        since the last sample goes to the step it worked for until now, exactly."""
        usage = _schedstat(f"/proc/self/task/{tid}/schedstat") if self._proc else (0.0, 0.0)
        with self._lock:
            self._credit(str(tid), usage, self._owner.pop(tid, None))
            if name is not None:
                self._owner[tid] = name

    def _credit(self, tid: str, usage: tuple[float, float], owner: str | None) -> None:
        """A thread's CPU and run-queue wait since it was last read: to `owner`, or
        (None) to be shared among the active steps at the next sample."""
        last_cpu, last_wait = self._last_cpu.get(tid, (0.0, 0.0))
        cpu, wait = usage[0] - last_cpu, usage[1] - last_wait
        self._last_cpu[tid] = usage
        self._counted += cpu
        step = self._steps.get(owner) if owner is not None else None
        if step is not None:
            step.cpu_seconds += cpu
            step.wait_seconds += wait
        else:
            self._shared_cpu += cpu
            self._shared_wait += wait

    def read_started(self, name: str) -> float:
        now = time.perf_counter()
        with self._lock:
            self._steps.setdefault(name, _Step()).reads.enter(now)
        return now

    def read_ended(self, name: str, started: float) -> None:
        now = time.perf_counter()
        with self._lock:
            step = self._steps[name]
            step.reads.leave(now)
            step.read_seconds += now - started

    # The sampler.

    def _sample(self) -> None:
        now = time.perf_counter()
        own, reaped = _stat_cpu("/proc/self/stat")
        tids = os.listdir("/proc/self/task")
        if self.samples % CHILDREN_EVERY == 0:  # a read per thread: not every sample
            self._children = _child_pids(tids) - self._foreign
        children = {pid: sum(_stat_cpu(f"/proc/{pid}/stat")) for pid in self._children}
        rss = _rss("self") + sum(_rss(pid) for pid in children)
        total = own + reaped + sum(children.values())
        with self._lock:  # `own` reads and credits threads too: not at the same time
            for tid in tids:
                usage = _schedstat(f"/proc/self/task/{tid}/schedstat")
                if tid == self._sampler:  # its cost is the overhead, no step's
                    self._counted += usage[0] - self._last_cpu.get(tid, (0.0, 0.0))[0]
                    self._last_cpu[tid] = usage
                    continue
                self._credit(tid, usage, self._owner.get(int(tid)))
            self._last_cpu = {tid: self._last_cpu[tid] for tid in tids if tid in self._last_cpu}
            self._owner = {tid: name for tid, name in self._owner.items() if str(tid) in tids}
            # Threads that ended since the last sample, and the run's child processes: at
            # most what the cores could give (a child that predates the run, reaped now,
            # would bring its whole life's CPU).
            unseen = (total - self._last_total) - self._counted
            elapsed = now - self._last_at
            shared_cpu = self._shared_cpu + min(max(0.0, unseen), self.cores * elapsed)
            shared_wait = self._shared_wait
            self._shared_cpu = self._shared_wait = self._counted = 0.0
            active = {}
            for name, step in self._steps.items():
                span = step.active.at(now) - step.seen
                step.seen += span
                if span > 0:
                    active[name] = span
            # Shared CPU is taken as spread evenly over the interval: a step active for
            # part of it gets that part (overlapping steps split it).
            weight = max(elapsed, sum(active.values()))
            for name, span in active.items():
                step = self._steps[name]
                step.cpu_seconds += shared_cpu * span / weight
                step.wait_seconds += shared_wait * span / weight
                step.rss_peak = max(step.rss_peak, rss)
                step.samples += 1
            on_gpu = [name for name in active if self._steps[name].uses_gpu]
        if on_gpu and self._gpu is None:
            self._gpu = _Gpu()  # NVML's start costs tens of ms: only once a step uses a GPU
        gpu = self._gpu.sample() if on_gpu and self._gpu is not None else None
        if gpu is not None:
            with self._lock:
                for name in on_gpu:
                    step = self._steps[name]
                    step.gpu_busy += gpu[0] * active[name]
                    step.gpu_seconds += active[name]
                    step.gpu_memory_peak = max(step.gpu_memory_peak, gpu[1])
        self._last_total = total
        self._last_at = now
        self.samples += 1

    # Results.

    def figures(self, name: str) -> dict[str, Any] | None:
        """What step `name` used while it ran, or None when it never ran here."""
        with self._lock:
            step = self._steps.get(name)
            if step is None or step.active.total <= 0:
                return None
            seconds = step.active.total
            figures: dict[str, Any] = {
                "active_seconds": round(seconds, 3),
                "cores": round(self.cores, 2),
                "cpu_percent": round(100 * step.cpu_seconds / seconds, 1),
                "cpu_wait_percent": round(100 * step.wait_seconds / seconds, 1),
                "rss_peak_bytes": step.rss_peak,
                "reads_busy_percent": round(100 * min(1.0, step.reads.total / seconds), 1),
                "reads_in_flight": round(step.read_seconds / seconds, 2),
                "samples": step.samples,
            }
            if step.uses_gpu and step.gpu_seconds > 0:
                figures["gpu_util_percent"] = round(100 * step.gpu_busy / step.gpu_seconds, 1)
                figures["gpu_memory_peak_bytes"] = step.gpu_memory_peak
            return figures

    def summary(self, run_seconds: float) -> dict[str, Any]:
        """The monitor's own facts for report.json: its cost, the machine it saw."""
        return {
            "interval_seconds": self.interval,
            "samples": self.samples,
            "cores": round(self.cores, 2),
            "gpu": self._gpu.name if self._gpu is not None else None,  # the steps' GPU
            "overhead_seconds": round(self.overhead, 3),
            "overhead_percent": round(100 * self.overhead / run_seconds, 2) if run_seconds else 0,
            "attribution": "a thread's CPU goes to the step it works for (task and pool "
            "threads); other threads' and child processes' CPU is shared among the steps "
            "active at the time, by their active time; GPU figures go to steps on a CUDA "
            "device only",
        }


def verdict(
    figures: dict[str, Any] | None, cached: bool = False, idle: bool = False
) -> tuple[str, str]:
    """(verdict, why) from a step's figures: `GPU-bound`, `CPU-bound` or `I/O-bound`; or,
    without figures, `cached`, `idle` (nothing to do) or `not measured` (it ran in
    another process: the work pools' workers)."""
    if figures is None:
        if cached:
            return "cached", "every shard came from the cache: no work to judge"
        if idle:
            return "idle", "nothing to do in this run"
        return "not measured", "ran outside this process (on a work pool's workers)"
    cores = figures["cores"]
    busy = figures["cpu_percent"] / 100
    demand = busy + figures["cpu_wait_percent"] / 100  # cores running or wanting to run
    cpu_share = demand / cores
    reads = figures["reads_busy_percent"] / 100
    gpu = figures.get("gpu_util_percent")
    gpu_share = (gpu or 0.0) / 100
    cpu = f"CPU {busy:.2f} of {cores:g} cores busy"
    if demand - busy >= 0.05:
        cpu += f" and {demand - busy:.2f} more waiting for a core"
    io = f"a read in flight {reads:.0%} of the time ({figures['reads_in_flight']:.1f} on average)"
    gpu_text = f"GPU busy {gpu_share:.0%} of the time" if gpu is not None else "no GPU"
    if gpu is not None and gpu_share >= GPU_BOUND:
        label, why = "GPU-bound", f"{gpu_text}: a faster GPU would help; {cpu}"
    elif reads >= IO_BOUND and reads > cpu_share:
        label = "I/O-bound"
        why = f"{io} while {cpu} ({cpu_share:.0%} of them): faster or closer storage would help"
    elif cpu_share >= CPU_BOUND:
        label, why = "CPU-bound", f"{cpu} ({cpu_share:.0%} of them): more cores would help"
    elif demand >= ONE_CORE and reads < IO_BOUND:
        label = "CPU-bound"
        why = f"{cpu}: about one core's worth, so one thread (or Python's GIL) limits it; {io}"
    else:
        shares = {"CPU-bound": cpu_share, "I/O-bound": reads, "GPU-bound": gpu_share}
        label = max(shares, key=lambda k: shares[k])
        why = f"nothing saturated, {label.removesuffix('-bound')} the most: {cpu}; {io}; {gpu_text}"
    if figures["active_seconds"] < ROUGH_SECONDS:
        why += f" (ran {figures['active_seconds']:.2f} s only: a rough figure)"
    return label, why


def judge(report: dict[str, Any], monitor: Monitor, names: list[str] | None = None) -> None:
    """Add each step's figures, verdict and why to report.json's `steps` (in place)."""
    monitor.sample_now()
    for name, step in report["steps"].items():
        if names is not None and name not in names:
            continue
        figures = monitor.figures(name)
        cached = step.get("shards", 0) > 0 and step.get("cached_shards") == step.get("shards")
        idle = step.get("seconds", 0.0) < 0.01
        step["verdict"], step["why"] = verdict(figures, cached, idle)
        if figures is not None:
            step["monitor"] = figures


# What steps and the storage layer call. All of it is a no-op while no run is monitored.

_current: Monitor | None = None
_local = threading.local()  # .step: the step this thread works for


@contextlib.contextmanager
def monitoring(enabled: bool = True, interval: float = DEFAULT_INTERVAL) -> Iterator[Monitor]:
    """Monitor the steps run inside (one run at a time per process; a nested run, or
    `enabled=False`, yields a monitor that records nothing)."""
    global _current
    monitor = Monitor(interval)
    if not enabled or _current is not None:
        yield monitor
        return
    _current = monitor.start()
    try:
        yield monitor
    finally:
        _current = None
        monitor.stop()


def current() -> Monitor | None:
    return _current


@contextlib.contextmanager
def step_activity(name: str, uses_gpu: bool = False) -> Iterator[None]:
    """The calling thread works for step `name` inside (steps may overlap)."""
    monitor = _current
    if monitor is None:
        yield
        return
    tid = threading.get_native_id()
    previous = getattr(_local, "step", None)
    monitor.enter(name, uses_gpu)
    monitor.own(tid, name)
    _local.step = name
    try:
        yield
    finally:
        _local.step = previous
        monitor.own(tid, previous)
        monitor.leave(name)


def monitored(name: str, items: Iterator[T]) -> Iterator[T]:
    """`items`, with the time spent producing each one counted as step `name` (and the
    consumer's time between items not)."""
    while True:
        with step_activity(name):
            item = next(items, _END)
        if item is _END:
            return
        yield item  # type: ignore[misc]


_END: Any = object()


def step_threads() -> Callable[[], None] | None:
    """A ThreadPoolExecutor `initializer`: the pool's threads work for the calling
    thread's step (None when it works for none, or nothing is monitored)."""
    name = getattr(_local, "step", None)
    monitor = _current
    if name is None or monitor is None:
        return None

    def adopt() -> None:
        _local.step = name
        monitor.own(threading.get_native_id(), name)

    return adopt


class _Reading:
    """`with reading():` around a storage read: the read is in flight inside."""

    __slots__ = ("monitor", "name", "started")

    def __enter__(self) -> None:
        self.monitor = _current
        self.name = getattr(_local, "step", None)
        if self.monitor is not None and self.name is not None:
            self.started = self.monitor.read_started(self.name)

    def __exit__(self, *_: object) -> None:
        if self.monitor is not None and self.name is not None:
            self.monitor.read_ended(self.name, self.started)


def reading() -> _Reading:
    return _Reading()
