"""
Muon: momentum SGD whose update for each 2-D weight matrix is orthogonalised (all singular values pushed
towards 1) with a quintic Newton-Schulz iteration, so every direction of the matrix learns at a similar rate.

Distributed: parameters of equal shape are processed in blocks of `world_size`. Gradients are
reduce-scattered so rank r owns (and keeps momentum for) parameter r of each block, orthogonalises only that
one, and the updated parameters are all-gathered back. Optimizer state is therefore sharded across ranks.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from nanochat.common import cpu_has_fast_bf16, is_distributed, reduce_scatter_avg

NS_COEFFS = (3.4445, -4.7750, 2.0315)


@functools.cache
def _cpu_bf16() -> bool:
    return cpu_has_fast_bf16()


def ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs and on CPUs with bf16 hardware (AVX-512 BF16 / AMX): the iteration only needs singular values
    in ~[0.7, 1.2], which bf16 holds, and its matmuls run at twice fp32's rate or better there. fp32 on other CPUs,
    which emulate bf16 matmuls ~100x slower than fp32."""
    return torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and _cpu_bf16()) else torch.float32


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """
    Approximately orthogonalise G (replace its singular values by ~1). The quintic coefficients are tuned to
    push small singular values up fast rather than to converge exactly, so results land in ~[0.7, 1.2],
    which is what Muon wants. Runs in bf16 where bf16 matmuls are fast (see ns_dtype).
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(ns_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT  # iterate on the wide orientation: X @ X^T is then the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        if X.ndim == 2:
            # addmm folds the scalings into the matmuls: no separate elementwise passes over A and X
            # (Newton-Schulz on a 1024 x 256 matrix: 35 -> 24 ms on a CPU core).
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        else:
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only takes 2-D matrices; got a parameter of shape {tuple(p.shape)}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        # One group per parameter shape, so a block of world_size params can be stacked for collectives.
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == s]} for s in shapes]
        super().__init__(groups, defaults)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        momentum = group["momentum"]
        buf.lerp_(grad, 1 - momentum)
        g = grad.lerp(buf, momentum) if group["nesterov"] else buf
        g = zeropower_via_newtonschulz5(g, steps=group["ns_steps"])
        # Scale so tall and wide matrices get comparable per-element update sizes.
        scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        p.add_(g.to(p.dtype), alpha=-group["lr"] * scale)

    @torch.no_grad()
    def step(self) -> None:
        if not is_distributed():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(p, p.grad, group)
            return

        rank, world = dist.get_rank(), dist.get_world_size()
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world):
                block = params[base : base + world]
                # Pad the last block with zeros so every rank takes part in every collective.
                pad = torch.zeros_like(block[0])
                grads = [p.grad if p.grad is not None else pad for p in block]
                grads += [pad] * (world - len(block))
                owned_grad = reduce_scatter_avg(grads)
                owned = base + rank < len(params)
                if owned:
                    self._update(params[base + rank], owned_grad, group)
                mine = params[base + rank].data.clone() if owned else pad
                gathered = [torch.empty_like(pad) for _ in range(world)]
                dist.all_gather(gathered, mine)
                for p, new in zip(block, gathered):
                    p.data.copy_(new)
