"""
The blocked lm_head + soft-cap + cross-entropy (nanochat/chunked_loss.py) gives the plain path's loss and
gradients: every reduction, ignored targets, blocks that do not divide the rows, gradient accumulation scaling,
bf16 autocast, and inside a compiled model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanochat.chunked_loss import softcap_cross_entropy
from nanochat.gpt import GPT, GPTConfig


def plain(x, w, t, cap=15.0, reduction="mean"):
    logits = (cap * torch.tanh(F.linear(x, w) / cap)).float()
    return F.cross_entropy(logits, t, ignore_index=-1, reduction=reduction)


def inputs(n=37, c=16, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    w = torch.randn(v, c, generator=g) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -1
    return x, w, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("block_rows", [1, 8, 64])
def test_loss_and_gradients_equal_the_plain_path(reduction, block_rows):
    x, w, t = inputs()
    grads = []
    for fn in (plain, lambda *a, **k: softcap_cross_entropy(*a, block_rows=block_rows, **k)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xi, wi, t, 15.0, reduction=reduction)
        (loss * 0.25).backward()  # a scaled loss, as gradient accumulation divides it
        grads.append((loss.detach(), xi.grad, wi.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_row_losses_without_gradients_and_with_them():
    x, w, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(softcap_cross_entropy(x, w, t, 15.0, "none", block_rows=8),
                                   plain(x, w, t, reduction="none"), rtol=1e-5, atol=1e-6)
    xg = x.clone().requires_grad_()
    per_row = softcap_cross_entropy(xg, w, t, 15.0, "none")
    (per_row * torch.arange(len(t))).sum().backward()  # independent row weights need the plain path
    xp = x.clone().requires_grad_()
    (plain(xp, w, t, reduction="none") * torch.arange(len(t))).sum().backward()
    torch.testing.assert_close(xg.grad, xp.grad)


def test_bf16_autocast_stays_close_to_fp32():
    x, w, t = inputs(n=64, c=32, v=512)
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = softcap_cross_entropy(xi, w, t, 15.0, block_rows=16)
    loss.backward()
    assert loss.dtype == torch.float32 and xi.grad.dtype == torch.float32
    torch.testing.assert_close(loss, plain(x, w, t), rtol=2e-2, atol=2e-2)


def test_bad_reduction_is_named():
    x, w, t = inputs()
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(x, w, t, 15.0, "avg")


def test_a_compiled_model_trains_with_the_blocked_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    x = torch.randint(0, 128, (2, 16))
    y = torch.roll(x, -1, 1)
    eager = model(x, y)
    eager.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, dynamic=False)(x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-4, atol=1e-6)
