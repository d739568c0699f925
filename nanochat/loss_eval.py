"""
Bits per byte: the validation metric that does not depend on the tokenizer's vocabulary size.

Sum the per-token cross-entropy (nats) over target tokens that stand for real bytes (special tokens have 0
bytes and ignore_index -1 targets are skipped), divide by ln(2) times the number of those bytes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Average bpb over `steps` (inputs, targets) batches; all-reduced across ranks under DDP."""
    device = model.get_device()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)
        loss = model(x, y, loss_reduction="none").view(-1)  # nats per target position
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = nbytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    if total_bytes.item() == 0:
        raise ValueError("no target bytes to evaluate: the batches contain only special or ignored tokens")
    return total_nats.item() / (math.log(2) * total_bytes.item())
