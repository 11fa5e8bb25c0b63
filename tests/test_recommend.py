"""`curate recommend`: the seed's machines for the seed's examples, a location listed and
sampled, bad arguments as one-line errors, and a duration estimate that a real run here
meets within a factor of two."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.cli import main
from tasks.recommend import (
    Machine,
    Plan,
    Workload,
    estimate,
    load_throughputs,
    machine_for,
    recommend,
)


def _recommend(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["recommend", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_100k_images_get_4_vcpu_16_gb_and_one_t4(capsys):
    result = _recommend(capsys, "images=100000")
    assert result["dataset"]["frames"] == 100_000
    machine = result["machine"]
    assert (machine["vcpus"], machine["ram_gb"], machine["gpus"]) == (4, 16, 1)
    assert "T4" in machine["gpu"] and machine["vram_gb"] == 8  # 2 GB per vCPU
    assert result["settings"]["num_workers"] == -1  # all vCPUs
    for name in ("recommended", "cpu_only", "here"):
        assert result["estimates"][name]["seconds"] > 0
    text_reasons = " ".join(result["reasons"])
    assert "hardware guide" in text_reasons and "num_workers=-1" in text_reasons


def test_100_videos_of_600_s_at_30_fps_are_1_8_mio_frames_on_16_vcpu_and_64_gb(capsys):
    result = _recommend(capsys, "videos=100", "video_seconds=600", "fps=30")
    assert result["dataset"]["frames"] == 1_800_000
    machine = result["machine"]
    assert (machine["vcpus"], machine["ram_gb"], machine["vram_gb"]) == (16, 64, 32)
    # The middle of the table, and its edges.
    assert (machine_for(1_000_000).vcpus, machine_for(1_000_000).ram_gb) == (8, 32)
    assert machine_for(100_001).vcpus == 8 and machine_for(1_000_001).vcpus == 16


def test_the_text_output_gives_the_machine_settings_reasons_and_duration(capsys):
    assert main(["recommend", "images=20000", "enable_training=true"]) == 0
    text = capsys.readouterr().out
    assert "machine: 4 vCPU, 16 GB RAM, one NVIDIA T4" in text
    assert "settings: num_workers=-1" in text and "why:" in text
    assert "estimated duration:" in text and "this machine" in text and "train" in text


def test_planned_steps_add_their_time():
    table = load_throughputs()
    workload, here = Workload(images=50_000), Machine(vcpus=8, ram_gb=32)
    plain = estimate(workload, Plan(), here, table)
    trained = estimate(workload, Plan(training=True, training_epochs=10), here, table)
    tagged = estimate(workload, Plan(pretagging=True), here, table)
    bigger = estimate(workload, Plan(input_size=128), here, table)
    assert trained.steps["train"] > 0 and trained.seconds > plain.seconds
    assert tagged.steps["pretag"] == pytest.approx(plain.steps["embed"], rel=0.01)
    assert bigger.steps["embed"] > 2 * plain.steps["embed"]  # 4x the pixels
    more_cores = estimate(workload, Plan(), Machine(vcpus=16, ram_gb=64), table)
    assert more_cores.steps["check"] == pytest.approx(plain.steps["check"] / 2, rel=0.01)


def test_on_a_gpu_check_and_embed_overlap_and_the_batch_fits_the_vram():
    table = load_throughputs()
    table["embed"]["cuda"] = {
        "resnet18@224": {"images_per_second": 3000.0, "bytes_per_image": 20_000_000}
    }
    workload = Workload(images=100_000)
    result = recommend(workload, Plan(), table, Machine(vcpus=2, ram_gb=8))
    gpu = result.estimates["recommended"]
    assert gpu.device == "cuda" and gpu.input_size == 224
    serial = sum(gpu.steps.values())
    assert gpu.seconds == pytest.approx(serial - min(gpu.steps["check"], gpu.steps["embed"]), 0.01)
    batch = result.settings["embedding.batch_size"]
    assert batch * 20e6 <= 0.5 * 8e9 < 2 * batch * 20e6  # the largest that fits half of 8 GB
    assert result.settings["orchestration (pools)"]["curate-cpu workers per curate-gpu worker"] >= 1


def test_bad_arguments_are_one_line_errors_naming_the_key(capsys):
    assert main(["recommend", "images=lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "images" in err and "Traceback" not in err
    assert main(["recommend", "videos=3"]) == 2
    assert "video_seconds" in capsys.readouterr().err
    assert main(["recommend", "images=10", "embeding.model=resnet50"]) == 2
    assert "did you mean 'embedding.model'" in capsys.readouterr().err
    assert main(["recommend"]) == 2
    assert "input=LOCATION" in capsys.readouterr().err


def test_a_location_is_listed_and_sampled(tmp_path, capsys):
    from flows.demo import encode, make_demo_videos, photo_crops

    for i, image in enumerate(photo_crops(10, seed=5, size=200)):
        (tmp_path / f"img_{i}.jpg").write_bytes(encode(image, "JPEG"))
    make_demo_videos(tmp_path / "videos", frames=48)  # 2 clips at 12 fps, 96 x 96, + a cut one
    (tmp_path / "notes.txt").write_text("not an image")
    result = _recommend(capsys, f"input={tmp_path}")
    dataset = result["dataset"]
    assert dataset["images"] == 10
    assert dataset["image_megapixels"] == pytest.approx(0.04, rel=0.01)  # 200 x 200
    assert dataset["videos"] == 3
    assert dataset["fps"] == pytest.approx(12, rel=0.05)
    assert dataset["video_megapixels"] == pytest.approx(96 * 96 / 1e6, rel=0.01)
    assert 3 <= dataset["video_seconds"] <= 4.5  # 48 frames at 12 fps, by bytes
    assert f"listed {tmp_path}" in dataset["source"]


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    from flows.demo import encode, photo_crops

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(photo_crops(300, seed=6, size=160)):
        (folder / f"img_{i:04d}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    return folder


def test_the_estimate_for_a_run_here_is_within_2x_of_the_run(
    run_curate, small_folder, tmp_path, capsys
):
    """Recommend for a small folder, then run it here with the recommended settings."""
    result = _recommend(capsys, f"input={small_folder}", "stopping_condition.n_samples=20")
    here = result["estimates"]["here"]
    settings = result["settings"]
    args = [
        f"input={small_folder}",
        "stopping_condition.n_samples=20",
        f"num_workers={settings['num_workers']}",
        f"embedding.input_size={here['input_size']}",
        f"embedding.batch_size={settings['embedding.batch_size']}",
    ]
    run_curate(*args, f"output={tmp_path / 'warm-up'}")  # imports and model builds, once
    started = time.perf_counter()
    run_curate(*args, f"output={tmp_path / 'out'}")
    measured = time.perf_counter() - started
    print(f"estimated {here['seconds']:.1f} s here, the run took {measured:.1f} s")  # -s shows
    assert 0.5 <= measured / here["seconds"] <= 2, (measured, here)
