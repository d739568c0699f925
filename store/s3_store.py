"""
The S3 backend of the artifact store (boto3): AWS S3, or SeaweedFS / MinIO through endpoint_url.

The interface and its guarantees are in store/artifact_store.py; this module only maps the backend
primitives onto S3 requests, with bounded retries and errors that say where and what to check.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, PrivateAttr

from store.artifact_store import (
    STAGING,
    ArtifactIntegrityError,
    ArtifactStore,
    ArtifactStoreError,
    is_internal_key,
    validate_key,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class S3ArtifactStore(ArtifactStore):
    """Artifacts as objects in an S3 bucket: AWS, or SeaweedFS / MinIO through endpoint_url.

    Credentials come from the standard boto3 chain (env AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile, role);
    they are never part of this config nor of any message.
    """

    bucket: str
    prefix: str = Field(default="", description="Key prefix inside the bucket for every artifact.")
    endpoint_url: str | None = Field(default=None, description="S3 endpoint, e.g. http://127.0.0.1:8333 (None: AWS).")
    region_name: str | None = None
    max_attempts: int = Field(default=5, description="botocore attempts per request (standard retry mode).")
    operation_retries: int = Field(default=2, description="Retries of a whole operation after transient errors.")
    multipart_threshold_mb: int = 64
    multipart_chunksize_mb: int = 16
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    _client: Any = PrivateAttr(default=None)

    # -- the client ----------------------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created once; boto3 clients are thread-safe)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": self.max_attempts},
                connect_timeout=self.connect_timeout_s,
                read_timeout=self.read_timeout_s,
                # Path-style URLs (endpoint/bucket/key): SeaweedFS and MinIO have no per-bucket DNS names.
                s3={"addressing_style": "path"} if self.endpoint_url else {},
            )
            session = boto3.session.Session()  # sessions are not thread-safe: one of our own
            self._client = session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region_name,
                                          config=config)
        return self._client

    @property
    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        mb = 1 << 20
        return TransferConfig(multipart_threshold=self.multipart_threshold_mb * mb,
                              multipart_chunksize=self.multipart_chunksize_mb * mb)

    def _full(self, key: str) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/{key}" if prefix and key else prefix or key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(validate_key(key, allow_empty=True))}"

    # -- public primitives -------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        key = validate_key(key)
        try:
            self._retrying("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._full(key)))
            return True
        except FileNotFoundError:
            return False

    def list_keys(self, prefix: str = "") -> list[str]:
        prefix = validate_key(prefix, allow_empty=True)
        full = self._full(prefix)
        search = f"{full}/" if full else ""
        strip = len(self._full("")) + 1 if self.prefix.strip("/") else 0

        def run() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=search)
            return [obj["Key"][strip:] for page in pages for obj in page.get("Contents", [])]

        return sorted(k for k in self._retrying("list", prefix or "/", run) if not is_internal_key(k))

    # -- backend primitives ------------------------------------------------------------------------------------

    def _upload(self, path: Path, key: str, size: int, sha256: str) -> None:
        """Upload to a staging key (multipart when large), check its size, then copy it server-side to the key.

        The final key only ever appears through the copy, complete; an interrupted upload leaves at most a
        staging object or an unfinished multipart upload, both invisible to list_keys and get_*.
        """
        final = self._full(key)

        def run() -> None:
            staged = self._full(f"{STAGING}/{uuid.uuid4().hex}/{key.rsplit('/', 1)[-1]}")
            try:
                self.client.upload_file(str(path), self.bucket, staged, Config=self._transfer,
                                        ExtraArgs={"Metadata": {"sha256": sha256}})
                stored = self.client.head_object(Bucket=self.bucket, Key=staged)["ContentLength"]
                if stored != size:
                    raise ArtifactIntegrityError(f"staged upload of {path} is {stored} bytes, expected {size}")
                # Managed copy: a multipart (UploadPartCopy) copy above the threshold; metadata is preserved.
                self.client.copy({"Bucket": self.bucket, "Key": staged}, self.bucket, final, Config=self._transfer)
            except BaseException as exc:
                # Tidy up unless the server is unreachable anyway (the cleanup would only add retries).
                if not _is_transient(exc):
                    self._discard(staged)
                raise
            self._discard(staged)

        self._retrying("upload", key, run)

    def _discard(self, full_key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full_key)
        except Exception as exc:  # best effort: a leftover staging object is harmless
            log.warning("could not delete staging object s3://%s/%s: %s", self.bucket, full_key, exc)

    def _download(self, key: str, dest: Path) -> str | None:
        def run() -> str | None:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            self.client.download_file(self.bucket, self._full(key), str(dest), Config=self._transfer)
            if dest.stat().st_size != head["ContentLength"]:
                raise ArtifactIntegrityError(f"download of {self.uri(key)} is truncated")
            return head.get("Metadata", {}).get("sha256")

        return self._retrying("download", key, run)

    def _read_bytes(self, key: str) -> bytes:
        return self._retrying(
            "read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read())

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start:start + 1000]
            objects = [{"Key": self._full(k)} for k in batch]
            resp = self._retrying("delete", batch[0], lambda o=objects: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": o, "Quiet": True}))
            if resp.get("Errors"):
                raise ArtifactStoreError(f"could not delete from s3://{self.bucket}: {resp['Errors'][:3]}")

    # -- retries and errors ------------------------------------------------------------------------------------

    def _retrying(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run fn, retrying the whole operation on transient errors (botocore already retried each request).

        Bounded: at most (operation_retries + 1) × max_attempts requests per step, with jittered backoff.
        """
        attempts = self.operation_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if _is_not_found(exc):
                    raise FileNotFoundError(f"artifact {key!r} not found at {self.uri(key)}") from exc
                if isinstance(exc, ArtifactStoreError):
                    raise
                if not _is_transient(exc) or attempt == attempts:
                    raise ArtifactStoreError(self._explain(op, key, exc, attempt)) from exc
                delay = min(2.0 ** (attempt - 1), 10.0) * random.uniform(0.5, 1.0)
                log.warning("S3 %s of %r failed (%s); retrying in %.1f s", op, key, type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _explain(self, op: str, key: str, exc: BaseException, attempts: int) -> str:
        endpoint = self.endpoint_url or f"AWS S3 ({self.region_name or 'default region'})"
        return (f"S3 {op} of key {key!r} ({self.uri(key)}) failed at endpoint {endpoint} after {attempts} "
                f"attempt(s) of up to {self.max_attempts} requests each: {type(exc).__name__}: {exc}. "
                f"Check that the endpoint is reachable, that bucket {self.bucket!r} exists, and that the "
                "credentials from the AWS chain (AWS_ACCESS_KEY_ID / AWS_PROFILE / role) can read and write it.")


def _error_chain(exc: BaseException) -> Iterable[BaseException]:
    """exc and what it wraps (boto3's S3UploadFailedError and RetriesExceededError hide the real error)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    for err in _error_chain(exc):
        if isinstance(err, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
            return True
        if isinstance(err, ClientError):
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.response.get("Error", {}).get("Code", "")
            return status >= 500 or code in {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"}
    return False


def _is_not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey",
                                                                                          "NotFound"}
