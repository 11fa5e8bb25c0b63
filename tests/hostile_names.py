"""Hostile names and file-system entries for an input folder, planted for real.

`make_name_and_fs_cases(folder)` plants one input per kind in `folder` (the run's input)
and returns what a run must make of each: {name as every output writes it (or a folder's
name with its `/`): "ok" or a piece of its reason}. "ok" means processed: a row of
`data/metadata.parquet` (an image's `filename`, a video's `video`), whether it is then
selected, a duplicate or neither; a reason means listed in `corruptness_check_information.json`
(and `filenames/corrupt_filenames.txt`) with a reason that contains it.

Pure and independent of fixtures: no Prefect, no server, deterministic content. Run the
pipeline with `output=<folder>/OUTPUT_FOLDER`: the folder holds a planted leftover of an
earlier run (`NEVER_LISTED`), and no name under it may appear in any output. The kinds that
need permissions (an unreadable file, an unreadable folder) expect what the process that
runs the pipeline can do: pass `privileged=False` when it runs without the capability to
read past file modes (root has it; `setpriv --bounding-set=-dac_override,-dac_read_search`
takes it away), else this process's own capabilities decide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from videos import FASTSTART, Spec, video_bytes

from flows.demo import digit_images, encode
from tasks.naming import escape_name

OUTPUT_FOLDER = "curate-out"
# A frame an earlier run exported into the output: never an input of a later run.
NEVER_LISTED = f"{OUTPUT_FOLDER}/runs/earlier/selected/street-000000-mp4.png"

# A short video: frames a run can select and export under (long) derived names.
SMALL_VIDEO = Spec("libx264", "mp4", frames=6, width=64, height=48, gop=3, options=FASTSTART)
OTHER_VIDEO = Spec("libx264", "mp4", frames=6, width=80, height=48, gop=3, options=FASTSTART)


def can_read_past_modes() -> bool:
    """Whether this process reads files and lists folders whatever their mode bits
    (CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH in its effective set: root's usual case)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & 0b110)
    return os.geteuid() == 0


def _images() -> list[bytes]:
    """Distinct small PNGs, so that no planted image is another's duplicate."""
    images, _ = digit_images()
    return [encode(image, "PNG") for image in images[:40]]


def _raw(folder: Path, relative: bytes) -> bytes:
    """The path of `relative` (raw bytes: a name need not be UTF-8) under `folder`."""
    return os.fsencode(folder) + b"/" + relative


def make_name_and_fs_cases(folder: Path, privileged: bool | None = None) -> dict[str, str]:
    """Plant the cases in `folder` (created if missing); returns {name: expected}."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = iter(_images())
    expected: dict[str, str] = {}

    def plant(relative: str | bytes, outcome: str = "ok", data: bytes | None = None) -> None:
        raw = relative if isinstance(relative, bytes) else os.fsencode(relative)
        path = _raw(folder, raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(next(pngs) if data is None else data)
        expected[escape_name(os.fsdecode(raw))] = outcome

    # Names: each processed, under the name the escaping rule gives it.
    plant(b"latin1-caf\xe9-\xff.png")  # not UTF-8
    plant("new\nline.png")
    plant("carriage\rreturn.png")
    plant("tab\tand\x01control.png")
    plant("line\u2028separator.png")
    plant("back\\slash.png")
    plant('quote",comma.png')
    plant("math-$^$-in-a-caption.png")  # matplotlib would parse it as math
    plant("<b>html</b>&amp;.png")
    plant("with spaces/a  b c.png")
    plant("caf\u00e9-nfc.png")
    plant("cafe\u0301-nfd.png")
    plant("emoji-\U0001f600.png")
    plant("-leading-dash.png")
    plant("--help.png")
    plant(".hidden.png")
    plant("n" * 251 + ".png")  # 255 bytes, the most a file name holds
    plant("\u00e9" * 125 + "x.png")  # 255 bytes of two-byte characters
    video = video_bytes(SMALL_VIDEO)
    plant("v" * 214 + ".mp4", data=video)  # its frames' temporary files ran past 255
    plant("w" * 246 + ".mp4", data=video_bytes(OTHER_VIDEO))  # frame names past 255
    plant("deep/" * 40 + "in-a-deep-folder.png")

    # Symlinks.
    plant("real/target.png")
    os.symlink("real/target.png", folder / "zz-link-to-a-file-inside.png")
    expected["zz-link-to-a-file-inside.png"] = "ok"  # followed (and a duplicate)
    os.symlink("missing-target.png", folder / "dangling.png")
    expected["dangling.png"] = "broken symlink"
    os.symlink("loop-b.png", folder / "loop-a.png")
    os.symlink("loop-a.png", folder / "loop-b.png")
    expected["loop-a.png"] = expected["loop-b.png"] = "symlink loop"
    outside = folder.parent / f"{folder.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes(next(pngs))
    os.symlink(outside / "secret.png", folder / "link-out-of-the-input.png")
    expected["link-out-of-the-input.png"] = "symlink leads outside"
    os.symlink(outside, folder / "link-to-a-folder-outside")
    expected["link-to-a-folder-outside/"] = "symlink leads outside"
    os.symlink("real", folder / "link-to-a-folder-inside")
    expected["link-to-a-folder-inside/"] = "symlink to a folder"

    # Things that are not regular files: never opened (a FIFO would block the reader).
    os.mkfifo(folder / "fifo.png")
    expected["fifo.png"] = "not a regular file (FIFO)"
    os.mkfifo(folder / "fifo-without-extension")  # not an image by name: skipped
    # A socket's path must be short (108 bytes): bound in a short folder, then moved in.
    short = Path(tempfile.mkdtemp(prefix="s-", dir="/tmp"))
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
        sock.bind(str(short / "s"))
    with contextlib.suppress(OSError):  # another file system: no socket case
        os.rename(short / "s", folder / "socket.png")
        expected["socket.png"] = "not a regular file (socket)"
    shutil.rmtree(short, ignore_errors=True)
    with contextlib.suppress(PermissionError):  # needs CAP_MKNOD (root outside containers)
        os.mknod(folder / "device.png", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        expected["device.png"] = "not a regular file (character device)"

    # Permissions.
    read_past = can_read_past_modes() if privileged is None else privileged
    plant("locked.png", "ok" if read_past else "permission denied")
    os.chmod(folder / "locked.png", 0)
    plant("locked-folder/inside.png")
    os.chmod(folder / "locked-folder", 0)
    if not read_past:
        del expected["locked-folder/inside.png"]
        expected["locked-folder/"] = "unreadable folder: permission denied"

    # An earlier run's exported frame in the output, which lies inside the input.
    (folder / NEVER_LISTED).parent.mkdir(parents=True)
    (folder / NEVER_LISTED).write_bytes(next(pngs))
    return expected
