"""Test videos made with PyAV: short, small, with scenes that change, in several codecs and
containers, plus planted corrupt ones (truncated, random bytes, audio only, damaged middle).

Everything is generated (no network, no shipped binaries) and deterministic in content. The
encoders write to a real path because MP4 `faststart` rewrites the file at the end (FFmpeg
reopens it by name; an in-memory output cannot do that).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


@dataclass(frozen=True)
class Spec:
    """How to encode one test video."""

    codec: str
    container: str  # FFmpeg muxer name
    frames: int = 60
    width: int = 96
    height: int = 64
    fps: int = 24
    gop: int = 12  # at most this many frames between keyframes (scene cuts add more)
    options: dict[str, str] = field(default_factory=dict)  # muxer options
    noise: bool = False  # incompressible texture: bytes grow with frames (for byte counts)
    audio_seconds: float = 0.0  # an AAC track too (longer than the video: ends differ)
    first_pts: int = 0  # < 0: MP4 writes an edit list that cuts the first -first_pts frames

    @property
    def decoded_frames(self) -> int:
        """What a plain decode loop yields."""
        return self.frames + min(self.first_pts, 0)


FASTSTART = {"movflags": "+faststart"}

# Valid videos, by name: one per codec/container pair we support in tests. h264 has
# B-frames (decode order != presentation order), so it exercises the pts handling.
VALID: dict[str, Spec] = {
    "clips/street.mp4": Spec("libx264", "mp4", options=FASTSTART),
    "clips/moov-at-end.mp4": Spec("libx264", "mp4", frames=48),
    "clips/old-camera.avi": Spec("mpeg4", "avi", frames=50, gop=10),
    "clips/web.webm": Spec("libvpx-vp9", "webm", frames=48),
    "clips/odd-size.webm": Spec("libvpx-vp9", "webm", frames=30, width=97, height=63),
    "clips/dash-cam-2.mkv": Spec("mjpeg", "matroska", frames=40),
    "clips/broadcast.mpg": Spec("mpeg2video", "mpeg", frames=48),
    "clips/phone.MOV": Spec("libx264", "mov", frames=50, width=128, height=96),
    "clips/with-sound.mkv": Spec("libx264", "matroska", frames=36, audio_seconds=2.5),
    "clips/trimmed.mp4": Spec("libx264", "mp4", frames=40, first_pts=-3, options=FASTSTART),
}


def scene_frames(n: int, width: int, height: int, noise: bool = False) -> Iterator[np.ndarray]:
    """RGB frames of a disc moving over a background that changes colour every 16 frames
    (a scene cut), with a brightness stripe that changes every frame, so no two frames are
    alike and selection has scenes to find."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    for i in range(n):
        scene = i // 16
        background = np.array(
            [(scene * 70) % 256, (scene * 130 + 40) % 256, (scene * 200 + 90) % 256], np.uint8
        )
        image = np.empty((height, width, 3), np.uint8)
        image[:] = background
        cx, cy = (i * 3) % width, height // 2 + int(height / 4 * np.sin(i / 5))
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (height // 6) ** 2
        image[disc] = 255 - background
        image[:, :4] = (i * 5) % 256
        if noise:
            image[height // 2 :] = rng.integers(0, 256, (height - height // 2, width, 3))
        yield image


def write_video(path: Path, spec: Spec) -> Path:
    """Encode `spec` to `path` (the muxer is chosen by `spec.container`, not the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=spec.container, options=spec.options) as container:
        stream = container.add_stream(spec.codec, rate=spec.fps)
        stream.width, stream.height = spec.width, spec.height
        stream.pix_fmt = "yuvj420p" if spec.codec == "mjpeg" else "yuv420p"
        stream.codec_context.gop_size = spec.gop
        stream.codec_context.time_base = Fraction(1, spec.fps)
        if spec.audio_seconds:
            _add_audio(container, spec.audio_seconds)
        for i, image in enumerate(scene_frames(spec.frames, spec.width, spec.height, spec.noise)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i + spec.first_pts, Fraction(1, spec.fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _add_audio(container: av.container.OutputContainer, seconds: float) -> None:
    """Mux `seconds` of a 440 Hz tone as AAC (all of it before the video: the muxer
    interleaves by timestamps)."""
    stream = container.add_stream("aac", rate=44100)
    stream.layout = "mono"
    t = np.arange(int(44100 * seconds)) / 44100
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
    for start in range(0, samples.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples[:, start : start + 1024]), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts = 44100, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def video_bytes(spec: Spec) -> bytes:
    """`spec` encoded, as bytes (through a temporary file, see the module docstring)."""
    with tempfile.TemporaryDirectory() as folder:
        return write_video(Path(folder) / "video", spec).read_bytes()


def long_video(frames: int = 240) -> Spec:
    """A faststart MP4 whose frames are mostly noise, so each frame costs kilobytes and the
    bytes a reader needs are proportional to the frames it touches."""
    return Spec(
        "libx264", "mp4", frames=frames, width=128, height=96, options=FASTSTART, noise=True
    )


def audio_only(seconds: float = 1.0) -> bytes:
    """An MP4 holding one AAC audio stream and no video."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "audio.mp4"
        with av.open(str(path), "w", format="mp4") as container:
            _add_audio(container, seconds)
        return path.read_bytes()


def damaged_middle(data: bytes) -> bytes:
    """A copy whose middle keyframe's data is zeroed: the demuxer still finds every packet
    (the container is intact), the decoder rejects that frame."""
    with av.open(io.BytesIO(data)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size and p.is_keyframe]
    pos, size = packets[len(packets) // 2]
    damaged = bytearray(data)
    damaged[pos : pos + size] = bytes(size)
    return bytes(damaged)


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# Planted corrupt videos: name -> (how to make it from the valid videos' bytes, the start of
# the reason the check must give).
def corrupt_videos(valid: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    street, moov_at_end = valid["clips/street.mp4"], valid["clips/moov-at-end.mp4"]
    web, avi = valid["clips/web.webm"], valid["clips/old-camera.avi"]
    return {
        "corrupt/cut-faststart.mp4": (street[: len(street) * 6 // 10], "truncated:"),
        "corrupt/cut-moov-at-end.mp4": (moov_at_end[: len(moov_at_end) * 6 // 10], "cannot open"),
        "corrupt/cut.webm": (web[: len(web) * 6 // 10], "truncated:"),
        "corrupt/cut.avi": (avi[: len(avi) * 6 // 10], "truncated:"),
        "corrupt/noise.mp4": (random_bytes(), "cannot open video"),
        "corrupt/empty.mp4": (b"", "zero bytes"),
        "corrupt/song.mp4": (audio_only(), "no video stream"),
        "corrupt/damaged.mp4": (damaged_middle(street), "frame "),
    }


def make_video_folder(folder: Path) -> tuple[dict[str, Spec], dict[str, str]]:
    """Write every valid and planted corrupt video under `folder`; returns the valid specs
    and the corrupt names with the start of their expected reasons."""
    valid = {name: write_video(folder / name, spec).read_bytes() for name, spec in VALID.items()}
    expected: dict[str, str] = {}
    for name, (data, reason) in corrupt_videos(valid).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        expected[name] = reason
    return dict(VALID), expected
