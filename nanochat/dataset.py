"""
Pretraining data: parquet shards with one `text` column (the FineWeb-Edu shard layout), read row group by
row group. The last shard (in sorted order) is the validation split; all others are training.

Shards live in $NANOCHAT_DATA_DIR, or <base_dir>/base_data by default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import get_base_dir


class ShardError(RuntimeError):
    """A shard is unreadable or has the wrong layout."""


def get_data_dir() -> Path:
    env = os.environ.get("NANOCHAT_DATA_DIR")
    return Path(env) if env else get_base_dir() / "base_data"


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
    return files[:-1] if split == "train" else files[-1:]


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard, naming it in the error if it is corrupt or lacks the `text` column."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ShardError(f"shard {path} is corrupt or not parquet ({type(e).__name__}: {e}); "
                         "delete it and download or rebuild it") from e
    if "text" not in pf.schema_arrow.names:
        raise ShardError(f"shard {path} has no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


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
            try:
                texts = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                raise ShardError(f"shard {path} row group {rg_idx} is unreadable: {e}") from e
            yield pq_idx, rg_idx, texts


def iter_texts(split: str, data_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Every document of a split, once, in order."""
    for _, _, texts in iter_row_groups(split, data_dir=data_dir):
        yield from texts
