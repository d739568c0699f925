"""
Resume through the orchestrator, with the real parts: a SeaweedFS artifact store, `dagster dev` (webserver + daemon)
driven through GraphQL as the UI drives it, and the training entry points as child processes.

A training stage publishes each save as a resume point; the test SIGKILLs the stage's child process after its
second published save (as a preempted node would), re-executes the failed run "from failure" with the UI's own
mutation, and checks from the run's log and from the steps trained that the new run resumed from the newest resume
point, and that the final weights are bit-identical to an uninterrupted run. The same for mid_checkpoint, where a
run with a changed config in between must not resume.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from botocore.config import Config
from dagster import DagsterRunStatus
from webserver_driver import RUN_EVENTS_QUERY, DagsterDev, launch_run, run_errors, wait_for_run  # tests/ on sys.path

from nanochat.checkpoint_manager import read_meta, recorded_tokenizer, save_checkpoint, tokenizer_record, with_tokenizer
from nanochat.gpt import GPT, GPTConfig
from orchestration import resume
from store import keys
from store.s3_store import S3ArtifactStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:gql")]

# tiny, shrunk: ~1k tokens a step on depth 2; saves every 4 steps, so the kill (after the save of step 8 is
# published) lands with 12 steps to go.
STEPS, SAVE_EVERY = 20, 4
PROFILE = {"name": "tiny", "corpus": "shared", "vocab_size": 512, "tok_max_chars": 2_000_000, "depth": 2,
           "max_seq_len": 64, "device_batch_size": 8, "total_batch_size": 4096, "base_iterations": STEPS,
           "eval_every": 1000, "eval_tokens": 2048, "mid_iterations": STEPS, "mid_device_batch_size": 8,
           "save_every": SAVE_EVERY}
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
REEXECUTE_MUTATION = """
mutation Reexecute($reexecutionParams: ReexecutionParams!) {
  launchPipelineReexecution(reexecutionParams: $reexecutionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
  }
}
"""


# --- keys and fingerprints ----------------------------------------------------------------------------------------


def test_fingerprint_follows_inputs_and_config_but_not_save_or_log_flags():
    args = ["--depth=4", "--num-iterations=100", "--save-every=40", "--run=abc", "--log-every=10"]
    inputs = {"tokenizer_sha256": "a" * 64}
    fp = resume.fingerprint("nanochat.base_train", args, inputs, 1)
    # Flags that never change the weights: the same lineage, so a run with another save cadence still resumes.
    assert fp == resume.fingerprint("nanochat.base_train", ["--depth=4", "--num-iterations=100", "--save-every=8",
                                                            "--run=other", "--resume-from-step=40"], inputs, 1)
    assert fp != resume.fingerprint("nanochat.base_train", [*args[:1], "--num-iterations=101"], inputs, 1)
    assert fp != resume.fingerprint("nanochat.base_train", args, {"tokenizer_sha256": "b" * 64}, 1)
    assert fp != resume.fingerprint("nanochat.base_train", args, inputs, 8)  # optimizer shards are per rank
    prefix = keys.resume_prefix("d20", "base", fp)
    assert prefix == f"resume/d20/base/{fp}"
    assert keys.resume_step_under(prefix, keys.resume_step_key(prefix, 500) + "/manifest.json") == 500
    assert keys.resume_step_under(prefix, f"resume/d20/mid/{fp}/step_000500/manifest.json") is None


def test_stage_args_follow_the_profile():
    assert resume.stage_args("base", {"save_every": 0, "core_every": 0, "core_max_per_task": 20}) == ["--save-every=-1"]
    assert resume.stage_args("base", {"save_every": 500, "core_every": 2000, "core_max_per_task": -1}) == [
        "--save-every=500", "--core-metric-every=2000", "--core-metric-max-per-task=-1"]
    assert resume.stage_args("mid", {"save_every": 500, "core_every": 2000, "core_max_per_task": -1}) == [
        "--save-every=500"]


def test_profile_save_and_core_fields():
    from orchestration.profiles import RunProfile

    tiny = RunProfile().for_partition("tiny").settings()  # the partition chooses the profile
    assert (tiny["save_every"], tiny["core_every"]) == (40, 0)
    assert (RunProfile(name="d20").settings()["save_every"], RunProfile(name="d20").settings()["core_every"]) == (
        500, 2000)
    with pytest.raises(Exception, match="core_every=300 must be a multiple of save_every=500"):
        RunProfile(name="d20", core_every=300)
    with pytest.raises(Exception, match="must be a multiple of save_every=0"):
        RunProfile(save_every=0, core_every=40)
    with pytest.raises(Exception, match="save_every and core_every must be >= 0"):
        RunProfile(save_every=-5)


TOKENIZER = tokenizer_record("tokenizer/tiny/run-1", "ab" * 32)  # what every published step's meta must name


def save_step(checkpoint_dir: Path, step: int, world_size: int = 2) -> None:
    """A real saved step: a depth-1 model, an optimizer shard per rank, meta with the loader states."""
    torch.manual_seed(step)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    meta = {"step": step, "model_config": model.config.to_dict(), "world_size": world_size, "final": False,
            "num_iterations": 12, "dataloader_state_dicts": [{"rank": r, "pos": step} for r in range(world_size)]}
    for rank in range(world_size):
        save_checkpoint(checkpoint_dir, step, model.state_dict() if rank == 0 else None, [{"rank": rank}],
                        meta if rank == 0 else None, rank=rank)


def test_resume_points_publish_prune_and_restore_on_s3(s3_store, tmp_path):
    points = resume.ResumePoints(s3_store, keys.resume_prefix("tiny", "base", "f" * 64), tmp_path / "run1", 2,
                                 TOKENIZER)
    assert points.published_steps() == [] and points.restore(_Log()) is None
    save_step(points.checkpoint_dir, 4)
    save_step(points.checkpoint_dir, 8)
    watcher = resume.Watcher(points, tmp_path / "staging", _Log(), poll_s=3600)
    watcher.publish_new()
    # Only the newest save is published, and an older point is dropped when a newer one lands.
    assert points.published_steps() == [8] and watcher.last == 8
    files = {k.rsplit("/", 1)[-1] for k in s3_store.list_keys(keys.resume_step_key(points.prefix, 8))}
    assert files == {"model_000008.pt", "meta_000008.json", "optim_000008_rank0.pt", "optim_000008_rank1.pt",
                     "manifest.json"}
    # The run directory keeps only what a resume still needs: step 4 is gone there too.
    assert sorted(p.name for p in points.checkpoint_dir.iterdir()) == sorted(files - {"manifest.json"})

    # Another machine (a new run directory) restores the newest complete point, byte for byte.
    other = resume.ResumePoints(s3_store, points.prefix, tmp_path / "run2", 2, TOKENIZER)
    assert resume.resume_args(other, log := _Log()) == ["--resume-from-step=8"]
    assert "resuming from step 8 of 12" in log.text()
    for name in files - {"manifest.json", "meta_000008.json"}:
        assert (other.checkpoint_dir / name).read_bytes() == (points.checkpoint_dir / name).read_bytes()
    # The meta as training wrote it, plus the tokenizer the stage trained with (key and fingerprint).
    assert read_meta(other.checkpoint_dir, 8) == with_tokenizer(read_meta(points.checkpoint_dir, 8), TOKENIZER)
    assert recorded_tokenizer(read_meta(other.checkpoint_dir, 8), "step 8") == TOKENIZER
    # A point lacking a rank's shard (published by a job of another world size) is not used.
    assert resume.ResumePoints(s3_store, points.prefix, tmp_path / "run3", 4, TOKENIZER).restore(_Log()) is None
    assert not (tmp_path / "run3").exists()
    # The final step is the stage's own checkpoint, never a resume point.
    save_step(points.checkpoint_dir, 12)
    meta = points.checkpoint_dir / "meta_000012.json"
    meta.write_text(meta.read_text().replace('"final": false', '"final": true'))
    watcher.publish_new()
    assert points.published_steps() == [8]
    assert resume.clear(points, _Log()) == 5 and points.published_steps() == []


def test_core_during_training_reaches_the_eval_history_with_its_step(base_dir, tmp_path, capsys):
    from nanochat import base_train
    from store import eval_store, evals_cli
    from store.artifact_store import LocalArtifactStore

    # Real CORE (the shared eval bundle, 2 examples a task) at step 2 of 4, saved with that step.
    base_train.main(["--depth=2", "--head-dim=64", "--max-seq-len=64", "--device-batch-size=8",
                     "--total-batch-size=1024", "--eval-tokens=1024", "--eval-every=-1", "--sample-every=-1",
                     "--device-type=cpu", "--num-iterations=4", "--save-every=2", "--core-metric-every=2",
                     "--core-metric-max-per-task=2"])
    checkpoint_dir = base_dir / "base_checkpoints" / "d2"
    metas = {step: json.loads((checkpoint_dir / f"meta_{step:06d}.json").read_text()) for step in (2, 4)}
    core = metas[2]["core"]
    assert core["tasks_covered"] >= 1 and core["core_label"].startswith("CORE") and "core" not in metas[4]

    # Publishing the step records its score: the resume point's sha256 as checkpoint id, its step, tokens seen.
    points = resume.ResumePoints(LocalArtifactStore(root=str(tmp_path / "store")), "resume/tiny/base/x",
                                 checkpoint_dir, 1, TOKENIZER)
    db = tmp_path / "evals.duckdb"

    def record(checkpoint: dict, scores: dict) -> int:  # what EvalHistory.record does for the asset's run
        with eval_store.connect_rw(db) as conn:
            return eval_store.record(conn, run_id="run-1", stage="base", checkpoint_id=checkpoint["sha256"],
                                     step=checkpoint["step"], uri=checkpoint["uri"], profile="tiny", depth=2,
                                     scores=scores, tokens_seen=checkpoint["tokens_seen"])

    watcher = resume.Watcher(points, tmp_path / "staging", _Log(), resume.core_recorder(record, 1024), poll_s=3600)
    # The final step (4) is the stage's own checkpoint: the watcher leaves it, so publish step 2 as it found it.
    (checkpoint_dir / "model_000004.pt").unlink()
    watcher.publish_new()
    assert watcher.last == 2
    with eval_store.connect_ro(db) as conn:
        rows = conn.execute("SELECT c.step, e.tokens_seen, e.metric, e.value FROM eval_results e JOIN checkpoints c "
                            "USING (checkpoint_id) WHERE e.task = 'all'").fetchall()
    assert rows == [(2, 2 * 1024, core["core_label"], pytest.approx(core["core"]))]
    # The final score lands beside it (base_eval's, here recorded by hand at step 4), and the CLI shows the curve.
    record({"sha256": "f" * 64, "uri": "file:///final", "step": 4, "tokens_seen": 4 * 1024},
           {eval_store.AGGREGATE_TASK: {core["core_label"]: core["core"] + 0.01}})
    capsys.readouterr()  # training's own output
    assert evals_cli.main(["--db", str(db), "--json", "history", "--by-step", "--metric", core["core_label"],
                           "--run", "run-"]) == 0
    curve = [(r["step"], r["tokens_seen"], r["value"]) for r in json.loads(capsys.readouterr().out)]
    assert curve == [(2, 2048, pytest.approx(core["core"])), (4, 4096, pytest.approx(core["core"] + 0.01))]


class _Log:
    """context.log's shape, keeping what was logged."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)

    warning = info

    def text(self) -> str:
        return "\n".join(self.lines)


# --- preemption inside real Dagster runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server, shared_data) -> Iterator[tuple[DagsterDev, S3ArtifactStore, Path]]:
    """`dagster dev` whose artifact store is a fresh bucket of the session's SeaweedFS server."""
    from s3server import REGION

    bucket = f"resume-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=REGION,
                 config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=bucket)
    store = S3ArtifactStore(bucket=bucket, prefix="runs", endpoint_url=s3_server.endpoint_url, region_name=REGION)
    root = tmp_path_factory.mktemp("resume")
    home = root / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({"concurrency": {"pools": {"default_limit": 1}},
                                                       "telemetry": {"enabled": False}, "nux": {"enabled": False}}))
    env = {**os.environ, "DAGSTER_HOME": str(home), "NANOCHAT_ARTIFACTS": f"s3://{bucket}/runs",
           "NANOCHAT_S3_ENDPOINT_URL": s3_server.endpoint_url, "NANOCHAT_WORKSPACE": str(root / "work"),
           "NANOCHAT_DUCKDB": str(root / "evals.duckdb"), "NANOCHAT_ARTIFACT_CACHE": str(root / "cache"),
           "NANOCHAT_SHARED_DATA": str(shared_data), "NANOCHAT_RESUME_POLL_S": "0.2", "OMP_NUM_THREADS": "1"}
    server = DagsterDev(home, env)
    try:
        server.start()
        yield server, store, root / "work"
    finally:
        server.stop()


def run_log(server: DagsterDev, run_id: str) -> str:
    run = server.graphql(RUN_EVENTS_QUERY, {"runId": run_id})["runOrError"]
    return "\n".join(e.get("message") or "" for e in run["eventConnection"]["events"])


def children(module: str, work: Path) -> list[int]:
    """The pids of `python -m <module>` processes working under this test's workspace."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if module.encode() in cmdline and f"NANOCHAT_BASE_DIR={work}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def kill_after_second_save(server: DagsterDev, store: S3ArtifactStore, work: Path, run_id: str, stage: str,
                           module: str, timeout: float = 240) -> None:
    """Wait until the stage's second resume point (step 2 x SAVE_EVERY) is published, then SIGKILL its child."""
    deadline = time.monotonic() + timeout
    wanted = f"/step_{2 * SAVE_EVERY:06d}/manifest.json"
    while time.monotonic() < deadline:
        if any(k.startswith(f"resume/tiny/{stage}/") and k.endswith(wanted) for k in store.list_keys("resume")):
            pids = children(module, work)
            assert pids, f"no {module} child to kill"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return
        assert server.client().get_run_status(run_id) not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE), (
            f"run {run_id} ended before its second resume point:\n" + "\n".join(run_errors(server, run_id)))
        time.sleep(0.1)
    raise AssertionError(f"no second resume point of {stage} after {timeout:.0f} s")


def reexecute_from_failure(server: DagsterDev, run_id: str) -> str:
    """The UI's "Re-execute from failure" button: the same mutation, strategy FROM_FAILURE."""
    params = {"parentRunId": run_id, "strategy": "FROM_FAILURE"}
    result = server.graphql(REEXECUTE_MUTATION, {"reexecutionParams": params})["launchPipelineReexecution"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def published_steps(store: S3ArtifactStore, stage: str) -> list[int]:
    return sorted(int(m.group(1)) for k in store.list_keys("resume")
                  if (m := re.fullmatch(rf"resume/tiny/{stage}/\w+/step_(\d+)/manifest\.json", k)))


def final_weights(store: S3ArtifactStore, asset: str, run_id: str, tmp: Path) -> dict:
    """The model state dict the run published for the asset (its materialization's key in the store)."""
    keys = [k for k in store.list_keys(f"{asset}/tiny/d2/{run_id}") if k.endswith(f"model_{STEPS:06d}.pt")]
    assert keys, f"{asset} of run {run_id} published no model_{STEPS:06d}.pt"
    return torch.load(store.get_file(keys[0], tmp / f"{asset}-{run_id}.pt"), weights_only=True)


def steps_trained(server: DagsterDev, run_id: str, asset: str) -> int:
    """How many optimizer steps the run's child trained: `steps_trained`, the length of its loss curve."""
    query = """query($runId: ID!) { runOrError(runId: $runId) { ... on Run { assetMaterializations {
        assetKey { path } metadataEntries { label ... on TextMetadataEntry { text } } } } } }"""
    mats = server.graphql(query, {"runId": run_id})["runOrError"]["assetMaterializations"]
    (mat,) = [m for m in mats if m["assetKey"]["path"] == [asset]]
    (steps,) = [e["text"] for e in mat["metadataEntries"] if e["label"] == "steps_trained"]
    return int(steps)


def assert_resumes(server, store, work, stage: str, module: str, assets: list[str], config: dict,
                   changed: dict | None = None) -> str:
    """Kill the stage after its second published save, re-execute from failure: it resumes. The resumed run's id."""
    asset = f"{stage}_checkpoint"
    killed = launch_run(server, assets, config)
    kill_after_second_save(server, store, work, killed, stage, module)
    assert wait_for_run(server, killed) == DagsterRunStatus.FAILURE
    newest = max(published_steps(store, stage))
    assert SAVE_EVERY * 2 <= newest < STEPS

    if changed:  # another config is another lineage: it trains from step 0 and leaves this one's points alone
        other = launch_run(server, [asset], {**config, "resources": {"profile": {"config": {**PROFILE, **changed}}}})
        assert wait_for_run(server, other) == DagsterRunStatus.SUCCESS, run_errors(server, other)
        assert "no resume point under resume/tiny/" in run_log(server, other)
        assert "resuming from step" not in run_log(server, other)
        assert published_steps(store, stage) == [newest]

    resumed = reexecute_from_failure(server, killed)
    assert wait_for_run(server, resumed) == DagsterRunStatus.SUCCESS, run_errors(server, resumed)
    assert f"resuming from step {newest} of {STEPS}" in run_log(server, resumed)
    assert steps_trained(server, resumed, asset) == STEPS - newest
    assert published_steps(store, stage) == []  # the completed stage deleted its resume points
    # What a resume point costs (shown with -s; the figures go in docs/operations.md).
    print("\n".join(line for line in run_log(server, killed).splitlines() if "published resume point" in line))
    return resumed


def test_killed_stages_resume_from_their_last_published_step_when_reexecuted(stack, tmp_path):
    server, store, work = stack
    config = {"resources": {"profile": {"config": PROFILE}}, **IN_PROCESS}
    base = assert_resumes(server, store, work, "base", "nanochat.base_train",
                          ["raw_shards", "tokenizer", "base_checkpoint"], config)
    # mid trains on the resumed base model; a changed config (fewer steps, no save) in between must not resume.
    mid = assert_resumes(server, store, work, "mid", "nanochat.mid_train", ["mid_checkpoint"], config,
                         changed={"mid_iterations": 2})

    # Both stages again, uninterrupted, in one run: the same weights, bit for bit.
    reference = launch_run(server, ["base_checkpoint", "mid_checkpoint"], config)
    assert wait_for_run(server, reference) == DagsterRunStatus.SUCCESS, run_errors(server, reference)
    assert "resuming from step" not in run_log(server, reference)
    for asset, resumed in (("base_checkpoint", base), ("mid_checkpoint", mid)):
        got, want = (final_weights(store, asset, r, tmp_path) for r in (resumed, reference))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"resumed {asset} differs from an uninterrupted run"
