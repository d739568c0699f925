"""
Benchmarks that print one JSON line per figure, with the machine they ran on.

    python -m nanochat.bench train --depth=4 --seq-len=256 --batch-size=16
    python -m nanochat.bench train --depth=20 --compile        # on a GPU
    python -m nanochat.bench core --depth=4 --vocab-size=4096 --max-per-task=50
    python -m nanochat.bench core --checkpoint-dir=$NANOCHAT_BASE_DIR/base_checkpoints/d20

`train` times full optimizer steps (forward, backward, AdamW + Muon) of a depth-D model on random tokens,
and reports tok/s, achieved FLOP/s (model FLOPs from estimate_flops), the ratio to a dense-matmul peak
measured in the same process, MFU against the datasheet bf16 peak on known GPUs, and peak memory.

`core` times the CORE evaluation (nanochat.core_eval) of a saved checkpoint, or of a randomly initialised
depth-D model (the speed does not depend on the weights), and reports examples/s per task type and overall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch

from nanochat.base_train import model_config_for
from nanochat.common import autocast_for, autodetect_device_type, get_shared_data_dir, gpu_peak_flops, synchronize
from nanochat.gpt import GPT


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, iters: int = 10) -> float:
    """Achieved FLOP/s of a square matmul: the practical ceiling the training figure is compared to."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def bench_train(args) -> dict:
    device = torch.device(args.device_type or autodetect_device_type())
    torch.manual_seed(0)
    config = model_config_for(argparse.Namespace(depth=args.depth, aspect_ratio=args.aspect_ratio,
                                                 head_dim=args.head_dim, n_kv_head=0, max_seq_len=args.seq_len),
                              args.vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    train_model = torch.compile(model, dynamic=False) if args.compile else model
    autocast = autocast_for(device, args.dtype)
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.roll(x, -1, dims=1)

    def step() -> None:
        with autocast:
            loss = train_model(x, y)
        loss.backward()
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

    tokens = args.batch_size * args.seq_len
    flops = model.estimate_flops() * tokens / dt
    dtype = torch.bfloat16 if (args.dtype or ("bfloat16" if device.type == "cuda" else "float32")) == "bfloat16" \
        else torch.float32
    peak = matmul_peak(device, dtype)
    datasheet = gpu_peak_flops(device)
    result = {
        "bench": "train", **machine_info(device), "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "compile": args.compile, "depth": args.depth, "params": model.num_params(), "batch": args.batch_size,
        "seq_len": args.seq_len, "step_ms": round(dt * 1000, 2), "tok_per_sec": round(tokens / dt, 1),
        "flops_per_sec": flops, "matmul_peak_flops": peak, "ratio_to_matmul_peak": round(flops / peak, 4),
    }
    if datasheet:
        result["mfu_percent"] = round(100 * flops / datasheet, 2)
    if device.type == "cuda":
        result["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def bench_tokenizer(tokenizer_dir: str | None, vocab_size: int):
    """The tokenizer in tokenizer_dir, else a throwaway BPE of vocab_size trained on ~2 MB of the shared
    pretraining text (a random model needs some tokenizer of its vocab size; which one barely changes speed)."""
    from nanochat.tokenizer import RustBPETokenizer

    if tokenizer_dir:
        return RustBPETokenizer.from_directory(tokenizer_dir)
    import pyarrow.parquet as pq

    texts, n = [], 0
    for text in pq.read_table(get_shared_data_dir() / "pretrain" / "shard_00000.parquet")["text"].to_pylist():
        texts.append(text)
        n += len(text)
        if n >= 2_000_000:
            break
    return RustBPETokenizer.train_from_iterator(iter(texts), vocab_size)


def bench_core(args) -> dict:
    from nanochat.checkpoint_manager import build_model, find_last_step
    from nanochat.core_eval import evaluate_core
    from nanochat.tokenizer import RustBPETokenizer

    device = torch.device(args.device_type or autodetect_device_type())
    if args.checkpoint_dir:
        step = args.step if args.step is not None else find_last_step(args.checkpoint_dir)
        tokenizer = RustBPETokenizer.from_directory(args.tokenizer_dir) if args.tokenizer_dir else None
        model, tokenizer, _ = build_model(args.checkpoint_dir, step, device, "eval", tokenizer=tokenizer)
        model_name = f"{args.checkpoint_dir} step {step}"
    else:
        tokenizer = bench_tokenizer(args.tokenizer_dir, args.vocab_size)
        torch.manual_seed(0)
        config = model_config_for(argparse.Namespace(depth=args.depth, aspect_ratio=args.aspect_ratio,
                                                     head_dim=args.head_dim, n_kv_head=0, max_seq_len=args.seq_len),
                                  tokenizer.get_vocab_size())
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # a zero lm_head would make every choice tie
        model_name = f"random d{args.depth}"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    core = evaluate_core(model, tokenizer, device, args.bundle_dir, args.max_per_task, tasks,
                         autocast_for(device, dtype))

    by_type: dict[str, dict] = {}
    for t in core["tasks"].values():
        entry = by_type.setdefault(t["task_type"], {"tasks": 0, "examples": 0, "seconds": 0.0})
        entry["tasks"] += 1
        entry["examples"] += t["examples"]
        entry["seconds"] += t["seconds"]
    for entry in by_type.values():
        entry["examples_per_sec"] = round(entry["examples"] / entry["seconds"], 2) if entry["seconds"] else 0.0
        entry["seconds"] = round(entry["seconds"], 3)
    return {
        "bench": "core", **machine_info(device), "device": device.type, "dtype": dtype, "model": model_name,
        "params": model.num_params(), "seq_len": model.config.sequence_len, "vocab_size": model.config.vocab_size,
        "max_per_task": args.max_per_task, "core_label": core["core_label"], "core": core["core"],
        "examples": core["examples"], "seconds": round(sum(by_type[k]["seconds"] for k in by_type), 3),
        "examples_per_sec": round(core["examples_per_sec"], 2), "by_task_type": by_type,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="nanochat benchmarks (one JSON line per figure)")
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train", help="training step throughput, FLOP/s, MFU, memory")
    train.add_argument("--depth", type=int, default=4)
    train.add_argument("--aspect-ratio", type=int, default=64)
    train.add_argument("--head-dim", type=int, default=128)
    train.add_argument("--vocab-size", type=int, default=65536)
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--steps", type=int, default=5)
    train.add_argument("--warmup", type=int, default=2)
    train.add_argument("--compile", action="store_true")
    train.add_argument("--dtype", default="", help="bfloat16|float32 (default: bf16 on cuda)")
    train.add_argument("--device-type", default="")
    core = sub.add_parser("core", help="CORE evaluation throughput: examples/s per task type and overall")
    core.add_argument("--checkpoint-dir", default=None, help="a model tag folder (model_<step>.pt + meta); "
                      "default: a randomly initialised model of --depth")
    core.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    core.add_argument("--tokenizer-dir", default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer with "
                      "--checkpoint-dir, else a throwaway BPE trained on shared pretraining text")
    core.add_argument("--depth", type=int, default=4)
    core.add_argument("--aspect-ratio", type=int, default=64)
    core.add_argument("--head-dim", type=int, default=128)
    core.add_argument("--vocab-size", type=int, default=4096)
    core.add_argument("--seq-len", type=int, default=2048, help="the model's context: longer prompts are cropped")
    core.add_argument("--max-per-task", type=int, default=50, help="examples per task (-1: all)")
    core.add_argument("--tasks", default="", help="comma-separated CORE labels (default: all)")
    core.add_argument("--bundle-dir", default=None)
    core.add_argument("--dtype", default="", help="bfloat16|float32 (default: bf16 on cuda)")
    core.add_argument("--device-type", default="")
    args = parser.parse_args(argv)
    results = [bench_train(args) if args.what == "train" else bench_core(args)]
    for r in results:
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
