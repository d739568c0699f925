"""
Pretraining data: parquet shards with one `text` column (the FineWeb-Edu shard layout), read row group by
row group. The last shard (in sorted order) is the validation split; all others are training.

Shards live in $NANOCHAT_DATA_DIR, or <base_dir>/base_data by default. They get there in one of two ways:

    python -m nanochat.dataset -n 8              # download shard_00000..00007 of FineWeb-Edu (as the original)
    python -m nanochat.dataset --from-local DIR  # offline: repack .parquet/.jsonl/.txt files into the same layout
    python -m nanochat.dataset --verify          # read every shard, name the corrupt ones, exit non-zero if any

A shard only ever appears under its final name after it was checked (footer readable, `text` column present),
so a crash or a dropped connection leaves a `.partial` file behind, never a half shard that training would use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir

# The original's source: Karpathy's shuffled repack of FineWeb-Edu sample-100BT, 1823 shards of ~100 MB.
BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822
ROW_GROUP_SIZE = 1024  # documents per row group, as in the FineWeb-Edu shards (DDP ranks split by row group)
PARTIAL_SUFFIX = ".partial"


class ShardError(RuntimeError):
    """A shard is unreadable or has the wrong layout."""


# What to do about a bad shard; every ShardError ends with it.
REPAIR = "delete it and download or rebuild it (`python -m nanochat.dataset --verify` names every bad shard)"


def get_data_dir() -> Path:
    env = os.environ.get("NANOCHAT_DATA_DIR")
    return Path(env) if env else get_base_dir() / "base_data"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_base_url() -> str:
    """$NANOCHAT_DATASET_URL (a mirror, or a loopback server in tests), else Hugging Face."""
    return os.environ.get("NANOCHAT_DATASET_URL") or BASE_URL


# ---------------------------------------------------------------------------------------------------------
# Reading


def list_parquet_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """All complete shards in sorted order (temporary/partial downloads are ignored)."""
    data_dir = Path(data_dir) if data_dir else get_data_dir()
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"no shard directory {data_dir}: download shards with `python -m nanochat.dataset -n 8` "
            "or point NANOCHAT_DATA_DIR at a directory of parquet files"
        )
    return sorted(p for p in data_dir.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))


def split_files(split: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise FileNotFoundError(
            f"need at least 2 shards in {data_dir or get_data_dir()} (the last one is validation), "
            f"found {len(files)}"
        )
    files = files[:-1] if split == "train" else files[-1:]
    # Opening a footer costs milliseconds; finding a truncated shard hours into training costs the run.
    for path in files:
        open_shard(path)
    return files


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard, naming it in the error if it is corrupt or lacks a `text` column of strings."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ShardError(f"shard {path} is corrupt or not parquet ({type(e).__name__}: {e}); {REPAIR}") from e
    if "text" not in pf.schema_arrow.names:
        raise ShardError(f"shard {path} has no 'text' column (columns: {pf.schema_arrow.names}); {REPAIR}")
    # Checked here, from the footer: numbers in `text` would otherwise surface as a bare TypeError mid-tokenizing.
    text_type = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise ShardError(f"shard {path} has a 'text' column of {text_type}, not strings; {REPAIR}")
    return pf


def read_texts(pf: pq.ParquetFile, path: Path, rg_idx: int) -> list[str]:
    """The documents of one row group. A footer can be whole while a page is damaged (bit rot, a bad copy):
    pyarrow then raises a bare OSError/ArrowInvalid, so name the shard and the row group."""
    try:
        return pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except Exception as e:
        raise ShardError(f"shard {path} row group {rg_idx} is unreadable ({type(e).__name__}: {e}); {REPAIR}") from e


def iter_row_groups(
    split: str, start: int = 0, step: int = 1, data_dir: str | os.PathLike | None = None
) -> Iterator[tuple[int, int, list[str]]]:
    """
    Yield (shard_index, row_group_index, texts) for one pass over a split. Row groups start, start+step, ...
    of each shard (DDP ranks read disjoint row groups with start=rank, step=world_size).
    """
    for pq_idx, path in enumerate(split_files(split, data_dir)):
        pf = open_shard(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield pq_idx, rg_idx, read_texts(pf, path, rg_idx)


def iter_texts(split: str, data_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Every document of a split, once, in order."""
    for _, _, texts in iter_row_groups(split, data_dir=data_dir):
        yield from texts


def verify_shard(path: Path, full: bool = False) -> str | None:
    """None if the shard is usable, else why not. full=True also decodes every row group (slower, finds bit rot)."""
    try:
        pf = open_shard(path)
        for rg_idx in range(pf.num_row_groups if full else 0):
            read_texts(pf, path, rg_idx)
    except Exception as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------------------
# Downloading


@dataclass
class DownloadSummary:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present and valid
    corrupt: list[str] = field(default_factory=list)  # were present but corrupt, so downloaded again
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason of the last attempt
    retries: int = 0
    bytes_received: int = 0


class DownloadError(RuntimeError):
    def __init__(self, summary: DownloadSummary):
        self.summary = summary
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(summary.failed.items()))
        super().__init__(f"{len(summary.failed)} shard(s) failed to download:\n{lines}")


class _Incomplete(OSError):
    """The connection ended before Content-Length bytes arrived (http.client returns short reads silently)."""


# 4xx means the request itself is wrong (e.g. a shard past the end): retrying only delays the error.
# 408 (timeout) and 429 (rate limited) are the transient exceptions.
def _is_permanent(e: Exception) -> bool:
    return isinstance(e, HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429)


def _fetch(url: str, partial: Path, timeout: float) -> int:
    """
    Download url into `partial`, resuming from its current size with an HTTP Range request. A server that
    ignores Range answers 200 with the whole file: then we start over. Returns bytes received.
    """
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "nanochat-dagster"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and offset:  # nothing past our offset: the partial file is already whole
            return 0
        raise
    with resp:
        # 206 with our offset: append. 200 (no Content-Range): the server ignored Range, so rewrite from byte 0.
        resuming = bool(offset) and resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        if resp.status == 206 and not resuming:  # a range we did not ask for: start again from byte 0
            partial.unlink(missing_ok=True)
            raise _Incomplete(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
        expected = resp.headers.get("Content-Length")
        received = 0
        with open(partial, "ab" if resuming else "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)  # written as it arrives, so a dropped connection still leaves bytes to resume from
                received += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    if expected is not None and received != int(expected):
        raise _Incomplete(f"connection closed after {received:,} of {int(expected):,} bytes")
    return received


def _download_one(
    index: int, data_dir: Path, base_url: str, max_attempts: int, backoff: float, timeout: float
) -> tuple[str, str, str, int, int]:
    """Returns (name, status, reason, retries, bytes); status is downloaded / skipped / corrupt / failed."""
    name = shard_name(index)
    path, partial = data_dir / name, data_dir / (name + PARTIAL_SUFFIX)
    status = "downloaded"
    if path.exists():
        problem = verify_shard(path)
        if problem is None:
            return name, "skipped", "", 0, 0
        print(f"{name}: existing file is corrupt, downloading it again ({problem})", flush=True)
        path.unlink()
        status = "corrupt"
    url = f"{base_url.rstrip('/')}/{name}"
    received, reason = 0, ""
    for attempt in range(1, max_attempts + 1):
        try:
            received += _fetch(url, partial, timeout)
            problem = verify_shard(partial)
            if problem is not None:
                partial.unlink()  # complete but wrong: resuming it would only append to garbage
                raise ShardError(f"downloaded file is not a valid shard: {problem}")
            os.replace(partial, path)  # atomic: readers see no shard or a whole, checked one
            return name, status, "", attempt - 1, received
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            if _is_permanent(e):
                partial.unlink(missing_ok=True)
                return name, "failed", f"{reason} ({url})", attempt - 1, received
            if attempt < max_attempts:
                wait = backoff * 2 ** (attempt - 1)
                print(f"{name}: attempt {attempt}/{max_attempts} failed ({reason}); retrying in {wait:.1f}s",
                      flush=True)
                time.sleep(wait)
    return name, "failed", f"{reason} (after {max_attempts} attempts, {url})", max_attempts - 1, received


def download_shards(
    num_shards: int,
    data_dir: str | os.PathLike | None = None,
    workers: int = 4,
    base_url: str | None = None,
    max_attempts: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> DownloadSummary:
    """
    Make shard_00000 .. shard_{num_shards-1} present and valid in data_dir (num_shards=-1: all 1823).
    Valid shards are skipped, corrupt ones are downloaded again, partial ones resumed. Raises DownloadError
    (carrying the summary) naming every shard that still failed after max_attempts.
    """
    num_shards = MAX_SHARD + 1 if num_shards == -1 else min(num_shards, MAX_SHARD + 1)
    data_dir = Path(data_dir) if data_dir else get_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    # urllib (stdlib) rather than requests: Range requests and streaming need nothing more, and no extra dependency.
    base_url = base_url or get_base_url()
    summary, lock, done, t0 = DownloadSummary(), threading.Lock(), 0, time.time()
    print(f"downloading {num_shards} shards from {base_url} to {data_dir} with {workers} workers", flush=True)

    def work(index: int) -> None:
        nonlocal done
        name, status, reason, retries, received = _download_one(
            index, data_dir, base_url, max_attempts, backoff, timeout)
        with lock:  # one progress line per shard; the bar is plain text so logs stay readable
            done += 1
            summary.retries += retries
            summary.bytes_received += received
            if status == "failed":
                summary.failed[name] = reason
            else:
                getattr(summary, status).append(name)
            bar = "#" * (20 * done // num_shards)
            mb, dt = summary.bytes_received / 1e6, time.time() - t0
            print(f"[{bar:<20}] {done}/{num_shards} {name} {status} ({mb:,.1f} MB, {mb / max(dt, 1e-9):,.1f} MB/s)",
                  flush=True)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(work, range(num_shards)))  # list() re-raises any unexpected exception from a worker
    for names in (summary.downloaded, summary.skipped, summary.corrupt):
        names.sort()
    print(f"done: {len(summary.downloaded) + len(summary.corrupt)} downloaded ({len(summary.corrupt)} replaced "
          f"corrupt files), {len(summary.skipped)} already present, {len(summary.failed)} failed, "
          f"{summary.retries} retries", flush=True)
    if summary.failed:
        raise DownloadError(summary)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Local source: the same shard layout built from files on disk, so offline users run the same code path


def _iter_local_docs(path: Path) -> Iterator[str]:
    """
    Documents of one source file. .parquet: its `text` column. .jsonl: the `text` field of each line.
    .txt: the whole file is one document, like one FineWeb-Edu page (blank lines are paragraph breaks, not
    document breaks). Empty documents are dropped.
    """
    if path.suffix == ".parquet":
        pf = open_shard(path)  # same check and error as for a shard
        for batch in pf.iter_batches(columns=["text"]):
            yield from (t for t in batch.column("text").to_pylist() if t and t.strip())
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError(f"'text' is {type(text).__name__}, not a string")
                except Exception as e:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field "
                                     f"({type(e).__name__}: {e})") from e
                if text.strip():
                    yield text
    else:
        text = path.read_text(encoding="utf-8")
        if text.strip():
            yield text


def _write_shard(docs: list[str], path: Path, row_group_size: int) -> None:
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    # The original's settings: zstd, no dictionary (documents are unique), row groups of 1024 documents.
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd", use_dictionary=False)
    os.replace(tmp, path)


def build_shards_from_local(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    docs_per_shard: int = 50 * ROW_GROUP_SIZE,
    row_group_size: int = ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> list[Path]:
    """
    Repack every .parquet / .jsonl / .txt file under source_dir (recursively, in sorted path order, so the same
    input gives the same shards) into shard_00000.parquet, ... in out_dir. Documents keep their order, so the
    last shard (validation) holds the last documents. A source that fits in one shard is split ~90/10, because
    training needs a train and a val shard.
    """
    source_dir = Path(source_dir)
    out_dir = Path(out_dir) if out_dir else get_data_dir()
    if not source_dir.is_dir():
        raise FileNotFoundError(f"no local source directory {source_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = list_parquet_files(out_dir)
    if existing and not overwrite:
        # Old shards left beside new ones would be trained on, and the last of them would become validation.
        raise FileExistsError(f"{out_dir} already holds {len(existing)} parquet files; empty it or use overwrite")
    for p in existing:
        p.unlink()
    out_resolved = out_dir.resolve()
    sources = sorted(
        p for p in source_dir.rglob("*")
        if p.is_file() and p.suffix in (".parquet", ".jsonl", ".txt") and out_resolved not in p.resolve().parents
    )
    if not sources:
        raise FileNotFoundError(f"no .parquet, .jsonl or .txt files under {source_dir}")

    shards: list[Path] = []
    buffer: list[str] = []

    def flush(docs: list[str]) -> None:
        path = out_dir / shard_name(len(shards))
        _write_shard(docs, path, row_group_size)
        shards.append(path)
        print(f"wrote {path.name}: {len(docs):,} documents", flush=True)

    for src in sources:
        for doc in _iter_local_docs(src):
            buffer.append(doc)
            if len(buffer) == docs_per_shard:
                flush(buffer)
                buffer = []
    if not shards and len(buffer) >= 2:
        cut = len(buffer) - max(1, len(buffer) // 10)
        flush(buffer[:cut])
        buffer = buffer[cut:]
    if buffer:
        flush(buffer)
    if len(shards) < 2:
        raise ValueError(f"{source_dir} has {len(buffer)} document(s); need at least 2 (one train, one val)")
    return shards


# ---------------------------------------------------------------------------------------------------------
# CLI


def verify_dir(data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Decode every shard in data_dir; returns {name: problem} for the corrupt ones (empty if all are fine)."""
    data_dir = Path(data_dir) if data_dir else get_data_dir()
    bad = {}
    for path in list_parquet_files(data_dir):
        problem = verify_shard(path, full=True)
        if problem is not None:
            bad[path.name] = problem
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu shards, build them from local files, "
                                                 "or verify them")
    parser.add_argument("-n", "--num-shards", "--num-files", dest="num_shards", type=int, default=-1,
                        help=f"shards to download, shard_00000 upwards (default -1: all {MAX_SHARD + 1})")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default 4)")
    parser.add_argument("--data-dir", default=None, help="shard directory (default: $NANOCHAT_DATA_DIR or "
                                                         "<base_dir>/base_data)")
    parser.add_argument("--base-url", default=None, help=f"download from here ($NANOCHAT_DATASET_URL, {BASE_URL})")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries per shard, with exponential backoff")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--from-local", metavar="DIR", default=None,
                      help="build shards from .parquet/.jsonl/.txt files in DIR instead of downloading")
    mode.add_argument("--verify", action="store_true", help="read every shard; name corrupt ones, exit 1 if any")
    parser.add_argument("--docs-per-shard", type=int, default=50 * ROW_GROUP_SIZE, help="with --from-local")
    parser.add_argument("--overwrite", action="store_true", help="with --from-local: replace existing shards")
    args = parser.parse_args(argv)

    try:
        if args.verify:
            data_dir = Path(args.data_dir) if args.data_dir else get_data_dir()
            files = list_parquet_files(data_dir)
            bad = verify_dir(data_dir)
            for name, problem in bad.items():
                print(f"CORRUPT {name}: {problem}")
            print(f"{len(files) - len(bad)} of {len(files)} shards in {data_dir} are valid")
            return 1 if bad or not files else 0
        if args.from_local:
            build_shards_from_local(args.from_local, args.data_dir, args.docs_per_shard, overwrite=args.overwrite)
        else:
            download_shards(args.num_shards, args.data_dir, args.workers, args.base_url, args.max_attempts)
    except (DownloadError, ShardError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
