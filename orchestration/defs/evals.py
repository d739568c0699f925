"""
base_eval: CORE + bits per byte + samples of the base checkpoint (nanochat.base_eval).
chat_eval: ChatCORE and its six tasks for the mid and SFT checkpoints (nanochat.chat_eval).

Both run the nanochat entry point under torchrun through Dagster Pipes (pool "gpu", like training), write every
score to the DuckDB eval history and a results.json beside the checkpoints in the artifact store, and put score
tables in the asset's metadata. History rows are keyed by the run that *trained* the checkpoint, so evaluating
the same checkpoint again replaces its rows rather than adding a second set.

A partial suite is labelled with its coverage (CORE[18/22], ChatCORE[5/6]) everywhere it is stored, so it is
never compared with a full score. Missing eval data never fails the pipeline: the asset says what it skipped
and how to get the data.
"""


import dagster as dg

from orchestration import metadata as md
from orchestration.defs.resources import ArtifactStore, EvalHistory
from orchestration.launcher import Launcher
from orchestration.partitions import PROFILE_PARTITIONS, run_profile
from orchestration.profiles import RunProfile
from orchestration.workspace import (
    PHASE_DIRS,
    Workspace,
    fetch_inputs,
    nanochat_env,
    retry_on_store_faults,
)
from store import eval_store
from store.home import git_sha
from store.keys import eval_results_key

CHAT_STAGES = ("mid", "sft")


def run_eval(context, module: str, args: list[str], run_dir, profile: RunProfile, launcher: Launcher):
    settings = profile.settings()
    return launcher.run(context, module, [*args, f"--device-type={settings['device_type']}"],
                        settings["nproc_per_node"], nanochat_env(run_dir))


@dg.asset(group_name="evaluation", code_version="1", deps=["base_checkpoint", "tokenizer", "raw_shards"], pool="gpu",
          kinds={"pytorch", "duckdb", md.store_kind()}, partitions_def=PROFILE_PARTITIONS)
def base_eval(context: dg.AssetExecutionContext, profile: RunProfile, workspace: Workspace,
              artifacts: ArtifactStore, launcher: Launcher, duckdb: EvalHistory) -> dg.MaterializeResult:
    """CORE (the DCLM in-context suite, centred accuracy), train/val bits per byte and samples of the base model."""
    profile = run_profile(context, profile)
    s = profile.settings()
    tag = profile.model_tag
    run_dir = workspace.run_dir(context)
    fetched = fetch_inputs(context, artifacts, {"raw_shards": "base_data", "tokenizer": "tokenizer",
                                                "base_checkpoint": PHASE_DIRS["base"]}, run_dir, tag)
    checkpoint = fetched["base_checkpoint"]
    args = ["--source=base", f"--model-tag={tag}", f"--step={int(checkpoint['step'])}",
            f"--max-per-task={s['core_max_per_task']}", f"--split-tokens={s['eval_tokens']}",
            f"--device-batch-size={s['device_batch_size']}", f"--output={run_dir / 'base_eval.json'}"]
    result, _, wall = run_eval(context, "nanochat.base_eval", args, run_dir, profile, launcher)

    # History rows: the aggregate under task "all" with its coverage label as the metric name, each task's
    # accuracy and centred accuracy, and bpb on both splits.
    scores: dict[str, dict[str, float]] = {}
    tasks = result.get("core_tasks") or {}
    if result.get("core") is not None:
        scores[eval_store.AGGREGATE_TASK] = {result["core_label"]: float(result["core"])}
        for label, t in tasks.items():
            scores[label] = {"accuracy": float(t["accuracy"]), "centered": float(t["centered"])}
    bpb = {k: float(result[k]) for k in ("train_bpb", "val_bpb") if result.get(k) is not None}
    if bpb:
        scores["bpb"] = bpb
    rows = duckdb.record(context, profile, "base", checkpoint, scores) if scores else 0

    with retry_on_store_faults():
        info = artifacts.write_json(eval_results_key(checkpoint["key"], "base_eval"), result)
    metadata = {
        "core": result.get("core"), "core_label": result.get("core_label"),
        "core_tasks_covered": result.get("core_tasks_covered"), "core_tasks_total": result.get("core_tasks_total"),
        "core_missing": ", ".join(result.get("core_missing") or []) or "none",
        "core_examples_per_sec": result.get("core_examples_per_sec"),
        "train_bpb": result.get("train_bpb"), "val_bpb": result.get("val_bpb"),
        "results_uri": info.uri, "results_sha256": info.sha256, "checkpoint_sha256": checkpoint["sha256"],
        "checkpoint_step": int(checkpoint["step"]), "model_tag": tag, "profile": profile.name.value,
        "duckdb_rows": rows, "wall_time_s": wall, "git_sha": git_sha(),
        "core_tasks": md.core_table(tasks) if tasks else None,
    }
    for reason in ("core_skipped", "bpb_skipped"):
        if result.get(reason):
            metadata[reason] = result[reason]
            context.log.warning(f"base_eval: {reason.replace('_', ' ')}: {result[reason]}")
    if result.get("samples"):
        metadata["samples"] = md.samples_md(result["samples"])
    return dg.MaterializeResult(metadata=md.entries(metadata), data_version=dg.DataVersion(info.sha256))


@dg.asset(group_name="evaluation", code_version="1", deps=["mid_checkpoint", "sft_checkpoint", "tokenizer"],
          pool="gpu", kinds={"pytorch", "duckdb", md.store_kind()}, partitions_def=PROFILE_PARTITIONS)
def chat_eval(context: dg.AssetExecutionContext, profile: RunProfile, workspace: Workspace,
              artifacts: ArtifactStore, launcher: Launcher, duckdb: EvalHistory) -> dg.MaterializeResult:
    """ChatCORE (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee) of the mid and SFT checkpoints."""
    profile = run_profile(context, profile)
    s = profile.settings()
    tag = profile.model_tag
    run_dir = workspace.run_dir(context)
    fetched = fetch_inputs(context, artifacts, {"tokenizer": "tokenizer", "mid_checkpoint": PHASE_DIRS["mid"],
                                                "sft_checkpoint": PHASE_DIRS["sft"]}, run_dir, tag)
    results, rows, wall, result_shas = {}, 0, 0.0, []
    for stage in CHAT_STAGES:
        checkpoint = fetched[f"{stage}_checkpoint"]
        args = [f"--source={stage}", f"--model-tag={tag}", f"--step={int(checkpoint['step'])}",
                f"--max-per-task={s['chat_max_per_task']}", f"--max-new-tokens={s['chat_max_new_tokens']}",
                f"--num-samples={s['chat_num_samples']}", f"--temperature={s['chat_temperature']}",
                f"--output={run_dir / f'chat_eval_{stage}.json'}"]
        result, _, seconds = run_eval(context, "nanochat.chat_eval", args, run_dir, profile, launcher)
        results[stage], wall = result, wall + seconds
        scores: dict[str, dict[str, float]] = {}
        if result.get("chatcore") is not None:
            scores[eval_store.AGGREGATE_TASK] = {result["chatcore_label"]: float(result["chatcore"])}
        if result.get("chatcore_nosb") is not None:  # without our synthetic SpellingBee (nanochat/chat_eval.py)
            scores.setdefault(eval_store.AGGREGATE_TASK, {})[result["chatcore_nosb_label"]] = float(
                result["chatcore_nosb"])
        for task, t in (result.get("chat_tasks") or {}).items():
            scores[task] = {k: float(t[k]) for k in ("accuracy", "centered", "pass_at_k") if t.get(k) is not None}
        if scores:
            rows += duckdb.record(context, profile, stage, checkpoint, scores)
        with retry_on_store_faults():
            info = artifacts.write_json(eval_results_key(checkpoint["key"], "chat_eval"), result)
        result_shas.append(info.sha256)
        for task, reason in (result.get("chat_missing") or {}).items():
            context.log.warning(f"chat_eval {stage}: skipped {task}: {reason}")

    metadata: dict = {"model_tag": tag, "profile": profile.name.value, "duckdb_rows": rows,
                      "results_sha256": result_shas[-1],
                      "wall_time_s": wall, "git_sha": git_sha()}
    for stage, r in results.items():
        metadata[f"chatcore_{stage}"] = r.get("chatcore")
        metadata[f"{stage}_checkpoint_sha256"] = fetched[f"{stage}_checkpoint"]["sha256"]
    metadata["chatcore_label"] = results["sft"].get("chatcore_label")
    metadata["chatcore"] = results["sft"].get("chatcore")  # the model promotion cares about
    if results["sft"].get("chatcore_nosb") is not None:
        metadata["chatcore_nosb"] = results["sft"]["chatcore_nosb"]
        metadata["chatcore_note"] = ("ChatCORE-noSB leaves out SpellingBee, which this project generates itself "
                                     "(not the original's problems): compare that one with the original's numbers")
    missing = results["sft"].get("chat_missing") or {}
    metadata["chat_missing"] = dg.MetadataValue.json(missing) if missing else "none"
    if any(r.get("chat_tasks") for r in results.values()):
        metadata["chat_tasks"] = md.chat_table(results)
    if results["sft"].get("samples"):
        metadata["samples"] = md.samples_md(results["sft"]["samples"])
    return dg.MaterializeResult(metadata=md.entries(metadata),
                                data_version=dg.DataVersion("-".join(sha[:16] for sha in result_shas)))
