"""Report: `report.html` and `report.pdf`, the run as a person reads it.

Both are drawn from what export already holds (report.json's dict, the run's metadata with
`selected` and `duplicate_of`, the shards' embeddings, the corrupt reasons) and have the
same sections: the run's counts, durations and traffic, the model, then the selection seen
from several sides (nearest-neighbour distances, a 2-D map, metadata, coverage against a
random subset of the same size, thumbnails, duplicates and who stands for them, video
timelines).

The HTML needs nothing but a browser: figures are inline PNGs, thumbnails inline JPEGs, no
script, no request. The PDF is made by matplotlib alone, one page per section.

For a million samples the cost stays bounded: embeddings are drawn from a seeded sample
(`MAP_POINTS`), distances are measured from a smaller one (`EVAL_POINTS`) to at most
`CENTERS` selected samples, and only the thumbnails shown are ever read (`THUMBNAILS`,
`PAIRS`). The numbers of each figure say what they were measured on.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure, FigureBase

    from tasks.export import Exported
    from tasks.storage import Storage

log = logging.getLogger(__name__)

MAP_POINTS = 20_000  # samples drawn for the map and the nearest-neighbour histogram
EVAL_POINTS = 5_000  # of them, the ones whose distances are measured
CENTERS = 20_000  # selected (and random) samples distances are measured to, at most
PRIOR_POINTS = 5_000  # datapool picks drawn on the map
TSNE_POINTS = 1_000  # t-SNE only up to this many points on the map (seconds per 1,000)
THUMBNAILS = 64  # selected samples shown
PAIRS = 8  # removed duplicates and near duplicates shown, each
VIDEOS = 12  # videos with a timeline
THUMB_PX = 112
HTML_DPI = 80
METADATA_COLUMNS = ("brightness", "contrast", "saturation", "sharpness", "width", "height")
_CHUNK = 1024  # rows per distance block

ALL_COLOR, SELECTED_COLOR, PRIOR_COLOR, RANDOM_COLOR = "#9aa5b1", "#d9480f", "#1864ab", "#5c940d"

Thumbnail = Callable[[str], bytes | None]  # a sample's image bytes, None when unreadable


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]


@dataclass
class Section:
    """One section of the report: one page of the PDF, one <section> of the HTML."""

    title: str
    note: str = ""
    tables: list[Table] = field(default_factory=list)
    plot: Callable[[FigureBase], None] | None = None  # draws the section's figure
    size: tuple[float, float] = (10.0, 4.0)  # inches, of the figure in the HTML
    # Thumbnails with captions: a grid in the HTML (instead of `plot`, which draws them
    # for the PDF).
    images: list[tuple[str, bytes | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Sampled:
    """Embeddings drawn from a run for the report: rows of the run's metadata with their
    vectors (L2-normalised, as selection sees them)."""

    sample_rows: np.ndarray  # eligible (not duplicate) samples, seeded, random order
    sample: np.ndarray
    selected_rows: np.ndarray  # this run's picks (all, or a seeded subset of CENTERS)
    selected: np.ndarray
    random_rows: np.ndarray  # as many eligible samples, drawn at random
    random: np.ndarray
    prior: np.ndarray  # the datapool's earlier picks (a seeded subset)
    eligible: int  # samples selection chose from
    n_selected: int  # this run's picks, all of them


def sample_embeddings(
    metadata: pd.DataFrame,
    shard_vectors: Iterable[np.ndarray],
    selected: Sequence[str],
    prior: np.ndarray | None = None,
    seed: int = 0,
) -> Sampled:
    """Draw the report's embeddings from `shard_vectors` (one array per shard, rows in
    `metadata`'s order, read one at a time), keeping only the rows drawn."""
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(metadata["duplicate_of"].isna().to_numpy())
    sample_rows = _draw(rng, eligible, MAP_POINTS)
    picked = pd.Index(metadata["filename"]).get_indexer(list(selected))
    picked = picked[picked >= 0]
    selected_rows = _draw(rng, picked, CENTERS) if len(picked) > CENTERS else picked
    random_rows = _draw(rng, eligible, len(selected_rows))
    wanted = np.unique(np.concatenate([sample_rows, selected_rows, random_rows]))
    vectors: np.ndarray | None = None
    offset = 0
    for block in shard_vectors:
        lo, hi = np.searchsorted(wanted, [offset, offset + len(block)])
        if vectors is None:
            vectors = np.zeros((len(wanted), block.shape[1]), np.float32)
        vectors[lo:hi] = block[wanted[lo:hi] - offset]
        offset += len(block)
    if vectors is None:
        vectors = np.zeros((len(wanted), 0), np.float32)
    vectors = _normalised(vectors)

    def rows_of(rows: np.ndarray) -> np.ndarray:
        return vectors[np.searchsorted(wanted, rows)]

    prior_vectors = np.zeros((0, vectors.shape[1]), np.float32)
    if prior is not None and len(prior) and prior.shape[1] == vectors.shape[1]:
        prior_vectors = _normalised(prior[_draw(rng, np.arange(len(prior)), PRIOR_POINTS)])
    return Sampled(
        sample_rows,
        rows_of(sample_rows),
        selected_rows,
        rows_of(selected_rows),
        random_rows,
        rows_of(random_rows),
        prior_vectors,
        len(eligible),
        len(picked),
    )


def _draw(rng: np.random.Generator, rows: np.ndarray, k: int) -> np.ndarray:
    """At most k of `rows`, at random, in random order."""
    return rows[rng.permutation(len(rows))[:k]] if len(rows) else rows


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def nearest(
    points: np.ndarray, centers: np.ndarray, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distance from each point to its nearest center, and that center's index.
    With `exclude_self`, `points` are the first rows of `centers` and a point is not its
    own neighbour."""
    distances = np.full(len(points), np.nan, np.float32)
    indices = np.full(len(points), -1, np.int64)
    if not len(centers) or (exclude_self and len(centers) < 2):
        return distances, indices
    for start in range(0, len(points), _CHUNK):
        similarity = points[start : start + _CHUNK] @ centers.T
        if exclude_self:
            rows = np.arange(len(similarity))
            similarity[rows, start + rows] = -np.inf
        best = similarity.argmax(axis=1)
        indices[start : start + _CHUNK] = best
        top = similarity[np.arange(len(best)), best]
        distances[start : start + _CHUNK] = np.clip(1 - top, 0, 2)
    return distances, indices


@dataclass(frozen=True)
class ReportData:
    """Everything the sections are drawn from."""

    report: dict[str, Any]  # report.json's content
    metadata: pd.DataFrame  # the run's samples, with `selected` and `duplicate_of`
    corrupt: dict[str, str]  # corrupt images and videos, with reasons
    selected: Sequence[str]  # this run's picks, in pick order
    sampled: Sampled
    thumbnail: Thumbnail
    training: dict[str, Any] | None = None  # data/training.json, when training ran
    seed: int = 0


def build_sections(data: ReportData) -> list[Section]:
    """The report's sections, in order (each a page of the PDF)."""
    eval_points = data.sampled.sample[:EVAL_POINTS]
    coverage = nearest(eval_points, data.sampled.selected)
    return [
        run_section(data),
        corrupt_section(data),
        steps_section(data),
        bottlenecks_section(data),
        model_section(data),
        distances_section(data),
        map_section(data),
        metadata_section(data),
        coverage_section(data, coverage),
        thumbnails_section(data),
        duplicates_section(data, coverage),
        videos_section(data),
    ]


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def run_section(data: ReportData) -> Section:
    counts = data.report.get("counts", {})
    labels = [
        ("discovered", "discovered (relevant objects listed)"),
        ("processed", "processed (new or changed)"),
        ("already_in_datapool", "already in the datapool (skipped)"),
        ("skipped_not_images", "other objects (not images or videos)"),
        ("valid", "valid samples (images and video frames)"),
        ("corrupt", "corrupt"),
        ("duplicates", "exact duplicates removed"),
        ("selected", "selected"),
        ("datapool_size", "datapool size (objects, after this run)"),
        ("videos", "videos"),
        ("frames", "video frames"),
        ("corrupt_videos", "corrupt videos"),
        ("selected_sequences", "selected sequences"),
    ]
    rows = [(label, _count(counts[key])) for key, label in labels if key in counts]
    traffic = data.report.get("bytes_read", {})
    read, dataset = traffic.get("total", 0), traffic.get("dataset", 0)
    ratio = f"{read / dataset:.2f} x the dataset" if dataset else "no dataset bytes listed"
    datapool = data.report.get("datapool", {})
    facts = [
        ("run", str(data.report.get("run_id", "?"))),
        ("run time", f"{data.report.get('seconds', 0):.1f} s"),
        ("bytes read", f"{_bytes(read)} ({read:,} B), {ratio}"),
        ("dataset", f"{_bytes(dataset)} ({dataset:,} B)"),
        ("retries", _count(data.report.get("retries", 0))),
        ("datapool version", f"{datapool.get('version')} (was {datapool.get('previous')})"),
    ]
    return Section(
        "Run",
        note="What this run listed, processed and decided.",
        tables=[Table(("count", "value"), rows), Table(("fact", "value"), facts)],
    )


def corrupt_section(data: ReportData) -> Section:
    groups: dict[str, list[str]] = {}
    for name, reason in sorted(data.corrupt.items()):
        groups.setdefault(reason, []).append(name)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    rows = [
        (reason, f"{len(names):,}", ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
        for reason, names in ordered[:15]
    ]
    if len(ordered) > 15:
        rest = sum(len(names) for _, names in ordered[15:])
        rows.append((f"{len(ordered) - 15} other reasons", f"{rest:,}", ""))
    note = (
        f"{len(data.corrupt):,} corrupt objects, by reason (all of them are listed in "
        "corruptness_check_information.json)."
        if data.corrupt
        else "No corrupt objects in this run."
    )
    return Section("Corrupt samples", note=note, tables=[Table(("reason", "count", "e.g."), rows)])


def steps_section(data: ReportData) -> Section:
    steps: dict[str, dict[str, Any]] = data.report.get("steps", {})
    rows = [
        (
            name,
            f"{step.get('seconds', 0):.2f}",
            _bytes(step.get("bytes_read", 0)),
            f"{step.get('cached_shards', 0)}/{step.get('shards', 0)}",
            _count(step.get("retries", 0)),
            step.get("verdict", ""),
        )
        for name, step in steps.items()
    ]
    traffic = data.report.get("bytes_read", {})

    def plot(fig: FigureBase) -> None:
        left, right = fig.subplots(1, 2, width_ratios=(3, 2))
        names = list(steps)
        seconds = [steps[n].get("seconds", 0) for n in names]
        left.barh(names, seconds, color=SELECTED_COLOR)
        left.invert_yaxis()
        left.set_xlabel("seconds (this run's work; cached shards cost nothing)")
        left.set_title("time per step")
        values = [traffic.get("dataset", 0), traffic.get("total", 0)]
        right.bar(["dataset", "read"], [v / 1e6 for v in values], color=[ALL_COLOR, PRIOR_COLOR])
        right.set_ylabel("MB")
        right.set_title("bytes read vs dataset")

    return Section(
        "Steps",
        note="Seconds, bytes read, shards taken from the cache and retries per step.",
        tables=[Table(("step", "seconds", "read", "cached/shards", "retries", "verdict"), rows)],
        plot=plot,
    )


def bottlenecks_section(data: ReportData) -> Section:
    """What bound each step (report.json's `verdict` and `why`, from `monitor`'s
    figures): text only, so it costs nothing to draw."""
    steps: dict[str, dict[str, Any]] = data.report.get("steps", {})
    facts = data.report.get("monitoring")
    if facts is None:
        return Section("Bottlenecks", note="Monitoring was off for this run (monitoring.enabled).")
    rows, reasons = [], []
    for name, step in steps.items():
        figures = step.get("monitor") or {}
        gpu = figures.get("gpu_util_percent")
        rows.append(
            (
                name,
                step.get("verdict", ""),
                f"{figures['cpu_percent'] / 100:.2f}" if figures else "",
                f"{figures['cpu_wait_percent'] / 100:.2f}" if figures else "",
                f"{figures['reads_busy_percent']:.0f} %" if figures else "",
                f"{gpu:.0f} %" if gpu is not None else "",
                _bytes(figures["rss_peak_bytes"]) if figures else "",
            )
        )
        reasons.append((name, step.get("why", "")))
    note = (
        f"What bound each step, from the threads' CPU (running, or runnable and waiting for "
        f"one of the {facts['cores']:g} cores), the share of the step's time with a read in "
        f"flight and the GPU's utilisation ({facts['gpu'] or 'no GPU'}), sampled every "
        f"{facts['interval_seconds']} s: CPU-bound wants more cores, I/O-bound faster or "
        f"closer storage, GPU-bound a faster GPU. Attribution: {facts['attribution']}. "
        f"Monitoring cost {facts['overhead_seconds']:.2f} s of CPU "
        f"({facts['overhead_percent']:.2f} % of the run)."
    )
    header = ("step", "verdict", "cores busy", "waiting", "reads busy", "GPU", "RSS peak")
    return Section(
        "Bottlenecks", note=note, tables=[Table(header, rows), Table(("step", "why"), reasons)]
    )


def model_section(data: ReportData) -> Section:
    embedding: dict[str, Any] = data.report.get("embedding", {})
    rows = [(key, str(value)) for key, value in embedding.items()]
    losses = [float(v) for v in (data.training or {}).get("loss", [])]
    plot = None
    if losses:

        def plot(fig: FigureBase) -> None:
            ax = fig.subplots()
            ax.plot(range(1, len(losses) + 1), losses, marker="o", color=SELECTED_COLOR)
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax.set_title("training loss")

    note = (
        f"Self-supervised training ran for {len(losses)} epochs: the loss curve is below."
        if losses
        else "No training in this run: the embeddings come from the weights named here."
    )
    return Section(
        "Model",
        note=note,
        tables=[Table(("embedding", "value"), rows)],
        plot=plot,
        size=(7.0, 3.5),
    )


def distances_section(data: ReportData) -> Section:
    s = data.sampled
    all_nn, _ = nearest(s.sample[:EVAL_POINTS], s.sample, exclude_self=True)
    sel_nn, _ = nearest(s.selected[:EVAL_POINTS], s.selected, exclude_self=True)

    def plot(fig: FigureBase) -> None:
        ax = fig.subplots()
        _histograms(
            ax,
            [
                (all_nn, f"all samples (n={_finite(all_nn)} in a sample of {len(s.sample):,})"),
                (sel_nn, f"selected (n={_finite(sel_nn)} of {len(s.selected):,})"),
            ],
            [ALL_COLOR, SELECTED_COLOR],
        )
        ax.set_xlabel("cosine distance to the nearest neighbour (in the same set)")
        ax.set_ylabel("share of samples")

    note = (
        "Distance from each sample to its nearest neighbour, among all samples and among the "
        "selected ones: a selection that spreads out has larger distances. "
        f"Median: all {_median(all_nn)}, selected {_median(sel_nn)}."
    )
    return Section("Nearest-neighbour distances", note=note, plot=plot)


def _finite(values: np.ndarray) -> str:
    return f"{int(np.isfinite(values).sum()):,}"


def _median(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return f"{float(np.median(finite)):.3f}" if len(finite) else "n/a"


def _histograms(
    ax: Any, series: list[tuple[np.ndarray, str]], colors: list[str], legend: bool = True
) -> None:
    """Overlaid histograms, each as shares of its own count (sets of any size compare)."""
    finite = [values[np.isfinite(values)] for values, _ in series]
    present = [v for v in finite if len(v)]
    if not present:
        ax.text(0.5, 0.5, "not enough samples", ha="center", va="center", transform=ax.transAxes)
        return
    lo = min(float(v.min()) for v in present)
    hi = max(float(v.max()) for v in present)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
    # The first set filled, the others as outlines on top: overlaps stay readable.
    for i, (values, (_, label), color) in enumerate(zip(finite, series, colors, strict=True)):
        if len(values):
            counts, _ = np.histogram(values, bins=bins)
            shares = counts / len(values)
            if i == 0:
                ax.stairs(shares, bins, fill=True, alpha=0.5, color=color, label=label)
            else:
                ax.stairs(shares, bins, color=color, linewidth=1.6, label=label)
    if legend:
        ax.legend(fontsize=8)


def map_section(data: ReportData) -> Section:
    from sklearn.decomposition import PCA

    s = data.sampled
    stacked = np.concatenate([s.sample, s.selected, s.prior])
    parts = (len(s.sample), len(s.selected), len(s.prior))
    maps: list[tuple[str, np.ndarray]] = []
    if len(stacked) >= 3 and stacked.shape[1] >= 2:
        pca = PCA(n_components=2, random_state=data.seed).fit(stacked)
        maps.append(("PCA", pca.transform(stacked)))
        if len(stacked) <= TSNE_POINTS:
            from sklearn.manifold import TSNE

            perplexity = float(min(30, max(2, (len(stacked) - 1) // 3)))
            from threadpoolctl import threadpool_limits

            tsne = TSNE(2, perplexity=perplexity, init="pca", max_iter=500, random_state=data.seed)
            # One thread: OpenMP's spinning threads make it 7x slower on a busy machine.
            with threadpool_limits(1):
                maps.append(("t-SNE", tsne.fit_transform(stacked)))
    tsne_note = (
        "t-SNE too"
        if len(maps) == 2
        else f"t-SNE left out: {len(stacked):,} points (limit {TSNE_POINTS:,})"
    )

    def plot(fig: FigureBase) -> None:
        axes = fig.subplots(1, max(1, len(maps)), squeeze=False)[0]
        if not maps:
            axes[0].text(0.5, 0.5, "too few samples for a map", ha="center", va="center")
            return
        ends = np.cumsum(parts)
        for ax, (name, xy) in zip(axes, maps, strict=True):
            groups = (
                (xy[: ends[0]], ALL_COLOR, f"samples ({parts[0]:,} drawn)", 6, "o"),
                (xy[ends[1] : ends[2]], PRIOR_COLOR, f"datapool's earlier picks ({parts[2]:,})",
                 14, "s"),
                (xy[ends[0] : ends[1]], SELECTED_COLOR, f"selected now ({parts[1]:,})", 18, "^"),
            )  # fmt: skip
            for points, color, label, size, marker in groups:
                if len(points):
                    ax.scatter(points[:, 0], points[:, 1], s=size, c=color, marker=marker,
                               label=label, alpha=0.8, linewidths=0, rasterized=True)  # fmt: skip
            ax.set_title(name)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0].legend(fontsize=8, loc="best")

    earlier = (
        f"blue: {len(s.prior):,} of the datapool's earlier picks"
        if len(s.prior)
        else "no earlier picks in the datapool (or none passed to the report)"
    )
    note = (
        f"The embeddings in two dimensions: PCA of {len(stacked):,} points ({tsne_note}). "
        f"Grey: samples of this run; orange: selected now; {earlier}."
    )
    return Section("Embedding map", note=note, plot=plot, size=(11.0, 5.0))


def metadata_section(data: ReportData) -> Section:
    metadata = data.metadata
    chosen = metadata["selected"].to_numpy(bool)

    def plot(fig: FigureBase) -> None:
        axes = fig.subplots(2, 3).ravel()
        for ax, column in zip(axes, METADATA_COLUMNS, strict=True):
            values = metadata[column].to_numpy(np.float64)
            if column == "sharpness":
                values = np.log10(1 + values)
            _histograms(ax, [(values, "all"), (values[chosen], "selected")],
                        [ALL_COLOR, SELECTED_COLOR], legend=column == "brightness")  # fmt: skip
            ax.set_title("log10(1 + sharpness)" if column == "sharpness" else column, fontsize=10)
            ax.tick_params(labelsize=8)

    return Section(
        "Metadata",
        note=f"Share of samples per bin, all {len(metadata):,} samples vs the {chosen.sum():,} "
        "selected: brightness, contrast and saturation in [0, 1], sharpness as the Laplacian's "
        "variance, sizes in pixels.",
        plot=plot,
        size=(11.0, 6.0),
    )


def coverage_section(data: ReportData, coverage: tuple[np.ndarray, np.ndarray]) -> Section:
    s = data.sampled
    points = s.sample[:EVAL_POINTS]
    selection, _ = coverage
    random, _ = nearest(points, s.random)
    means = [float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
             for v in (selection, random)]  # fmt: skip
    worst = [float(np.nanmax(v)) if np.isfinite(v).any() else float("nan")
             for v in (selection, random)]  # fmt: skip

    def plot(fig: FigureBase) -> None:
        left, right = fig.subplots(1, 2, width_ratios=(2, 3))
        bars = left.bar(["selection", "random subset"], means, color=[SELECTED_COLOR, RANDOM_COLOR])
        left.bar_label(bars, fmt="%.3f")
        left.set_ylabel("mean distance to nearest selected")
        left.set_title("coverage (lower is better)")
        _histograms(right, [(selection, "selection"), (random, "random subset")],
                    [SELECTED_COLOR, RANDOM_COLOR])  # fmt: skip
        right.set_xlabel("cosine distance from a sample to its nearest selected sample")
        right.set_ylabel("share of samples")

    rows = [
        ("selection", f"{len(s.selected):,}", f"{means[0]:.4f}", f"{worst[0]:.4f}"),
        ("random subset (seeded)", f"{len(s.random):,}", f"{means[1]:.4f}", f"{worst[1]:.4f}"),
    ]
    note = (
        f"How close every sample is to a selected one, for this run's selection and for a "
        f"random subset of the same size (seed {data.seed}), measured from {len(points):,} "
        f"samples drawn from {s.eligible:,}."
    )
    if s.n_selected > len(s.selected):
        note += f" Both sets are {len(s.selected):,}-sample draws of {s.n_selected:,}."
    return Section(
        "Coverage",
        note=note,
        tables=[Table(("set", "size", "mean distance", "max distance"), rows)],
        plot=plot,
    )


def _thumb(data: ReportData, name: str) -> bytes | None:
    """A small JPEG of the sample, or None when it cannot be read."""
    from PIL import Image

    try:
        raw = data.thumbnail(name)
        if raw is None:
            return None
        with Image.open(io.BytesIO(raw)) as image:
            image.draft("RGB", (THUMB_PX, THUMB_PX))
            small = image.convert("RGB")
            small.thumbnail((THUMB_PX, THUMB_PX))
            out = io.BytesIO()
            small.save(out, "JPEG", quality=80)
            return out.getvalue()
    except Exception as exc:  # a sample changed or removed since: the report goes on
        log.info("report: no thumbnail for %s (%s)", name, exc)
        return None


def _image_grid(images: list[tuple[str, bytes | None]], columns: int) -> Callable[..., None]:
    """Thumbnails as one mosaic image with captions (one axes: 64 of them would take
    seconds to lay out)."""

    def plot(fig: FigureBase) -> None:
        from PIL import Image

        ax = fig.subplots()
        ax.axis("off")
        rows = -(-len(images) // columns)
        cell, gap = THUMB_PX, 28  # pixels per tile, and below it for the caption
        mosaic = Image.new("RGB", (columns * (cell + 8), rows * (cell + gap)), "white")
        for i, (caption, jpeg) in enumerate(images):
            x, y = (i % columns) * (cell + 8), (i // columns) * (cell + gap)
            if jpeg is not None:
                with Image.open(io.BytesIO(jpeg)) as tile:
                    mosaic.paste(
                        tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2)
                    )
            else:
                ax.text(x + cell / 2, y + cell / 2, "(no image)", ha="center", fontsize=6)
            ax.text(x, y + cell + 4, caption[-30:], fontsize=4.5, va="top")
        ax.imshow(np.asarray(mosaic), interpolation="none")

    return plot


def thumbnails_section(data: ReportData) -> Section:
    rng = np.random.default_rng(data.seed)
    order = list(data.selected)
    shown = sorted(rng.permutation(len(order))[:THUMBNAILS].tolist()) if order else []
    images = [(order[i], _thumb(data, order[i])) for i in shown]
    note = (
        f"{len(images)} of the {len(order):,} selected samples"
        + (" (a seeded draw)" if len(order) > THUMBNAILS else "")
        + ", in pick order."
        if order
        else "Nothing selected in this run."
    )
    return Section(
        "Selected samples",
        note=note,
        plot=_image_grid(images, 8) if images else None,
        images=images,
    )


def duplicates_section(data: ReportData, coverage: tuple[np.ndarray, np.ndarray]) -> Section:
    metadata = data.metadata
    rng = np.random.default_rng(data.seed)
    copies = metadata[metadata["duplicate_of"].notna()]
    copies = copies.iloc[np.sort(rng.permutation(len(copies))[:PAIRS])]
    chosen = set(metadata.loc[metadata["selected"], "filename"])
    exact = [
        (removed, kept, "selected" if kept in chosen else "kept, not selected")
        for removed, kept in zip(copies["filename"], copies["duplicate_of"], strict=True)
    ]
    # Near duplicates: the unselected samples closest to a selected one, one per selected
    # sample, images before video frames (an unselected frame has no file to show).
    s = data.sampled
    distances, centers = coverage
    names = metadata["filename"].to_numpy()
    frames = metadata["video"].notna().to_numpy()
    rows_drawn = s.sample_rows[: len(distances)]
    unselected = ~metadata["selected"].to_numpy(bool)[rows_drawn] & np.isfinite(distances)
    candidates = np.flatnonzero(unselected)
    candidates = candidates[np.lexsort((distances[candidates], frames[rows_drawn[candidates]]))]
    near: list[tuple[str, str, str]] = []
    used: set[int] = set()
    for i in candidates:
        if len(near) == PAIRS:
            break
        if int(centers[i]) in used:
            continue
        used.add(int(centers[i]))
        kept = str(names[s.selected_rows[centers[i]]])
        near.append((str(names[rows_drawn[i]]), kept, f"{distances[i]:.3f}"))
    images: list[tuple[str, bytes | None]] = []
    for removed, kept, _ in exact:
        images += [
            (f"copy: {removed}", _thumb(data, removed)),
            (f"kept: {kept}", _thumb(data, kept)),
        ]
    for removed, kept, distance in near:
        images += [
            (f"not selected: {removed}", _thumb(data, removed)),
            (f"stands for it ({distance}): {kept}", _thumb(data, kept)),
        ]
    tables = [
        Table(("exact duplicate (removed)", "copy kept", "the kept copy"), exact),
        Table(("near duplicate (not selected)", "selected sample standing for it", "distance"),
              near),
    ]  # fmt: skip
    note = (
        f"{len(copies)} of {int(metadata['duplicate_of'].notna().sum()):,} exact duplicates with "
        f"the copy kept, and the {len(near)} unselected samples closest to a selected one "
        "(in the measured sample) with that selected sample. Thumbnails in pairs: removed, kept."
    )
    return Section(
        "Duplicates and near duplicates",
        note=note,
        tables=tables,
        plot=_image_grid(images, 8) if images else None,
        images=images,
    )


def videos_section(data: ReportData) -> Section:
    frames = data.metadata[data.metadata["video"].notna()]
    videos = sorted(frames["video"].unique())
    shown = videos[:VIDEOS]
    if not videos:
        return Section("Videos", note="No videos in this run.")

    def plot(fig: FigureBase) -> None:
        ax = fig.subplots()
        for row, video in enumerate(shown):
            rows = frames[frames["video"] == video]
            seconds = rows["seconds"].astype("float64")
            at = seconds.where(seconds.notna(), rows["frame_index"].astype("float64")).to_numpy()
            picked = rows["selected"].to_numpy(bool)
            ax.plot([np.nanmin(at), np.nanmax(at)], [row, row], color=ALL_COLOR, lw=6, alpha=0.5)
            ax.scatter(at[picked], np.full(picked.sum(), row), marker="|", s=200,
                       color=SELECTED_COLOR, linewidths=2)  # fmt: skip
        ax.set_yticks(range(len(shown)), [str(v)[-40:] for v in shown], fontsize=8)
        ax.set_ylim(len(shown) - 0.5, -0.5)
        ax.set_xlabel("seconds into the video (frame index where time is unknown)")
        ax.set_title("selected frames (orange) along each video (grey)")

    counts = frames.groupby("video")["selected"].agg(["size", "sum"])
    rows = [(str(v), f"{int(counts.loc[v, 'size']):,}", f"{int(counts.loc[v, 'sum']):,}")
            for v in shown]  # fmt: skip
    note = f"{len(videos)} videos" + (
        f", the first {VIDEOS} shown." if len(videos) > VIDEOS else "."
    )
    return Section(
        "Videos",
        note=note,
        tables=[Table(("video", "frames", "selected"), rows)],
        plot=plot,
        size=(10.0, 1.0 + 0.45 * len(shown)),
    )


# Rendering: the HTML and the PDF from the same sections.

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#1f2933;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #cbd2d9;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #e4e7eb;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f5f7fa}img.figure{max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:6px}.grid figure{margin:0;width:118px}
.grid img{width:112px;height:112px;object-fit:contain;background:#f5f7fa}
.grid figcaption{font-size:.65em;word-break:break-all}
.missing{width:112px;height:112px;background:#f5f7fa;display:flex;align-items:center;
justify-content:center;font-size:.7em}
nav a{margin-right:.8em}
"""


def _figure(section: Section) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=section.size, layout="constrained")
    assert section.plot is not None
    section.plot(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=HTML_DPI)
    return buffer.getvalue()


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower())


def render_html(sections: list[Section], title: str) -> bytes:
    from matplotlib import rc_context

    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<nav>" + "".join(f'<a href="#{_anchor(s.title)}">{e(s.title)}</a>' for s in sections),
        "</nav>",
    ]
    # Names are drawn as they are: matplotlib would parse `x$^$.png` as math, and fail.
    with rc_context({"font.size": 9, "text.parse_math": False}):
        for section in sections:
            parts.append(f'<section id="{_anchor(section.title)}"><h2>{e(section.title)}</h2>')
            if section.note:
                parts.append(f"<p>{e(section.note)}</p>")
            for table in section.tables:
                if not table.rows:
                    continue
                head = "".join(f"<th>{e(h)}</th>" for h in table.header)
                body = "".join(
                    "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                    for row in table.rows
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            if section.images:
                parts.append('<div class="grid">')
                for caption, jpeg in section.images:
                    picture = (
                        f'<img alt="{e(caption)}" src="data:image/jpeg;base64,'
                        f'{base64.b64encode(jpeg).decode()}">'
                        if jpeg is not None
                        else '<div class="missing">no image</div>'
                    )
                    parts.append(f"<figure>{picture}<figcaption>{e(caption)}</figcaption></figure>")
                parts.append("</div>")
            elif section.plot is not None:
                png = base64.b64encode(_png(_figure(section))).decode()
                parts.append(
                    f'<img class="figure" alt="{e(section.title)}" '
                    f'src="data:image/png;base64,{png}">'
                )
            parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts).encode()


PAGE = (11.69, 8.27)  # A4 landscape, inches
_LINE = 0.024  # of the page height, per line of text


def _text_lines(section: Section) -> list[tuple[str, bool]]:
    """The section's note and tables as monospace lines (bold for headers)."""
    import textwrap

    lines: list[tuple[str, bool]] = []
    for line in textwrap.wrap(section.note, 130):
        lines.append((line, False))
    for table in section.tables:
        if not table.rows:
            continue
        cells = [table.header, *table.rows]
        widths = [min(60, max(len(row[i]) for row in cells)) for i in range(len(table.header))]
        # The last column wraps onto more lines (a verdict's why) instead of being cut.
        widths[-1] = max(widths[-1], min(130 - sum(widths[:-1]), max(len(r[-1]) for r in cells)))

        def fit(row: tuple[str, ...], widths: list[int] = widths) -> list[str]:
            fitted = [
                c if len(c) <= w else c[: w - 3] + "..."
                for c, w in zip(row[:-1], widths, strict=False)
            ]
            indent = "  ".join(" " * w for w in widths[:-1])
            last = textwrap.wrap(row[-1], max(20, widths[-1])) or [""]
            first = "  ".join(
                [*(c.ljust(w) for c, w in zip(fitted, widths, strict=False)), last[0]]
            )
            return [first.rstrip()] + [f"{indent}  {more}" for more in last[1:]]

        lines.append(("", False))
        lines.append((fit(table.header)[0], True))
        lines.extend((line, False) for row in table.rows for line in fit(row))
    return lines


def render_pdf(sections: list[Section], title: str) -> bytes:
    """One A4 landscape page per section: its title, text, then its figure."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    buffer = io.BytesIO()
    # TrueType fonts (not Type 3) keep the text searchable and extractable.
    # Names are plain text (see render_html).
    with (
        rc_context({"pdf.fonttype": 42, "font.size": 8, "text.parse_math": False}),
        PdfPages(buffer) as pdf,
    ):
        for number, section in enumerate(sections, 1):
            page = Figure(figsize=PAGE, layout="constrained")
            page.text(0.04, 0.955, section.title, fontsize=16, weight="bold")
            page.text(0.96, 0.955, f"{title} - page {number}", fontsize=7, ha="right")
            lines = _text_lines(section)[: 30 if section.plot else 36]  # 36 fill a page
            for i, (text, bold) in enumerate(lines):
                page.text(0.04, 0.91 - i * _LINE, text, family="monospace", fontsize=7.5,
                          weight="bold" if bold else "normal", va="top")  # fmt: skip
            if section.plot is not None:
                top = 0.91 - len(lines) * _LINE - 0.02
                if top > 0.25:
                    parts = page.subfigures(2, 1, height_ratios=(1 - top, top), squeeze=False)
                    section.plot(parts[1, 0])
                else:  # the text filled the page: the figure gets one of its own
                    pdf.savefig(page)
                    page = Figure(figsize=PAGE, layout="constrained")
                    page.suptitle(section.title)
                    section.plot(page)
            pdf.savefig(page)
        info = pdf.infodict()
        info["Title"] = title
        info["Creator"] = "curate-worker"
    return buffer.getvalue()


def write_reports(output: Storage, run: str, data: ReportData) -> tuple[int, int]:
    """Write `<run>/report.html` and `<run>/report.pdf`; returns their sizes in bytes."""
    # Figures are made without pyplot: no backend, no global state, safe in threads.
    sections = build_sections(data)
    title = f"curate run {data.report.get('run_id', '')}"
    page = render_html(sections, title)
    pdf = render_pdf(sections, title)
    output.write(f"{run}/report.html", page)
    output.write(f"{run}/report.pdf", pdf)
    return len(page), len(pdf)


def read_training(output: Storage, run: str) -> dict[str, Any] | None:
    """`<run>/data/training.json` (`{"loss": [per epoch]}`), when training ran."""
    key = f"{run}/data/training.json"
    return json.loads(output.read(key)) if output.exists(key) else None


def write_run_reports(
    output: Storage,
    source: Storage | None,
    exported: Exported,
    prior: np.ndarray | None = None,
) -> None:
    """The one entry export uses: gather what the report needs from the run's artifacts
    (`exported.shards`: the checked and embedded shards, read one at a time) and write
    both files. `prior` holds the datapool's earlier picks' embeddings, when the flow has
    them. A report that cannot be drawn is logged, never fatal: the run's lists and the
    datapool matter more than its pictures."""
    from tasks.formats import read_npy

    started = time.perf_counter()
    try:
        metadata = exported.metadata
        seed = int(exported.report.get("config", {}).get("seed", 0) or 0)
        vectors = (read_npy(output, embed.embeddings) for _, embed in exported.shards)
        sampled = sample_embeddings(metadata, vectors, exported.selected, prior, seed)
        frames = set(metadata.loc[metadata["video"].notna(), "filename"])

        def thumbnail(name: str) -> bytes | None:
            if name in frames:  # only selected frames exist as files
                key = f"{exported.run}/selected/{name}"
                return output.read(key) if output.exists(key) else None
            return source.read(name) if source is not None else None

        data = ReportData(
            exported.report,
            metadata,
            exported.corrupt,
            exported.selected,
            sampled,
            thumbnail,
            read_training(output, exported.run),
            seed,
        )
        html_size, pdf_size = write_reports(output, exported.run, data)
        log.info(
            "report: report.html (%s) and report.pdf (%s) in %.1f s",
            _bytes(html_size),
            _bytes(pdf_size),
            time.perf_counter() - started,
        )
    except Exception:
        log.exception("report: report.html and report.pdf could not be written")
