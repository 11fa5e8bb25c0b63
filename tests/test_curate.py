"""The curate flow end to end on local folders, under a real Prefect server."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from tasks.export import RUN_METADATA_SCHEMA


def test_every_planted_corrupt_file_is_flagged_with_its_reason_and_no_valid_one(
    demo_folder, run_curate, tmp_path
):
    folder, expected = demo_folder
    run = run_curate(f"input={folder}", f"output={tmp_path}", "stopping_condition.n_samples=30")
    assert len(expected) >= 8
    assert set(run.corrupt) == set(expected)
    for name, reason in expected.items():
        assert run.corrupt[name].startswith(reason), (name, run.corrupt[name])
    assert run.names("corrupt") == sorted(expected)
    metadata = pd.read_parquet(run.path / "data/metadata.parquet")
    assert not set(metadata.filename) & set(expected)
    valid = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt"]
    assert len(metadata) == len(valid) - len(expected)
    assert not set(run.names("selected")) & set(expected)


def test_exact_duplicates_are_listed_and_never_selected_together(demo_folder, run_curate, tmp_path):
    folder, _ = demo_folder
    run = run_curate(
        f"input={folder}", f"output={tmp_path}", "stopping_condition.proportion_samples=1"
    )
    # The first name of each group is kept: copies/ sorts before photos/ and scenes/.
    assert run.names("duplicate") == ["photos/crop_000.jpg", "scenes/scene_000.png"]
    selected = run.names("selected")
    assert "copies/crop_000_copy.jpg" in selected
    digests = [hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in selected]
    assert len(set(digests)) == len(digests)
    assert not set(selected) & set(run.names("duplicate"))


def test_run_directory_follows_the_output_contract(demo_folder, run_curate, tmp_path):
    folder, expected = demo_folder
    run = run_curate(f"input={folder}", f"output={tmp_path}", "stopping_condition.n_samples=25")
    assert (tmp_path / "LATEST").read_text().strip() == run.path.name
    report = run.report
    counts = report["counts"]
    assert counts["selected"] == 25 == len(run.names("selected"))
    assert counts["corrupt"] == len(expected)
    assert counts["duplicates"] == 2
    assert counts["discovered"] == counts["processed"] == counts["valid"] + counts["corrupt"]
    for step in ("discover", "check", "dedup", "embed", "select", "export"):
        assert {"seconds", "bytes_read"} <= set(report["steps"][step])
    # One read per object: the check's read feeds metadata, hashes and the model input.
    assert report["bytes_read"]["total"] == report["bytes_read"]["dataset"]
    assert report["config"]["stopping_condition"]["n_samples"] == 25
    assert {"prefect", "torch", "timm"} <= set(report["versions"])
    assert "random initialisation" in report["embedding"]["weights"]
    RUN_METADATA_SCHEMA.validate(pd.read_parquet(run.path / "data/metadata.parquet"))
    embeddings = pd.read_csv(run.path / "data/embeddings.csv")
    assert list(embeddings.columns[:2]) == ["filenames", "embedding_0"]
    assert embeddings.columns[-1] == "labels"
    assert len(embeddings) == counts["valid"] - counts["duplicates"]
    vectors = embeddings.filter(like="embedding_").to_numpy()
    assert abs((vectors**2).sum(axis=1) - 1).max() < 1e-4


def test_a_process_all_rerun_hits_the_cache_for_every_step_and_reads_nothing(
    digits_folder, run_curate, tmp_path
):
    """process_all ignores the datapool (which would skip every object), not the cache:
    processing unchanged objects again gives what the cache holds. (How much faster that
    is: bench/bench_incremental.py.)"""
    args = (
        f"input={digits_folder}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=50",
        "shard_size=500",
        "embedding.input_size=96",
    )
    first = run_curate(*args)
    second = run_curate(*args, "datasource.process_all=true")
    steps = second.report["steps"]
    for step in ("check", "dedup", "embed", "select"):
        assert steps[step]["shards"] > 0
        assert steps[step]["cached_shards"] == steps[step]["shards"], step
    assert second.report["bytes_read"]["total"] == 0
    assert second.names("selected") == first.names("selected")


def test_changing_the_model_recomputes_embeddings_but_not_the_check(
    demo_folder, run_curate, tmp_path
):
    folder, _ = demo_folder
    base = (f"input={folder}", f"output={tmp_path}", "stopping_condition.n_samples=10")
    first = run_curate(*base)
    second = run_curate(*base, "embedding.model=resnet10t", "datasource.process_all=true")
    steps = second.report["steps"]
    assert steps["check"]["cached_shards"] == steps["check"]["shards"]
    assert steps["embed"]["cached_shards"] == 0
    # The model inputs were dropped after the first embedding: the images are read again.
    assert steps["embed"]["bytes_read"] > 0
    assert len(second.names("selected")) == 10
    assert second.names("corrupt") == first.names("corrupt")


def test_sharding_does_not_change_the_result(demo_folder, run_curate, tmp_path):
    folder, _ = demo_folder
    args = (f"input={folder}", "stopping_condition.n_samples=20")
    whole = run_curate(*args, f"output={tmp_path / 'one'}")
    sharded = run_curate(*args, f"output={tmp_path / 'many'}", "shard_size=16")
    assert sharded.report["steps"]["check"]["shards"] > 3
    assert sharded.names("selected") == whole.names("selected")
    assert sharded.corrupt == whole.corrupt
    assert sharded.names("duplicate") == whole.names("duplicate")


def test_relevant_filenames_file_restricts_the_input(demo_folder, run_curate, tmp_path):
    folder, _ = demo_folder
    patterns = tmp_path / "relevant.txt"
    patterns.write_text("# only scenes, but one\nscenes/*\n!scenes/scene_001.png\n")
    run = run_curate(
        f"input={folder}",
        f"output={tmp_path / 'out'}",
        f"datasource.relevant_filenames_file={patterns}",
        "stopping_condition.proportion_samples=1",
    )
    selected = run.names("selected")
    assert run.report["counts"]["discovered"] == 59
    assert all(name.startswith("scenes/") for name in selected)
    assert "scenes/scene_001.png" not in selected


def test_min_distance_alone_stops_the_selection(demo_folder, run_curate, tmp_path):
    folder, _ = demo_folder
    loose = run_curate(
        f"input={folder}", f"output={tmp_path / 'a'}", "stopping_condition.min_distance=0.05"
    )
    tight = run_curate(
        f"input={folder}", f"output={tmp_path / 'b'}", "stopping_condition.min_distance=0.3"
    )
    assert 0 < len(tight.names("selected")) < len(loose.names("selected"))


def test_corruptness_check_off_still_flags_unreadable_files(demo_folder, run_curate, tmp_path):
    folder, expected = demo_folder
    run = run_curate(
        f"input={folder}",
        f"output={tmp_path}",
        "enable_corruptness_check=false",
        "stopping_condition.n_samples=5",
    )
    unreadable = {n for n, r in expected.items() if r.startswith(("not an image", "zero bytes"))}
    assert unreadable <= set(run.corrupt)
    assert json.loads((run.path / "report.json").read_text())["counts"]["selected"] == 5


def test_enable_training_embeds_with_the_trained_checkpoint_and_a_rerun_takes_it_from_the_cache(
    digits_folder, run_curate, tmp_path
):
    args = (
        f"input={digits_folder}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=20",
        "datasource.relevant_filenames_file=" + str(_first_digits(tmp_path, 300)),
        "enable_training=true",
        "training.max_epochs=1",
        "training.batch_size=32",
    )
    run = run_curate(*args)
    report = run.report
    assert report["steps"]["train"]["shards"] == 1
    assert report["embedding"]["weights"].startswith("checkpoint (sha256")
    assert list((run.path / "checkpoints").glob("*.safetensors"))
    training = json.loads((run.path / "data/training.json").read_text())
    assert len(training["loss"]) == 1
    assert len(run.names("selected")) == 20
    again = run_curate(*args, "datasource.process_all=true")
    assert again.report["steps"]["train"]["cached_shards"] == 1
    assert again.names("selected") == run.names("selected")


def _first_digits(folder, n: int):
    path = folder.parent / f"{folder.name}-relevant.txt"
    path.write_text("".join(f"{i:04d}_label*.png\n" for i in range(n)))
    return path
