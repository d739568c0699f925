"""
promoted_model: point the chat app at the SFT checkpoint that passed the gates (store.promotion).
report: the run's report card in markdown (like the original's report.md), in metadata and the artifact store.

promoted_model depends on both eval assets, so the blocking checks on them (checks.py) stop a regressed model
from being promoted in the run that produced it.
"""


import platform
from datetime import datetime, timezone

import dagster as dg
import torch

from orchestration import metadata as md
from orchestration.defs.resources import ArtifactStore
from orchestration.partitions import PROFILE_PARTITIONS, run_profile, upstream_metadata
from orchestration.profiles import RunProfile
from orchestration.workspace import retry_on_store_faults
from store.home import git_sha
from store.keys import report_key
from store.promotion import build_pointer, write_pointer

PIPELINE = ["raw_shards", "tokenizer", "base_checkpoint", "base_eval", "mid_checkpoint", "sft_checkpoint",
            "chat_eval"]


@dg.asset(group_name="serving", code_version="1", deps=["sft_checkpoint", "tokenizer", "base_eval", "chat_eval"],
          kinds={md.store_kind(), "json"}, partitions_def=PROFILE_PARTITIONS)
def promoted_model(context: dg.AssetExecutionContext, profile: RunProfile,
                   artifacts: ArtifactStore) -> dg.MaterializeResult:
    """Publish the promotion pointer (promoted/latest.json) naming the SFT checkpoint, its tokenizer and scores."""
    profile = run_profile(context, profile)
    sft, tok = upstream_metadata(context, "sft_checkpoint"), upstream_metadata(context, "tokenizer")
    base, chat = upstream_metadata(context, "base_eval"), upstream_metadata(context, "chat_eval")
    scores = {k: v for k, v in {
        "core": base.get("core"), "core_label": base.get("core_label"), "val_bpb": base.get("val_bpb"),
        "chatcore": chat.get("chatcore"), "chatcore_label": chat.get("chatcore_label"),
        "chatcore_mid": md.number(chat, "chatcore_mid"),
    }.items() if v is not None}
    pointer = build_pointer(profile.name.value, profile.settings()["depth"], sft, "sft", int(sft["step"]),
                            profile.model_tag, tok, scores, dagster_run_id=context.run.run_id,
                            trained_in_run=sft["dagster_run_id"], git_sha=git_sha())
    with retry_on_store_faults():
        uris = write_pointer(artifacts, pointer)
    if "core" not in scores or "chatcore" not in scores:
        context.log.warning("promoted a model without a full set of scores (eval data was missing); see base_eval "
                            "and chat_eval metadata for what was skipped")
    return dg.MaterializeResult(
        metadata=md.entries({**md.promoted(pointer), "pointer_uri": uris["latest"],
                             "profile_pointer_uri": uris["profile"], "history_uri": uris["history"],
                             "checkpoint_uri": sft["uri"], "checkpoint_sha256": sft["sha256"],
                             "step": int(sft["step"]), "model_tag": profile.model_tag, "scores": scores}),
        data_version=dg.DataVersion(sft["sha256"]),
        tags={"nanochat/promoted": f"{profile.name.value}-{profile.model_tag}-step{int(sft['step'])}"},
    )


def fmt(v, digits: int = 4) -> str:
    v = md.parse(v) if isinstance(v, str) and md.parse(v) is not None else v  # numbers kept as text in metadata
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_report(stages: dict[str, dict], profile: RunProfile, run_id: str) -> str:
    """The report card: what ran, what it cost, how good the result is."""
    s = profile.settings()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# nanochat report card: {profile.name.value} / {profile.model_tag}", "",
           f"Generated {now} by Dagster run `{run_id}`; code `{git_sha()}`; torch {torch.__version__}, "
           f"Python {platform.python_version()}, {platform.machine()}; device {s['device_type']} x "
           f"{s['nproc_per_node']}.", "", "## Stages", "",
           "| asset | step | artifact sha256 | wall time (s) | key result |", "|---|---:|---|---:|---|"]
    results = {
        "raw_shards": lambda m: f"{fmt(m.get('documents'))} documents in {fmt(m.get('num_shards'))} shards",
        "tokenizer": lambda m: f"vocab {fmt(m.get('vocab_size'))}",
        "base_checkpoint": lambda m: f"val bpb {fmt(m.get('val_bpb'))}",
        "base_eval": lambda m: f"{m.get('core_label', 'CORE')} {fmt(m.get('core'))}, val bpb {fmt(m.get('val_bpb'))}",
        "mid_checkpoint": lambda m: f"val bpb {fmt(m.get('val_bpb'))}",
        "sft_checkpoint": lambda m: f"val loss {fmt(m.get('val_loss'))}",
        "chat_eval": lambda m: f"{m.get('chatcore_label', 'ChatCORE')} mid {fmt(m.get('chatcore_mid'))}, "
                               f"sft {fmt(m.get('chatcore_sft'))}",
    }
    total = 0.0
    for asset in PIPELINE:
        m = stages.get(asset) or {}
        wall = md.number(m, "wall_time_s")
        total += wall or 0.0
        sha = m.get("sha256") or m.get("results_sha256") or ""
        out.append(f"| {asset} | {fmt(m.get('step') or m.get('checkpoint_step'))} | `{sha[:12]}` | {fmt(wall, 1)} | "
                   f"{results[asset](m) if m else 'not materialized'} |")
    out += ["", f"Training and evaluation wall time: {total / 60:.1f} min.", "", "## Training", "",
            "| stage | parameters | tokens seen | tok/s | MFU % (GPU only) | final loss |",
            "|---|---:|---:|---:|---:|---:|"]
    for stage in ("base", "mid", "sft"):
        m = stages.get(f"{stage}_checkpoint") or {}
        out.append(f"| {stage} | {fmt(m.get('num_params'))} | {fmt(m.get('tokens_seen'))} | "
                   f"{fmt(m.get('tok_per_sec'), 0)} | {fmt(m.get('mfu') or None, 2)} | {fmt(m.get('final_loss'))} |")
    for asset, title in (("base_eval", "CORE per task (base)"), ("chat_eval", "ChatCORE per task")):
        table = (stages.get(asset) or {}).get("core_tasks" if asset == "base_eval" else "chat_tasks")
        if table:
            out += ["", f"## {title}", "", md.table_md(table)]
    missing = (stages.get("base_eval") or {}).get("core_missing")
    if missing and missing != "none":
        out += ["", f"CORE tasks without data (not in the score): {missing}."]
    for asset, reason in (("base_eval", "core_skipped"), ("chat_eval", "chat_missing")):
        note = (stages.get(asset) or {}).get(reason)
        if note and note != "none":
            out += ["", f"**{asset} skipped:** {note}"]
    samples = (stages.get("chat_eval") or {}).get("samples") or (stages.get("base_eval") or {}).get("samples")
    if samples:
        out += ["", "## Samples", "", samples]
    return "\n".join(out) + "\n"


@dg.asset(group_name="serving", code_version="1", deps=["promoted_model", *PIPELINE],
          kinds={"markdown", md.store_kind()}, partitions_def=PROFILE_PARTITIONS)
def report(context: dg.AssetExecutionContext, profile: RunProfile, artifacts: ArtifactStore) -> dg.MaterializeResult:
    """The report card of the promoted model's pipeline, as markdown in metadata and in the artifact store."""
    profile = run_profile(context, profile)
    stages = {}
    for asset in PIPELINE:
        try:
            stages[asset] = upstream_metadata(context, asset)
        except dg.Failure:
            stages[asset] = {}
    text = render_report(stages, profile, context.run.run_id)
    key = report_key(profile.name.value, profile.model_tag, context.run.run_id)
    with retry_on_store_faults():
        info = artifacts.put_bytes(key, text.encode())
    return dg.MaterializeResult(metadata=md.entries({"report": dg.MetadataValue.md(text), **info.to_metadata()}))
