"""The machine's facts and each step's resources: what exists, what a step asks for, and
whether the asks fit.

Facts respect the limits a container puts on a process, not only the host's counts:
CPUs are the affinity mask capped by the cgroup CPU quota (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`), memory is MemAvailable capped by the cgroup's
headroom (v2 `memory.max`, v1 `memory.limit_in_bytes`, less what the cgroup uses beyond
reclaimable page cache). GPUs come from torch, imported only when asked.

Each step (check, embed, train, pretag) declares `num_cpus`, `num_gpus` (fractions share a
GPU), `memory` (per worker: a hint that decides how many workers fit) and `num_proc`
(workers: decode or loader threads), each `auto` by default. The plan resolves `auto` from
the machine, and `auto` never over-asks. Validation is Data-Juicer's lesson: steps that run
one after another must each fit alone; steps that run at the same time (a phase) must fit
together. An ask that cannot fit is a `ConfigError` naming the step, the ask, what exists
and the fix. Nothing here imports Prefect; torch only in `detect_gpus`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import ConfigError

if TYPE_CHECKING:
    from tasks.config import CurateConfig

STEPS = ("check", "embed", "train", "pretag")
# `auto` plans within this share of the free memory: the rest is the OS's, the page
# cache's and this process's own (models, Prefect, the results in flight).
SAFE_MEMORY_SHARE = 0.8
# What one worker of a step holds when its `memory` is auto, generous on purpose: a
# decoded 24 Mpx photo and its model input (check); a batch of model inputs and its
# activations (embed, pretag); two augmented views per sample and their gradients (train).
# Used only to cap an auto worker count on a small machine, never to fail a run.
WORKER_MEMORY = {"check": 256 << 20, "embed": 512 << 20, "train": 1 << 30, "pretag": 512 << 20}
# cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages).
_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes in all
    free: int  # bytes free when looked at


@dataclass(frozen=True)
class Machine:
    """What a step can have. `gpus` is None when nobody asked (torch not imported)."""

    cpus: float
    memory: int  # bytes this process may use in all: RAM, or the cgroup's limit
    available: int  # bytes free now
    gpus: tuple[Gpu, ...] | None = None
    where: str = "this machine"

    def describe(self) -> dict[str, Any]:
        gpus = None if self.gpus is None else [asdict(g) for g in self.gpus]
        return {"cpus": self.cpus, "memory": self.memory, "available": self.available} | {
            "gpus": gpus
        }


# Facts


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup(proc_self: Path, controller: str | None) -> str:
    """This process's cgroup path for a v1 controller (or the v2 one, `None`)."""
    for line in (_read(proc_self / "cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return "/"


def _cgroup_dirs(cgroup_root: Path, proc_self: Path, controller: str) -> list[Path]:
    """The directories whose limits bind this process, from its own cgroup up to the
    root of the hierarchy (a parent's limit binds its children too). Inside a container
    the own path may not exist under the mount (the mount is the container's cgroup):
    then only the mount's root is read."""
    if (cgroup_root / "cgroup.controllers").exists():  # v2: one unified hierarchy
        mount, path = cgroup_root, _own_cgroup(proc_self, None)
    else:
        mounts = [d for d in _listdir(cgroup_root) if controller in d.name.split(",")]
        if not mounts:
            return []
        mount, path = mounts[0], _own_cgroup(proc_self, controller)
    parts = [p for p in path.split("/") if p]
    dirs = [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def cpu_quota(cgroup_root: Path, proc_self: Path) -> float | None:
    """The tightest cgroup CPU quota in CPUs (1.5 for `150000 100000`), or None."""
    quotas = []
    for folder in _cgroup_dirs(cgroup_root, proc_self, "cpu"):
        v2 = _read(folder / "cpu.max")
        if v2 is not None:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                quotas.append(int(quota) / int(period))
            continue
        quota_us, period_us = (
            _read(folder / "cpu.cfs_quota_us"),
            _read(folder / "cpu.cfs_period_us"),
        )
        if quota_us and period_us and int(quota_us) > 0:
            quotas.append(int(quota_us) / int(period_us))
    return min(quotas) if quotas else None


def usable_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_self: Path = Path("/proc/self")
) -> float:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root, proc_self)
    return min(cpus, quota) if quota is not None else cpus


def _meminfo(proc: Path) -> dict[str, int]:
    values = {}
    for line in (_read(proc / "meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields:
            values[name] = int(fields[0]) * 1024  # kB
    return values


def _stat(folder: Path, name: str) -> int:
    for line in (_read(folder / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


def memory_limits(cgroup_root: Path, proc_self: Path) -> list[tuple[int, int]]:
    """(limit, bytes used beyond reclaimable page cache) of each limited cgroup level."""
    found = []
    for folder in _cgroup_dirs(cgroup_root, proc_self, "memory"):
        v2 = _read(folder / "memory.max")
        if v2 is not None:
            if v2 != "max":
                used = int(_read(folder / "memory.current") or 0)
                found.append((int(v2), used - _stat(folder, "inactive_file")))
            continue
        limit = int(_read(folder / "memory.limit_in_bytes") or _NO_LIMIT)
        if limit < _NO_LIMIT:
            used = int(_read(folder / "memory.usage_in_bytes") or 0)
            found.append((limit, used - _stat(folder, "total_inactive_file")))
    return found


def memory_facts(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_self: Path = Path("/proc/self"),
    proc: Path = Path("/proc"),
) -> tuple[int, int]:
    """(bytes in all, bytes free now): RAM and MemAvailable, capped by cgroup limits."""
    info = _meminfo(proc)
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0))
    for limit, used in memory_limits(cgroup_root, proc_self):
        total = min(total, limit) if total else limit
        available = min(available, max(0, limit - used)) if available else max(0, limit - used)
    return total, available


def detect_gpus() -> tuple[Gpu, ...]:
    """The CUDA GPUs torch sees (CUDA_VISIBLE_DEVICES applies), with their memory."""
    import torch

    if not torch.cuda.is_available():
        return ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(Gpu(torch.cuda.get_device_name(index), int(total), int(free)))
    return tuple(gpus)


def this_machine(with_gpus: bool = False) -> Machine:
    total, available = memory_facts()
    return Machine(usable_cpus(), total, available, detect_gpus() if with_gpus else None)


# Declarations and the plan


@dataclass(frozen=True)
class Ask:
    """A step's declaration; None is `auto`. `memory` is bytes per worker."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = None
    num_proc: int | None = None

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.num_cpus, self.num_gpus, self.memory))


@dataclass(frozen=True)
class StepPlan:
    """What one task of a step gets: Ray's resource request, and its worker count."""

    num_cpus: float
    num_gpus: float
    memory: int  # bytes per worker: asked, or the auto estimate
    num_proc: int
    memory_asked: bool = False

    def ray_options(self) -> dict[str, Any]:
        """Ray's `@remote` options for one task of the step; auto memory asks nothing."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_asked:
            options["memory"] = self.memory * self.num_proc
        return options


def asks_of(config: CurateConfig) -> dict[str, Ask]:
    """Each step's declaration. `num_workers` (older, one count for every step) is the
    `num_proc` of each step that leaves its own `num_proc` auto."""
    alias = None if config.num_workers == -1 else max(1, config.num_workers)
    asks = {}
    for step in STEPS:
        declared = getattr(config.resources, step)

        def value(name: str, declared: Any = declared) -> Any:
            found = getattr(declared, name)
            return None if found == "auto" else found

        num_proc = value("num_proc")
        asks[step] = Ask(
            value("num_cpus"),
            value("num_gpus"),
            value("memory"),
            alias if num_proc is None else num_proc,
        )
    return asks


def phases(
    config: CurateConfig, embed_on_gpu: bool, on_this_machine: bool = True
) -> list[tuple[str, ...]]:
    """The steps that run at the same time, phase by phase, on the machine that plans.

    In this process (or on a Ray cluster) check and embed stream together when embedding
    runs on a GPU; on a CPU each check waits for the previous embedding, so they take
    turns. With training or pretagging, embeddings wait for every check; pretagging of
    one shard runs while the previous one is embedded. On pools, check and embed run on
    the pools' workers (each step flow plans its own step there, alone): here only
    training and pretagging run."""
    train, pretag = config.enable_training, config.pretagging.checkpoint is not None
    if not on_this_machine:
        return [p for p in [("train",) if train else (), ("pretag",) if pretag else ()] if p]
    if not (train or pretag):
        return [("check", "embed")] if embed_on_gpu else [("check",), ("embed",)]
    found: list[tuple[str, ...]] = [("check",)]
    if train:
        found.append(("train",))
    found.append(("pretag", "embed") if pretag else ("embed",))
    return found


def plan(
    asks: dict[str, Ask],
    steps_by_phase: Iterable[tuple[str, ...]],
    machine: Machine,
    gpu_steps: Iterable[str] = (),
) -> dict[str, StepPlan]:
    """Resolve every `auto` of the steps in the phases. Auto CPUs and GPUs are an even
    share of what the explicit asks of the same phase leave (a GPU step's auto is at most
    one GPU, a fraction when GPU steps share one); auto workers are the step's CPUs
    (every usable CPU when its CPUs are auto: threads of steps that run together take
    turns on the cores), no more than fit into the step's share of the safe free
    memory."""
    all_phases = [tuple(p) for p in steps_by_phase]
    on_gpu = set(gpu_steps)
    gpu_count = len(machine.gpus or ())
    cpus: dict[str, float] = {}
    gpus: dict[str, float] = {}
    memory_share: dict[str, float] = {}
    for phase in all_phases:
        cpu_auto = [s for s in phase if asks[s].num_cpus is None]
        cpu_left = machine.cpus - sum(asks[s].num_cpus or 0 for s in phase)
        gpu_auto = [s for s in phase if asks[s].num_gpus is None and s in on_gpu]
        gpu_left = gpu_count - sum(asks[s].num_gpus or 0 for s in phase)
        asked_memory = sum(
            (asks[s].memory or 0) * (asks[s].num_proc or 0) for s in phase if asks[s].num_proc
        )
        safe = max(0.0, machine.available * SAFE_MEMORY_SHARE - asked_memory)
        for step in phase:
            if step in cpu_auto:
                share = max(0.0, cpu_left) / len(cpu_auto)
                cpus[step] = min(cpus.get(step, share), share)
            if step in gpu_auto:
                share = min(1.0, max(0.0, gpu_left) / len(gpu_auto))
                gpus[step] = min(gpus.get(step, share), share)
            share = safe / len(phase)
            memory_share[step] = min(memory_share.get(step, share), share)
    plans = {}
    for step in dict.fromkeys(s for p in all_phases for s in p):
        ask = asks[step]
        num_cpus = ask.num_cpus if ask.num_cpus is not None else _down(cpus[step])
        per_worker = ask.memory if ask.memory is not None else WORKER_MEMORY[step]
        num_proc = ask.num_proc
        if num_proc is None:
            by_cpu = math.floor(machine.cpus if ask.num_cpus is None else ask.num_cpus)
            by_memory = math.floor(memory_share[step] / per_worker)
            num_proc = max(1, min(by_cpu, by_memory))
        num_gpus = ask.num_gpus if ask.num_gpus is not None else _down(gpus.get(step, 0.0))
        plans[step] = StepPlan(num_cpus, num_gpus, per_worker, num_proc, ask.memory is not None)
    return plans


def _down(share: float) -> float:
    """A share to three decimals, rounded down: shares of one phase never sum above it."""
    return math.floor(share * 1000) / 1000


# Validation


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _count(n: float) -> str:
    return f"{n:g}"


def _fix_gpus(step: str) -> str:
    device = " or embedding.device=cpu" if step in ("embed", "pretag") else ""
    if step == "train":
        device = " or embedding.device=cpu (training runs there too)"
    return device


def validate(
    plans: dict[str, StepPlan], steps_by_phase: Iterable[tuple[str, ...]], machine: Machine
) -> None:
    """Fail at once, naming the step, when an ask cannot fit: each phase's steps must fit
    together (a step alone is a phase of one)."""
    for step, p in plans.items():
        if p.num_gpus > 1 and p.num_gpus != int(p.num_gpus):
            raise ConfigError(
                f"resources.{step}.num_gpus={_count(p.num_gpus)}: more than one GPU must be a "
                "whole number (fractions below 1 share a GPU, e.g. 0.25 = 4 tasks per GPU)"
            )
    gpu_count = len(machine.gpus or ())
    for phase in steps_by_phase:
        steps = [s for s in phase if s in plans]
        _fits(steps, plans, "num_cpus", machine.cpus, "CPU", machine.where)
        if machine.gpus is not None:
            _fits(steps, plans, "num_gpus", gpu_count, "GPU", machine.where)
        asked = [s for s in steps if plans[s].memory_asked]
        total = sum(plans[s].memory * plans[s].num_proc for s in asked)
        if asked and total > machine.available:
            parts = ", ".join(f"{s} {plans[s].num_proc} x {_gib(plans[s].memory)}" for s in asked)
            keys = " or ".join(f"resources.{s}.memory" for s in asked)
            alone = len(steps) == 1
            what = (
                f"resources.{steps[0]} asks"
                if alone
                else f"resources: {' and '.join(steps)} run at the same time and ask"
            )
            raise ConfigError(
                f"{what} for {_gib(total)} of memory ({parts} workers), {machine.where} has "
                f"{_gib(machine.available)} free: lower {keys} or its num_proc, or set them auto"
            )


def _fits(
    steps: list[str], plans: dict[str, StepPlan], key: str, exists: float, unit: str, where: str
) -> None:
    asked = {s: getattr(plans[s], key) for s in steps}
    total = sum(asked.values())
    if total <= exists + 1e-9:
        return
    if len(steps) == 1:
        step = steps[0]
        fix = f"set resources.{step}.{key}={_count(math.floor(exists * 1000) / 1000)}"
        if unit == "GPU":
            fix += _fix_gpus(step)
        raise ConfigError(
            f"resources.{step} asks for {_count(total)} {unit}s, {where} has "
            f"{_count(exists)}: {fix}"
        )
    parts = ", ".join(f"{s} {_count(v)}" for s, v in asked.items())
    keys = " or ".join(f"resources.{s}.{key}" for s in steps)
    raise ConfigError(
        f"resources: {' and '.join(steps)} run at the same time and ask for {_count(total)} "
        f"{unit}s together ({parts}), {where} has {_count(exists)}: lower {keys} so that "
        f"they sum to at most {_count(exists)}, or set them auto"
    )


def gpu_steps(embed_on_gpu: bool) -> tuple[str, ...]:
    """The steps that compute on the GPU when embedding does (they share its device)."""
    return ("embed", "train", "pretag") if embed_on_gpu else ()


def run_plan(
    config: CurateConfig,
    embed_on_gpu: bool,
    machine: Machine,
    on_this_machine: bool = True,
    only: tuple[str, ...] = STEPS,
) -> dict[str, StepPlan]:
    """The validated plan of every step (of `only`) that runs on `machine` in this run."""
    found = phases(config, embed_on_gpu, on_this_machine)
    steps = [p for p in (tuple(s for s in phase if s in only) for phase in found) if p]
    plans = plan(asks_of(config), steps, machine, gpu_steps(embed_on_gpu))
    validate(plans, steps, machine)
    return plans


def check_config(config: CurateConfig) -> None:
    """Validation before any work. All-auto needs no look at the machine (auto never
    over-asks); otherwise the facts are read, torch imported only when the answer
    depends on GPUs. Steps on pools are checked by each step flow on its worker, steps
    on an existing Ray cluster once connected to it."""
    asks = asks_of(config)
    if not any(ask.explicit for ask in asks.values()):
        return
    mode, device = config.orchestration.mode, config.embedding.device
    here = mode == "local" or (mode == "ray" and not config.orchestration.ray_address)
    if not phases(config, embed_on_gpu=False, on_this_machine=here):
        return  # nothing runs on this machine that asks for anything
    wants_gpus = device != "cpu" or any((a.num_gpus or 0) > 0 for a in asks.values())
    machine = this_machine(with_gpus=wants_gpus)
    embed_on_gpu = device.startswith("cuda") or (device == "auto" and bool(machine.gpus))
    run_plan(config, embed_on_gpu, machine, on_this_machine=here)


def step_plan(step: str, ask: Ask, on_gpu: bool) -> StepPlan:
    """One step alone on this machine: how a step flow on a pool's worker plans (and
    validates) its own step."""
    machine = this_machine(with_gpus=on_gpu or (ask.num_gpus or 0) > 0)
    plans = plan({step: ask}, [(step,)], machine, [step] if on_gpu else [])
    validate(plans, [(step,)], machine)
    return plans[step]
