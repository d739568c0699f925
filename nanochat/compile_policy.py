"""
Whether a training run should torch.compile its model (`--compile=auto`, the default of the training scripts).

Compiling pays when the run is long enough: steps left x (eager step - compiled step) > compile cost. The three
figures are kept per shape (device, dtype, model config, batch, threads, torch version) in `compile_decisions.json`
under the compile dir ($NANOCHAT_COMPILE_DIR, which the pipeline points at its workspace root so every run of a
shape shares it; else the base dir). Each run records what its mode saw (eager steps; a compiled run's step and its
compile cost, the first compiled step's excess over the later ones), and the next run of that shape decides from
them at start.

A shape never run before is not guessed from FLOPs (an estimate was 2x off on a 2-core CPU and compiled a run that
lost by it): the run starts eager, times PROBE_STEPS steps (training steps, nothing is wasted) and then decides with
its own eager step. Until a compiled run of the shape has been measured, the speed-up and compile cost are priors
(below). Inductor's artefacts persist under `<compile dir>/inductor_cache`, so a second compiled run of a shape
compiles in seconds, records that, and the decision follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.common import all_ranks, atomic_write, cpu_model_name, get_base_dir, print0

# Priors, until a compiled run of the shape has been measured: the compiled step's speed-up, and the cold compile
# cost. On CPU the cost is counted in eager steps of the run, because both slow down together when the machine is
# shared: at depth 4 on a 2-core EPYC, +13-30% and 15-40 s (7-18 steps of 2.2 s) quiet; under load 3-6, 64-75 s
# (5-7 steps of 10-15 s) and +0-25%. So a CPU run compiles when it has more than ~150 steps left (20 / (1 - 1/1.15)):
# the tiny profile's 120-step stages stay eager on a quiet or a busy machine. CUDA: the usual gain of fused kernels,
# and a compile that runs on the host's CPU, in seconds.
PRIOR_SPEEDUP = {"cpu": 1.15, "cuda": 1.3}
PRIOR_COMPILE_STEPS_CPU = 20
PRIOR_COMPILE_S_CUDA = 60.0
PROBE_STEPS = 3  # eager steps timed before an unmeasured shape decides; the first of them is warm-up
CACHE_NAME = "compile_decisions.json"


def compile_dir() -> Path:
    """Where decisions and Inductor's cache live: $NANOCHAT_COMPILE_DIR, else the base dir."""
    path = Path(os.environ.get("NANOCHAT_COMPILE_DIR") or get_base_dir())
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_inductor_cache() -> None:
    """Keep Inductor's compiled artefacts in the compile dir (they survive /tmp cleaning and serve later runs)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_dir() / "inductor_cache"))


def shape_key(device: torch.device, dtype: str, config: dict, batch: int, seq_len: int, world_size: int) -> str:
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    if device.type == "cpu":
        hardware = cpu_model_name() or hardware
    parts = dict(hardware=hardware, device=device.type, dtype=dtype, config=config, batch=batch, seq_len=seq_len,
                 world_size=world_size, threads=torch.get_num_threads(), torch=torch.__version__)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _load() -> dict:
    try:
        table = json.loads((compile_dir() / CACHE_NAME).read_text())
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: decide by probing (and rewrite it)


@dataclass
class CompileDecision:
    compile: bool | None  # None: not decided yet (auto, shape unmeasured: decided after PROBE_STEPS eager steps)
    reason: str
    key: str


def decide(mode: str, key: str, device: torch.device, steps_left: int,
           eager_step_s: float | None = None) -> CompileDecision:
    """
    mode yes/no: as asked. auto: compile iff steps_left x (eager - compiled step) > compile cost, with the eager step
    from this shape's table or eager_step_s (measured by this run); undecided if neither is known.
    """
    if mode in ("yes", "no"):
        return CompileDecision(mode == "yes", f"--compile={mode}", key)
    if mode != "auto":
        raise ValueError(f"--compile must be auto, yes or no, got {mode!r}")
    if device.type not in PRIOR_SPEEDUP:
        return CompileDecision(False, f"torch.compile is not used on {device.type}", key)
    known = _load().get(key)
    known = known if isinstance(known, dict) else {}
    if eager_step_s is not None:
        eager, eager_src = eager_step_s, f"timed over this run's first {PROBE_STEPS} steps"
    elif isinstance(known.get("eager_step_s"), (int, float)):
        eager, eager_src = float(known["eager_step_s"]), "measured by an earlier run"
    elif steps_left <= PROBE_STEPS:
        return CompileDecision(False, f"{steps_left} steps: too few to time, let alone amortise a compile", key)
    else:
        return CompileDecision(None, f"this shape has no timings yet: deciding after {PROBE_STEPS} eager steps", key)
    if isinstance(known.get("compiled_step_s"), (int, float)) and isinstance(known.get("compile_s"), (int, float)):
        compiled, cost, src = float(known["compiled_step_s"]), float(known["compile_s"]), "measured"
    else:
        compiled = eager / PRIOR_SPEEDUP[device.type]
        if device.type == "cpu":
            cost = PRIOR_COMPILE_STEPS_CPU * eager
            src = f"prior: {PRIOR_SPEEDUP['cpu']}x faster, compiling takes {PRIOR_COMPILE_STEPS_CPU} eager steps"
        else:
            cost = PRIOR_COMPILE_S_CUDA
            src = f"prior: {PRIOR_SPEEDUP[device.type]}x faster, {cost:.0f} s to compile"
    saving = steps_left * (eager - compiled) - cost
    use = saving > 0
    reason = (f"{steps_left} steps x (eager {eager:.3f} s [{eager_src}] - compiled {compiled:.3f} s) "
              f"{'>' if use else '<='} compile {cost:.1f} s [{src}]: {'saves' if use else 'would cost'} "
              f"{abs(saving):.0f} s")
    return CompileDecision(use, reason, key)


def record(key: str, eager_times: list[float], compiled_times: list[float]) -> None:
    """
    Store what this run measured for its shape: the median eager step (after the first, which warms up), and with
    at least 3 compiled steps the median compiled step and the compile cost (the first compiled step's excess).
    """
    entry = {}
    if len(eager_times) >= 3:
        entry["eager_step_s"] = statistics.median(eager_times[1:])
    if len(compiled_times) >= 3:
        median = statistics.median(compiled_times[1:])
        entry.update(compiled_step_s=median, compile_s=max(0.0, compiled_times[0] - median))
    if not entry:
        return
    table = _load()
    old = table.get(key)
    table[key] = {**(old if isinstance(old, dict) else {}), **entry}
    atomic_write(compile_dir() / CACHE_NAME, lambda f: f.write(json.dumps(table, indent=1, sort_keys=True).encode()))


@dataclass
class CompileSwitch:
    """
    The model a training loop runs (`.model`), compiled or not, per --compile. Call step_done(dt, steps_left) after
    every optimizer step: it times the steps, takes a pending auto decision after PROBE_STEPS eager steps (every
    rank takes rank 0's, in the same step), and finish() records the timings for the next run of the shape.
    """

    eager_model: torch.nn.Module
    mode: str
    device: torch.device
    decision: CompileDecision
    model: torch.nn.Module = field(init=False)
    eager_times: list[float] = field(default_factory=list)
    compiled_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model = self.eager_model
        if self.decision.compile is not None:
            self._apply()

    def _apply(self) -> None:
        print0(f"torch.compile: {'yes' if self.decision.compile else 'no'} ({self.decision.reason})")
        if self.decision.compile:
            self.model = torch.compile(self.eager_model, dynamic=False)

    def step_done(self, dt: float, steps_left: int) -> None:
        (self.compiled_times if self.model is not self.eager_model else self.eager_times).append(dt)
        if self.decision.compile is None and len(self.eager_times) == PROBE_STEPS:
            eager = statistics.median(self.eager_times[1:])
            # Every rank decides in this step, from rank 0's figures (their own timings differ a little).
            self.decision = all_ranks(decide(self.mode, self.decision.key, self.device, steps_left, eager))[0]
            self._apply()

    def finish(self, master: bool) -> None:
        if master:
            record(self.decision.key, self.eager_times, self.compiled_times)


def compile_for_run(model: torch.nn.Module, mode: str, device: torch.device, dtype: str, batch: int, seq_len: int,
                    world_size: int, planned_steps: int) -> CompileSwitch:
    """The run's CompileSwitch; its decision (or that it will be taken after the probe steps) is printed now."""
    use_inductor_cache()
    key = shape_key(device, dtype, model.config.to_dict(), batch, seq_len, world_size)
    decision = all_ranks(decide(mode, key, device, planned_steps))[0]  # nodes may hold different tables
    if decision.compile is None:
        print0(f"torch.compile: undecided ({decision.reason})")
    return CompileSwitch(model, mode, device, decision)
