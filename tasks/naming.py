"""Sample naming: which keys are images or videos, and what a video frame is called.

Names are relative to the input root with `/` separators; a frame of `video/street.mp4`
is `video/street-000040-mp4.png` (docs/interface.md).
"""

from __future__ import annotations

import posixpath

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"})

VIDEO_EXTENSIONS = frozenset({"mp4", "m4v", "mov", "avi", "mkv", "webm", "mpg", "mpeg"})


def is_image(key: str) -> bool:
    return posixpath.splitext(key)[1].lower().lstrip(".") in IMAGE_EXTENSIONS


def is_sample_source(key: str) -> bool:
    """An image or a video: an object the pipeline takes samples from."""
    return is_image(key) or is_video(key)


def is_video(key: str) -> bool:
    """Whether the key names a video, by extension, case-insensitively. A bare `.mp4` (a
    hidden file, no name) is not one: its frames would have no name to parse back."""
    stem, _, extension = key.rsplit("/", 1)[-1].rpartition(".")
    return bool(stem) and extension.lower() in VIDEO_EXTENSIONS


def frame_name(video_key: str, index: int) -> str:
    """`video/street.mp4`, 40 -> `video/street-000040-mp4.png` (interface.md). Indices past
    999,999 get more digits rather than wrapping."""
    if not is_video(video_key):
        raise ValueError(f"{video_key}: not a video name")
    stem, extension = video_key.rsplit(".", 1)
    return f"{stem}-{index:06d}-{extension}.png"


def parse_frame_name(name: str) -> tuple[str, int] | None:
    """The inverse of `frame_name`: (video key, frame index), or None for any other name.

    Parsed from the right, because a video's own name may contain dashes and digits
    (`cam-2-000001.mp4` has frame `cam-2-000001-000003-mp4.png`); the extension must be a
    video extension (any case) and the index at least six digits."""
    if not name.endswith(".png"):
        return None
    parts = name[: -len(".png")].rsplit("-", 2)
    if len(parts) != 3:
        return None
    stem, digits, extension = parts
    if (
        not stem
        or stem.endswith("/")
        or extension.lower() not in VIDEO_EXTENSIONS
        or len(digits) < 6
        or not digits.isdigit()
        or not digits.isascii()
    ):
        return None
    return f"{stem}.{extension}", int(digits)
