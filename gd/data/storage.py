"""Tiny local-or-S3 file helpers with fail-fast errors.

S3 goes through boto3 with `S3_ENDPOINT_URL` (any S3-compatible store) and the default credential chain
(environment, ~/.aws/config, instance roles). Credentials are never read, printed or stored by this code; an
endpoint URL carrying ``user:password@`` is printed redacted (gd.secrets.redact), and so is every error message.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from gd.io import atomic_write_bytes
from gd.secrets import redact


def is_remote(url: str) -> bool:
    return "://" in str(url)


def split_s3(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket/prefix URL (only s3:// and local paths are supported)")
    return u.netloc, u.path.lstrip("/")


def join(url: str, *parts: str) -> str:
    if is_remote(url):
        return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(url, *parts))


def s3_client(connect_timeout: float = 5.0, attempts: int = 2):
    """boto3 S3 client on S3_ENDPOINT_URL (None = AWS) with short timeouts so a bad endpoint fails in seconds."""
    import boto3
    from botocore.config import Config
    cfg = Config(connect_timeout=connect_timeout, read_timeout=60, retries={"max_attempts": attempts, "mode": "standard"})
    return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=cfg)


def endpoint_name() -> str:
    """S3_ENDPOINT_URL for messages, with any password in it redacted."""
    return redact(os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (S3_ENDPOINT_URL unset)")


def describe_s3_error(exc: Exception, url: str) -> str:
    """Turn a boto3 failure into a sentence saying what to fix (credentials redacted, also from boto's text)."""
    return redact(_describe_s3_error(exc, url))


def redacted(exc: BaseException) -> RuntimeError:
    """A stand-in for ``exc`` to chain (``raise ... from redacted(exc)``): botocore's messages quote the endpoint URL,
    password included, and a chained original would print it in every traceback."""
    return RuntimeError(redact(f"{type(exc).__name__}: {exc}"))


def _describe_s3_error(exc: Exception, url: str) -> str:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
    bucket, _ = split_s3(url)
    if isinstance(exc, EndpointConnectionError) or "Could not connect" in str(exc) or "Connect timeout" in str(exc):
        return (f"cannot reach the S3 endpoint {endpoint_name()} for {url}: check S3_ENDPOINT_URL "
                "(scheme, host, port) and that the object store is running")
    if isinstance(exc, NoCredentialsError):
        return (f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                "(~/.aws/credentials); credentials never go into configs")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            return f"bucket {bucket!r} does not exist on {endpoint_name()} (from {url}): create it or fix the URL"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied to {url} on {endpoint_name()} ({code}): check the credentials' permissions"
        return f"S3 error {code} for {url} on {endpoint_name()}: {exc}"
    return f"S3 request for {url} on {endpoint_name()} failed: {type(exc).__name__}: {exc}"


def check_bucket(url: str, client=None) -> None:
    """Raise a clear error when the bucket of `url` is missing or the endpoint cannot be reached."""
    bucket, _ = split_s3(url)
    client = client or s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        raise ConnectionError(describe_s3_error(exc, url)) from redacted(exc)


def exists(url: str, client=None) -> bool:
    if not is_remote(url):
        return Path(url).exists()
    from botocore.exceptions import ClientError
    bucket, key = split_s3(url)
    try:
        (client or s3_client()).head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def read_bytes(url: str, client=None) -> bytes:
    if not is_remote(url):
        return Path(url).read_bytes()
    bucket, key = split_s3(url)
    return (client or s3_client()).get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(url: str, data: bytes, client=None) -> None:
    """Atomic for local paths (temp file + os.replace); a single PUT (atomic by S3 semantics) for s3://."""
    if is_remote(url):
        bucket, key = split_s3(url)
        (client or s3_client()).put_object(Bucket=bucket, Key=key, Body=data)
        return
    atomic_write_bytes(url, data)


def write_json(url: str, obj, client=None) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode(), client)


def read_json(url: str, client=None):
    return json.loads(read_bytes(url, client))


def delete_tree(url: str, client=None) -> None:
    """Remove a local directory or every object under an s3:// prefix."""
    if not is_remote(url):
        shutil.rmtree(url, ignore_errors=True)
        return
    bucket, prefix = split_s3(url)
    client = client or s3_client()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
