"""Sample naming: what a name is, which names are images or videos, what a frame is called.

Names are relative to the input root with `/` separators; a frame of `video/street.mp4`
is `video/street-000040-mp4.png` (docs/interface.md). A name is text that every output can
hold verbatim: one line of a list, one CSV field, valid UTF-8 in JSON and Parquet. File
names and bucket keys that cannot (a newline, other control characters, bytes that are not
UTF-8) are escaped with backslashes, and the storage layer turns a name back into the file
or key (`escape_name`, `unescape_name`): everything past the listing sees names only.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

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
    999,999 get more digits rather than wrapping. A name too long for a file system or a
    bucket is shortened (`fit_name`)."""
    if not is_video(video_key):
        raise ValueError(f"{video_key}: not a video name")
    stem, extension = video_key.rsplit(".", 1)
    return fit_name(stem, f"-{index:06d}-{extension}.png")


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


# Characters a name cannot hold verbatim: every line break (Python's `splitlines` splits on
# all of these), the other C0 and C1 control characters and DEL, surrogates (how Python
# holds the bytes of a file name that are not UTF-8), and the backslash that escapes.
_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_LONG = {v: k for k, v in _SHORT.items()}
# What `escape_name` writes, one unit each: the inverse reads exactly these back.
_ESCAPE = re.compile(r"\\(?:[\\nrt]|x[89a-f][0-9a-f]|u[0-9a-f]{4})")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode holds it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape_name(raw: str) -> str:
    """The name of a file or key as every output writes it: `\\` for a backslash, `\\n`,
    `\\r`, `\\t`, `\\xHH` for a byte that is not UTF-8, `\\uHHHH` for another control or
    line-break character; everything else verbatim (spaces, quotes, any Unicode, NFC or
    NFD as it is). One-to-one, so two files never share a name."""
    return _UNSAFE.sub(_escape, raw)


def unescape_name(name: str, raw_bytes: bool = True) -> str:
    """The inverse of `escape_name`. `raw_bytes=False` (for bucket keys, which are UTF-8)
    keeps `\\xHH` as those four characters. Anything that is not one of its escapes stays
    as it is, so no name can smuggle in a `/` or a `.`."""

    def one(match: re.Match[str]) -> str:
        text = match.group()
        if text in _LONG:
            return _LONG[text]
        if text[1] == "x":
            return chr(0xDC00 + int(text[2:], 16)) if raw_bytes else text
        char = chr(int(text[2:], 16))
        return char if _UNSAFE.fullmatch(char) and char not in _SHORT else text

    return _ESCAPE.sub(one, name)


def name_problem(name: str) -> str | None:
    """Why a listed name cannot be a sample's, or None. A file name never has these; a
    bucket key can, and such a name would not name one file inside the output (a frame
    exported under `..` would land outside it): it is listed with this reason instead."""
    segments = name.split("/")
    if name.startswith("/"):
        return "unsafe name: starts with /"
    if "" in segments:
        return "unsafe name: an empty segment (//)"
    if ".." in segments or "." in segments:
        return "unsafe name: a . or .. segment"
    if "\x00" in unescape_name(name):
        return "unsafe name: a NUL character"
    return None


# A file name (one segment) holds at most 255 bytes on common file systems; a bucket key
# at most 1024, of which a derived name leaves room for the output's prefix and run folder.
MAX_SEGMENT_BYTES = 255
MAX_NAME_BYTES = 900
_UNIT = re.compile(_ESCAPE.pattern + "|.", re.DOTALL)


def _fits(name: str) -> bool:
    return len(name.encode()) <= MAX_NAME_BYTES and all(
        len(segment.encode()) <= MAX_SEGMENT_BYTES for segment in name.split("/")
    )


def _cut(text: str, max_bytes: int) -> str:
    """The longest start of `text` within `max_bytes`, never splitting an escape."""
    kept, used = [], 0
    for unit in _UNIT.findall(text):
        used += len(unit.encode())
        if used > max_bytes:
            break
        kept.append(unit)
    return "".join(kept)


def fit_name(stem: str, suffix: str) -> str:
    """`stem + suffix` (a name derived from another: a frame's from its video's), shortened
    when a segment would exceed MAX_SEGMENT_BYTES or the whole MAX_NAME_BYTES: the last
    segment of `stem` is cut, and `~` and 8 hex digits of the SHA-256 of `stem` keep it
    unique, e.g. `clips/<first 230 bytes>~1b2c3d4e-000040-mp4.png`. The folders stay
    unless they alone are too long (bucket keys only): the name is then at the top."""
    if _fits(stem + suffix):
        return stem + suffix
    folder, _, base = stem.rpartition("/")
    if folder and not _fits(folder + "/" + "x" * MAX_SEGMENT_BYTES):
        folder = ""
    mark = "~" + hashlib.sha256(stem.encode()).hexdigest()[:8] + suffix
    base = _cut(base, MAX_SEGMENT_BYTES - len(mark.encode()))
    return (folder + "/" if folder else "") + base + mark
