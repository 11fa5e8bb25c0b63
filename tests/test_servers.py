"""The test storage servers work: moto (S3), fake-gcs-server (GCS), Azurite, faulty proxy."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from servers import (
    AzureServer,
    AzuriteNotInstalledError,
    GCSServer,
    S3Server,
    adlfs_filesystem,
    azure_server,
    faulty_proxy,
    free_port,
    gcs_server,
    gcsfs_filesystem,
    make_bucket,
    running_children,
    s3_client,
    stop_process,
    upload,
)

# The s3, gcs and azure fixtures are the session's, from conftest.py.


# --- S3 (moto) ----------------------------------------------------------------------------


def test_s3_round_trip_ranges_and_paginated_listing(s3: S3Server) -> None:
    make_bucket(s3, "round-trip")
    for i in range(5):
        upload(s3, "round-trip", f"imgs/{i}.bin", bytes([i]) * 10)
    upload(s3, "round-trip", "other/x.bin", b"0123456789")
    client = s3_client(s3)

    assert client.get_object(Bucket="round-trip", Key="other/x.bin")["Body"].read() == (
        b"0123456789"
    )
    ranged = client.get_object(Bucket="round-trip", Key="other/x.bin", Range="bytes=2-4")
    assert ranged["Body"].read() == b"234"
    assert ranged["ContentRange"] == "bytes 2-4/10"

    pages = list(
        client.get_paginator("list_objects_v2").paginate(
            Bucket="round-trip", Prefix="imgs/", PaginationConfig={"PageSize": 2}
        )
    )
    assert [len(p["Contents"]) for p in pages] == [2, 2, 1]
    first = client.list_objects_v2(Bucket="round-trip", Prefix="imgs/", MaxKeys=2)
    assert first["IsTruncated"] and first["KeyCount"] == 2
    rest = client.list_objects_v2(
        Bucket="round-trip", Prefix="imgs/", ContinuationToken=first["NextContinuationToken"]
    )
    keys = [o["Key"] for o in first["Contents"] + rest["Contents"]]
    assert keys == [f"imgs/{i}.bin" for i in range(5)]
    assert all(o["ETag"] and o["Size"] == 10 for o in first["Contents"])


def test_s3_env_is_enough_for_a_plain_boto3_client(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    client = boto3.client("s3")  # endpoint, keys and region all from the environment
    client.create_bucket(Bucket="from-env")
    client.put_object(Bucket="from-env", Key="k", Body=b"v")
    assert s3_client(s3).get_object(Bucket="from-env", Key="k")["Body"].read() == b"v"


# --- GCS (fake-gcs-server + gcsfs) -------------------------------------------------------


def test_gcsfs_round_trip(gcs: GCSServer) -> None:
    fs = gcsfs_filesystem(gcs)
    fs.mkdir("gcs-bucket")
    fs.pipe_file("gcs-bucket/a/x.bin", b"0123456789")
    fs.pipe_file("gcs-bucket/a/b/y.bin", b"hello")
    assert fs.cat_file("gcs-bucket/a/x.bin") == b"0123456789"
    assert fs.cat_file("gcs-bucket/a/x.bin", start=2, end=5) == b"234"
    assert fs.cat_file("gcs-bucket/a/x.bin", start=-3) == b"789"

    found = fs.find("gcs-bucket", detail=True)
    assert set(found) == {"gcs-bucket/a/x.bin", "gcs-bucket/a/b/y.bin"}
    x = found["gcs-bucket/a/x.bin"]
    assert x["size"] == 10 and x["type"] == "file"
    assert x["generation"].isdigit()  # a string of digits
    assert x["md5Hash"] == "eB5eJF1ptWaXm4bijSPyxw=="  # base64 of the MD5 digest
    assert x["etag"] and x["crc32c"]
    listed = {e["name"]: e for e in fs.ls("gcs-bucket/a", detail=True)}
    assert listed["gcs-bucket/a/b"]["type"] == "directory"
    assert listed["gcs-bucket/a/x.bin"]["generation"] == x["generation"]

    with fs.open("gcs-bucket/a/x.bin", "rb") as f:
        f.seek(6)
        assert f.read(2) == b"67"
        f.seek(-1, os.SEEK_END)
        assert f.read() == b"9"

    fs.pipe_file("gcs-bucket/a/x.bin", b"new")
    fs.invalidate_cache()
    assert fs.info("gcs-bucket/a/x.bin")["generation"] != x["generation"]
    fs.rm_file("gcs-bucket/a/x.bin")
    fs.invalidate_cache()
    assert not fs.exists("gcs-bucket/a/x.bin")
    assert fs.find("gcs-bucket") == ["gcs-bucket/a/b/y.bin"]


_GCS_FROM_ENV = """
import gcsfs
fs = gcsfs.GCSFileSystem()
print(type(fs).__name__, fs.credentials.method, fs._location)
fs.mkdir("env-bucket")
fs.pipe_file("env-bucket/k", b"from env")
print(fs.cat_file("gs://env-bucket/k").decode())
"""


def test_gcsfs_without_arguments_uses_storage_emulator_host(gcs: GCSServer) -> None:
    # In a clean subprocess: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at import and
    # google-auth reads NO_GCE_CHECK at import.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **gcs.env}
    out = subprocess.run(
        [sys.executable, "-c", _GCS_FROM_ENV],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    assert out[0] == f"GCSFileSystem anon {gcs.endpoint_url}"
    assert out[1] == "from env"


# --- Azure (Azurite + adlfs / azure-storage-blob) ----------------------------------------


def test_adlfs_round_trip(azure: AzureServer) -> None:
    fs = adlfs_filesystem(azure)
    fs.mkdir("az-container")
    fs.pipe_file("az-container/a/x.bin", b"0123456789")
    fs.pipe_file("az-container/a/b/y.bin", b"hello")
    assert fs.cat_file("az-container/a/x.bin") == b"0123456789"
    assert fs.cat_file("az-container/a/x.bin", start=2, end=5) == b"234"
    assert fs.cat_file("az-container/a/x.bin", start=7) == b"789"

    found = fs.find("az-container", detail=True)
    assert set(found) == {"az-container/a/x.bin", "az-container/a/b/y.bin"}
    x = found["az-container/a/x.bin"]
    assert x["size"] == 10 and x["type"] == "file"
    assert x["etag"].startswith('"0x') and x["etag"].endswith('"')  # quoted
    assert x["last_modified"].tzinfo is not None  # datetime, whole seconds
    assert bytes(x["content_settings"]["content_md5"]) == hashlib.md5(b"0123456789").digest()
    listed = {e["name"]: e for e in fs.ls("az-container/a", detail=True)}
    assert listed["az-container/a/b"]["type"] == "directory"

    with fs.open("az-container/a/x.bin", "rb") as f:
        f.seek(6)
        assert f.read(2) == b"67"
        f.seek(-1, os.SEEK_END)
        assert f.read() == b"9"

    fs.pipe_file("az-container/a/x.bin", b"new")
    fs.invalidate_cache()
    assert fs.info("az-container/a/x.bin")["etag"] != x["etag"]
    fs.rm_file("az-container/a/x.bin")
    fs.invalidate_cache()
    assert not fs.exists("az-container/a/x.bin")
    assert fs.find("az-container") == ["az-container/a/b/y.bin"]


def test_adlfs_without_arguments_uses_the_connection_string_env(
    azure: AzureServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adlfs

    for key, value in azure.env.items():
        monkeypatch.setenv(key, value)
    fs = adlfs.AzureBlobFileSystem(skip_instance_cache=True)
    fs.mkdir("env-container")
    fs.pipe_file("env-container/k", b"from env")
    assert adlfs_filesystem(azure).cat_file("env-container/k") == b"from env"


def test_azure_list_blobs_pages_lazily(azure: AzureServer) -> None:
    from azure.storage.blob import ContainerClient

    container = ContainerClient.from_connection_string(azure.connection_string, "lazy")
    container.create_container()
    for i in range(5):
        container.upload_blob(f"p/{i}.bin", b"x" * i)
    container.upload_blob("q/other.bin", b"y")

    requests: list[str] = []
    blobs = container.list_blobs(
        name_starts_with="p/",
        results_per_page=2,
        raw_response_hook=lambda response: requests.append(response.http_request.url),
    )
    assert type(blobs).__name__ == "ItemPaged" and requests == []
    it = iter(blobs)
    assert [next(it).name for _ in range(3)] == ["p/0.bin", "p/1.bin", "p/2.bin"]
    assert len(requests) == 2  # only the pages needed so far
    assert [b.name for b in it] == ["p/3.bin", "p/4.bin"]
    assert len(requests) == 3 and all("maxresults=2" in u for u in requests)
    assert "marker=" in requests[1]


# --- faulty proxy -------------------------------------------------------------------------


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Echoes the request as JSON; /stream answers chunked; HEAD gets headers only."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        body = self._body()
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                piece = f"part{i};".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
                time.sleep(0.01)
            self.wfile.write(b"0\r\n\r\n")
            return
        echo = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "host": self.headers.get("Host"),
                "x-custom": self.headers.get("X-Custom"),
                "body": body.decode(),
            }
        ).encode()
        self.send_response(201 if self.command == "PUT" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(echo)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(echo)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_proxy_forwards_methods_headers_bodies_and_streams(echo_url: str) -> None:
    with faulty_proxy(echo_url, failure_rate=0.0) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # one kept-alive
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            conn.request(method, "/p?q=1", body=b"abc", headers={"X-Custom": "v"})
            response = conn.getresponse()
            echo = json.loads(response.read())
            assert response.status == (201 if method == "PUT" else 200)
            assert echo == {
                "method": method,
                "path": "/p?q=1",
                "host": f"127.0.0.1:{port}",  # the Host the client sent, unchanged
                "x-custom": "v",
                "body": "abc",
            }
        conn.request("HEAD", "/h")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        assert int(head.getheader("Content-Length") or 0) > 0
        conn.request("POST", "/chunked", body=iter([b"ab", b"cd"]), encode_chunked=True)
        assert json.loads(conn.getresponse().read())["body"] == "abcd"
        conn.request("GET", "/stream")
        streamed = conn.getresponse()
        assert streamed.getheader("Transfer-Encoding") == "chunked"
        assert streamed.read() == b"part0;part1;part2;"
        conn.close()
        assert proxy.counts.snapshot() == {
            "forwarded": 8,
            "slowdown": 0,
            "reset": 0,
            "upstream_error": 0,
        }


def test_proxy_fails_with_slowdown_or_reset(echo_url: str) -> None:
    with faulty_proxy(echo_url, failure_rate=1.0, seed=1) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        seen = set()
        for _ in range(12):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/x")
                response = conn.getresponse()
                assert response.status == 503
                body = response.read()
                assert b"<Code>SlowDown</Code>" in body
                assert b"<Message>Please reduce your request rate.</Message>" in body
                seen.add("slowdown")
            except (ConnectionResetError, http.client.RemoteDisconnected):
                seen.add("reset")
            finally:
                conn.close()
        assert seen == {"slowdown", "reset"}
        counts = proxy.counts.snapshot()
        assert counts["forwarded"] == 0 and counts["slowdown"] + counts["reset"] == 12
        assert counts["slowdown"] > 0 and counts["reset"] > 0


def test_proxy_answers_502_when_the_target_is_down_and_stops_with_open_connections() -> None:
    threads_before = threading.active_count()
    dead = f"http://127.0.0.1:{free_port()}"
    with faulty_proxy(dead, failure_rate=0.0) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().status == 502
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        idle.connect()  # an open connection that never sends a request
        started = time.monotonic()
    assert time.monotonic() - started < 3
    assert proxy.counts["upstream_error"] == 1
    assert threading.active_count() == threads_before
    conn.close()
    idle.close()


def test_azure_server_says_how_to_install_azurite(monkeypatch: pytest.MonkeyPatch) -> None:
    import servers

    monkeypatch.setattr(servers, "AZURITE_BIN", servers.AZURITE_DIR / "missing" / "azurite")
    with (
        pytest.raises(AzuriteNotInstalledError, match="npm ci --prefix infra/azurite"),
        azure_server(),
    ):
        pass


def test_boto3_through_a_proxy_without_failures_gets_identical_bytes(s3: S3Server) -> None:
    from boto3.s3.transfer import TransferConfig

    data = os.urandom(6 * 1024 * 1024 + 123)
    make_bucket(s3, "proxied")
    with faulty_proxy(s3.endpoint_url, failure_rate=0.0, delay_seconds=0.05) as proxy:
        client = s3_client(proxy.url)
        # Multipart upload (5 MiB parts) and plain puts, all through the proxy.
        client.upload_fileobj(
            io.BytesIO(data),
            "proxied",
            "big.bin",
            Config=TransferConfig(
                multipart_threshold=5 * 1024 * 1024,
                multipart_chunksize=5 * 1024 * 1024,
                use_threads=False,
            ),
        )
        client.put_object(Bucket="proxied", Key="small.bin", Body=b"0123456789")
        assert client.get_object(Bucket="proxied", Key="big.bin")["Body"].read() == data
        ranged = client.get_object(Bucket="proxied", Key="big.bin", Range="bytes=100-199")
        assert ranged["Body"].read() == data[100:200]
        assert client.head_object(Bucket="proxied", Key="small.bin")["ContentLength"] == 10
        listing = client.list_objects_v2(Bucket="proxied", MaxKeys=1)
        assert listing["KeyCount"] == 1 and listing["IsTruncated"]
        client.delete_object(Bucket="proxied", Key="small.bin")
        started = time.monotonic()
        client.list_buckets()
        assert time.monotonic() - started >= 0.05  # delay_seconds
        counts = proxy.counts.snapshot()
    # create, 2 parts, complete; put, get, range get, head, list, delete, list buckets
    assert counts == {"forwarded": 11, "slowdown": 0, "reset": 0, "upstream_error": 0}
    assert s3_client(s3).get_object(Bucket="proxied", Key="big.bin")["Body"].read() == data


def test_boto3_with_retries_reads_everything_through_a_failing_proxy(s3: S3Server) -> None:
    from botocore.config import Config

    make_bucket(s3, "flaky")
    objects = {f"obj/{i:02d}.bin": os.urandom(1000 + i) for i in range(50)}
    for key, data in objects.items():
        upload(s3, "flaky", key, data)

    with faulty_proxy(s3.endpoint_url, failure_rate=0.3, seed=0) as proxy:
        config = Config(retries={"max_attempts": 10, "mode": "standard"}, max_pool_connections=10)
        client = s3_client(proxy.url, config=config)
        listed = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket="flaky", PaginationConfig={"PageSize": 10}
            )
            for o in page["Contents"]
        ]
        assert listed == sorted(objects)

        def read(key: str) -> bytes:
            return client.get_object(Bucket="flaky", Key=key)["Body"].read()

        with ThreadPoolExecutor(max_workers=10) as pool:  # backoffs overlap: seconds, not tens
            got = dict(zip(objects, pool.map(read, objects), strict=True))
        counts = proxy.counts.snapshot()
    assert got == objects
    assert counts["slowdown"] > 0 and counts["reset"] > 0
    assert counts["forwarded"] == 50 + 5  # each read and listing page once, in the end


# --- clean stops --------------------------------------------------------------------------


def test_servers_stop_even_when_the_body_raises() -> None:
    before = set(running_children())
    with pytest.raises(RuntimeError, match="boom"), gcs_server() as server:
        assert set(running_children()) - before
        assert server.env["STORAGE_EMULATOR_HOST"] == server.endpoint_url
        raise RuntimeError("boom")
    assert set(running_children()) == before
    port = int(server.endpoint_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    with contextlib.closing(conn), pytest.raises(OSError):
        conn.request("GET", "/storage/v1/b")


def test_stop_process_kills_what_ignores_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    stop_process(proc, grace=0.5)
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
