"""The config edge: unknown keys, bad values and overrides all fail with the dotted key."""

import re
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


def test_a_dotted_key_in_yaml_says_to_nest_it_and_suggests_no_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("input: x\noutput: y\nstopping_condition.n_samples: 3\n")
    with pytest.raises(CurateError) as info:
        load_config(path, [])
    assert "write it nested (stopping_condition: {n_samples: ...})" in str(info.value)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("input: x\noutput: [y\n", "line 3", "flow sequence from line 2, column 9"),
        ("input: x\n  output: y\n", "line 2", "mapping values are not allowed"),
        ('input: "x\n', "line 2", "quoted scalar from line 1"),
        ("input: !!python/object:os.system ls\n", "line 1", "constructor"),
    ],
)
def test_a_yaml_syntax_error_names_the_file_and_line_in_one_line(
    tmp_path: Path, text: str, line: str, words: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(CurateError) as info:
        load_config(path, [])
    message = str(info.value)
    assert message.startswith(f"config file {path}, {line}, column ")
    assert words in message
    assert "<unicode string>" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "not a text file"),
        (b"input: x\x00\n", "special characters are not allowed"),
        (b"- input\n- output\n", "expected a mapping of keys (key: value lines), found a list"),
        (b"just a sentence\n", "found a string"),
    ],
)
def test_a_config_file_that_is_no_yaml_mapping_is_named(
    tmp_path: Path, content: bytes, words: str
) -> None:
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    with pytest.raises(CurateError) as info:
        load_config(path, BASE)
    assert str(info.value).startswith(f"config file {path}: ")
    assert words in str(info.value)


def test_a_directory_device_or_missing_file_as_config_is_named(tmp_path: Path) -> None:
    for path, words in (
        (tmp_path, "Is a directory"),
        (Path("/dev/zero"), "larger than 1 MiB"),
        (tmp_path / "absent.yaml", "No such file"),
    ):
        with pytest.raises(CurateError, match=rf"^config file {path}: {words}"):
            load_config(path, BASE)


def test_an_empty_config_file_asks_for_input() -> None:
    with pytest.raises(CurateError, match=r"^config: input: required, e.g. input=./photos$"):
        load_config("/dev/null", [])


def test_a_yaml_alias_that_contains_itself_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    for text in ("foo: &a {x: *a}\n", "input: &a [*a]\noutput: y\n"):
        path.write_text(text)
        with pytest.raises(CurateError, match=r"^config: "):
            load_config(path, [])


def test_no_budget_says_config_once() -> None:
    with pytest.raises(CurateError) as info:
        load()
    assert str(info.value).count("config:") == 1


def test_min_distance_beyond_the_cosine_range_is_refused() -> None:
    with pytest.raises(
        CurateError, match=r"stopping_condition.min_distance: .*less than or equal to 2"
    ):
        load("stopping_condition.min_distance=5")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stopping_condition=3", "stopping_condition: is a section, not a value"),
        ("embedding=resnet18", "embedding: is a section, not a value"),
        ("input=", "input: needs a value"),
        ("embedding.model=", "embedding.model: needs a value"),
        ("embedding.batch_size=-4", "embedding.batch_size: Input should be greater than 0"),
        ("num_workers=-5", "num_workers: Input should be greater than or equal to -1"),
        ("seed=1.5", "seed: Input should be a valid integer"),
        ("shard_size=[1", "shard_size: Input should be a valid integer"),
        ("enable_training=maybe", "enable_training: Input should be a valid boolean"),
        ("colour.mode=red", "unknown key 'colour.mode'"),
    ],
)
def test_hostile_values_name_their_key(override: str, message: str) -> None:
    with pytest.raises(CurateError) as info:
        load("stopping_condition.n_samples=5", override)
    assert str(info.value).startswith(f"config: {message}")


@pytest.mark.parametrize(
    "override",
    [
        "input=s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/prefix",
        "output=az://container/runs?sv=2024-01-01&sig=c2VjcmV0c2lnbmF0dXJl",
        "input=s3://bucket/p?X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE",
        "datasource.relevant_filenames_file=DefaultEndpointsProtocol=https;AccountName=a;"
        "AccountKey=c2VjcmV0a2V5",
    ],
)
def test_credentials_written_into_a_value_are_refused_without_repeating_them(override: str) -> None:
    key, _, value = override.partition("=")
    with pytest.raises(CurateError) as info:
        load("stopping_condition.n_samples=5", override)
    message = str(info.value)
    assert message.startswith(f"config: {key}: holds credentials; credentials come from")
    assert "storage.credentials_secret" in message
    for part in ("wJalrXUtnFEMI", "c2VjcmV0c2lnbmF0dXJl", "FwoGZXIvYXdzEXAMPLE", "c2VjcmV0a2V5"):
        assert part not in message


def test_credentials_secret_is_a_block_name_not_a_pasted_secret() -> None:
    assert load("stopping_condition.n_samples=5", "storage.credentials_secret=aws-prod-1")
    with pytest.raises(CurateError) as info:
        load("stopping_condition.n_samples=5", "storage.credentials_secret=wJalr/XUtn+FEMI=")
    assert "storage.credentials_secret: expected the name of a Prefect Secret block" in str(
        info.value
    )
    assert "XUtn" not in str(info.value)


def test_a_url_with_an_at_sign_in_its_path_is_no_credential() -> None:
    config = load("stopping_condition.n_samples=5", "input=s3://bucket/team@site/photos")
    assert config.input == "s3://bucket/team@site/photos"


def test_timm_model_names_are_read_without_importing_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from tasks.weights import timm_model_names as n; "
        "assert 'resnet18' in n() and len(n()) > 1000; "
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_model_is_a_config_error_naming_the_key() -> None:
    from tasks.errors import ConfigError
    from tasks.weights import check_model_name

    with pytest.raises(ConfigError, match=r"^embedding.model: unknown timm model 'resnet9000'"):
        check_model_name("resnet9000")
    with pytest.raises(ConfigError, match=r"^pretagging.model: unknown timm model"):
        check_model_name("vit_smal", "pretagging.model")
    check_model_name("resnet50.a1_in1k")  # a pretrained tag is fine


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[1]", "selection.strategies[0]: expected a mapping {input: ..., strategy: ...}"),
        ("[{input: 1, strategy: {type: DIVERSITY}}]", "selection.strategies[0].input: expected"),
    ],
)
def test_a_value_where_a_strategy_mapping_goes_is_named(value: str, message: str) -> None:
    with pytest.raises(CurateError, match=rf"^config: {re.escape(message)}"):
        load("stopping_condition.n_samples=5", f"selection.strategies={value}")


def test_a_name_that_yaml_reads_as_a_number_stays_text() -> None:
    config = load_config(
        None,
        [
            "input=2024",
            "output=~",
            "stopping_condition.n_samples=3",
            "seed=0x10",
            "storage.credentials_secret=-",
            "embedding.checkpoint=null",
            "pretagging.class_names=[cat, dog]",
        ],
    )
    assert (config.input, config.output, config.seed) == ("2024", "~", 16)
    assert config.storage.credentials_secret == "-"
    assert config.embedding.checkpoint is None
    assert config.pretagging.class_names == ["cat", "dog"]
