"""
Benchmarks that print one JSON line per figure, with the machine they ran on.

    python -m nanochat.bench train --depth=4 --seq-len=256 --batch-size=16
    python -m nanochat.bench train --depth=20 --compile        # on a GPU

`train` times full optimizer steps (forward, backward, AdamW + Muon) of a depth-D model on random tokens,
and reports tok/s, achieved FLOP/s (model FLOPs from estimate_flops), the ratio to a dense-matmul peak
measured in the same process, MFU against the datasheet bf16 peak on known GPUs, and peak memory.
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
from nanochat.common import autocast_for, autodetect_device_type, gpu_peak_flops, synchronize
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
    args = parser.parse_args(argv)
    results = [bench_train(args)]
    for r in results:
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
