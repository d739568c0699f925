"""
base_checkpoint -> mid_checkpoint -> sft_checkpoint: each stage fetches its inputs from the artifact store into
its own run directory, trains with the nanochat entry point under torchrun through Dagster Pipes (one GPU job at a
time: pool "gpu"), and publishes the final step's checkpoint (model + meta) back to the artifact store.
"""


import math
from pathlib import Path

import dagster as dg

from orchestration import metadata as md
from orchestration import resume
from orchestration.defs.resources import ArtifactStore, EvalHistory
from orchestration.launcher import Launcher
from orchestration.partitions import PROFILE_PARTITIONS, run_profile
from orchestration.profiles import RunProfile
from orchestration.workspace import (
    PHASE_DIRS,
    Workspace,
    fetch_inputs,
    nanochat_env,
    publish_checkpoint,
    retry_on_store_faults,
    tokenizer_record_of,
)
from store.home import git_sha
from store.keys import checkpoint_key


def train_stage(context, stage: str, module: str, args: list[str], inputs: dict[str, str], profile: RunProfile,
                workspace: Workspace, artifacts: ArtifactStore, launcher: Launcher,
                duckdb: EvalHistory) -> dg.MaterializeResult:
    """Fetch inputs ({asset: phase dir or 'tokenizer'}), train, publish; return the asset's metadata."""
    settings = profile.settings()
    tag = profile.model_tag
    run_dir = workspace.run_dir(context)
    fetched = fetch_inputs(context, artifacts, inputs, run_dir, tag)
    lineage = {f"{asset}_sha256": meta["sha256"] for asset, meta in fetched.items()}
    tokenizer = tokenizer_record_of(fetched["tokenizer"], run_dir / "tokenizer")  # every published step names it

    # Resume points (orchestration/resume.py): restore the newest one of this lineage, publish new ones as they land.
    args = [*args, f"--device-type={settings['device_type']}", *resume.stage_args(stage, settings)]
    points = resume.points_for(context, artifacts, profile, stage, module, args, lineage,
                               launcher.world_size(settings["nproc_per_node"]), run_dir / PHASE_DIRS[stage] / tag,
                               tokenizer)
    with retry_on_store_faults():
        resumed = resume.resume_args(points, context.log)
    on_published = resume.core_recorder(lambda checkpoint, scores: duckdb.record(context, profile, stage, checkpoint,
                                                                                 scores),
                                        settings["total_batch_size"]) if stage == "base" else None
    with resume.publishing(points, run_dir / "publish-resume", context.log, on_published):
        result, messages, wall = launcher.run(context, module, [*args, *resumed], settings["nproc_per_node"],
                                              nanochat_env(run_dir))
    step = int(result["step"])
    checkpoint_dir = Path(result["checkpoint_dir"])
    with retry_on_store_faults():  # a retry re-trains: publishing is the step's last act, so that is rare
        info = publish_checkpoint(artifacts, checkpoint_dir, step,
                                  checkpoint_key(stage, profile.name.value, tag, context.run.run_id),
                                  run_dir / "publish", tokenizer)
    if not settings["keep_resume_points"]:
        resume.clear(points, context.log)
    metadata = {
        **info.to_metadata(), "step": step, "model_tag": tag, "profile": profile.name.value,
        "wall_time_s": wall, "git_sha": git_sha(), "config": settings, "progress_messages": len(messages), **lineage,
        "tokenizer_key": tokenizer["key"], "tokenizer_fingerprint": tokenizer["fingerprint"],
        **md.training(result, messages, settings["device_type"]),
    }
    # Tokens the model has seen in this stage: a fixed token budget per step for base and mid; SFT batches whole
    # conversations, so chat_sft counts the tokens of the examples it trained on.
    tokens_seen = step * settings["total_batch_size"] if stage in ("base", "mid") else result.get("tokens_seen")
    if tokens_seen is not None:
        metadata["tokens_seen"] = tokens_seen
    # A non-finite loss is not recorded (DuckDB history holds numbers); the no_nan_loss check then blocks promotion.
    scores = {"validation": {k: float(result[k]) for k in ("val_bpb", "val_loss")
                             if result.get(k) is not None and math.isfinite(result[k])}}
    duckdb.record(context, profile, stage, {"sha256": info.sha256, "uri": info.uri, "step": step,
                                            "tokens_seen": tokens_seen}, {k: v for k, v in scores.items() if v})
    return dg.MaterializeResult(metadata=md.entries(metadata), data_version=dg.DataVersion(info.sha256))


@dg.asset(group_name="training", code_version="1", deps=["raw_shards", "tokenizer"], pool="gpu",
          kinds={"pytorch", md.store_kind()}, partitions_def=PROFILE_PARTITIONS)
def base_checkpoint(context: dg.AssetExecutionContext, profile: RunProfile, workspace: Workspace,
                    artifacts: ArtifactStore, launcher: Launcher,
                    duckdb: EvalHistory) -> dg.MaterializeResult:
    """Pretrain the base model on the shards (nanochat.base_train)."""
    profile = run_profile(context, profile)
    s = profile.settings()
    args = [f"--depth={s['depth']}", f"--max-seq-len={s['max_seq_len']}",
            f"--device-batch-size={s['device_batch_size']}", f"--total-batch-size={s['total_batch_size']}",
            f"--num-iterations={s['base_iterations']}",
            f"--eval-every={s['eval_every']}", f"--eval-tokens={s['eval_tokens']}", "--log-every=10",
            f"--run={context.run.run_id}"]
    inputs = {"raw_shards": "base_data", "tokenizer": "tokenizer"}
    return train_stage(context, "base", "nanochat.base_train", args, inputs, profile, workspace, artifacts, launcher,
                       duckdb)


@dg.asset(group_name="training", code_version="1", deps=["base_checkpoint", "tokenizer"], pool="gpu",
          kinds={"pytorch", md.store_kind()}, partitions_def=PROFILE_PARTITIONS)
def mid_checkpoint(context: dg.AssetExecutionContext, profile: RunProfile, workspace: Workspace,
                   artifacts: ArtifactStore, launcher: Launcher,
                   duckdb: EvalHistory) -> dg.MaterializeResult:
    """Mid-train on the conversation mixture (nanochat.mid_train)."""
    profile = run_profile(context, profile)
    s = profile.settings()
    args = [f"--device-batch-size={s['mid_device_batch_size']}", f"--total-batch-size={s['total_batch_size']}",
            f"--num-iterations={s['mid_iterations']}", f"--eval-tokens={s['eval_tokens']}", "--log-every=10"]
    return train_stage(context, "mid", "nanochat.mid_train", args,
                       {"tokenizer": "tokenizer", "base_checkpoint": PHASE_DIRS["base"]}, profile, workspace, artifacts,
                       launcher, duckdb)


@dg.asset(group_name="training", code_version="1", deps=["mid_checkpoint", "tokenizer"], pool="gpu",
          kinds={"pytorch", md.store_kind()}, partitions_def=PROFILE_PARTITIONS)
def sft_checkpoint(context: dg.AssetExecutionContext, profile: RunProfile, workspace: Workspace,
                   artifacts: ArtifactStore, launcher: Launcher,
                   duckdb: EvalHistory) -> dg.MaterializeResult:
    """Supervised fine-tuning with assistant-only loss (nanochat.chat_sft)."""
    profile = run_profile(context, profile)
    s = profile.settings()
    args = [f"--device-batch-size={s['sft_device_batch_size']}", f"--examples-per-step={s['sft_examples_per_step']}",
            f"--num-iterations={s['sft_iterations']}", "--eval-steps=10", "--log-every=10"]
    return train_stage(context, "sft", "nanochat.chat_sft", args,
                       {"tokenizer": "tokenizer", "mid_checkpoint": PHASE_DIRS["mid"]}, profile, workspace, artifacts,
                       launcher, duckdb)

