"""
Lineage per profile partition, on a real Dagster instance (SQLite, on disk) with real training: two profiles
trained interleaved never read each other's artifacts, and a stage whose upstream is missing in its partition
fails at once, naming what is missing. Every published checkpoint names its partition's tokenizer.
"""

from __future__ import annotations

import json

import dagster as dg

from orchestration.defs import checks
from orchestration.defs.data import raw_shards
from orchestration.defs.resources import EvalHistory
from orchestration.defs.tokenizer import tokenizer
from orchestration.defs.training import base_checkpoint, mid_checkpoint, sft_checkpoint
from orchestration.launcher import TorchrunLauncher
from orchestration.profiles import RunProfile
from orchestration.workspace import Workspace
from store.artifact_store import LocalArtifactStore

ASSETS = [raw_shards, tokenizer, base_checkpoint, mid_checkpoint, sft_checkpoint,
          checks.base_checkpoint_finite_loss, checks.mid_checkpoint_finite_loss, checks.sft_checkpoint_finite_loss]
# Both tiny profiles shrunk to a few steps; depth is left to the profile: tiny trains d4, tiny2 d2.
FAST = dict(corpus="shared", tok_max_chars=1_000_000, vocab_size=512, max_seq_len=64, device_batch_size=8,
            total_batch_size=512, base_iterations=4, eval_every=4, eval_tokens=1024, mid_iterations=2,
            mid_device_batch_size=8, sft_iterations=2, sft_device_batch_size=4, sft_examples_per_step=4)
# What each stage reads: its recorded <input>_sha256 must be that input's sha256 in the same partition.
INPUTS = {"tokenizer": ["raw_shards"], "base_checkpoint": ["raw_shards", "tokenizer"],
          "mid_checkpoint": ["tokenizer", "base_checkpoint"], "sft_checkpoint": ["tokenizer", "mid_checkpoint"]}
DEPTH = {"tiny": 4, "tiny2": 2}


def latest(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    assert records, f"{asset}[{partition}] was never materialized"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_two_profiles_interleaved_keep_their_own_lineage(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "home").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "home"))
    store = LocalArtifactStore(root=str(tmp_path / "artifacts"))
    resources = {"artifacts": store, "workspace": Workspace(root=str(tmp_path / "work")),
                 "profile": RunProfile(**FAST), "launcher": TorchrunLauncher(),
                 "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb"))}

    def run(partition: str, *assets, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
        return dg.materialize(ASSETS, resources=resources, instance=instance, partition_key=partition,
                              selection=list(assets), raise_on_error=raise_on_error)

    run("tiny", raw_shards, tokenizer)
    run("tiny", base_checkpoint)

    # tiny2 has no shards, tokenizer or base model yet: its mid-train fails before training, naming every missing
    # upstream of its own partition, although tiny's base checkpoint is right there.
    failed = run("tiny2", mid_checkpoint, raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "tokenizer[tiny2], base_checkpoint[tiny2] never materialized" in message, message
    assert "for partition 'tiny2' first" in message
    assert not instance.fetch_materializations(dg.AssetKey("mid_checkpoint"), limit=1).records
    assert not list((tmp_path / "artifacts").glob("mid_checkpoint*"))

    # Interleaved, so that "the latest materialization of the upstream" is always the other profile's.
    run("tiny2", raw_shards, tokenizer)
    for asset in (base_checkpoint, mid_checkpoint, sft_checkpoint):
        for partition in ("tiny", "tiny2"):
            if (asset, partition) == (base_checkpoint, "tiny"):
                continue  # trained above
            result = run(partition, asset)
            (evaluation,) = result.get_asset_check_evaluations()
            assert evaluation.passed and evaluation.metadata["partition"].value == partition

    for partition, other in (("tiny", "tiny2"), ("tiny2", "tiny")):
        for asset, inputs in INPUTS.items():
            meta = latest(instance, asset, partition)
            for upstream in inputs:
                assert meta[f"{upstream}_sha256"] == latest(instance, upstream, partition)["sha256"], (
                    asset, partition, upstream)
        for stage in ("base", "mid", "sft"):
            meta = latest(instance, f"{stage}_checkpoint", partition)
            depth = DEPTH[partition]
            assert meta["key"].startswith(f"{stage}_checkpoint/{partition}/d{depth}/")
            assert meta["sha256"] != latest(instance, f"{stage}_checkpoint", other)["sha256"]
            # The weights themselves: each stage kept its partition's model size (a d4 never became a d2).
            published = store.get_dir(meta["key"])
            (meta_file,) = published.glob("meta_*.json")
            assert json.loads(meta_file.read_text())["model_config"]["n_layer"] == depth
            # It names the tokenizer of its own partition, as the app loads it (key and content fingerprint).
            tok = latest(instance, "tokenizer", partition)
            assert json.loads(meta_file.read_text())["tokenizer"] == {"key": tok["key"],
                                                                      "fingerprint": tok["fingerprint"]}
            assert (meta["tokenizer_key"], meta["tokenizer_fingerprint"]) == (tok["key"], tok["fingerprint"])
        assert latest(instance, "mid_checkpoint", partition)["base_checkpoint_sha256"] != latest(
            instance, "base_checkpoint", other)["sha256"]
