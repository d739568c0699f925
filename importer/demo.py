"""
python -m importer.demo DIR: something to chat with, without running the pipeline. Builds, in a few seconds on a CPU:
a tokenizer (trained on the shared pretraining text) and two tiny chat models trained on the shared chat data,
published under DIR/artifacts exactly as the pipeline publishes them (tokenizer/, sft_checkpoint/ directories with
manifests, promotion pointers for both, newest last), with their measured validation loss in DIR/evals.duckdb.

    python -m importer.demo /tmp/nanochat-demo
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
from nanochat.dataloader import SFTBatchLoader
from nanochat.gpt import GPT, GPTConfig
from nanochat.tok_train import text_iterator
from nanochat.tokenizer import RustBPETokenizer, fingerprint, save_token_bytes
from store import eval_store
from store.artifact_store import LocalArtifactStore
from store.keys import checkpoint_key, tokenizer_key
from store.promotion import build_pointer, write_pointer

PROFILE = "demo"
# Instructions with full-length answers (the shared chatterbot dialogs would teach it to answer in three words).
CHAT_FILES = ("chat/oasst_en100_best_path.jsonl", "chat/self_instruct_human.jsonl")


def train_tokenizer(max_chars: int = 1_000_000, vocab_size: int = 512) -> RustBPETokenizer:
    texts = text_iterator(max_chars, doc_cap=10_000, data_dir=get_shared_data_dir() / "pretrain")
    return RustBPETokenizer.train_from_iterator(texts, vocab_size)


def conversations() -> tuple[list[dict], list[dict]]:
    """The shared chat conversations, shuffled (mixed sources, so the validation tenth looks like the rest)."""
    rows = [json.loads(line) for name in CHAT_FILES
            for line in (get_shared_data_dir() / name).read_text(encoding="utf-8").splitlines()]
    random.Random(0).shuffle(rows)
    return rows[: len(rows) * 9 // 10], rows[len(rows) * 9 // 10:]


def train(model: GPT, batches: SFTBatchLoader, steps: int) -> None:
    """Plain AdamW on SFT batches (the loss on the assistant's tokens only, as nanochat.chat_sft trains)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _, (x, y) in zip(range(steps), batches):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def validation_loss(model: GPT, batches: SFTBatchLoader, steps: int = 4) -> float:
    return sum(float(model(x, y)) for _, (x, y) in zip(range(steps), batches)) / steps


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
    train_rows, val_rows = conversations()
    seq = min(128, sequence_len)
    batches = SFTBatchLoader(tokenizer, train_rows, B=16, T=seq)  # each version trains on the next conversations

    run_id, model_tag = f"demo-{uuid.uuid4().hex[:8]}", f"d{n_layer}"
    published: dict[str, Any] = {"store": store, "db_path": db_path, "checkpoints": []}
    with tempfile.TemporaryDirectory(prefix="nanochat-demo-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tokenizer.save(tok_dir)
        save_token_bytes(tokenizer, tok_dir)
        tok = published["tokenizer"] = store.put_dir(tok_dir, tokenizer_key(PROFILE, run_id))
        record = tokenizer_record(tok.key, fingerprint(tokenizer))  # what every checkpoint's meta names
        for version in range(1, versions + 1):
            started = time.perf_counter()
            train(model, batches, steps)
            val_loss = validation_loss(model, SFTBatchLoader(tokenizer, val_rows, B=16, T=seq))
            step = steps * version
            ckpt_dir = Path(tmp) / f"v{version}"
            save_checkpoint(ckpt_dir, step, model.state_dict(), None,
                            with_tokenizer({"model_config": config.to_dict(), "step": step, "val_loss": val_loss,
                                            "note": "importer.demo: a tiny model trained for seconds on chat data"},
                                           record))
            version_run = f"{run_id}-v{version}"
            info = store.put_dir(ckpt_dir, checkpoint_key("sft", PROFILE, model_tag, version_run))
            with eval_store.connect_rw(db_path) as conn:  # the rows the pipeline's sft_checkpoint asset writes
                eval_store.record(conn, run_id=version_run, stage="sft", checkpoint_id=info.sha256, step=step,
                                  uri=info.uri, profile=PROFILE, depth=n_layer, config=config.to_dict(),
                                  scores={eval_store.LOSS_TASKS[0]: {"val_loss": val_loss}})
            write_pointer(store, build_pointer(PROFILE, n_layer, vars(info), "sft", step, model_tag, vars(tok), {},
                                               dagster_run_id=None, git_sha="demo"))
            published["checkpoints"].append({"key": info.key, "sha256": info.sha256, "step": step,
                                             "val_loss": val_loss, "seconds": time.perf_counter() - started})
    return published


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m importer.demo", description=__doc__.split("\n\n")[0].strip())
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
