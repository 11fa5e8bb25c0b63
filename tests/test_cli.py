"""`curate` as a user runs it: a subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CURATE = str(Path(sys.executable).parent / "curate")


def curate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # ephemeral
    return subprocess.run(
        [CURATE, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def test_unknown_key_fails_with_a_did_you_mean(tmp_path):
    result = curate("run", "input=x", f"output={tmp_path}", "stoping_condition.n_samples=3")
    assert_one_line_error(result, 2, "stoping_condition.n_samples", "stopping_condition.n_samples")


def test_bad_value_names_the_key(tmp_path):
    result = curate("run", "input=x", f"output={tmp_path}", "stopping_condition.n_samples=zero")
    assert_one_line_error(result, 2, "stopping_condition.n_samples")


def test_missing_input_folder_names_the_url(tmp_path):
    result = curate(
        "run",
        f"input={tmp_path / 'nowhere'}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=3",
    )
    assert_one_line_error(result, 1, "nowhere")


def test_input_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/notes.txt").write_text("hello")
    result = curate(
        "run",
        f"input={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}",
        "stopping_condition.n_samples=3",
    )
    assert_one_line_error(result, 1, "no images")


def test_an_error_inside_the_flow_is_one_line_too(tmp_path, demo_folder):
    folder, _ = demo_folder
    (tmp_path / "relevant.txt").write_text("no/such/dir/*\n")
    result = curate(
        "run",
        f"input={folder}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=3",
        f"datasource.relevant_filenames_file={tmp_path / 'relevant.txt'}",
    )
    assert_one_line_error(result, 1, "no images or videos found")


def test_missing_checkpoint_names_the_key(tmp_path, demo_folder):
    folder, _ = demo_folder
    result = curate(
        "run",
        f"input={folder}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=3",
        "embedding.checkpoint=/no/such.safetensors",
    )
    assert_one_line_error(result, 1, "embedding.checkpoint")


@pytest.mark.slow
def test_run_from_a_config_file_with_overrides_ends_with_the_run_line(tmp_path, demo_folder):
    folder, expected = demo_folder
    config = tmp_path / "curate.yaml"
    config.write_text(
        f"input: {folder}\noutput: {tmp_path / 'out'}\nstopping_condition:\n  n_samples: 100\n"
    )
    result = curate("run", str(config), "stopping_condition.n_samples=7")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run: ")
    run_dir = Path(last.removeprefix("run: "))
    assert len((run_dir / "filenames/selected_filenames.txt").read_text().split()) == 7
    assert len((run_dir / "filenames/corrupt_filenames.txt").read_text().split()) == len(expected)


@pytest.mark.slow
def test_sanity_check_reports_versions_embedding_and_prefect():
    result = curate("sanity-check")
    assert result.returncode == 0, result.stderr
    for word in (
        "torch:",
        "timm:",
        "embedding: resnet18 on cpu, dim 512",
        "boto3:",
        "gcsfs:",
        "adlfs:",
        "prefect: flow run ok",
    ):
        assert word in result.stdout


def test_help_lists_every_config_key_with_its_default_and_description():
    from tasks.config import key_help

    result = curate("run", "--help")
    assert result.returncode == 0
    for key, default, description in key_help():
        assert f"  {key} [{default}]" in result.stdout
        assert description.split()[0] in result.stdout
    assert curate("--version").stdout.startswith("curate ")


@pytest.mark.slow
def test_the_example_config_runs(tmp_path, demo_folder):
    folder, _ = demo_folder
    example = Path(__file__).resolve().parents[1] / "docs/curate.yaml"
    result = curate("run", str(example), f"input={folder}", f"output={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("run: "))
    assert len((run_dir / "filenames/selected_filenames.txt").read_text().split()) == 40


def test_bad_input_is_reported_in_under_two_seconds_naming_the_key(tmp_path):
    """CPU seconds: on a busy shared machine the wall clock measures the neighbours."""
    before = _children_cpu()
    result = curate(
        "run",
        f"input={tmp_path / 'nowhere'}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=3",
    )
    assert_one_line_error(result, 1, "input", "nowhere")
    assert _children_cpu() - before < 2.0


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_a_dotted_key_in_a_yaml_file_says_to_nest_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("input: x\noutput: y\nstopping_condition.n_samples: 3\n")
    result = curate("run", str(config))
    assert_one_line_error(result, 2, "write it nested", "stopping_condition: {n_samples: ...}")


def test_a_failed_run_leaves_no_pickled_error_in_prefects_home(tmp_path, demo_folder):
    folder, _ = demo_folder
    (tmp_path / "relevant.txt").write_text("no/such/dir/*\n")
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(home)
    }
    result = subprocess.run(
        [
            CURATE,
            "run",
            f"input={folder}",
            f"output={tmp_path / 'out'}",
            "stopping_condition.n_samples=3",
            f"datasource.relevant_filenames_file={tmp_path / 'relevant.txt'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert_one_line_error(result, 1, "no images or videos found")
    stored = list((home / "storage").rglob("*")) if (home / "storage").exists() else []
    assert stored == []


def test_an_unknown_model_is_a_config_error_at_once_before_prefect_or_torch(tmp_path, demo_folder):
    """Timed in CPU seconds (the wall clock of a busy shared machine says little), and
    by what it imported: neither torch, timm nor Prefect."""
    folder, _ = demo_folder
    args = [
        "run",
        f"input={folder}",
        f"output={tmp_path}",
        "stopping_condition.n_samples=3",
        "embedding.model=resnet9000",
    ]
    before = _children_cpu()
    result = curate(*args)
    assert_one_line_error(result, 2, "embedding.model", "resnet9000", "similar: resnet")
    assert _children_cpu() - before < 1.5
    assert not (tmp_path / "runs").exists()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    traced = subprocess.run(
        [sys.executable, "-X", "importtime", CURATE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines()}
    assert "resnet9000" in traced.stderr
    assert not imported & {"torch", "timm", "prefect"}


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"input: x\noutput: [y\n", ("line 3, column 1", "flow sequence from line 2")),
        (bytes(range(256)), ("not a text file",)),
        (b"", ("input: required",)),
        (b"- a\n- b\n", ("expected a mapping", "found a list")),
    ],
)
def test_a_hostile_config_file_is_one_line_naming_the_file_exit_2(tmp_path, content, words):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    result = curate("run", str(config))
    assert_one_line_error(result, 2, *words)
    assert "<unicode string>" not in result.stderr


def test_a_directory_as_config_is_one_line_exit_2(tmp_path):
    assert_one_line_error(curate("run", str(tmp_path)), 2, str(tmp_path), "Is a directory")
