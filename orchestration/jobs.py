"""Jobs the schedules and sensors launch (the UI's Materialize buttons need none: they use the asset graph).

Both are partitioned by profile, as their assets are (Dagster infers it): a run of either names one profile.
"""

import dagster as dg

# Everything, checks included, in dependency order: what a scheduled or shard-triggered retrain runs.
# Not the imports group: imports are partitioned by import name, not by profile, and a job has one partitioning.
retrain_job = dg.define_asset_job(
    "retrain", selection=dg.AssetSelection.all() - dg.AssetSelection.groups("imports"),
    description="The whole pipeline for one profile partition: shards, tokenizer, base/mid/SFT training, evals, "
                "promotion and report card.",
)

# Only the report card: after a promotion made outside a full pipeline run.
report_job = dg.define_asset_job("report_card", selection=dg.AssetSelection.assets("report"))
