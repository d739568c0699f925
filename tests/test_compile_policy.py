"""
--compile=auto (nanochat/compile_policy.py): compile only when the steps left amortise the compile cost, from
figures measured for the shape and kept in the compile dir; a shape never timed is timed over its first eager steps
and decided then; short runs stay eager. No speed is asserted: the decisions below follow from figures written into
the table or handed in as step times.
"""

from __future__ import annotations

import json

import pytest
import torch

from nanochat import compile_policy
from nanochat.gpt import GPT, GPTConfig
from orchestration.workspace import nanochat_env

CPU = torch.device("cpu")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_COMPILE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    return tmp_path


def key() -> str:
    return compile_policy.shape_key(CPU, "float32", {"n_layer": 4}, 8, 512, 1)


def tiny_model() -> GPT:
    return GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))


def test_measured_figures_decide_and_the_reason_says_why(base_dir):
    (base_dir / compile_policy.CACHE_NAME).write_text(json.dumps(
        {key(): {"eager_step_s": 2.0, "compiled_step_s": 1.5, "compile_s": 30.0}}))
    long = compile_policy.decide("auto", key(), CPU, steps_left=100)
    short = compile_policy.decide("auto", key(), CPU, steps_left=50)
    assert long.compile and "measured" in long.reason and "saves 20 s" in long.reason
    assert not short.compile and "would cost 5 s" in short.reason


def test_explicit_modes_win_and_bad_ones_are_named(base_dir):
    assert compile_policy.decide("yes", key(), CPU, 1).compile is True
    assert compile_policy.decide("no", key(), CPU, 10**9).compile is False
    with pytest.raises(ValueError, match="auto, yes or no"):
        compile_policy.decide("maybe", key(), CPU, 1)


def test_an_untimed_shape_waits_for_its_probe_steps_and_uses_priors(base_dir):
    pending = compile_policy.decide("auto", key(), CPU, steps_left=1000)
    assert pending.compile is None and "no timings yet" in pending.reason
    assert compile_policy.decide("auto", key(), CPU, steps_left=compile_policy.PROBE_STEPS).compile is False
    # With the eager step timed: 1,000 steps of 10 s save far more than the prior compile cost; 20 of 1 s do not.
    slow = compile_policy.decide("auto", key(), CPU, steps_left=1000, eager_step_s=10.0)
    fast = compile_policy.decide("auto", key(), CPU, steps_left=20, eager_step_s=1.0)
    assert slow.compile and "timed over this run's first" in slow.reason and "prior" in slow.reason
    assert fast.compile is False and "would cost" in fast.reason


def test_on_cpu_the_prior_scales_with_the_machine_so_load_does_not_flip_the_decision(base_dir):
    # The tiny profile's 120-step base stage (117 steps left after the probe) stays eager whether a step takes 0.5 s
    # or a minute (a quiet or a crowded machine); 1,000 steps compile at any speed.
    for eager in (0.5, 2.2, 9.0, 60.0):
        assert compile_policy.decide("auto", key(), CPU, 117, eager_step_s=eager).compile is False, eager
        assert compile_policy.decide("auto", key(), CPU, 1000, eager_step_s=eager).compile is True, eager


def test_record_keeps_the_median_steps_and_the_compile_cost(base_dir):
    compile_policy.record(key(), eager_times=[3.0, 1.4, 1.5], compiled_times=[31.0, 1.0, 1.2, 0.9])
    compile_policy.record(key(), eager_times=[9.0, 9.0], compiled_times=[])  # too few steps: nothing changes
    entry = json.loads((base_dir / compile_policy.CACHE_NAME).read_text())[key()]
    assert entry == {"compiled_step_s": 1.0, "compile_s": 30.0, "eager_step_s": 1.45}
    compile_policy.record(key(), eager_times=[5.0, 2.0, 2.0], compiled_times=[])  # a later eager run updates its part
    entry = json.loads((base_dir / compile_policy.CACHE_NAME).read_text())[key()]
    assert entry == {"compiled_step_s": 1.0, "compile_s": 30.0, "eager_step_s": 2.0}


def test_a_corrupt_table_is_rewritten_not_fatal(base_dir):
    for text in ('{"truncated": [1', "[1, 2]", json.dumps({key(): "not a dict"}),
                 json.dumps({key(): {"eager_step_s": "fast"}})):
        (base_dir / compile_policy.CACHE_NAME).write_text(text)
        assert compile_policy.decide("auto", key(), CPU, 1000).compile is None, text
    compile_policy.record(key(), eager_times=[1.0, 1.0, 1.0], compiled_times=[])
    assert json.loads((base_dir / compile_policy.CACHE_NAME).read_text())[key()]["eager_step_s"] == 1.0


def test_shapes_have_their_own_entries():
    other = compile_policy.shape_key(CPU, "float32", {"n_layer": 4}, 16, 512, 1)
    assert other != key() and key() == compile_policy.shape_key(CPU, "float32", {"n_layer": 4}, 8, 512, 1)


def test_a_short_run_stays_eager_and_prints_why(base_dir, capsys):
    model = tiny_model()
    key_ = compile_policy.shape_key(CPU, "float32", model.config.to_dict(), 2, 16, 1)
    (base_dir / compile_policy.CACHE_NAME).write_text(json.dumps({key_: {"eager_step_s": 0.01}}))
    switch = compile_policy.compile_for_run(model, "auto", CPU, "float32", 2, 16, 1, planned_steps=10)
    assert switch.model is model and switch.decision.compile is False
    assert "torch.compile: no (10 steps x (eager 0.010 s [measured by an earlier run]" in capsys.readouterr().out
    assert compile_policy.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(base_dir / "inductor_cache")


def test_the_probe_decides_after_its_steps_and_switches_the_model(base_dir, capsys):
    switch = compile_policy.compile_for_run(tiny_model(), "auto", CPU, "float32", 2, 16, 1, planned_steps=10_000)
    assert switch.decision.compile is None and "undecided" in capsys.readouterr().out
    for left in (9_999, 9_998):
        switch.step_done(50.0, left)
        assert switch.model is switch.eager_model and switch.decision.compile is None
    switch.step_done(50.0, 9_997)  # the third eager step: 9,997 x (50 - 50/1.2) s >> the prior compile cost
    assert switch.decision.compile and switch.model is not switch.eager_model  # torch.compile is lazy: no cost here
    assert "torch.compile: yes (9997 steps x (eager 50.000 s [timed" in capsys.readouterr().out
    for _ in range(3):
        switch.step_done(40.0, 0)
    switch.finish(master=True)
    entry = json.loads((base_dir / compile_policy.CACHE_NAME).read_text())[switch.decision.key]
    assert entry == {"eager_step_s": 50.0, "compiled_step_s": 40.0, "compile_s": 0.0}


def test_the_pipeline_shares_one_compile_dir_across_runs(tmp_path, monkeypatch):
    env = nanochat_env(tmp_path / "run-1" / "base_checkpoint")
    assert env["NANOCHAT_COMPILE_DIR"] == nanochat_env(tmp_path / "run-2" / "mid_checkpoint")["NANOCHAT_COMPILE_DIR"]
    monkeypatch.setenv("NANOCHAT_COMPILE_DIR", env["NANOCHAT_COMPILE_DIR"])
    assert compile_policy.compile_dir() == tmp_path / "compile" and (tmp_path / "compile").is_dir()
