"""A time-bounded fuzz pass over the image check (`tasks.check.inspect_image`): random
bytes and mutations of valid PNG, JPEG, GIF, WebP, BMP and TIFF files. The check must
never raise, must give a short reason or a schema-valid row and model input, and must stay
within a time and a memory bound for every input."""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flows.demo import encode
from tasks.check import inspect_image
from tasks.describe import metadata_frame
from tasks.inputs import DECODE_BYTES_PER_PIXEL

pytestmark = pytest.mark.reliability  # make test-reliability

# Small enough that a mutated header cannot make one input expensive, large enough that
# every seed decodes.
MAX_PIXELS = 1 << 20
INPUT_SIZE = 16
SECONDS_PER_INPUT = 2.0
# What the whole pass may add to the process's peak: one input's decode at the limit.
MEMORY_BOUND = MAX_PIXELS * DECODE_BYTES_PER_PIXEL + (64 << 20)

# About 30 s on 2 busy vCPUs (a mutation costs 40 ms there, most of it Pillow and pandera).
FUZZ = settings(
    max_examples=300,
    deadline=None,  # our own bound below, measured the same way every time
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow],
)


def _picture(width: int = 24, height: int = 16) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _animated(fmt: str, **options: object) -> bytes:
    frames = [_picture().rotate(90 * i) for i in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **options)


SEEDS = {
    "png": encode(_picture(), "PNG"),
    "png-rgba": encode(_picture().convert("RGBA"), "PNG"),
    "png-palette": encode(_picture().convert("P"), "PNG"),
    "jpeg": encode(_picture(), "JPEG"),
    "jpeg-progressive": encode(_picture(), "JPEG", progressive=True),
    "gif": encode(_picture(), "GIF"),
    "gif-animated": _animated("GIF", duration=50),
    "webp": encode(_picture(), "WEBP"),
    "webp-lossless": encode(_picture(), "WEBP", lossless=True),
    "webp-animated": _animated("WEBP"),
    "bmp": encode(_picture(), "BMP"),
    "tiff": encode(_picture(), "TIFF"),
}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file with one to four mutations: bytes flipped or overwritten, ranges
    deleted, inserted or repeated, the end cut off."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "overwrite", "delete", "insert", "repeat", "cut"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(patch)] = patch
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 256))]
        else:
            del data[at:]
    return bytes(data)


def _check_is_sound(data: bytes, full_check: bool) -> None:
    started = time.perf_counter()
    outcome = inspect_image("fuzz.png", data, MAX_PIXELS, full_check, INPUT_SIZE)
    assert time.perf_counter() - started < SECONDS_PER_INPUT
    if isinstance(outcome, str):
        assert 0 < len(outcome) <= 200 and "\n" not in outcome, outcome
        return
    row, pixels = outcome
    assert pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3) and pixels.dtype == np.uint8
    metadata_frame([row])  # the schema: sizes > 0, measures in range, hashes


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@FUZZ
@given(data=st.binary(max_size=2048), full_check=st.booleans())
def _fuzz_random_bytes(data: bytes, full_check: bool) -> None:
    _check_is_sound(data, full_check)


@settings(FUZZ, max_examples=600)
@given(data=mutated(), full_check=st.booleans())
def _fuzz_mutated_images(data: bytes, full_check: bool) -> None:
    _check_is_sound(data, full_check)


@FUZZ
@given(
    signature=st.sampled_from(
        [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"BM"]
    ),
    rest=st.binary(max_size=512),
    full_check=st.booleans(),
)
def _fuzz_signatures_with_garbage(signature: bytes, rest: bytes, full_check: bool) -> None:
    _check_is_sound(signature + rest, full_check)


def test_every_seed_decodes() -> None:
    for name, data in SEEDS.items():
        outcome = inspect_image(name, data, MAX_PIXELS, True, INPUT_SIZE)
        assert not isinstance(outcome, str), (name, outcome)


def test_random_bytes_never_break_the_check() -> None:
    before = _peak_bytes()
    _fuzz_random_bytes()
    assert _peak_bytes() - before < MEMORY_BOUND


def test_mutated_images_never_break_the_check() -> None:
    before = _peak_bytes()
    _fuzz_mutated_images()
    assert _peak_bytes() - before < MEMORY_BOUND


def test_signatures_followed_by_garbage_never_break_the_check() -> None:
    before = _peak_bytes()
    _fuzz_signatures_with_garbage()
    assert _peak_bytes() - before < MEMORY_BOUND
