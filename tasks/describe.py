"""Describe: per-sample metadata, computed from the image the check already decoded.

Brightness, contrast and saturation are in [0, 1] (mean luma, RMS contrast of luma, mean
HSV saturation); sharpness is the variance of the 4-neighbour Laplacian of luma in 8-bit
units (higher is sharper). Two hashes find exact duplicates: `content_hash` over the
bytes, `pixel_hash` over the decoded RGB pixels and size (same picture, other encoding).

A video frame has no bytes of its own: both of its hashes are the pixel hash of its
decoded picture (so identical frames are exact duplicates; see `frames.frame_crc`), and the
other measures are taken on the frame as downscaled at decode time for the model (the
full-size RGB frame is never made, which keeps the video path near a bare decode loop).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pandera.pandas as pa

if TYPE_CHECKING:
    from tasks.inputs import Decoded

METADATA_SCHEMA = pa.DataFrameSchema(
    {
        "filename": pa.Column(str, unique=True),
        "width": pa.Column("int64", pa.Check.gt(0)),
        "height": pa.Column("int64", pa.Check.gt(0)),
        "file_size": pa.Column("int64", pa.Check.gt(0)),
        "format": pa.Column(str),
        "mode": pa.Column(str),
        "brightness": pa.Column("float64", pa.Check.in_range(0.0, 1.0)),
        "contrast": pa.Column("float64", pa.Check.in_range(0.0, 1.0)),
        "saturation": pa.Column("float64", pa.Check.in_range(0.0, 1.0)),
        "sharpness": pa.Column("float64", pa.Check.ge(0.0)),
        "content_hash": pa.Column(str, pa.Check.str_length(64, 64)),
        "pixel_hash": pa.Column(str, pa.Check.str_length(64, 64)),
        # Video frames only (null for images): which video, which frame, and when.
        "video": pa.Column(str, nullable=True),
        "frame_index": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "pts": pa.Column("Int64", nullable=True),
        "seconds": pa.Column("float64", nullable=True),
    },
    strict=True,
    ordered=True,
    coerce=True,
)


# Pixels of an image measured at once: the measures' temporaries (a dozen bytes a pixel)
# stay a few megabytes however large the image, so describing adds nothing to the memory a
# decode holds (`inputs.DECODE_BYTES_PER_PIXEL`).
PIXELS_PER_BAND = 1 << 18


def describe(name: str, data: bytes, decoded: Decoded) -> dict[str, object]:
    """One metadata row for a decoded image, measured in bands of rows. Luma and its
    Laplacian are integers, so their sums are exact in int64 and the band order does not
    matter; the pixel hash covers the same bytes in the same order as the whole image's."""
    image = decoded.image
    width, height = image.size
    pixel_hash = hashlib.sha256(f"{(height, width, 3)}".encode())
    luma_sum = luma_squares = saturation = lap_sum = lap_squares = lap_count = 0.0
    rows = max(1, PIXELS_PER_BAND // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        # One row more on each side, for the Laplacian of the band's first and last rows.
        above, below = max(0, top - 1), min(height, bottom + 1)
        band = image.crop((0, above, width, below))
        rgb = np.asarray(band, dtype=np.uint8)
        own = rgb[top - above : top - above + bottom - top]
        pixel_hash.update(np.ascontiguousarray(own).data)
        luma = np.asarray(band.convert("L"), dtype=np.int64)
        own_luma = luma[top - above : top - above + bottom - top]
        luma_sum += int(own_luma.sum())
        luma_squares += int(np.square(own_luma).sum())
        saturation += float(mean_saturation(own)) * own.shape[0] * width
        if width >= 3 and height >= 3:
            # The padded band's Laplacian is of rows above+1 .. below-2; keep the band's
            # own rows among those the image's Laplacian has (1 .. height-2).
            first, last = max(top, 1), min(bottom, height - 1)
            lap = _laplacian(luma)[first - above - 1 : last - above - 1]
            lap_sum += int(lap.sum())
            lap_squares += int(np.square(lap).sum())
            lap_count += lap.size
    n = width * height
    luma_mean = luma_sum / n
    luma_var = max(0.0, luma_squares / n - luma_mean**2)
    sharpness = 0.0
    if lap_count:
        sharpness = max(0.0, lap_squares / lap_count - (lap_sum / lap_count) ** 2)
    return {
        "filename": name,
        "width": decoded.width,
        "height": decoded.height,
        "file_size": len(data),
        "format": decoded.format,
        "mode": decoded.mode,
        "brightness": luma_mean / 255.0,
        "contrast": luma_var**0.5 / 255.0,
        "saturation": saturation / n,
        "sharpness": sharpness,
        "content_hash": hashlib.sha256(data).hexdigest(),
        "pixel_hash": pixel_hash.hexdigest(),
        "video": None,
        "frame_index": None,
        "pts": None,
        "seconds": None,
    }


@dataclass(frozen=True)
class FrameFacts:
    """What is known of a video frame when it is decoded; the rest is measured later,
    for a whole part of frames at once (`describe_frames`)."""

    name: str
    video: str
    file_size: int
    codec: str
    index: int
    pts: int | None
    seconds: float | None
    width: int
    height: int
    pixel_format: str
    picture_crc: int  # CRC-32C of the full decoded picture (`frames.frame_crc`)


# Pixels measured per vectorised pass (16 frames of 64 px, one of 224 px): the float32
# temporaries stay in the CPU's cache. Passes over 4x more pixels cost twice as much per
# frame (memory traffic, page faults of fresh temporaries); much smaller ones pay numpy's
# per-call overhead.
PIXELS_PER_PASS = 1 << 16


def describe_frames(facts: list[FrameFacts], small_rgb: np.ndarray) -> list[dict[str, object]]:
    """Metadata rows for frames, measured on their downscaled RGB (`small_rgb`, N x S x S x
    3, rows aligned with `facts`) in vectorised passes."""
    step = max(1, PIXELS_PER_PASS // (small_rgb.shape[1] * small_rgb.shape[2]))
    rows = []
    for start in range(0, len(facts), step):
        stop = start + step
        rows.extend(_describe_frames(facts[start:stop], small_rgb[start:stop]))
    return rows


def _describe_frames(facts: list[FrameFacts], small_rgb: np.ndarray) -> list[dict[str, object]]:
    red, green, blue = small_rgb[..., 0], small_rgb[..., 1], small_rgb[..., 2]
    # float32 scalars keep the arithmetic in float32 (a Python float would make float64).
    luma = red * np.float32(0.299) + green * np.float32(0.587) + blue * np.float32(0.114)
    brightness = luma.mean(axis=(1, 2)) / 255.0
    contrast = luma.std(axis=(1, 2)) / 255.0
    saturation = mean_saturation(small_rgb)
    sharpness = laplacian_variance(luma)
    rows = []
    for i, fact in enumerate(facts):
        digest = hashlib.sha256(f"{fact.width}x{fact.height}{fact.pixel_format}".encode())
        digest.update(fact.picture_crc.to_bytes(4, "big"))
        digest.update(np.ascontiguousarray(small_rgb[i]).data)
        pixel_hash = digest.hexdigest()
        rows.append(
            {
                "filename": fact.name,
                "width": fact.width,
                "height": fact.height,
                "file_size": fact.file_size,
                "format": fact.codec,
                "mode": fact.pixel_format,
                "brightness": float(brightness[i]),
                "contrast": float(contrast[i]),
                "saturation": float(saturation[i]),
                "sharpness": float(sharpness[i]),
                "content_hash": pixel_hash,
                "pixel_hash": pixel_hash,
                "video": fact.video,
                "frame_index": fact.index,
                "pts": fact.pts,
                "seconds": fact.seconds,
            }
        )
    return rows


def mean_saturation(rgb: np.ndarray) -> np.ndarray:
    """Mean HSV saturation, (max - min) / max per pixel, over the last three axes (H, W,
    3): one value for an image, one per image for a batch. Channel by channel, in uint8,
    without an HSV conversion (which costs more than all other metadata together) and
    without a reduction over the last axis of length 3 (30x slower). Where max is 0 so is
    max - min, so dividing by max(max, 1) is exact."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(red, green), blue)
    low = np.minimum(np.minimum(red, green), blue)
    spread = (high - low).astype(np.float32)
    return (spread / np.maximum(high, 1)).mean(axis=(-2, -1))


def laplacian_variance(luma: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian over the last two axes (H, W)."""
    if luma.shape[-2] < 3 or luma.shape[-1] < 3:
        return np.zeros(luma.shape[:-2], np.float32)
    return _laplacian(luma).var(axis=(-2, -1))


def _laplacian(luma: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian of the interior (rows and columns 1 .. n-2)."""
    return (
        luma[..., :-2, 1:-1]
        + luma[..., 2:, 1:-1]
        + luma[..., 1:-1, :-2]
        + luma[..., 1:-1, 2:]
        - 4 * luma[..., 1:-1, 1:-1]
    )


def metadata_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    """Rows as a schema-checked frame (an empty shard gives an empty, typed frame)."""
    frame = pd.DataFrame(rows, columns=list(METADATA_SCHEMA.columns))
    return METADATA_SCHEMA.validate(frame)
