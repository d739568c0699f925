"""Resources of the code location, configured from the environment (all overridable per run in the launchpad).

NANOCHAT_ARTIFACTS   where artifacts go: a local directory (default .nanochat-dagster/artifacts) or s3://bucket/prefix
                     (endpoint from NANOCHAT_S3_ENDPOINT_URL / AWS_ENDPOINT_URL; credentials from the boto3 chain)
NANOCHAT_PROFILE     the default run profile: tiny (default), d20, d26 or d32 (what schedules and sensors run)
NANOCHAT_LAUNCHER    local (default: torchrun on this machine) or k8s (a pod per stage through PipesK8sClient; then
                     NANOCHAT_K8S_IMAGE, NANOCHAT_K8S_NAMESPACE, NANOCHAT_K8S_WORKSPACE_CLAIM and NANOCHAT_K8S_SECRET
                     set the basics, and every other field is launchpad config: resources.launcher.config)
NANOCHAT_WORKSPACE   scratch space for runs (default .nanochat-dagster/work)
NANOCHAT_DUCKDB      the eval-history database (default <NANOCHAT_BASE_DIR or ~/.cache/nanochat>/evals.duckdb,
                     the same file `nanochat-evals` reads)
"""


import os

import dagster as dg
from dagster_duckdb import DuckDBResource

from orchestration.artifact_store import artifact_store_from_url
from orchestration.eval_store import default_db_path
from orchestration.launcher import TorchrunLauncher
from orchestration.profiles import RunProfile
from orchestration.workspace import Workspace


def launcher() -> dg.ConfigurableResource:
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
            "artifacts": artifact_store_from_url(os.environ.get("NANOCHAT_ARTIFACTS", ".nanochat-dagster/artifacts")),
            "workspace": Workspace(),
            "profile": RunProfile(name=os.environ.get("NANOCHAT_PROFILE", "tiny")),
            "launcher": launcher(),
            # Writers open it through eval_store.connect_rw (lock-aware retries); dagster-duckdb holds the path.
            "duckdb": DuckDBResource(database=str(default_db_path())),
        }
    )
