"""
The artifact store: where checkpoints, tokenizers and reports live between assets.

Assets pass keys and URIs (never pickled objects). One interface, two backends, both Dagster resources:

- `LocalArtifactStore(root)`: files under root/<key> (the embedded default).
- `S3ArtifactStore(bucket, prefix, endpoint_url, ...)`: AWS S3 or anything speaking S3 (SeaweedFS, MinIO).

Guarantees shared by both:
- Writes are atomic: an object is staged under `.staging/` and only then moved to its key (os.replace locally, a
  server-side copy on S3), so a reader never sees a half-written checkpoint, even if the writer dies.
- A directory (`put_dir`) is published by its `manifest.json`, written last: it exists only when the manifest
  exists, and the manifest's sha256 identifies its content.
- Reads are verified: `get_dir` checks every file's sha256 against the manifest, and caches the download under
  the manifest's sha256 so a second read of the same content downloads nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import dagster as dg
from pydantic import Field, PrivateAttr

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
STAGING = ".staging"  # reserved top-level prefix for in-flight writes; give it a lifecycle rule on real buckets
_CHUNK = 1 << 20
T = TypeVar("T")


class ArtifactStoreError(RuntimeError):
    """The store could not complete an operation (unreachable endpoint, denied access, ...)."""


class ArtifactIntegrityError(ArtifactStoreError):
    """A stored or downloaded file does not match its recorded size or sha256."""


@dataclass(frozen=True)
class ArtifactInfo:
    """What was published: for a directory, `uri` points at the prefix and `sha256` is the manifest's."""

    key: str
    uri: str
    size: int
    sha256: str

    def to_metadata(self) -> dict[str, Any]:
        """Plain values for a MaterializeResult's metadata."""
        return {"key": self.key, "uri": self.uri, "bytes": self.size, "sha256": self.sha256}


# ---------------------------------------------------------------------------------------------------------------
# The interface: public operations implemented once on top of a few backend primitives.


class ArtifactStore(dg.ConfigurableResource, ABC):
    """Abstract artifact store; annotate asset parameters with this type to accept either backend."""

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ArtifactInfo:
        """Upload one file atomically and return its URI, size and sha256."""
        key = validate_key(key)
        path = Path(local_path)
        if not path.is_file():
            raise FileNotFoundError(f"put_file: {path} is not a file")
        size, digest = path.stat().st_size, sha256_file(path)
        self._upload(path, key, size, digest)
        return ArtifactInfo(key, self.uri(key), size, digest)

    def put_dir(self, local_dir: str | os.PathLike[str], key_prefix: str) -> ArtifactInfo:
        """Upload every file under local_dir, then publish the directory by writing its manifest last."""
        prefix = validate_key(key_prefix)
        root = Path(local_dir)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if not files:
            raise ValueError(f"put_dir: {root} holds no files")
        manifest_key = f"{prefix}/{MANIFEST_NAME}"
        # Republishing: unpublish first, so no reader pairs the old manifest with half-replaced files.
        self._delete_keys([manifest_key])
        entries = []
        for path in files:
            rel = path.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                raise ValueError(f"put_dir: {path} would clash with the directory's own {MANIFEST_NAME}")
            info = self.put_file(path, f"{prefix}/{rel}")
            entries.append({"path": rel, "size": info.size, "sha256": info.sha256})
        manifest = _dump_json({"version": 1, "files": entries})
        self._put_bytes(manifest_key, manifest)
        total = sum(e["size"] for e in entries)
        return ArtifactInfo(prefix, self.uri(prefix), total, hashlib.sha256(manifest).hexdigest())

    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> Path:
        """Download one object to dest_path (atomically replaced; verified against the recorded sha256 if any)."""
        dest = Path(dest_path)
        self._fetch(validate_key(key), dest, expected_sha256=None)
        return dest

    def get_dir(self, key_prefix: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local copy of a published directory, at <cache>/<manifest sha256[:16]>/ (manifest.json included).

        Files already in the cache are reused when their sha256 matches the manifest (hashing is far cheaper
        than a download); missing or corrupt ones are downloaded again and verified.
        """
        prefix = validate_key(key_prefix)
        raw = self._read_bytes(f"{prefix}/{MANIFEST_NAME}")
        digest = hashlib.sha256(raw).hexdigest()
        entries = _parse_manifest(raw, self.uri(prefix))
        target = Path(cache_dir or default_cache_dir()).expanduser() / digest[:16]
        for entry in entries:
            path = target / entry["path"]
            if path.is_file() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]:
                continue
            if path.exists():
                log.warning("cached %s does not match the manifest of %s; downloading it again", path, self.uri(prefix))
            self._fetch(f"{prefix}/{entry['path']}", path, expected_sha256=entry["sha256"])
        _write_atomic(target / MANIFEST_NAME, raw)
        return target

    def is_published(self, key_prefix: str) -> bool:
        """Whether a directory was completely published (its manifest exists)."""
        return self.exists(f"{validate_key(key_prefix)}/{MANIFEST_NAME}")

    def read_json(self, key: str) -> Any:
        return json.loads(self._read_bytes(validate_key(key)))

    def put_bytes(self, key: str, data: bytes) -> ArtifactInfo:
        """Publish a small in-memory object (a report, a pointer) atomically."""
        return self._put_bytes(validate_key(key), data)

    def write_json(self, key: str, obj: Any) -> ArtifactInfo:
        """Serialize obj (sorted keys, so equal objects give equal sha256) and publish it atomically."""
        return self._put_bytes(validate_key(key), _dump_json(obj))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under prefix/ (manifests first, so directories unpublish before files vanish)."""
        prefix = validate_key(prefix)  # an empty prefix would mean "everything": refused
        keys = self.list_keys(prefix)
        is_manifest = [k.rsplit("/", 1)[-1] == MANIFEST_NAME for k in keys]
        self._delete_keys([k for k, m in zip(keys, is_manifest) if m])
        self._delete_keys([k for k, m in zip(keys, is_manifest) if not m])
        return len(keys)

    # -- what each backend provides ----------------------------------------------------------------------------

    @abstractmethod
    def uri(self, key: str) -> str:
        """file:///abs/path or s3://bucket/prefix/key."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Sorted keys under prefix/ (all keys for ""), without in-flight staging objects."""

    @abstractmethod
    def _upload(self, path: Path, key: str, size: int, sha256: str) -> None:
        """Publish a local file at key atomically."""

    @abstractmethod
    def _download(self, key: str, dest: Path) -> str | None:
        """Copy the object at key to dest; return the sha256 recorded at upload, if the backend keeps one."""

    @abstractmethod
    def _read_bytes(self, key: str) -> bytes:
        """The whole object; FileNotFoundError naming the URI when it does not exist."""

    @abstractmethod
    def _delete_keys(self, keys: list[str]) -> None:
        """Delete these keys; missing ones are fine."""

    # -- shared helpers ----------------------------------------------------------------------------------------

    def _put_bytes(self, key: str, data: bytes) -> ArtifactInfo:
        with tempfile.TemporaryDirectory(prefix="artifact-") as tmp:
            path = Path(tmp) / "data"
            path.write_bytes(data)
            return self.put_file(path, key)

    def _fetch(self, key: str, dest: Path, expected_sha256: str | None) -> None:
        """Download key next to dest, verify it, then os.replace it into place (readers never see a partial)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
        try:
            recorded = self._download(key, tmp)
            expected = expected_sha256 or recorded
            if expected is not None:
                actual = sha256_file(tmp)
                if actual != expected:
                    raise ArtifactIntegrityError(
                        f"sha256 mismatch for {key!r} ({self.uri(key)}): expected {expected}, downloaded {actual}."
                        " The stored file is corrupt or was replaced while reading; republish it.")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Local directory backend.


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under a local directory (the embedded default; also fine on NFS)."""

    root: str = Field(description="Directory holding the artifacts (created on first write).")

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root_path / validate_key(key, allow_empty=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        base, root = self._path(prefix), self.root_path
        if not base.is_dir():
            return []
        keys = (p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if not _is_internal(k))

    def _upload(self, path: Path, key: str, size: int, sha256: str) -> None:
        # Staged on the same file system as the target, so os.replace is an atomic rename.
        staging = self.root_path / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / uuid.uuid4().hex
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the data reaches the disk before the rename makes it visible
            if tmp.stat().st_size != size:
                raise ArtifactIntegrityError(f"staged copy of {path} for {self.uri(key)} has the wrong size")
            final = self._path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def _download(self, key: str, dest: Path) -> str | None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"artifact {key!r} not found at {self.uri(key)}")
        shutil.copyfile(src, dest)
        return None  # no sidecar: files written by put_file are trusted; get_dir checks against the manifest

    def _read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"artifact {key!r} not found at {self.uri(key)}")
        return path.read_bytes()

    def _delete_keys(self, keys: list[str]) -> None:
        root = self.root_path
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # Prune directories left empty, so list_keys and `ls` show no ghosts of deleted artifacts.
            parent = path.parent
            while parent != root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


# ---------------------------------------------------------------------------------------------------------------
# S3 backend (boto3).


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

        return sorted(k for k in self._retrying("list", prefix or "/", run) if not _is_internal(k))

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


# ---------------------------------------------------------------------------------------------------------------
# Factory and small helpers.


def artifact_store_from_url(url: str) -> ArtifactStore:
    """`s3://bucket/prefix` (endpoint from NANOCHAT_S3_ENDPOINT_URL or AWS_ENDPOINT_URL), file:///path or a path."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"no bucket in {url!r}: expected s3://bucket/prefix")
        endpoint = os.environ.get("NANOCHAT_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
        return S3ArtifactStore(bucket=parsed.netloc, prefix=parsed.path.strip("/"), endpoint_url=endpoint)
    if parsed.scheme == "file":
        return LocalArtifactStore(root=unquote(parsed.path))
    if parsed.scheme == "":
        return LocalArtifactStore(root=str(Path(url).expanduser().resolve()))
    raise ValueError(f"unsupported artifact store URL {url!r}: use s3://bucket/prefix, file:///path or a path")


def validate_key(key: str, allow_empty: bool = False) -> str:
    """Keys are relative POSIX paths: no '..' / '.' / empty segments, no leading '/', no backslash or control
    characters, not under the reserved staging prefix. Anything else (spaces, unicode, +=&?#%) is fine."""
    if not isinstance(key, str):
        raise TypeError(f"artifact key must be a str, got {type(key).__name__}")
    if key == "" and allow_empty:
        return key
    parts = key.split("/")
    problem = (
        "is empty" if key == "" else
        "starts with '/'" if key.startswith("/") else
        "contains a backslash" if "\\" in key else
        "contains a control character" if any(ord(c) < 32 or ord(c) == 127 for c in key) else
        "has an empty, '.' or '..' segment" if any(p in ("", ".", "..") for p in parts) else
        f"is under the reserved prefix {STAGING}/" if parts[0] == STAGING else
        "is longer than 1024 bytes" if len(key.encode()) > 1024 else
        None
    )
    if problem:
        raise ValueError(f"invalid artifact key {key!r}: it {problem}")
    return key


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOCHAT_ARTIFACT_CACHE") or Path.home() / ".cache" / "nanochat" / "artifacts")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_internal(key: str) -> bool:
    return key.split("/", 1)[0] == STAGING


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _parse_manifest(raw: bytes, where: str) -> list[dict[str, Any]]:
    """The manifest's entries; their paths are validated like keys (a manifest must not escape the cache dir)."""
    try:
        entries = [{"path": validate_key(e["path"]), "size": int(e["size"]), "sha256": str(e["sha256"])}
                   for e in json.loads(raw)["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactIntegrityError(f"malformed {MANIFEST_NAME} at {where}: {exc}") from exc
    return entries


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
