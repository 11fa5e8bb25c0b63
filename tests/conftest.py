"""Shared fixtures: one Prefect test server per session, generated image folders.

Prefect's home, results and analytics are pointed at temporary places before Prefect is
imported, so nothing cached leaks between test runs or into the user's ~/.prefect.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="curate-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Cloud clients must never reach for real metadata servers or hang on emulators.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import deploys  # noqa: E402
import pytest  # noqa: E402
from servers import (  # noqa: E402
    AzureServer,
    GCSServer,
    S3Server,
    azure_server,
    gcs_server,
    s3_server,
)

from flows.demo import digit_images, encode, make_demo_folder  # noqa: E402

# A real deployment's fixtures (tests/deploys.py): `server`, `worker`.
server = deploys.server
worker = deploys.worker


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real (SQLite) Prefect server for flow runs, started once."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The demo's images with planted corrupt files; returns (folder, expected reasons)."""
    folder = tmp_path_factory.mktemp("demo") / "images"
    expected = make_demo_folder(folder)
    return folder, expected


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1,797 labeled digits as 64 px PNGs named `<index>_label<digit>.png`."""
    folder = tmp_path_factory.mktemp("digits")
    images, labels = digit_images()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / f"{i:04d}_label{label}.png").write_bytes(encode(image, "PNG"))
    return folder


class Run:
    """A finished run's directory, read back the way a user would."""

    def __init__(self, run_dir: str) -> None:
        self.path = Path(run_dir)

    @property
    def report(self) -> dict:
        import json

        return json.loads((self.path / "report.json").read_text())

    def names(self, which: str) -> list[str]:
        return (self.path / "filenames" / f"{which}_filenames.txt").read_text().splitlines()

    @property
    def corrupt(self) -> dict[str, str]:
        import json

        info = json.loads((self.path / "corruptness_check_information.json").read_text())
        return info["corrupt_samples"]


@pytest.fixture
def run_curate(prefect_server: None):  # type: ignore[no-untyped-def]
    """Run the curate flow in-process against the test server with KEY=VALUE args."""
    from flows.curate import curate
    from tasks.config import load_config

    def run(*args: str) -> Run:
        return Run(curate(**load_config(None, list(args)).sections()))

    return run


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server on loopback, for the whole session."""
    with s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def gcs() -> Iterator[GCSServer]:
    """fake-gcs-server on loopback, for the whole session."""
    with gcs_server() as server:
        yield server


@pytest.fixture(scope="session")
def azure() -> Iterator[AzureServer]:
    """Azurite's blob service on loopback, for the whole session."""
    with azure_server() as server:
        yield server


class Reliability:
    """What the reliability tests tried, summed over the session (and xdist's workers)
    into one line at the end: inputs tried, faults injected, crashes, objects lost."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, **counts: int) -> None:
        self.counts.update(counts)


_reliability = Reliability()


@pytest.fixture
def reliability() -> Reliability:
    return _reliability


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller prints the line
        workeroutput["reliability"] = dict(_reliability.counts)


class _FromXdistWorkers:
    """xdist's controller adds each worker's counts (a hook that exists with xdist only)."""

    @staticmethod
    def pytest_testnodedown(node: object, error: object) -> None:
        _reliability.counts.update(getattr(node, "workeroutput", {}).get("reliability", {}))


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_FromXdistWorkers())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    c = _reliability.counts
    if c:
        terminalreporter.write_line(
            f"reliability: {c['inputs']} hostile inputs tried, {c['faults']} faults "
            f"injected, {c['crashes']} crashes, {c['lost']} objects lost, {c['doubled']} doubled"
        )
