"""
Where an imported checkpoint comes from: the Hugging Face hub, a local directory or an S3 prefix.

    hf:OWNER/REPO[@REVISION]    huggingface_hub: list the repo, then snapshot_download only the files needed
    /path/to/dir                 a local directory (read in place)
    s3://bucket/prefix           objects under the prefix (boto3, the artifact store's client and credentials)

Every source answers two questions: which files are there and how big (`listing`), and give me these few
(`fetch`), so a 40-step hub repo costs one step's download. Sizes are known before anything is downloaded,
which is what lets the importer refuse an oversized file without reading it.

The hub honours HF_HUB_OFFLINE (the local hub cache only) and reads HF_TOKEN itself; the token is never
passed around or printed here. The revision's commit sha is recorded, so an import names exactly what it took.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

CARD_NAME = "README.md"
HF_PREFIX = "hf:"
REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
MAX_LISTED_FILES = 100_000  # a checkpoint repo holds tens of files; this bounds a hostile or mistaken prefix


class SourceError(RuntimeError):
    """The source cannot be read: unreachable, missing, or not what its name says."""


@dataclass
class Listing:
    """The files of a source (relative POSIX path -> size in bytes; -1 for anything but a regular file, None when
    unknown) and the revision they were read at."""

    files: dict[str, int | None]
    revision: str | None = None  # the hub commit sha; None for a directory or S3
    card: dict | None = field(default=None)  # the hub card's YAML metadata, when fetched


class Source:
    """A place holding a nanochat checkpoint. `describe()` is what the import records as its source."""

    def describe(self) -> str:
        raise NotImplementedError

    def default_name(self) -> str:
        raise NotImplementedError

    def listing(self) -> Listing:
        raise NotImplementedError

    def fetch(self, names: list[str], dest: Path) -> dict[str, Path]:
        """Local paths of the named files (downloaded under dest when the source is remote)."""
        raise NotImplementedError


def parse_source(text: str) -> Source:
    """hf:OWNER/REPO[@REVISION], s3://bucket/prefix, or a local directory."""
    text = text.strip()
    if text.startswith(HF_PREFIX):
        repo, _, revision = text[len(HF_PREFIX):].partition("@")
        if not REPO_ID_RE.fullmatch(repo) or ".." in repo:
            raise SourceError(f"bad hub source {text!r}: expected hf:OWNER/REPO or hf:OWNER/REPO@REVISION")
        if revision and (not REVISION_RE.fullmatch(revision) or ".." in revision):
            raise SourceError(f"bad revision {revision!r} in {text!r}: a branch, tag or commit sha")
        return HubSource(repo, revision or None)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise SourceError(f"no bucket in {text!r}: expected s3://bucket/prefix")
        return S3Source(text)
    if "://" in text:
        raise SourceError(f"unsupported source {text!r}: use hf:OWNER/REPO[@REVISION], s3://bucket/prefix or a "
                          "local directory")
    path = Path(text).expanduser()
    if not path.is_dir():
        raise SourceError(f"source {text!r} is not a directory (nor hf:OWNER/REPO or s3://bucket/prefix)")
    return LocalSource(path.resolve())


# -----------------------------------------------------------------------------
# A local directory


class LocalSource(Source):
    def __init__(self, root: Path):
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def default_name(self) -> str:
        return self.root.name

    def listing(self) -> Listing:
        files: dict[str, int] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):  # does not descend into symlinked directories
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                path = Path(dirpath) / name
                files[path.relative_to(self.root).as_posix()] = _regular_size(path)
                if len(files) > MAX_LISTED_FILES:
                    raise SourceError(f"{self.root} holds more than {MAX_LISTED_FILES} files: point at the "
                                      "checkpoint's own directory")
        return Listing(files)

    def fetch(self, names: list[str], dest: Path) -> dict[str, Path]:
        return {name: self.root / name for name in names}


def _regular_size(path: Path) -> int:
    """The size of a regular file (following a symlink); -1 for anything else (a FIFO would block a reader)."""
    try:
        st = path.stat()
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


# -----------------------------------------------------------------------------
# An S3 prefix (the artifact store's client: endpoint from NANOCHAT_S3_ENDPOINT_URL / AWS_ENDPOINT_URL,
# credentials from the boto3 chain)


class S3Source(Source):
    def __init__(self, url: str):
        from store.artifact_store import artifact_store_from_url

        self.url = url.rstrip("/")
        self.store = artifact_store_from_url(self.url)

    def describe(self) -> str:
        return self.url

    def default_name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.store.prefix else self.store.bucket

    def listing(self) -> Listing:
        prefix = self.store.prefix.strip("/")
        search = f"{prefix}/" if prefix else ""
        files: dict[str, int] = {}
        try:
            pages = self.store.client.get_paginator("list_objects_v2").paginate(Bucket=self.store.bucket,
                                                                                Prefix=search)
            for page in pages:
                for obj in page.get("Contents", []):
                    files[obj["Key"][len(search):]] = int(obj["Size"])
                if len(files) > MAX_LISTED_FILES:
                    raise SourceError(f"{self.url} holds more than {MAX_LISTED_FILES} objects: point at the "
                                      "checkpoint's own prefix")
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"cannot list {self.url} (endpoint {self.store.endpoint_url or 'AWS'}): "
                              f"{type(e).__name__}: {e}. Check NANOCHAT_S3_ENDPOINT_URL and the AWS credentials"
                              ) from e
        if not files:
            raise SourceError(f"nothing under {self.url}: check the bucket and prefix")
        return Listing(files)

    def fetch(self, names: list[str], dest: Path) -> dict[str, Path]:
        out = {}
        for name in names:
            print(f"downloading {self.url}/{name}", flush=True)
            out[name] = self.store.get_file(name, dest / name)
        return out


# -----------------------------------------------------------------------------
# The Hugging Face hub


class HubSource(Source):
    def __init__(self, repo_id: str, revision: str | None):
        self.repo_id, self.revision = repo_id, revision
        self._snapshot: Path | None = None  # offline: the cached snapshot folder
        self._sha: str | None = None

    def describe(self) -> str:
        return f"{HF_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    def default_name(self) -> str:
        return self.repo_id.replace("/", "-")

    def listing(self) -> Listing:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return self._cached_listing()
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = HfApi().model_info(self.repo_id, revision=self.revision, files_metadata=True)
        except GatedRepoError as e:
            raise SourceError(f"{self.describe()} is gated: accept its terms on the hub and set HF_TOKEN") from e
        except RevisionNotFoundError as e:
            raise SourceError(f"{self.describe()}: no revision {self.revision!r} on the hub") from e
        except RepositoryNotFoundError as e:
            raise SourceError(f"{self.describe()}: no such model repo on the hub (or it is private: set "
                              "HF_TOKEN)") from e
        except Exception as e:  # connection refused, DNS, timeout, hub down
            raise SourceError(unreachable_message(self.describe(), e)) from e
        self._sha = info.sha
        # A size the hub does not report is None: checked once the file is on disk.
        files = {s.rfilename: int(s.size) if s.size is not None else None for s in info.siblings or []}
        return Listing(files, revision=info.sha)

    def _cached_listing(self) -> Listing:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(self.repo_id, revision=self.revision))
        except Exception as e:
            raise SourceError(f"{self.describe()} is not in the local hub cache ({_hub_cache()}) and HF_HUB_OFFLINE "
                              "is set: unset HF_HUB_OFFLINE to download it, or import a local directory holding "
                              f"the files ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        self._snapshot, self._sha = folder, folder.name
        listing = LocalSource(folder).listing()
        return Listing(listing.files, revision=folder.name)

    def fetch(self, names: list[str], dest: Path) -> dict[str, Path]:
        if self._snapshot is None:
            from huggingface_hub import snapshot_download

            print(f"downloading {', '.join(names)} from {self.describe()} (commit {self._sha})", flush=True)
            try:  # pinned to the listed commit, so a push in between cannot mix two revisions
                self._snapshot = Path(snapshot_download(self.repo_id, revision=self._sha, allow_patterns=names))
            except Exception as e:
                raise SourceError(unreachable_message(self.describe(), e)) from e
        return {name: self._snapshot / name for name in names}


def unreachable_message(what: str, e: BaseException) -> str:
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    return (f"cannot reach the Hugging Face hub at {endpoint} for {what} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). If the files are already in the hub cache, set "
            "HF_HUB_OFFLINE=1; otherwise download them elsewhere and import the local directory")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_card_metadata(path: Path) -> dict | None:
    """The YAML metadata of a model card (README.md), or None when it has none or cannot be parsed."""
    from huggingface_hub import metadata_load

    try:
        return metadata_load(path)
    except Exception:  # a card is documentation: a malformed one must not fail an import
        return None
