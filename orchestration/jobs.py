"""Jobs the schedules and sensors launch (the UI's Materialize buttons need none: they use the asset graph)."""

import dagster as dg

# Everything, checks included, in dependency order: what a scheduled or shard-triggered retrain runs.
retrain_job = dg.define_asset_job(
    "retrain", selection=dg.AssetSelection.all(),
    description="The whole pipeline: shards, tokenizer, base/mid/SFT training, evals, promotion and report card.",
)

# Only the report card: after a promotion made outside a full pipeline run.
report_job = dg.define_asset_job("report_card", selection=dg.AssetSelection.assets("report"))
