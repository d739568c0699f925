"""Weekly retraining, off until someone turns it on in the UI (a week of GPU time should be a decision)."""

import dagster as dg

from orchestration.jobs import retrain_job
from orchestration.partitions import default_profile


@dg.schedule(
    name="weekly_retrain", job=retrain_job, cron_schedule="0 3 * * 0", execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Sundays 03:00 UTC: retrain and re-evaluate the code location's default profile partition "
                "(NANOCHAT_PROFILE); promotion still has to pass the regression checks.",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(partition_key=default_profile(), tags={"nanochat/trigger": "weekly_retrain"})
