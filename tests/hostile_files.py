"""A hostile image and video corpus: one input per kind, each with the outcome the check
must give. Everything is generated here (Pillow, PyAV, numpy), nothing downloaded.

`make_file_cases(folder)` writes the files and returns {name relative to folder: outcome},
where the outcome is "ok" (processed as a valid sample; for a video, its frames are
samples) or a substring of the reason it is listed with. The cases assume the default
config (`corruptness_check.max_image_pixels` = 178,956,970: the bombs lie one row either
side of it). Independent of fixtures, so other corpora can be combined with it in one run.

Decided here: an EXIF-rotated image is checked as stored. Its metadata width and height
are the encoded ones and the orientation tag is not applied (the selected file is
exported byte for byte, and whoever displays it applies the tag).
"""

from __future__ import annotations

import functools
import io
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from PIL import Image
from videos import FASTSTART, Spec, audio_only, random_bytes, video_bytes

# `corruptness_check.max_image_pixels`' default, and the sides of the squares either side.
MAX_IMAGE_PIXELS = 178_956_970
UNDER_SIDE, OVER_SIDE = 13_377, 13_378  # 178,944,129 and 178,970,884 pixels

# The EXIF-rotated case: its stored size (the metadata's) and its orientation tag.
EXIF_ROTATED = "images/exif-rotated-6.jpg"
EXIF_ROTATED_SIZE = (48, 32)


def _picture(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    """A smooth, distinct RGB picture (random colours blown up)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BILINEAR)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _with_bad_crc(png: bytes, chunk: bytes) -> bytes:
    """A copy of `png` whose `chunk` (the first of that type) has a wrong CRC."""
    damaged = bytearray(png)
    at = damaged.find(chunk)
    (length,) = struct.unpack(">I", damaged[at - 4 : at])
    damaged[at + 4 + length] ^= 0xFF
    return bytes(damaged)


def _animated(fmt: str, frames: int = 4, **options: object) -> bytes:
    pictures = [_picture(seed=20 + i) for i in range(frames)]
    return _encode(
        pictures[0], fmt, save_all=True, append_images=pictures[1:], duration=80, **options
    )


def _bomb(side: int) -> bytes:
    """A 1-bit black square PNG of side x side: a few tens of KB for 179 Mpx."""
    return _encode(Image.new("1", (side, side)), "PNG", optimize=True)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(_picture(*EXIF_ROTATED_SIZE, seed=5), "JPEG", exif=exif.tobytes())


def _huge_exif() -> bytes:
    """A JPEG whose APP1 EXIF segment is near its 64 KB maximum (a long description)."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 65_000  # ImageDescription
    return _encode(_picture(seed=6), "JPEG", exif=exif.tobytes())


def _huge_icc(fmt: str) -> bytes:
    """An image carrying a 2 MB (random, so incompressible) ICC profile block: spread
    over 33 APP2 segments in a JPEG, one iCCP chunk in a PNG."""
    profile = random_bytes(2_000_000, seed=7)
    return _encode(_picture(seed=8), fmt, icc_profile=profile)


def _png_of_zero_width() -> bytes:
    """A PNG whose IHDR (with a correct CRC) declares 0 x 16 pixels."""
    ihdr = struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _sixteen_bit() -> bytes:
    ramp = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")


def _rgba() -> bytes:
    image = _picture(seed=9).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return _encode(image, "PNG")


def _palette_with_transparency() -> bytes:
    image = _picture(seed=10).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(image, "PNG", transparency=0)


def image_cases() -> dict[str, tuple[Callable[[], bytes], str]]:
    """The image kinds: {name: (how to make its bytes, outcome)}."""
    jpeg = _encode(_picture(256, 192, seed=1), "JPEG")
    png = _encode(_picture(seed=2), "PNG")
    gif = _encode(_picture(seed=3), "GIF")
    webp = _encode(_picture(seed=4), "WEBP")
    bmp = _encode(_picture(seed=11), "BMP")
    tiff = _encode(_picture(seed=12), "TIFF")
    animated_gif = _animated("GIF")
    cases: dict[str, tuple[Callable[[], bytes], str]] = {
        f"images/zero-bytes.{ext}": (lambda: b"", "zero bytes")
        for ext in ("jpg", "png", "gif", "webp", "bmp", "tif")
    }
    cases |= {
        "images/truncated.jpg": (lambda: jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "images/header-only.jpg": (lambda: jpeg[:20], "truncated JPEG (header only)"),
        "images/truncated.png": (lambda: png[: len(png) // 2], "truncated PNG"),
        "images/header-only.png": (lambda: png[:20], "truncated PNG (header only)"),
        "images/truncated.gif": (lambda: gif[: len(gif) // 2], "truncated GIF"),
        "images/header-only.gif": (lambda: b"GIF89a\x30\x00\x20", "truncated GIF (header only)"),
        "images/truncated.webp": (lambda: webp[: len(webp) // 2], "truncated WEBP"),
        "images/truncated.bmp": (lambda: bmp[: len(bmp) // 2], "truncated BMP"),
        "images/truncated.tif": (lambda: tiff[: len(tiff) // 2], "truncated TIFF"),
        "images/truncated-animation.gif": (
            lambda: animated_gif[: len(animated_gif) * 3 // 4],
            "truncated GIF",
        ),
        "images/png-named.jpg": (lambda: png, "ok"),
        "images/jpeg-named.webp": (lambda: jpeg, "ok"),
        "images/text-named.png": (lambda: b"a caption, not a picture\n" * 20, "not an image: text"),
        "images/html-named.jpg": (
            lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
            "not an image: HTML",
        ),
        "images/random-bytes.jpg": (
            lambda: random_bytes(5000, seed=13),
            "not an image: unknown format",
        ),
        "images/bad-crc-idat.png": (lambda: _with_bad_crc(png, b"IDAT"), "bad CRC in PNG IDAT"),
        "images/bad-crc-ihdr.png": (lambda: _with_bad_crc(png, b"IHDR"), "bad CRC in PNG IHDR"),
        "images/zero-width.png": (_png_of_zero_width, "empty PNG (0x16)"),
        "images/1x60000.png": (lambda: _encode(_picture(1, 60_000, seed=14), "PNG"), "ok"),
        "images/60000x1.png": (lambda: _encode(_picture(60_000, 1, seed=15), "PNG"), "ok"),
        "images/bomb-just-under.png": (lambda: _bomb(UNDER_SIDE), "ok"),
        "images/bomb-just-over.png": (lambda: _bomb(OVER_SIDE), "decompression bomb: 179 Mpx"),
        "images/cmyk.jpg": (lambda: _encode(_picture(seed=16).convert("CMYK"), "JPEG"), "ok"),
        "images/16-bit.png": (_sixteen_bit, "ok"),
        "images/palette.png": (lambda: _encode(_picture(seed=17).convert("P"), "PNG"), "ok"),
        "images/palette-transparent.png": (_palette_with_transparency, "ok"),
        "images/la.png": (lambda: _encode(_picture(seed=18).convert("LA"), "PNG"), "ok"),
        "images/rgba.png": (_rgba, "ok"),
        EXIF_ROTATED: (_exif_rotated, "ok"),
        "images/animated.gif": (lambda: animated_gif, "ok"),
        "images/animated.webp": (lambda: _animated("WEBP", lossless=True), "ok"),
        "images/huge-exif.jpg": (_huge_exif, "ok"),
        "images/huge-icc.jpg": (lambda: _huge_icc("JPEG"), "ok"),
        "images/huge-icc.png": (lambda: _huge_icc("PNG"), "ok"),
        "images/valid.bmp": (lambda: bmp, "ok"),
        "images/valid.tif": (lambda: tiff, "ok"),
    }
    return cases


def _zero_frames(container_format: str, codec: str) -> bytes:
    """A container with a video stream and not one frame in it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "video"
        with av.open(str(path), "w", format=container_format) as container:
            stream = container.add_stream(codec, rate=24)
            stream.width, stream.height = 64, 48
            stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
            container.start_encoding()
        return path.read_bytes()


def _absurd_frame_count_mp4(mp4: bytes) -> bytes:
    """An MP4 whose time-to-sample table claims a billion frames (of its 24)."""
    patched = bytearray(mp4)
    at = patched.find(b"stts") + 4 + 8  # version and flags, entry count, then sample count
    patched[at : at + 4] = struct.pack(">I", 10**9)
    return bytes(patched)


def _absurd_duration(mkv: bytes) -> bytes:
    """A Matroska file whose DURATION tag claims 99 hours (same length, so nothing moves)."""
    at = mkv.find(b"00:00:00.")
    return mkv[:at] + b"99:00:00.000000000" + mkv[at + 18 :]


def _absurd_frame_count(avi: bytes) -> bytes:
    """An AVI whose main header and stream header claim a billion frames."""
    patched = bytearray(avi)
    for chunk, offset in ((b"avih", 8 + 16), (b"strh", 8 + 32)):  # dwTotalFrames, dwLength
        at = patched.find(chunk) + offset
        patched[at : at + 4] = struct.pack("<I", 10**9)
    return bytes(patched)


@functools.cache
def _base_video(kind: str) -> bytes:
    """The valid videos the video cases are made from, encoded once, when first needed."""
    specs = {
        "mp4": Spec("libx264", "mp4", frames=24, options=FASTSTART),
        "moov-at-end": Spec("libx264", "mp4", frames=24),
        "mov": Spec("libx264", "mov", frames=24),
        "mkv": Spec("mjpeg", "matroska", frames=20),
        "webm": Spec("libvpx-vp9", "webm", frames=20),
        "avi": Spec("mpeg4", "avi", frames=24),
        "mpg": Spec("mpeg2video", "mpeg", frames=48),
    }
    return video_bytes(specs[kind])


def video_cases() -> dict[str, tuple[Callable[[], bytes], str]]:
    """The video kinds: {name: (how to make its bytes, outcome)}."""

    def whole(kind: str) -> Callable[[], bytes]:
        return lambda: _base_video(kind)

    def half(kind: str) -> Callable[[], bytes]:
        return lambda: _base_video(kind)[: len(_base_video(kind)) // 2]

    cases: dict[str, tuple[Callable[[], bytes], str]] = {
        f"videos/zero-bytes.{ext}": (lambda: b"", "zero bytes")
        for ext in ("mp4", "mov", "mkv", "webm", "avi", "mpg")
    }
    cases |= {
        "videos/valid.mp4": (whole("mp4"), "ok"),
        "videos/valid.webm": (whole("webm"), "ok"),
        "videos/cut-faststart.mp4": (half("mp4"), "truncated"),
        "videos/cut-moov-at-end.mp4": (half("moov-at-end"), "truncated MP4 (no moov index)"),
        "videos/cut.mov": (half("mov"), "truncated MP4"),
        "videos/cut.mkv": (half("mkv"), "truncated"),
        "videos/cut.webm": (half("webm"), "truncated"),
        "videos/cut.avi": (half("avi"), "truncated"),
        "videos/cut.mpg": (half("mpg"), "truncated"),
        "videos/header-only.mkv": (lambda: _base_video("mkv")[:24], "truncated Matroska/WebM"),
        "videos/header-only.mp4": (lambda: _base_video("mp4")[:100], "truncated MP4"),
        "videos/audio-only.mp4": (audio_only, "no video stream"),
        "videos/zero-frames.avi": (lambda: _zero_frames("avi", "mpeg4"), "no video frames"),
        "videos/zero-frames.mkv": (lambda: _zero_frames("matroska", "mjpeg"), "no frames"),
        "videos/zero-frames.mp4": (lambda: _zero_frames("mp4", "libx264"), "no video stream"),
        "videos/absurd-duration.mkv": (
            lambda: _absurd_duration(_base_video("mkv")),
            "header declares 356400",
        ),
        "videos/absurd-frame-count.mp4": (
            lambda: _absurd_frame_count_mp4(_base_video("mp4")),
            "header declares 1000000000 frames",
        ),
        "videos/absurd-frame-count.avi": (
            lambda: _absurd_frame_count(_base_video("avi")),
            "header declares 1000000000 frames",
        ),
        "videos/random-bytes.mp4": (lambda: random_bytes(8192, seed=21), "cannot open video"),
        "videos/text-named.mkv": (lambda: b"not a video\n" * 100, "cannot open video"),
    }
    return cases


def make_file_cases(folder: Path) -> dict[str, str]:
    """Write one hostile or unusual input per kind under `folder`; returns {name: "ok" or
    a substring of its reason}."""
    expected = {}
    for name, (make, outcome) in (image_cases() | video_cases()).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
        expected[name] = outcome
    return expected
