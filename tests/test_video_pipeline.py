"""Videos through the whole pipeline: frames as samples, corrupt videos, exported frames,
sequences; locally and from the S3 server.

The input holds the test videos of `videos.py` (several codecs and containers, with scene
cuts), their planted corrupt copies, and a few images next to them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from videos import VALID, make_video_folder

from flows.demo import digit_images, encode
from tasks.frames import SAMPLE_BYTES, frame_crc
from tasks.naming import frame_name, parse_frame_name

IMAGES = 3


@pytest.fixture(scope="module")
def video_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("videos") / "input"
    _, expected = make_video_folder(folder)
    images, _ = digit_images()
    for i in range(IMAGES):
        (folder / "stills" / f"digit-{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (folder / "stills" / f"digit-{i}.png").write_bytes(encode(images[i * 7], "PNG"))
    return folder, expected


def plain_frames(path: Path) -> list[np.ndarray]:
    """What a plain PyAV decode loop yields: the definition of a video's frames."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _run(tmp_path_factory: pytest.TempPathFactory, input_url: str, *args: str) -> Path:
    from flows.curate import curate
    from tasks.config import load_config

    output = tmp_path_factory.mktemp("video-out")
    overrides = [f"input={input_url}", f"output={output}", "num_workers=2", *args]
    return Path(curate(**load_config(None, overrides).sections()))


@pytest.fixture(scope="module")
def video_run(video_input, tmp_path_factory, prefect_server) -> Path:
    folder, _ = video_input
    return _run(tmp_path_factory, str(folder), "stopping_condition.n_samples=12")


def _metadata(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "data" / "metadata.parquet")


def _corrupt_videos(run: Path) -> dict[str, str]:
    info = json.loads((run / "corruptness_check_information.json").read_text())
    return info["corrupt_videos"]


def test_every_frame_of_every_valid_video_is_a_sample_counted_right(
    video_run: Path, video_input: tuple[Path, dict[str, str]]
) -> None:
    folder, _ = video_input
    metadata = _metadata(video_run)
    videos = json.loads((video_run / "data" / "videos.json").read_text())
    for name in VALID:
        decoded = len(plain_frames(folder / name))
        frames = metadata[metadata["video"] == name]
        assert videos[name]["frame_count"] == decoded, name
        assert videos[name]["decoded_frames"] == decoded, name
        assert frames["frame_index"].tolist() == list(range(decoded)), name
        assert frames["filename"].tolist() == [frame_name(name, i) for i in range(decoded)]
    assert metadata["video"].isna().sum() == IMAGES
    counts = json.loads((video_run / "report.json").read_text())["counts"]
    assert counts["frames"] == sum(len(plain_frames(folder / name)) for name in VALID)
    assert counts["videos"] == len(videos)


def test_every_planted_corrupt_video_is_flagged_and_no_valid_one(
    video_run: Path, video_input: tuple[Path, dict[str, str]]
) -> None:
    _, expected = video_input
    reasons = _corrupt_videos(video_run)
    assert set(reasons) == set(expected)
    for name, start in expected.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    metadata = _metadata(video_run)
    # By default no frame of a corrupt video is a sample.
    assert not metadata["video"].isin(list(expected)).any()
    corrupt_list = (video_run / "filenames" / "corrupt_filenames.txt").read_text().split()
    assert corrupt_list == sorted(expected)


def test_selected_frames_are_exported_as_pngs_identical_to_the_plain_loop(
    video_run: Path, video_input: tuple[Path, dict[str, str]]
) -> None:
    folder, _ = video_input
    selected = (video_run / "filenames" / "selected_filenames.txt").read_text().split()
    frames = [name for name in selected if parse_frame_name(name)]
    assert len(selected) == 12 and frames
    decoded: dict[str, list[np.ndarray]] = {}
    for name in frames:
        parsed = parse_frame_name(name)
        assert parsed is not None
        video, index = parsed
        decoded.setdefault(video, plain_frames(folder / video))
        exported = np.asarray(Image.open(video_run / "selected" / name))
        assert np.array_equal(exported, decoded[video][index]), name
    # Only video frames are exported: images are files already.
    exported_files = {
        p.relative_to(video_run / "selected").as_posix()
        for p in (video_run / "selected").rglob("*.png")
    }
    assert exported_files == set(frames)


def test_options_subsample_count_from_metadata_and_keep_decodable_frames(
    video_input, tmp_path_factory, prefect_server
) -> None:
    folder, expected = video_input
    run = _run(
        tmp_path_factory,
        str(folder),
        "stopping_condition.n_samples=5",
        "every_nth_frame=4",
        "datasource.use_frame_count_metadata=true",
        "corruptness_check.keep_decodable_frames=true",
    )
    metadata = _metadata(run)
    videos = json.loads((run / "data" / "videos.json").read_text())
    street = metadata[metadata["video"] == "clips/street.mp4"]
    assert street["frame_index"].tolist() == list(range(0, 60, 4))
    assert videos["clips/street.mp4"]["frame_count_source"] == "metadata"
    assert videos["clips/street.mp4"]["frame_count"] == 60
    assert videos["clips/web.webm"]["frame_count_source"] == "demux"  # WebM stores none
    # The damaged video is still reported, and its frames before the damage are kept.
    reasons = _corrupt_videos(run)
    assert set(reasons) == set(expected)
    damaged = metadata[metadata["video"] == "corrupt/damaged.mp4"]["frame_index"].tolist()
    failed_at = int(reasons["corrupt/damaged.mp4"].split()[1])
    assert damaged == list(range(0, failed_at, 4)) and damaged


def test_sequences_are_selected_whole_exported_and_described(
    video_input, tmp_path_factory, prefect_server
) -> None:
    folder, _ = video_input
    run = _run(
        tmp_path_factory,
        str(folder),
        "stopping_condition.n_samples=3",
        "selected_sequence_length=8",
    )
    sequences = json.loads((run / "sequence_information.json").read_text())
    assert len(sequences) == 3
    selected = (run / "filenames" / "selected_filenames.txt").read_text().split()
    assert selected == [name for seq in sequences for name in seq["frame_names"]]
    for seq in sequences:
        video = seq["video_name"]
        start = seq["frame_indices"][0]
        assert seq["frame_indices"] == list(range(start, start + 8))
        assert seq["frame_names"] == [frame_name(video, i) for i in seq["frame_indices"]]
        assert seq["frame_timestamps_sec"][0] == pytest.approx(start / 24, abs=1e-3)
        assert len(seq["frame_timestamps_pts"]) == 8
        frames = plain_frames(folder / video)
        for name, index in zip(seq["frame_names"], seq["frame_indices"], strict=True):
            assert np.array_equal(np.asarray(Image.open(run / "selected" / name)), frames[index])
    # Sequences of different scenes: not all from one place of one video.
    assert len({(s["video_name"], s["frame_indices"][0] // 16) for s in sequences}) == 3
    counts = json.loads((run / "report.json").read_text())["counts"]
    assert counts["selected_sequences"] == 3 and counts["selected"] == 24


def test_videos_from_the_s3_server_give_the_local_result(
    video_run, video_input, s3, tmp_path_factory, prefect_server, monkeypatch
) -> None:
    from servers import make_bucket

    from tasks.storage import open_storage

    folder, _ = video_input
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    make_bucket(s3, "videos")
    bucket = open_storage("s3://videos/raw")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            bucket.write(path.relative_to(folder).as_posix(), path.read_bytes())
    output = open_storage("s3://videos/curated")
    from flows.curate import curate
    from tasks.config import load_config

    curate(
        **load_config(
            None,
            [
                "input=s3://videos/raw",
                "output=s3://videos/curated",
                "num_workers=2",
                "stopping_condition.n_samples=12",
            ],
        ).sections()
    )
    run = "runs/" + output.read_text("LATEST").strip()
    selected = output.read_text(f"{run}/filenames/selected_filenames.txt").split()
    local = (video_run / "filenames" / "selected_filenames.txt").read_text().split()
    assert selected == local
    info = json.loads(output.read_text(f"{run}/corruptness_check_information.json"))
    assert info["corrupt_videos"] == _corrupt_videos(video_run)
    for name in selected:
        if parse_frame_name(name):
            remote = Image.open(io.BytesIO(output.read(f"{run}/selected/{name}")))
            assert np.array_equal(
                np.asarray(remote), np.asarray(Image.open(video_run / "selected" / name))
            )


def test_frames_of_a_kept_damaged_video_are_decoded_again_up_to_the_damage(tmp_path) -> None:
    """The embed step's fallback (its inputs gone) and the export's sequential path stop
    at the last wanted frame: decoding on would hit the damaged one."""
    from videos import damaged_middle, video_bytes

    from tasks.inputs import frame_inputs
    from tasks.naming import frame_name
    from tasks.storage import open_storage
    from tasks.video import _sequential, check_video

    data = damaged_middle(video_bytes(VALID["clips/street.mp4"]))
    (tmp_path / "damaged.mp4").write_bytes(data)
    decodable, reason = check_video(io.BytesIO(data), None)
    assert reason is not None and 0 < decodable < 60
    frames = plain_frames_until_damage(tmp_path / "damaged.mp4", decodable)
    for every_nth in (1, 5):
        indices = list(range(0, decodable, every_nth))
        metadata = pd.DataFrame(
            {
                "filename": [frame_name("damaged.mp4", i) for i in indices],
                "video": "damaged.mp4",
                "frame_index": indices,
            }
        )
        parts = list(frame_inputs(open_storage(str(tmp_path)), metadata, 32))
        assert sum(len(p) for p in parts) == len(indices)
    last = decodable - 1
    with open(tmp_path / "damaged.mp4", "rb") as stream:
        ((index, rgb),) = list(_sequential(stream, [last]))
    assert index == last and np.array_equal(rgb, frames[last])


def plain_frames_until_damage(path: Path, count: int) -> list[np.ndarray]:
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return frames


@pytest.mark.parametrize("pixel_format", sorted(SAMPLE_BYTES))
def test_sample_bytes_cover_exactly_each_formats_picture(pixel_format: str) -> None:
    frame = av.VideoFrame(64, 48, pixel_format)
    planes = zip(frame.planes, SAMPLE_BYTES[pixel_format], strict=True)
    picture_bits = sum(plane.width * size * plane.height * 8 for plane, size in planes)
    assert picture_bits == 64 * 48 * frame.format.padded_bits_per_pixel


def _frame(
    pixel_format: str, width: int, height: int, padding: int, last: int = 0
) -> av.VideoFrame:
    """A frame of random samples (the same for the same size) whose rows end in `padding`
    bytes and whose last sample byte is xor-ed with `last`. Written directly: swscale's
    output for odd widths at 10 bits is not even deterministic."""
    frame = av.VideoFrame(width, height, pixel_format)
    rng = np.random.default_rng(0)
    for plane, size in zip(frame.planes, SAMPLE_BYTES.get(pixel_format, (3,)), strict=True):
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
        row = plane.width * size
        rows[:, :row] = rng.integers(0, 256, (len(rows), row), np.uint8)
        rows[:, row:] = padding  # the decoder leaves whatever was there
    rows[-1, row - 1] ^= last
    return frame


@pytest.mark.parametrize("pixel_format", [*sorted(SAMPLE_BYTES), "rgb24"])
@pytest.mark.parametrize(("width", "height"), [(64, 48), (33, 17)])
def test_frame_checksum_is_of_the_picture_and_not_of_the_row_padding(
    pixel_format: str, width: int, height: int
) -> None:
    checksum = frame_crc(_frame(pixel_format, width, height, padding=0))
    assert checksum == frame_crc(_frame(pixel_format, width, height, padding=0x5A))
    assert checksum != frame_crc(_frame(pixel_format, width, height, padding=0, last=1))
