"""
Shared plumbing: where artifacts live, which device to use, distributed init/cleanup, rank-0 logging.

Everything here reads the standard `torchrun` environment variables (RANK, LOCAL_RANK, WORLD_SIZE), so the
same entry point works as `python -m ...` (one process) and under `torchrun --nproc_per_node=N`.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

logger = logging.getLogger("nanochat")


def get_base_dir() -> Path:
    """Root of all artifacts (shards, tokenizer, checkpoints): $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_shared_data_dir() -> Path:
    """Real offline eval/sample data: $NANOCHAT_SHARED_DATA, else `shared/data` beside the repository root."""
    env = os.environ.get("NANOCHAT_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data directory {path} does not exist; set NANOCHAT_SHARED_DATA to the folder that holds "
            "pretrain/, eval_bundle/, gsm8k/ ... (see shared/data/MANIFEST.md)"
        )
    return path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], object]) -> None:
    """
    Write through write_fn(file) to a temp file in the same directory, fsync, then rename over `path`:
    readers never see a half-written file, and a failed write (disk full, a crash) leaves the old one intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # torch.save reports a failed write as an opaque RuntimeError ("unexpected pos ...") and keeps the
        # real OSError only as its context: surface it, naming the file, so "disk full" reads as disk full.
        cause = _os_error_in_chain(e)
        if cause is None:
            raise
        hint = (" (the disk is full or a file-size limit was reached; free space and retry)"
                if cause.errno in _NO_SPACE_ERRNOS else "")
        raise OSError(cause.errno, f"could not write {path}: {cause.strerror or cause}{hint}; "
                      "nothing was renamed into place, an existing file of that name is untouched") from e


_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _os_error_in_chain(e: BaseException | None) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def autodetect_device_type() -> str:
    """Prefer CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_distributed, rank, local_rank, world_size) from the torchrun environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so N processes don't print N copies."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr on rank 0; other ranks only report warnings and errors."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level if is_rank0() else logging.WARNING)


def compute_init(device_type: str | None = None, seed: int = 42) -> tuple[bool, int, int, int, torch.device]:
    """
    Seed, pick the device and, under torchrun, join the process group (nccl on CUDA, gloo elsewhere).
    Returns (ddp, rank, local_rank, world_size, device).
    """
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type='cuda' was requested but CUDA is not available; pass --device-type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device_type='mps' was requested but MPS is not available; pass --device-type=cpu")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    setup_logging()
    return ddp, rank, local_rank, world_size, device


def compute_cleanup() -> None:
    """Leave the process group cleanly (a torchrun job that skips this can hang on exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Collectives that also work on gloo (CPU), which lacks reduce_scatter and ReduceOp.AVG.


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_scatter_avg(inputs: list[torch.Tensor]) -> torch.Tensor:
    """inputs[r] (one same-shape tensor per rank) -> the mean over ranks of inputs[my_rank]."""
    world = dist.get_world_size()
    if dist.get_backend() == "nccl":
        out = torch.empty_like(inputs[0])
        dist.reduce_scatter(out, inputs, op=dist.ReduceOp.AVG)
        return out
    # gloo: all-reduce the stack and keep our slice (world x the traffic; fine for CPU-scale models).
    stacked = torch.stack(inputs)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return stacked[dist.get_rank()] / world


def all_ranks(obj) -> list:
    """`obj` from every rank, in rank order (a collective: under torchrun every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_avg(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks."""
    if dist.get_backend() == "nccl":
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


# -----------------------------------------------------------------------------
# Small pieces every training script shares


# bf16 dense peak FLOP/s by device name fragment (datasheet numbers, without sparsity); first match wins.
PEAK_FLOPS = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo, or None where there is none (not Linux, no such line)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX). Without it, oneDNN emulates bf16
    matmuls about 100x slower than fp32 (measured on an AVX2-only EPYC): bf16 is a CPU default only with it."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_dtype(device: torch.device) -> str:
    """The autocast dtype when none is asked for: bf16 on CUDA and on CPUs with bf16 hardware, else fp32."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return "bfloat16"
    return "float32"


def eval_dtype(device: torch.device) -> str:
    """The dtype evaluations run in when none is asked for: bf16 on CUDA, fp32 on every CPU. On an AVX-512 BF16
    EPYC, CORE under bf16 autocast ran ~4x slower than fp32 and changed 5 of 882 answers, so an eval score is
    fp32 on CPU unless --dtype says otherwise (the dtype is reported with the score)."""
    return "bfloat16" if device.type == "cuda" else "float32"


SERVING_DTYPES = ("auto", "float32", "bfloat16")


def serving_dtype(device: torch.device | str, dtype: str = "auto") -> torch.dtype:
    """The dtype a served model's weights are cast to (GPT.prepare_for_inference): 'auto' is default_dtype's rule,
    bf16 on CUDA and on CPUs with bf16 hardware (decode at batch 1 streams every weight per token, so half the bytes
    is the lever there), fp32 elsewhere (AVX2-only CPUs emulate bf16 matmuls ~100x slower)."""
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(SERVING_DTYPES)}; got {dtype!r}")
    return getattr(torch, default_dtype(torch.device(device)) if dtype == "auto" else dtype)


def autocast_for(device: torch.device, dtype: str = ""):
    """bf16 autocast where the hardware has it (see default_dtype); fp32 elsewhere."""
    dtype = dtype or default_dtype(device)
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype must be bfloat16 or float32, got {dtype!r}")
    return torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def grad_accum_steps(total_batch_size: int, tokens_per_fwdbwd: int) -> int:
    """Micro-steps per optimizer step so that a step sees total_batch_size tokens; it must divide evenly."""
    if total_batch_size % tokens_per_fwdbwd:
        raise SystemExit(f"--total-batch-size={total_batch_size} must be a multiple of device_batch_size x "
                         f"max_seq_len x world_size = {tokens_per_fwdbwd}")
    return total_batch_size // tokens_per_fwdbwd


def set_lr_multiplier(optimizers, multiplier: float) -> None:
    """Every group's lr = its initial lr x multiplier (set_optimizers stores initial_lr)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def scale_initial_lr(optimizers, frac: float) -> None:
    """Start fine-tuning at a fraction of the pretraining learning rates (schedules then scale from there)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"] = group["initial_lr"] * frac


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """The fastest of `iters` timed calls of fn (after one untimed warm-up call), queued GPU work included. The
    best, not the mean: a machine's ceiling must not sink when something else briefly takes a core."""
    fn()
    best = float("inf")
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best
