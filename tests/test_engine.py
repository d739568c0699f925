"""Engine: KV-cache sampling equals naive generation, independent seeded samples, calculator tool use."""

from __future__ import annotations

import pytest
import torch

from nanochat.common import cpu_has_fast_bf16, serving_dtype
from nanochat.engine import Engine, KVCache, use_calculator
from nanochat.gpt import GPT, GPTConfig


def random_model(vocab_size: int, seed: int = 0, n_kv_head: int = 2) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    model = GPT(config)
    model.init_weights()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_engine_greedy_equals_naive_generate(small_tokenizer, n_kv_head):
    tok = small_tokenizer
    model = random_model(tok.get_vocab_size(), seed=n_kv_head, n_kv_head=n_kv_head)
    prompt = tok.encode("The history of the language", prepend="<|bos|>")
    naive = list(model.generate(prompt, max_tokens=20, temperature=0.0))
    rows, masks = Engine(model, tok).generate_batch(prompt, num_samples=1, max_tokens=20, temperature=0.0)
    generated = rows[0][len(prompt) :]
    # The engine stops at <|assistant_end|>/<|bos|>; compare up to that point.
    stop = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    expected = []
    for t in naive:
        if t in stop:
            break
        expected.append(t)
    assert generated == expected and len(expected) > 0
    assert masks[0] == [0] * len(prompt) + [1] * len(generated)


def test_serving_form_greedy_equals_the_plain_model(small_tokenizer):
    """prepare_for_inference in fp32 (fused q/k/v, the cache's rotary tables) decodes the tokens the checkpoint's
    own layout gives."""
    tok = small_tokenizer
    prompt = tok.encode("The history of the language", prepend="<|bos|>")
    plain = Engine(random_model(tok.get_vocab_size()), tok).generate_batch(prompt, max_tokens=24, temperature=0.0)
    served = random_model(tok.get_vocab_size()).prepare_for_inference(torch.float32)
    assert Engine(served, tok).generate_batch(prompt, max_tokens=24, temperature=0.0) == plain


def test_bf16_serving_gives_the_fp32_greedy_tokens(small_tokenizer):
    """The documented tolerance of --dtype=bfloat16: on a short prompt the greedy tokens equal fp32's, and the
    prompt's next-token logits (soft-capped to +-15) differ by less than 0.25."""
    tok = small_tokenizer
    prompt = tok.encode("The capital of France is", prepend="<|bos|>")
    ids = torch.tensor([prompt])
    fp32 = random_model(tok.get_vocab_size()).prepare_for_inference(torch.float32)
    bf16 = random_model(tok.get_vocab_size()).prepare_for_inference(torch.bfloat16)
    with torch.no_grad():
        diff = (fp32(ids, last_only=True) - bf16(ids, last_only=True).float()).abs().max().item()
    assert 0 < diff < 0.25
    rows32, _ = Engine(fp32, tok).generate_batch(prompt, max_tokens=16, temperature=0.0)
    rows16, _ = Engine(bf16, tok).generate_batch(prompt, max_tokens=16, temperature=0.0)
    assert rows16 == rows32 and len(rows32[0]) > len(prompt) + 4


def test_serving_dtype_follows_the_hardware():
    fast = cpu_has_fast_bf16()
    assert serving_dtype("cpu") == (torch.bfloat16 if fast else torch.float32)
    assert serving_dtype(torch.device("cuda")) == torch.bfloat16  # decided from the device type alone
    assert serving_dtype("cpu", "float32") == torch.float32 and serving_dtype("cpu", "bfloat16") == torch.bfloat16
    assert cpu_has_fast_bf16("flags : fpu avx2 avx512f avx512_bf16") and not cpu_has_fast_bf16("flags : avx2")
    with pytest.raises(ValueError, match="--dtype must be one of auto, float32, bfloat16; got 'fp16'"):
        serving_dtype("cpu", "fp16")


def test_samples_are_independent_and_reproducible(small_tokenizer):
    tok = small_tokenizer
    model = random_model(tok.get_vocab_size())
    engine = Engine(model, tok)
    prompt = tok.encode("Once upon a time", prepend="<|bos|>")

    def run(seed):
        return engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=seed)[0]

    a, b, c = run(1), run(1), run(2)
    assert a == b  # same seed -> same samples
    assert a != c  # another seed -> other samples
    firsts = [row[len(prompt)] for row in a]
    # Every row samples its own first token (the original shared it): with a near-uniform 512-way
    # distribution, 4 rows agreeing on every first token across 3 seeds would be a ~1e-7 coincidence.
    all_firsts = firsts + [row[len(prompt)] for row in run(3)] + [row[len(prompt)] for row in c]
    assert len(set(all_firsts)) > 3
    assert len({tuple(r) for r in a}) == 4


def test_streaming_yields_one_column_per_step(small_tokenizer):
    tok = small_tokenizer
    model = random_model(tok.get_vocab_size())
    prompt = tok.encode("abc", prepend="<|bos|>")
    steps = list(Engine(model, tok).generate(prompt, num_samples=3, max_tokens=5, temperature=0.8, top_k=20))
    assert 1 <= len(steps) <= 5
    for column, masks in steps:
        assert len(column) == 3 and masks == [1, 1, 1]


def overfit_model(tok, ids: list[int], steps: int = 300) -> GPT:
    """Train a real tiny model until greedy decoding reproduces `ids` (a scripted tool-using reply)."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = GPT(config)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([ids[1:]])
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.02:
            break
    return model.eval()


def test_calculator_result_is_forced_into_the_row(small_tokenizer):
    tok = small_tokenizer
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode("what is 12*3?"), sp("<|user_end|>"),
              sp("<|assistant_start|>")]
    # The model learns to call the calculator but (deliberately) learns a WRONG output, 99: the engine must
    # replace what the model would say with the real result, 36, and mark those tokens as forced (mask 0).
    call = [sp("<|python_start|>"), *tok.encode("12*3"), sp("<|python_end|>")]
    wrong = [sp("<|output_start|>"), *tok.encode("99"), sp("<|output_end|>")]
    tail = [*tok.encode(" done"), sp("<|assistant_end|>")]
    model = overfit_model(tok, prompt + call + wrong + tail)
    rows, masks = Engine(model, tok).generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    forced = [sp("<|output_start|>"), *tok.encode("36"), sp("<|output_end|>")]
    for row, mask in zip(rows, masks):
        reply = row[len(prompt) :]
        reply_mask = mask[len(prompt) :]
        assert reply[: len(call)] == call and reply_mask[: len(call)] == [1] * len(call)
        after = reply[len(call) : len(call) + len(forced)]
        assert after == forced, tok.decode(reply)
        assert reply_mask[len(call) : len(call) + len(forced)] == [0] * len(forced)
        assert "99" not in tok.decode(reply)


@pytest.mark.parametrize(
    "expr, expected",
    [("1+2*3", 7), ("12,345 + 5", 12350), ("(10 - 4) / 4", 1.5), ("7 // 2", 3), ("-3 % 5", 2),
     ("'strawberry'.count('r')", 3), ("2 ** 10", None), ("'a' * 10**12", None), ("'a' * 1000000000000", None),
     ("__import__('os').system('true')", None), ("open('/etc/passwd').read()", None), ("1/0", None),
     ("x + 1", None), ("", None), ("1" * 300, None), ("(lambda: 1)()", None), ("[1, 2]", None)],
)
def test_calculator_is_safe(expr, expected):
    assert use_calculator(expr) == expected


def test_prefill_broadcasts_batch1_prefix():
    src = KVCache(1, 2, 8, 4, 3)
    for layer in range(3):
        src.insert_kv(layer, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    dst = KVCache(4, 2, 20, 4, 3)
    dst.prefill(src)
    assert dst.get_pos() == 5
    for b in range(4):
        torch.testing.assert_close(dst.kv_cache[:, :, b, :, :5], src.kv_cache[:, :, 0, :, :5])
    with pytest.raises(ValueError, match="cannot hold"):
        KVCache(4, 2, 3, 4, 3).prefill(src)


def test_bad_prompts_are_rejected(small_tokenizer):
    tok = small_tokenizer
    engine = Engine(random_model(tok.get_vocab_size()), tok)
    for bad in ([], [tok.get_vocab_size()], [-1], ["a"], [1.5], "hello"):
        with pytest.raises(ValueError):
            list(engine.generate(bad, max_tokens=2))
    with pytest.raises(ValueError, match="temperature"):
        list(engine.generate([1], max_tokens=2, temperature=-1))


def test_generation_never_runs_past_the_model_limit(small_tokenizer):
    tok = small_tokenizer
    model = random_model(tok.get_vocab_size())
    limit = model.cos.size(1)
    prompt = [1] * (limit - 3)
    steps = list(Engine(model, tok).generate(prompt, max_tokens=100, temperature=1.0))
    assert len(steps) <= 3
