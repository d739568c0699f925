"""Weekly retraining, off until someone turns it on in the UI (a week of GPU time should be a decision)."""

import dagster as dg

from orchestration.jobs import retrain_job

weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain", job=retrain_job, cron_schedule="0 3 * * 0", execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Sundays 03:00 UTC: retrain and re-evaluate with the code location's default profile "
                "(NANOCHAT_PROFILE); promotion still has to pass the regression checks.",
)
