"""Entry points report to Dagster through Pipes when Dagster launches them (rank 0 only), and run without it."""

from __future__ import annotations

import shutil
import sys

import dagster as dg
import pytest

TINY = ["--depth=2", "--head-dim=64", "--max-seq-len=64", "--device-batch-size=8", "--total-batch-size=1024",
        "--eval-tokens=2048", "--eval-every=5", "--sample-every=-1", "--device-type=cpu", "--num-iterations=6",
        "--log-every=2"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_base_train_under_pipes_reports_once(tmp_path, tokenizer_base_dir, shared_data, nproc):
    shutil.copytree(tokenizer_base_dir / "tokenizer", tmp_path / "tokenizer")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, "-m", "nanochat.base_train", *TINY]
    env = {"NANOCHAT_BASE_DIR": str(tmp_path), "NANOCHAT_DATA_DIR": str(shared_data / "pretrain")}

    messages: list = []

    @dg.asset
    def base_checkpoint(context, pipes: dg.PipesSubprocessClient):
        invocation = pipes.run(command=command, context=context, env=env)
        messages.extend(invocation.get_custom_messages())
        return invocation.get_materialize_result()

    result = dg.materialize([base_checkpoint], resources={"pipes": dg.PipesSubprocessClient()})
    assert result.success
    materializations = result.asset_materializations_for_node("base_checkpoint")
    assert len(materializations) == 1
    metadata = {k: v.value for k, v in materializations[0].metadata.items()}
    assert metadata["step"] == 6 and 0 < metadata["val_bpb"] < 10
    assert metadata["checkpoint_dir"].endswith("base_checkpoints/d2")
    # Progress messages came through the Pipes channel too, each exactly once (only rank 0 writes to it).
    train_steps = [m["step"] for m in messages if "loss" in m]
    assert train_steps == [2, 4, 6], messages
    assert [m["step"] for m in messages if "val_bpb" in m] == [0, 5, 6]
    assert (tmp_path / "base_checkpoints" / "d2" / f"optim_000006_rank{nproc - 1}.pt").exists()
