"""Reading many small objects from S3: our storage layer vs a sequential boto3 loop.

Both read the same 2,000 objects from moto's S3 server (a subprocess on loopback), in
the same run: the baseline is the plain `for key: get_object(...).read()` loop; ours is
`S3Storage.read_many` (bounded concurrent GETs, in order). A second round goes through a
proxy that adds 10 ms before each request, the round-trip time of a real bucket in the
same region, which is where concurrency matters most. Target: ours >= 4x sequential.

    python -m bench.bench_s3_read [--objects 2000] [--size 4096] [--latency-ms 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# The emulator helpers live with the tests that also use them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import faulty_proxy, make_bucket, s3_client, s3_server  # noqa: E402


def sequential(endpoint: str, bucket: str, keys: list[str]) -> float:
    client = s3_client(endpoint)
    started = time.perf_counter()
    for key in keys:
        client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return time.perf_counter() - started


def ours(endpoint: str, bucket: str, keys: list[str]) -> float:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    from tasks.storage import open_storage

    storage = open_storage(f"s3://{bucket}")
    started = time.perf_counter()
    total = sum(len(data) for _, data in storage.read_many(keys) if isinstance(data, bytes))
    seconds = time.perf_counter() - started
    assert total == storage.bytes_read
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    args = parser.parse_args()

    with s3_server() as server:
        os.environ.update(server.env)
        make_bucket(server, "bench")
        client = s3_client(server)
        keys = [f"objects/{i:06d}.jpg" for i in range(args.objects)]
        payload = os.urandom(args.size)
        for key in keys:
            client.put_object(Bucket="bench", Key=key, Body=payload)
        print(f"{args.objects} objects of {args.size} bytes on moto's S3 server")
        rounds = [("direct to the server", server.endpoint_url, 0.0)]
        rounds.append((f"with {args.latency_ms:g} ms per request", "", args.latency_ms / 1000))
        for label, endpoint, delay in rounds:
            if delay:
                with faulty_proxy(server.endpoint_url, failure_rate=0.0, delay_seconds=delay) as p:
                    base, mine = sequential(p.url, "bench", keys), ours(p.url, "bench", keys)
            else:
                base, mine = sequential(endpoint, "bench", keys), ours(endpoint, "bench", keys)
            n = args.objects
            print(f"{label}:")
            print(f"  sequential boto3 loop: {n / base:8.1f} objects/s ({base:.2f} s)")
            print(f"  storage layer:         {n / mine:8.1f} objects/s ({mine:.2f} s)")
            print(f"  ratio: {base / mine:.1f}x (target >= 4x)")


if __name__ == "__main__":
    main()
