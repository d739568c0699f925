"""The GPT model: shapes, losses, GQA, KV-cache equivalence, original state-dict layout, init."""

from __future__ import annotations

import pytest
import torch

from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, apply_rotary_emb

CONFIGS = [
    GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=4, n_embd=64),  # MHA
    GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),  # GQA 2:1
    GPTConfig(sequence_len=32, vocab_size=97, n_layer=3, n_head=6, n_kv_head=1, n_embd=96),  # MQA
]


def make_model(config: GPTConfig, seed: int = 0, randomize: bool = True) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    if randomize:
        # The original init zeroes lm_head and output projections; give every weight signal for equality tests.
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("config", CONFIGS, ids=["mha", "gqa", "mqa"])
def test_forward_backward_shapes_and_loss(config):
    model = make_model(config)
    idx = torch.randint(0, config.vocab_size, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, config.vocab_size)
    assert logits.abs().max() <= 15.0  # soft-capped
    loss = model(idx, targets=idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    per_token = model(idx, targets=idx, loss_reduction="none")
    assert per_token.shape == (3 * 17,)
    torch.testing.assert_close(per_token.mean(), loss)


def test_fresh_init_loss_is_uniform():
    # lm_head is zero-initialised, so a fresh model predicts the uniform distribution: loss = ln(V).
    config = CONFIGS[1]
    model = make_model(config, randomize=False)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    loss = model(idx, targets=idx)
    assert abs(loss.item() - torch.log(torch.tensor(float(config.vocab_size))).item()) < 1e-5


def test_ignore_index_targets_are_skipped():
    config = CONFIGS[0]
    model = make_model(config)
    idx = torch.randint(0, config.vocab_size, (1, 10))
    targets = idx.clone()
    targets[0, 5:] = -1
    full = model(idx, targets=targets, loss_reduction="none")
    assert (full[5:] == 0).all()
    assert torch.allclose(model(idx, targets=targets), full[:5].mean())


def test_causality_future_tokens_do_not_change_past_logits():
    model = make_model(CONFIGS[1])
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    torch.testing.assert_close(model(idx)[0, :12], model(changed)[0, :12])
    assert not torch.allclose(model(idx)[0, 12:], model(changed)[0, 12:])


@pytest.mark.parametrize("serving", [False, True], ids=["plain", "serving"])
@pytest.mark.parametrize("config", CONFIGS, ids=["mha", "gqa", "mqa"])
def test_kv_cache_decoding_equals_full_recomputation(config, serving):
    model = make_model(config).eval()
    B, T = 2, 24
    idx = torch.randint(0, config.vocab_size, (B, T))
    with torch.no_grad():
        full = model(idx)
        if serving:  # fused q/k/v and the cache's own one-pass rotary tables, as the Engine serves
            model.prepare_for_inference(torch.float32)
        head_dim = config.n_embd // config.n_head
        # A static cache sized to T; feed a prefill, a multi-token chunk, then single tokens.
        cache = KVCache(B, config.n_kv_head, T, head_dim, config.n_layer, torch.float32 if serving else None)
        if serving:
            cache.rotary = model.rotary_tables(T, torch.float32)
        parts = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:14], kv_cache=cache)]
        parts += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(14, T)]
        full_error = ("exceeds the KV cache .24 positions" if serving
                      else "KV cache full: 25 positions asked of a cache sized for 24")
        with pytest.raises(ValueError, match=full_error):
            model(idx[:, :1], kv_cache=cache)
    incremental = torch.cat(parts, dim=1)
    assert cache.get_pos() == T
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_serving_form_keeps_the_state_dict_and_the_logits():
    """prepare_for_inference fuses q/k/v as views: same keys, shapes and values; the same logits in fp32; and
    load_state_dict afterwards writes through to the fused matrix. bf16 weights stay close to fp32."""
    config = CONFIGS[1]
    model = make_model(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        before, state = model(idx), {k: v.clone() for k, v in model.state_dict().items()}
        model.prepare_for_inference(torch.float32)
        after = model.state_dict()
        assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
        assert "qkv_weight" not in "".join(after)
        torch.testing.assert_close(model(idx), before, atol=2e-6, rtol=0)
        for rows in (idx[:1, :1], idx[:, :1]):  # one and two decode rows take the lm_head layouts of decode
            torch.testing.assert_close(model(rows), before[: rows.size(0), :1], atol=2e-6, rtol=0)
        other = make_model(config).eval()
        model.load_state_dict(other.state_dict())  # writes through to the fused q/k/v
        model.prepare_for_inference(torch.float32)  # and, as documented, refreshes the lm_head layout
        torch.testing.assert_close(model(idx[:, :1]), other(idx[:, :1]), atol=2e-6, rtol=0)
        model.load_state_dict(state)
        bf16 = model.prepare_for_inference(torch.bfloat16)(idx).float()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert (bf16 - before).abs().max() < 0.25  # soft-capped logits span +-15; bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("serving", [False, True], ids=["plain", "serving"])
@pytest.mark.parametrize("config", CONFIGS, ids=["mha", "gqa", "mqa"])
def test_hidden_states_at_some_positions_equal_the_full_models(config, serving):
    """hidden_states(at=positions) (the last block's queries, attention and MLP for those positions only) gives
    the full pass's hidden states there, per row, also after a shared prefix in a PrefixCache that was filled by
    an at-no-position pass; other positions change nothing."""
    from nanochat.core_batch import PrefixCache

    model = make_model(config).eval()
    if serving:
        model.prepare_for_inference(torch.float32)
    B, T, P, C = 3, 20, 8, config.n_embd
    idx = torch.randint(0, config.vocab_size, (B, T))
    at = torch.tensor([[3, 4, 5], [10, 11, 12], [17, 18, 19]])
    with torch.no_grad():
        full = model.hidden_states(idx)
        torch.testing.assert_close(model.hidden_states(idx, at=at), full.gather(1, at[..., None].expand(B, 3, C)),
                                   atol=1e-5, rtol=1e-5)
        changed = idx.clone()
        changed[0, 6:] = (changed[0, 6:] + 1) % config.vocab_size  # after row 0's positions: no effect there
        assert torch.equal(model.hidden_states(changed, at=at)[0], model.hidden_states(idx, at=at)[0])
        # Rows 0 and 1 continue prefix 0 (the first P tokens of idx[0]), row 2 continues prefix 1.
        prefixes = idx[:2, :P]
        cache = PrefixCache(config.n_layer, torch.tensor([0, 0, 1]))
        assert model.hidden_states(prefixes, cache, at=torch.zeros((2, 0), dtype=torch.long)).shape == (2, 0, C)
        rows = torch.cat([prefixes[[0, 0, 1]], idx[:, P:]], dim=1)
        rest_at = torch.tensor([[0, 1, 2], [2, 3, 4], [9, 10, 11]])
        got = model.hidden_states(idx[:, P:], cache, at=rest_at)
        expected = model.hidden_states(rows).gather(1, (rest_at + P)[..., None].expand(B, 3, C))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_one_pass_rotary_is_bit_identical():
    x = torch.randn(2, 7, 3, 16)
    cos, sin = torch.randn(1, 7, 1, 8).bfloat16(), torch.randn(1, 7, 1, 8).bfloat16()
    tables = torch.cat([cos, cos], -1).float(), torch.cat([sin, -sin], -1).float()
    assert torch.equal(apply_rotary_emb(x, cos, sin), apply_rotary_emb(x, *tables))


def test_state_dict_matches_original_layout():
    V, C, H, Hkv, L = 65536, 256, 2, 1, 2
    D = C // H
    config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=L, n_head=H, n_kv_head=Hkv, n_embd=C)
    # The key list and shapes of an original late-2025 checkpoint (shared/reference/nanochat.md, section 1).
    original = {"transformer.wte.weight": (V, C), "lm_head.weight": (V, C)}
    for i in range(L):
        original |= {
            f"transformer.h.{i}.attn.c_q.weight": (H * D, C),
            f"transformer.h.{i}.attn.c_k.weight": (Hkv * D, C),
            f"transformer.h.{i}.attn.c_v.weight": (Hkv * D, C),
            f"transformer.h.{i}.attn.c_proj.weight": (C, C),
            f"transformer.h.{i}.mlp.c_fc.weight": (4 * C, C),
            f"transformer.h.{i}.mlp.c_proj.weight": (C, 4 * C),
        }
    with torch.device("meta"):
        model = GPT(config)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == original
    # And a state dict built from those names/shapes loads with no missing or unexpected keys.
    fake = {k: torch.zeros(s) for k, s in original.items()}
    model = GPT(config)
    result = model.load_state_dict(fake, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_param_count_and_flops_match_reference_formula():
    # d20 in the original: C=1280, H=10, V=65536 -> 560,988,160 parameters, ~3.49e9 FLOPs/token.
    config = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == 560_988_160
    assert abs(model.estimate_flops() - 3.49e9) / 3.49e9 < 0.01


def test_init_scheme():
    config = GPTConfig(sequence_len=16, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = make_model(config, randomize=False)
    assert (model.lm_head.weight == 0).all()
    for block in model.transformer.h:
        assert (block.attn.c_proj.weight == 0).all() and (block.mlp.c_proj.weight == 0).all()
        std = block.attn.c_q.weight.std().item()
        assert abs(std - 1 / 128**0.5) < 0.01
        # c_fc: fan_in 128, fan_out 512 -> min(1, sqrt(4)) = 1 -> std 1/sqrt(128)
        assert abs(block.mlp.c_fc.weight.std().item() - 1 / 128**0.5) < 0.01
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.05


def test_generate_is_reproducible_and_greedy_is_deterministic():
    model = make_model(CONFIGS[1]).eval()
    a = list(model.generate([1, 2, 3], max_tokens=8, temperature=1.0, seed=7))
    b = list(model.generate([1, 2, 3], max_tokens=8, temperature=1.0, seed=7))
    c = list(model.generate([1, 2, 3], max_tokens=8, temperature=1.0, seed=8))
    assert a == b and a != c
    g1 = list(model.generate([5], max_tokens=6, temperature=0.0))
    g2 = list(model.generate([5], max_tokens=6, temperature=0.0, top_k=3))
    assert g1 == g2 and all(0 <= t < 97 for t in g1)


def test_bad_configs_have_clear_errors():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4, n_embd=96)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_head=5, n_kv_head=5, n_embd=96)
    model = make_model(CONFIGS[0])
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros((1, 32 * 10 + 1), dtype=torch.long))
