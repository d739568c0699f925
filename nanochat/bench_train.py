"""
`python -m nanochat.bench train --baseline`: the original nanochat's training step against ours, in one process,
same random model and tokens, one step of each variant per round (the order rotates every round), medians of the
rounds after warm-up. Each variant has its own copy of the model and its own optimizers.

The baseline is the original's compute (late-2025 nanochat, one process, as its base_train runs on a CPU): the
whole model torch.compile'd (default options) with the loss inside the graph on the full (B*T, vocab) logits
(lm_head, soft-cap 15, `.float()`, cross_entropy); fp32 (its CPU path has no autocast);
`torch.optim.AdamW(fused=True)` for the embedding and lm_head; Muon with its Newton-Schulz torch.compile'd. One
deviation: the original casts Newton-Schulz to bf16 on every device; on a CPU without bf16 hardware that is emulated
(~100x slower matmuls), so here it iterates in fp32, as ours does there. The deviation is in the original's favour.

Ours is what base_train runs on this machine: `default_dtype` (bf16 autocast only on bf16-capable CPUs), the
blocked loss (nanochat/chunked_loss.py), DistAdamW and Muon, eager (`ours_eager`) and compiled (`ours_compiled`,
what --compile=auto picks for a long run).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from nanochat.bench import device_and_dtype, machine_info, random_model
from nanochat.common import autocast_for
from nanochat.gpt import LOGIT_SOFTCAP
from nanochat.muon import NS_COEFFS

VARIANTS = ("original", "ours_eager", "ours_compiled")


def original_newton_schulz(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The original's zeropower_via_newtonschulz5, in fp32 (it casts to bf16: see the module docstring)."""
    a, b, c = NS_COEFFS
    X = G.float()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


class OriginalMuon(torch.optim.Optimizer):
    """The original's single-process Muon: groups by numel, Nesterov momentum, compiled Newton-Schulz."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5):
        params = list(params)
        groups = [{"params": [p for p in params if p.numel() == n]} for n in sorted({p.numel() for p in params})]
        super().__init__(groups, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self.newton_schulz = torch.compile(original_newton_schulz)  # @torch.compile in the original

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                g = g.lerp_(buf, group["momentum"])
                g = self.newton_schulz(g, steps=group["ns_steps"])
                p.add_(g, alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)


class OriginalLoss(torch.nn.Module):
    """The original's GPT.forward with targets: full logits, soft-cap, fp32 cross-entropy, one graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.model.hidden_states(idx))
        logits = (LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def original_optimizers(model) -> list[torch.optim.Optimizer]:
    """The original's setup_optimizers without DDP: the same groups and learning rates as ours."""
    scale = (model.config.n_embd / 768) ** -0.5
    adamw = torch.optim.AdamW([dict(params=list(model.lm_head.parameters()), lr=0.004 * scale),
                               dict(params=list(model.transformer.wte.parameters()), lr=0.2 * scale)],
                              betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=True)
    return [adamw, OriginalMuon(model.transformer.h.parameters(), lr=0.02, momentum=0.95)]


def peak_rss_reset() -> bool:
    """Reset the process's peak RSS (Linux: clear_refs 5), so each variant's peak is its own; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class Variant:
    def __init__(self, name: str, args, device: torch.device, dtype: str, x: torch.Tensor, y: torch.Tensor):
        self.name, self.x, self.y, self.accum = name, x, y, args.accum_steps
        self.model = random_model(args, args.vocab_size, device, args.seq_len)  # seeded: every variant alike
        if name == "original":
            self.dtype, self.loss = "float32", torch.compile(OriginalLoss(self.model))
            self.optimizers = original_optimizers(self.model)
        else:
            self.dtype = dtype
            self.loss = torch.compile(self.model, dynamic=False) if name != "ours_eager" else self.model
            self.optimizers = self.model.setup_optimizers()
        self.autocast = autocast_for(device, self.dtype)
        self.step_s: list[float] = []
        self.opt_s: list[float] = []
        self.losses: list[float] = []
        self.peak_rss = 0.0

    def step(self, timed: bool, device: torch.device) -> None:
        from nanochat.common import synchronize

        rss_ok = peak_rss_reset()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(self.accum):
            with self.autocast:
                loss = self.loss(self.x, self.y)
            (loss / self.accum).backward()
        synchronize(device)
        t1 = time.perf_counter()
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        synchronize(device)
        t2 = time.perf_counter()
        self.losses.append(loss.item())
        if timed:
            self.step_s.append(t2 - t0)
            self.opt_s.append(t2 - t1)
            if rss_ok:
                self.peak_rss = max(self.peak_rss, peak_rss_mib())


def bench_train_baseline(args) -> list[dict]:
    """One JSON line per variant: median step, tok/s, optimizer ms, peak RSS, ratio to the original."""
    device, dtype = device_and_dtype(args)
    names = args.variants.split(",") if getattr(args, "variants", "") else list(VARIANTS)
    if set(names) - set(VARIANTS) or "original" not in names:
        raise SystemExit(f"--variants must include original and be among {','.join(VARIANTS)}, got {args.variants!r}")
    torch.manual_seed(1)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.roll(x, -1, dims=1)
    load_before = os.getloadavg()
    variants = [Variant(name, args, device, dtype, x, y) for name in names]
    first_s = {}
    for r in range(args.warmup + args.steps):
        order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate: no variant always first
        for v in order:
            t0 = time.perf_counter()
            v.step(timed=r >= args.warmup, device=device)
            if r == 0:
                first_s[v.name] = time.perf_counter() - t0  # includes compiling
        print(f"round {r + 1}: " + ", ".join(f"{v.name} {v.losses[-1]:.4f}" for v in variants)
              + (f", step ms {[round(v.step_s[-1] * 1000) for v in variants]}" if r >= args.warmup else ""),
              file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    tokens = args.batch_size * args.seq_len * args.accum_steps
    base = statistics.median(next(v for v in variants if v.name == "original").step_s)
    lines = []
    for v in variants:
        step = statistics.median(v.step_s)
        lines.append({
            "bench": "train_baseline", **machine_info(device), "device": device.type, "variant": v.name,
            "dtype": v.dtype, "depth": args.depth, "vocab_size": args.vocab_size, "batch": args.batch_size,
            "seq_len": args.seq_len, "accum_steps": args.accum_steps, "tokens_per_step": tokens,
            "timed_steps": f"{args.warmup + 1}-{args.warmup + args.steps}", "step_ms": round(step * 1000, 1),
            "tok_per_sec": round(tokens / step, 1), "optimizer_ms": round(statistics.median(v.opt_s) * 1000, 1),
            "first_step_s": round(first_s[v.name], 1), "peak_rss_mib": v.peak_rss,
            "first_loss": round(v.losses[0], 5), "last_loss": round(v.losses[-1], 5),
            "speedup_vs_original": round(base / step, 3), "load_avg_before": [round(a, 2) for a in load_before],
            "load_avg_after": [round(a, 2) for a in load_after],
        })
    return lines
