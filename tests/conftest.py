"""Shared fixtures: the real offline data folder and one small tokenizer trained on real text."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NANOCHAT_SHARED_DATA", REPO.parent / "shared" / "data"))

# Two cores: keep each test process on predictable threads (see ../shared/ENVIRONMENT.md on thread collapse).
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
def other_tokenizer(shared_data):
    """Another 512-token RustBPE tokenizer (trained on shard 1): the vocab size of `small_tokenizer`, other ids."""
    from nanochat.tokenizer import RustBPETokenizer

    return RustBPETokenizer.train_from_iterator(iter(shard_texts(shared_data, 1, 1_000_000)), 512)


@pytest.fixture(scope="session")
def tokenizer_base_dir(tmp_path_factory, small_tokenizer):
    """A NANOCHAT_BASE_DIR holding only tokenizer/ (tokenizer.pkl + token_bytes.pt) of `small_tokenizer`."""
    from nanochat.tokenizer import save_token_bytes

    base = tmp_path_factory.mktemp("base")
    small_tokenizer.save(base / "tokenizer")
    save_token_bytes(small_tokenizer, base / "tokenizer")
    return base


# --- A real S3 server (SeaweedFS) for the artifact store's tests -------------------------------------------------


@pytest.fixture
def base_dir(tmp_path, tokenizer_base_dir, shared_data, monkeypatch):
    """A nanochat base dir with the session's tokenizer, reading shards from the shared pretraining sample."""
    shutil.copytree(tokenizer_base_dir / "tokenizer", tmp_path / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(shared_data / "pretrain"))
    return tmp_path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One `weed mini` for the session, with credentials in os.environ for boto3's default chain.

    Fails (never skips) when the server cannot start: the S3 backend must be tested against a real server.
    """
    from s3server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3Server  # tests/ is on sys.path (rootless)

    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = SeaweedS3Server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except Exception as exc:  # a test failure carrying the server's log
        pytest.fail(f"SeaweedFS could not start: {exc}")
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_store(s3_server):
    """An S3ArtifactStore on a fresh bucket of the session's server (retries kept short for fault tests)."""
    import uuid

    import boto3
    from botocore.config import Config
    from s3server import REGION

    from store.s3_store import S3ArtifactStore

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=REGION,
                 config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=bucket)
    return S3ArtifactStore(bucket=bucket, prefix="runs", endpoint_url=s3_server.endpoint_url, region_name=REGION,
                           max_attempts=2, operation_retries=1)


# --- The chat app's demo: tiny promoted checkpoints (tests/test_app*.py) ------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory, small_tokenizer):
    """Two tiny chat models (v1, v2; 40 training steps apart) published like the pipeline publishes them, both
    promoted in turn (v2 is the latest), with eval history; plus test-only CORE/ChatCORE rows for v1.

    Module-scoped: each app test module gets its own (tests change the store and restore it within a module)."""
    from app_server import SEQUENCE_LEN

    from importer.demo import build_demo
    from store import eval_store

    root = tmp_path_factory.mktemp("app-demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-layer model: one thread is fastest, and it does not collapse on a busy machine
    try:  # 40 steps (~2 s) teach it the commonest tokens, so replies stream readable text rather than stray bytes
        out = build_demo(root, tokenizer=small_tokenizer, steps=40, versions=2, sequence_len=SEQUENCE_LEN, n_embd=32,
                         n_layer=1)
    finally:
        torch.set_num_threads(threads)
    v1, v2 = out["checkpoints"]
    with eval_store.connect_rw(out["db_path"]) as conn:  # made-up numbers, for the picker's labels only
        run = v1["key"].rsplit("/", 1)[1]
        eval_store.record_eval_results(conn, run, "sft", v1["sha256"], {"all": {"ChatCORE[5/6]": 0.1234}},
                                       profile="demo", depth=1)
        eval_store.record_eval_results(conn, run, "base", "base-of-v1", {"all": {"CORE[18/22]": 0.0567},
                                                                          "hellaswag": {"accuracy": 0.31}},
                                       profile="demo", depth=1)
        eval_store.record_eval_results(conn, run, "sft", v1["sha256"], {"ARC-Easy": {"accuracy": 0.28}},
                                       profile="demo", depth=1)
    return {**out, "root": root, "v1": v1, "v2": v2}
