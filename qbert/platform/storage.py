"""Run-directory storage: local paths or ``s3://bucket/prefix`` URIs (AWS or S3-compatible).

The same ``--out`` value works on a laptop (a directory) and on a cluster (an S3 prefix):
stages always write to a local directory, and this module copies the finished directory to
its destination. The endpoint of an S3-compatible store comes from ``AWS_ENDPOINT_URL_S3``
(what Ray/pyarrow read) or ``MLFLOW_S3_ENDPOINT_URL`` (what MLflow reads); set both.
Every remote call is retried with bounded backoff (:mod:`qbert.platform.retry`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlencode

from qbert.platform.retry import RetryConfig, with_retries

T = TypeVar("T")

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); a clear error for anything else."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = str(uri)[len("s3://"):].split("?", 1)[0]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key.strip("/")


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    if is_s3(uri):
        base = str(uri).rstrip("/")
        return "/".join([base, *(p.strip("/") for p in parts if p)])
    return str(Path(uri).joinpath(*parts))


def s3_endpoint() -> str | None:
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_client(endpoint: str | None = None, connect_timeout: float = 3.0) -> Any:
    """A boto3 S3 client; botocore's own retries are off because :func:`with_retries` owns them."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "s3",
        endpoint_url=endpoint or s3_endpoint(),
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=BotoConfig(connect_timeout=connect_timeout, read_timeout=30, retries={"max_attempts": 1, "mode": "standard"}),
    )


def ray_storage_path(uri: str | os.PathLike) -> str:
    """A ``RunConfig.storage_path``: local dirs absolute; S3 with pyarrow options as query args.

    ``allow_delayed_open`` lets pyarrow upload a file smaller than one part (10 MiB) with a
    single PutObject instead of a multipart upload: fewer requests per checkpoint, and it works
    with S3-compatible stores whose multipart replies pyarrow rejects (moto 5 with pyarrow 25).
    A URI that already has a query is passed through as the user wrote it.
    """
    if not is_s3(uri):
        return str(Path(uri).resolve())
    if "?" in str(uri):
        return str(uri)
    query = {"allow_delayed_open": "true"}
    endpoint = s3_endpoint()
    if endpoint:
        scheme = "http" if endpoint.startswith("http://") else "https"
        query = {"endpoint_override": endpoint.split("://", 1)[-1], "scheme": scheme, **query}
    return f"{str(uri).rstrip('/')}?{urlencode(query)}"


_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def s3_call(fn: Callable[[], T], what: str, retry: RetryConfig | None = None) -> T:
    """``with_retries`` for S3 calls, with the user's mistakes as a ConfigError (exit 2): no
    credentials, access denied, a bucket that does not exist."""
    from qbert.config import ConfigError

    try:
        return with_retries(fn, what, retry)
    except Exception as e:
        # boto3's transfer layer wraps the ClientError (S3UploadFailedError): look through the chain
        chain = [e, e.__cause__, e.__context__]
        names = {type(x).__name__ for x in chain if x is not None}
        codes = {str(x.response.get("Error", {}).get("Code", "")) for x in chain
                 if isinstance(getattr(x, "response", None), dict)}
        if names & _NO_CREDENTIALS:
            raise ConfigError(f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give "
                              "the pod a role)") from None
        if codes & {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            raise ConfigError(f"{what}: access denied: check the S3 credentials and the bucket's policy") from None
        if codes & {"404", "NoSuchBucket"}:
            raise ConfigError(f"{what}: no such bucket") from None
        raise


def check_reachable(uri: str | os.PathLike, retry: RetryConfig | None = None) -> None:
    """Fail early (after bounded retries) when the S3 bucket of ``uri`` cannot be reached."""
    if not is_s3(uri):
        return
    bucket, _ = parse_s3(str(uri))
    client = s3_client()
    s3_call(lambda: client.head_bucket(Bucket=bucket), f"S3 bucket {bucket!r} at {s3_endpoint() or 'AWS'}", retry)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike, retry: RetryConfig | None = None) -> list[str]:
    """Copy a finished local directory to ``uri`` (a directory or an S3 prefix); returns the keys/paths."""
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"run directory to upload not found: {src}")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not is_s3(uri):
        dst = Path(uri)
        if dst.resolve() == src.resolve():
            return [str(p) for p in files]
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return [str(dst / p.relative_to(src)) for p in files]
    bucket, prefix = parse_s3(str(uri))
    client = s3_client()
    keys = []
    for p in files:
        key = "/".join(x for x in (prefix, p.relative_to(src).as_posix()) if x)
        s3_call(lambda p=p, key=key: client.upload_file(str(p), bucket, key), f"upload s3://{bucket}/{key}", retry)
        keys.append(key)
    return keys


def local_copy(uri: str, scratch: str | os.PathLike, only: Iterable[str]) -> Path:
    """``uri`` itself when local; for ``s3://``, the files ``only`` names fetched into ``scratch``."""
    if not is_s3(uri):
        return Path(uri)
    check_reachable(uri)
    return download_dir(uri, scratch, only=only)


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike, retry: RetryConfig | None = None,
                 only: Iterable[str] | None = None) -> Path:
    """Copy a directory or S3 prefix into ``local_dir`` (created); returns ``local_dir``. ``only``:
    just these top-level file names, those that exist (e.g. a run's model without its checkpoints)."""
    wanted = None if only is None else set(only)
    dst = Path(local_dir)
    dst.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        src = Path(uri)
        if not src.is_dir():
            raise FileNotFoundError(f"run directory not found: {src}")
        if src.resolve() != dst.resolve():
            if wanted is None:
                shutil.copytree(src, dst, dirs_exist_ok=True)
            for name in wanted or ():
                if (src / name).is_file():
                    shutil.copyfile(src / name, dst / name)
        return dst
    bucket, prefix = parse_s3(str(uri))
    client = s3_client()

    def list_keys() -> list[str]:
        keys, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix + "/" if prefix else ""}
            if token:
                kw["ContinuationToken"] = token
            page = client.list_objects_v2(**kw)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    for key in s3_call(list_keys, f"list s3://{bucket}/{prefix}", retry):
        rel = key[len(prefix):].lstrip("/") if prefix else key
        if wanted is not None and rel not in wanted:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        s3_call(lambda key=key, target=target: client.download_file(bucket, key, str(target)),
                     f"download s3://{bucket}/{key}", retry)
    return dst
