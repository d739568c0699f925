"""Shared fixtures: the real offline data folder and one small tokenizer trained on real text."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NANOCHAT_SHARED_DATA", REPO.parent / "shared" / "data"))

# Two cores: keep each test process on predictable threads (see ENVIRONMENT.md on thread collapse).
torch.set_num_threads(int(os.environ.get("NANOCHAT_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "pretrain").is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set NANOCHAT_SHARED_DATA")
    return SHARED_DATA


def shard_texts(shared: Path, shard: int = 0, max_chars: int = 2_000_000) -> list[str]:
    texts, n = [], 0
    for t in pq.read_table(shared / "pretrain" / f"shard_{shard:05d}.parquet", columns=["text"])["text"].to_pylist():
        texts.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return texts


@pytest.fixture(scope="session")
def small_tokenizer(shared_data):
    """A RustBPE tokenizer with a 512-token vocabulary, trained on ~1 MB of real shard text."""
    from nanochat.tokenizer import RustBPETokenizer

    return RustBPETokenizer.train_from_iterator(iter(shard_texts(shared_data, 0, 1_000_000)), 512)


@pytest.fixture(scope="session")
def tokenizer_base_dir(tmp_path_factory, small_tokenizer):
    """A NANOCHAT_BASE_DIR holding only tokenizer/ (tokenizer.pkl + token_bytes.pt) of `small_tokenizer`."""
    from nanochat.tokenizer import save_token_bytes

    base = tmp_path_factory.mktemp("base")
    small_tokenizer.save(base / "tokenizer")
    save_token_bytes(small_tokenizer, base / "tokenizer")
    return base
