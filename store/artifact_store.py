"""
The artifact store: where checkpoints, tokenizers and reports live between assets.

Assets pass keys and URIs (never pickled objects). One interface, two backends, plain pydantic models with no
Dagster in them (the chat app reads the store too; orchestration/defs/resources.py wraps them as a resource):

- `LocalArtifactStore(root)`: files under root/<key> (the embedded default).
- `S3ArtifactStore(bucket, prefix, endpoint_url, ...)` (store/s3_store.py): AWS S3 or anything speaking
  S3 (SeaweedFS, MinIO).

Guarantees shared by both:
- Writes are atomic: an object is staged under `.staging/` and only then moved to its key (os.replace locally, a
  server-side copy on S3), so a reader never sees a half-written checkpoint, even if the writer dies.
- A directory (`put_dir`) is published by its `manifest.json`, written last: it exists only when the manifest
  exists, and the manifest's sha256 identifies its content.
- Reads are verified: `get_dir` checks every file's sha256 against the manifest, and caches the download under
  the manifest's sha256 so a second read of the same content downloads nothing.
- Symbolic links are refused, on publish (a link in a published directory, or a linked file given to `put_file`)
  and on read (a link inside the local store's root): a link could make the store publish or serve a file from
  outside what the caller named (a host secret, another run's checkpoint).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
STAGING = ".staging"  # reserved top-level prefix for in-flight writes; give it a lifecycle rule on real buckets
_CHUNK = 1 << 20


class ArtifactStoreError(RuntimeError):
    """The store could not complete an operation (unreachable endpoint, denied access, ...)."""


class ArtifactIntegrityError(ArtifactStoreError):
    """A stored or downloaded file does not match its recorded size or sha256."""


class ArtifactFileError(ValueError):
    """A symbolic link or special file where the store only takes regular files (on publish, or under a local
    store's root). Not an ArtifactStoreError: retrying cannot fix it, so a step must not retry on it."""


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


class ArtifactStore(BaseModel, ABC):
    """Abstract artifact store: code that takes either backend takes this type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ArtifactInfo:
        """Upload one file atomically and return its URI, size and sha256."""
        key = validate_key(key)
        path = Path(local_path)
        if path.is_symlink():
            raise ArtifactFileError(f"put_file: {path} is a symbolic link; the artifact store never follows links. "
                                    "Publish the file it points to by its own path.")
        if not path.is_file():
            raise FileNotFoundError(f"put_file: {path} is not a file")
        size, digest = path.stat().st_size, sha256_file(path)
        self._upload(path, key, size, digest)
        return ArtifactInfo(key, self.uri(key), size, digest)

    def put_dir(self, local_dir: str | os.PathLike[str], key_prefix: str) -> ArtifactInfo:
        """Upload every file under local_dir, then publish the directory by writing its manifest last."""
        prefix = validate_key(key_prefix)
        root = Path(local_dir)
        files = published_files(root)
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
            if (not path.is_symlink() and path.is_file() and path.stat().st_size == entry["size"]
                    and sha256_file(path) == entry["sha256"]):
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
    """Artifacts as files under a local directory (the embedded default; also fine on NFS).

    Only regular files and real directories under the root count: a symbolic link anywhere under it (planted by
    hand, or by a process sharing the directory) is refused on every read rather than followed out of the root.
    """

    root: str = Field(description="Directory holding the artifacts (created on first write).")

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        """The file for key, after checking that no part of it below the root is a symbolic link."""
        root = self.root_path
        path = root
        for part in validate_key(key, allow_empty=True).split("/") if key else []:
            path = path / part
            if path.is_symlink():
                raise ArtifactFileError(f"{path} is a symbolic link inside the artifact store {root}; the store never "
                                        "follows links. Remove it and publish the artifact again.")
        return path

    def uri(self, key: str) -> str:
        return (self.root_path / validate_key(key, allow_empty=True)).as_uri()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        base, root = self._path(prefix), self.root_path
        if not base.is_dir():
            return []
        keys = []
        for directory, dirs, files in os.walk(base):  # os.walk does not descend into linked directories
            here = Path(directory)
            for name in [*dirs, *files]:
                if (here / name).is_symlink():
                    log.warning("ignoring symbolic link %s in the artifact store (never followed)", here / name)
            keys += [(here / f).relative_to(root).as_posix() for f in files if not (here / f).is_symlink()]
        return sorted(k for k in keys if not is_internal_key(k))

    def _upload(self, path: Path, key: str, size: int, sha256: str) -> None:
        # Staged on the same file system as the target, so os.replace is an atomic rename.
        staging = self.root_path / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / uuid.uuid4().hex
        try:
            with open_regular(path, "put_file") as src, open(tmp, "xb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())  # the data reaches the disk before the rename makes it visible
            if tmp.stat().st_size != size:
                raise ArtifactIntegrityError(f"staged copy of {path} for {self.uri(key)} has the wrong size")
            final = self._path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def _download(self, key: str, dest: Path) -> str | None:
        with self._open(key) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        return None  # no sidecar: files written by put_file are trusted; get_dir checks against the manifest

    def _read_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        if not path.exists():
            raise FileNotFoundError(f"artifact {key!r} not found at {self.uri(key)}")
        return open_regular(path, f"artifact {key!r}")

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
# Factory and small helpers.


def artifact_store_from_url(url: str) -> ArtifactStore:
    """`s3://bucket/prefix` (endpoint from NANOCHAT_S3_ENDPOINT_URL or AWS_ENDPOINT_URL), file:///path or a path."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"no bucket in {url!r}: expected s3://bucket/prefix")
        from store.s3_store import S3ArtifactStore  # boto3 loads only when S3 is used

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
    with open_regular(Path(path), "sha256") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def open_regular(path: Path, what: str) -> BinaryIO:
    """Open a regular file for reading, refusing a symbolic link (O_NOFOLLOW: no race between check and open) and
    anything that is not a regular file (a FIFO would block forever, a device never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactFileError(f"{what}: {path} is a symbolic link; the artifact store never follows links. "
                                    "Copy the file it points to in its place.") from e
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ArtifactFileError(f"{what}: {path} is not a regular file (mode {stat.filemode(mode)}); the artifact "
                                "store only holds regular files.")
    return os.fdopen(fd, "rb")


def published_files(root: Path) -> list[Path]:
    """Every file under root, sorted, for put_dir; refuses links and special files anywhere below root rather than
    publishing what they point at (a linked host file would otherwise leave the machine inside an artifact)."""
    if not root.is_dir():
        raise NotADirectoryError(f"put_dir: {root} is not a directory")
    files = []
    for directory, dirs, names in os.walk(root):
        here = Path(directory)
        for name in sorted([*dirs, *names]):
            path = here / name
            if path.is_symlink():
                raise ArtifactFileError(f"put_dir: {path} is a symbolic link (to {os.readlink(path)}); the artifact "
                                        f"store never follows links. Copy what it points to into {root} instead.")
            if name in names and not stat.S_ISREG(path.lstat().st_mode):
                raise ArtifactFileError(f"put_dir: {path} is not a regular file; only regular files are published.")
        files += [here / name for name in names]
    return sorted(files)


def is_internal_key(key: str) -> bool:
    """Whether key is an in-flight staging object (never listed or read as an artifact)."""
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
