"""Model inputs: turn an object into the model's input, and read a checked shard's inputs
back, from the .npy parts the check wrote or, when they are gone, by decoding again.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image, ImageSequence, PngImagePlugin, UnidentifiedImageError

from tasks.errors import CurateError
from tasks.formats import read_npy, read_parquet_bytes
from tasks.shards import CheckedShard
from tasks.storage import Storage, process_objects
from tasks.video import VideoError, decode_frames

T = TypeVar("T")

# We check the pixel count ourselves, against the configured limit, before decoding.
Image.MAX_IMAGE_PIXELS = None
# Pillow keeps an image in blocks of at most this many bytes. At 16 MB (its default) glibc
# serves them from the decoding thread's malloc arena, which keeps them for that thread
# when freed: six threads decoding 16 Mpx images one at a time held 330 MB where one image
# needs 80. Blocks above glibc's largest mmap threshold (32 MB) are mapped and unmapped
# whole, so a large image's memory goes back when the image is freed (90 MB here).
Image.core.set_block_size(128 << 20)
# Pillow refuses a PNG whose text or ICC chunk inflates past 1 MB (a zlib bomb guard), but
# ICC profiles of a few MB are real (press CMYK profiles): 16 MB still bounds a bomb.
PngImagePlugin.MAX_TEXT_CHUNK = 16 << 20
# Pillow warns about oddities of a file (corrupt EXIF, odd TIFF tags) once per file: the
# check reports what matters as the file's reason, the rest is noise in a run's log.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
logging.getLogger("PIL").setLevel(logging.CRITICAL)  # same: "More samples per pixel ..."

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# What a file of each supported format starts with (`?`: any byte, a WebP's RIFF size).
SIGNATURES = (
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", PNG_MAGIC),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
    ("WEBP", b"RIFF????WEBP"),
    ("BMP", b"BM"),
)

# Pillow's hard decompression-bomb limit, `corruptness_check.max_image_pixels`' default.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

# Peak bytes a decode holds per pixel of the image, from the encoded bytes to the model input
# and metadata row, measured on 16 Mpx images: 5 for 8-bit RGB, gray and palette PNG and
# JPEG, 6.5 for 16-bit gray, 8 to 9 for RGBA, LA, CMYK and float TIFF, 13 for an animated
# GIF, 16.5 for WebP and 18 for an animated WebP (libwebp's canvas and Pillow's copy), with
# room to spare. With pixels in flight P, decoding holds at most P x this many bytes besides
# what the process holds anyway (`tests/test_memory.py` holds a run to it).
DECODE_BYTES_PER_PIXEL = 20


class PixelBudget:
    """Decoded pixels held at once by this process, over every thread that decodes images:
    the check's decode threads, and the model-input path when it decodes again. Without it
    memory grows with threads times image size: eight threads on 170 Mpx images would
    hold 30 GB. A decode waits, in arrival order (a large image is not starved by small
    ones), until its pixels fit; an image larger than the whole budget decodes alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._changed = threading.Condition()
        self._held = 0
        self._waiting: deque[object] = deque()

    @property
    def held(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def set_limit(self, limit: int) -> None:
        with self._changed:
            self.limit = limit
            self._changed.notify_all()

    def _admits(self, ticket: object, pixels: int) -> bool:
        return self._waiting[0] is ticket and (self._held == 0 or self._held + pixels <= self.limit)

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                self._changed.wait_for(lambda: self._admits(ticket, pixels))
            finally:
                self._waiting.remove(ticket)  # admitted, or interrupted while waiting
                self._changed.notify_all()
            self._held += pixels
        try:
            yield
        finally:
            with self._changed:
                self._held -= pixels
                self._changed.notify_all()


# The process's budget; `flows.steps.submit_check` sets its limit from the config's
# `corruptness_check.pixels_in_flight`.
PIXELS_IN_FLIGHT = PixelBudget(DEFAULT_MAX_IMAGE_PIXELS)


@dataclass
class Decoded:
    """A fully decoded image (RGB) and what the header said about it."""

    image: Image.Image
    format: str
    mode: str
    width: int
    height: int
    n_frames: int


def _not_an_image_reason(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not an image: HTML"
    if head.startswith((b"<?xml", b"<svg")):
        return "not an image: XML/SVG"
    try:
        data[:4096].decode("utf-8")
        return "not an image: text"
    except UnicodeDecodeError:
        return "not an image: unknown format"


def _printable(data: bytes) -> bool:
    """Text as people write it: UTF-8 without control characters besides whitespace (a
    binary header has zero bytes and small integers)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\n\r" for c in text)


def signature_format(data: bytes) -> str | None:
    """The supported format whose signature `data` starts with, or starts (a file cut
    inside its signature); None for anything else and for fewer than two bytes."""
    if len(data) < 2:
        return None
    for fmt, signature in SIGNATURES:
        if all(want in (got, ord("?")) for got, want in zip(data, signature, strict=False)):
            return fmt
    return None


def _declared_cut(fmt: str, data: bytes) -> bool:
    """Whether the file ends before its own structure says it does: inside (or right
    after) its signature or a GIF's screen descriptor, inside a PNG chunk, before a WebP's
    RIFF size, a BMP's file size or the end of a TIFF's first image directory."""
    signature = max(len(sig) for name, sig in SIGNATURES if name == fmt)
    if len(data) <= signature or (fmt == "GIF" and len(data) < 13):
        return True
    if fmt == "PNG":
        return png_chunk_problem(data) == "truncated PNG"
    if fmt == "JPEG":
        return _jpeg_ends_before_scan(data)
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if fmt == "BMP":
        return len(data) < 6 or int.from_bytes(data[2:6], "little") > len(data)
    if fmt == "TIFF":
        order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
        ifd = int.from_bytes(data[4:8], order)
        if ifd + 2 > len(data):
            return True
        entries = int.from_bytes(data[ifd : ifd + 2], order)
        return ifd + 2 + 12 * entries + 4 > len(data)
    return False


def _jpeg_ends_before_scan(data: bytes) -> bool:
    """Whether a JPEG's marker segments run to the end of the data without reaching the
    start of scan (the pixel data): a file cut inside its header."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False  # no marker where one belongs: damaged, not cut
        marker = data[position + 1]
        if marker == 0xDA:  # start of scan
            return False
        if marker == 0xFF:  # fill byte
            position += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            position += 2
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return True


# What Pillow's plugins say when a header ends early (read short, unpack short, no frame
# after a GIF's screen descriptor, a PNG chunk or checksum cut off).
SHORT_READ = (
    "truncated",
    "requires a buffer",
    "unpack requires",
    "no more images",
    "incomplete checksum",
    "index out of range",
)


def _header_reason(data: bytes, exc: Exception) -> str:
    """Why Pillow cannot open `data`: what the format's own plugin says (Image.open hides
    it behind "cannot identify image file"), a cut header said as such."""
    fmt = signature_format(data)
    if fmt is None:
        if isinstance(exc, UnidentifiedImageError):
            return _not_an_image_reason(data)
        return f"unreadable header: {_message(exc)}"
    factory, _ = Image.OPEN[fmt]
    try:
        factory(io.BytesIO(data), "")  # type: ignore[call-arg]
    except Exception as cause:  # the plugin's own error, not another plugin's
        exc = cause
    message = _message(exc)
    if fmt == "PNG":
        problem = png_chunk_problem(data)  # Pillow checks the IHDR's CRC: say which
        if problem and problem != "truncated PNG":
            return problem
        if data[12:16] == b"IHDR" and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            if width == 0 or height == 0:
                return f"empty PNG ({width}x{height})"
    if fmt == "BMP" and len(data) > 2 and _printable(data[:4096]):
        return "not an image: text"  # "BM..." is a 2-byte signature text can start with
    if _declared_cut(fmt, data) or any(s in message.lower() for s in SHORT_READ):
        return f"truncated {fmt}" + ("" if fmt == "WEBP" else " (header only)")
    return f"unreadable {fmt} header: {message}"


def png_chunk_problem(data: bytes) -> str | None:
    """Walk PNG chunks and verify each CRC and the final IEND; None when sound."""
    pos = len(PNG_MAGIC)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunk_type = data[pos + 4 : pos + 8]
        if not chunk_type.isalpha():  # chunk types are four ASCII letters
            return f"broken PNG (no chunk at byte {pos})"
        end = pos + 8 + length
        if end + 4 > len(data):
            return "truncated PNG"
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(data[pos + 4 : end]) != crc:
            return f"bad CRC in PNG {chunk_type.decode('latin-1')} chunk"
        if chunk_type == b"IEND":
            return None
        pos = end + 4
    return "truncated PNG"


def _message(exc: Exception) -> str:
    """An exception's text for a reason: one line, printable, short (Pillow's messages
    quote bytes of the file)."""
    text = "".join(c if c.isprintable() else " " for c in str(exc)).strip()
    return text[:120] or type(exc).__name__


def _decode_reason(fmt: str, exc: Exception) -> str:
    message = _message(exc)
    if "could not create decoder" in message or any(s in message.lower() for s in SHORT_READ):
        return f"truncated {fmt}"
    if "broken data stream" in message:
        return f"broken {fmt} data stream"
    return f"{fmt} decode error: {message}"


@dataclass
class _Opened:
    """An image whose header is read and found sound; no pixel decoded yet."""

    image: Image.Image
    format: str
    mode: str
    width: int
    height: int
    n_frames: int

    @property
    def pixels(self) -> int:
        """Pixels the decode makes: fewer than the header's for a drafted JPEG."""
        return self.image.width * self.image.height


def _open_image(
    data: bytes, max_pixels: int, full_check: bool, draft_size: int | None
) -> _Opened | str:
    """The header's facts, or why the file is corrupt before any pixel is decoded."""
    if not data:
        return "zero bytes"
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for broken headers
        return _header_reason(data, exc)
    fmt = image.format or "image"
    width, height = image.size
    if width * height > max_pixels:
        return f"decompression bomb: {width * height / 1e6:.0f} Mpx"
    if width == 0 or height == 0:
        return f"empty {fmt} ({width}x{height})"
    try:
        n_frames = getattr(image, "n_frames", 1)  # reads every frame's header
    except Exception as exc:
        return _decode_reason(fmt, exc)
    if full_check and fmt == "PNG":
        problem = png_chunk_problem(data)
        if problem:
            return problem
    mode = image.mode
    try:
        if not full_check and fmt == "JPEG" and draft_size:
            image.draft("RGB", (draft_size, draft_size))
    except Exception as exc:
        return _decode_reason(fmt, exc)
    return _Opened(image, fmt, mode, width, height, n_frames)


def _load(opened: _Opened, full_check: bool) -> Decoded | str:
    image = opened.image
    try:
        if full_check and opened.n_frames > 1:
            for frame in ImageSequence.Iterator(image):
                frame.load()
            image.seek(0)
        image.load()
        rgb = _to_rgb(image)
    except Exception as exc:  # any decoder failure is the file's fault, not ours
        return _decode_reason(opened.format, exc)
    return Decoded(rgb, opened.format, opened.mode, opened.width, opened.height, opened.n_frames)


def decode_image(
    data: bytes, max_pixels: int, full_check: bool = True, draft_size: int | None = None
) -> Decoded | str:
    """Decode `data` to RGB, or return why it cannot be.

    `full_check=False` is the fast path when the corruptness check is off: JPEGs decode
    at reduced size (`draft`, to about `draft_size`), PNG CRCs and later frames of
    animations are not verified. Undecodable files are still reported.
    """
    opened = _open_image(data, max_pixels, full_check, draft_size)
    return opened if isinstance(opened, str) else _load(opened, full_check)


def decode_then(
    data: bytes,
    max_pixels: int,
    use: Callable[[Decoded], T],
    full_check: bool = True,
    draft_size: int | None = None,
    budget: PixelBudget = PIXELS_IN_FLIGHT,
) -> T | str:
    """`use(decode_image(...))`, or the reason, with the image's pixels held in `budget`
    from the header (before any pixel is decoded) until `use` returns: the decoded image
    must not outlive the call."""
    opened = _open_image(data, max_pixels, full_check, draft_size)
    if isinstance(opened, str):
        return opened
    with budget.hold(opened.pixels):
        decoded = _load(opened, full_check)
        # Free each image as soon as it is not needed (the image as decoded, RGBA or 16-bit,
        # once its RGB copy exists; the RGB one once `use` is done), before the budget
        # admits the next decode.
        if isinstance(decoded, str) or decoded.image is not opened.image:
            opened.image.close()
        if isinstance(decoded, str):
            return decoded
        try:
            return use(decoded)
        finally:
            decoded.image.close()


# Pixels converted at once: the conversion's temporaries stay a few megabytes however large
# the image, so converting holds the decoded image and its RGB copy, nothing more.
BAND_PIXELS = 1 << 18


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas on white, 16-bit and float modes scaled to 8 bits,
    converted in bands of rows (every conversion here is per pixel, so bands give the
    whole image's result)."""
    if image.mode == "RGB":
        return image  # converting would copy it
    width, height = image.size
    rows = max(1, BAND_PIXELS // width)
    boxes = [(0, top, width, min(height, top + rows)) for top in range(0, height, rows)]
    convert = _converter(image, boxes)
    rgb = Image.new("RGB", image.size)
    for box in boxes:
        rgb.paste(convert(image.crop(box)), box[:2])
    return rgb


def _converter(
    image: Image.Image, boxes: list[tuple[int, int, int, int]]
) -> Callable[[Image.Image], Image.Image]:
    """How to turn one band of `image` into RGB (scales are the whole image's)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Integer images are 16-bit in practice: map the 16-bit range, not the image's
        # own maximum, so a dark image stays dark. In integers: round(v * 255 / 65535)
        # is (v * 255 + 32767) // 65535, as no v lies on a tie.
        peak = max(int(np.asarray(image.crop(box)).max()) for box in boxes)

        def integers(band: Image.Image) -> Image.Image:
            array = np.clip(np.asarray(band), 0, 65535).astype(np.int64)
            if peak > 255:
                array = (array * 255 + 32767) // 65535
            return Image.fromarray(array.astype(np.uint8)).convert("RGB")

        return integers
    if image.mode == "F":
        lo, hi = np.inf, -np.inf
        for box in boxes:
            array = np.asarray(image.crop(box), dtype=np.float64)
            finite = array[np.isfinite(array)]
            if finite.size:
                lo, hi = min(lo, finite.min()), max(hi, finite.max())
        if lo > hi:  # nothing finite
            lo = hi = 0.0

        def floats(band: Image.Image) -> Image.Image:
            array = np.asarray(band, dtype=np.float64)
            scaled = (np.where(np.isfinite(array), array, lo) - lo) * (255.0 / ((hi - lo) or 1.0))
            return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")

        return floats
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):

        def on_white(band: Image.Image) -> Image.Image:
            rgba = band.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")

        return on_white
    return lambda band: band.convert("RGB")


def model_input(image: Image.Image, size: int) -> np.ndarray:
    """The model's view of an image: squashed to size x size RGB uint8 (no crop, so
    nothing at the borders is lost)."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.uint8)


def load_model_inputs(
    source: Storage, names: list[str], draft_size: int | None, input_size: int, workers: int
) -> np.ndarray:
    """Read and decode images that passed the check, for the model only."""

    def load(name: str, data: bytes) -> np.ndarray:
        pixels = decode_then(
            data,
            2**62,
            lambda decoded: model_input(decoded.image, input_size),
            full_check=False,
            draft_size=draft_size,
        )
        if isinstance(pixels, str):  # it passed the check earlier in this run
            raise CurateError(f"{source.join(name)}: changed during the run ({pixels})")
        return pixels

    inputs = np.empty((len(names), input_size, input_size, 3), dtype=np.uint8)
    for i, (name, pixels) in enumerate(process_objects(source, names, load, workers)):
        if isinstance(pixels, FileNotFoundError):
            raise CurateError(f"{source.join(name)}: deleted during the run")
        if isinstance(pixels, Exception):
            raise pixels
        inputs[i] = pixels
    return inputs


def shard_inputs(
    checked: CheckedShard, source: Storage, output: Storage, input_size: int, workers: int
) -> Iterator[np.ndarray]:
    """The shard's model inputs, one part at a time: the check's parts while they all
    exist, else made again from the input (a cached check from an earlier run)."""
    if all(output.exists(part) for part in checked.inputs):
        for part in checked.inputs:
            yield read_npy(output, part)
        return
    metadata = read_parquet_bytes(output.read(checked.metadata))
    if checked.videos is not None:
        yield from frame_inputs(source, metadata, input_size)
        return
    # The same pixels as the check made: JPEGs at reduced size only when it did.
    draft_size = None if checked.full_check else input_size
    names = metadata["filename"].tolist()
    yield load_model_inputs(source, names, draft_size, input_size, workers)


# Frames per part when a video's frames are decoded again for the model.
FRAME_PART = 1024


def frame_inputs(source: Storage, metadata: Any, input_size: int) -> Iterator[np.ndarray]:
    """Decode the frames listed in `metadata` again, downscaled, in its row order."""
    part: list[np.ndarray] = []
    for video, rows in metadata.groupby("video", sort=False):
        wanted = [int(i) for i in rows["frame_index"]]
        # The sampled frames are multiples of every_nth_frame: only frames whose index is a
        # multiple of their gcd are converted (the others are decoded and dropped).
        step = math.gcd(*wanted)
        try:
            with (
                source.open(str(video)) as stream,
                closing(decode_frames(stream, input_size, every_nth=max(step, 1))) as frames,
            ):
                for index in wanted:
                    # Stop at the last wanted frame: a kept corrupt video fails just after.
                    frame = next(f for f in frames if f.index == index)
                    part.append(frame.rgb)
                    if len(part) == FRAME_PART:
                        yield np.stack(part)
                        part = []
        except (VideoError, FileNotFoundError, StopIteration) as exc:
            where = source.join(str(video))
            raise CurateError(f"{where}: changed during the run ({exc})") from None
    if part:
        yield np.stack(part)
