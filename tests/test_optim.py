"""Muon and AdamW: orthogonalised updates, and sharded (2-process gloo) results equal single-process ones."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.adamw import DistAdamW
from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import Muon, zeropower_via_newtonschulz5


@pytest.mark.parametrize("shape", [(64, 64), (64, 256), (256, 64)])
def test_newton_schulz_pushes_singular_values_to_one(shape):
    torch.manual_seed(0)
    # A badly conditioned matrix: singular values spread over two orders of magnitude (5 iterations lift
    # values down to ~1e-3 of the Frobenius norm; smaller ones would need more steps).
    u, _, v = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    s = torch.logspace(-2, 0, min(shape))
    g = u @ torch.diag(s) @ v
    sv = torch.linalg.svdvals(zeropower_via_newtonschulz5(g))
    # The quintic is tuned for speed, not convergence: singular values land in roughly [0.7, 1.2].
    assert sv.min() > 0.55 and sv.max() < 1.25, sv
    assert torch.linalg.svdvals(g).min() < 0.011  # while the input spanned 100x


def test_muon_update_is_orthogonal_and_scaled():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(128, 32))
    before = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False)
    p.grad = torch.randn(128, 32)
    opt.step()
    update = (before - p.detach()) / (0.1 * (128 / 32) ** 0.5)
    sv = torch.linalg.svdvals(update)
    assert sv.min() > 0.55 and sv.max() < 1.25


def test_dist_adamw_matches_torch_adamw_in_one_process():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(a.detach().clone())
    ours = DistAdamW([a], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(16, 8)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    # 3 layers: Muon's size groups get blocks that do not divide evenly by 2 ranks (padding path);
    # vocab 101 is odd, so AdamW's lm_head/wte take the replicated (non-sharded) path, n_embd rows shard.
    model = GPT(GPTConfig(sequence_len=16, vocab_size=101, n_layer=3, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 101, (2, 16), generator=g) for _ in range(3)]


def train_steps(model: GPT, per_step_batches) -> None:
    optimizers = model.setup_optimizers(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.05)
    for idx_list in per_step_batches:
        for idx in idx_list:  # gradient accumulation over the given micro-batches
            (model(idx, idx) / len(idx_list)).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model()
        train_steps(model, [[idx] for idx in batches(rank)])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_optimizers_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Single process, same total batch: each step accumulates rank 0's and rank 1's micro-batch.
    model = tiny_model()
    train_steps(model, [[a, b] for a, b in zip(batches(0), batches(1))])
    changed = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)  # ranks agree exactly
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5)  # and equal the 1-process result
        changed += int(not torch.equal(v, tiny_model().state_dict()[k]))
    assert changed == len(r0)  # every parameter was actually updated


def test_newton_schulz_on_a_stack_matches_each_matrix():
    # 2-D matrices take the addmm path, stacks the batched one: the same iteration either way.
    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(0))
    stacked = zeropower_via_newtonschulz5(g)
    for i in range(3):
        torch.testing.assert_close(stacked[i], zeropower_via_newtonschulz5(g[i]), rtol=1e-4, atol=1e-5)


def test_newton_schulz_runs_in_bf16_only_where_bf16_matmuls_are_fast(monkeypatch):
    from nanochat import muon

    cpu = torch.device("cpu")
    assert muon.ns_dtype(cpu) == (torch.bfloat16 if muon.cpu_has_fast_bf16() else torch.float32)
    monkeypatch.setattr(muon, "_cpu_bf16", lambda: True)
    assert muon.ns_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(muon, "_cpu_bf16", lambda: False)
    assert muon.ns_dtype(cpu) == torch.float32
    assert muon.ns_dtype(torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("shape", [(64, 64), (32, 128)])
def test_bf16_newton_schulz_orthogonalises_like_fp32(monkeypatch, shape):
    """The bf16 path (bf16-capable CPUs, GPUs), checked here at small shapes: same singular-value band, and the
    update points the same way as the fp32 one."""
    from nanochat import muon

    torch.manual_seed(0)
    u, _, v = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    g = u @ torch.diag(torch.logspace(-2, 0, min(shape))) @ v  # singular values over two orders of magnitude
    monkeypatch.setattr(muon, "_cpu_bf16", lambda: False)
    fp32 = zeropower_via_newtonschulz5(g)
    monkeypatch.setattr(muon, "_cpu_bf16", lambda: True)
    bf16 = zeropower_via_newtonschulz5(g)
    assert bf16.dtype == torch.float32  # returned in the gradient's dtype
    sv = torch.linalg.svdvals(bf16)
    assert sv.min() > 0.55 and sv.max() < 1.25, sv
    cosine = torch.nn.functional.cosine_similarity(bf16.flatten(), fp32.flatten(), dim=0)
    assert cosine > 0.99, cosine


def test_fused_adamw_equals_the_multi_pass_update():
    # The default (torch's fused kernel) against the elementwise form, with weight decay and a changing LR.
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 16))
    b = torch.nn.Parameter(a.detach().clone())
    fused = DistAdamW([a], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    plain = DistAdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1, fused=False)
    for step in range(6):
        g = torch.randn(64, 16)
        a.grad, b.grad = g.clone(), g.clone()
        for opt in (fused, plain):
            opt.param_groups[0]["lr"] = 0.01 * (1 - step / 6)
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a, torch.zeros_like(a)) and fused.state[a]["step"] == 6
    torch.testing.assert_close(fused.state[a]["exp_avg_sq"], plain.state[b]["exp_avg_sq"], rtol=1e-6, atol=1e-12)
