"""Video: which objects are videos, how their frames are named, counted, checked and decoded.

Plain functions over a seekable binary stream (what `Storage.open` returns: a real file for
local storage, a buffered range reader for buckets). PyAV reads the stream through its own
I/O callbacks, so a video is never downloaded to a temporary file, and a seek in the video
becomes a seek in the stream: only the byte ranges a step needs leave the bucket.

What this module decides, and why:

- Frame identity. Frame `i` of a video is the i-th frame a plain PyAV decode loop
  (`enumerate(container.decode(video=0))`) yields, i.e. presentation order from 0, and it is
  named `<video path without extension>-<i, 6 digits>-<extension>.png` (interface.md).
- Counting. The container's frame count is used only when asked and when it can be
  trusted: MP4/MOV and AVI store one (Matroska, WebM and MPEG-PS do not), and it is trusted
  when the index parsed with the header lists every frame and all of them lie inside the
  file (a cut faststart MP4 keeps its full index, a cut AVI its header count); frames an MP4
  edit list cuts are not counted (the decoder drops them). Otherwise packets are demuxed
  without decoding: one packet per frame for every codec we support (VP9 superframes and
  B-frame reordering included), which costs reading the file but no decode.
  The demux pass also records each frame's presentation timestamp (pts) and which frames
  are keyframes (a `FrameTable`): the packets' pts, sorted, are the frames' pts in
  presentation order, so frame index <-> pts is exact, constant frame rate or not. Where
  pts repeat or are missing (FFmpeg's MPEG-PS muxer writes such files) there is no table.
- Random access. `read_frames` seeks to the keyframe at or before each wanted frame (by its
  pts from the table) and decodes forward; a seek is only made when it skips frames that
  decoding forward would have to go through. Every frame decoded after a seek is located by
  its pts in the table; if a seek lands after the wanted frame or a pts is not in the table,
  the remaining frames are read by a plain sequential decode instead, so the result always
  equals the plain loop's frames.
- Corruption (short human reasons, as for images): cannot be opened, no video stream, the
  data ends before what the container declares (truncated: fewer packets than its frame
  count, or packets ending well before its duration), a frame the decoder rejects, frames
  the decoder silently drops, packets the demuxer could not read whole. A truncated file
  takes precedence over the decode error its cut-off last packet causes: "truncated" says
  what happened to the file. The container's own structure tells a cut file from a lying
  header: MP4/MOV top-level boxes, the AVI RIFF size and the Matroska Segment size say
  where the file ends; a file that ends there but holds fewer frames or seconds than its
  header declares says "header declares ...", one that ends before says "truncated ...".
- Memory. Decoding yields one frame at a time (a generator over the demuxer); nothing holds
  all frames of a video. Decoding uses FFmpeg's frame and slice threads ("AUTO").
"""

from __future__ import annotations

import bisect
import contextlib
import io
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Literal, TypeVar

import av
import av.error
import numpy as np
from av.container import InputContainer
from av.packet import Packet
from av.stream import Disposition
from av.video.frame import VideoFrame
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream

from tasks.monitor import step_threads

_Result = TypeVar("_Result")

# A decoded stream may end this much before the duration its container declares without
# being called truncated: timestamps in Matroska are rounded to milliseconds and MPEG
# durations are estimates, so a frame or two of slack keeps valid files valid.
TRUNCATION_SLACK_FRAMES = 2
TRUNCATION_SLACK_FRACTION = 0.01


class VideoError(Exception):
    """A video that cannot be decoded as far as asked; `reason` is the short human string."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FrameTable:
    """Every frame's pts by index (presentation order) and the indices of keyframes."""

    pts: tuple[int, ...]
    keyframes: tuple[int, ...]  # sorted; always starts with 0 when the video has frames

    def keyframe_at_or_before(self, index: int) -> int:
        position = bisect.bisect_right(self.keyframes, index) - 1
        return self.keyframes[max(position, 0)]


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a video's first video stream."""

    width: int
    height: int
    codec: str
    time_base: str  # "1/12288": pts * time_base = seconds
    fps: float | None  # average frame rate
    duration_seconds: float | None
    frame_count: int
    frame_count_source: Literal["metadata", "demux"]
    declared_frames: int | None  # the container's own count (less edit-list cuts) or None
    start_pts: int  # pts of the first frame: its time is 0.0 s
    table: FrameTable | None  # from the demux count; None with metadata or unusable pts

    @property
    def time_base_fraction(self) -> Fraction:
        return Fraction(self.time_base)

    def seconds(self, pts: int) -> float:
        """A pts as seconds since the first frame."""
        return float((pts - self.start_pts) * self.time_base_fraction)


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame and where it is in the video."""

    index: int  # presentation order from 0, as a plain decode loop counts
    pts: int | None
    seconds: float | None  # since the first frame
    rgb: np.ndarray  # H x W x 3 uint8


def _short(exc: BaseException) -> str:
    """An FFmpeg error without its errno and call-site decoration, lower case first."""
    text = (getattr(exc, "strerror", None) or str(exc)).strip()
    text = text[:120] or type(exc).__name__
    return text[0].lower() + text[1:]


def _is_iso_bmff(head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] in (b"ftyp", b"mdat", b"moov", b"wide", b"free")


def _top_level_boxes(stream: BinaryIO, size: int) -> Iterator[tuple[bytes, int]]:
    """(type, end) of an MP4/MOV's top-level boxes, read by seeking to each header; stops
    at a box that runs to the end of the file or cannot be a box."""
    position = 0
    while position + 8 <= size:
        stream.seek(position)
        header = stream.read(16)
        box_size, kind = int.from_bytes(header[:4], "big"), header[4:8]
        if box_size == 1 and len(header) >= 16:
            box_size = int.from_bytes(header[8:16], "big")
        if box_size < 8:  # 0: the box runs to the end of the file
            return
        yield kind, position + box_size
        position += box_size


def _missing_moov(stream: BinaryIO) -> bool:
    """Whether an MP4/MOV's index (`moov`) is absent, which is what cutting a file written
    without faststart does."""
    return all(kind != b"moov" for kind, _ in _top_level_boxes(stream, _stream_size(stream)))


def _ebml_number(data: bytes, position: int) -> tuple[int | None, int]:
    """An EBML variable-size integer at `position`: (value, or None when every value bit
    is set, "unknown"; the position after it)."""
    first = data[position] if position < len(data) else 0
    length = 9 - first.bit_length() if first else 9
    if length > 8 or position + length > len(data):
        raise ValueError("not an EBML number")
    value = first & (0xFF >> length)
    for byte in data[position + 1 : position + length]:
        value = value << 8 | byte
    return (None if value == (1 << (7 * length)) - 1 else value), position + length


def _declared_end(stream: BinaryIO, size: int) -> tuple[int, str] | None:
    """(where the container's own structure says the file ends, what a file cut before
    that is: "truncated AVI ...") for the containers that say so: MP4/MOV (its top-level
    boxes), AVI (the RIFF size), Matroska/WebM (the Segment's size, when known). None for
    others (MPEG-PS has no sizes) and for structures that cannot be followed."""
    stream.seek(0)
    head = stream.read(64)
    if _is_iso_bmff(head):
        last: tuple[bytes, int] | None = None
        for kind, end in _top_level_boxes(stream, size):
            if not all(32 <= byte < 127 for byte in kind):
                break  # not a box: trailing bytes some writers leave
            last = kind, end
        if last is None:
            return None
        return last[1], f"truncated MP4 (ends inside its {last[0].decode()} box)"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        declared = int.from_bytes(head[4:8], "little") + 8
        return (
            (declared, f"truncated AVI ({size:,} of {declared:,} bytes)") if declared > 8 else None
        )
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return _matroska_end(head, size)
    return None


def _matroska_end(head: bytes, size: int) -> tuple[int, str] | None:
    """`_declared_end` of a Matroska/WebM file from its first bytes: the EBML header
    element, then the Segment element's size."""
    cut = (1 << 62, f"truncated Matroska/WebM ({size:,} bytes, inside its header)")
    try:
        header_size, position = _ebml_number(head, 4)
        if header_size is None:
            return None
        position += header_size
        if position + 5 > len(head):  # the file ends before the Segment's size
            return cut if size < 64 else None
        if head[position : position + 4] != b"\x18\x53\x80\x67":  # Segment
            return None
        segment_size, position = _ebml_number(head, position + 4)
    except ValueError:  # cannot be read as EBML: cut inside a number, or not Matroska
        return cut if size < 64 else None
    if segment_size is None:  # "unknown": written live, nothing declared
        return None
    end = position + segment_size
    return end, f"truncated Matroska/WebM ({size:,} of {end:,} bytes)"


@dataclass(frozen=True)
class _Structure:
    """What a container's own structure says of the file: whether it says where the file
    ends at all, and if the file ends before that, the reason."""

    known: bool
    cut: str | None


def _structure(stream: BinaryIO) -> _Structure:
    size = _stream_size(stream)
    declared = _declared_end(stream, size)
    if declared is None:
        return _Structure(False, None)
    end, reason = declared
    return _Structure(True, reason if end > size else None)


MPEG_PACK, MPEG_END = b"\x00\x00\x01\xba", b"\x00\x00\x01\xb9"


def container_cut(stream: BinaryIO) -> str | None:
    """Why a video that fails to open or shows no frames is truncated, when it is: it
    ends before its own structure says, or (MPEG-PS, which declares no sizes) without the
    end code a whole program stream ends with. Only headers and the last bytes are read.
    The end code is only taken as evidence for a file that fails anyway: some writers
    omit it."""
    cut = _structure(stream).cut
    if cut is None:
        size = _stream_size(stream)
        stream.seek(0)
        if stream.read(4) == MPEG_PACK:
            stream.seek(max(0, size - 4))
            if stream.read(4) != MPEG_END:
                cut = "truncated MPEG-PS (no end code)"
    return cut


def _open(stream: BinaryIO) -> InputContainer | str:
    """The container, or why it cannot be opened. Errors of the stream itself (storage
    unreachable, object deleted) are not the video's fault and propagate."""
    stream.seek(0)
    head = stream.read(16)
    if not head:
        return "zero bytes"
    stream.seek(0)  # PyAV's I/O starts at the stream's position
    try:
        return av.open(stream, "r")
    except av.error.FFmpegError as exc:
        if _is_iso_bmff(head) and _missing_moov(stream):
            return "cannot open video: truncated MP4 (no moov index)"
        cut = container_cut(stream)
        if cut is None and isinstance(exc, av.error.EOFError) and _structure(stream).known:
            return "cannot open video: nothing after its headers (no frames)"
        return f"cannot open video: {cut or _short(exc)}"


def _open_or_raise(stream: BinaryIO) -> InputContainer:
    container = _open(stream)
    if isinstance(container, str):
        raise VideoError(container)
    return container


def _video_stream(container: InputContainer) -> VideoStream | None:
    """The first real video stream: cover art (an attached picture) is a one-frame "video"
    stream in MP4/MKV and not the video."""
    for stream in container.streams.video:
        if not stream.disposition & Disposition.attached_pic:
            return stream
    return None


def _prepare(container: InputContainer) -> VideoStream:
    stream = _video_stream(container)
    if stream is None:
        raise VideoError("no video stream")
    # Frame threads (several frames in flight) and slice threads; must be set before the
    # decoder opens, which PyAV does at the first packet.
    stream.codec_context.thread_type = "AUTO"
    return stream


def _declared_seconds(container: InputContainer, stream: VideoStream) -> float | None:
    """How long the container says the video stream is: the stream's own duration (MP4,
    AVI), FFmpeg's per-stream DURATION tag (Matroska/WebM), or the container's duration
    when the video is its only stream (audio may run longer than video)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            pass
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _fps(stream: VideoStream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


@dataclass
class _Span:
    """Where a video stream's packets lie, counted as they are demuxed: how many are
    frames, the smallest pts, and the largest pts + duration (where the data ends)."""

    default_duration: int  # for packets that carry none (`_frame_duration`)
    packets: int = 0
    incomplete: int = 0  # packets the demuxer flags corrupt
    first_pts: int | None = None
    end_pts: int | None = None

    def add(self, packet: Packet) -> bool:
        """Count the packet if it is a frame (`_counts`); returns whether it is one."""
        if not _counts(packet):
            return False
        self.packets += 1
        self.incomplete += packet.is_corrupt
        if packet.pts is not None:
            end = packet.pts + (packet.duration or self.default_duration)
            self.end_pts = end if self.end_pts is None else max(self.end_pts, end)
            first = self.first_pts
            self.first_pts = packet.pts if first is None else min(first, packet.pts)
        return True


@dataclass
class _Demuxed:
    """What a demux pass over the video stream saw."""

    span: _Span
    pts: list[int | None]
    keyframe_pts: list[int]
    error: str | None  # the demuxer failed before the end


def _counts(packet: Packet) -> bool:
    """A packet that is a frame: not the flush packet at the end (no data) and not one
    outside an MP4 edit list (the decoder drops its frame)."""
    return bool(packet.size) and not packet.is_discard


def _demux(container: InputContainer, stream: VideoStream) -> _Demuxed:
    """Read every packet of the video stream without decoding any."""
    seen = _Demuxed(_Span(_frame_duration(stream)), [], [], None)
    try:
        for packet in container.demux(stream):
            if not seen.span.add(packet):
                continue
            seen.pts.append(packet.pts)
            if packet.pts is not None and packet.is_keyframe:
                seen.keyframe_pts.append(packet.pts)
    except av.error.FFmpegError as exc:
        seen.error = f"unreadable after frame {seen.span.packets}: {_short(exc)}"
    return seen


def _frame_duration(stream: VideoStream) -> int:
    """One frame's duration in the stream's time base (for packets that carry none)."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or not stream.time_base:
        return 0
    return round(1 / (rate * stream.time_base))


def _table(seen: _Demuxed) -> FrameTable | None:
    """Index <-> pts for every frame, when every frame has a distinct pts."""
    if seen.span.packets == 0 or any(pts is None for pts in seen.pts):
        return None
    ordered = sorted(pts for pts in seen.pts if pts is not None)
    if len(set(ordered)) != len(ordered):
        return None
    index_of = {pts: index for index, pts in enumerate(ordered)}
    keyframes = sorted({0} | {index_of[pts] for pts in seen.keyframe_pts})
    return FrameTable(tuple(ordered), tuple(keyframes))


def _stream_size(stream: BinaryIO) -> int:
    stream.seek(0, io.SEEK_END)
    return stream.tell()


def _metadata_count(video: VideoStream, file_size: int) -> tuple[int | None, bool]:
    """(frames the container declares, whether that count can be trusted).

    Declared: the container's sample count (`stream.frames`: MP4/MOV sample tables, the AVI
    header) less the samples its index marks as discarded (frames an MP4 edit list cuts;
    the decoder drops them, so a plain loop never yields them). Trusted only when the index
    (parsed with the header, no packet read) lists every declared sample and each lies
    inside the file: a cut faststart MP4 keeps its full index but not the data, and a cut
    AVI keeps its header count but loses its index (written last)."""
    if video.frames <= 0:
        return None, False
    entries = video.index_entries
    if len(entries) != video.frames:
        return video.frames, False
    discarded, inside = 0, file_size > 0
    for entry in entries:
        discarded += entry.is_discard
        inside = inside and entry.pos >= 0 and entry.pos + entry.size <= file_size
    return video.frames - discarded, inside


def probe(stream: BinaryIO, use_metadata: bool = True) -> VideoInfo | str:
    """What the video is, or why it is corrupt. The frame count comes from the container
    when `use_metadata` and its count is trustworthy (see `_metadata_count`), otherwise
    from demuxing every packet (reads the file, decodes nothing), which also gives the
    frame table for `read_frames`."""
    file_size = _stream_size(stream)
    container = _open(stream)
    if isinstance(container, str):
        return container
    with container:
        video = _video_stream(container)
        if video is None:
            return container_cut(stream) or "no video stream"
        codec = video.codec_context.name if video.codec_context else None
        if not codec:
            return "no decoder for the video codec"
        if not video.width or not video.height:
            return "video stream without a picture size"
        declared, trusted = _metadata_count(video, file_size)
        start_pts = video.start_time or 0
        duration = _declared_seconds(container, video)
        table: FrameTable | None = None
        source: Literal["metadata", "demux"]
        if use_metadata and declared and trusted:
            count, source = declared, "metadata"
        else:
            seen = _demux(container, video)
            if seen.error or seen.span.packets == 0:
                # A cut file says so before what its cut does to the demuxer.
                return container_cut(stream) or seen.error or "no video frames"
            count, source, table = seen.span.packets, "demux", _table(seen)
            if table is not None:
                start_pts = table.pts[0]
            span = seen.span
            if span.first_pts is not None and span.end_pts is not None and video.time_base:
                # What the packets span is the truth; headers can be estimates (MPEG-PS).
                duration = float((span.end_pts - span.first_pts) * video.time_base)
        return VideoInfo(
            width=video.width,
            height=video.height,
            codec=codec,
            time_base=str(video.time_base or Fraction(1, 1)),
            fps=_fps(video),
            duration_seconds=duration,
            frame_count=count,
            frame_count_source=source,
            declared_frames=declared,
            start_pts=start_pts,
            table=table,
        )


def frame_table(stream: BinaryIO) -> FrameTable | None:
    """The frame table by a demux pass (for videos counted from metadata); None when the
    video cannot be opened or its pts cannot identify frames."""
    container = _open(stream)
    if isinstance(container, str):
        return None
    with container:
        video = _video_stream(container)
        return None if video is None else _table(_demux(container, video))


def _decoded(
    container: InputContainer, stream: VideoStream, first_index: int = 0
) -> Iterator[VideoFrame]:
    """Decoded frames in presentation order, one at a time; a decoder or demuxer failure is
    a VideoError naming the first frame that did not come out (counting from `first_index`,
    the index of the frame decoding starts at)."""
    produced = first_index
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                produced += 1
                yield frame
    except av.error.FFmpegError as exc:
        raise VideoError(f"frame {produced} fails to decode: {_short(exc)}") from exc


_reformatters = threading.local()


def to_rgb(frame: VideoFrame, size: int | None) -> np.ndarray:
    """The frame as RGB, squashed to `size` x `size` when given (no crop, nothing at the
    borders lost, like images' model inputs). Scaled by swscale while converting from YUV,
    so the full-size RGB frame never exists. One reformatter per thread: it keeps its
    swscale context, which `frame.to_ndarray(width=...)` makes anew for every frame (at
    ~1.5 ms, ten times the conversion itself)."""
    reformatter = getattr(_reformatters, "instance", None)
    if reformatter is None:
        reformatter = _reformatters.instance = VideoReformatter()
    if size is None:
        return reformatter.reformat(frame, format="rgb24").to_ndarray()
    return reformatter.reformat(frame, size, size, "rgb24", interpolation="BILINEAR").to_ndarray()


def decode_frames(
    stream: BinaryIO,
    size: int | None = None,
    every_nth: int = 1,
    start: int = 0,
    stop: int | None = None,
) -> Generator[DecodedFrame, None, None]:
    """Frames `start <= index < stop` whose index is a multiple of `every_nth` (counted
    from the video's first frame, so subsampled names do not depend on `start`), as RGB,
    squashed to `size` x `size` when given. Lazy: decoding stops where the caller stops
    (and at `stop`). Frames before `start` are decoded and dropped: an index is only known
    by counting (use `read_frames` with a frame table to jump). Raises VideoError when the
    video cannot be opened or a frame fails to decode (the frames before it are yielded)."""
    if every_nth < 1:
        raise ValueError(f"every_nth must be >= 1, got {every_nth}")
    container = _open_or_raise(stream)
    with container:
        video = _prepare(container)
        time_base = video.time_base or Fraction(1, 1)
        first: int | None = None
        for index, frame in enumerate(_decoded(container, video)):
            if stop is not None and index >= stop:
                return
            pts = frame.pts
            if first is None and pts is not None:
                first = pts
            if index < start or index % every_nth:
                continue
            seconds = None if pts is None or first is None else float((pts - first) * time_base)
            yield DecodedFrame(index, pts, seconds, to_rgb(frame, size))


def check_video(
    stream: BinaryIO,
    declared_frames: int | None,
    on_frame: Callable[[int, VideoFrame], None] | None = None,
) -> tuple[int, str | None]:
    """Decode every frame: (frames decoded before the first failure, reason or None).

    `declared_frames` is what the video claims (the container's count from `probe`); pass
    None when it has none, and the container's declared duration is the measure instead.
    `on_frame(index, frame)` sees each frame that decodes, in presentation order (the
    plain loop's indices), so one pass both checks a video and uses its frames. It runs on
    this thread while the decoder is fed on another (`_decode_ahead`); an exception it
    raises stops the decoding and propagates."""
    structure = _structure(stream)  # headers only, before the decoder moves the stream
    container = _open(stream)
    if isinstance(container, str):
        return 0, container
    with container:
        video = _video_stream(container)
        if video is None:
            return 0, structure.cut or "no video stream"
        video.codec_context.thread_type = "AUTO"
        if on_frame is None:
            return _check_pass(container, video, declared_frames, structure, lambda frame: None)
        return _decode_ahead(
            lambda emit: _check_pass(container, video, declared_frames, structure, emit),
            on_frame,
        )


def _check_pass(
    container: InputContainer,
    video: VideoStream,
    declared_frames: int | None,
    structure: _Structure,
    emit: Callable[[VideoFrame], None],
) -> tuple[int, str | None]:
    """`check_video`'s decode loop, handing each decoded frame to `emit`. When the data
    ends before what the header declares, the file is truncated, unless its structure
    shows it whole: then the header is what is wrong."""
    decoded, decode_error = 0, None
    span = _Span(_frame_duration(video))
    try:
        for packet in container.demux(video):
            span.add(packet)
            if decode_error is None:
                # After the first failure only demux (cheap): enough to tell a cut file
                # from a damaged one.
                try:
                    for frame in packet.decode():
                        emit(frame)
                        decoded += 1
                except av.error.FFmpegError as exc:
                    decode_error = f"frame {decoded} fails to decode: {_short(exc)}"
    except av.error.FFmpegError as exc:
        unreadable = f"unreadable after frame {span.packets}: {_short(exc)}"
        return decoded, f"{structure.cut}, {unreadable}" if structure.cut else unreadable
    packets = span.packets
    whole = structure.known and structure.cut is None
    if declared_frames and packets < declared_frames:
        if whole:
            return decoded, f"header declares {declared_frames} frames, the data holds {packets}"
        return decoded, f"truncated: {decoded} of {declared_frames} frames decode"
    cut_short = _cut_short(container, video, span.first_pts, span.end_pts)
    if cut_short is not None:
        ends_at, declared_seconds = cut_short
        if whole:
            return decoded, (
                f"header declares {declared_seconds:.1f} s, the frames end at {ends_at:.1f} s"
            )
        expected = round(declared_seconds * (_fps(video) or 0))
        if expected > packets:
            return decoded, f"truncated: {decoded} of about {expected} frames decode"
        return decoded, f"truncated: frames end at {ends_at:.1f} of {declared_seconds:.1f} s"
    if structure.cut:
        return decoded, f"{structure.cut}: {decoded} frames decode"
    if span.incomplete:
        # The demuxer flags a packet whose data it could not read whole (a cut MPEG-PS).
        return decoded, f"truncated or damaged: {span.incomplete} of {packets} packets incomplete"
    if decode_error:
        return decoded, decode_error
    if decoded < packets:
        # The frame-threaded decoder can drop a broken frame without an error.
        return decoded, f"{packets - decoded} of {packets} frames fail to decode"
    if decoded == 0:
        return 0, "no video frames"
    return decoded, None


# Decoded frames waiting for the consumer at most: each holds one of the decoder's picture
# buffers (3 MB at 1080p), and a few suffice to keep both threads busy.
FRAMES_AHEAD = 8


class _Stopped(Exception):
    """The consumer of `_decode_ahead` failed: the decoding thread stops."""


def _decode_ahead(
    produce: Callable[[Callable[[VideoFrame], None]], _Result],
    consume: Callable[[int, VideoFrame], None],
) -> _Result:
    """`produce(emit)` (a decode loop handing each frame to `emit`) on a thread of its own,
    `consume(index, frame)` on this one, at most FRAMES_AHEAD frames apart; returns what
    `produce` returns. FFmpeg's frame threads decode only as far as the thread feeding
    them packets has come, so with Python work per frame on that same thread the decoder
    waits for it; here it does not (measured on 2 vCPUs: 20% more frames/s). Errors of
    either side propagate; the consumer's stops the producer."""
    frames: queue.Queue[VideoFrame | None] = queue.Queue(FRAMES_AHEAD)
    stopped = threading.Event()
    outcome: list[_Result] = []
    failure: list[BaseException] = []

    def put(frame: VideoFrame | None) -> None:
        while not stopped.is_set():
            try:
                frames.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    adopt = step_threads()  # the decoding counts for the calling step (the monitor)

    def run() -> None:
        if adopt is not None:
            adopt()
        try:
            outcome.append(produce(put))
        except BaseException as exc:  # handed to the consumer's thread
            failure.append(exc)
        finally:
            with contextlib.suppress(_Stopped):
                put(None)

    thread = threading.Thread(target=run, name="video-decode", daemon=True)
    thread.start()
    try:
        index = 0
        while (frame := frames.get()) is not None:
            consume(index, frame)
            index += 1
    finally:
        stopped.set()
        thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _cut_short(
    container: InputContainer, stream: VideoStream, first: int | None, end: int | None
) -> tuple[float, float] | None:
    """(where the packets end, the declared duration) in seconds when they end clearly
    before the container says the video does, else None."""
    declared = _declared_seconds(container, stream)
    if declared is None or first is None or end is None or not stream.time_base:
        return None
    fps = _fps(stream) or 25.0
    ends_at = float((end - first) * stream.time_base)
    slack = max(TRUNCATION_SLACK_FRAMES / fps, TRUNCATION_SLACK_FRACTION * declared)
    return (ends_at, declared) if ends_at < declared - slack else None


def read_frames(
    stream: BinaryIO, indices: Iterable[int], table: FrameTable | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, full-resolution RGB) for each wanted frame, in ascending index order, once
    each, decoding only from the keyframe before a wanted frame up to it.

    `table` is `probe(...).table` (or `frame_table(...)`); without it a demux pass builds
    one first (reads the file once, decodes nothing). A video whose pts cannot identify its
    frames is decoded sequentially. Raises VideoError when the video cannot be opened or a
    needed frame fails to decode, IndexError for an index past the last frame."""
    wanted = sorted(set(indices))
    if not wanted:
        return
    if wanted[0] < 0:
        raise IndexError(f"frame {wanted[0]} does not exist")
    container = _open_or_raise(stream)
    with container:
        video = _prepare(container)
        if table is None:
            table = _table(_demux(container, video))
        if table is None:
            yield from _sequential(stream, wanted)
            return
        if wanted[-1] >= len(table.pts):
            raise IndexError(f"frame {wanted[-1]} of a video of {len(table.pts)} frames")
        yield from _seeking(stream, container, video, wanted, table)


def _seek(
    container: InputContainer, stream: VideoStream, table: FrameTable, keyframe: int
) -> Iterator[VideoFrame]:
    """Decoded frames from the keyframe at or before the given one's pts. Seeking to the
    keyframe's own pts rather than the wanted frame's: MP4 indexes by decode time, and the
    next keyframe's decode time can precede a wanted B-frame's presentation time (the seek
    would land after it), but a keyframe's decode time never follows its own pts."""
    container.seek(table.pts[keyframe], stream=stream, backward=True, any_frame=False)
    return _decoded(container, stream, keyframe)


def _seeking(
    source: BinaryIO,
    container: InputContainer,
    stream: VideoStream,
    wanted: list[int],
    table: FrameTable,
) -> Iterator[tuple[int, np.ndarray]]:
    index_of = {pts: index for index, pts in enumerate(table.pts)}
    frames: Iterator[VideoFrame] | None = None
    position = -1  # index of the frame decoded last
    for n, target in enumerate(wanted):
        keyframe = table.keyframe_at_or_before(target)
        # Seek when the keyframe lies beyond the next frame the decoder would produce:
        # decoding forward would go through frames the seek skips. Consecutive or close
        # wanted frames within one GOP are decoded forward without seeking.
        fresh = frames is None or keyframe > position + 1
        if fresh:
            frames = _seek(container, stream, table, keyframe)
        assert frames is not None
        while True:
            frame = next(frames, None)
            index = None if frame is None or frame.pts is None else index_of.get(frame.pts)
            if frame is not None and fresh and index is not None and index > target:
                # The seek landed after the wanted frame: try the keyframe before, until
                # the first one (whose pts is the video's smallest).
                if keyframe == table.keyframes[0]:
                    index = None
                else:
                    keyframe = table.keyframe_at_or_before(keyframe - 1)
                    frames = _seek(container, stream, table, keyframe)
                    continue
            if frame is None or index is None or index > target:
                # Lost track of where we are (end of data, a pts not in the table, a frame
                # skipped): the plain loop's order is the definition, so fall back to it.
                yield from _sequential(source, wanted[n:])
                return
            fresh = False
            position = index
            if index == target:
                yield index, frame.to_ndarray(format="rgb24")
                break


def _sequential(source: BinaryIO, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """The plain decode loop over a freshly opened container, keeping the wanted frames.
    Reopening (rather than seeking to the start) makes this the plain loop by definition."""
    remaining = iter(wanted)
    target = next(remaining, None)
    with _open_or_raise(source) as container:
        for index, frame in enumerate(_decoded(container, _prepare(container))):
            if target is None:
                return
            if index == target:
                yield index, frame.to_ndarray(format="rgb24")
                target = next(remaining, None)
                if target is None:
                    return  # decoding on could hit a damaged frame after the last one wanted
    if target is not None:
        raise IndexError(f"frame {target} does not exist")
