"""Describe: image statistics in [0, 1], sharpness, and the two duplicate hashes."""

import hashlib

import numpy as np
import pandera.errors
import pytest
from PIL import Image, ImageFilter

from flows.demo import encode
from tasks.describe import describe, metadata_frame
from tasks.inputs import Decoded, decode_image


def _row(image: Image.Image, fmt: str = "PNG", **options: object) -> dict[str, object]:
    data = encode(image, fmt, **options)
    decoded = decode_image(data, max_pixels=10**9)
    assert isinstance(decoded, Decoded)
    return describe("img.png", data, decoded)


def _checkerboard(size: int = 32, cell: int = 4) -> Image.Image:
    y, x = np.indices((size, size)) // cell
    return Image.fromarray(((x + y) % 2 * 255).astype(np.uint8)).convert("RGB")


def test_white_image_is_bright_flat_unsaturated_and_not_sharp() -> None:
    row = _row(Image.new("RGB", (16, 16), "white"))
    assert row["brightness"] == pytest.approx(1.0)
    assert row["contrast"] == pytest.approx(0.0)
    assert row["saturation"] == pytest.approx(0.0)
    assert row["sharpness"] == pytest.approx(0.0)


def test_black_image_has_zero_brightness() -> None:
    assert _row(Image.new("RGB", (16, 16), "black"))["brightness"] == pytest.approx(0.0)


def test_pure_red_image_is_fully_saturated() -> None:
    assert _row(Image.new("RGB", (16, 16), (255, 0, 0)))["saturation"] == pytest.approx(1.0)


def test_checkerboard_is_sharper_and_more_contrasted_than_its_blurred_version() -> None:
    board = _checkerboard()
    sharp, blurred = _row(board), _row(board.filter(ImageFilter.GaussianBlur(2)))
    assert float(sharp["sharpness"]) > 10 * float(blurred["sharpness"]) > 0
    assert sharp["contrast"] == pytest.approx(0.5, abs=0.01)
    assert float(sharp["contrast"]) > float(blurred["contrast"])


def test_row_carries_size_format_mode_and_file_size() -> None:
    image = Image.new("L", (20, 10), 128)
    row, data = _row(image), encode(image, "PNG")
    assert (row["width"], row["height"], row["format"], row["mode"]) == (20, 10, "PNG", "L")
    assert row["file_size"] == len(data)


def test_content_hash_is_the_sha256_of_the_bytes() -> None:
    image = _checkerboard()
    assert _row(image)["content_hash"] == hashlib.sha256(encode(image, "PNG")).hexdigest()


def test_same_pixels_other_compression_share_pixel_hash_not_content_hash() -> None:
    image = _checkerboard()
    fast, small = _row(image, compress_level=1), _row(image, compress_level=9)
    assert fast["pixel_hash"] == small["pixel_hash"]
    assert fast["content_hash"] != small["content_hash"]


def test_pixel_hash_tells_apart_same_bytes_in_another_shape() -> None:
    wide = _row(Image.new("RGB", (8, 2), "white"))
    tall = _row(Image.new("RGB", (2, 8), "white"))
    assert wide["pixel_hash"] != tall["pixel_hash"]


def test_metadata_frame_validates_rows() -> None:
    rows = [_row(_checkerboard()), {**_row(Image.new("RGB", (4, 4))), "filename": "b.png"}]
    frame = metadata_frame(rows)
    assert list(frame["filename"]) == ["img.png", "b.png"]
    assert str(frame["width"].dtype) == "int64"


def test_metadata_frame_of_no_rows_is_empty_and_typed() -> None:
    frame = metadata_frame([])
    assert frame.empty
    assert "content_hash" in frame.columns
    assert str(frame["width"].dtype) == "int64"
    assert str(frame["brightness"].dtype) == "float64"


def test_row_with_zero_width_fails_the_schema() -> None:
    row = {**_row(Image.new("RGB", (4, 4))), "width": 0}
    with pytest.raises(pandera.errors.SchemaError):
        metadata_frame([row])


def test_duplicate_filenames_fail_the_schema() -> None:
    row = _row(Image.new("RGB", (4, 4)))
    with pytest.raises(pandera.errors.SchemaError):
        metadata_frame([row, row])
