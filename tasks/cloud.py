"""Bucket backends of the storage interface: S3 (boto3), GCS (gcsfs), Azure Blob (adlfs).

Credentials come the way each cloud's users expect: the client libraries' own
environment variables and default chains (AWS profile/role and `AWS_ENDPOINT_URL` for
S3-compatible stores; GOOGLE_APPLICATION_CREDENTIALS and `STORAGE_EMULATOR_HOST`;
AZURE_STORAGE_CONNECTION_STRING, account name + key or SAS, DefaultAzureCredential).
Nothing here ever puts a credential into a message. Objects are read into memory, never
to disk; listings are paged lazily, so a bucket of millions of keys starts at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlparse

from tasks.errors import CurateError, foreign
from tasks.monitor import reading
from tasks.naming import escape_name, unescape_name
from tasks.storage import ObjectInfo, Storage, open_ranges

# Remote reads are latency-bound: many in flight hide the round trips.
REMOTE_READ_CONCURRENCY = 32
# Parts of a streamed S3 upload (S3's minimum is 5 MiB).
UPLOAD_PART_BYTES = 16 << 20
LIST_PAGE_SIZE = 1000


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix")."""
    parsed = urlparse(url)
    if not parsed.netloc:
        raise CurateError(f"{url}: no bucket or container in the URL")
    return parsed.netloc, parsed.path.strip("/")


class _BucketStorage(Storage):
    """Keys are joined to a prefix inside one bucket or container."""

    read_concurrency = REMOTE_READ_CONCURRENCY

    def __init__(self, url: str) -> None:
        super().__init__(url.rstrip("/"))
        self.bucket, self.prefix = split_url(url)

    def _full(self, key: str) -> str:
        """The bucket's key for a name (`tasks.naming`: escapes undone, but a `\\xHH`
        from a local file name stays as written: a bucket key is UTF-8)."""
        key = unescape_name(key, raw_bytes=False)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return escape_name(full_key[len(self.prefix) + 1 :] if self.prefix else full_key)

    def _list_prefix(self, prefix: str) -> str:
        """What to ask the service for: the root's prefix as a folder, plus `prefix`."""
        root = self.prefix + "/" if self.prefix else ""
        return root + unescape_name(prefix, raw_bytes=False)

    def prefix_of(self, other: Storage) -> str | None:
        if type(other) is not type(self) or not isinstance(other, _BucketStorage):
            return None
        if other.bucket != self.bucket:
            return None
        if other.prefix == self.prefix:
            return ""
        if self.prefix and not other.prefix.startswith(self.prefix + "/"):
            return None
        return escape_name(other.prefix[len(self.prefix) + 1 if self.prefix else 0 :]) + "/"

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        with reading():
            data = self._read_range(key, start, end)
        self._count(len(data))
        return data

    def read(self, key: str) -> bytes:
        with reading():
            data = self._read(key)
        self._count(len(data))
        return data

    def open(self, key: str) -> BinaryIO:
        return open_ranges(self, key, self._size(key))

    def probe(self) -> None:
        # A listing, not a lookup: a lookup in a missing bucket or container is just False.
        next(iter(self.list("LATEST")), None)

    def _size(self, key: str) -> int:
        raise NotImplementedError

    def _read(self, key: str) -> bytes:
        """The whole object, retried and with errors translated by the backend."""
        raise NotImplementedError

    def _read_range(self, key: str, start: int, end: int) -> bytes:
        raise NotImplementedError


class S3Storage(_BucketStorage):
    """S3 and S3-compatible stores (MinIO, Ceph, R2) through boto3."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        import boto3
        from botocore.config import Config

        # One retry policy, ours (Storage._retrying): it also covers a body cut off
        # mid-stream, which botocore does not retry, and it counts every retry for the
        # report. AWS_ENDPOINT_URL is honoured by boto3 itself.
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=REMOTE_READ_CONCURRENCY + 8,
            connect_timeout=10,
            read_timeout=60,
        )
        self.client = boto3.session.Session().client("s3", config=config)

    def is_transient(self, exc: BaseException) -> bool:
        # HTTPClientError covers resets mid-request and timeouts (ConnectionClosedError,
        # ReadTimeoutError); ConnectionError covers refused connections.
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )
        from botocore.exceptions import (
            HTTPClientError,
            IncompleteReadError,
            ResponseStreamingError,
        )
        from urllib3.exceptions import ProtocolError

        streaming = (
            BotoConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ResponseStreamingError,
            ProtocolError,
        )
        return (
            super().is_transient(exc)
            or isinstance(exc, streaming)
            or (_s3_status(exc) in (429, 500, 502, 503, 504))
            # A conditional write that met a concurrent delete: AWS says to send it again.
            or _s3_code(exc) == "ConditionalRequestConflict"
        )

    def _call(
        self,
        operation: str,
        key: str | None = None,
        *,
        then: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One S3 call, retried when transient, its errors translated. `then` runs inside
        the attempt, so a body cut off while it is read is retried with its request."""

        def attempt() -> Any:
            try:
                response = getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
                return then(response) if then else response
            except Exception as exc:
                raise self._translate(exc, key) from None

        return self._retrying(attempt, self.join(key) if key is not None else self.url)

    def _translate(self, exc: Exception, key: str | None) -> Exception:
        from botocore.exceptions import ClientError, NoCredentialsError

        where = self.join(key) if key is not None else self.url
        if isinstance(exc, NoCredentialsError):
            return CurateError(
                f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role)"
            )
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound") and key is not None:
                return FileNotFoundError(where)
            if code == "PreconditionFailed" and key is not None:
                return FileExistsError(where)
            if code == "NoSuchBucket":
                return CurateError(f"s3://{self.bucket}: no such bucket")
            if code in (
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "403",
                "ExpiredToken",
            ):
                return CurateError(f"{where}: access denied ({code}); check the credentials")
        if self.is_transient(exc):
            return exc  # retried by the caller, or reported as unreachable
        return CurateError(f"{where}: {foreign(exc)}")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        token: dict[str, Any] = {}  # boto3 keyword arguments of the next page
        while True:
            with reading():  # a listing page is a read for the monitor too
                page = self._call(
                    "list_objects_v2",
                    Prefix=self._list_prefix(prefix),
                    MaxKeys=LIST_PAGE_SIZE,
                    **token,
                )
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # folder placeholders
                    yield ObjectInfo(
                        self._relative(item["Key"]), int(item["Size"]), item["ETag"].strip('"')
                    )
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _read(self, key: str) -> bytes:
        return bytes(self._call("get_object", key, then=_body, Key=self._full(key)))

    def _read_range(self, key: str, start: int, end: int) -> bytes:
        return bytes(
            self._call(
                "get_object", key, then=_body, Key=self._full(key), Range=f"bytes={start}-{end - 1}"
            )
        )

    def _size(self, key: str) -> int:
        return int(self._call("head_object", key, Key=self._full(key))["ContentLength"])

    def write(self, key: str, data: bytes) -> None:
        self._call("put_object", key, Key=self._full(key), Body=data)

    def write_stream(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Multipart upload in 16 MiB parts: S3 publishes the object only on completion."""
        buffer, upload_id = bytearray(), None
        parts: list[dict[str, Any]] = []
        try:
            for chunk in chunks:
                buffer += chunk
                if len(buffer) >= UPLOAD_PART_BYTES:
                    if upload_id is None:
                        upload_id = self._call("create_multipart_upload", key, Key=self._full(key))[
                            "UploadId"
                        ]
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
                    buffer.clear()
            if upload_id is None:
                self.write(key, bytes(buffer))
                return
            if buffer:
                parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
            self._call(
                "complete_multipart_upload",
                key,
                Key=self._full(key),
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            if upload_id is not None:
                self._call("abort_multipart_upload", key, Key=self._full(key), UploadId=upload_id)
            raise

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        response = self._call(
            "upload_part",
            key,
            Key=self._full(key),
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        return {"ETag": response["ETag"], "PartNumber": number}

    def create_exclusive(self, key: str, data: bytes) -> bool:
        try:
            self._call("put_object", key, Key=self._full(key), Body=data, IfNoneMatch="*")
        except FileExistsError:
            # 412: it exists, maybe from our own attempt that landed before a retried
            # failure (a reset after the upload); only then does it hold our bytes.
            return self._holds(key, data)
        return True

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Key=self._full(key))
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Key=self._full(key))


def _body(response: Any) -> bytes:
    return bytes(response["Body"].read())


def _s3_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _s3_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None


class _FsspecStorage(_BucketStorage):
    """GCS and Azure share fsspec's file-system API. gcsfs and azure-core retry
    throttling and transient errors themselves, so `_retrying` tries once and turns a
    persistent failure into a one-line error."""

    fs: Any
    attempts = 1

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{self._full(key)}"

    def _op(self, key: str | None, operation: Callable[[], Any]) -> Any:
        """One client call: the client's own retries, then ours (one attempt) turning a
        persistent failure into a one-line error; other errors translated by `_guard`."""
        return self._retrying(
            lambda: self._guard(operation, key), self.join(key) if key else self.url
        )

    def _read(self, key: str) -> bytes:
        return bytes(self._op(key, lambda: self.fs.cat_file(self._path(key))))

    def _read_range(self, key: str, start: int, end: int) -> bytes:
        return bytes(self._op(key, lambda: self.fs.cat_file(self._path(key), start, end)))

    def _size(self, key: str) -> int:
        return int(self._guard(lambda: self.fs.info(self._path(key))["size"], key))

    def write(self, key: str, data: bytes) -> None:
        # A GCS or Azure upload is published whole when it completes: atomic already.
        self._op(key, lambda: self.fs.pipe_file(self._path(key), data))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # mode="create" is a precondition the service checks: ifGenerationMatch=0 (GCS),
        # If-None-Match: * (Azure); both clients raise FileExistsError when it fails.
        def create() -> bool:
            try:
                self.fs.pipe_file(self._path(key), data, mode="create")
            except FileExistsError:
                return False  # here, not in _guard, which takes OSErrors for transient
            return True

        # The client retries on its own, unseen: a failed precondition may follow our own
        # first attempt landing, so the object is compared (see Storage.create_exclusive).
        return bool(self._op(key, create)) or self._holds(key, data)

    def exists(self, key: str) -> bool:
        return bool(self._guard(lambda: self.fs.exists(self._path(key)), key))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._guard(lambda: self.fs.rm_file(self._path(key)), key)
        self.fs.invalidate_cache()

    def _guard(self, operation: Any, key: str | None) -> Any:
        try:
            return operation()
        except FileNotFoundError:
            raise FileNotFoundError(self.join(key) if key else self.url) from None
        except Exception as exc:
            if self.is_transient(exc):
                raise
            where = self.join(key) if key else self.url
            if isinstance(exc, PermissionError) or _status(exc) in (401, 403):
                raise CurateError(f"{where}: access denied; check the credentials") from None
            if getattr(exc, "error_code", None) == "ContainerNotFound":  # Azure
                raise CurateError(f"az://{self.bucket}: no such container") from None
            raise CurateError(f"{where}: {foreign(exc)}") from None

    def is_transient(self, exc: BaseException) -> bool:
        import aiohttp

        return (
            super().is_transient(exc)
            or isinstance(exc, aiohttp.ClientError | OSError)
            and not isinstance(exc, FileNotFoundError | PermissionError)
            or _status(exc) in (408, 429, 500, 502, 503, 504)
        )


def _status(exc: BaseException) -> int | None:
    for attribute in ("code", "status_code", "status"):
        value = getattr(exc, attribute, None)
        if isinstance(value, int):
            return value
    return None


class GCSStorage(_FsspecStorage):
    """Google Cloud Storage through gcsfs (`STORAGE_EMULATOR_HOST` for emulators)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # gcsfs.GCSFileSystem may be an experimental subclass (chosen at import time)
        # whose gRPC bucket probe hangs against emulators; the core class never is.
        from gcsfs.core import GCSFileSystem

        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            # Never real credentials against an emulator.
            endpoint = emulator if "://" in emulator else f"http://{emulator}"
            self.fs = GCSFileSystem(endpoint_url=endpoint, token="anon")
        else:
            self.fs = GCSFileSystem()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        token: dict[str, str] = {}
        while True:
            with reading():
                page = self._op(None, functools.partial(self._page, prefix, token))
            for item in page.get("items", []):
                if not item["name"].endswith("/"):
                    yield ObjectInfo(
                        self._relative(item["name"]),
                        int(item["size"]),
                        str(item.get("generation", item.get("etag", ""))),
                    )
            if not page.get("nextPageToken"):
                return
            token = {"pageToken": page["nextPageToken"]}

    def _page(self, prefix: str, token: dict[str, str]) -> Any:
        """One page of the JSON API's object listing."""
        return self.fs.call(
            "GET",
            "b/{}/o",
            self.bucket,
            json_out=True,
            prefix=self._list_prefix(prefix),
            maxResults=LIST_PAGE_SIZE,
            **token,
        )

    def _guard(self, operation: Any, key: str | None) -> Any:
        try:
            return super()._guard(operation, key)
        except FileNotFoundError:
            if key is None:
                raise CurateError(f"gs://{self.bucket}: no such bucket") from None
            raise


class AzureStorage(_FsspecStorage):
    """Azure Blob Storage through adlfs; `az://container/prefix`."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        import adlfs

        options: dict[str, Any] = {}
        if os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
            options["connection_string"] = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        elif os.environ.get("AZURE_STORAGE_ACCOUNT_NAME"):
            options["account_name"] = os.environ["AZURE_STORAGE_ACCOUNT_NAME"]
            if os.environ.get("AZURE_STORAGE_ACCOUNT_KEY"):
                options["account_key"] = os.environ["AZURE_STORAGE_ACCOUNT_KEY"]
            elif os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
                options["sas_token"] = os.environ["AZURE_STORAGE_SAS_TOKEN"]
            else:
                options["anon"] = False  # DefaultAzureCredential
        else:
            raise CurateError(
                f"{url}: no Azure credentials (set AZURE_STORAGE_CONNECTION_STRING, or "
                "AZURE_STORAGE_ACCOUNT_NAME with a key, SAS token or Azure login)"
            )
        try:
            self.fs = adlfs.AzureBlobFileSystem(**options)
        except ValueError as exc:  # a malformed connection string: never repeated
            raise CurateError(
                f"{url}: the Azure credentials do not parse ({foreign(exc, 120)}); check "
                "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME"
            ) from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        from fsspec.asyn import sync

        pages = sync(self.fs.loop, self._pages, self._list_prefix(prefix))
        while True:
            try:
                with reading():
                    blobs = self._retrying(
                        lambda: self._guard(lambda: sync(self.fs.loop, _next_page, pages), None),
                        self.url,
                    )
            except FileNotFoundError:
                raise CurateError(f"az://{self.bucket}: no such container") from None
            if blobs is None:
                return
            for blob in blobs:
                yield ObjectInfo(
                    self._relative(blob.name), int(blob.size), str(blob.etag).strip('"')
                )

    async def _pages(self, prefix: str) -> Any:
        container = self.fs.service_client.get_container_client(self.bucket)
        return container.list_blobs(
            name_starts_with=prefix, results_per_page=LIST_PAGE_SIZE
        ).by_page()

    def is_transient(self, exc: BaseException) -> bool:
        from azure.core.exceptions import ServiceRequestError, ServiceResponseError

        return super().is_transient(exc) or isinstance(
            exc, ServiceRequestError | ServiceResponseError
        )


async def _next_page(pages: Any) -> list[Any] | None:
    """The next page of an async Azure listing as a list, or None at the end."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        page = await pages.__anext__()
    except StopAsyncIteration:
        return None
    except ResourceNotFoundError:
        raise FileNotFoundError("container") from None
    return [blob async for blob in page]


BACKENDS: dict[str, type[Storage]] = {
    "s3": S3Storage,
    "gs": GCSStorage,
    "gcs": GCSStorage,
    "az": AzureStorage,
    "abfs": AzureStorage,
}
