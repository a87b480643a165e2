"""Byte-level access to local paths and ``s3://`` URIs for stage 0 (no Ray here).

Feature extraction reads items tables and images and writes feature files on a laptop (local
dirs) and on a cluster (S3 or an S3-compatible store) alike. The endpoint of an S3-compatible
store is ``endpoint`` when given, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
Writes are atomic: a local file is written to a temporary sibling and renamed; an S3 object is
uploaded in one ``put_object`` only once its bytes are complete, so a reader never sees half a
file.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qbert.utils.io import atomic_path

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base).joinpath(*parts))


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    if endpoint:
        return endpoint
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


@lru_cache(maxsize=8)
def _client(endpoint: str | None) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def s3_client(endpoint: str | None = None) -> Any:
    return _client(resolve_endpoint(endpoint))


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    """The bytes of a local file or S3 object; FileNotFoundError naming the URI when absent."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket"):
                raise FileNotFoundError(f"not found: {uri}") from None
            raise OSError(f"cannot read {uri}: {e}") from e
    return Path(uri).read_bytes()


def write_bytes_atomic(uri: str, data: bytes, endpoint: str | None = None) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data)
        return
    with atomic_path(uri) as tmp:
        tmp.write_bytes(data)


def exists(uri: str, endpoint: str | None = None) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client(endpoint).head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False
    return Path(uri).exists()


def list_files(prefix_dir: str, suffix: str = "", endpoint: str | None = None) -> list[str]:
    """Files directly inside a local dir or S3 "folder" (sorted); hidden/temporary names skipped."""
    if is_s3(prefix_dir):
        bucket, key = split_s3(prefix_dir)
        key = key.rstrip("/") + "/" if key else ""
        out: list[str] = []
        paginator = s3_client(endpoint).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(key):]
                if name and not name.startswith((".", "_")) and name.endswith(suffix):
                    out.append(f"s3://{bucket}/{obj['Key']}")
        return sorted(out)
    p = Path(prefix_dir)
    if not p.is_dir():
        return []
    return sorted(str(f) for f in p.iterdir()
                  if f.is_file() and not f.name.startswith((".", "_")) and f.name.endswith(suffix))


def read_parquet(uri: str, columns: list[str] | None = None, endpoint: str | None = None) -> pa.Table:
    if is_s3(uri):
        return pq.read_table(io.BytesIO(read_bytes(uri, endpoint)), columns=columns)
    if not Path(uri).is_file():
        raise FileNotFoundError(f"not found: {uri}")
    return pq.read_table(uri, columns=columns)


def write_parquet_atomic(uri: str, table: pa.Table, endpoint: str | None = None) -> None:
    if is_s3(uri):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_bytes_atomic(uri, buf.getvalue(), endpoint)
        return
    with atomic_path(uri) as tmp:
        pq.write_table(table, tmp)
