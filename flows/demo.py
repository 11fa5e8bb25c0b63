"""`make demo`: curate a generated folder of images, with planted corrupt files and
duplicates, into ./demo-output. No network, no cloud account.

The images are real photos (scikit-learn's two bundled samples) cut into varied crops,
synthetic scenes and handwritten digits, so selection has structure to find.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits, load_sample_images


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_crops(n: int, seed: int = 0, size: int = 96) -> list[Image.Image]:
    """Random crops of the two bundled photos, at several scales, some flipped."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(array) for array in load_sample_images().images]
    crops = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(80, min(photo.size)))
        x = int(rng.integers(0, photo.width - side))
        y = int(rng.integers(0, photo.height - side))
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(crop)
    return crops


def scenes(n: int, seed: int = 0, size: int = 96) -> list[Image.Image]:
    """Shapes on gradient backgrounds."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = np.linspace(0, 1, size)[:, None, None]
        background = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1)
        image = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
            x1, y1 = x0 + int(rng.integers(10, 60)), y0 + int(rng.integers(10, 60))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=color)
        images.append(image)
    return images


def digit_images(size: int = 64) -> tuple[list[Image.Image], np.ndarray]:
    """scikit-learn's 1,797 labeled 8x8 digits, upscaled to RGB images."""
    digits = load_digits()
    images = [
        Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        .resize((size, size), Image.Resampling.BILINEAR)
        .convert("RGB")
        for pixels in digits.images
    ]
    return images, digits.target


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def decompression_bomb(side: int = 20_000) -> bytes:
    """A valid, ~50 KB PNG of side x side 1-bit pixels (400 Mpx at the default)."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def corrupt_files(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """Planted corrupt files: name -> (bytes, the reason the check must give)."""
    image = photo_crops(1, seed=seed + 99)[0]
    jpeg, png, gif = encode(image, "JPEG"), encode(image, "PNG"), encode(image, "GIF")
    bad_crc = bytearray(png)
    idat = bad_crc.find(b"IDAT")
    crc_at = idat + 4 + struct.unpack(">I", bad_crc[idat - 4 : idat])[0]
    bad_crc[crc_at] ^= 0xFF
    random_bytes = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8)
    return {
        "corrupt/empty.jpg": (b"", "zero bytes"),
        "corrupt/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "corrupt/truncated.png": (png[: len(png) // 2], "truncated PNG"),
        "corrupt/truncated.gif": (gif[: len(gif) // 2], "truncated GIF"),
        "corrupt/wrong_magic.jpg": (b"\x00\x00\x00\x00" + jpeg[4:], "not an image: unknown format"),
        "corrupt/bad_crc.png": (bytes(bad_crc), "bad CRC in PNG IDAT chunk"),
        "corrupt/readme.jpg": (
            b"These are not the pixels you are looking for.\n",
            "not an image: text",
        ),
        "corrupt/error_page.png": (
            b"<!DOCTYPE html><html><body>404</body></html>",
            "not an image: HTML",
        ),
        "corrupt/noise.webp": (random_bytes.tobytes(), "not an image: unknown format"),
        "corrupt/bomb.png": (decompression_bomb(), "decompression bomb: 400 Mpx"),
        "corrupt/garbled.jpg": (jpeg[:300] + bytes(400) + jpeg[700:], "JPEG decode error"),
    }


def make_demo_folder(folder: Path, seed: int = 0) -> dict[str, str]:
    """Write ~200 images, planted duplicates and corrupt files; returns the corrupt
    names with their expected reasons."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(photo_crops(120, seed)):
        (folder / f"photos/crop_{i:03d}.jpg").parent.mkdir(exist_ok=True)
        (folder / f"photos/crop_{i:03d}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    for i, image in enumerate(scenes(60, seed)):
        (folder / f"scenes/scene_{i:03d}.png").parent.mkdir(exist_ok=True)
        (folder / f"scenes/scene_{i:03d}.png").write_bytes(encode(image, "PNG"))
    digits, _ = digit_images()
    (folder / "digits").mkdir(exist_ok=True)
    for i in range(0, 300, 15):
        (folder / f"digits/digit_{i:04d}.png").write_bytes(encode(digits[i], "PNG"))
    # A byte-identical copy and a pixel-identical re-encoding.
    (folder / "copies").mkdir(exist_ok=True)
    (folder / "copies/crop_000_copy.jpg").write_bytes((folder / "photos/crop_000.jpg").read_bytes())
    scene = Image.open(folder / "scenes/scene_000.png")
    (folder / "copies/scene_000_recompressed.png").write_bytes(
        encode(scene, "PNG", compress_level=1)
    )
    (folder / "notes.txt").write_text("not an image: skipped by extension\n")
    expected = {}
    for name, (data, reason) in corrupt_files(seed).items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        expected[name] = reason
    return expected


def make_demo_videos(folder: Path, frames: int = 48) -> None:
    """Two short clips whose scene changes every 12 frames (H.264 MP4, VP9 WebM) and a
    truncated copy of the first, which the run reports in `corrupt_videos`."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    scenes = [photo_crops(1, seed=int(s), size=96)[0] for s in rng.integers(0, 10**6, 4)]
    for name, codec, fmt in (("street.mp4", "libx264", "mp4"), ("park.webm", "libvpx-vp9", "webm")):
        with av.open(str(folder / name), "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=12)
            assert isinstance(stream, av.VideoStream)
            stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
            for i in range(frames):
                scene = np.asarray(scenes[(i // 12 + (fmt == "webm")) % len(scenes)])
                picture = np.roll(scene, 2 * (i % 12), axis=1)  # a slow pan within a scene
                container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
            container.mux(stream.encode())
    data = (folder / "street.mp4").read_bytes()
    (folder / "street-cut.mp4").write_bytes(data[: len(data) // 2])


def main() -> int:
    from flows.cli import main as cli

    folder = Path("demo-data")
    if not folder.exists():
        make_demo_folder(folder)
        make_demo_videos(folder / "videos")
        print(f"made sample images and videos in {folder}/ (run again: nothing new to process)")
    return cli(["run", f"input={folder}", "output=demo-output", "stopping_condition.n_samples=40"])


if __name__ == "__main__":
    sys.exit(main())
