"""Property-based tests (hypothesis) of the pure edges: the config parser and its
KEY=VALUE overrides, embeddings.csv, the relevant-filenames patterns, frame naming.

Each property is checked on a bounded number of generated examples (the whole file runs
in well under a minute on two busy cores); a failure prints the smallest example found.
"""

from __future__ import annotations

import contextlib
import fnmatch
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tasks.config import CurateConfig, load_config, parse_config, set_dotted
from tasks.discover import is_relevant, parse_patterns, pattern_for
from tasks.errors import ConfigError
from tasks.formats import embedding_csv, read_embedding_csv
from tasks.naming import VIDEO_EXTENSIONS, frame_name, is_video, parse_frame_name

pytestmark = pytest.mark.reliability  # make test-reliability

# Two budgets: an override may unset either.
BASE = [
    "input=./photos",
    "output=./out",
    "stopping_condition.n_samples=5",
    "stopping_condition.min_distance=0.5",
]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------
# The config: every scalar leaf key, with a strategy for its valid values derived from
# the model itself (type, bounds, choices), so a new key is covered without an edit here.


def _leaves(model: type[BaseModel] = CurateConfig, prefix: str = "") -> dict[str, Any]:
    leaves = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves |= _leaves(annotation, f"{prefix}{name}.")
        else:
            leaves[prefix + name] = field
    return leaves


LEAVES = _leaves()
# Rules between keys, not of one key: tested in test_config.py.
EXCLUDED = {"input", "output", "embedding.checkpoint", "embedding.pretrained"}


def _bounds(field: Any) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for item in field.metadata:
        for name in ("gt", "ge", "lt", "le"):
            if isinstance(item, getattr(annotated_types, name.capitalize())):
                bounds[name] = getattr(item, name)
    return bounds


def _scalar_strategy(annotation: Any, field: Any) -> st.SearchStrategy[Any] | None:
    """Valid values of a scalar type, or None for lists and other shapes."""
    bounds = _bounds(field)
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else -(2**40))
        high = bounds.get("le", bounds["lt"] - 1 if "lt" in bounds else 2**40)
        return st.integers(low, high)
    if annotation is float:
        return st.floats(
            min_value=bounds.get("ge", bounds.get("gt", -1e9)),
            max_value=bounds.get("le", bounds.get("lt", 1e9)),
            exclude_min="gt" in bounds,
            exclude_max="lt" in bounds,
            allow_nan=False,
        )
    if annotation is str:
        # No "@" or "=": text that could read as inline credentials is refused (tested
        # in test_config.py), as is a template's "{{".
        return st.text(
            st.characters(
                codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters="@="
            ),
            min_size=1,
            max_size=20,
        ).filter(lambda s: s.strip() == s and "{{" not in s)
    return None


def _valid_values(field: Any) -> st.SearchStrategy[Any] | None:
    annotation = field.annotation
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    if options and type(None) in options:
        inner = [_scalar_strategy(o, field) for o in options if o is not type(None)]
        if len(inner) != 1 or inner[0] is None:
            return None
        return st.none() | inner[0]
    return _scalar_strategy(annotation, field)


SCALARS = {
    key: strategy
    for key, field in LEAVES.items()
    if key not in EXCLUDED and (strategy := _valid_values(field)) is not None
}
# A rule its type does not state: a Prefect block name.
SCALARS["storage.credentials_secret"] = st.none() | st.from_regex(
    r"[a-z0-9-]{1,20}", fullmatch=True
)


def _get(config: CurateConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _as_argument(value: Any) -> str:
    """How a user types a value on the command line (YAML flow scalars)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _room_for(key: str) -> list[str]:
    """Overrides that make room for `key`: proportion_samples excludes n_samples."""
    return ["stopping_condition.n_samples=null"] if key.endswith("proportion_samples") else []


@st.composite
def known_override(draw: st.DrawFn) -> tuple[str, Any]:
    key = draw(st.sampled_from(sorted(SCALARS)))
    return key, draw(SCALARS[key])


def test_every_scalar_key_is_covered() -> None:
    assert {"shard_size", "stopping_condition.n_samples", "embedding.device"} <= set(SCALARS)
    assert len(SCALARS) > 40


@FAST
@given(known_override())
def test_any_valid_override_of_a_known_key_round_trips(override: tuple[str, Any]) -> None:
    key, value = override
    config = load_config(None, [*BASE, *_room_for(key), f"{key}={_as_argument(value)}"])
    assert _get(config, key) == value


@FAST
@given(
    st.sampled_from(sorted(k for k in LEAVES if k not in EXCLUDED)),
    st.one_of(
        st.lists(st.integers(), min_size=1, max_size=3),
        st.dictionaries(st.sampled_from("abc"), st.integers(), min_size=1, max_size=2),
    ),
)
def test_a_value_of_the_wrong_shape_is_a_config_error_naming_its_key(key: str, value: Any) -> None:
    """As a YAML file or a deployment's parameters give it (on the command line a key that
    takes text takes `[0]` as text)."""
    if key in ("selection.strategies", "pretagging.class_names"):
        assume(not isinstance(value, list))  # lists are their shape
    data = {"input": "i", "output": "o", "stopping_condition": {"n_samples": 5}}
    set_dotted(data, key, value)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(f"config: {key}"), str(info.value)


@FAST
@given(st.sampled_from(sorted(SCALARS)), st.data())
def test_the_last_override_of_a_key_wins(key: str, data: st.DataObject) -> None:
    first, last = data.draw(SCALARS[key]), data.draw(SCALARS[key])
    arguments = [f"{key}={_as_argument(first)}", f"{key}={_as_argument(last)}"]
    config = load_config(None, [*BASE, *_room_for(key), *arguments])
    assert _get(config, key) == last


_KNOWN_NAMES = sorted({part for key in LEAVES for part in key.split(".")})
_JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(_KNOWN_NAMES) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@FAST
@given(st.dictionaries(st.sampled_from(_KNOWN_NAMES) | st.text(max_size=8), _JSON_LIKE))
def test_parsing_any_mapping_raises_nothing_but_a_config_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(data)


@FAST
@given(st.lists(st.text(max_size=30), max_size=5))
def test_any_command_line_raises_nothing_but_a_config_error(arguments: list[str]) -> None:
    with contextlib.suppress(ConfigError):
        load_config(None, arguments)


@settings(FAST, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_config_file_raises_nothing_but_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "curate.yaml"
    path.write_bytes(content)
    with contextlib.suppress(ConfigError):
        load_config(path, BASE)


# --------------------------------------------------------------------------------------
# embeddings.csv: Lightly's `filenames,embedding_0,...,labels`, written and read back.

_NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=24)


@FAST
@given(
    st.lists(_NAMES, min_size=1, max_size=8, unique=True),
    st.integers(1, 6),
    st.data(),
)
def test_embeddings_csv_round_trips_any_names_and_float32_values_exactly(
    names: list[str], dim: int, data: st.DataObject
) -> None:
    vectors = np.array(
        data.draw(
            st.lists(
                st.lists(
                    st.floats(width=32, allow_nan=False, allow_infinity=False),
                    min_size=dim,
                    max_size=dim,
                ),
                min_size=len(names),
                max_size=len(names),
            )
        ),
        dtype=np.float32,
    )
    text = embedding_csv(names, vectors)
    read_names, read_vectors = read_embedding_csv(text.encode())
    assert read_names == names
    assert read_vectors.dtype == np.float32
    np.testing.assert_array_equal(read_vectors, vectors)


# --------------------------------------------------------------------------------------
# Relevant filenames: gitignore-style lines, the last matching pattern decides.

_KEY_PART = st.text(
    st.characters(
        codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp", "Zs"), exclude_characters="/"
    ),
    min_size=1,
    max_size=10,
)
_KEYS = st.lists(_KEY_PART, min_size=1, max_size=3).map("/".join)


@FAST
@given(st.lists(_KEYS, min_size=1, max_size=8, unique=True), st.data())
def test_a_list_of_escaped_names_selects_exactly_those_names(
    keys: list[str], data: st.DataObject
) -> None:
    chosen = data.draw(st.lists(st.sampled_from(keys), min_size=1, unique=True))
    lines = "\n".join(pattern_for(key) for key in chosen)
    patterns = parse_patterns(lines)
    assert [key for key in keys if is_relevant(key, patterns)] == [
        key for key in keys if key in chosen
    ]


@FAST
@given(
    st.lists(st.tuples(st.booleans(), st.sampled_from(["*", "a/*", "*.jpg", "a/b.jpg", "?/*"]))),
    _KEYS,
)
def test_the_last_matching_pattern_decides(patterns: list[tuple[bool, str]], key: str) -> None:
    matching = [include for include, pattern in patterns if fnmatch.fnmatchcase(key, pattern)]
    expected = matching[-1] if matching else not any(include for include, _ in patterns)
    text = "\n".join(("" if include else "!") + pattern for include, pattern in patterns)
    assert is_relevant(key, parse_patterns(text)) == expected


@FAST
@given(st.text(max_size=200), st.text(max_size=40))
def test_any_pattern_file_parses_and_matches_without_error(text: str, key: str) -> None:
    is_relevant(key, parse_patterns(text))


# --------------------------------------------------------------------------------------
# Frame names: `video/street.mp4`, 40 -> `video/street-000040-mp4.png`.

_EXTENSIONS = st.sampled_from(sorted(VIDEO_EXTENSIONS)).flatmap(
    lambda e: st.sampled_from([e, e.upper(), e.capitalize()])
)
_VIDEO_KEYS = st.tuples(
    st.lists(_KEY_PART, max_size=3), _KEY_PART.filter(lambda s: not s.startswith(".")), _EXTENSIONS
).map(lambda t: "/".join([*t[0], f"{t[1]}.{t[2]}"]))


@FAST
@given(_VIDEO_KEYS, st.integers(0, 10**8))
def test_a_frame_name_parses_back_to_its_video_and_index(key: str, index: int) -> None:
    assert is_video(key)
    name = frame_name(key, index)
    assert parse_frame_name(name) == (key, index)
    assert name == frame_name(key, index)  # stable


@FAST
@given(_VIDEO_KEYS, st.integers(0, 10**8))
def test_a_frame_name_adds_no_path_separator(key: str, index: int) -> None:
    name = frame_name(key, index)
    suffix = name.removeprefix(key.rsplit(".", 1)[0])  # what naming adds: -000040-mp4.png
    assert name.rpartition("/")[0] == key.rpartition("/")[0]  # the video's own folder
    assert "/" not in suffix and "\\" not in suffix


@FAST
@given(
    st.lists(st.tuples(_VIDEO_KEYS, st.integers(0, 10**6)), min_size=2, max_size=10, unique=True)
)
def test_different_frames_have_different_names(frames: list[tuple[str, int]]) -> None:
    names = [frame_name(key, index) for key, index in frames]
    assert len(set(names)) == len(names)


def test_the_documented_example() -> None:
    assert frame_name("video/street.mp4", 40) == "video/street-000040-mp4.png"
