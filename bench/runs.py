"""What the benches share: a whole curate run, timed, with its report."""

from __future__ import annotations

import json
import time
from pathlib import Path


def timed_curate(overrides: list[str]) -> tuple[float, dict]:
    """(seconds, report.json) of one curate flow run in this process, configured by
    KEY=VALUE `overrides` (the Prefect server already started)."""
    from flows.curate import curate
    from tasks.config import load_config

    started = time.perf_counter()
    run_dir = curate(**load_config(None, overrides).sections())
    seconds = time.perf_counter() - started
    return seconds, json.loads((Path(run_dir) / "report.json").read_text())
