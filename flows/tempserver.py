"""The temporary Prefect server of a `curate` command run without `PREFECT_API_URL`.

Prefect starts one by itself in that case, but as a plain child in the command's process
group: the terminal's Ctrl-C then reaches the server too, which dies while the run still
has to report its end, and the run's clients retry a dead server for a minute and a half
("EventsWorker failed" every few seconds). This one is Prefect's own server class, started
in a session of its own: a Ctrl-C reaches only the command, which stops its run cleanly,
lets Prefect's services flush, and then stops the server (Prefect's exit hook).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from tasks.errors import CurateError


@contextmanager
def prefect_api() -> Iterator[None]:
    """Prefect's API for this command: the configured one, or a temporary server."""
    if PREFECT_API_URL.value():
        yield
        return
    server = DetachedServer()
    try:
        server.start()  # stopped by Prefect's exit hook, after its services have flushed
    except RuntimeError as exc:  # it did not answer in time
        server.stop()
        raise CurateError(
            f"the temporary Prefect server did not start ({exc}; its log: {_log()}); "
            "start one (infra/start-server.sh) and set PREFECT_API_URL"
        ) from None
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _end_with_parent() -> None:
    """In the server's process, before it starts: end when the command ends, even when
    the command was killed outright (a new session no longer ends with its terminal)."""
    PR_SET_PDEATHSIG = 1  # noqa: N806 (linux/prctl.h)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _log() -> Path:
    return get_current_settings().home / "temporary-server.log"


class DetachedServer(SubprocessASGIServer):
    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # Prefect's own command line (prefect/server/api/server.py), in a new session;
        # what it prints at its end (cancelled services) goes to a log, not the terminal.
        log = _log()
        log.parent.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
            start_new_session=True,
            preexec_fn=_end_with_parent,
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
        )
