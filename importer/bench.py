"""
Benchmark: a big checkpoint through nanochat-import to chat, on this machine. Prints numbers, asserts nothing.

    python -m importer.bench --depth 20 --vocab 32768 --tokens 32

1. Build a randomly initialised d<depth> model of the original's shape (n_embd = 64 x depth, head dim 128) and save
   it with nanochat's own save path, flat, beside a tokenizer trained on the shared pretraining sample.
2. Import it (verification, publish, eval-history rows) into a temporary artifact store.
3. Load it as the app does (discover, load_candidate) and decode greedily through the Engine, in the dtype the
   app would use (nanochat.common.default_dtype: bf16 on CUDA or a CPU with bf16 hardware, else fp32).
Reports the model's size, each phase's wall time, the process's peak RSS (one copy of the weights, not two) and
decode tok/s. Timings on a shared machine are noisy: run it on an idle one for figures you publish.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import autocast_for, default_dtype, get_shared_data_dir
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer, save_token_bytes


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # Linux reports KiB


def shard_text(max_chars: int) -> list[str]:
    import pyarrow.parquet as pq

    texts, n = [], 0
    for path in sorted((get_shared_data_dir() / "pretrain").glob("shard_*.parquet")):
        for text in pq.read_table(path, columns=["text"])["text"].to_pylist():
            texts.append(text)
            n += len(text)
            if n >= max_chars:
                return texts
    return texts


def build(source: Path, depth: int, vocab: int, seq_len: int, train_chars: int) -> tuple[int, float]:
    """A random d<depth> checkpoint and its tokenizer in `source` (flat layout). Returns (parameters, bytes)."""
    tokenizer = RustBPETokenizer.train_from_iterator(iter(shard_text(train_chars)), vocab)
    tokenizer.save(source)
    save_token_bytes(tokenizer, source)
    n_embd = depth * 64
    n_head = max(1, math.ceil(n_embd / 128))
    config = GPTConfig(sequence_len=seq_len, vocab_size=tokenizer.get_vocab_size(), n_layer=depth, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)  # not all-zero logits: greedy decoding then picks varied tokens
    save_checkpoint(source, 1, model.state_dict(), None, {"step": 1, "val_loss": 0.0,
                                                            "model_config": config.to_dict()})
    n = model.num_params()
    del model
    return n, (source / "model_000001.pt").stat().st_size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab", type=int, default=32768, help="tokenizer size (trained on the shared sample)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=32, help="tokens to decode")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--train-chars", type=int, default=20_000_000, help="tokenizer training text")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from importer.cli import ImportRequest, import_checkpoint
    from store.artifact_store import LocalArtifactStore
    from store.catalog import discover, load_candidate

    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        # Built in a child process, so this process's peak RSS measures importing and serving only.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            n, size = pool.apply(build, (root / "source", args.depth, args.vocab, args.seq_len, args.train_chars))
        t1 = time.perf_counter()
        print(f"built d{args.depth}: {n:,} parameters, model file {size / 1e9:.2f} GB, {t1 - t0:.1f} s", flush=True)
        store = LocalArtifactStore(root=str(root / "artifacts"))
        result = import_checkpoint(ImportRequest(str(root / "source"), name="bench"), store, root / "evals.duckdb",
                                   root / "work", log=lambda s: None)
        t2 = time.perf_counter()
        print(f"import (verify + publish + record): {t2 - t1:.1f} s, peak RSS so far {peak_rss_gb():.2f} GB",
              flush=True)
        os.environ["NANOCHAT_ARTIFACT_CACHE"] = str(root / "cache")
        candidates, _, _ = discover(store, root / "evals.duckdb")
        candidate = next(c for c in candidates if c.id == result["checkpoint_key"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_candidate(store, candidate, device)
        t3 = time.perf_counter()
        dtype = default_dtype(torch.device(device))
        print(f"app load: {t3 - t2:.1f} s (download from the store + build), device {device}, dtype {dtype}, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        tokenizer = loaded.tokenizer
        prompt = tokenizer.encode("The chemical symbol of gold is", prepend=tokenizer.get_bos_token_id())
        engine = Engine(loaded.model, tokenizer)
        with autocast_for(torch.device(device)):
            start = time.perf_counter()
            first = None
            count = 0
            for _ in engine.generate(prompt, num_samples=1, max_tokens=args.tokens, temperature=0.0):
                count += 1
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
        decode = (count - 1) / (end - first) if count > 1 else float("nan")
        print(f"decode: {count} tokens, prefill+first token {first - start:.2f} s, then {decode:.2f} tok/s "
              f"({args.tokens} max); peak RSS {peak_rss_gb():.2f} GB (model file {size / 1e9:.2f} GB)", flush=True)


if __name__ == "__main__":
    main()
