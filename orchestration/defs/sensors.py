"""
new_shards: start a retrain when new parquet shards land in the artifact store's inbox (off by default).
new_promoted_model: write the report card after a promotion made outside a full pipeline run (on by default).
"""


import hashlib
import json
import os

import dagster as dg

from orchestration.defs.resources import ArtifactStore
from orchestration.jobs import report_job, retrain_job
from orchestration.partitions import default_profile
from store.artifact_store import ArtifactStoreError


def shard_inbox() -> str:
    """Where users drop new shards: $NANOCHAT_SHARD_INBOX (a key prefix in the artifact store)."""
    return os.environ.get("NANOCHAT_SHARD_INBOX", "incoming/shards").strip("/")


@dg.sensor(job=retrain_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Retrain when new .parquet shards appear under $NANOCHAT_SHARD_INBOX (default "
                       "incoming/shards) in the artifact store; the run's corpus is that folder, its partition the "
                       "default profile ($NANOCHAT_PROFILE).")
def new_shards(context: dg.SensorEvaluationContext, artifacts: ArtifactStore) -> dg.SensorResult | dg.SkipReason:
    prefix = shard_inbox()
    try:
        shards = sorted(k for k in artifacts.list_keys(prefix) if k.endswith(".parquet"))
    except ArtifactStoreError as e:  # S3 down: try again next tick, keep the cursor
        return dg.SkipReason(f"could not list {artifacts.uri(prefix)}: {e}")
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    new = [k for k in shards if k not in seen]
    if not new:
        return dg.SkipReason(f"no new shards under {artifacts.uri(prefix)} ({len(shards)} known)")
    # The run key is the listing itself: the same set of shards never starts two runs.
    digest = hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]
    request = dg.RunRequest(
        run_key=f"shards-{digest}", partition_key=default_profile(),
        run_config={"resources": {"profile": {"config": {"corpus": f"store:{prefix}"}}}},
        tags={"nanochat/trigger": "new_shards", "nanochat/new_shards": str(len(new))},
    )
    return dg.SensorResult(run_requests=[request], cursor=json.dumps(shards))


@dg.asset_sensor(asset_key=dg.AssetKey("promoted_model"), job=report_job,
                 default_status=dg.DefaultSensorStatus.RUNNING,
                 description="A promotion made without the report asset in its run gets its report card.")
def new_promoted_model(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry):
    run = context.instance.get_run_by_id(asset_event.run_id)
    selection = run.asset_selection if run is not None else None
    if selection is None or dg.AssetKey("report") in selection:
        return dg.SkipReason(f"run {asset_event.run_id} writes the report card itself")
    # The report of the profile that was promoted: the same partition.
    partition = asset_event.dagster_event.partition if asset_event.dagster_event else None
    return dg.RunRequest(run_key=f"report-{asset_event.run_id}-{partition}", partition_key=partition,
                         tags={"nanochat/trigger": "new_promoted_model"})
