"""Credentials stay in the environment (or a Prefect Secret block): never in what a run
writes. Distinctive fake secrets are planted (an AWS secret key and session token for
moto, an Azure account key for an Azurite account of its own), real runs read and write
through the emulators, successful and failing ones, and every file they leave behind is
searched for each secret: the output, the run's Prefect home (results, the temporary
server's SQLite database and logs), the CLI's own output."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import AzureServer, azure_server, make_bucket, upload

pytestmark = pytest.mark.reliability  # make test-reliability

CURATE = str(Path(sys.executable).parent / "curate")


@dataclass(frozen=True)
class Planted:
    """Fake credentials no other file can contain, and pieces of them to search for (a
    message cut at 200 characters still shows a piece)."""

    aws_secret: str
    aws_token: str
    azure_key: str

    def needles(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for name, value in vars(self).items():
            found[name] = value.encode()
            # the first 12 letters and digits in a row: they survive a message cut
            # short, quoting and URL-encoding
            piece = re.findall(r"[A-Za-z0-9]{12,}", value)[0][:12]
            found[f"{name} (piece)"] = piece.encode()
        return found


def _azure_key() -> str:
    while True:  # a base64 key (Azure signs with its bytes) that starts with 12 alphanumerics
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        if re.match(r"[A-Za-z0-9]{12}", key):
            return key


@pytest.fixture(scope="module")
def planted() -> Planted:
    return Planted(
        aws_secret=secrets.token_hex(20),  # as long as a real one
        aws_token=secrets.token_hex(32),
        azure_key=_azure_key(),
    )


@pytest.fixture(scope="module")
def azure_account(planted: Planted) -> Iterator[AzureServer]:
    """Azurite with an account of its own whose key is the planted one."""
    with azure_server(account_name="curatesecrets", account_key=planted.azure_key) as server:
        yield server


def leaks(planted: Planted, *places: Path | tuple[str, bytes]) -> list[str]:
    """`place: secret` for every file (or named text) holding a planted secret."""
    found = []
    for place in places:
        if isinstance(place, tuple):
            items = [place]
        else:
            files = [place] if place.is_file() else sorted(place.rglob("*"))
            items = [(str(p), p.read_bytes()) for p in files if p.is_file() and not p.is_symlink()]
        for where, data in items:
            found += [f"{where}: {name}" for name, n in planted.needles().items() if n in data]
    return found


def _env(planted: Planted, s3, azure: AzureServer, home: Path) -> dict[str, str]:
    """The CLI's environment: the planted credentials, its own Prefect home, and a
    temporary Prefect server (no PREFECT_API_URL)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return (
        env
        | s3.env
        | {
            "AWS_SECRET_ACCESS_KEY": planted.aws_secret,
            "AWS_SESSION_TOKEN": planted.aws_token,
            "AZURE_STORAGE_CONNECTION_STRING": azure.connection_string,
            "PREFECT_HOME": str(home),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        }
    )


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CURATE, "run", *args], capture_output=True, env=env, timeout=600)


def _s3_input(s3, n: int = 12) -> str:
    from flows.demo import digit_images, encode

    bucket = f"curate-{uuid.uuid4().hex[:10]}"
    make_bucket(s3, bucket)
    images, _ = digit_images()
    for i in range(n):
        upload(s3, bucket, f"raw/d{i:02d}.png", encode(images[i], "PNG"))
    upload(s3, bucket, "raw/zz_truncated.png", encode(images[0], "PNG")[:80])
    return f"s3://{bucket}/raw"


def _container(azure: AzureServer) -> str:
    from servers import adlfs_filesystem

    name = f"curate-{uuid.uuid4().hex[:10]}"
    adlfs_filesystem(azure).mkdir(name)
    return name


def _download(azure: AzureServer, container: str, to: Path) -> Path:
    """Every blob the run wrote, as files (the output as a user would fetch it)."""
    from servers import adlfs_filesystem

    fs = adlfs_filesystem(azure)
    for blob in fs.find(container):
        target = to / blob
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(blob))
    return to


@pytest.mark.slow
def test_a_run_from_s3_to_azure_writes_no_credential_anywhere(planted, s3, azure_account, tmp_path):
    home = tmp_path / "prefect-home"
    env = _env(planted, s3, azure_account, home)
    container = _container(azure_account)
    result = _cli(
        env,
        f"input={_s3_input(s3)}",
        f"output=az://{container}/curated",
        "stopping_condition.n_samples=5",
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    output = _download(azure_account, container, tmp_path / "output")
    reports = list(output.rglob("report.json"))
    assert len(reports) == 1 and (output / container / "curated/datapool").is_dir()
    assert (home / "prefect.db").exists()  # the temporary server's database is searched too
    found = leaks(planted, output, home, ("stdout", result.stdout), ("stderr", result.stderr))
    assert found == []


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no such bucket", "s3://curate-no-such-bucket: no such bucket"),
        ("no such container", "az://curate-no-such-container: no such container"),
        ("wrong account key", "access denied; check the credentials"),
        ("malformed connection string", "the Azure credentials do not parse"),
    ],
)
def test_a_failed_run_names_the_place_but_never_a_credential(
    planted, s3, azure_account, tmp_path, case, expected
):
    home = tmp_path / "prefect-home"
    env = _env(planted, s3, azure_account, home)
    source, container = _s3_input(s3, n=2), _container(azure_account)
    output = "az://curate-no-such-container/x" if case == "no such container" else container
    args = [
        "input=s3://curate-no-such-bucket/raw" if case == "no such bucket" else f"input={source}",
        f"output=az://{container}" if output == container else f"output={output}",
    ]
    if case == "wrong account key":  # another key for the account: Azurite refuses it
        wrong = base64.b64encode(secrets.token_bytes(32)).decode()
        env["AZURE_STORAGE_CONNECTION_STRING"] = azure_account.connection_string.replace(
            planted.azure_key, wrong
        )
    if case == "malformed connection string":  # the key is in it, the endpoint is not
        env["AZURE_STORAGE_CONNECTION_STRING"] = f"AccountKey={planted.azure_key};garbage"
    result = _cli(env, *args, "stopping_condition.n_samples=3")
    assert result.returncode == 1, result.stderr.decode()[-3000:]
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr.decode()[-3000:]
    found = leaks(planted, home, ("stdout", result.stdout), ("stderr", result.stderr))
    assert found == []


def test_the_search_finds_a_secret_whole_cut_quoted_or_url_encoded(planted, tmp_path):
    """The searches above can fail: a planted secret in any of these forms is found."""
    from urllib.parse import quote

    conn = f"DefaultEndpointsProtocol=http;AccountKey={planted.azure_key};"
    (tmp_path / "db").write_bytes(b"\x00" + quote(conn, safe="").encode() + b"\x00")
    forms = [
        ("message", f"error: {planted.aws_secret[:16]}...".encode()),
        ("json", json.dumps({"token": planted.aws_token}).encode()),
    ]
    found = leaks(planted, tmp_path, *forms)
    assert found == [
        f"{tmp_path / 'db'}: azure_key (piece)",
        "message: aws_secret (piece)",
        "json: aws_token",
        "json: aws_token (piece)",
    ]


@pytest.fixture
def endpoints_only(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's environment names the emulators but holds no credential: those come
    from a Prefect Secret block (before `server` copies the environment)."""
    for key, value in s3.env.items():
        if key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)


@pytest.mark.slow
def test_deployment_runs_with_a_secret_block_leave_no_credential_on_the_server(
    planted, s3, azure_account, endpoints_only, server, worker, tmp_path
):
    """A deployment on a real server and worker: one run that completes, one that fails
    inside the flow (its output container is missing); then the server's database and
    log, the worker's log and the Prefect home are searched."""
    from deploys import api, prefect_cli, tail, wait_for_runs

    block = {
        "AWS_ACCESS_KEY_ID": "curate-planted",
        "AWS_SECRET_ACCESS_KEY": planted.aws_secret,
        "AWS_SESSION_TOKEN": planted.aws_token,
        "AZURE_STORAGE_CONNECTION_STRING": azure_account.connection_string,
    }
    save = (
        "import json, sys; from prefect.blocks.system import Secret; "
        "Secret(value=json.loads(sys.stdin.read())).save('curate-planted')"
    )
    subprocess.run(
        [sys.executable, "-c", save], input=json.dumps(block).encode(), env=server, check=True
    )
    prefect_cli(
        server,
        "--no-prompt",
        "deploy",
        "--name",
        "local",
        "--prefect-file",
        "deployments/prefect.yaml",
    )
    deployment = api(server, "GET", "/deployments/name/curate/local")
    container = _container(azure_account)
    common = {
        "input": _s3_input(s3),
        "stopping_condition": {"n_samples": 5},
        "storage": {"credentials_secret": "curate-planted"},
    }
    outputs = {"ok": f"az://{container}/curated", "failing": "az://curate-missing/curated"}
    runs = {
        what: api(
            server,
            "POST",
            f"/deployments/{deployment['id']}/create_flow_run",
            {"parameters": common | {"output": output}},
        )["id"]
        for what, output in outputs.items()
    }
    done = dict(zip(runs, wait_for_runs(server, list(runs.values())), strict=True))
    assert done["ok"]["state"]["type"] == "COMPLETED", tail(tmp_path / "worker.log")
    assert done["failing"]["state"]["type"] == "FAILED", tail(tmp_path / "worker.log")
    assert "az://curate-missing: no such container" in done["failing"]["state"]["message"]
    output = _download(azure_account, container, tmp_path / "output")
    assert len(list(output.rglob("report.json"))) == 1
    # tmp_path holds it all: the output's copy, the server's SQLite database (and its
    # write-ahead log), the server's and the worker's logs, the Prefect home.
    assert {"prefect.db", "server.log", "worker.log", "prefect-home"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert leaks(planted, tmp_path) == []


def test_a_foreign_error_becomes_one_line_without_its_credentials(monkeypatch):
    from tasks.errors import foreign, redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIK7MDENGbPxRfiCY")
    error = ValueError(
        "failed for DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0a2V5PQ==;"
        " url https://a.blob.core.windows.net/c?sv=2024&sig=U0lHTkFUVVJF&se=1\n"
        "RequestId: 42\nContent: <xml>"
    )
    line = foreign(error)
    assert line == (
        "ValueError: failed for DefaultEndpointsProtocol=https;AccountName=a;AccountKey=***;"
        " url https://a.blob.core.windows.net/c?sv=2024&sig=***&se=1"
    )
    assert redact("key wJalrXUtnFEMIK7MDENGbPxRfiCY in a dump") == "key *** in a dump"
    assert redact("Authorization: AWS4-HMAC-SHA256 Credential=x") == "Authorization: ***"


# The server's exposure: loopback by default, basic auth when opened, no telemetry.

START_SERVER = Path(__file__).resolve().parents[1] / "infra/start-server.sh"


def _listening_addresses(port: int) -> set[str]:
    """The local addresses (IPv4, as dotted quads) that listen on `port`, from
    /proc/net/tcp: what the kernel says, not what the script intends."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def _get(env: dict[str, str], path: str, auth: str | None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(env["PREFECT_API_URL"] + path)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_start_server_refuses_an_open_address_without_an_auth_string(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"CURATE_SERVER_HOST": "0.0.0.0", "PREFECT": "/bin/false", "PREFECT_HOME": str(tmp_path)}
    result = subprocess.run([str(START_SERVER)], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "set PREFECT_SERVER_API_AUTH_STRING=user:password" in result.stderr


@pytest.mark.slow
def test_a_server_with_basic_auth_serves_only_its_clients_on_loopback_and_phones_no_home(
    tmp_path,
):
    from deploys import api, start_server, stop

    auth = "curate:" + secrets.token_hex(12)
    extra = {"PREFECT_SERVER_API_AUTH_STRING": auth}
    # Whatever the caller's environment says about telemetry, the script's defaults hold.
    without = ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")
    with start_server(tmp_path, extra, without) as env:
        port = int(env["PREFECT_PORT"])
        assert _listening_addresses(port) == {"127.0.0.1"}
        for who in (None, "curate:wrong", auth.upper()):
            status, _ = _get(env, "/admin/settings", who)
            assert status == 401, who
        status, body = _get(env, "/admin/settings", auth)
        assert status == 200
        settings = json.loads(body)
        assert settings["server"]["analytics_enabled"] is False
        assert settings["server"]["ui"]["show_promotional_content"] is False

        client = env | {"PREFECT_API_AUTH_STRING": auth}
        ping = "from prefect import flow; print(flow(name='ping')(lambda: 'pong')())"
        run = [sys.executable, "-c", ping]
        refused = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
        served = subprocess.run(run, env=client, capture_output=True, text=True, timeout=300)
        assert served.returncode == 0 and "pong" in served.stdout, served.stderr[-2000:]

        # A worker started as the README says registers with the server.
        logs = tmp_path / "worker-logs"
        workers = subprocess.Popen(
            [str(START_SERVER.with_name("start-workers.sh")), "curate-local", "1"],
            env=client | {"CURATE_WORKER_LOGS": str(logs)},
            start_new_session=True,
        )
        try:
            registered: list = []
            for _ in range(120):
                registered = api(client, "POST", "/work_pools/curate-local/workers/filter", {})
                if registered:
                    break
                time.sleep(1)
            assert registered, (logs / "curate-local-0.log").read_text(errors="replace")
        finally:
            stop(workers)


@pytest.mark.slow
def test_the_cli_and_its_temporary_server_send_no_telemetry(tmp_path):
    """Without any setting of the user's, `curate` turns telemetry off for itself and for
    the temporary Prefect server it starts (asked through the server's own API)."""
    code = """
import json, os, urllib.request
import flows.cli  # what `curate` imports first
from prefect._internal.analytics import is_telemetry_enabled
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
server.start(timeout=120)
try:
    with urllib.request.urlopen(server.api_url + "/admin/settings", timeout=30) as response:
        settings = json.load(response)
    environ = open(f"/proc/{server.server_process.pid}/environ", "rb").read().split(b"\\0")
finally:
    server.stop()
print(json.dumps({
    "server_analytics": settings["server"]["analytics_enabled"],
    "sdk_telemetry": is_telemetry_enabled(),
    "server_env": dict(e.decode().lower().split("=", 1) for e in environ if b"=" in e),
}))
"""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")
    } | {"PREFECT_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert (found["server_analytics"], found["sdk_telemetry"]) == (False, False)
    assert found["server_env"]["do_not_track"] == "1"
    assert found["server_env"]["prefect_server_analytics_enabled"] == "false"
