"""Recommend: the machine, workers and batch sizes for a dataset, and how long a run takes.

The machine follows the Lightly Worker's hardware guide, by the frames in the dataset
(images count one each; 100 videos of 600 s at 30 fps are 1.8 Mio frames): up to 100k
frames 4 vCPU, 16 GB and one T4; up to 1M 8 vCPU and 32 GB; more 16 vCPU and 64 GB;
"about 4 GB of RAM and 2 GB of VRAM for each vCPU". The duration is ours: each step's
work divided by our own measured throughputs (`tasks/throughputs.json`, refreshed by
`python -m bench.bench_throughputs`), scaled to the machine: decoding and checking per
core (a fixed cost per image plus a cost per megapixel; video frames per megapixel),
embedding per model and input size on a CPU (per core) or on the GPU it was measured on,
training samples per second, selection per sample and pick, and the run's fixed cost.
On a GPU the check (CPU) of one shard overlaps the embedding (GPU) of the one before, so
the slower of the two sets the pace; on a CPU they take turns.

Everything here is arithmetic on plain numbers, apart from `survey`, which lists a
location and samples it (image headers; video containers through `tasks.video.probe`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

THROUGHPUTS = Path(__file__).with_name("throughputs.json")

# The Lightly Worker's hardware guide: (frames up to, vCPUs, GB of RAM).
TIERS = ((100_000, 4, 16), (1_000_000, 8, 32), (None, 16, 64))
RAM_GB_PER_VCPU = 4
VRAM_GB_PER_VCPU = 2
T4_VRAM_GB = 16
SURVEY_IMAGES = 32  # image headers read to learn their sizes
SURVEY_VIDEOS = 8  # videos probed for length and fps
DEFAULT_BUDGET_SHARE = 0.01  # picks assumed when the plan names no stopping condition


@dataclass(frozen=True)
class Workload:
    """What the dataset holds (counts, and mean sizes of what is in it)."""

    images: int = 0
    image_megapixels: float = 0.25  # mean pixels per image / 1e6 (500 x 500)
    videos: int = 0
    video_seconds: float = 0.0  # mean length
    fps: float = 30.0
    video_megapixels: float = 0.92  # 1280 x 720
    every_nth_frame: int = 1  # frames 0, n, 2n... are the samples; all are decoded
    bytes: int = 0
    source: str = "numbers given"

    @property
    def video_frames(self) -> int:
        return round(self.videos * self.video_seconds * self.fps)

    @property
    def frames(self) -> int:
        """The dataset's size in the seed's terms: images plus video frames."""
        return self.images + self.video_frames

    @property
    def samples(self) -> int:
        """What is embedded and selected from."""
        return self.images + math.ceil(self.video_frames / self.every_nth_frame)


@dataclass(frozen=True)
class Plan:
    """The steps the run will do."""

    model: str = "resnet18"
    input_size: int | None = None  # None: the pipeline's default (224 on a GPU, 64 on a CPU)
    training: bool = False
    training_epochs: int | None = None  # None: the pipeline's default (100 on a GPU, 5 on a CPU)
    training_input_size: int | None = None  # None: the model inputs' size, 32 px on a CPU
    pretagging: bool = False
    n_samples: int | None = None  # picks
    proportion_samples: float | None = None  # or a share of the samples; neither: 1 %

    def picks(self, samples: int) -> int:
        share = self.proportion_samples or DEFAULT_BUDGET_SHARE
        return self.n_samples or max(1, round(share * samples))


@dataclass(frozen=True)
class Machine:
    vcpus: float  # a cgroup quota may give a fraction
    ram_gb: float
    gpus: int = 0
    gpu: str | None = None  # what kind, in words
    vram_gb: float = 0.0
    why: str = ""


@dataclass
class Estimate:
    """A run's seconds on one machine, per step, and what sets the pace."""

    machine: str
    device: str
    input_size: int
    seconds: float
    steps: dict[str, float]
    bottleneck: str
    assumptions: list[str] = field(default_factory=list)


@dataclass
class Recommendation:
    workload: Workload
    plan: Plan
    machine: Machine
    settings: dict[str, Any]
    reasons: list[str]
    estimates: dict[str, Estimate]  # "recommended", "cpu_only", "here"
    measured: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "dataset": asdict(self.workload)
            | {
                "frames": self.workload.frames,
                "video_frames": self.workload.video_frames,
                "samples": self.workload.samples,
            },
            "plan": asdict(self.plan),
            "machine": asdict(self.machine),
            "settings": self.settings,
            "estimates": {name: asdict(e) for name, e in self.estimates.items()},
            "reasons": self.reasons,
            "throughputs_measured_on": self.measured,
        }


def load_throughputs(path: Path = THROUGHPUTS) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def machine_for(frames: int) -> Machine:
    """The seed's table: vCPUs and RAM by frames, 2 GB of VRAM per vCPU."""
    limit, vcpus, ram = next(t for t in TIERS if t[0] is None or frames <= t[0])
    vram = VRAM_GB_PER_VCPU * vcpus
    gpus = math.ceil(vram / T4_VRAM_GB)
    gpu = "one NVIDIA T4 (16 GB)"
    if gpus > 1:
        gpu = f"{vram} GB of VRAM: {gpus} T4s or one larger GPU"
    tier = f"up to {limit:,}" if limit is not None else f"more than {TIERS[-2][0]:,}"
    why = (
        f"{frames:,} frames ({tier}): the Lightly Worker's hardware guide recommends "
        f"{vcpus} vCPU and {ram} GB ({RAM_GB_PER_VCPU} GB per vCPU), and "
        f"{VRAM_GB_PER_VCPU} GB of VRAM per vCPU = {vram} GB"
    )
    return Machine(vcpus, ram, gpus, gpu, vram, why)


def _measured(
    table: dict[str, Any], device: str, model: str, size: int, notes: list[str]
) -> tuple[dict[str, float], float]:
    """The embedding measurement of `model` nearest to `size` px (else resnet18's), and
    the factor its per-image cost grows by at `size` (with the pixels)."""
    measured: dict[str, dict[str, float]] = table["embed"][device]
    candidates = {k: v for k, v in measured.items() if k.split("@")[0] == model}
    if not candidates:
        notes.append(f"{model} was not measured on {device}: resnet18's speed is assumed")
        candidates = {k: v for k, v in measured.items() if k.split("@")[0] == "resnet18"}
    key = min(candidates, key=lambda k: abs(math.log(int(k.split("@")[1]) / size)))
    measured_size = int(key.split("@")[1])
    if measured_size != size:
        notes.append(f"embedding at {size} px scaled from {key} by pixels")
    return candidates[key], (size / measured_size) ** 2


def _embed_rate(
    table: dict[str, Any], device: str, model: str, size: int, cores: float, notes: list[str]
) -> float:
    """Images per second embedding `model` at `size` px (on a CPU, with `cores`)."""
    entry, factor = _measured(table, device, model, size, notes)
    rate = entry["images_per_second"] / factor
    if device == "cpu":
        rate *= cores / entry["cores"]
    return float(rate)


def _train_rate(table: dict[str, Any], device: str, size: int, cores: float) -> float:
    measured = table["train"][device]
    key = min(measured, key=lambda k: abs(math.log(int(k.split("@")[1]) / size)))
    entry = measured[key]
    rate = entry["samples_per_second"] * (int(key.split("@")[1]) / size) ** 2
    return float(rate * (cores / entry["cores"] if device == "cpu" else 1.0))


def cpu_share(seconds: float = 0.5) -> float:
    """The share of one core a busy thread gets here, now: 1.0 on an idle machine, less
    on one shared with other work (as the machines the throughputs were measured on may
    be). The bench records it with its figures; an estimate for this machine scales its
    CPU work by the two's ratio."""
    wall, cpu = time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall < seconds:
        sum(range(1000))
    return min(1.0, (time.thread_time() - cpu) / (time.perf_counter() - wall))


def estimate(
    workload: Workload,
    plan: Plan,
    machine: Machine,
    table: dict[str, Any],
    use_gpu: bool = True,
    slowdown: float = 1.0,
    slowdown_note: str = "",
) -> Estimate:
    """Seconds of a run of `plan` over `workload` on `machine` (its GPU when `use_gpu`
    and it has one measured in `table`); `slowdown` stretches the CPU's work (a machine
    busier now than when the throughputs were measured)."""
    notes: list[str] = []
    device = "cuda" if use_gpu and machine.gpus and table["embed"].get("cuda") else "cpu"
    if use_gpu and machine.gpus and device == "cpu":
        notes.append("no GPU throughput measured yet (bench on a GPU): CPU figures used")
    size = plan.input_size or (224 if device == "cuda" else 64)
    cores = machine.vcpus
    check = table["check"]
    n = workload.samples
    image_seconds = workload.images * (
        check["seconds_per_image"] + check["seconds_per_megapixel"] * workload.image_megapixels
    )
    video_seconds = (
        workload.video_frames * workload.video_megapixels / check["video_megapixels_per_second"]
    )
    steps = {"check": (image_seconds + video_seconds) / cores}
    embed_rate = _embed_rate(table, device, plan.model, size, cores, notes)
    steps["embed"] = n / embed_rate
    if plan.training:
        epochs = plan.training_epochs or (100 if device == "cuda" else 5)
        view = plan.training_input_size or (size if device == "cuda" else min(size, 32))
        steps["train"] = epochs * n / _train_rate(table, device, view, cores)
        notes.append(f"training: {epochs} epochs at {view} px views")
    if plan.pretagging:
        steps["pretag"] = n / embed_rate  # a classifier's forward costs what the embedding's does
        notes.append("pretagging is taken to cost one more forward pass of the model")
    rest = table["run"]
    steps["select"] = n * plan.picks(n) * table["select"]["seconds_per_sample_and_pick"]
    steps["other steps"] = rest["seconds_per_sample"] * n
    steps["fixed"] = rest["fixed_seconds"]
    if slowdown != 1.0:
        on_gpu = ("embed", "train", "pretag") if device == "cuda" else ()
        steps = {k: v if k in on_gpu else v * slowdown for k, v in steps.items()}
        notes.append(f"CPU work x {slowdown:.2f}: {slowdown_note}")
    overlapped = device == "cuda" and not plan.training and not plan.pretagging
    total = sum(steps.values())
    if overlapped:  # check and embed stream side by side
        total -= min(steps["check"], steps["embed"])
    paced = {k: v for k, v in steps.items() if k != "fixed"}
    slowest = max(paced, key=lambda k: paced[k])
    where = "the CPU" if slowest != "embed" or device == "cpu" else "the GPU"
    bottleneck = f"{slowest} ({where}): {steps[slowest] / max(total, 1e-9):.0%} of the run"
    if overlapped:
        bottleneck += "; check and embed overlap"
    name = f"{machine.vcpus:g} vCPU" + (f", {machine.gpu}" if device == "cuda" else ", no GPU")
    rounded = {k: round(v, 2) for k, v in steps.items()}
    return Estimate(name, device, size, round(total, 1), rounded, bottleneck, notes)


def _settings(
    machine: Machine, plan: Plan, table: dict[str, Any], estimate: Estimate
) -> tuple[dict[str, Any], list[str]]:
    """Workers and batch sizes for the machine, and why."""
    reasons = [
        f"num_workers=-1: one decode thread per vCPU ({machine.vcpus:g}), as the Lightly "
        "Worker's num_workers=-1 means all vCPUs"
    ]
    settings: dict[str, Any] = {"num_workers": -1, "embedding.input_size": estimate.input_size}
    if estimate.device == "cuda":
        entry, factor = _measured(table, "cuda", plan.model, estimate.input_size, [])
        scaled = entry["bytes_per_image"] * factor
        batch = 2 ** int(math.log2(max(1, 0.5 * machine.vram_gb * 1e9 / scaled)))
        settings["embedding.batch_size"] = max(32, min(1024, batch))
        reasons.append(
            f"embedding.batch_size={settings['embedding.batch_size']}: the largest power of "
            f"two whose activations ({scaled / 1e6:.0f} MB per image at "
            f"{estimate.input_size} px, measured) fill at most half of "
            f"{machine.vram_gb:.0f} GB of VRAM (capped at 1024)"
        )
        if plan.training:
            settings["training.batch_size"] = 256 if machine.vram_gb >= 16 else 128
            reasons.append(
                f"training.batch_size={settings['training.batch_size']}: SimCLR gains from "
                "large batches; two views per image fit at this size"
            )
        check, embed = estimate.steps["check"], estimate.steps["embed"]
        workers = max(1, math.ceil(check / embed)) if embed else 1
        settings["orchestration (pools)"] = {
            "curate-cpu workers per curate-gpu worker": workers,
            "orchestration.children_in_flight": max(4, 2 * workers),
        }
        reasons.append(
            f"with orchestration.mode=pools: {workers} CPU-pool worker(s) of "
            f"{machine.vcpus:g} vCPU per GPU worker keep the GPU fed (decoding takes "
            f"{check:.0f} s, embedding {embed:.0f} s on one machine each)"
        )
    else:
        settings["embedding.batch_size"] = 64
        reasons.append("embedding.batch_size=64: on a CPU larger batches are no faster")
        if plan.training:
            settings["training.batch_size"] = 128
    return settings, reasons


def recommend(
    workload: Workload,
    plan: Plan,
    table: dict[str, Any],
    here: Machine,
    share_here: float | None = None,
) -> Recommendation:
    """The machine for `workload` (the seed's table), its settings, and estimates on it,
    on it without a GPU, and on this machine (`here`, where a busy thread gets
    `share_here` of a core now: see `cpu_share`)."""
    machine = machine_for(workload.frames)
    # The throughputs were measured where a busy thread got `measured` of a core: a
    # dedicated machine gives it a whole one, this machine `share_here` of one now.
    measured = table.get("measured_on", {}).get("cpu_share") or 1.0
    here_slowdown = min(20.0, max(0.05, measured / share_here)) if share_here else 1.0
    away = (
        f"measured where a busy thread got {measured:.0%} of a core; a dedicated machine "
        "gives it all of one"
    )
    now = (
        f"a busy thread gets {share_here or 1:.0%} of a core here now, {measured:.0%} when "
        "the throughputs were measured"
    )
    cpu_only = replace(machine, gpus=0)
    estimates = {
        "recommended": estimate(workload, plan, machine, table, True, measured, away),
        "cpu_only": estimate(workload, plan, cpu_only, table, False, measured, away),
        "here": estimate(workload, plan, here, table, True, here_slowdown, now),
    }
    settings, reasons = _settings(machine, plan, table, estimates["recommended"])
    reasons.insert(0, machine.why)
    if plan.training:
        view = estimates["recommended"].input_size
        cache = workload.samples * view * view * 3
        if cache > 2 << 30:
            fits = min(cache, machine.ram_gb * 1e9 / 4)
            settings["training.cache_bytes"] = int(fits)
            reasons.append(
                f"training.cache_bytes={int(fits):,}: the training inputs ({cache / 1e9:.1f} GB "
                f"at {view} px) are read once and kept in memory, up to a quarter of the RAM"
            )
    return Recommendation(
        workload, plan, machine, settings, reasons, estimates, table.get("measured_on", {})
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(rec: Recommendation) -> str:
    """The recommendation as text a person reads."""
    w, m = rec.workload, rec.machine
    videos = (
        f", {w.videos:,} videos x {w.video_seconds:.0f} s x {w.fps:g} fps = "
        f"{w.video_frames:,} frames"
        if w.videos
        else ""
    )
    steps = ["check", "embed"]
    if rec.plan.training:
        steps.append("train")
    if rec.plan.pretagging:
        steps.append("pretag")
    images = f"{w.images:,} images" if w.images or not w.videos else ""
    contents = ", ".join(part for part in (images, videos.removeprefix(", ")) if part)
    vram = f" (>= {m.vram_gb:g} GB VRAM)" if m.gpus == 1 else ""
    lines = [
        f"dataset: {contents}: {w.frames:,} frames, {w.samples:,} samples ({w.source})",
        f"plan: {', '.join(steps)}, select; model {rec.plan.model}",
        "",
        f"machine: {m.vcpus:g} vCPU, {m.ram_gb:g} GB RAM, {m.gpu}{vram}",
        "settings: "
        + " ".join(f"{k}={v}" for k, v in rec.settings.items() if not isinstance(v, dict)),
    ]
    for key, value in rec.settings.items():
        if isinstance(value, dict):
            lines.append(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
    lines += ["", "why:"] + [f"  - {r}" for r in rec.reasons] + ["", "estimated duration:"]
    for label, e in rec.estimates.items():
        what = {"recommended": "recommended", "cpu_only": "without a GPU", "here": "this machine"}
        steps_text = ", ".join(f"{k} {_duration(v)}" for k, v in e.steps.items() if v >= 0.5)
        lines.append(
            f"  {what[label]:13s} ({e.machine}, {e.input_size} px): {_duration(e.seconds)}"
            f" [{steps_text}]; pace set by {e.bottleneck}"
        )
        lines.extend(f"      note: {note}" for note in dict.fromkeys(e.assumptions))
    measured = rec.measured
    lines += [
        "",
        "throughputs: tasks/throughputs.json, measured on "
        + "; ".join(f"{k}: {v}" for k, v in measured.items() if v),
    ]
    return "\n".join(lines)


def survey(storage: Any, every_nth_frame: int = 1) -> Workload:
    """List a location and sample it: images and videos counted by extension (as
    discovery does), image sizes from the headers of up to SURVEY_IMAGES of them, video
    lengths and fps from probing up to SURVEY_VIDEOS, extrapolated by bytes."""
    from tasks.naming import is_image, is_video

    images, videos = [], []
    for obj in storage.list():
        if is_image(obj.key):
            images.append(obj)
        elif is_video(obj.key):
            videos.append(obj)
    megapixels = _image_megapixels(storage, _spread(images, SURVEY_IMAGES))
    probed = _probe_videos(storage, _spread(videos, SURVEY_VIDEOS))
    workload = Workload(
        images=len(images),
        image_megapixels=megapixels or Workload.image_megapixels,
        every_nth_frame=every_nth_frame,
        bytes=sum(o.size for o in images + videos),
        source=f"listed {storage.url}: sampled {min(len(images), SURVEY_IMAGES)} image "
        f"headers, probed {len(probed)} videos",
    )
    if not probed:
        return workload
    sampled_bytes = sum(size for size, *_ in probed)
    seconds = sum(s for _, s, _, _ in probed)
    frames = sum(s * fps for _, s, fps, _ in probed)
    total_bytes = sum(o.size for o in videos)
    scale = total_bytes / sampled_bytes if sampled_bytes else 1.0  # longer videos, more bytes
    return replace(
        workload,
        videos=len(videos),
        video_seconds=seconds * scale / len(videos),
        fps=frames / seconds if seconds else Workload.fps,
        video_megapixels=sum(mp for *_, mp in probed) / len(probed),
    )


def _spread(items: list[Any], n: int) -> list[Any]:
    """Up to n items evenly spread over the listing (deterministic)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def _image_megapixels(storage: Any, objects: list[Any]) -> float | None:
    import io

    from PIL import Image

    sizes = []
    for obj in objects:
        try:
            with Image.open(io.BytesIO(storage.read_range(obj.key, 0, 1 << 20))) as image:
                sizes.append(image.size[0] * image.size[1] / 1e6)
        except Exception:  # a corrupt or odd file: the survey samples the others
            continue
    return sum(sizes) / len(sizes) if sizes else None


def _probe_videos(storage: Any, objects: list[Any]) -> list[tuple[int, float, float, float]]:
    """(bytes, seconds, fps, megapixels) of the videos that probe."""
    from tasks.video import probe

    found = []
    for obj in objects:
        try:
            with storage.open(obj.key) as stream:
                info = probe(stream, use_metadata=True)
        except Exception:
            continue
        if isinstance(info, str) or not info.fps:
            continue
        seconds = info.duration_seconds or info.frame_count / info.fps
        found.append((obj.size, seconds, info.fps, info.width * info.height / 1e6))
    return found


def this_machine() -> Machine:
    """The machine this runs on: its usable CPUs and memory (cgroup limits included, from
    tasks/resources.py) and its NVIDIA GPUs (from NVML, not torch: the command stays
    quick)."""
    from tasks.resources import memory_facts, usable_cpus

    gpus, name, vram = 0, None, 0.0
    try:
        import pynvml

        pynvml.nvmlInit()
        gpus = pynvml.nvmlDeviceGetCount()
        if gpus:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = f"{gpus} x {pynvml.nvmlDeviceGetName(handle)}"
            vram = gpus * int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) / 1e9
        pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver here: no GPU
        gpus = 0
    ram = memory_facts()[0] / 1e9
    return Machine(usable_cpus(), round(ram, 1), gpus, name, round(vram, 1), "this machine")


# `curate recommend` arguments that describe a dataset by numbers, not by a location.
NUMBER_KEYS = ("images", "videos", "video_seconds", "fps", "image_size", "video_size")


def _megapixels(key: str, value: str) -> float:
    """`1920x1080` or `1024` (a square side) as megapixels."""
    from tasks.errors import ConfigError

    try:
        parts = [int(p) for p in str(value).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise ConfigError(
            f"recommend: {key}: expected WIDTHxHEIGHT or a side in pixels, e.g. 1280x720"
        )
    return parts[0] * parts[-1] / 1e6


def parse_arguments(config_file: str | None, args: list[str]) -> tuple[dict[str, str], Plan, Any]:
    """(dataset numbers, the plan, the validated config) from `curate recommend`'s
    arguments: `images=`, `videos=`, ... and any `curate run` config key (`input`,
    `enable_training`, `training.max_epochs`, `pretagging.checkpoint`, `embedding.model`,
    `embedding.input_size`, `every_nth_frame`, `stopping_condition.*`)."""
    from tasks.config import load_config
    from tasks.errors import ConfigError

    numbers: dict[str, str] = {}
    overrides = []
    for item in args:
        key, sep, value = item.partition("=")
        if key in NUMBER_KEYS:
            numbers[key] = value
        else:
            overrides.append(item)
    given = {item.partition("=")[0] for item in overrides}
    if "input" not in given and not numbers and config_file is None:
        raise ConfigError(
            "recommend: give the dataset: input=LOCATION, or images=N and/or "
            "videos=N video_seconds=S fps=F"
        )
    defaults = ["input=numbers-given", "output=recommend-writes-nothing"]
    if not any(k.startswith("stopping_condition") for k in given):
        defaults.append(f"stopping_condition.proportion_samples={DEFAULT_BUDGET_SHARE}")
    config = load_config(config_file, [*defaults, *overrides])
    for key in ("images", "videos"):
        if key in numbers and not numbers[key].isdigit():
            raise ConfigError(f"recommend: {key}: expected a whole number, got {numbers[key]!r}")
    for key in ("video_seconds", "fps"):
        if key in numbers:
            try:
                if float(numbers[key]) <= 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"recommend: {key}: expected a positive number") from None
    if "videos" in numbers and "video_seconds" not in numbers:
        raise ConfigError("recommend: videos=N needs video_seconds=S (their mean length)")
    stopping = config.stopping_condition
    plan = Plan(
        model=config.embedding.model,
        input_size=config.embedding.input_size,
        training=config.enable_training,
        training_epochs=config.training.max_epochs,
        training_input_size=config.training.input_size,
        pretagging=config.pretagging.checkpoint is not None,
        n_samples=stopping.n_samples,
        proportion_samples=stopping.proportion_samples,
    )
    return numbers, plan, config


def workload_from_numbers(numbers: dict[str, str], every_nth_frame: int) -> Workload:
    base = Workload()
    return Workload(
        images=int(numbers.get("images", 0)),
        image_megapixels=(
            _megapixels("image_size", numbers["image_size"])
            if "image_size" in numbers
            else base.image_megapixels
        ),
        videos=int(numbers.get("videos", 0)),
        video_seconds=float(numbers.get("video_seconds", 0)),
        fps=float(numbers.get("fps", base.fps)),
        video_megapixels=(
            _megapixels("video_size", numbers["video_size"])
            if "video_size" in numbers
            else base.video_megapixels
        ),
        every_nth_frame=every_nth_frame,
    )
