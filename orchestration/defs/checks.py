"""
Asset checks that gate promotion. They are blocking: when one fails with ERROR severity inside a run, the assets
downstream of it (promoted_model, report) are not materialized in that run.

- finite losses on every training stage (a NaN/inf loss or bpb means the checkpoint is garbage);
- CORE (base_eval) and ChatCORE (chat_eval) not below the promoted model of the same profile and size by more
  than the profile's promotion_tolerance. Only scores with the same coverage label are compared (a CORE[18/22]
  is never held against a full CORE); an incomparable or missing score is a WARN, which does not block.

Each check reads its asset's materialization in the run's profile partition. The checks themselves are not
partitioned (Dagster 1.13 has partitioned checks only as a preview): the UI shows a check's latest result, and
the check's metadata names the partition it checked.
"""


import math

import dagster as dg

from orchestration import metadata as md
from orchestration.defs.resources import ArtifactStore
from orchestration.partitions import partition_of, run_profile, upstream_metadata
from orchestration.profiles import RunProfile
from store.keys import profile_pointer_key
from store.promotion import compare_with_promoted, read_pointer

LOSS_KEYS = ("final_loss", "val_bpb", "min_val_bpb", "val_loss")


def finite_loss_result(meta: dict, partition: str | None = None) -> dg.AssetCheckResult:
    values = {k: md.number(meta, k) for k in LOSS_KEYS if md.number(meta, k) is not None}  # text or float
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    return dg.AssetCheckResult(passed=not bad, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"checked": ", ".join(values) or "none reported", "partition": str(partition),
                                         "non_finite": ", ".join(f"{k}={v}" for k, v in bad.items()) or "none"})


def finite_loss_check(asset: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name="finite_loss", blocking=True,
                    description=f"{asset}'s reported losses and bpb are finite numbers (no NaN or inf)")
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        return finite_loss_result(upstream_metadata(context, asset), partition_of(context))
    return _check


base_checkpoint_finite_loss = finite_loss_check("base_checkpoint")
mid_checkpoint_finite_loss = finite_loss_check("mid_checkpoint")
sft_checkpoint_finite_loss = finite_loss_check("sft_checkpoint")


def regression_result(score, label, promoted: dict | None, tolerance: float, what: str,
                      partition: str | None = None) -> dg.AssetCheckResult:
    """Compare a new score with the promoted model's score of the same label (store.promotion owns the rule)."""
    verdict = compare_with_promoted(score, label, promoted, tolerance, what)
    severity = dg.AssetCheckSeverity.WARN if verdict.pop("severity") == "warn" else dg.AssetCheckSeverity.ERROR
    passed = verdict.pop("passed")
    meta = {"score": score, "label": label, "tolerance": tolerance, "partition": str(partition), **verdict}
    return dg.AssetCheckResult(passed=passed, severity=severity, metadata=meta)


def promoted_for(profile: RunProfile, artifacts: ArtifactStore) -> dict | None:
    return read_pointer(artifacts, profile_pointer_key(profile.name.value, profile.model_tag))


@dg.asset_check(asset="base_eval", blocking=True,
                description="CORE is not below the promoted model's CORE (same profile, size and task coverage) "
                            "by more than promotion_tolerance")
def core_not_regressed(context: dg.AssetCheckExecutionContext, profile: RunProfile,
                       artifacts: ArtifactStore) -> dg.AssetCheckResult:
    profile = run_profile(context, profile)
    meta = upstream_metadata(context, "base_eval")
    return regression_result(meta.get("core"), meta.get("core_label"), promoted_for(profile, artifacts),
                             profile.settings()["promotion_tolerance"], "core", profile.name.value)


@dg.asset_check(asset="chat_eval", blocking=True,
                description="The SFT model's ChatCORE is not below the promoted model's (same profile, size and "
                            "task coverage) by more than promotion_tolerance")
def chatcore_not_regressed(context: dg.AssetCheckExecutionContext, profile: RunProfile,
                           artifacts: ArtifactStore) -> dg.AssetCheckResult:
    profile = run_profile(context, profile)
    meta = upstream_metadata(context, "chat_eval")
    return regression_result(meta.get("chatcore"), meta.get("chatcore_label"), promoted_for(profile, artifacts),
                             profile.settings()["promotion_tolerance"], "chatcore", profile.name.value)
