"""
Lineage per profile: every stage asset (and its checks) is partitioned by run profile, and a stage reads only the
materializations of its own partition.

Without this, "the latest base_checkpoint" is whatever profile ran last: a d20 mid-train would fetch the tiny d4
base model. With it, partition `d20` of mid_checkpoint can only start from partition `d20` of base_checkpoint, and
the UI shows per profile which stages are materialized, stale or missing. The run's overrides stay in run config
(resources.profile.config); the partition key chooses the profile (RunProfile.for_partition).
"""

from __future__ import annotations

import os

import dagster as dg

from orchestration.profiles import PROFILES, RunProfile

PROFILE_PARTITIONS = dg.StaticPartitionsDefinition(list(PROFILES))


def default_profile() -> str:
    """The partition schedules and sensors run: $NANOCHAT_PROFILE, else tiny."""
    name = os.environ.get("NANOCHAT_PROFILE", "tiny")
    if name not in PROFILES:
        raise ValueError(f"NANOCHAT_PROFILE={name!r} is not a profile; use one of {', '.join(PROFILES)}")
    return name


def partition_of(context) -> str:
    """The profile partition this asset or check runs for; a clear failure when the run has none."""
    if not context.has_partition_key:
        raise dg.Failure(f"the stages are partitioned by profile ({', '.join(PROFILES)}) and this run names none: "
                         "pick a partition (UI: the partition picker of Materialize; CLI: --partition tiny; Python: "
                         "dg.materialize(..., partition_key='tiny'))")
    return context.partition_key


def run_profile(context, profile: RunProfile) -> RunProfile:
    """The run's profile: its partition's settings with the run config's overrides."""
    try:
        return profile.for_partition(partition_of(context))
    except ValueError as e:
        raise dg.Failure(str(e)) from None


def upstream_record(context, asset_key: str, partition: str) -> dg.EventLogRecord | None:
    """The newest materialization of asset_key in this partition (never another profile's), or None."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset_key), asset_partitions=[partition]), limit=1).records
    return records[0] if records else None


def require_upstreams(context, assets: list[str]) -> str:
    """Fail at once, naming every missing (asset, partition), unless each asset has a materialization in this
    run's partition. Returns the partition."""
    partition = partition_of(context)
    missing = [asset for asset in assets if upstream_record(context, asset, partition) is None]
    if missing:
        names = ", ".join(f"{asset}[{partition}]" for asset in missing)
        raise dg.Failure(f"upstream {names} never materialized: materialize {' and '.join(missing)} for partition "
                         f"{partition!r} first (stages only read upstreams of their own profile partition)")
    return partition


def upstream_metadata(context, asset_key: str) -> dict:
    """
    The metadata of an asset's newest materialization in this run's partition (its artifact key, sha256, step,
    ...), plus `dagster_run_id`: the run that produced it. Evals key their history rows by that run, so
    re-evaluating a checkpoint in a later run replaces its rows instead of adding a second set.
    """
    partition = require_upstreams(context, [asset_key])
    record = upstream_record(context, asset_key, partition)
    metadata = record.asset_materialization.metadata
    return {**{k: v.value for k, v in metadata.items()}, "dagster_run_id": record.run_id}
