"""
python -m app.demo DIR: something to chat with, without running the pipeline. Builds, in a few seconds on a CPU:
a tokenizer (trained on the shared pretraining text) and two tiny chat models trained on the shared chat data,
published under DIR/artifacts exactly as the pipeline publishes them (tokenizer/, sft_checkpoint/ directories with
manifests, promotion pointers for both, newest last), with their measured validation loss in DIR/evals.duckdb.

    python -m app.demo /tmp/nanochat-demo
    python -m app --artifacts /tmp/nanochat-demo/artifacts --duckdb /tmp/nanochat-demo/evals.duckdb

The models are a few hundred thousand parameters trained for seconds: they answer in English-looking word salad.
The tests use the same builder (with fewer steps) so that the app loads "the promoted model" as a user would.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from nanochat.checkpoint_manager import save_checkpoint, tokenizer_record, with_tokenizer
from nanochat.common import get_shared_data_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer, fingerprint, save_token_bytes
from store import eval_store, keys
from store.artifact_store import LocalArtifactStore
from store.promotion import write_pointer

PROFILE = "demo"
# Instructions with full-length answers (the shared chatterbot dialogs would teach it to answer in three words).
CHAT_FILES = ("chat/oasst_en100_best_path.jsonl", "chat/self_instruct_human.jsonl")


def train_tokenizer(max_chars: int = 1_000_000, vocab_size: int = 512) -> RustBPETokenizer:
    import pyarrow.parquet as pq

    texts, n = [], 0
    for text in pq.read_table(get_shared_data_dir() / "pretrain" / "shard_00000.parquet", columns=["text"])["text"]:
        texts.append(text.as_py())
        n += len(texts[-1])
        if n >= max_chars:
            break
    return RustBPETokenizer.train_from_iterator(iter(texts), vocab_size)


def chat_stream(tokenizer, sequence_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every shared conversation rendered in the chat format, concatenated: (ids, targets) where targets are -1
    outside the assistant's own tokens (the SFT loss mask)."""
    conversations = [json.loads(line) for name in CHAT_FILES
                     for line in (get_shared_data_dir() / name).read_text(encoding="utf-8").splitlines()]
    random.Random(0).shuffle(conversations)  # mixed sources, so the last 10% (validation) looks like the rest
    ids: list[int] = []
    mask: list[int] = []
    for conversation in conversations:
        row_ids, row_mask = tokenizer.render_conversation(conversation, max_tokens=sequence_len)
        ids += row_ids
        mask += row_mask
    x = torch.tensor(ids, dtype=torch.long)
    y = torch.where(torch.tensor(mask) == 1, x, torch.full_like(x, -1))
    return x, y


def train(model: GPT, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> float:
    """Plain AdamW on random windows of the stream; returns the last loss."""
    if steps <= 0:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(x) - seq - 1, (batch,), generator=gen)
        xb = torch.stack([x[s:s + seq] for s in starts])
        yb = torch.stack([y[s + 1:s + seq + 1] for s in starts])
        loss = model(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def validation_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, seq: int) -> float:
    n = (len(x) - 1) // seq
    xb, yb = x[: n * seq].view(n, seq), y[1: n * seq + 1].view(n, seq)
    return float(model(xb[:64], yb[:64]))


def build_demo(root: str | Path, tokenizer=None, steps: int = 300, versions: int = 2, sequence_len: int = 256,
               n_embd: int = 64, n_layer: int = 2, seed: int = 0) -> dict[str, Any]:
    """Publish `versions` checkpoints (each trained `steps` more than the last) into root/artifacts, promote them
    in order and record their validation loss in root/evals.duckdb. Returns what was published."""
    root = Path(root)
    store = LocalArtifactStore(root=str(root / "artifacts"))
    db_path = root / "evals.duckdb"
    tokenizer = tokenizer or train_tokenizer()
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=n_layer,
                       n_head=2, n_kv_head=2, n_embd=n_embd)
    model = GPT(config)
    model.init_weights()
    if steps <= 0:  # untrained: give the zero-initialized head some weights so replies are not all one token
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    x, y = chat_stream(tokenizer, sequence_len)
    split = int(len(x) * 0.9)

    run_id, model_tag = f"demo-{uuid.uuid4().hex[:8]}", f"d{n_layer}"
    published: dict[str, Any] = {"store": store, "db_path": db_path, "checkpoints": []}
    with tempfile.TemporaryDirectory(prefix="nanochat-demo-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tokenizer.save(tok_dir)
        save_token_bytes(tokenizer, tok_dir)
        tok = published["tokenizer"] = store.put_dir(tok_dir, keys.tokenizer_key(PROFILE, run_id))
        record = tokenizer_record(tok.key, fingerprint(tokenizer))  # what every checkpoint's meta names
        for version in range(1, versions + 1):
            started = time.perf_counter()
            train(model, x[:split], y[:split], steps, batch=16, seq=min(128, sequence_len), seed=seed + version)
            val_loss = validation_loss(model, x[split:], y[split:], min(128, sequence_len))
            step = steps * version
            ckpt_dir = Path(tmp) / f"v{version}"
            save_checkpoint(ckpt_dir, step, model.state_dict(), None,
                            with_tokenizer({"model_config": config.to_dict(), "step": step, "val_loss": val_loss,
                                            "note": "app.demo: a tiny model trained for seconds on shared chat data"},
                                           record))
            version_run = f"{run_id}-v{version}"
            info = store.put_dir(ckpt_dir, keys.checkpoint_key("sft", PROFILE, model_tag, version_run))
            with eval_store.connect_rw(db_path) as conn:
                eval_store.record_run(conn, version_run, profile=PROFILE, depth=n_layer, config=config.to_dict())
                eval_store.record_checkpoint(conn, info.sha256, run_id=version_run, stage="sft", step=step,
                                             uri=info.uri)
                eval_store.record_eval_results(conn, version_run, "sft", info.sha256,
                                               {"validation": {"val_loss": val_loss}}, profile=PROFILE,
                                               depth=n_layer)
            write_pointer(store, {
                "profile": PROFILE, "depth": n_layer,
                "checkpoint": {"key": info.key, "uri": info.uri, "sha256": info.sha256, "stage": "sft", "step": step,
                               "model_tag": model_tag},
                "tokenizer": {"key": tok.key, "uri": tok.uri, "sha256": tok.sha256},
                "scores": {}, "dagster_run_id": None, "git_sha": "demo",
            })
            published["checkpoints"].append({"key": info.key, "sha256": info.sha256, "step": step,
                                             "val_loss": val_loss, "seconds": time.perf_counter() - started})
    return published


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("dir", help="where to put artifacts/ and evals.duckdb (replaced if it holds a demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model version")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = Path(args.dir)
    if (root / "artifacts").exists() or (root / "evals.duckdb").exists():
        shutil.rmtree(root / "artifacts", ignore_errors=True)
        (root / "evals.duckdb").unlink(missing_ok=True)
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and it does not collapse on a busy machine
    out = build_demo(root, steps=args.steps, seed=args.seed)
    for c in out["checkpoints"]:
        print(f"published {c['key']} (step {c['step']}, val loss {c['val_loss']:.3f}, {c['seconds']:.1f} s)")
    print(f"python -m app --artifacts {root / 'artifacts'} --duckdb {out['db_path']}")


if __name__ == "__main__":
    main()
