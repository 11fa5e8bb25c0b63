"""The one config model: the flow's parameter, the YAML file's schema, the CLI's target.

Validation happens here, once, at the edge. Every error names the dotted key it is about;
an unknown key suggests the closest known one.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import ConfigError
from tasks.strategies import AUTO_TYPICALITY_BUDGET, StrategyEntry, parse_strategies, shorthand

R = TypeVar("R")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Datasource(_Section):
    process_all: bool = Field(
        False,
        description="Ignore the datapool: process every object again and select as if "
        "nothing had been selected before; the run's result replaces the datapool.",
    )
    relevant_filenames_file: str | None = Field(
        None,
        description="A file of names and `dir/*` patterns restricting the input; lines "
        "starting with `!` exclude (gitignore-style). Relative paths are read from the "
        "input location.",
    )
    use_frame_count_metadata: bool = Field(
        False,
        description="Count a video's frames from its container's metadata when that count "
        "can be trusted (MP4/MOV, AVI; faster on buckets: only the header is read); "
        "otherwise, and by default, by demuxing every packet (no decode).",
    )


class DatapoolSettings(_Section):
    keep_history: int = Field(
        5, ge=1, description="Datapool versions kept (the current one included)."
    )
    lock_stale_after_seconds: float = Field(
        90.0,
        gt=0,
        description="A datapool lock whose heartbeat is older than this is taken over "
        "(its run died on another machine); a live run refreshes it every tenth of this. "
        "A lock held by a dead process on this machine is taken over at once.",
    )


class StorageSettings(_Section):
    credentials_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding a JSON object of environment "
        "variables for the cloud clients (e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "AZURE_STORAGE_CONNECTION_STRING, GOOGLE_APPLICATION_CREDENTIALS): how a deployment "
        "gets credentials without putting them in its parameters.",
    )

    @field_validator("credentials_secret")
    @classmethod
    def _block_name(cls, value: str | None) -> str | None:
        # Prefect's rule for block names; a pasted key or connection string breaks it.
        # The message never repeats the value: it may be the secret itself.
        if value is not None and not re.fullmatch(r"[a-z0-9-]+", value):
            raise ValueError(
                "expected the name of a Prefect Secret block (lowercase letters, digits, "
                "dashes), not the credentials themselves"
            )
        return value


class CorruptnessCheck(_Section):
    max_image_pixels: int = Field(
        178_956_970,
        gt=0,
        description="Images with more pixels are flagged as decompression bombs "
        "(Pillow's own hard limit by default).",
    )
    pixels_in_flight: int | None = Field(
        None,
        gt=0,
        description="Decoded image pixels a process holds at once over all its decode "
        "threads (at most 20 bytes each at the peak of a decode, 5 for RGB photos); more "
        "wait, and an image larger than this decodes alone. Default: max_image_pixels (one "
        "image at the limit, or many smaller ones, at a time: at most 3.6 GB).",
    )
    keep_decodable_frames: bool = Field(
        False,
        description="For a corrupt video: false excludes all its frames from the run; "
        "true keeps the frames that decode (the video is reported corrupt either way).",
    )


class StoppingCondition(_Section):
    """How much to select. The JSON schema states the rule between the keys, so the
    Prefect server refuses a run that breaks it before creating it."""

    model_config = ConfigDict(
        extra="forbid",
        # With n_samples set, proportion_samples must be null. Prefect strips "required"
        # from parameter schemas (runs may give a section partly), so the rule is a
        # dependent schema, which needs none.
        json_schema_extra={
            "dependentSchemas": {
                "n_samples": {
                    "if": {"properties": {"n_samples": {"type": "integer"}}},
                    "then": {"properties": {"proportion_samples": {"type": "null"}}},
                }
            }
        },
    )

    n_samples: int | None = Field(None, gt=0, description="How many samples to select.")
    proportion_samples: float | None = Field(
        None, gt=0, le=1, description="Fraction of the processed samples to select."
    )
    min_distance: float | None = Field(
        None,
        ge=0,
        le=2,
        description="Stop when the next pick is closer than this (cosine distance, at "
        "most 2) to the selected set.",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> StoppingCondition:
        if self.n_samples is not None and self.proportion_samples is not None:
            raise ValueError("set n_samples or proportion_samples, not both")
        return self


Device = Literal[
    "auto",
    "cpu",
    "cuda",
    "cuda:0",
    "cuda:1",
    "cuda:2",
    "cuda:3",
    "cuda:4",
    "cuda:5",
    "cuda:6",
    "cuda:7",
]


class Embedding(_Section):
    model: str = Field("resnet18", description="A timm model name.")
    input_size: int | None = Field(
        None,
        gt=7,
        le=1024,
        description="Square model input in pixels; default 224 on a GPU, 64 on a CPU. "
        "Model inputs are made during the corruptness check's single read, so "
        "changing this redoes that step too.",
    )
    batch_size: int = Field(
        64,
        gt=0,
        le=4096,
        description="Images per forward pass; larger is faster on a GPU until its memory "
        "runs out. Does not change the embeddings.",
    )
    device: Device = Field(
        "auto",
        description="auto: the first CUDA GPU when there is one, else the CPU; cuda:N picks a GPU.",
    )
    checkpoint: str | None = Field(
        None, description="A local .safetensors or .pth file with the backbone's weights."
    )
    pretrained: bool = Field(
        False, description="Download timm's pretrained weights (needs internet)."
    )

    @model_validator(mode="after")
    def _one_weight_source(self) -> Embedding:
        if self.checkpoint and self.pretrained:
            raise ValueError("set checkpoint or pretrained, not both")
        return self


class Selection(_Section):
    strategy: Literal["auto", "typical_coverage", "kcenter", "random"] = Field(
        "auto",
        description="A shorthand for `strategies`. typical_coverage: farthest-point "
        "coverage weighted by typicality (DIVERSITY + TYPICALITY; beats pure coverage at "
        "small budgets); kcenter: pure coreset (DIVERSITY); random; auto: "
        "typical_coverage for budgets up to `typicality_budget` per candidate, kcenter "
        "above.",
    )
    strategies: list[StrategyEntry] | None = Field(
        None,
        description="Lightly-style list of {input: {type, key | task | score | name}, "
        "strategy: {type, strength, threshold + operation | target | query | "
        "stopping_condition_minimum_distance}} entries; replaces `strategy`.",
    )
    typicality_budget: float = Field(
        AUTO_TYPICALITY_BUDGET,
        ge=0,
        le=1,
        description="auto: the largest budget, as a share of the candidates, at which "
        "typicality-weighted coverage is used.",
    )
    custom_metadata: str | None = Field(
        None,
        description="Per-sample metadata for METADATA inputs: a Parquet file (filename + "
        "columns) or a folder of `<sample name>.json` files; default: "
        "`<input>/.curate/metadata/` when present.",
    )
    predictions: str | None = Field(
        None,
        description="Predictions and scores for PREDICTIONS and SCORES inputs (Parquet, "
        "see tasks/strategies.py PREDICTION_COLUMNS).",
    )

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategies(cls, value: Any) -> Any:
        return None if value is None else parse_strategies(value)

    @model_validator(mode="after")
    def _one_way(self) -> Selection:
        # "auto" may come back with the strategies from a dump (Prefect, report.json)
        if self.strategies is not None and self.strategy != "auto":
            raise ValueError("set selection.strategy or selection.strategies, not both")
        return self

    def entries(self, budget: int, candidates: int) -> list[StrategyEntry]:
        """The strategies to run for a budget among this many candidates."""
        if self.strategies is not None:
            return self.strategies
        strategy = self.strategy
        if strategy == "auto":
            small = budget <= self.typicality_budget * candidates
            strategy = "typical_coverage" if small else "kcenter"
        return shorthand(strategy)


class Training(_Section):
    """Self-supervised training of `embedding.model` on the run's samples
    (`enable_training`). CPU defaults measured on 2 cores: 5 epochs of 32 px views;
    on scikit-learn's digits 3 such epochs lift resnet18's 1-NN accuracy from 0.68 to
    0.93."""

    method: Literal["simclr", "simsiam", "byol"] = Field(
        "simclr",
        description="simclr: contrastive (NT-Xent), best in our measurements at every "
        "batch size tried; simsiam and byol: no negatives, for small batches.",
    )
    max_epochs: int | None = Field(
        None,
        gt=0,
        le=10_000,
        description="Passes over the training set; default 5 on a CPU (5,000 64 px images "
        "train resnet18 in about 6 minutes on 2 cores), 100 on a GPU.",
    )
    batch_size: int = Field(
        128,
        gt=1,
        le=8192,
        description="Images per step (two views each); must not exceed the training set.",
    )
    learning_rate: float = Field(
        0.6,
        gt=0,
        description="SGD (momentum 0.9) learning rate for a batch of 256, scaled "
        "linearly with batch_size (0.3 at 128) and cosine-decayed to 0 over max_epochs; "
        "lower it if training stops on a NaN loss.",
    )
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay.")
    input_size: int | None = Field(
        None,
        gt=7,
        le=1024,
        description="Side of the augmented views in pixels; default: the model inputs' "
        "size (embedding.input_size) on a GPU, at most 32 px on a CPU (measured: 4x "
        "faster than 64 px, and the model still embeds 64 px inputs well).",
    )
    precision: Literal["auto", "fp32", "amp"] = Field(
        "auto",
        description="auto: mixed precision (bf16, else fp16) on CUDA, fp32 on a CPU; "
        "amp needs a CUDA device.",
    )
    resume_from: str | None = Field(
        None,
        description="A backbone checkpoint (an earlier run's checkpoints/*.safetensors, "
        "or any file embedding.checkpoint takes) to start from instead of a random "
        "initialisation; heads and optimiser start afresh.",
    )
    cache_bytes: int = Field(
        2 << 30,
        ge=0,
        description="Memory for the training inputs (decoded, downscaled: 12 KiB per "
        "64 px sample, so 2 GiB hold about 170,000); samples beyond it are read again "
        "every epoch, with a warning.",
    )


class Pretagging(_Section):
    """Class probabilities from a classifier (`data/predictions.parquet`) and
    active-learning scores from them, for selection strategies to use as inputs."""

    checkpoint: str | None = Field(
        None,
        description="A timm classifier (.safetensors or .pth) with its class names: in "
        "the safetensors metadata (`class_names`, a JSON list; `architecture`, the timm "
        "name), in a .pth dict's `class_names`, or in a sidecar `<file>.json` "
        '(`{"class_names": [...], "architecture": "..."}`). Unset: no pretagging.',
    )
    model: str | None = Field(
        None,
        description="The classifier's timm architecture; default: the checkpoint's own "
        "`architecture`, else embedding.model.",
    )
    class_names: list[str] | str | None = Field(
        None,
        description="The class names in head order, inline or a file (one name a line, or "
        "a JSON list); overrides the checkpoint's.",
    )
    batch_size: int = Field(
        64, gt=0, le=4096, description="Images per classifier forward pass (speed only)."
    )


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_MEMORY_PATTERN = r"^(auto|\s*\d+(\.\d+)?\s*([kKmMgGtT]i?[bB]?|[bB])?\s*)$"


def parse_memory(value: str) -> int:
    """Bytes from `2GiB`, `512MB`, `1.5G` or a plain number (powers of 1024 for `Ki`...,
    of 1000 for `KB`...; a bare `G` is GiB, as Kubernetes and Ray users write it)."""
    match = _MEMORY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not an amount of memory (e.g. 4GiB, 512MB, 2000000000)")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    powers = {"k": 1, "m": 2, "g": 3, "t": 4}
    if unit == "b":
        return int(number)
    base = 1000 if unit.endswith("b") and not unit.endswith("ib") else 1024
    return int(number * base ** powers[unit[0]])


class StepResources(_Section):
    """What one task of a step asks for; `auto` (every key's default) is planned from the
    machine and never over-asks."""

    num_cpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="CPUs one task of the step uses (Ray's request; fractions allowed). auto: an "
        "even share of the usable CPUs (cgroup quota and affinity respected) that the steps "
        "running at the same time leave.",
    )
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="GPUs one task of the step uses; a fraction below 1 shares a GPU (0.25: four "
        "tasks per GPU). auto: one GPU when the step computes on one (a share when steps "
        "running at the same time do), else 0.",
    )
    memory: Annotated[int, Field(gt=0)] | Annotated[str, Field(pattern=_MEMORY_PATTERN)] = Field(
        "auto",
        description="Memory one worker of the step needs (4GiB, 512MB or bytes): a hint that "
        "decides how many workers fit, and Ray's request (times num_proc). auto: no request; "
        "workers are capped at a safe share (80%) of the free memory (cgroup limit respected).",
    )
    num_proc: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="Workers of one task: decode threads (check), loader threads (embed, train, "
        "pretag). auto: num_workers when set, else one per CPU of the step (every usable CPU "
        "while num_cpus is auto), no more than its memory allows.",
    )

    @field_validator("memory", mode="after")
    @classmethod
    def _bytes(cls, value: int | str) -> int | str:
        return value if isinstance(value, int) or value == "auto" else parse_memory(value)


class Resources(_Section):
    """Each step's resources (as Data-Juicer's operators declare them); see README
    "Resources"."""

    check: StepResources = Field(
        StepResources(), description="The corruptness check, metadata and model inputs (CPU)."
    )
    embed: StepResources = Field(
        StepResources(), description="Embedding (the GPU when there is one)."
    )
    train: StepResources = Field(StepResources(), description="Self-supervised training.")
    pretag: StepResources = Field(StepResources(), description="Pretagging with a classifier.")


class Orchestration(_Section):
    mode: Literal["local", "pools", "ray"] = Field(
        "local",
        description="`local`: every step in this run's process. `pools`: checks run as "
        "`check` flow runs on the CPU pool's workers, embeddings as `embed` flow runs on the "
        "GPU pool's (prefect.yaml deploys both); results pass through the output location. "
        "`ray`: check and embed shard tasks run on Ray (prefect-ray's RayTaskRunner), each "
        "asking for its step's resources.* (a local Ray unless ray_address is set).",
    )
    ray_address: str | None = Field(
        None,
        description="With mode=ray, an existing Ray cluster (`ray://head:10001`, or `auto` for "
        "the one this machine joined); unset: a Ray started for the run on this machine and "
        "stopped after it. A cluster's workers need PREFECT_API_URL and a bucket output.",
    )
    cpu_pool: str = Field(
        "curate-cpu", min_length=1, description="The pool whose `check/<pool>` deployment checks."
    )
    gpu_pool: str = Field(
        "curate-gpu", min_length=1, description="The pool whose `embed/<pool>` deployment embeds."
    )
    samples_per_child: int = Field(
        10000,
        gt=0,
        description="Shards are batched into child flow runs of at least this many samples "
        "(a video counts its frames), so that a worker's process start stays a small share.",
    )
    children_in_flight: int = Field(
        4,
        gt=0,
        description="Child runs per pool submitted and not finished at once (more queue in "
        "this run); at least the pool's workers times their --limit keeps every worker busy.",
    )
    embeds_per_device: int = Field(
        1,
        ge=1,
        description="Embedding children that one device (a GPU; a CPU-only worker's machine) "
        "runs at once, held by a global concurrency limit per device. A GPU worker takes two "
        "children: the next one starts its process and builds its model while one embeds.",
    )
    child_attempts: int = Field(
        3,
        ge=1,
        description="Times a child's work is dispatched when its run fails, crashes or is "
        "lost with its worker; done shards come from the cache.",
    )
    child_lost_after_seconds: float = Field(
        120.0,
        ge=35,
        description="A running child with no heartbeat for this long (workers send one every "
        "30 s), or a pending one not started in this time, lost its worker: it is marked "
        "crashed and its work dispatched again.",
    )
    child_timeout_seconds: float = Field(
        6 * 3600.0,
        gt=0,
        description="A child not finished this long after it was submitted fails the run.",
    )


class Monitoring(_Section):
    """Per-step CPU, memory, GPU and read figures and a bottleneck verdict in report.json
    (tasks/monitor.py)."""

    enabled: bool = Field(
        True, description="Sample each step's resources and judge what bound it (cheap)."
    )
    interval_seconds: float = Field(
        0.25, gt=0, le=60, description="Seconds between samples of the process's threads."
    )


class CurateConfig(_Section):
    """A curation run: where to read, where to write, what to select."""

    input: str = Field(description="Folder, file://, s3://, gs:// or az:// URL.")
    output: str = Field(description="Where runs, reports and the datapool go.")
    datasource: Datasource = Field(Datasource(), description="What of the input to process.")
    datapool: DatapoolSettings = Field(
        DatapoolSettings(), description="The output's memory of earlier runs."
    )
    storage: StorageSettings = Field(StorageSettings(), description="Cloud credentials.")
    enable_corruptness_check: bool = Field(
        True,
        description="Decode every image fully and flag failures; when false, JPEGs are "
        "decoded at reduced size (faster) and only unreadable files are flagged.",
    )
    corruptness_check: CorruptnessCheck = Field(
        CorruptnessCheck(), description="Limits and choices of the corruptness check."
    )
    remove_exact_duplicates: bool = Field(
        True,
        description="Drop byte- or pixel-identical copies before selection (the first name "
        "is kept; copies of samples the datapool selected are duplicates too).",
    )
    stopping_condition: StoppingCondition = Field(
        StoppingCondition(),
        description="The budget: n_samples or proportion_samples (not both), and/or min_distance.",
    )
    embedding: Embedding = Field(Embedding(), description="The timm model that embeds samples.")
    selection: Selection = Field(Selection(), description="How samples are picked.")
    enable_training: bool = Field(
        False,
        description="Train embedding.model self-supervised on the run's samples before "
        "embedding, then embed with it (see training.*).",
    )
    training: Training = Field(Training(), description="Self-supervised training of the model.")
    pretagging: Pretagging = Field(
        Pretagging(), description="Class predictions from a classifier checkpoint."
    )
    every_nth_frame: int = Field(
        1, gt=0, description="Use frames 0, n, 2n, ... of each video as samples."
    )
    selected_sequence_length: int | None = Field(
        None,
        gt=0,
        description="Select sequences of this many consecutive (sampled) video frames "
        "instead of single frames; images are then not selected.",
    )
    shard_size: int = Field(
        2000,
        gt=0,
        description="Images per Prefect task run; video frames are embedded in chunks of "
        "this many.",
    )
    num_workers: int = Field(
        -1,
        ge=-1,
        description="Decode and loader threads of every step: an alias of "
        "resources.<step>.num_proc for each step that leaves it auto; -1: auto.",
    )
    resources: Resources = Field(
        Resources(),
        description="CPUs, GPUs, memory and workers of each step, checked before any work.",
    )
    orchestration: Orchestration = Field(
        Orchestration(), description="Where the steps run: this process or work pools."
    )
    seed: int = Field(
        0, description="Every random choice (weights, selection ties, sampling) follows it."
    )
    monitoring: Monitoring = Field(
        Monitoring(), description="Resource figures and a bottleneck verdict per step."
    )

    @model_validator(mode="after")
    def _no_template(self) -> CurateConfig:
        for key in ("input", "output"):
            value = getattr(self, key)
            if "{{" in value:
                raise ValueError(
                    f"{key} is the unresolved template {value!r}: set the environment "
                    "variable it names when running `prefect deploy`, or pass the "
                    "config parameter"
                )
        return self

    @model_validator(mode="after")
    def _has_budget(self) -> CurateConfig:
        s = self.stopping_condition
        if s.n_samples is None and s.proportion_samples is None and s.min_distance is None:
            raise ValueError(
                "stopping_condition: set n_samples, proportion_samples or min_distance"
            )
        return self

    def sections(self) -> dict[str, Any]:
        """The top-level keys and their values (sections as models): the parameters of
        the curate flow, `curate(**config.sections())`."""
        return {name: getattr(self, name) for name in type(self).model_fields}


def as_flow_parameters(fn: Callable[..., R]) -> Callable[..., R]:
    """Give `fn(**sections)` one keyword parameter per top-level config key, typed,
    constrained, defaulted and described by `CurateConfig` itself, so that Prefect's
    parameter schema (the UI's form, the server's validation) is the config model and a
    run's `--param stopping_condition=...` replaces one section, not the whole config."""
    parameters = []
    described = []
    for name, field in CurateConfig.model_fields.items():
        default = inspect.Parameter.empty if field.is_required() else field.get_default()
        annotation: Any = field.annotation
        if field.metadata:  # constraints (gt=0, ...) travel in the annotation
            annotation = Annotated[(annotation, *field.metadata)]  # type: ignore[valid-type]
        parameters.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
        )
        described.append(f"    {name}: {' '.join((field.description or '').split())}")
    fn.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    # Prefect reads parameter descriptions from a Google-style docstring.
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\nArgs:\n" + "\n".join(described) + "\n"
    return fn


def key_help() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key, for `curate run --help`."""

    def walk(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str, str]]:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else json.dumps(field.get_default())
            yield f"{prefix}{name}", default, " ".join((field.description or "").split())

    return list(walk(CurateConfig, ""))


def known_keys(model: type[BaseModel] = CurateConfig, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, sections included."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(known_keys(annotation, key + "."))
    return keys


def _unknown_keys(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    unknown = []
    for name, value in data.items():
        key = prefix + str(name)
        field = model.model_fields.get(str(name))
        if field is None:
            # Name the whole dotted key the user wrote, for a better suggestion (a few
            # levels: a YAML alias can make a mapping that contains itself).
            for _ in range(8):
                if not (isinstance(value, dict) and len(value) == 1):
                    break
                ((child, value),) = value.items()
                key += f".{child}"
            unknown.append(key)
            continue
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if is_section and isinstance(value, dict):
            unknown.extend(_unknown_keys(value, annotation, key + "."))  # type: ignore[arg-type]
    return unknown


def _did_you_mean(key: str) -> str:
    if key in known_keys():  # a dotted key written as one name in a YAML file
        section, _, rest = key.partition(".")
        return f"; in a YAML file write it nested ({section}: {{{rest}: ...}}) or pass {key}=..."
    match = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


# Credentials written into a value: `scheme://user:password@host`, a connection string's
# key, a URL's signature or token parameter (an Azure SAS, a presigned S3 URL).
_INLINE_CREDENTIAL = re.compile(
    r"^[a-z][a-z0-9+.-]*://[^/?#]*@"
    r"|(AccountKey|SharedAccessSignature|SharedAccessKey)="
    r"|[?&](sig|signature|x-amz-signature|x-amz-security-token|x-amz-credential|token|"
    r"access_token|sas_token|account_key|password|secret)=",
    re.IGNORECASE,
)
CREDENTIALS_HINT = (
    "credentials come from the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "AZURE_STORAGE_CONNECTION_STRING, GOOGLE_APPLICATION_CREDENTIALS, ...) or from a "
    "Prefect Secret block named by storage.credentials_secret"
)


def _inline_credentials(data: Any, prefix: str = "", depth: int = 0) -> str | None:
    """The dotted key of the first string value that carries credentials, if any."""
    if depth > 16:  # deeper than any key: a YAML alias that contains itself
        return None
    if isinstance(data, BaseModel):  # a section as the flow receives it
        data = data.model_dump()
    if isinstance(data, dict):
        items: Iterator[tuple[str, Any]] = ((f"{prefix}{k}", v) for k, v in data.items())
    elif isinstance(data, list):
        items = ((f"{prefix.removesuffix('.')}[{i}]", v) for i, v in enumerate(data))
    else:
        return None
    for key, value in items:
        if isinstance(value, str) and _INLINE_CREDENTIAL.search(value):
            return key
        nested = isinstance(value, dict | list | BaseModel)
        found = _inline_credentials(value, key + ".", depth + 1) if nested else None
        if found:
            return found
    return None


def _message(err: Any) -> str:
    """pydantic's message for one error, in the config's words."""
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return "required, e.g. " + ("input=./photos" if key == "input" else f"{key}=...")
    if err["type"] == "model_type":  # a value where a section goes
        return f"is a section, not a value: set its keys, e.g. {key}.KEY=VALUE"
    if err["type"].endswith("_type") and err.get("input") is None:
        return "needs a value"  # `key=` on the command line, `key:` in YAML
    return str(err["msg"]).removeprefix("Value error, ")


def parse_config(data: dict[str, Any]) -> CurateConfig:
    """Validate a nested dict; raise CurateError naming the first bad key."""
    unknown = _unknown_keys(data, CurateConfig)
    if unknown:
        raise ConfigError(f"config: unknown key '{unknown[0]}'{_did_you_mean(unknown[0])}")
    inline = _inline_credentials(data)
    if inline:  # the value itself is never repeated: it may be a secret
        raise ConfigError(f"config: {inline}: holds credentials; {CREDENTIALS_HINT}")
    try:
        return CurateConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        message = _message(err)
        raise ConfigError(f"config: {key}: {message}" if key else f"config: {message}") from None
    except RecursionError:  # a YAML alias that contains itself
        raise ConfigError("config: a value refers to itself (a YAML alias loop)") from None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections on the way."""
    *sections, leaf = key.split(".")
    node = data
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: {section} is a value, not a section (in '{key}')")
        node = child
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str]) -> CurateConfig:
    """A YAML file (optional) plus `key=value` overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path}: expected a mapping of keys (key: value lines), "
                f"found a {_yaml_kind(loaded)}"
            )
        data = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument '{item}': expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), _as_text_if_meant(key, raw, value))
    return parse_config(data)


def _as_text_if_meant(key: str, raw: str, value: Any) -> Any:
    """The raw text where the key takes text and YAML read something the key does not
    take: `input=2024`, `input=~` (the home folder), `output=#1`, `...secret=-`."""
    options = _leaf_types(key)
    if str not in options or isinstance(value, str) or not raw:
        return value
    if value is None:  # `null` means unset where that is allowed; `#x` was no null
        explicit = raw.strip() in ("~", "null", "Null", "NULL")
        return None if explicit and type(None) in options else raw
    taken = {typing.get_origin(option) or option for option in options}
    return value if type(value) in taken else raw


def _leaf_types(key: str) -> tuple[Any, ...]:
    """The types (a union's members) the leaf at dotted `key` takes; () if none."""
    model: type[BaseModel] = CurateConfig
    *sections, leaf = key.strip().split(".")
    for section in sections:
        field = model.model_fields.get(section)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ()
        model = annotation
    field = model.model_fields.get(leaf)
    if field is None:
        return ()
    return typing.get_args(field.annotation) or (field.annotation,)


# A config file is a few KB; more is the wrong file (a device, a dataset).
MAX_CONFIG_BYTES = 1 << 20


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; every failure is one line naming the file (and the line)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not a text file (invalid UTF-8 at byte {exc.start})"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"config file {path}{_yaml_error(exc)}") from None
    except yaml.YAMLError as exc:  # a reader error: a control character, no line
        detail = getattr(exc, "reason", None) or type(exc).__name__
        position = getattr(exc, "position", None)
        at = f" at character {position}" if position is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML ({detail}{at})") from None
    except RecursionError:  # nesting thousands deep
        raise ConfigError(f"config file {path}: nested too deeply") from None


def _yaml_error(exc: yaml.MarkedYAMLError) -> str:
    """`, line 3, column 1: not valid YAML (...)` with PyYAML's own words, in one line:
    where the problem is, and where the construct it broke began."""

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = exc.problem_mark or exc.context_mark
    problem = " ".join(str(exc.problem or "").split())
    if exc.context and exc.context_mark and exc.context_mark is not mark:
        problem += f"; {exc.context} from {at(exc.context_mark)}"
    return f", {at(mark)}: not valid YAML ({problem})" if mark else f": not valid YAML ({problem})"


def _yaml_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )
