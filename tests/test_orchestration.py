"""The Dagster code location: definitions load, profiles validate, and the tiny pipeline materializes in process."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from datetime import timezone

import dagster as dg
import pytest
from PIL import Image

from orchestration.defs.data import raw_shards
from orchestration.defs.resources import EvalHistory
from orchestration.defs.tokenizer import tokenizer
from orchestration.defs.training import base_checkpoint, mid_checkpoint, sft_checkpoint
from orchestration.launcher import TorchrunLauncher
from orchestration.partitions import PROFILE_PARTITIONS
from orchestration.profiles import RunProfile
from orchestration.workspace import Workspace
from store import eval_store
from store.artifact_store import LocalArtifactStore

ASSETS = [raw_shards, tokenizer, base_checkpoint, mid_checkpoint, sft_checkpoint]
# The tiny profile, shrunk further so the whole pipeline runs in well under a minute in CI.
FAST = dict(corpus="shared", tok_max_chars=2_000_000, vocab_size=512, depth=2, max_seq_len=64, device_batch_size=8,
            total_batch_size=1024, base_iterations=12, eval_every=6, eval_tokens=2048, mid_iterations=4,
            mid_device_batch_size=8, sft_iterations=4, sft_device_batch_size=4, sft_examples_per_step=8)


def test_definitions_load_with_every_stage():
    from orchestration.definitions import defs

    definitions = defs()
    keys = {k.to_user_string() for k in definitions.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"raw_shards", "tokenizer", "base_checkpoint", "base_eval", "mid_checkpoint", "sft_checkpoint",
                    "chat_eval", "promoted_model", "report", "imported_checkpoint"}
    assert {"artifacts", "workspace", "profile", "launcher", "duckdb"} <= set(definitions.resources)
    graph = definitions.resolve_asset_graph()
    check_keys = {f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys}
    assert check_keys == {"base_checkpoint:finite_loss", "mid_checkpoint:finite_loss", "sft_checkpoint:finite_loss",
                          "base_eval:core_not_regressed", "chat_eval:chatcore_not_regressed"}
    assert {s.name for s in definitions.sensors} == {"new_shards", "new_promoted_model"}
    assert {s.name for s in definitions.schedules} == {"weekly_retrain"}
    # Every stage is partitioned by profile, the same partitions for all (lineage never crosses profiles).
    for key in graph.get_all_asset_keys() - {dg.AssetKey("imported_checkpoint")}:  # imports: one per import name
        assert graph.get(key).partitions_def is PROFILE_PARTITIONS, key
    assert PROFILE_PARTITIONS.get_partition_keys() == ["tiny", "tiny2", "d20", "d26", "d32"]
    # Kinds say what each asset is made with and where it is stored: the tokenizer is rustbpe, not PyTorch; the
    # store is S3 only when NANOCHAT_ARTIFACTS is an s3:// URL (tests run with a local one).
    kinds = {k.to_user_string(): set(graph.get(k).kinds) for k in graph.get_all_asset_keys()}
    assert kinds["tokenizer"] == {"rust", "filesystem"} and kinds["base_checkpoint"] == {"pytorch", "filesystem"}
    assert kinds["base_eval"] == {"pytorch", "duckdb", "filesystem"} and "s3" not in set().union(*kinds.values())


def test_store_kind_follows_the_artifact_store(monkeypatch):
    from orchestration.metadata import store_kind

    monkeypatch.setenv("NANOCHAT_ARTIFACTS", "s3://bucket/prefix")
    assert store_kind() == "s3"
    monkeypatch.setenv("NANOCHAT_ARTIFACTS", "/data/artifacts")
    assert store_kind() == "filesystem"


def test_bad_profile_is_a_clear_error():
    with pytest.raises(Exception, match="total_batch_size=1000 must be a multiple"):
        RunProfile(total_batch_size=1000)
    with pytest.raises(Exception, match="corpus must be"):
        RunProfile(corpus="nowhere")
    assert RunProfile(name="d20").settings()["nproc_per_node"] == 8


def test_the_partition_chooses_the_profile():
    overrides = RunProfile(base_iterations=7)
    assert overrides.for_partition("tiny2").settings()["depth"] == 2
    assert overrides.for_partition("tiny").model_tag == "d4"
    assert overrides.for_partition("d20").settings()["base_iterations"] == 7  # overrides apply to any partition
    # No profile until the partition is known: asking for settings is an error, not a silent default.
    with pytest.raises(ValueError, match="partition chooses it"):
        overrides.settings()
    # A name in the run config that contradicts the partition is refused, naming both.
    with pytest.raises(ValueError, match="name='d20' but the run materializes partition 'tiny'"):
        RunProfile(name="d20").for_partition("tiny")
    assert RunProfile(name="tiny").for_partition("tiny").settings()["depth"] == 4
    with pytest.raises(ValueError, match="not a profile"):
        overrides.for_partition("d99")
    # An override valid for some profiles is checked for the run's profile when the partition is known:
    # 1024 tokens per step fits tiny's one CPU process but not d20's 8 GPUs x 32 x 2048.
    small = RunProfile(total_batch_size=1024, device_batch_size=4, max_seq_len=256)
    assert small.for_partition("tiny").settings()["total_batch_size"] == 1024
    with pytest.raises(ValueError, match="profile d20: total_batch_size=1024 must be a multiple"):
        small.for_partition("d20")


def run_pipeline(tmp_path, shared_data, monkeypatch, store, selection=None, instance=None):
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    resources = {"artifacts": store, "workspace": Workspace(root=str(tmp_path / "work")),
                 "profile": RunProfile(**FAST), "launcher": TorchrunLauncher(),
                 "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb"))}
    return dg.materialize(ASSETS, resources=resources, selection=selection, instance=instance, partition_key="tiny")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_tiny_pipeline_materializes_and_reruns_only_what_was_asked(tmp_path, shared_data, monkeypatch, backend,
                                                                   request):
    # s3: a real SeaweedFS server on 127.0.0.1 (tests/s3server.py), started once per session.
    store = (LocalArtifactStore(root=str(tmp_path / "artifacts")) if backend == "local"
             else request.getfixturevalue("s3_store"))
    instance = dg.DagsterInstance.ephemeral()
    result = run_pipeline(tmp_path, shared_data, monkeypatch, store, instance=instance)
    assert result.success
    meta = {}
    for asset in ("raw_shards", "tokenizer", "base_checkpoint", "mid_checkpoint", "sft_checkpoint"):
        (mat,) = result.asset_materializations_for_node(asset)
        meta[asset] = {k: v.value for k, v in mat.metadata.items()}
        # Each stage published a directory artifact: its manifest is in the store.
        assert store.exists(f"{meta[asset]['key']}/manifest.json"), asset
    assert meta["base_checkpoint"]["step"] == "12" and meta["mid_checkpoint"]["step"] == "4"
    assert meta["base_checkpoint"]["val_bpb"] > 0 and "loss_curve" in meta["base_checkpoint"]
    assert_readable_metadata(result)
    assert meta["sft_checkpoint"]["mid_checkpoint_sha256"] == meta["mid_checkpoint"]["sha256"]
    raw = store.get_file(f"{meta['sft_checkpoint']['key']}/manifest.json", tmp_path / "manifest.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == meta["sft_checkpoint"]["sha256"]
    files = {f["path"] for f in json.loads(raw)["files"]}
    assert files == {"model_000004.pt", "meta_000004.json"}

    # Re-run only the last stage: it reuses the published mid checkpoint, nothing upstream retrains.
    again = run_pipeline(tmp_path, shared_data, monkeypatch, store, selection=[sft_checkpoint], instance=instance)
    assert again.success
    materialized = {e.asset_key.to_user_string() for e in again.get_asset_materialization_events()}
    assert materialized == {"sft_checkpoint"}
    base_events = instance.fetch_materializations(dg.AssetKey("base_checkpoint"), limit=10).records
    assert len(base_events) == 1

    # The eval history holds both runs, every checkpoint, and the validation scores, once each.
    with eval_store.connect_ro(tmp_path / "evals.duckdb") as conn:
        stages = conn.execute("SELECT stage, count(*) FROM checkpoints GROUP BY stage ORDER BY stage").fetchall()
        # CPU training is deterministic, so the re-run may publish byte-identical weights: still one checkpoint row
        # per run (checkpoints are keyed by run and stage, not by their content).
        assert stages == [("base", 1), ("mid", 1), ("sft", 2)]
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
        # Each run's row carries the run's own start (not the time its last stage was recorded).
        for run_id, started_at in conn.execute("SELECT run_id, started_at FROM runs").fetchall():
            start = instance.get_run_record_by_id(run_id).start_time
            assert abs(started_at.replace(tzinfo=timezone.utc).timestamp() - start) < 1e-3, run_id
        bpb = conn.execute("SELECT value FROM eval_results WHERE stage = 'base' AND metric = 'val_bpb'").fetchall()
        # The history keeps full precision; the metadata shows 4 significant digits of the same number.
        assert len(bpb) == 1 and float(f"{bpb[0][0]:.4g}") == meta["base_checkpoint"]["val_bpb"]


def assert_readable_metadata(result) -> None:
    """What the asset pages show (orchestration/metadata.py), on a real materialization of every stage."""
    metadata = {asset: result.asset_materializations_for_node(asset)[0].metadata for asset in
                ("raw_shards", "tokenizer", "base_checkpoint", "mid_checkpoint", "sft_checkpoint")}
    # Only the headline numbers are plottable: everything else is text, JSON, markdown or a table.
    plottable = {k for m in metadata.values() for k, v in m.items()
                 if isinstance(v, (dg.FloatMetadataValue, dg.IntMetadataValue))}
    assert plottable == {"val_bpb", "tok_per_sec"}, plottable
    for asset, m in metadata.items():
        for key, v in m.items():
            if isinstance(v, dg.FloatMetadataValue):
                assert v.value == float(f"{v.value:.4g}"), (asset, key, v)
            elif isinstance(v, dg.TextMetadataValue) and re.fullmatch(r"-?[0-9.]+(e[+-][0-9]+)?", v.value):
                digits = re.sub(r"e.*|[-.]", "", v.value).lstrip("0").rstrip("0")
                assert "." not in v.value or len(digits) <= 4, (asset, key, v.value)  # 4 significant digits
    for stage in ("base", "mid", "sft"):
        m = metadata[f"{stage}_checkpoint"]
        assert "mfu" not in m, stage  # CPU: there is no peak FLOP/s to divide by
        assert isinstance(m["config"], dg.JsonMetadataValue) and m["step"].value.isdigit()
        # The loss curve is a PNG inside markdown (what the UI renders in [Show Markdown]).
        plot = m["loss_curve"]
        assert isinstance(plot, dg.MarkdownMetadataValue), stage
        found = re.fullmatch(r"!\[loss\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", plot.value)
        assert found, plot.value[:80]
        png = Image.open(io.BytesIO(base64.b64decode(found.group(1))))
        assert png.format == "PNG" and png.width > 300 and png.height > 100
    assert "samples" not in metadata["base_checkpoint"] or isinstance(
        metadata["base_checkpoint"]["samples"], dg.MarkdownMetadataValue)
    assert float(metadata["tokenizer"]["vocab_size"].value) == 512
    compression = metadata["tokenizer"]["compression"]
    assert isinstance(compression, dg.TableMetadataValue) and compression.schema.columns[0].name == "source"
    # What a person looks for comes first on the asset page (the UI keeps the order), the run's config last.
    assert list(metadata["base_checkpoint"])[:4] == ["val_bpb", "tok_per_sec", "loss_trend", "loss_curve"]
    assert list(metadata["base_checkpoint"])[-1] == "config"


def test_child_crash_fails_the_asset_with_the_childs_error(tmp_path, shared_data, monkeypatch):
    # device_type=cuda on a CPU machine: base_train's rank 0 raises in init and reports it through Pipes.
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    resources = {"artifacts": LocalArtifactStore(root=str(tmp_path / "artifacts")),
                 "workspace": Workspace(root=str(tmp_path / "work")),
                 "profile": RunProfile(**{**FAST, "device_type": "cuda"}), "launcher": TorchrunLauncher(),
                 "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb"))}
    result = dg.materialize([raw_shards, tokenizer, base_checkpoint], resources=resources, raise_on_error=False,
                            partition_key="tiny")
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "base_checkpoint"
    message = failure.event_specific_data.error.message
    assert "failed with code 1" in message and "CUDA is not available" in message
    # The child's last output lines (its traceback) come with the failure, not only in the compute logs.
    assert "Last output lines:" in message and "Traceback (most recent call last)" in message
    tail = failure.event_specific_data.user_failure_data.metadata["last_log_lines"].value
    assert "[rank0]" in tail and "CUDA is not available" in tail
    assert not (tmp_path / "evals.duckdb").exists()  # nothing recorded for a failed stage


def test_bad_profile_in_run_config_is_rejected_clearly(tmp_path):
    resources = {"artifacts": LocalArtifactStore(root=str(tmp_path / "artifacts")),
                 "workspace": Workspace(root=str(tmp_path / "work")), "profile": RunProfile(),
                 "launcher": TorchrunLauncher(), "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb"))}
    # An unknown profile name is refused by config validation, before anything runs (as in the launchpad).
    with pytest.raises(dg.DagsterInvalidConfigError, match="d99"):
        dg.materialize([raw_shards], resources=resources,
                       run_config={"resources": {"profile": {"config": {"name": "d99"}}}})
    # An inconsistent override fails resource initialisation with the reason.
    result = dg.materialize([raw_shards], resources=resources, raise_on_error=False,
                            run_config={"resources": {"profile": {"config": {"total_batch_size": 1000}}}})
    assert not result.success
    text = " ".join(str(e.event_specific_data.error.message) for e in result.all_events
                    if getattr(e.event_specific_data, "error", None) is not None)
    assert "total_batch_size=1000 must be a multiple of" in text

    # A profile name in the run config that is not the run's partition fails before anything is written.
    result = dg.materialize([raw_shards], resources=resources, raise_on_error=False, partition_key="tiny",
                            run_config={"resources": {"profile": {"config": {"name": "tiny2"}}}})
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "name='tiny2' but the run materializes partition 'tiny'" in failure.event_specific_data.error.message
    assert not (tmp_path / "artifacts").exists()


def test_launcher_is_chosen_by_environment(monkeypatch):
    from orchestration.defs.resources import launcher
    from orchestration.k8s_launcher import K8sTorchrunLauncher

    monkeypatch.delenv("NANOCHAT_LAUNCHER", raising=False)
    assert isinstance(launcher(), TorchrunLauncher)
    monkeypatch.setenv("NANOCHAT_LAUNCHER", "k8s")
    with pytest.raises(ValueError, match="needs NANOCHAT_K8S_IMAGE"):
        launcher()
    monkeypatch.setenv("NANOCHAT_K8S_IMAGE", "registry.example/nanochat:1")
    monkeypatch.setenv("NANOCHAT_K8S_SECRET", "nanochat-s3")
    k8s = launcher()
    assert isinstance(k8s, K8sTorchrunLauncher) and k8s.env_from_secret == "nanochat-s3"
    monkeypatch.setenv("NANOCHAT_LAUNCHER", "slurm")
    with pytest.raises(ValueError, match="local or k8s"):
        launcher()
