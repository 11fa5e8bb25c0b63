"""Fixed cost of a run: wall time of `curate run` when nothing is new (the datapool holds
every object), against a running Prefect server and with the default temporary one, and
of a bad `input`; printed beside the work the run did (its report's seconds) and bare
baselines measured in the same run (a Python start, `import prefect`).

    python -m bench.bench_fixed_cost            # 5,000 images (BENCH_IMAGES to change)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    return time.perf_counter() - started, result


def best(args: list[str], env: dict[str, str], repeat: int = 3) -> float:
    return min(timed(args, env)[0] for _ in range(repeat))


def make_images(folder: Path, n: int) -> None:
    from flows.demo import digit_images, encode

    images, _ = digit_images(size=32)
    folder.mkdir(parents=True)
    for i in range(n):
        path = folder / f"{i // 1000:02d}/{i:05d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encode(images[i % len(images)], "PNG"))


def main() -> None:
    n = int(os.environ.get("BENCH_IMAGES", "5000"))
    work = Path(tempfile.mkdtemp(prefix="bench-fixed-"))
    folder, out = work / "in", work / "out"
    make_images(folder, n)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base |= {"PREFECT_HOME": str(work / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    port = _free_port()
    server_env = base | {"PREFECT_PORT": str(port), "PREFECT": str(BIN / "prefect")}
    server = subprocess.Popen(
        [str(REPO / "infra/start-server.sh")],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    served = base | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    try:
        _wait_for(served["PREFECT_API_URL"] + "/health")
        run = [str(BIN / "curate"), "run", f"input={folder}", f"output={out}"]
        run.append("stopping_condition.n_samples=50")
        first, result = timed(run, served)
        assert result.returncode == 0, result.stderr[-2000:]
        noop_served = best(run, served)
        noop_temporary = best(run, base, repeat=2)
        run_id = (out / "LATEST").read_text().strip()
        report = json.loads((out / "runs" / run_id / "report.json").read_text())
        assert report["counts"]["processed"] == 0, report["counts"]
        bad = [str(BIN / "curate"), "run", f"input={work / 'nowhere'}", f"output={out}"]
        bad_input = best([*bad, "stopping_condition.n_samples=5"], base)
        python = best([sys.executable, "-c", "pass"], base)
        prefect_import = best([sys.executable, "-c", "import prefect"], base)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    print(f"fixed cost of a run ({n} images, all already in the datapool; best of 3)")
    print(f"  first run (processes all {n}):           {first:7.2f} s")
    print(f"  no-op run, running server:                {noop_served:7.2f} s (target < 3 s)")
    print(f"  no-op run, temporary server:              {noop_temporary:7.2f} s")
    print(f"  bad input reported:                       {bad_input:7.2f} s (target < 2 s)")
    print(f"  work the no-op run did (report seconds):  {report['seconds']:7.2f} s")
    print(f"  bare baselines: python start {python:.2f} s, import prefect {prefect_import:.2f} s")
    print(
        f"  ratios: no-op (server) / work = {noop_served / max(report['seconds'], 1e-3):.1f}x, "
        f"temporary / running server = {noop_temporary / noop_served:.1f}x, "
        f"no-op (server) - import prefect - python = "
        f"{noop_served - prefect_import:.2f} s of our own"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                time.sleep(3)  # the pools are created right after the server answers
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


if __name__ == "__main__":
    main()
