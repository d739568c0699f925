"""
Artifact keys: how every published artifact is named in the artifact store. This module is the only place that
builds or parses them (the assets, the promotion pointer, the resume points and the chat app all call it).

    raw_shards/<profile>/<run id>                          the corpus as parquet shards (a directory artifact)
    tokenizer/<profile>/<run id>                           tokenizer.pkl + token_bytes.pt
    <stage>_checkpoint/<profile>/<model tag>/<run id>      model_<step>.pt + meta_<step>.json (base, mid, sft)
    <checkpoint key>/evals/<name>.json                     eval results, beside the checkpoint they score
    report/<profile>/<model tag>/<run id>/report.md        the report card
    promoted/latest.json                                   the latest promotion, whatever its profile
    promoted/<profile>/<model tag>/latest.json             the latest promotion of one profile and size
    promoted/history/<utc stamp>_<sha12>.json              every promotion, never overwritten
    resume/<profile>/<stage>/<fingerprint>/step_<n:06d>   a saved step a re-run can resume from

<profile> is the Dagster partition the artifact was made in, so two profiles never share a key. Imports nothing
from Dagster: the app parses keys without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STAGES = ("base", "mid", "sft")
LATEST_KEY = "promoted/latest.json"
HISTORY_PREFIX = "promoted/history"
RESUME_PREFIX = "resume"
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")
_STEP = re.compile(r"step_(\d+)")


def _part(value: str, what: str) -> str:
    """One path component of a key: no slashes, no '..', nothing a listing could confuse with another key."""
    value = str(value)
    if not _PART.fullmatch(value):
        raise ValueError(f"{what} {value!r} cannot be part of an artifact key (letters, digits, '.', '_', '=', '-'; "
                         "not starting with a dot)")
    return value


def _stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    return stage


def shards_key(profile: str, run_id: str) -> str:
    return f"raw_shards/{_part(profile, 'profile')}/{_part(run_id, 'run id')}"


def tokenizer_key(profile: str, run_id: str) -> str:
    return f"tokenizer/{_part(profile, 'profile')}/{_part(run_id, 'run id')}"


def checkpoints_prefix(stage: str) -> str:
    """Where a stage's published checkpoints are listed from."""
    return f"{_stage(stage)}_checkpoint"


@dataclass(frozen=True)
class CheckpointKey:
    stage: str
    profile: str
    model_tag: str
    run_id: str

    def __str__(self) -> str:
        return checkpoint_key(self.stage, self.profile, self.model_tag, self.run_id)


def checkpoint_key(stage: str, profile: str, model_tag: str, run_id: str) -> str:
    return (f"{checkpoints_prefix(stage)}/{_part(profile, 'profile')}/{_part(model_tag, 'model tag')}/"
            f"{_part(run_id, 'run id')}")


def parse_checkpoint_key(key: str) -> CheckpointKey:
    """The parts of a published checkpoint's key; ValueError when key is not one."""
    parts = key.strip("/").split("/")
    if len(parts) != 4 or not parts[0].endswith("_checkpoint"):
        raise ValueError(f"{key!r} is not a checkpoint key (<stage>_checkpoint/<profile>/<model tag>/<run id>)")
    parsed = CheckpointKey(parts[0].removesuffix("_checkpoint"), *parts[1:])
    if str(parsed) != key.strip("/"):
        raise ValueError(f"{key!r} is not a checkpoint key (<stage>_checkpoint/<profile>/<model tag>/<run id>)")
    return parsed


def eval_results_key(checkpoint: str, name: str) -> str:
    parse_checkpoint_key(checkpoint)
    return f"{checkpoint.strip('/')}/evals/{_part(name, 'eval name')}.json"


def report_key(profile: str, model_tag: str, run_id: str) -> str:
    return f"report/{_part(profile, 'profile')}/{_part(model_tag, 'model tag')}/{_part(run_id, 'run id')}/report.md"


def profile_pointer_key(profile: str, model_tag: str) -> str:
    return f"promoted/{_part(profile, 'profile')}/{_part(model_tag, 'model tag')}/latest.json"


def history_key(stamp: str, sha256: str) -> str:
    """A promotion's history entry: names start with the UTC stamp, so a listing sorts oldest first."""
    return f"{HISTORY_PREFIX}/{_part(stamp, 'stamp')}_{_part(sha256[:12], 'sha256')}.json"


def resume_prefix(profile: str, stage: str, fingerprint: str) -> str:
    """Where one lineage's saved steps live: same profile, stage and inputs+config fingerprint."""
    return f"{RESUME_PREFIX}/{_part(profile, 'profile')}/{_stage(stage)}/{_part(fingerprint, 'fingerprint')}"


def resume_key(profile: str, stage: str, fingerprint: str, step: int) -> str:
    return resume_step_key(resume_prefix(profile, stage, fingerprint), step)


def resume_step_key(prefix: str, step: int) -> str:
    """One saved step under a lineage's resume_prefix."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{prefix}/step_{int(step):06d}"


def resume_step_under(prefix: str, key: str) -> int | None:
    """The step of a key `<prefix>/step_<n>/...` (prefix: a resume_prefix); None for any other key."""
    rest = key.removeprefix(prefix + "/")
    m = _STEP.fullmatch(rest.split("/", 1)[0]) if rest != key else None
    return int(m.group(1)) if m else None


def parse_resume_step(key: str) -> int:
    """The step of a resume key (or of any key inside one); ValueError when key is not under resume/."""
    parts = key.strip("/").split("/")
    if len(parts) < 5 or parts[0] != RESUME_PREFIX or not (m := _STEP.fullmatch(parts[4])):
        raise ValueError(f"{key!r} is not a resume key (resume/<profile>/<stage>/<fingerprint>/step_<n>)")
    return int(m.group(1))
