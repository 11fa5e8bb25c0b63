"""The config edge: unknown keys, bad values and overrides all fail with the dotted key."""

from pathlib import Path

import pytest

from tasks.config import CurateConfig, load_config, parse_config
from tasks.errors import CurateError

BASE = ["input=./photos", "output=./out"]


def load(*overrides: str) -> CurateConfig:
    return load_config(None, [*BASE, *overrides])


def test_unknown_key_is_named_and_closest_known_key_suggested() -> None:
    with pytest.raises(CurateError) as info:
        load("stoping_condition.n_samples=5")
    message = str(info.value)
    assert "'stoping_condition.n_samples'" in message
    assert "did you mean 'stopping_condition.n_samples'" in message


def test_unknown_nested_key_is_named_with_its_section_and_a_suggestion() -> None:
    with pytest.raises(CurateError) as info:
        load("stopping_condition.n_samples=5", "embedding.modle=resnet18")
    message = str(info.value)
    assert "'embedding.modle'" in message
    assert "did you mean 'embedding.model'" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("stopping_condition.n_samples=-1", "stopping_condition.n_samples"),
        ("embedding.device=tpu", "embedding.device"),
        ("shard_size=0", "shard_size"),
        ("selection.strategy=best", "selection.strategy"),
    ],
)
def test_bad_value_error_names_the_dotted_key(override: str, key: str) -> None:
    budget = [] if override.startswith("stopping") else ["stopping_condition.n_samples=5"]
    with pytest.raises(CurateError, match=rf"config: {key}:"):
        load(*budget, override)


def test_override_values_are_typed_as_yaml() -> None:
    config = load(
        "stopping_condition.proportion_samples=0.25",
        "shard_size=300",
        "enable_corruptness_check=false",
        "embedding.pretrained=yes",
        "embedding.input_size=null",
        "embedding.checkpoint=",
    )
    assert config.stopping_condition.proportion_samples == 0.25
    assert config.shard_size == 300
    assert config.enable_corruptness_check is False
    assert config.embedding.pretrained is True
    assert config.embedding.input_size is None
    assert config.embedding.checkpoint is None


def test_yaml_file_is_read_and_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "curate.yaml"
    path.write_text(
        "input: ./a\noutput: ./b\nshard_size: 10\n"
        "stopping_condition:\n  n_samples: 7\nembedding:\n  model: resnet34\n"
    )
    config = load_config(path, ["shard_size=20", "embedding.batch_size=8"])
    assert (config.input, config.output) == ("./a", "./b")
    assert config.shard_size == 20
    assert config.stopping_condition.n_samples == 7
    assert (config.embedding.model, config.embedding.batch_size) == ("resnet34", 8)


def test_missing_input_error_names_input() -> None:
    with pytest.raises(CurateError, match=r"config: input: required"):
        load_config(None, ["output=./out", "stopping_condition.n_samples=5"])


def test_both_n_samples_and_proportion_samples_is_an_error() -> None:
    with pytest.raises(CurateError, match=r"stopping_condition.*not both"):
        load("stopping_condition.n_samples=5", "stopping_condition.proportion_samples=0.5")


def test_no_stopping_condition_at_all_is_an_error() -> None:
    with pytest.raises(CurateError, match=r"stopping_condition: set n_samples"):
        load()


def test_min_distance_alone_is_a_stopping_condition() -> None:
    assert load("stopping_condition.min_distance=0.3").stopping_condition.min_distance == 0.3


def test_yaml_file_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- input\n- output\n")
    with pytest.raises(CurateError, match=r"expected a mapping"):
        load_config(path, [])


def test_missing_yaml_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CurateError, match=r"config file"):
        load_config(tmp_path / "absent.yaml", BASE)


def test_argument_without_equals_is_an_error() -> None:
    with pytest.raises(CurateError, match=r"argument 'shard_size': expected KEY=VALUE"):
        load("stopping_condition.n_samples=5", "shard_size")


def test_parse_config_accepts_a_nested_dict() -> None:
    config = parse_config(
        {"input": "i", "output": "o", "stopping_condition": {"n_samples": 3}, "seed": 4}
    )
    assert (config.stopping_condition.n_samples, config.seed) == (3, 4)
