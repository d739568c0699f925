"""Resources of the code location, configured from the environment (all overridable per run in the launchpad).

Every default path derives from NANOCHAT_HOME (default .nanochat-dagster/; see store/home.py), the same
root the CLI and the app read, so a run launched from the UI writes where they look.

NANOCHAT_ARTIFACTS   where artifacts go: a local directory (default $NANOCHAT_HOME/artifacts) or s3://bucket/prefix
                     (endpoint from NANOCHAT_S3_ENDPOINT_URL / AWS_ENDPOINT_URL; credentials from the boto3 chain)
NANOCHAT_PROFILE     the profile partition schedules and sensors run: tiny (default), tiny2, d20, d26 or d32 (the UI
                     and the CLI pick a partition per run)
NANOCHAT_LAUNCHER    local (default: torchrun on this machine) or k8s (a pod per stage through PipesK8sClient; then
                     NANOCHAT_K8S_IMAGE, NANOCHAT_K8S_NAMESPACE, NANOCHAT_K8S_WORKSPACE_CLAIM and NANOCHAT_K8S_SECRET
                     set the basics, and every other field is launchpad config: resources.launcher.config)
NANOCHAT_WORKSPACE   scratch space for runs (default $NANOCHAT_HOME/work)
NANOCHAT_DUCKDB      the eval-history database (default $NANOCHAT_HOME/evals.duckdb, the file `nanochat-evals` reads)

The artifact store, the eval store and the promotion pointer are Dagster-free modules (the chat app uses them
without Dagster); this file is where orchestration wraps them as resources:
- `ArtifactStore` is the type an asset annotates its `artifacts` parameter with: Dagster injects the plain store
  object (`LocalArtifactStore` or `S3ArtifactStore`), which `artifact_store` builds from its `url` config.
- `EvalHistory` is the eval history (a DuckDBResource holding the file's path) with the one writer every asset uses.
"""


import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from orchestration.launcher import Launcher, TorchrunLauncher
from orchestration.metadata import number
from orchestration.profiles import RunProfile
from orchestration.workspace import Workspace
from store import artifact_store as stores
from store import eval_store, home
from store.home import git_sha

ArtifactStore = dg.ResourceParam[stores.ArtifactStore]


@dg.resource(config_schema={"url": dg.Field(str, default_value=home.artifacts_url(), description=(
    "A local directory or s3://bucket/prefix (S3 endpoint from NANOCHAT_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)."))},
    description="The artifact store: checkpoints, tokenizers, reports and promotion pointers.")
def artifact_store(init_context: dg.InitResourceContext) -> stores.ArtifactStore:
    return stores.artifact_store_from_url(init_context.resource_config["url"])


class EvalHistory(DuckDBResource):
    """The DuckDB eval history. Assets write through `record` only (lock-aware, one short transaction)."""

    def record(self, context: dg.AssetExecutionContext, profile: RunProfile, stage: str,
               checkpoint: Mapping[str, Any], scores: Mapping[str, Mapping[str, float]]) -> int:
        """Record the run that trained `checkpoint`, the checkpoint, and its {task: {metric: value}} scores.

        checkpoint: a training asset's metadata (sha256, uri, step, tokens_seen) plus `dagster_run_id`, the run
        that trained it (default: this run). Returns the number of score rows written; idempotent.
        """
        run_id = checkpoint.get("dagster_run_id") or context.run.run_id
        run = context.instance.get_run_record_by_id(run_id)
        started = datetime.fromtimestamp(run.start_time, timezone.utc) if run and run.start_time else None
        settings = profile.settings()
        # Code and config describe the run that trained: an eval in a later run leaves them as that run wrote them.
        own = run_id == context.run.run_id
        with eval_store.connect_rw(self.database) as conn:
            return eval_store.record(
                conn, run_id=run_id, stage=stage, checkpoint_id=checkpoint["sha256"], step=int(checkpoint["step"]),
                uri=checkpoint["uri"], tokens_seen=number(checkpoint, "tokens_seen"), scores=scores,
                profile=profile.name.value, depth=settings["depth"], git_sha=git_sha() if own else None,
                config=settings if own else None, started_at=started)


def launcher() -> Launcher:
    kind = os.environ.get("NANOCHAT_LAUNCHER", "local")
    if kind == "local":
        return TorchrunLauncher()
    if kind != "k8s":
        raise ValueError(f"NANOCHAT_LAUNCHER must be local or k8s, got {kind!r}")
    from orchestration.k8s_launcher import K8sTorchrunLauncher

    image = os.environ.get("NANOCHAT_K8S_IMAGE", "")
    if not image:
        raise ValueError("NANOCHAT_LAUNCHER=k8s needs NANOCHAT_K8S_IMAGE: the training image (see infra/README.md)")
    workspace_claim = os.environ.get("NANOCHAT_K8S_WORKSPACE_CLAIM", "")
    return K8sTorchrunLauncher(
        image=image, namespace=os.environ.get("NANOCHAT_K8S_NAMESPACE", "default"),
        workspace_claim=workspace_claim,
        workspace_root=os.environ.get("NANOCHAT_WORKSPACE", "") if workspace_claim else "",
        env_from_secret=os.environ.get("NANOCHAT_K8S_SECRET", ""),
    )


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "artifacts": artifact_store,
            "workspace": Workspace(),
            "profile": RunProfile(),  # the run's partition chooses the profile; run config overrides fields
            "launcher": launcher(),
            "duckdb": EvalHistory(database=str(home.duckdb_path())),
        }
    )
