"""report.html and report.pdf of a real run, the size bound at a million samples, and the
terminal progress display on a pseudo-terminal and on a pipe."""

from __future__ import annotations

import io
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flows.demo import make_demo_videos
from tasks import report as report_module
from tasks.progress import CI_VARIABLES
from tasks.report import (
    PAIRS,
    THUMBNAILS,
    ReportData,
    build_sections,
    model_section,
    nearest,
    read_training,
    render_html,
    render_pdf,
    sample_embeddings,
    write_reports,
    write_run_reports,
)
from tasks.storage import open_storage

SECTIONS = [
    "Run",
    "Corrupt samples",
    "Steps",
    "Bottlenecks",
    "Model",
    "Nearest-neighbour distances",
    "Embedding map",
    "Metadata",
    "Coverage",
    "Selected samples",
    "Duplicates and near duplicates",
    "Videos",
]
ROOT = Path(__file__).resolve().parents[1]


class DemoRun:
    """A finished run of the demo images and videos, with what export handed the report."""

    def __init__(self, path: Path, output: Path, calls: list[tuple[Any, ...]]) -> None:
        self.path = path
        self.output = output
        self.calls = calls


@pytest.fixture(scope="module")
def demo_run(
    prefect_server: None, demo_folder: tuple[Path, dict[str, str]], tmp_path_factory
) -> DemoRun:
    from flows.curate import curate
    from tasks.config import load_config

    folder = tmp_path_factory.mktemp("report-input")
    shutil.copytree(demo_folder[0], folder, dirs_exist_ok=True)
    make_demo_videos(folder / "videos", frames=24)
    output = tmp_path_factory.mktemp("report-output")
    calls: list[tuple[Any, ...]] = []

    def recording(*args: Any) -> None:
        calls.append(args)
        started = time.perf_counter()
        write_run_reports(*args)
        print(
            f"\nreport.html and report.pdf of the demo run in {time.perf_counter() - started:.1f} s"
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "write_run_reports", recording)
        run_dir = curate(
            **load_config(
                None, [f"input={folder}", f"output={output}", "stopping_condition.n_samples=40"]
            ).sections()
        )
    return DemoRun(Path(run_dir), output, calls)


def test_a_run_writes_an_html_and_a_pdf_report_with_every_section(demo_run: DemoRun) -> None:
    page = (demo_run.path / "report.html").read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page, title
    assert "curate run " + demo_run.path.name in page
    # Counts, reasons and the coverage figure are all there, from this run.
    assert "truncated JPEG" in page and "decompression bomb: 400 Mpx" in page
    assert "random subset" in page and "t-SNE" in page
    selected_part = page.split("<h2>Selected samples</h2>")[1].split("</section>")[0]
    assert selected_part.count("data:image/jpeg;base64,") == 40  # every pick, frames too
    assert "no image" not in selected_part
    assert "videos/street.mp4" in page  # the timeline
    size = (demo_run.path / "report.html").stat().st_size + (
        demo_run.path / "report.pdf"
    ).stat().st_size
    print(f"\ndemo report: report.html + report.pdf = {size / 1e6:.2f} MB in {demo_run.path}")
    assert size < 5_000_000


def test_the_html_report_is_self_contained(demo_run: DemoRun) -> None:
    page = (demo_run.path / "report.html").read_text()
    assert "<script" not in page.lower()
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert references
    assert all(ref.startswith(("data:", "#")) for ref in references), [
        r[:40] for r in references if not r.startswith(("data:", "#"))
    ]
    assert not re.search(r"url\(|@import|https?://", page)


def test_the_pdf_report_has_one_page_per_section_with_its_title(demo_run: DemoRun) -> None:
    from pypdf import PdfReader

    reader = PdfReader(demo_run.path / "report.pdf")
    assert len(reader.pages) == len(SECTIONS)
    for page, title in zip(reader.pages, SECTIONS, strict=True):
        text = page.extract_text()
        assert title in text, (title, text[:200])
    assert "truncated JPEG" in reader.pages[SECTIONS.index("Corrupt samples")].extract_text()
    assert reader.metadata is not None and demo_run.path.name in str(reader.metadata.title)


def test_the_report_draws_the_training_loss_when_training_ran(tmp_path) -> None:
    from pypdf import PdfReader

    output = open_storage(str(tmp_path))
    assert read_training(output, "runs/r") is None
    output.write_text("runs/r/data/training.json", '{"loss": [4.1, 3.2, 2.9, 2.7]}')
    training = read_training(output, "runs/r")
    report = {"embedding": {"model": "resnet18", "weights": "trained here"}}
    data = ReportData(report, _frame(10), {}, [], _sampled(_frame(10)), lambda _: None, training)
    model = model_section(data)
    assert "training ran for 4 epochs" in model.note and model.plot is not None
    assert "data:image/png" in render_html([model], "t").decode()
    text = PdfReader(io.BytesIO(render_pdf([model], "t"))).pages[0].extract_text()
    assert "training loss" in text and "epoch" in text


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed here when missing (as root, from the package mirror)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "chromium is not installed and cannot be installed here"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
            if done.returncode:
                reason = f"`{' '.join(command)}` failed: {done.stderr.strip()[-300:]}"
                break
        found = shutil.which("chromium")
        if found:
            return found
    print(f"\nSKIP chromium tests: {reason}")
    pytest.skip(reason)


def _chromium(
    binary: str, url: str, profile: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=1",
            "--virtual-time-budget=10000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page itself asked the network for (the browser's own background requests
    are keyed to no page; the page's to its file:// origin)."""
    import json

    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start
        and "file://" in event.get("params", {}).get("network_isolation_key", "")
    ]


def _console(stderr: str) -> list[str]:
    """The page's console messages (errors, failed loads) in chromium's log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_the_html_report_opens_in_chromium_without_console_errors_or_requests(
    demo_run: DemoRun, chromium: str, tmp_path_factory
) -> None:
    artifacts = tmp_path_factory.mktemp("report-screenshot")
    screenshot = artifacts / "report.png"
    url = (demo_run.path / "report.html").as_uri()
    netlog = artifacts / "netlog.json"
    shot = _chromium(
        chromium,
        url,
        artifacts / "profile",
        f"--screenshot={screenshot}",
        "--window-size=1200,3000",
        f"--log-net-log={netlog}",
    )
    assert screenshot.exists() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    print(f"\nscreenshot of the demo report: {screenshot}")
    assert _console(shot.stderr) == []
    assert _page_requests(netlog) == []
    dom = _chromium(chromium, url, artifacts / "profile-dom", "--dump-dom")
    assert "<h2>Coverage</h2>" in dom.stdout
    assert _console(dom.stderr) == []
    loaded = re.findall(r"""(?:src|href)="([^"]*)""", dom.stdout)
    assert loaded and all(ref.startswith(("data:", "#")) for ref in loaded)
    # The check can fail: a page that requests something shows up in the same log.
    bad = artifacts / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><img src="http://127.0.0.1:9/x.png"><script>console.error("x")</script>'
    )
    bad_log = artifacts / "bad-netlog.json"
    failed = _chromium(
        chromium, bad.as_uri(), artifacts / "profile-bad", f"--log-net-log={bad_log}"
    )
    assert _console(failed.stderr), failed.stderr[-2000:]
    assert _page_requests(bad_log) == ["http://127.0.0.1:9/x.png"]


def test_a_million_samples_make_a_report_under_20_mb_from_bounded_reads(tmp_path) -> None:
    n, dim, picks = 1_000_000, 32, 2_000
    rng = np.random.default_rng(1)
    names = [f"cam{i % 7}/{i:07d}.jpg" for i in range(n)]
    videos = 20 * 500  # 20 videos of 500 frames come first
    metadata = pd.DataFrame(
        {
            "filename": names,
            "width": rng.integers(64, 4000, n),
            "height": rng.integers(64, 3000, n),
            "brightness": rng.random(n),
            "contrast": rng.random(n) / 2,
            "saturation": rng.random(n),
            "sharpness": rng.gamma(2.0, 200.0, n),
            "video": [f"v/{i // 500:02d}.mp4" for i in range(videos)] + [None] * (n - videos),
            "frame_index": pd.array(
                [*(i % 500 for i in range(videos))] + [None] * (n - videos), dtype="Int64"
            ),  # fmt: skip
            "seconds": np.r_[np.arange(videos) % 500 / 25.0, np.full(n - videos, np.nan)],
            "duplicate_of": [None] * (n - 5000) + names[:5000],
        }
    )
    selected = [names[i] for i in rng.choice(n - 5000, picks, replace=False)]
    metadata["selected"] = metadata["filename"].isin(set(selected))

    def shards() -> Iterator[np.ndarray]:
        for start in range(0, n, 50_000):
            yield np.random.default_rng(start).standard_normal((50_000, dim)).astype(np.float32)

    reads: list[str] = []

    def thumbnail(name: str) -> bytes:
        reads.append(name)
        image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG")
        return buffer.getvalue()

    started = time.perf_counter()
    sampled = sample_embeddings(metadata, shards(), selected, np.ones((50_000, dim)), seed=0)
    assert len(sampled.sample) <= report_module.MAP_POINTS
    assert len(sampled.prior) <= report_module.PRIOR_POINTS
    report = {"run_id": "million", "counts": {"discovered": n, "selected": picks}}
    data = ReportData(report, metadata, {"x.jpg": "zero bytes"}, selected, sampled, thumbnail)
    html_size, pdf_size = write_reports(open_storage(str(tmp_path)), "runs/million", data)
    print(
        f"\n1M samples: report.html {html_size / 1e6:.1f} MB, report.pdf {pdf_size / 1e6:.1f} MB "
        f"in {time.perf_counter() - started:.0f} s, {len(reads)} thumbnails read"
    )
    assert html_size < 20_000_000 and pdf_size < 20_000_000
    assert len(reads) <= THUMBNAILS + 4 * PAIRS
    page = (tmp_path / "runs/million/report.html").read_text()
    assert "t-SNE left out" in page and "1,000,000" in page


def test_coverage_of_a_spread_selection_beats_a_clumped_one() -> None:
    points = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    spread, index = nearest(points, points[[0, 2]])
    clumped, _ = nearest(points, points[[0, 1]])
    assert spread.mean() < clumped.mean()
    assert index.tolist() == [0, 0, 1, 1]
    own, neighbour = nearest(points, points, exclude_self=True)
    assert neighbour.tolist() == [1, 0, 3, 2] and (own > 0).all()


def _frame(n: int, picks: int = 0) -> pd.DataFrame:
    """A run's metadata, as the report reads it: n images, the first `picks` selected."""
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "filename": [f"{i}.png" for i in range(n)],
            "duplicate_of": None,
            "selected": [i < picks for i in range(n)],
            "video": None,
            **{c: rng.random(n) for c in report_module.METADATA_COLUMNS},
        }
    )


def _sampled(metadata: pd.DataFrame) -> report_module.Sampled:
    vectors = np.random.default_rng(0).standard_normal((len(metadata), 8)).astype(np.float32)
    picked = metadata.loc[metadata["selected"], "filename"].tolist()
    return sample_embeddings(metadata, [vectors], picked)


def test_the_datapool_s_earlier_picks_are_sampled_and_drawn_apart_on_the_map() -> None:
    rng = np.random.default_rng(0)
    metadata = _frame(300, picks=20)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    sampled = sample_embeddings(
        metadata, [vectors[:100], vectors[100:]], [f"{i}.png" for i in range(20)], vectors[:7]
    )
    assert len(sampled.selected) == len(sampled.random) == 20 and len(sampled.prior) == 7
    assert sampled.selected_rows.tolist() == list(range(20))
    norms = np.linalg.norm(vectors[sampled.sample_rows], axis=1, keepdims=True)
    np.testing.assert_allclose(sampled.sample, vectors[sampled.sample_rows] / norms, rtol=1e-5)
    data = ReportData({}, metadata, {}, [f"{i}.png" for i in range(20)], sampled, lambda _: None)
    sections = {s.title: s for s in build_sections(data)}
    assert [*sections] == SECTIONS
    assert "blue: 7 of the datapool's earlier picks" in sections["Embedding map"].note
    assert sections["Videos"].note == "No videos in this run."


def test_write_report_reads_the_datapool_prior_the_flow_names(tmp_path) -> None:
    from tasks.export import Exported, write_report
    from tasks.formats import npy_bytes
    from tasks.shards import CheckedShard, EmbeddedShard

    output = open_storage(str(tmp_path))
    vectors = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    output.write("e.npy", npy_bytes(vectors))
    output.write("prior.npy", npy_bytes(vectors[:5] + 1))
    checked = CheckedShard(0, "m.parquet", "c.json", (), True, 30, 0, 0, 0.0)
    shards = ((checked, EmbeddedShard(0, "e.npy", 30, 0, 0.0)),)
    exported = Exported("runs/r", _frame(30, picks=3), {}, {"run_id": "r"}, ("0.png",), shards)
    write_report(output, exported, prior_key="prior.npy")
    assert output.exists("runs/r/report.json") and output.exists("runs/r/report.pdf")
    assert "blue: 5 of the datapool" in output.read_text("runs/r/report.html")


def test_a_run_that_processed_nothing_still_gets_every_section() -> None:
    from pypdf import PdfReader

    from tasks.describe import metadata_frame

    metadata = metadata_frame([])
    metadata["duplicate_of"] = metadata["filename"].map({})
    metadata["selected"] = False
    sampled = sample_embeddings(metadata, [], [])
    data = ReportData({"run_id": "nothing-new"}, metadata, {}, [], sampled, lambda _: None)
    sections = build_sections(data)
    page = render_html(sections, "t").decode()
    assert all(f"<h2>{title}</h2>" in page for title in SECTIONS)
    assert "Nothing selected in this run." in page and "No corrupt objects" in page
    assert len(PdfReader(io.BytesIO(render_pdf(sections, "t"))).pages) == len(SECTIONS)


def test_a_report_that_cannot_be_drawn_is_logged_and_does_not_fail_the_run(tmp_path, caplog):
    from tasks.export import Exported
    from tasks.shards import CheckedShard, EmbeddedShard

    checked = CheckedShard(0, "m.parquet", "c.json", (), True, 1, 0, 0, 0.0)
    embedded = EmbeddedShard(0, "gone/embeddings.npy", 1, 0, 0.0)
    exported = Exported(
        "runs/r", _frame(1, picks=1), {}, {"run_id": "r"}, ("0.png",), ((checked, embedded),)
    )
    output = open_storage(str(tmp_path))
    with caplog.at_level("ERROR", logger="tasks.report"):
        write_run_reports(output, None, exported)
    assert "could not be written" in caplog.text and "gone/embeddings.npy" in caplog.text
    assert not output.exists("runs/r/report.html")


PROGRESS_SCRIPT = """
import time
from tasks.progress import TerminalProgress
progress = TerminalProgress.start(None)
progress.add_step("check", total_shards=3)
progress.add_step("embed", total_shards=3, total_samples=300)
for _ in range(3):
    progress.add_step("check", total_samples=300)
    progress.advance("check", shards=1, samples=100)
    time.sleep(0.3)
    progress.advance("embed", shards=1, samples=100)
progress.close()
print("run: done")
"""


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CI_VARIABLES}
    env |= {"PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "160"}
    return env


def test_progress_bars_draw_on_a_terminal() -> None:
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRESS_SCRIPT],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=_environment(),
        cwd=ROOT,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(leader)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "\x1b[" in text  # drawn, with cursor movement and colour
    assert "check" in text and "embed" in text
    assert "3/3 shards" in text and "300/300 samples" in text
    assert "samples/s" in text and "ETA" in text
    assert text.rstrip().endswith("run: done")


def test_progress_prints_nothing_on_a_pipe() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRESS_SCRIPT],
        capture_output=True,
        env=_environment(),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"run: done\n"
    assert done.stderr == b""


def test_progress_is_off_in_ci_even_on_a_terminal(monkeypatch) -> None:
    from tasks.progress import TerminalProgress, wanted

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("CI", "true")
    assert not wanted(Terminal())
    progress = TerminalProgress.start(None, stream=Terminal())
    assert not progress.enabled
    progress.add_step("check", 1, 1)
    progress.advance("check", samples=1)
    progress.close()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("TERM", "xterm")
    assert wanted(Terminal())
