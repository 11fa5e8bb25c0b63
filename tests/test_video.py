"""Videos: naming, counting, checking, lazy downscaled decoding and random frame access.

The reference for every frame is a plain PyAV loop:
`for i, f in enumerate(container.decode(video=0)): f.to_ndarray(format="rgb24")`.
"""

from __future__ import annotations

import io
import itertools
import threading
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import pytest
from hostile_files import video_cases
from videos import VALID, long_video, make_video_folder, video_bytes, write_video

from tasks import video
from tasks.naming import frame_name, is_video, parse_frame_name
from tasks.storage import open_ranges, open_storage
from tasks.video import (
    FrameTable,
    VideoError,
    check_video,
    decode_frames,
    frame_table,
    probe,
    read_frames,
)

LONG = "long/noise.mp4"


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Every valid and planted corrupt test video, plus a long one; (folder, expected
    reason starts of the corrupt ones)."""
    folder = tmp_path_factory.mktemp("videos")
    _, expected = make_video_folder(folder)
    write_video(folder / LONG, long_video())
    return folder, expected


def plain_loop(path: Path) -> list[np.ndarray]:
    """The reference frames; for a broken video, those before the first decode error."""
    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.InvalidDataError:
            pass
    return frames


def verdict(path: Path) -> str | None:
    """The corrupt reason of the full check (probe, then decode everything), or None."""
    with path.open("rb") as stream:
        info = probe(stream, use_metadata=True)
        if isinstance(info, str):
            return info
        return check_video(stream, info.declared_frames)[1]


# --- names ---------------------------------------------------------------------------


def test_video_extensions_are_recognised_in_any_case() -> None:
    for key in ["a.mp4", "b/c.M4V", "x.MOV", "y.avi", "z.mkv", "w.WebM", "v.mpg", "u.mpeg"]:
        assert is_video(key), key
    for key in ["a.jpg", "mp4", "dir.mp4/readme", "b/c.mp4.txt", "noext", "dir/.mp4"]:
        assert not is_video(key), key


def test_frame_name_follows_the_interface_example() -> None:
    assert frame_name("video/street.mp4", 40) == "video/street-000040-mp4.png"
    assert frame_name("a.MOV", 1_234_567) == "a-1234567-MOV.png"
    with pytest.raises(ValueError):
        frame_name("photos/a.jpg", 0)


@pytest.mark.parametrize(
    "key",
    ["video/street.mp4", "cam-2-000001.mp4", "a/b-c/x.tar.MKV", "2024-01-01/12-00.webm", "v.mpeg"],
)
def test_parse_frame_name_inverts_frame_name_even_with_dashes_and_digits(key: str) -> None:
    for index in (0, 7, 40, 999_999, 1_000_000):
        assert parse_frame_name(frame_name(key, index)) == (key, index)


def test_parse_frame_name_rejects_names_that_are_not_video_frames() -> None:
    for name in [
        "photos/a.png",
        "video/street-000040-jpg.png",  # not a video extension
        "video/street-40-mp4.png",  # fewer than 6 digits
        "video/street-000040-mp4.jpg",
        "-000040-mp4.png",  # no video name
        "dir/-000040-mp4.png",
        "street-00004x-mp4.png",
    ]:
        assert parse_frame_name(name) is None, name


# --- counting --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALID))
def test_demuxed_frame_count_matches_the_decoded_frames_for_every_codec(
    videos: tuple[Path, dict[str, str]], name: str
) -> None:
    path = videos[0] / name
    with path.open("rb") as stream:
        info = probe(stream, use_metadata=False)
    assert not isinstance(info, str), info
    assert info.frame_count_source == "demux"
    assert info.frame_count == len(plain_loop(path)) == VALID[name].decoded_frames
    assert (info.width, info.height) == (VALID[name].width, VALID[name].height)
    assert info.fps == pytest.approx(VALID[name].fps)
    seconds = VALID[name].decoded_frames / VALID[name].fps
    assert info.duration_seconds == pytest.approx(seconds, abs=0.05)


@pytest.mark.parametrize("name", sorted(VALID))
def test_metadata_count_is_used_when_asked_and_present_and_equals_the_decoded_count(
    videos: tuple[Path, dict[str, str]], name: str
) -> None:
    path = videos[0] / name
    with path.open("rb") as stream:
        info = probe(stream, use_metadata=True)
    assert not isinstance(info, str), info
    assert info.frame_count == len(plain_loop(path)) == VALID[name].decoded_frames
    container_stores_a_count = VALID[name].container in ("mp4", "mov", "avi")
    assert info.frame_count_source == ("metadata" if container_stores_a_count else "demux")
    assert (info.declared_frames is not None) == container_stores_a_count
    if container_stores_a_count:
        assert info.table is None  # the metadata path reads no packets


def test_metadata_count_reads_only_the_header_of_a_faststart_mp4(
    videos: tuple[Path, dict[str, str]],
) -> None:
    # The storage layer counts every byte read through the streams it opens.
    size = (videos[0] / LONG).stat().st_size
    by_metadata, by_demux = open_storage(str(videos[0])), open_storage(str(videos[0]))
    with by_metadata.open(LONG) as stream:
        assert not isinstance(probe(stream, use_metadata=True), str)
    with by_demux.open(LONG) as stream:
        assert not isinstance(probe(stream, use_metadata=False), str)
    assert by_metadata.bytes_read < size // 10
    assert by_demux.bytes_read >= size


def test_metadata_count_of_a_cut_faststart_mp4_is_distrusted_and_the_check_says_truncated(
    videos: tuple[Path, dict[str, str]],
) -> None:
    # The index (at the front) still lists all 60 frames; most of their data is gone.
    path = videos[0] / "corrupt/cut-faststart.mp4"
    with path.open("rb") as stream:
        info = probe(stream, use_metadata=True)
        assert not isinstance(info, str)
        assert info.declared_frames == VALID["clips/street.mp4"].frames
        assert info.frame_count_source == "demux" and info.frame_count < info.declared_frames
        decoded, reason = check_video(stream, info.declared_frames)
    assert decoded == len(plain_loop(path))
    assert reason == f"truncated: {decoded} of {info.declared_frames} frames decode"


def test_metadata_count_leaves_out_frames_an_mp4_edit_list_cuts(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "clips/trimmed.mp4"
    with av.open(str(path)) as container:
        samples = container.streams.video[0].frames
    with path.open("rb") as stream:
        info = probe(stream, use_metadata=True)
    assert not isinstance(info, str) and info.frame_count_source == "metadata"
    assert samples == VALID["clips/trimmed.mp4"].frames  # what the container stores
    assert info.frame_count == info.declared_frames == len(plain_loop(path)) < samples


def test_frame_table_lists_every_frame_pts_in_presentation_order(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "clips/street.mp4"  # h264 with B-frames: decode order differs
    with path.open("rb") as stream:
        table = frame_table(stream)
    with av.open(str(path)) as container:
        decoded = [(frame.pts, frame.key_frame) for frame in container.decode(video=0)]
    assert table is not None
    assert list(table.pts) == [pts for pts, _ in decoded]
    assert list(table.keyframes) == [i for i, (_, key) in enumerate(decoded) if key]
    assert len(table.keyframes) >= 4  # several GOPs


# --- corruption ------------------------------------------------------------------------


def test_every_planted_corrupt_video_gets_its_reason(
    videos: tuple[Path, dict[str, str]],
) -> None:
    folder, expected = videos
    reasons = {name: verdict(folder / name) for name in expected}
    for name, start in expected.items():
        reason = reasons[name]
        assert reason is not None and reason.startswith(start), (name, reason)
        assert len(reason) < 100, reason  # short and human
    assert reasons["corrupt/cut-moov-at-end.mp4"] == (
        "cannot open video: truncated MP4 (no moov index)"
    )
    assert reasons["corrupt/cut.webm"].startswith("truncated: 24 of about 48 frames")


@pytest.mark.parametrize("name", sorted(VALID) + [LONG])
def test_no_valid_video_gets_a_reason(videos: tuple[Path, dict[str, str]], name: str) -> None:
    assert verdict(videos[0] / name) is None


def test_check_counts_the_frames_that_decode_before_a_damaged_one(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "corrupt/damaged.mp4"
    with path.open("rb") as stream:
        decoded, reason = check_video(stream, 60)
    assert reason == f"frame {decoded} fails to decode: invalid data found when processing input"
    assert 0 < decoded < 60
    with path.open("rb") as stream:
        frames = decode_frames(stream, size=16)
        with pytest.raises(VideoError, match="fails to decode"):
            for _ in frames:
                pass


def test_a_damaged_video_decodes_its_frames_up_to_the_damage(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "corrupt/damaged.mp4"
    with path.open("rb") as stream:
        decoded, _ = check_video(stream, 60)
    got: list[int] = []
    with path.open("rb") as stream, pytest.raises(VideoError):
        got.extend(frame.index for frame in decode_frames(stream, size=16))
    assert got == list(range(decoded))


def test_storage_errors_are_not_corrupt_reasons() -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            raise ConnectionError("bucket went away")

        def seek(self, offset: int, whence: int = 0) -> int:
            return 0

    with pytest.raises(ConnectionError):
        probe(Broken(), use_metadata=True)  # type: ignore[arg-type]


def test_check_video_raises_what_the_storage_raises_midway_on_its_decode_thread(
    videos: tuple[Path, dict[str, str]],
) -> None:
    data = (videos[0] / LONG).read_bytes()

    class GoneMidway(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:  # what PyAV calls
            if self.tell() > len(data) // 2:
                raise ConnectionError("bucket went away")
            return super().read(size)

    seen: list[int] = []
    with pytest.raises(ConnectionError):
        check_video(GoneMidway(data), None, lambda index, frame: seen.append(index))
    assert seen == list(range(len(seen))) and 0 < len(seen) < 240


def test_an_error_of_on_frame_stops_the_decoding_and_propagates(
    videos: tuple[Path, dict[str, str]],
) -> None:
    def on_frame(index: int, frame: av.VideoFrame) -> None:
        if index == 5:
            raise OSError("output full")

    before = threading.active_count()
    with (videos[0] / LONG).open("rb") as stream, pytest.raises(OSError, match="output full"):
        check_video(stream, None, on_frame)
    assert threading.active_count() == before  # the decode thread has ended


# --- decoding --------------------------------------------------------------------------


def test_decode_frames_downscales_to_a_square_and_matches_the_full_frames_roughly(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "clips/phone.MOV"
    full = plain_loop(path)
    with path.open("rb") as stream:
        frames = list(decode_frames(stream, size=24))
    assert [f.index for f in frames] == list(range(len(full)))
    for frame, reference in zip(frames, full, strict=True):
        assert frame.rgb.shape == (24, 24, 3) and frame.rgb.dtype == np.uint8
        means = frame.rgb.reshape(-1, 3).mean(0), reference.reshape(-1, 3).mean(0)
        assert np.abs(means[0] - means[1]).max() < 8
    assert frames[0].seconds == 0.0
    assert frames[24].seconds == pytest.approx(1.0)


def test_decode_frames_without_size_equals_the_plain_loop(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "clips/street.mp4"
    with path.open("rb") as stream:
        frames = [frame.rgb for frame in decode_frames(stream)]
    assert all(np.array_equal(a, b) for a, b in zip(frames, plain_loop(path), strict=True))


def test_decode_frames_is_lazy_taking_three_frames_reads_a_small_part_of_the_file(
    videos: tuple[Path, dict[str, str]],
) -> None:
    size = (videos[0] / LONG).stat().st_size
    storage = open_storage(str(videos[0]))
    with storage.open(LONG) as stream:
        first = list(itertools.islice(decode_frames(stream, size=32), 3))
    assert [f.index for f in first] == [0, 1, 2]
    assert storage.bytes_read < size // 10, (storage.bytes_read, size)


def test_every_nth_start_and_stop_select_frames_by_absolute_index(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "clips/web.webm"
    with path.open("rb") as stream:
        assert [f.index for f in decode_frames(stream, 8, every_nth=5)] == list(range(0, 48, 5))
    with path.open("rb") as stream:
        picked = [f.index for f in decode_frames(stream, 8, every_nth=4, start=10, stop=30)]
    assert picked == [12, 16, 20, 24, 28]
    with pytest.raises(ValueError):
        next(decode_frames(io.BytesIO(b"x"), 8, every_nth=0))  # type: ignore[arg-type]


# --- random access ---------------------------------------------------------------------


def scattered(n: int) -> list[int]:
    """First, mid-GOP, a consecutive run across a GOP boundary, the middle, the last."""
    return sorted({0, 5, 11, 12, 13, 14, 15, 16, 17, n // 2, n - 3, n - 1})


@pytest.mark.parametrize("name", sorted(VALID))
def test_read_frames_is_pixel_identical_to_the_plain_loop(
    videos: tuple[Path, dict[str, str]], name: str
) -> None:
    path = videos[0] / name
    reference = plain_loop(path)
    wanted = scattered(len(reference))
    with path.open("rb") as stream:
        info = probe(stream, use_metadata=False)
        assert not isinstance(info, str)
        got = list(read_frames(stream, wanted, info.table))
    assert [index for index, _ in got] == wanted
    for index, rgb in got:
        assert np.array_equal(rgb, reference[index]), (name, index)


def test_read_frames_builds_its_own_table_when_given_none(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "clips/moov-at-end.mp4"
    reference = plain_loop(path)
    with path.open("rb") as stream:
        got = dict(read_frames(stream, [47, 3, 30, 3]))  # any order, duplicates
    assert sorted(got) == [3, 30, 47]
    assert all(np.array_equal(rgb, reference[i]) for i, rgb in got.items())


def test_read_frames_with_a_wrong_table_falls_back_to_the_plain_loop(
    videos: tuple[Path, dict[str, str]],
) -> None:
    path = videos[0] / "clips/street.mp4"
    reference = plain_loop(path)
    with path.open("rb") as stream:
        table = frame_table(stream)
        assert table is not None
        shifted = FrameTable(tuple(p + 1 for p in table.pts), table.keyframes)
        got = list(read_frames(stream, [2, 40, 59], shifted))
    assert [i for i, _ in got] == [2, 40, 59]
    assert all(np.array_equal(rgb, reference[i]) for i, rgb in got)


def test_read_frames_decodes_consecutive_frames_without_seeking_again(
    videos: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    seeks: list[int] = []
    real_seek = video._seek

    def counting_seek(*args: object) -> object:
        seeks.append(args[-1])  # type: ignore[arg-type]
        return real_seek(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(video, "_seek", counting_seek)
    path = videos[0] / "clips/street.mp4"
    with path.open("rb") as stream:
        table = frame_table(stream)
        assert table is not None and 16 in table.keyframes
        assert [i for i, _ in read_frames(stream, [13, 14, 15, 16, 17], table)] == [
            13,
            14,
            15,
            16,
            17,
        ]
        assert seeks == [table.keyframe_at_or_before(13)]
        seeks.clear()
        far = table.keyframes[-1] + 1
        assert [i for i, _ in read_frames(stream, [1, far], table)] == [1, far]
        assert seeks == [0, table.keyframes[-1]]


def test_read_frames_retries_from_an_earlier_keyframe_when_a_seek_lands_too_late(
    videos: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some demuxers seek by decode time and land on the next keyframe: simulate one.
    real_seek = video._seek
    landed: list[int] = []

    def late_seek(container: object, stream: object, table: FrameTable, keyframe: int) -> object:
        later = [k for k in table.keyframes if k > keyframe]
        where = later[0] if later and not landed else keyframe
        landed.append(where)
        return real_seek(container, stream, table, where)  # type: ignore[arg-type]

    monkeypatch.setattr(video, "_seek", late_seek)
    path = videos[0] / "clips/street.mp4"
    reference = plain_loop(path)
    with path.open("rb") as stream:
        table = frame_table(stream)
        assert table is not None
        got = list(read_frames(stream, [14, 15], table))
    assert [i for i, _ in got] == [14, 15]
    assert all(np.array_equal(rgb, reference[i]) for i, rgb in got)
    assert landed == [16, 0]  # too late, then from the keyframe before the one asked for


@pytest.mark.parametrize("reader", ["local file", "bucket-style range reader"])
def test_read_frames_near_the_end_reads_far_fewer_bytes_than_the_file_from_storage(
    videos: tuple[Path, dict[str, str]], reader: str
) -> None:
    folder = videos[0]
    storage = open_storage(str(folder))
    size = (folder / LONG).stat().st_size

    def opened() -> BinaryIO:
        if reader == "local file":
            return storage.open(LONG)
        # What buckets use: each request fetches at least a buffer's worth of bytes.
        return open_ranges(storage, LONG, size, buffer_size=64 << 10)

    with opened() as stream:
        info = probe(stream, use_metadata=False)
    assert not isinstance(info, str)
    assert storage.bytes_read >= size  # the demux count read it all once
    wanted = [info.frame_count - 10, info.frame_count - 9, info.frame_count - 1]
    before = storage.bytes_read
    with opened() as stream:
        got = list(read_frames(stream, wanted, info.table))
    read = storage.bytes_read - before
    assert read < size // 4, (read, size)
    reference = plain_loop(folder / LONG)
    assert [i for i, _ in got] == wanted
    assert all(np.array_equal(rgb, reference[i]) for i, rgb in got)


def test_read_frames_rejects_indices_past_the_end(videos: tuple[Path, dict[str, str]]) -> None:
    with (videos[0] / "clips/web.webm").open("rb") as stream, pytest.raises(IndexError):
        list(read_frames(stream, [3, 48]))


def test_videos_in_memory_work_too() -> None:
    data = video_bytes(VALID["clips/dash-cam-2.mkv"])
    stream: BinaryIO = io.BytesIO(data)
    info = probe(stream, use_metadata=True)
    assert not isinstance(info, str) and info.codec == "mjpeg" and info.frame_count == 40
    assert [i for i, _ in read_frames(stream, [39], info.table)] == [39]


HOSTILE_VIDEOS = video_cases()


@pytest.mark.parametrize("name", sorted(HOSTILE_VIDEOS))
def test_every_hostile_video_gets_its_outcome_from_the_check(name: str) -> None:
    make, outcome = HOSTILE_VIDEOS[name]
    stream = io.BytesIO(make())
    info = probe(stream, use_metadata=False)
    if isinstance(info, str):
        reason: str | None = info
    else:
        _, reason = check_video(stream, info.declared_frames)
    if outcome == "ok":
        assert reason is None
    else:
        assert reason is not None and outcome in reason, reason
