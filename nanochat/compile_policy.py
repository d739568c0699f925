"""
Whether a training run should torch.compile its model (`--compile=auto`, the default of the training scripts).

Compiling pays when the run is long enough: planned steps x (eager step - compiled step) > compile cost. The
three figures are kept per shape (device, dtype, model config, batch, threads, torch version) in
`<base_dir>/compile_decisions.json`; each run measures the ones its mode can see (an eager run its eager step;
a compiled run its compiled step and its compile cost, the first step's excess over the later ones) and the next
run of that shape decides from them. Until measured, the eager step is estimated from the step's FLOPs and a
short matmul probe, and the speed-up and compile cost are priors (below). Inductor's artefacts persist under
`<base_dir>/inductor_cache`, so a second compiled run of a shape compiles faster, and records that.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from dataclasses import dataclass

import torch

from nanochat.common import atomic_write, best_seconds, cpu_model_name, get_base_dir

# Priors, until a shape has been measured: the compiled step's speed-up and the compile cost in seconds.
# CPU: +13-30% and 15-40 s measured on a 2-core EPYC (depth 4); CUDA: the usual gain of fused kernels.
PRIOR_SPEEDUP = {"cpu": 1.2, "cuda": 1.3}
PRIOR_COMPILE_S = {"cpu": 40.0, "cuda": 60.0}
# The eager step is estimated at this fraction of the matmul probe's FLOP/s (measured 45-49% on CPU).
EAGER_EFFICIENCY = 0.4
CACHE_NAME = "compile_decisions.json"


@dataclass
class CompileDecision:
    compile: bool
    reason: str
    key: str


def use_inductor_cache() -> None:
    """Keep Inductor's compiled artefacts under the base dir (they survive /tmp cleaning and travel with it)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(get_base_dir() / "inductor_cache"))


def shape_key(device: torch.device, dtype: str, config: dict, batch: int, seq_len: int, world_size: int) -> str:
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    if device.type == "cpu":
        hardware = cpu_model_name() or hardware
    parts = dict(hardware=hardware, device=device.type, dtype=dtype, config=config, batch=batch, seq_len=seq_len,
                 world_size=world_size, threads=torch.get_num_threads(), torch=torch.__version__)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _load() -> dict:
    try:
        return json.loads((get_base_dir() / CACHE_NAME).read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: decide from estimates (and rewrite it)


def _matmul_flops(device: torch.device, dtype: str, n: int = 1024, iters: int = 3) -> float:
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    return 2 * n**3 / best_seconds(lambda: a @ a, device, iters)


def decide(mode: str, key: str, device: torch.device, dtype: str, planned_steps: int,
           step_flops: float) -> CompileDecision:
    """mode yes/no: as asked. auto: compile iff planned_steps x (eager - compiled step) > compile cost."""
    if mode in ("yes", "no"):
        return CompileDecision(mode == "yes", f"--compile={mode}", key)
    if mode != "auto":
        raise ValueError(f"--compile must be auto, yes or no, got {mode!r}")
    if device.type not in PRIOR_SPEEDUP:
        return CompileDecision(False, f"torch.compile is not used on {device.type}", key)
    known = _load().get(key, {})
    if known.get("eager_step_s"):
        eager, eager_src = known["eager_step_s"], "measured"
    else:
        eager, eager_src = step_flops / (EAGER_EFFICIENCY * _matmul_flops(device, dtype)), "estimated from FLOPs"
    if known.get("compiled_step_s") and known.get("compile_s") is not None:
        compiled, cost, src = known["compiled_step_s"], known["compile_s"], "measured"
    else:
        compiled, cost = eager / PRIOR_SPEEDUP[device.type], PRIOR_COMPILE_S[device.type]
        src = f"prior: {PRIOR_SPEEDUP[device.type]}x faster, {cost:.0f} s to compile"
    saving = planned_steps * (eager - compiled) - cost
    use = saving > 0
    reason = (f"{planned_steps} steps x (eager {eager:.3f} s [{eager_src}] - compiled {compiled:.3f} s) "
              f"{'>' if use else '<='} compile {cost:.1f} s [{src}]: {'saves' if use else 'would cost'} "
              f"{abs(saving):.0f} s")
    return CompileDecision(use, reason, key)


def record(key: str, compiled: bool, step_times: list[float]) -> None:
    """Store what this run measured for its shape: the median step (after the first), and when compiled, the
    compile cost (the first step's excess over the median). Needs at least 3 steps to say anything."""
    if len(step_times) < 3:
        return
    median = statistics.median(step_times[1:])
    path = get_base_dir() / CACHE_NAME
    table = _load()
    entry = table.setdefault(key, {})
    if compiled:
        entry.update(compiled_step_s=median, compile_s=max(0.0, step_times[0] - median))
    else:
        entry.update(eager_step_s=median)
    atomic_write(path, lambda f: f.write(json.dumps(table, indent=1, sort_keys=True).encode()))


def compile_for_run(model: torch.nn.Module, mode: str, device: torch.device, dtype: str, batch: int, seq_len: int,
                    world_size: int, planned_steps: int, tokens_per_step: int,
                    ) -> tuple[torch.nn.Module, CompileDecision]:
    """The model to train with (compiled or not) and the decision, printed with its reason. Every rank uses
    rank 0's decision (they would otherwise differ by their own timings of the probe)."""
    from nanochat.common import all_ranks, print0

    use_inductor_cache()
    key = shape_key(device, dtype, model.config.to_dict(), batch, seq_len, world_size)
    decision = decide(mode, key, device, dtype, planned_steps, model.estimate_flops() * tokens_per_step)
    decision.compile = bool(all_ranks(decision.compile)[0])
    print0(f"torch.compile: {'yes' if decision.compile else 'no'} ({decision.reason})")
    return (torch.compile(model, dynamic=False) if decision.compile else model), decision
