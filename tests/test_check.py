"""Check: planted corrupt files get their reason; valid images of every kind decode to RGB."""

import struct
import zlib

import numpy as np
import pytest
from hostile_files import image_cases
from PIL import Image

from flows.demo import corrupt_files, encode, photo_crops
from tasks.check import inspect_image
from tasks.inputs import Decoded, decode_image, model_input, png_chunk_problem

LIMIT = 178_956_970


def _photo(size: int = 64) -> Image.Image:
    return photo_crops(1, seed=3, size=size)[0]


def _decoded(data: bytes, full_check: bool = True, draft_size: int | None = None) -> Decoded:
    result = decode_image(data, LIMIT, full_check=full_check, draft_size=draft_size)
    assert isinstance(result, Decoded), result
    return result


@pytest.mark.parametrize(("name", "case"), sorted(corrupt_files().items()))
def test_planted_corrupt_file_gets_its_expected_reason(name: str, case: tuple[bytes, str]) -> None:
    data, expected = case
    reason = decode_image(data, max_pixels=LIMIT)
    assert isinstance(reason, str), f"{name} was not flagged"
    assert reason.startswith(expected)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), color) for color in ("red", "green", "blue")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def _i16_png() -> bytes:
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def _rgba_png() -> bytes:
    image = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 20, 30))
    return encode(image, "PNG")


VALID = {
    "jpeg": lambda: encode(_photo().resize((40, 30)), "JPEG"),
    "png": lambda: encode(_photo().resize((40, 30)), "PNG"),
    "progressive jpeg": lambda: encode(_photo().resize((40, 30)), "JPEG", progressive=True),
    "animated gif": _animated_gif,
    "bmp": lambda: encode(_photo().resize((40, 30)), "BMP"),
    "tiff": lambda: encode(_photo().resize((40, 30)), "TIFF"),
    "webp": lambda: encode(_photo().resize((40, 30)), "WEBP"),
    "16-bit grayscale png": _i16_png,
    "rgba png": _rgba_png,
    "palette png": lambda: encode(_photo().resize((40, 30)).convert("P"), "PNG"),
    "1-bit png": lambda: encode(_photo().resize((40, 30)).convert("1"), "PNG"),
    "cmyk jpeg": lambda: encode(_photo().resize((40, 30)).convert("CMYK"), "JPEG"),
    "grayscale jpeg": lambda: encode(_photo().resize((40, 30)).convert("L"), "JPEG"),
}


@pytest.mark.parametrize("kind", VALID)
def test_valid_image_is_not_flagged_and_decodes_to_rgb_of_its_size(kind: str) -> None:
    decoded = _decoded(VALID[kind]())
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (decoded.width, decoded.height) == (40, 30)


def test_one_pixel_image_is_valid() -> None:
    decoded = _decoded(encode(Image.new("RGB", (1, 1), "red"), "PNG"))
    assert (decoded.width, decoded.height) == (1, 1)
    assert decoded.image.getpixel((0, 0)) == (255, 0, 0)


def test_animated_gif_reports_its_frames() -> None:
    decoded = _decoded(_animated_gif())
    assert (decoded.format, decoded.n_frames) == ("GIF", 3)
    assert decoded.image.getpixel((0, 0)) == (255, 0, 0)  # the first frame


def test_header_facts_are_kept_and_transparency_goes_on_white() -> None:
    decoded = _decoded(_rgba_png())
    assert (decoded.format, decoded.mode) == ("PNG", "RGBA")
    assert decoded.image.getpixel((0, 0)) == (0, 0, 255)
    assert decoded.image.getpixel((39, 0)) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_to_8_bits() -> None:
    decoded = _decoded(_i16_png())
    assert decoded.mode.startswith("I;16")
    pixels = np.asarray(decoded.image)
    assert pixels.min() == 0 and pixels.max() == 255


def test_fast_path_draft_decodes_a_jpeg_smaller_but_reports_its_full_size() -> None:
    data = encode(_photo(256), "JPEG")
    decoded = _decoded(data, full_check=False, draft_size=32)
    assert (decoded.width, decoded.height) == (256, 256)
    assert decoded.image.mode == "RGB"
    assert decoded.image.width < 256 and decoded.image.width >= 32


def test_full_check_decodes_a_jpeg_at_full_size() -> None:
    decoded = _decoded(encode(_photo(256), "JPEG"), full_check=True, draft_size=32)
    assert decoded.image.size == (256, 256)


def test_pixel_limit_is_the_configured_one() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, max_pixels=9_999) == "decompression bomb: 0 Mpx"
    assert isinstance(decode_image(data, max_pixels=10_000), Decoded)


def test_png_chunk_problem_accepts_a_sound_png() -> None:
    assert png_chunk_problem(encode(_photo(), "PNG")) is None


def test_png_chunk_problem_detects_a_bad_crc() -> None:
    png = bytearray(encode(_photo(), "PNG"))
    ihdr_crc = 8 + 8 + struct.unpack(">I", png[8:12])[0]
    png[ihdr_crc] ^= 0x01
    assert png_chunk_problem(bytes(png)) == "bad CRC in PNG IHDR chunk"


def test_png_chunk_problem_detects_a_missing_iend() -> None:
    png = encode(_photo(), "PNG")
    assert png.endswith(b"IEND\xaeB`\x82")
    without_iend = png[:-12]
    assert png_chunk_problem(without_iend) == "truncated PNG"
    assert decode_image(without_iend, max_pixels=LIMIT) == "truncated PNG"


def test_model_input_is_square_uint8_rgb() -> None:
    pixels = model_input(_decoded(VALID["jpeg"]()).image, 24)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (24, 24, 3)


# Every image format the check supports, cut at every kind of place: the reason names
# the format and what happened to the file.
FORMATS = {
    "JPEG": lambda: encode(_photo(128), "JPEG"),
    "PNG": lambda: encode(_photo(128), "PNG"),
    "GIF": lambda: encode(_photo(128), "GIF"),
    "BMP": lambda: encode(_photo(128), "BMP"),
    "TIFF": lambda: encode(_photo(128), "TIFF"),
    "WEBP": lambda: encode(_photo(128), "WEBP"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kept", [2, 5, 10, 13, 16, 24, 32, 64, 0.25, 0.5, 0.9])
def test_a_cut_image_of_every_format_is_called_truncated_and_named(
    fmt: str, kept: int | float
) -> None:
    data = FORMATS[fmt]()
    cut = data[: int(len(data) * kept) if isinstance(kept, float) else kept]
    reason = decode_image(cut, max_pixels=LIMIT)
    assert isinstance(reason, str) and reason.startswith(f"truncated {fmt}"), reason


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_zero_byte_file_of_every_format_says_zero_bytes(fmt: str) -> None:
    assert decode_image(b"", max_pixels=LIMIT) == "zero bytes"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GIF89a\x30\x00", "truncated GIF (header only)"),
        (b"GIF89a", "truncated GIF (header only)"),
        (b"GIF8", "truncated GIF (header only)"),
        (b"\x89PNG\r\n\x1a\n", "truncated PNG (header only)"),
        (b"\xff\xd8\xff", "truncated JPEG (header only)"),
        (b"RIFF\x10\x00\x00\x00WEB", "truncated WEBP"),
        (b"II*\x00\x08\x00\x00\x00", "truncated TIFF (header only)"),
        (b"BM\x36\x30\x00\x00", "truncated BMP (header only)"),
        (b"BMW, a car; not a bitmap.\n" * 4, "not an image: text"),
    ],
)
def test_a_header_alone_says_truncated_with_its_format(data: bytes, reason: str) -> None:
    assert decode_image(data, max_pixels=LIMIT) == reason


def test_a_cut_animation_is_truncated_not_header_only() -> None:
    gif = _animated_gif()
    assert decode_image(gif[: len(gif) * 3 // 4], max_pixels=LIMIT) == "truncated GIF"


def test_a_bad_ihdr_crc_and_a_zero_width_png_say_so() -> None:
    png = bytearray(encode(_photo(), "PNG"))
    png[29] ^= 0x01  # the IHDR's CRC
    assert decode_image(bytes(png), max_pixels=LIMIT) == "bad CRC in PNG IHDR chunk"
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0)
    empty = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    )
    assert decode_image(empty, max_pixels=LIMIT) == "empty PNG (0x16)"


def test_a_png_with_a_2_mb_icc_profile_is_valid() -> None:
    profile = np.random.default_rng(0).integers(0, 256, 2_000_000, dtype=np.uint8).tobytes()
    _decoded(encode(_photo(), "PNG", icc_profile=profile))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16", "F", "1", "L"])
def test_conversion_in_bands_equals_the_whole_image_conversion(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.inputs

    rng = np.random.default_rng(1)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (37, 23), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.normal(0, 100, (37, 23)).astype(np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 256, (37, 23, 4), dtype=np.uint8), "RGBA")
        image = image.convert(mode)
    whole = np.asarray(tasks.inputs._to_rgb(image))
    monkeypatch.setattr(tasks.inputs, "BAND_PIXELS", 23 * 5)  # bands of 5 rows
    assert np.array_equal(np.asarray(tasks.inputs._to_rgb(image)), whole)


def test_a_png_chunk_that_is_not_one_is_named_by_its_place_on_one_line() -> None:
    """Found by the fuzz pass: a chunk type of non-letters (`NG\\r\\n`) put a newline in
    the reason."""
    png = encode(_photo(), "PNG")
    broken = png[:33] + b"\x00\x00\x00\x05NG\r\nabcde" + png[33:]
    assert decode_image(broken, max_pixels=LIMIT) == "broken PNG (no chunk at byte 33)"
    assert png_chunk_problem(broken) == "broken PNG (no chunk at byte 33)"


HOSTILE_IMAGES = image_cases()


@pytest.mark.parametrize(
    "name",
    sorted(set(HOSTILE_IMAGES) - {"images/bomb-just-under.png"}),  # 179 Mpx: slow
)
def test_every_hostile_image_gets_its_outcome_from_the_check(name: str) -> None:
    make, outcome = HOSTILE_IMAGES[name]
    result = inspect_image(name, make(), LIMIT, True, 16)
    if outcome == "ok":
        assert not isinstance(result, str), result
    else:
        assert isinstance(result, str) and outcome in result, result
