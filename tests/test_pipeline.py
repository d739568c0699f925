"""
The whole tiny pipeline in process: raw_shards -> ... -> promoted_model -> report against a real SeaweedFS S3
server and a real DuckDB file; re-running one eval reuses upstream artifacts; the regression gate blocks a worse
model; the finite-loss check, the sensors and the schedule behave.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestration.defs import checks
from orchestration.defs.data import raw_shards
from orchestration.defs.evals import base_eval, chat_eval
from orchestration.defs.resources import EvalHistory
from orchestration.defs.schedules import weekly_retrain
from orchestration.defs.sensors import new_promoted_model, new_shards
from orchestration.defs.serving import promoted_model, report
from orchestration.defs.tokenizer import tokenizer
from orchestration.defs.training import base_checkpoint, mid_checkpoint, sft_checkpoint
from orchestration.launcher import TorchrunLauncher
from orchestration.partitions import PROFILE_PARTITIONS
from orchestration.profiles import RunProfile
from orchestration.run_summary import orchestration_figure
from orchestration.workspace import Workspace
from store import eval_store
from store.artifact_store import LocalArtifactStore
from store.keys import LATEST_KEY, profile_pointer_key
from store.promotion import read_pointer

ASSETS = [raw_shards, tokenizer, base_checkpoint, base_eval, mid_checkpoint, sft_checkpoint, chat_eval,
          promoted_model, report]
CHECKS = [checks.base_checkpoint_finite_loss, checks.mid_checkpoint_finite_loss, checks.sft_checkpoint_finite_loss,
          checks.core_not_regressed, checks.chatcore_not_regressed]
# The tiny profile shrunk so training and evals take seconds (tests/test_orchestration.py uses the same sizes).
FAST = dict(corpus="shared", tok_max_chars=2_000_000, vocab_size=512, depth=2, max_seq_len=64, device_batch_size=8,
            total_batch_size=1024, base_iterations=12, eval_every=6, eval_tokens=2048, mid_iterations=4,
            mid_device_batch_size=8, sft_iterations=4, sft_device_batch_size=4, sft_examples_per_step=8,
            core_max_per_task=4, chat_max_per_task=2, chat_max_new_tokens=8)


def resources(tmp_path: Path, store, **overrides) -> dict:
    return {"artifacts": store, "workspace": Workspace(root=str(tmp_path / "work")),
            "profile": RunProfile(**{**FAST, **overrides}), "launcher": TorchrunLauncher(),
            "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb"))}


def metadata(result, asset: str) -> dict:
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


def s3_object_sha256(store, key: str) -> str:
    """Read an object straight from the bucket with boto3 (not through the store's cache)."""
    body = store.client.get_object(Bucket=store.bucket, Key=store._full(key))["Body"].read()
    return hashlib.sha256(body).hexdigest()


@pytest.mark.slow
def test_whole_tiny_pipeline_on_s3_then_rerun_one_eval_then_gate(tmp_path, shared_data, s3_store, monkeypatch):
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    instance = dg.DagsterInstance.ephemeral()
    store = s3_store
    result = dg.materialize([*ASSETS, *CHECKS], resources=resources(tmp_path, store), instance=instance,
                            partition_key="tiny")
    assert result.success
    assert {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} == {
        a.key.to_user_string() for a in ASSETS}
    evaluations = {e.check_name + "@" + e.asset_key.to_user_string(): e.passed
                   for e in result.get_asset_check_evaluations()}
    assert evaluations["finite_loss@base_checkpoint"] and evaluations["finite_loss@sft_checkpoint"]
    assert evaluations["core_not_regressed@base_eval"] and evaluations["chatcore_not_regressed@chat_eval"]

    # The orchestration figure (orchestration.run_summary --json): the run's wall time splits into the
    # training/eval processes, which every training and eval asset reports, and a non-negative remainder.
    split = orchestration_figure(instance, result.run_id)
    assert split["run_id"] == result.run_id and split["steps"] >= len(ASSETS)
    assert 0 < split["training_eval_s"] <= split["run_s"] and split["orchestration_s"] >= 0
    assert split["orchestration_s"] == pytest.approx(split["run_s"] - split["training_eval_s"], abs=0.11)

    # Every directory artifact is in the bucket: its manifest hashes to the recorded sha256, and every file it
    # lists is there with the sha256 the manifest gives.
    meta = {a.key.to_user_string(): metadata(result, a.key.to_user_string()) for a in ASSETS}
    for asset in ("raw_shards", "tokenizer", "base_checkpoint", "mid_checkpoint", "sft_checkpoint"):
        key = meta[asset]["key"]
        assert meta[asset]["uri"].startswith("s3://")
        assert s3_object_sha256(store, f"{key}/manifest.json") == meta[asset]["sha256"], asset
        manifest = json.loads(store.client.get_object(Bucket=store.bucket,
                                                      Key=store._full(f"{key}/manifest.json"))["Body"].read())
        for entry in manifest["files"]:
            assert s3_object_sha256(store, f"{key}/{entry['path']}") == entry["sha256"], (asset, entry["path"])

    # base_eval: CORE over the 18 tasks whose data is in the shared bundle, labelled as such.
    base = meta["base_eval"]
    assert base["core_label"] == "CORE[18/22]" and base["core_tasks_covered"] == "18"
    assert "hellaswag" in base["core_missing"] and -1 <= base["core"] <= 1 and base["val_bpb"] > 0
    results_key = f"{meta['base_checkpoint']['key']}/evals/base_eval.json"
    assert s3_object_sha256(store, results_key) == base["results_sha256"]
    chat = meta["chat_eval"]
    assert chat["chatcore_label"] == "ChatCORE" and chat["chatcore"] is not None and chat["chatcore_mid"] is not None
    assert chat["chatcore_nosb"] is not None and "SpellingBee" in chat["chatcore_note"]

    # Per-task scores are tables with a schema (the asset page shows them inline); floats to 4 significant digits.
    core_tasks, chat_tasks = base["core_tasks"], chat["chat_tasks"]
    assert isinstance(core_tasks, dg.TableMetadataValue) and isinstance(chat_tasks, dg.TableMetadataValue)
    assert [c.name for c in core_tasks.schema.columns] == ["task", "accuracy", "centered", "random baseline %",
                                                           "examples"]
    assert len(core_tasks.records) == 18 and [c.name for c in chat_tasks.schema.columns] == [
        "task", "mid accuracy", "sft accuracy", "sft centered", "examples"]
    assert {r.data["task"] for r in chat_tasks.records} >= {"ARC-Easy", "GSM8K"}
    for record in [*core_tasks.records, *chat_tasks.records]:
        assert all(v == float(f"{v:.4g}") for v in record.data.values() if isinstance(v, float)), record
    # Plottable: the headline scores only; the promoted model carries its scores, says what it is, and is tagged.
    numeric = {asset: {k for k, v in mat.metadata.items() if isinstance(v, (dg.FloatMetadataValue,
                                                                              dg.IntMetadataValue))}
               for asset in ("base_eval", "chat_eval", "promoted_model", "report")
               for mat in result.asset_materializations_for_node(asset)}
    assert numeric == {"base_eval": {"core", "val_bpb"}, "chat_eval": {"chatcore"},
                       "promoted_model": {"core", "chatcore", "val_bpb"}, "report": set()}, numeric
    assert isinstance(base["samples"], str) and "**1.**" in base["samples"]
    summary = meta["promoted_model"]["promoted"]
    assert summary.startswith("**tiny** · sft d2 · step 4") and "CORE[18/22]" in summary, summary
    (promotion,) = result.asset_materializations_for_node("promoted_model")
    assert promotion.tags["nanochat/promoted"] == "tiny-d2-step4"

    # promoted_model points at the SFT checkpoint; the report card covers every stage.
    pointer = read_pointer(store)
    assert pointer["checkpoint"]["sha256"] == meta["sft_checkpoint"]["sha256"]
    assert pointer["tokenizer"]["sha256"] == meta["tokenizer"]["sha256"]
    assert pointer["scores"]["core_label"] == "CORE[18/22]" and pointer["scores"]["chatcore"] == chat["chatcore"]
    assert read_pointer(store, profile_pointer_key("tiny", "d2")) == pointer
    text = meta["report"]["report"]
    for needle in ("report card", "base_checkpoint", "CORE[18/22]", "ChatCORE", "arc_easy", "GSM8K"):
        assert needle in text, needle

    # DuckDB: aggregate and per-task rows for base, mid and sft.
    db = tmp_path / "evals.duckdb"
    with eval_store.connect_ro(db) as conn:
        aggregates = conn.execute("SELECT stage, metric FROM eval_results WHERE task = 'all' "
                                  "ORDER BY stage, metric").fetchall()
        assert aggregates == [("base", "CORE[18/22]"), ("mid", "ChatCORE"), ("mid", "ChatCORE-noSB"),
                              ("sft", "ChatCORE"), ("sft", "ChatCORE-noSB")]
        per_task = conn.execute("SELECT count(DISTINCT task) FROM eval_results WHERE stage = 'sft' "
                                "AND metric = 'accuracy'").fetchone()[0]
        assert per_task == 6
        total_rows = conn.execute("SELECT count(*) FROM eval_results").fetchone()[0]

    # Re-materialize only chat_eval: upstream artifacts are reused (nothing retrains) and the history keeps one
    # set of rows for these checkpoints.
    again = dg.materialize([*ASSETS, *CHECKS], resources=resources(tmp_path, store), instance=instance,
                           selection=[chat_eval], partition_key="tiny")
    assert again.success
    assert {e.asset_key.to_user_string() for e in again.get_asset_materialization_events()} == {"chat_eval"}
    for asset in ("base_checkpoint", "mid_checkpoint", "sft_checkpoint"):
        assert len(instance.fetch_materializations(dg.AssetKey(asset), limit=10).records) == 1
    assert metadata(again, "chat_eval")["sft_checkpoint_sha256"] == meta["sft_checkpoint"]["sha256"]
    with eval_store.connect_ro(db) as conn:
        assert conn.execute("SELECT count(*) FROM eval_results").fetchone()[0] == total_rows

    # The gate: suppose the promoted model of this profile had a far better CORE. Re-evaluating the base model
    # fails the blocking check, so promoted_model is not materialized and the pointer does not move.
    better = {**pointer, "scores": {**pointer["scores"], "core": 0.99}}
    store.write_json(profile_pointer_key("tiny", "d2"), better)
    latest_before = store.read_json(LATEST_KEY)
    gated = dg.materialize([*ASSETS, *CHECKS], resources=resources(tmp_path, store), instance=instance,
                           selection=[base_eval, promoted_model], raise_on_error=False, partition_key="tiny")
    (evaluation,) = [e for e in gated.get_asset_check_evaluations() if e.check_name == "core_not_regressed"]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert {e.asset_key.to_user_string() for e in gated.get_asset_materialization_events()} == {"base_eval"}
    assert store.read_json(LATEST_KEY) == latest_before
    # base_eval ran again for the same checkpoint: its rows were replaced, not duplicated.
    with eval_store.connect_ro(db) as conn:
        assert conn.execute("SELECT count(*) FROM eval_results").fetchone()[0] == total_rows


def test_regression_rule():
    promoted = {"checkpoint": {"sha256": "ab" * 32}, "scores": {"core": 0.20, "core_label": "CORE[18/22]"}}
    ok = checks.regression_result(0.19, "CORE[18/22]", promoted, 0.02, "core")
    bad = checks.regression_result(0.17, "CORE[18/22]", promoted, 0.02, "core")
    assert ok.passed and not bad.passed and bad.severity == dg.AssetCheckSeverity.ERROR
    # A full CORE is never held against a CORE-18 (or the reverse): a warning, not a block.
    other = checks.regression_result(0.10, "CORE", promoted, 0.02, "core")
    assert not other.passed and other.severity == dg.AssetCheckSeverity.WARN
    assert checks.regression_result(0.10, "CORE", None, 0.02, "core").passed  # nothing promoted yet
    skipped = checks.regression_result(None, None, promoted, 0.02, "core")
    assert not skipped.passed and skipped.severity == dg.AssetCheckSeverity.WARN


def test_finite_loss_check_fails_on_nan():
    for loss, passed in ((2.5, True), (math.nan, False), (math.inf, False)):
        result = checks.finite_loss_result({"final_loss": loss, "val_bpb": 1.2})
        assert result.passed is passed and result.severity == dg.AssetCheckSeverity.ERROR


def write_shard(path: Path, texts: list[str]) -> None:
    pq.write_table(pa.table({"text": texts}), path)


def test_new_shards_sensor_requests_one_run_per_new_listing(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_SHARD_INBOX", "inbox/shards")
    store = LocalArtifactStore(root=str(tmp_path / "artifacts"))
    context = dg.build_sensor_context(resources={"artifacts": store})
    assert isinstance(new_shards(context), dg.SkipReason)

    for i in range(2):
        write_shard(tmp_path / f"s{i}.parquet", [f"document {i} " * 50])
        store.put_file(tmp_path / f"s{i}.parquet", f"inbox/shards/shard_{i:05d}.parquet")
    result = new_shards(dg.build_sensor_context(resources={"artifacts": store}))
    (request,) = result.run_requests
    assert request.run_config["resources"]["profile"]["config"]["corpus"] == "store:inbox/shards"
    assert request.tags["nanochat/new_shards"] == "2" and request.partition_key == "tiny"
    # Same listing on the next tick: nothing new.
    again = new_shards(dg.build_sensor_context(cursor=result.cursor, resources={"artifacts": store}))
    assert isinstance(again, dg.SkipReason)

    # The run it starts can read that corpus: raw_shards materializes from the store's inbox.
    out = dg.materialize([raw_shards], resources={
        "artifacts": store, "workspace": Workspace(root=str(tmp_path / "work")),
        "profile": RunProfile(corpus="store:inbox/shards")}, partition_key=request.partition_key)
    assert out.success and metadata(out, "raw_shards")["num_shards"] == "2"


def test_new_shards_sensor_skips_while_the_store_is_down(tmp_path):
    from store.s3_store import S3ArtifactStore

    store = S3ArtifactStore(bucket="nanochat", endpoint_url="http://127.0.0.1:9", max_attempts=1)
    result = new_shards(dg.build_sensor_context(resources={"artifacts": store}))
    assert isinstance(result, dg.SkipReason) and "could not list" in result.skip_message


def test_schedule_is_weekly_and_off_by_default():
    assert weekly_retrain.cron_schedule == "0 3 * * 0"
    assert weekly_retrain.default_status == dg.DefaultScheduleStatus.STOPPED
    assert new_shards.default_status == dg.DefaultSensorStatus.STOPPED
    assert new_promoted_model.default_status == dg.DefaultSensorStatus.RUNNING
    from orchestration.definitions import defs

    job = defs().resolve_job_def("retrain")
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert {a.key.to_user_string() for a in ASSETS} <= keys
    # Runs of it name a profile partition: the schedule asks for the default profile ($NANOCHAT_PROFILE).
    assert job.partitions_def is not None and set(job.partitions_def.get_partition_keys()) >= {"tiny", "tiny2", "d20"}
    request = weekly_retrain(dg.build_schedule_context())
    assert request.partition_key == "tiny"


def test_report_sensor_asks_for_the_promoted_partition():
    # A run that promoted (a stand-in with promoted_model's key and partitions) without the report in it.
    @dg.asset(name="promoted_model", partitions_def=PROFILE_PARTITIONS)
    def promoted_stand_in() -> None:
        return None

    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([promoted_stand_in], instance=instance, partition_key="tiny2").success
    (request,) = list(new_promoted_model(dg.build_sensor_context(instance=instance)))
    assert request.partition_key == "tiny2"
