"""base_train end to end on real text: loss falls, kill + --resume is bit-identical, 2-process torchrun agrees."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat import base_train
from nanochat.checkpoint_manager import load_model
from nanochat.dataloader import DistributedTokenLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes

TINY = ["--depth=2", "--head-dim=64", "--max-seq-len=64", "--device-batch-size=8", "--total-batch-size=1024",
        "--eval-tokens=4096", "--sample-every=-1", "--device-type=cpu", "--log-every=10"]


def run(args: list[str], nproc: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "nanochat.base_train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "nanochat.base_train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def test_loss_falls_clearly_over_100_steps(base_dir):
    summary = base_train.main([*TINY, "--num-iterations=100", "--eval-every=50"])
    losses = summary["losses"]
    assert len(losses) == 100
    assert losses[0] > 5.9  # ~ln(512): the zero-initialised lm_head starts uniform
    assert losses[-1] < losses[0] - 1.3, losses[::10]
    assert summary["val_bpb"] < 0.8 * 5.0 and summary["tok_per_sec"] > 0 and summary["flops_per_sec"] > 0
    assert (base_dir / "base_checkpoints" / "d2" / "model_000100.pt").exists()


def test_kill_and_resume_is_bit_identical(base_dir):
    common = [*TINY, "--num-iterations=20", "--eval-every=-1"]
    straight = run([*common, "--model-tag=straight"])
    finish(straight)

    # Same run, checkpointing every 10 steps; SIGKILL it as soon as step 10 is on disk.
    ckpt = base_dir / "base_checkpoints" / "killed"
    victim = run([*common, "--model-tag=killed", "--save-every=10"])
    deadline = time.time() + 120
    while not (ckpt / "model_000010.pt").exists():
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[0]
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (ckpt / "model_000020.pt").exists(), "the run finished before it could be killed"

    finish(run([*common, "--model-tag=killed", "--save-every=10", "--resume"]))
    a = torch.load(base_dir / "base_checkpoints" / "straight" / "model_000020.pt", weights_only=True)
    b = torch.load(ckpt / "model_000020.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = torch.load(base_dir / "base_checkpoints" / "straight" / "optim_000020_rank0.pt", weights_only=True)
    ob = torch.load(ckpt / "optim_000020_rank0.pt", weights_only=True)
    assert torch.equal(oa[1]["state"][0]["momentum_buffer"], ob[1]["state"][0]["momentum_buffer"])


def test_two_process_torchrun_matches_one_process(base_dir, small_tokenizer):
    # Same total batch (1024 tokens/step): 1 process accumulates 2 micro-batches, 2 ranks take 1 each.
    common = [*TINY, "--num-iterations=30", "--eval-every=-1", "--save-every=10"]
    ddp = run([*common, "--model-tag=ddp"], nproc=2)
    single = run([*common, "--model-tag=single"])
    out_ddp, out_single = finish(ddp), finish(single)
    assert "grad accumulation steps: 1" in out_ddp and "grad accumulation steps: 2" in out_single
    assert (base_dir / "base_checkpoints" / "ddp" / "optim_000030_rank1.pt").exists()  # sharded state

    # Score every checkpoint on identical validation batches (ranks read different row groups, so the
    # runs' own logs are not comparable): the two curves must agree within 3%.
    token_bytes = get_token_bytes()
    for step in (10, 20, 30):
        bpb = {}
        for tag in ("ddp", "single"):
            model, _, _ = load_model("base", "cpu", "eval", model_tag=tag, step=step, tokenizer=small_tokenizer)
            batches = DistributedTokenLoader(small_tokenizer, 8, 64, "val")
            bpb[tag] = evaluate_bpb(model, batches, 20, token_bytes)
        assert abs(bpb["ddp"] - bpb["single"]) / bpb["single"] < 0.03, (step, bpb)
    losses = [float(m) for m in re.findall(r"step 00030/00030 \| loss ([\d.]+)", out_ddp + out_single)]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) / losses[1] < 0.1


def test_bad_batch_configuration_is_a_clear_error(base_dir):
    with pytest.raises(SystemExit, match="must be a multiple of"):
        base_train.main([*TINY[:4], "--total-batch-size=1000", "--num-iterations=1", "--device-type=cpu"])
