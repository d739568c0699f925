"""
The benchmark suite: `python -m nanochat.bench all --quick` prints one sane JSON line per figure with the machine,
each next to its limit, and the pieces the figures are computed from are right. Speeds are never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat import bench
from nanochat.common import cpu_has_fast_bf16, default_dtype
from nanochat.gpt import GPT, GPTConfig, norm

MACHINE = ("cpu", "cores", "threads", "cpu_capability", "torch")


def test_bench_train_prints_figures(capsys):
    (result,) = bench.main(["train", "--depth=1", "--vocab-size=512", "--seq-len=32", "--batch-size=2",
                            "--steps=2", "--warmup=1", "--device-type=cpu"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))
    for key in (*MACHINE, "tok_per_sec", "flops_per_sec", "matmul_peak_flops", "peak_rss_mib"):
        assert key in printed, key
    assert printed["tok_per_sec"] > 0 and 0 < printed["ratio_to_matmul_peak"] < 5
    assert printed["params"] == 2 * 512 * 64 + 12 * 64 * 64
    assert printed["dtype"] == default_dtype(torch.device("cpu"))


def test_bench_train_baseline_times_the_original_against_ours(capsys):
    lines = bench.main(["--threads=1", "train", "--baseline", "--variants=original,ours_eager", "--depth=1",
                        "--vocab-size=512", "--seq-len=32", "--batch-size=2", "--steps=2", "--warmup=1",
                        "--device-type=cpu"])
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == json.loads(json.dumps(lines))
    assert [p["variant"] for p in printed] == ["original", "ours_eager"]
    original, ours = printed
    assert original["dtype"] == "float32" and ours["dtype"] == default_dtype(torch.device("cpu"))
    # Same model, same tokens: the original's full-logits loss and our blocked loss agree on the first step.
    if ours["dtype"] == "float32":
        assert ours["first_loss"] == pytest.approx(original["first_loss"], rel=1e-4)
    assert 5 < original["first_loss"] < 8  # ~ln(512) for a fresh model
    for p in printed:
        assert all(k in p for k in MACHINE) and p["threads"] == 1 and p["timed_steps"] == "2-3"
        assert p["tokens_per_step"] == 64 and p["tok_per_sec"] > 0 and 0 < p["optimizer_ms"] < p["step_ms"]
        assert p["peak_rss_mib"] > 0 and len(p["load_avg_before"]) == 3
        assert p["speedup_vs_original"] == pytest.approx(original["step_ms"] / p["step_ms"], rel=0.01)
    with pytest.raises(SystemExit, match="--variants must include original"):
        bench.main(["train", "--baseline", "--variants=ours_eager,ours_fast"])


def test_all_quick_prints_every_figure_next_to_its_limit(capsys):
    lines = bench.main(["--threads=1", "all", "--quick", "--device-type=cpu"])
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == json.loads(json.dumps(lines))
    by_bench: dict[str, list[dict]] = {}
    for line in printed:
        assert all(k in line for k in MACHINE), line
        assert line["threads"] == 1
        by_bench.setdefault(line["bench"], []).append(line)
    assert sorted(by_bench) == ["core", "dataloader", "decode", "tokenizer", "train"]

    (tok,) = by_bench["tokenizer"]
    assert tok["vocab_size"] == bench.QUICK["vocab_size"] and tok["train_chars"] >= bench.QUICK["train_chars"]
    assert tok["train_chars_per_sec"] > 0 and tok["encode_mb_per_sec"] > 0 and 1 < tok["bytes_per_token"] < 10

    (train,) = by_bench["train"]
    assert train["depth"] == bench.QUICK["depth"] and 0 < train["ratio_to_matmul_peak"] < 5

    (loader,) = by_bench["dataloader"]
    assert loader["tok_per_sec"] > 0 and loader["train_tok_per_sec"] == train["tok_per_sec"]
    assert loader["ratio_to_train"] == pytest.approx(loader["tok_per_sec"] / train["tok_per_sec"], rel=0.01)

    assert [d["batch"] for d in by_bench["decode"]] == [1, 8]
    for d in by_bench["decode"]:
        assert d["prompt_tokens"] == bench.QUICK["prompt_len"]
        # The special-token rows of lm_head are zeroed, so no row stops before max_new_tokens.
        assert d["new_tokens"] == bench.QUICK["max_new_tokens"]
        assert d["prefill_ms"] > 0 and d["decode_tok_per_sec"] > 0 and d["memory_bandwidth"] > 1e8
        assert d["bytes_per_step"] > d["weights_mib"] * 2**20 and 0 < d["ratio_to_bandwidth"] < 20

    (core,) = by_bench["core"]
    assert core["core_label"].startswith("CORE[") and core["examples"] > 0 and core["examples_per_sec"] > 0
    assert sum(t["examples"] for t in core["by_task_type"].values()) == core["examples"]


def test_decode_bytes_per_step_counts_weights_and_kv_cache():
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(config)
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 2 * (32 * 128)  # c_q, c_k + c_v (GQA), c_proj, MLP
    weights = (2 * per_layer + 100 * 32) * 4 + 3 * 32 * 4  # blocks + lm_head, and 3 embedding rows
    kv = 2 * 2 * 3 * 2 * 10 * 8 * 4  # k and v, 2 layers, batch 3, 2 kv heads, 10 positions, head_dim 8
    assert bench.decode_bytes_per_step(model, 3, 10, torch.float32) == weights + kv


def test_bandwidth_and_matmul_probes_measure_something():
    cpu = torch.device("cpu")
    assert bench.memory_bandwidth(cpu, mib=8, iters=2) > 1e8
    assert bench.matmul_peak(cpu, torch.float32, n=128, iters=2) > 1e6


def test_bf16_is_the_cpu_default_only_with_bf16_hardware():
    assert cpu_has_fast_bf16("flags : fpu sse avx2 avx512f avx512_bf16 amx_tile")
    assert cpu_has_fast_bf16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_has_fast_bf16("flags : fpu sse avx2 avx512f avx512bw")  # AVX-512 without BF16: emulated
    assert default_dtype(torch.device("cpu")) == ("bfloat16" if cpu_has_fast_bf16() else "float32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 7, 2, 128), (16, 64, 96)])
def test_cpu_norm_is_bit_identical_to_rms_norm(shape, dtype):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    assert torch.equal(norm(x), F.rms_norm(x, (shape[-1],)))
    a, b = x.float().clone().requires_grad_(), x.float().clone().requires_grad_()
    norm(a).square().sum().backward()
    F.rms_norm(b, (shape[-1],)).square().sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_prefill_last_only_logits_equal_the_last_row():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    ids = torch.randint(0, 64, (2, 9))
    full = model(ids)
    last = model(ids, last_only=True)
    assert last.shape == (2, 1, 64)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_nanochat_makes_openmp_threads_sleep_unless_told_otherwise(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import nanochat, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_orchestration_figure_needs_a_run(tmp_path):
    import dagster as dg

    from orchestration.run_summary import orchestration_figure

    with pytest.raises(SystemExit, match="no runs"):
        orchestration_figure(dg.DagsterInstance.ephemeral())


def test_the_library_and_its_benchmarks_import_no_orchestration():
    code = ("import sys, nanochat.bench, nanochat.base_train, nanochat.engine, nanochat.core_eval; "
            "print(sorted(m for m in sys.modules\n"
            "             if m.split('.')[0] in ('dagster', 'orchestration', 'store', 'importer', 'app')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_muon_flops_count_the_newton_schulz_matmuls():
    model = GPT(GPTConfig(sequence_len=8, vocab_size=16, n_layer=1, n_head=1, n_kv_head=1, n_embd=4))
    # 4 square 4x4 attention matrices and two 4x16 MLP matrices, 5 iterations each.
    square, wide = 4 * 4**3 + 2 * 4**3, 4 * 16 * 16 + 2 * 4**3
    assert bench.muon_flops_per_step(model) == 5 * (4 * square + 2 * wide)


def test_gpu_check_dry_run_runs_every_step_at_cpu_size(tmp_path):
    """scripts/gpu_check.sh --dry-run: the plan, then each step (bench train x2, decode, core, tokenizer, torchrun
    base_train with a save, then --resume) at CPU size, every JSON line under $OUT and a summary table.
    ~25 s of CPU time; 84 s of wall time on the shared 2-core machine."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("NANOCHAT_BASE_DIR", None)
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "torchrun --resume" in out.stdout.split("==")[1]  # the plan comes first
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["rc"] for s in steps] == [0] * 7
    decode = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()
              if line.startswith("{")]
    assert [d["batch"] for d in decode] == [1, 8, 32]
    summary = (tmp_path / "summary.txt").read_text()
    for figure in ("train d1 tok/s", "train d2 tok/s", "decode batch 32", "core examples/s (float32)",
                   "base_train tok/s", "(resumed)"):
        assert figure in summary, figure
    assert (tmp_path / "base" / "base_checkpoints" / "gpucheck").is_dir()
