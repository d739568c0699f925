"""
--compile=auto (nanochat/compile_policy.py): compile only when the planned steps amortise the compile cost, from
figures measured for the shape once and kept in the base dir; short runs stay eager. No speed is asserted: the
decisions below follow from figures written into the table.
"""

from __future__ import annotations

import json

import pytest
import torch

from nanochat import compile_policy
from nanochat.gpt import GPT, GPTConfig

CPU = torch.device("cpu")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    return tmp_path


def key() -> str:
    return compile_policy.shape_key(CPU, "float32", {"n_layer": 4}, 8, 512, 1)


def test_measured_figures_decide_and_the_reason_says_why(base_dir):
    (base_dir / compile_policy.CACHE_NAME).write_text(json.dumps(
        {key(): {"eager_step_s": 2.0, "compiled_step_s": 1.5, "compile_s": 30.0}}))
    long = compile_policy.decide("auto", key(), CPU, "float32", planned_steps=100, step_flops=1e9)
    short = compile_policy.decide("auto", key(), CPU, "float32", planned_steps=50, step_flops=1e9)
    assert long.compile and "measured" in long.reason and "saves 20 s" in long.reason
    assert not short.compile and "would cost 5 s" in short.reason


def test_explicit_modes_win_and_bad_ones_are_named(base_dir):
    assert compile_policy.decide("yes", key(), CPU, "float32", 1, 1e9).compile
    assert not compile_policy.decide("no", key(), CPU, "float32", 10**9, 1e15).compile
    with pytest.raises(ValueError, match="auto, yes or no"):
        compile_policy.decide("maybe", key(), CPU, "float32", 1, 1e9)


def test_unmeasured_shapes_use_the_flops_estimate_and_priors(base_dir):
    tiny = compile_policy.decide("auto", key(), CPU, "float32", planned_steps=20, step_flops=1e9)
    assert not tiny.compile and "estimated from FLOPs" in tiny.reason and "prior" in tiny.reason
    # A step of 10^15 FLOPs takes far longer than the prior compile cost on any CPU: 1,000 of them amortise it.
    assert compile_policy.decide("auto", key(), CPU, "float32", planned_steps=1000, step_flops=1e15).compile


def test_record_keeps_the_median_step_and_the_compile_cost(base_dir):
    compile_policy.record(key(), compiled=True, step_times=[31.0, 1.0, 1.2, 0.9])
    compile_policy.record(key(), compiled=False, step_times=[3.0, 1.4, 1.5])
    compile_policy.record(key(), compiled=False, step_times=[9.0, 9.0])  # too few steps: nothing recorded
    entry = json.loads((base_dir / compile_policy.CACHE_NAME).read_text())[key()]
    assert entry == {"compiled_step_s": 1.0, "compile_s": 30.0, "eager_step_s": 1.45}


def test_shapes_have_their_own_entries():
    other = compile_policy.shape_key(CPU, "float32", {"n_layer": 4}, 16, 512, 1)
    assert other != key() and key() == compile_policy.shape_key(CPU, "float32", {"n_layer": 4}, 8, 512, 1)


def test_a_short_run_stays_eager_and_prints_why(base_dir, capsys):
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    train_model, decision = compile_policy.compile_for_run(model, "auto", CPU, "float32", 2, 16, 1, 10, 32)
    assert train_model is model and not decision.compile
    assert "torch.compile: no (10 steps x" in capsys.readouterr().out
    assert compile_policy.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(base_dir / "inductor_cache")
