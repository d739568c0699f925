"""nanochat-import (importer/cli.py): checkpoints written by this project's own save path, laid out flat
(as hub uploads are) and as a nanochat base dir, imported from a local directory, SeaweedFS through s3://, and the
Hugging Face hub path (HF_HUB_OFFLINE=1 over a real hub cache layout, so the real snapshot_download runs). After an
import the served model continues a prompt exactly as the checkpoint loaded directly does; bad sources fail with a
message naming the problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import torch
from botocore.config import Config

from importer.cli import ImportRequest, import_checkpoint
from importer.hub import SourceError
from importer.layout import LayoutError
from importer.verify import UnsupportedArchitecture, VerificationError
from nanochat.checkpoint_manager import (
    build_model,
    meta_path,
    model_path,
    read_meta,
    recorded_tokenizer,
    save_checkpoint,
)
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import fingerprint, save_token_bytes
from store import eval_store
from store.artifact_store import LocalArtifactStore
from store.catalog import discover, load_candidate
from store.promotion import read_pointer

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The sea is"
SHA = "0123456789abcdef0123456789abcdef01234567"
CARD = """---
license: mit
model-index:
- name: tiny-import
  results:
  - task: {type: text-generation}
    dataset: {name: ARC-Easy, type: allenai/ai2_arc}
    metrics: [{type: accuracy, value: 38.76, name: ARC-Easy accuracy}]
  - task: {type: text-generation}
    dataset: {name: GSM8K, type: openai/gsm8k}
    metrics: [{type: accuracy, value: 0.0455}]
---
A tiny nanochat model for tests.
"""


def save_tiny(checkpoint_dir: Path, step: int, vocab: int, seed: int, meta_extra: dict, n_layer: int = 2) -> GPT:
    """A randomly initialised model saved by nanochat's own save path (lm_head randomised so greedy text varies)."""
    config = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None,
                    {"step": step, "model_config": config.to_dict(), **meta_extra})
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory, small_tokenizer):
    """A flat upload (sft steps 5 and 10, a card with model-index) and a base-dir tree (base step 5, sft step 10)."""
    root = tmp_path_factory.mktemp("import-sources")
    flat, tree = root / "flat", root / "tree"
    vocab = small_tokenizer.get_vocab_size()
    for step in (5, 10):
        save_tiny(flat, step, vocab, seed=step, meta_extra={"val_loss": 1.5})
    small_tokenizer.save(flat)
    save_token_bytes(small_tokenizer, flat)
    (flat / "README.md").write_text(CARD)
    small_tokenizer.save(tree / "tokenizer")
    save_token_bytes(small_tokenizer, tree / "tokenizer")
    save_tiny(tree / "base_checkpoints" / "d2", 5, vocab, seed=1, meta_extra={"val_bpb": 3.0, "loop_state": {}})
    save_tiny(tree / "chatsft_checkpoints" / "d2", 10, vocab, seed=2, meta_extra={"val_loss": 1.2})
    return {"flat": flat, "tree": tree, "root": root}


@pytest.fixture
def target(tmp_path):
    return {"store": LocalArtifactStore(root=str(tmp_path / "artifacts")), "db": tmp_path / "evals.duckdb",
            "work": tmp_path / "work"}


def run_import(target, source: str, **kw) -> dict:
    return import_checkpoint(ImportRequest(source, **kw), target["store"], target["db"], target["work"],
                             log=lambda s: None)


def greedy(model, tokenizer, n: int = 12) -> list[int]:
    prompt = tokenizer.encode(PROMPT, prepend=tokenizer.get_bos_token_id())
    rows, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=n, temperature=0.0)
    return rows[0][len(prompt):]


def assert_serves_like_direct(target, result, checkpoint_dir: Path, tokenizer) -> None:
    """The app's loader on the published import continues the prompt exactly as the source checkpoint does."""
    candidates, _, notes = discover(target["store"], target["db"])
    candidate = next(c for c in candidates if c.id == result["checkpoint_key"])
    assert candidate.origin == result["source"] and result["source"] in candidate.label()
    loaded = load_candidate(target["store"], candidate, "cpu")
    direct, _, _ = build_model(checkpoint_dir, result["step"], "cpu", tokenizer=tokenizer)
    assert loaded.sha256 == result["sha256"] and loaded.step == result["step"]
    expected = greedy(direct, tokenizer)
    assert len(expected) > 0 and greedy(loaded.model, loaded.tokenizer) == expected


def db_rows(target, name: str) -> tuple[tuple, list]:
    with eval_store.connect_ro(target["db"]) as conn:
        run = conn.execute("SELECT profile, depth, source, revision FROM runs WHERE run_id = ?",
                           [f"import:{name}"]).fetchone()
        checkpoints = conn.execute("SELECT stage, step, uri FROM checkpoints WHERE run_id = ?",
                                   [f"import:{name}"]).fetchall()
    return run, checkpoints


# -----------------------------------------------------------------------------
# Sources and layouts


def test_flat_directory_newest_step_phase_from_meta(target, sources, small_tokenizer):
    result = run_import(target, str(sources["flat"]), name="flat")
    assert (result["phase"], result["step"], result["model_tag"]) == ("sft", 10, "d2")
    assert result["checkpoint_key"] == "sft_checkpoint/imported/d2/flat"
    store = target["store"]
    assert store.is_published(result["checkpoint_key"]) and store.is_published("tokenizer/imported/flat")
    run, checkpoints = db_rows(target, "flat")
    assert run == ("imported", 2, str(sources["flat"]), None)
    assert checkpoints == [("sft", 10, result["checkpoint_uri"])]
    # The card's model-index is shown beside ours (a percentage read as a fraction).
    assert "| ARC-Easy |  | 0.3876 |" in result["comparison"] and "| GSM8K |  | 0.0455 |" in result["comparison"]
    assert_serves_like_direct(target, result, sources["flat"], small_tokenizer)


def test_base_dir_tree_phase_and_step_chosen(target, sources, small_tokenizer):
    result = run_import(target, str(sources["tree"]), phase="base", name="tree-base")
    assert (result["phase"], result["step"]) == ("base", 5)
    assert result["checkpoint_key"] == "base_checkpoint/imported/d2/tree-base"
    assert_serves_like_direct(target, result, sources["tree"] / "base_checkpoints" / "d2", small_tokenizer)
    default = run_import(target, str(sources["tree"]))  # the most trained phase by default; name from the dir
    assert (default["phase"], default["step"], default["name"]) == ("sft", 10, "tree")


def test_from_seaweedfs_s3(target, sources, s3_server, small_tokenizer, monkeypatch):
    from s3server import REGION

    bucket = f"hub-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=REGION,
                      config=Config(s3={"addressing_style": "path"}))
    s3.create_bucket(Bucket=bucket)
    for path in sources["flat"].iterdir():
        s3.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    monkeypatch.setenv("NANOCHAT_S3_ENDPOINT_URL", s3_server.endpoint_url)
    result = run_import(target, f"s3://{bucket}/models/tiny", step=5)
    assert (result["name"], result["step"], result["source"]) == ("tiny", 5, f"s3://{bucket}/models/tiny")
    assert_serves_like_direct(target, result, sources["flat"], small_tokenizer)


def hub_cache(root: Path, repo: str, files: dict[str, Path], sha: str = SHA) -> Path:
    """The real huggingface_hub cache layout: blobs/<hash>, snapshots/<sha>/<file> -> ../../blobs/<hash>, refs/main."""
    store = root / f"models--{repo.replace('/', '--')}"
    for name, src in files.items():
        blob = store / "blobs" / uuid.uuid4().hex
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = store / "snapshots" / sha / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (store / "refs").mkdir(exist_ok=True)
    (store / "refs" / "main").write_text(sha)
    return root


@pytest.fixture(scope="module")
def hub(sources, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    return hub_cache(cache, "someone/nanochat-tiny", {p.name: p for p in sources["flat"].iterdir()})


@pytest.fixture
def offline(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


def test_hub_offline_cache_records_the_commit(target, offline, sources, small_tokenizer):
    result = run_import(target, "hf:someone/nanochat-tiny")
    assert (result["name"], result["revision"], result["step"]) == ("someone-nanochat-tiny", SHA, 10)
    run, _ = db_rows(target, "someone-nanochat-tiny")
    assert run[2:] == ("hf:someone/nanochat-tiny", SHA)
    assert_serves_like_direct(target, result, sources["flat"], small_tokenizer)


def test_dagster_asset_partitioned_by_import_name(sources, tmp_path):
    import dagster as dg

    from orchestration.defs.imports import imported_checkpoint
    from orchestration.defs.resources import EvalHistory
    from orchestration.workspace import Workspace

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("imports", ["tiny-flat"])
    store = LocalArtifactStore(root=str(tmp_path / "artifacts"))
    resources = {"artifacts": store, "workspace": Workspace(root=str(tmp_path / "work")),
                 "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb"))}
    config = {"ops": {"imported_checkpoint": {"config": {"source": str(sources["flat"]), "step": 5}}}}
    result = dg.materialize([imported_checkpoint], resources=resources, instance=instance, partition_key="tiny-flat",
                            run_config=config)
    metadata = result.asset_materializations_for_node("imported_checkpoint")[0].metadata
    assert metadata["key"].value == "sft_checkpoint/imported/d2/tiny-flat" and metadata["step"].value == "5"
    assert "| ARC-Easy |  | 0.3876 |" in metadata["scores"].value
    bad = {"ops": {"imported_checkpoint": {"config": {"source": str(tmp_path / "nowhere")}}}}
    failed = dg.materialize([imported_checkpoint], resources=resources, instance=instance, partition_key="tiny-flat",
                            run_config=bad, raise_on_error=False)
    assert not failed.success and "not a directory" in str(failed.get_step_failure_events()[0].event_specific_data)


# -----------------------------------------------------------------------------
# Bad sources: a clear message, nothing published


def bad_copy(sources, tmp_path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(sources["flat"], bad)
    return bad


def assert_refused(target, source: str, error: type, *fragments: str, **kw) -> None:
    with pytest.raises(error) as info:
        run_import(target, source, **kw)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert target["store"].list_keys("") == []


def test_missing_files(target, sources, tmp_path):
    bad = bad_copy(sources, tmp_path)
    (bad / "tokenizer.pkl").unlink()
    assert_refused(target, str(bad), LayoutError, "missing tokenizer.pkl or tokenizer/tokenizer.pkl")
    meta_path(bad, 10).unlink()
    assert_refused(target, str(bad), LayoutError, "meta_000010.json")
    assert_refused(target, str(tmp_path / "nowhere"), SourceError, "not a directory")


def test_vocab_mismatch(target, sources, tmp_path, small_tokenizer):
    bad = bad_copy(sources, tmp_path)
    save_tiny(bad, 20, small_tokenizer.get_vocab_size() + 64, seed=3, meta_extra={"val_loss": 1.0})
    assert_refused(target, str(bad), VerificationError, "vocab mismatch", "tokenizer.pkl has 512 tokens", "576")


def test_import_records_its_tokenizer_and_a_swapped_tokenizer_is_refused(target, sources, tmp_path, small_tokenizer,
                                                                          other_tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    result = run_import(target, str(sources["flat"]), name="rec")
    published = target["store"].get_dir(result["checkpoint_key"])
    record = recorded_tokenizer(read_meta(published, 10), result["checkpoint_key"])
    assert record == {"key": "tokenizer/imported/rec", "fingerprint": fingerprint(small_tokenizer)}
    # Our own published checkpoint shipped with another tokenizer of the same vocab size: refused before publishing.
    swapped = tmp_path / "swapped"
    shutil.copytree(published, swapped, ignore=shutil.ignore_patterns("manifest.json"))
    other_tokenizer.save(swapped)
    assert other_tokenizer.get_vocab_size() == small_tokenizer.get_vocab_size()
    fresh = {**target, "store": LocalArtifactStore(root=str(tmp_path / "fresh"))}
    assert_refused(fresh, str(swapped), VerificationError, "tokenizer mismatch", "tokenizer/imported/rec",
                   fingerprint(other_tokenizer)[:12], "tokenizer.pkl")


def test_unsupported_2026_architecture(target, sources, tmp_path, small_tokenizer):
    bad = bad_copy(sources, tmp_path)
    state = torch.load(model_path(bad, 10), weights_only=True)
    state["value_embeds.1.weight"] = torch.zeros(small_tokenizer.get_vocab_size(), 64)
    state["resid_lambdas"] = torch.ones(2)
    torch.save(state, model_path(bad, 10))
    meta = json.loads(meta_path(bad, 10).read_text())
    meta["model_config"]["window_pattern"] = "SSSL"
    meta_path(bad, 10).write_text(json.dumps(meta))
    assert_refused(target, str(bad), UnsupportedArchitecture, "['window_pattern']", "value_embeds.*.weight",
                   "resid_lambdas", "value embeddings", "sliding-window attention")


def test_truncated_model_file(target, sources, tmp_path):
    bad = bad_copy(sources, tmp_path)
    data = model_path(bad, 10).read_bytes()
    model_path(bad, 10).write_bytes(data[: len(data) // 2])
    assert_refused(target, str(bad), VerificationError, "cannot read model_000010.pt", "truncated")


def test_not_regular_or_oversized(target, sources, tmp_path, monkeypatch):
    bad = bad_copy(sources, tmp_path)
    (bad / "tokenizer.pkl").unlink()
    os.mkfifo(bad / "tokenizer.pkl")  # reading it would block forever
    assert_refused(target, str(bad), VerificationError, "tokenizer.pkl is not a regular file")
    monkeypatch.setenv("NANOCHAT_IMPORT_MAX_MODEL_GB", "0.00001")
    assert_refused(target, str(sources["flat"]), VerificationError, "model_000010.pt is",
                   "NANOCHAT_IMPORT_MAX_MODEL_GB")


def test_hub_without_the_requested_step(target, offline):
    assert_refused(target, "hf:someone/nanochat-tiny", LayoutError, "no step 7", "[5, 10]", step=7)
    assert_refused(target, "hf:someone/not-cached", SourceError, "not in the local hub cache", "HF_HUB_OFFLINE")


def test_unreachable_hub(target, monkeypatch):
    from huggingface_hub import constants
    from s3server import free_port

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert_refused(target, "hf:someone/nanochat-tiny", SourceError, "cannot reach the Hugging Face hub",
                   "HF_HUB_OFFLINE=1", "local directory")
    assert_refused(target, "hf:not a repo", SourceError, "expected hf:OWNER/REPO")


def test_import_bench_prints_its_figures(capsys, shared_data):
    from importer import bench as import_bench

    import_bench.main(["--depth", "1", "--vocab", "300", "--seq-len", "64", "--tokens", "4", "--train-chars",
                       "100000"])
    out = capsys.readouterr().out
    assert "built d1:" in out and "import (verify + publish + record)" in out and "dtype float32" in out
    assert "tok/s" in out and "peak RSS" in out


# -----------------------------------------------------------------------------
# The command line end to end: hub (offline) -> evaluate -> promote -> the app serves it


@pytest.mark.slow
def test_cli_evaluates_promotes_and_the_app_serves_it(hub, tmp_path, shared_data):
    from app_server import AppServer  # tests/ is on sys.path (rootless)

    store = LocalArtifactStore(root=str(tmp_path / "artifacts"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "NANOCHAT_WORKSPACE": str(tmp_path / "w"),
           "NANOCHAT_SHARED_DATA": str(shared_data), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "importer.cli", "hf:someone/nanochat-tiny", "--evaluate",
           "--max-per-task", "2", "--max-new-tokens", "4", "--promote", "--artifacts", store.root,
           "--duckdb", str(tmp_path / "evals.duckdb"), "--device", "cpu"]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ChatCORE-noSB" in out.stdout and "| ARC-Easy |" in out.stdout and "promoted:" in out.stdout
    pointer = read_pointer(store)
    assert pointer["source"] == "hf:someone/nanochat-tiny" and pointer["revision"] == SHA
    assert pointer["scores"]["chatcore_label"] == "ChatCORE" and "chatcore_nosb" in pointer["scores"]
    with eval_store.connect_ro(tmp_path / "evals.duckdb") as conn:
        metrics = {r[0] for r in conn.execute("SELECT metric FROM eval_results WHERE task = 'all'").fetchall()}
    assert metrics == {"ChatCORE", "ChatCORE-noSB"}

    app = AppServer({"store": store, "db_path": tmp_path / "evals.duckdb"}, tmp_path / "cache", tmp_path / "app.log")
    try:
        app.wait_ready()
        health = app.health()
        assert health["checkpoint"]["sha256"] == pointer["checkpoint"]["sha256"]
        assert "hf:someone/nanochat-tiny" in health["model"]
        from browser import chromium_page

        with chromium_page(tmp_path / "profile") as page:
            page.goto(app.url + "/", wait_until="load")
            page.locator("#serving").get_by_text("hf:someone/nanochat-tiny").first.wait_for(timeout=60_000)
            page.locator("#message textarea").fill("Hello!")
            page.locator("#send").click()
            page.locator("#status").get_by_text("tok/s").wait_for(timeout=60_000)
    finally:
        app.stop()
