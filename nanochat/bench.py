"""
Benchmarks that print one JSON line per figure, each next to a limit of the machine measured in the same run.

    python -m nanochat.bench all --quick          # every figure at small sizes (CI runs this)
    python -m nanochat.bench all                  # full sizes, by hand (minutes on a CPU)
    python -m nanochat.bench train --depth=4 --vocab-size=4096 --compile
    python -m nanochat.bench train --depth=20 --compile        # on a GPU
    python -m nanochat.bench train --baseline --seq-len=512 --batch-size=8   # against the original's step
    python -m nanochat.bench decode --depth=8 --batch-sizes=1,8
    python -m nanochat.bench core --checkpoint-dir=$NANOCHAT_BASE_DIR/base_checkpoints/d20
    python -m nanochat.bench core --baseline --max-per-task=10   # against the original's evaluation loop
    python -m nanochat.bench tokenizer | dataloader

The limits:
- `matmul_peak_flops`: FLOP/s of a square matmul in the dtype the model computes in. Training FLOP/s (from
  GPT.estimate_flops) divided by it says how much of the machine the training step uses; on a known GPU, MFU
  against the datasheet bf16 peak is printed as well.
- `memory_bandwidth`: bytes/s of a tensor copy far larger than the last-level cache (reads + writes). Decoding
  one token reads every weight and the whole KV cache once, so bytes read per token / time, divided by it,
  says how close decode runs to the memory bound. A model whose weights fit in the cache can exceed 1.
Every line carries the machine (CPU model, cores, torch threads, CPU capability, GPU name, torch version).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from nanochat.base_train import model_config_for
from nanochat.common import (
    autocast_for,
    autodetect_device_type,
    best_seconds,
    cpu_model_name,
    default_dtype,
    get_shared_data_dir,
    gpu_peak_flops,
    synchronize,
)
from nanochat.gpt import GPT

# -----------------------------------------------------------------------------
# The machine and its limits


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (sysfs), to tell whether a model's weights are served from cache."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes) if sizes else None


def machine_info(device: torch.device) -> dict:
    cpu = cpu_model_name() or platform.processor() or platform.machine()
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, iters: int = 10) -> float:
    """FLOP/s of a square matmul, the best of `iters` (see best_seconds): the practical ceiling the training
    figure is compared to."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, device, iters)


def memory_bandwidth(device: torch.device, mib: int = 256, iters: int = 5) -> float:
    """Bytes/s moved by copying a buffer much larger than the caches (each copy reads and writes it once)."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    # best_seconds' untimed first call is the first touch: page faults are not bandwidth.
    return 2 * src.numel() * src.element_size() / best_seconds(lambda: dst.copy_(src), device, iters)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# -----------------------------------------------------------------------------
# What the figures run on: real text, a tokenizer trained on it, a randomly initialised model


def shared_texts(max_chars: int, shard: str = "shard_00000.parquet") -> list[str]:
    """Documents from the shared pretraining shard, up to max_chars characters."""
    import pyarrow.parquet as pq

    texts, n = [], 0
    for text in pq.read_table(get_shared_data_dir() / "pretrain" / shard, columns=["text"])["text"].to_pylist():
        texts.append(text)
        n += len(text)
        if n >= max_chars:
            break
    return texts


def load_or_train_tokenizer(tokenizer_dir: str | None, vocab_size: int, chars: int = 2_000_000):
    """The tokenizer in tokenizer_dir, else a throwaway BPE of vocab_size trained on shared pretraining text
    (a random model needs some tokenizer of its vocab size; which one barely changes speed)."""
    from nanochat.tokenizer import RustBPETokenizer

    if tokenizer_dir:
        return RustBPETokenizer.from_directory(tokenizer_dir)
    return RustBPETokenizer.train_from_iterator(iter(shared_texts(chars)), vocab_size)


def random_model(args, vocab_size: int, device: torch.device, seq_len: int) -> GPT:
    torch.manual_seed(0)
    config = model_config_for(argparse.Namespace(depth=args.depth, aspect_ratio=args.aspect_ratio,
                                                 head_dim=args.head_dim, n_kv_head=0, max_seq_len=seq_len),
                              vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def device_and_dtype(args) -> tuple[torch.device, str]:
    device = torch.device(args.device_type or autodetect_device_type())
    return device, args.dtype or default_dtype(device)


# -----------------------------------------------------------------------------
# The figures


def muon_flops_per_step(model: GPT, ns_steps: int = 5) -> int:
    """Matmul FLOPs of Muon's Newton-Schulz iterations in one optimizer step (not model FLOPs: they do not grow
    with the batch, so they weigh most at small batches like the tiny profile's 4,096 tokens per step)."""
    total = 0
    for p in model.transformer.h.parameters():
        m, n = sorted(p.shape)
        total += ns_steps * (4 * m * m * n + 2 * m**3)  # X X^T, A A, B X on the wide orientation
    return total


def bench_train(args) -> dict:
    """Full optimizer steps (forward, backward, AdamW + Muon) on random tokens."""
    device, dtype = device_and_dtype(args)
    model = random_model(args, args.vocab_size, device, args.seq_len)
    optimizers = model.setup_optimizers()
    train_model = torch.compile(model, dynamic=False) if args.compile else model
    autocast = autocast_for(device, dtype)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.roll(x, -1, dims=1)

    def step() -> None:
        for _ in range(args.accum_steps):  # gradient accumulation, as base_train does to reach its total batch
            with autocast:
                loss = train_model(x, y)
            (loss / args.accum_steps).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    dt = (time.perf_counter() - t0) / args.steps

    tokens = args.batch_size * args.seq_len * args.accum_steps
    flops = model.estimate_flops() * tokens / dt
    peak = matmul_peak(device, getattr(torch, dtype))
    optimizer_flops = muon_flops_per_step(model)
    result = {
        "bench": "train", **machine_info(device), "device": device.type, "dtype": dtype,
        "compile": args.compile, "depth": args.depth, "params": model.num_params(), "batch": args.batch_size,
        "accum_steps": args.accum_steps,
        "seq_len": args.seq_len, "step_ms": round(dt * 1000, 2), "tok_per_sec": round(tokens / dt, 1),
        "flops_per_sec": flops, "matmul_peak_flops": peak, "ratio_to_matmul_peak": round(flops / peak, 4),
        # Counting Muon's matmuls too: how busy the matmul units were, as opposed to useful model work.
        "optimizer_flops_per_step": optimizer_flops,
        "ratio_with_optimizer_flops": round((flops + optimizer_flops / dt) / peak, 4),
        **peak_memory(device),
    }
    datasheet = gpu_peak_flops(device)
    if datasheet:
        result["mfu_percent"] = round(100 * flops / datasheet, 2)
    return result


def decode_bytes_per_step(model: GPT, batch: int, kv_len: int, dtype: torch.dtype) -> int:
    """Bytes one decode step must read: every weight once (only `batch` rows of the embedding table) and the
    keys and values of kv_len positions for every row."""
    c = model.config
    weights = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("transformer.wte"))
    weights = weights * dtype.itemsize + batch * c.n_embd * model.transformer.wte.weight.element_size()
    kv = 2 * c.n_layer * batch * c.n_kv_head * kv_len * (c.n_embd // c.n_head) * dtype.itemsize
    return weights + kv


def bench_decode(args, tokenizer=None) -> list[dict]:
    """Engine.generate at each batch size: prefill and decode tok/s, bytes/s vs the copy probe."""
    from nanochat.bench_decode import bench_decode as run  # its own module: this one stays under 500 lines

    return run(args, tokenizer)


def bench_tokenizer(args):
    """BPE training chars/s (rustbpe) and encode MB/s (tiktoken, batched over threads) on shared text.
    Returns the JSON line and the trained tokenizer, which the other figures reuse."""
    from nanochat.tokenizer import RustBPETokenizer

    texts = shared_texts(args.train_chars + args.encode_chars)
    split, n = 0, 0
    while split < len(texts) and n < args.train_chars:
        n += len(texts[split])
        split += 1
    train_texts, encode_texts = texts[:split], texts[split:] or texts
    t0 = time.perf_counter()
    tokenizer = RustBPETokenizer.train_from_iterator(iter(train_texts), args.vocab_size)
    train_s = time.perf_counter() - t0
    train_chars = sum(len(t) for t in train_texts)
    encode_bytes = sum(len(t.encode("utf-8")) for t in encode_texts)
    tokenizer.encode(encode_texts[:8], num_threads=args.encode_threads)  # warm-up
    t0 = time.perf_counter()
    rows = tokenizer.encode(encode_texts, num_threads=args.encode_threads)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for text in encode_texts[:200]:
        tokenizer.encode(text)
    single_s = time.perf_counter() - t0
    single_bytes = sum(len(t.encode("utf-8")) for t in encode_texts[:200])
    tokens = sum(len(r) for r in rows)
    line = {
        "bench": "tokenizer", **machine_info(torch.device("cpu")), "vocab_size": tokenizer.get_vocab_size(),
        "train_chars": train_chars, "train_s": round(train_s, 3),
        "train_chars_per_sec": round(train_chars / train_s), "encode_bytes": encode_bytes,
        "encode_threads": args.encode_threads, "encode_mb_per_sec": round(encode_bytes / encode_s / 1e6, 2),
        "encode_one_doc_at_a_time_mb_per_sec": round(single_bytes / single_s / 1e6, 2),
        "bytes_per_token": round(encode_bytes / tokens, 3),
    }
    return line, tokenizer


def bench_dataloader(args, tokenizer=None, train_tok_per_sec: float | None = None) -> dict:
    """Tokens/s the pretraining loader delivers (parquet read + tokenize + pack) on the shared shards, timed
    from construction over --tokens: a row group holds ~1M tokens, so fewer would time slicing a buffer."""
    from nanochat.dataloader import DistributedTokenLoader

    device = torch.device(args.device_type or autodetect_device_type())
    tokenizer = tokenizer or load_or_train_tokenizer(args.tokenizer_dir, args.vocab_size)
    batches = max(1, args.tokens // (args.batch_size * args.seq_len))
    t0 = time.perf_counter()
    loader = DistributedTokenLoader(tokenizer, args.batch_size, args.seq_len, "train", device,
                                    data_dir=get_shared_data_dir() / "pretrain")
    for _ in range(batches):
        x, _ = next(loader)
    synchronize(device)
    dt = time.perf_counter() - t0
    rate = batches * x.numel() / dt
    line = {"bench": "dataloader", **machine_info(device), "device": device.type, "batch": args.batch_size,
            "seq_len": args.seq_len, "tokens": batches * x.numel(), "tok_per_sec": round(rate, 1)}
    if train_tok_per_sec:
        # The loader runs in the training process between steps; this is how much faster than training it is.
        line["train_tok_per_sec"] = train_tok_per_sec
        line["ratio_to_train"] = round(rate / train_tok_per_sec, 2)
    return line


def bench_all(args) -> list[dict]:
    """Every figure, sharing one tokenizer."""
    from nanochat.bench_core import bench_core  # it imports this module
    tok_line, tokenizer = bench_tokenizer(args)
    lines = [tok_line]
    train = bench_train(args)
    lines.append(bench_dataloader(args, tokenizer, train["tok_per_sec"]))
    lines.append(train)
    lines.extend(bench_decode(args, tokenizer))
    lines.append(bench_core(args, tokenizer))
    return lines


# -----------------------------------------------------------------------------
# Command line

# Sizes of `all --quick` (CI: seconds, sanity only) and `all` (by hand: the README's figures).
QUICK = dict(depth=2, vocab_size=1024, seq_len=64, batch_size=4, accum_steps=1, steps=2, warmup=1,
             train_chars=300_000, encode_chars=300_000, tokens=1_500_000, prompt_len=32, max_new_tokens=16,
             max_per_task=4, tasks="")
FULL = dict(depth=4, vocab_size=4096, seq_len=256, batch_size=16, accum_steps=1, steps=5, warmup=2,
            train_chars=20_000_000, encode_chars=5_000_000, tokens=4_000_000, prompt_len=256, max_new_tokens=128,
            max_per_task=20, tasks="")


def add_model_args(p: argparse.ArgumentParser, depth: int = 4, vocab_size: int = 4096, seq_len: int = 256) -> None:
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=vocab_size)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--dtype", default="", help="bfloat16|float32 (default: bf16 on cuda and bf16-capable CPUs)")
    p.add_argument("--device-type", default="")
    p.add_argument("--tokenizer-dir", default=None, help="default: a throwaway BPE trained on shared text")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--compile", action="store_true")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--plain", action="store_true", help="the model as trained, under autocast (before issue 18)")


def add_core_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-dir", default=None, help="a model tag folder (model_<step>.pt + meta); "
                   "default: a randomly initialised model of --depth")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--max-per-task", type=int, default=50, help="examples per task (-1: all)")
    p.add_argument("--tasks", default="", help="comma-separated CORE labels (default: all)")
    p.add_argument("--bundle-dir", default=None)
    p.add_argument("--model-vocab-size", type=int, default=0, help="rows of the random model's embedding and "
                   "lm_head (default: the tokenizer's vocab); e.g. the original's 65,536 where a BPE trained on "
                   "the shared text stops short of it")
    p.add_argument("--baseline", action="store_true", help="also time the original nanochat's per-example loop "
                   "on the same model and examples, task by task (nanochat/bench_core.py)")


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-chars", type=int, default=20_000_000)
    p.add_argument("--encode-chars", type=int, default=5_000_000)
    p.add_argument("--encode-threads", type=int, default=os.cpu_count() or 1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="nanochat benchmarks (one JSON line per figure)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("train", help="training step tok/s, FLOP/s vs the matmul peak, MFU, memory")
    add_model_args(p, vocab_size=65536)
    add_train_args(p)
    p.add_argument("--baseline", action="store_true", help="time the original nanochat's step (compiled, full-logits "
                   "loss, fp32) against ours eager and compiled, interleaved (nanochat/bench_train.py)")
    p.add_argument("--variants", default="", help="with --baseline: comma-separated, default "
                   "original,ours_eager,ours_compiled")
    p = sub.add_parser("decode", help="Engine prefill and decode tok/s, bytes/s vs memory bandwidth")
    add_model_args(p)
    add_decode_args(p)
    p = sub.add_parser("core", help="CORE evaluation examples/s per task type and overall")
    add_model_args(p, seq_len=2048)
    add_core_args(p)
    p = sub.add_parser("tokenizer", help="BPE training chars/s, encode MB/s")
    p.add_argument("--vocab-size", type=int, default=4096)
    add_tokenizer_args(p)
    p = sub.add_parser("dataloader", help="pretraining loader tokens/s")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=4_000_000, help="tokens to deliver (several row groups)")
    # A Dagster run's split (training/eval vs orchestration) is `python -m orchestration.run_summary --json`:
    # nanochat imports no Dagster.
    p = sub.add_parser("all", help="every figure of this library (the orchestration one: run_summary --json)")
    p.add_argument("--quick", action="store_true", help="small sizes: seconds, for CI")
    add_model_args(p)
    add_train_args(p)
    add_decode_args(p)
    add_core_args(p)
    add_tokenizer_args(p)
    p.add_argument("--tokens", type=int)
    p.set_defaults(**dict.fromkeys(FULL))  # unset sizes come from QUICK or FULL below; flags still win
    args = parser.parse_args(argv)
    if args.what == "all":
        for key, value in (QUICK if args.quick else FULL).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "all":
        results = bench_all(args)
    elif args.what == "train" and args.baseline:
        from nanochat.bench_train import bench_train_baseline  # it imports this module

        results = bench_train_baseline(args)
    elif args.what == "train":
        results = [bench_train(args)]
    elif args.what == "decode":
        results = bench_decode(args)
    elif args.what == "core":
        from nanochat.bench_core import bench_core  # it imports this module

        results = [bench_core(args)]
    elif args.what == "tokenizer":
        results = [bench_tokenizer(args)[0]]
    else:
        results = [bench_dataloader(args)]
    for r in results:
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
