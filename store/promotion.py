"""
The promotion pointer: a small JSON document in the artifact store naming the model the chat app should serve.
Three copies are written (keys in store.keys): the global pointer (the latest promotion, whatever its
profile), the profile's pointer (one per profile partition and size: regression gates compare a new model with
it) and a history entry that is never overwritten.

Each write is atomic (the store publishes a JSON object in one step), the history entry is written first and
the global pointer last, so a reader never sees a pointer whose history is missing. The pointer only names
artifacts that are already published (checkpoint and tokenizer directories with their manifests).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from store.artifact_store import ArtifactStore, validate_key
from store.keys import LATEST_KEY, history_key, profile_pointer_key

POINTER_VERSION = 1
STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"  # promoted_at and the history entries' names: UTC, sorts as text


def build_pointer(profile: str, depth: int, checkpoint: dict[str, Any], stage: str, step: int, model_tag: str,
                  tokenizer: dict[str, Any], scores: dict[str, Any], **provenance: Any) -> dict[str, Any]:
    """
    A pointer to publish with write_pointer. checkpoint and tokenizer are artifact references ({key, uri, sha256}:
    extra fields are dropped); provenance is kept as given (dagster_run_id, git_sha, source, revision, ...).
    """
    def ref(artifact: dict[str, Any]) -> dict[str, Any]:
        return {k: artifact[k] for k in ("key", "uri", "sha256") if k in artifact}
    return {"profile": profile, "depth": int(depth),
            "checkpoint": {**ref(checkpoint), "stage": stage, "step": int(step), "model_tag": model_tag},
            "tokenizer": ref(tokenizer), "scores": dict(scores), **provenance}


def compare_with_promoted(score: float | None, label: str | None, promoted: dict[str, Any] | None,
                          tolerance: float, what: str) -> dict[str, Any]:
    """
    The promotion gate: is `score` (core or chatcore, with its coverage label) at least the promoted model's minus
    tolerance? Returns {passed, severity ("warn": not comparable, does not block; "error": a regression blocks),
    reason or the figures}. Only scores of the same label are compared: a CORE[18/22] is never held against a CORE.
    """
    if score is None or not math.isfinite(score):
        return {"passed": False, "severity": "warn", "reason": f"no {what} was computed (see the asset's skip note)"}
    if promoted is None:
        return {"passed": True, "severity": "error", "reason": "no promoted model yet: nothing to beat"}
    scores = promoted.get("scores") or {}
    if scores.get(f"{what}_label") != label or scores.get(what) is None:
        return {"passed": False, "severity": "warn", "promoted_label": str(scores.get(f"{what}_label")),
                "reason": f"the promoted model's {what} covers different tasks: not comparable"}
    floor = scores[what] - tolerance
    return {"passed": score >= floor, "severity": "error", "promoted": scores[what], "floor": floor,
            "promoted_checkpoint": promoted["checkpoint"]["sha256"]}


def read_pointer(store: ArtifactStore, key: str = LATEST_KEY) -> dict[str, Any] | None:
    """The pointer at key, or None when nothing was promoted there yet. A malformed pointer is a ValueError naming
    the file and the field, whatever the file holds (not JSON, a list, a checkpoint that is a string, ...)."""
    if not store.exists(key):
        return None
    where = store.uri(key)
    try:
        pointer = store.read_json(key)
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{where} is not a promotion pointer (not JSON: {e}); {_REWRITE}") from e
    problem = _pointer_problem(pointer)
    if problem:
        raise ValueError(f"{where} is not a promotion pointer ({problem}); {_REWRITE}")
    return pointer


_REWRITE = "re-materialize promoted_model to rewrite it"


def _pointer_problem(pointer: Any) -> str | None:
    if not isinstance(pointer, dict):
        return f"a JSON {type(pointer).__name__}, not an object"
    missing = [k for k in ("checkpoint", "tokenizer", "scores", "promoted_at") if k not in pointer]
    if missing:
        return f"missing {missing}"
    for part in ("checkpoint", "tokenizer"):
        ref = pointer[part]
        if not isinstance(ref, dict) or not isinstance(ref.get("key"), str):
            return f"{part!r} must be an object with a string 'key', got {_short(ref)}"
        try:
            validate_key(ref["key"])
        except ValueError as e:
            return f"{part}.key: {e}"
        if not isinstance(ref.get("sha256", ""), str):
            return f"{part}.sha256 must be a string, got {_short(ref['sha256'])}"
    if not isinstance(pointer["scores"], dict):
        return f"'scores' must be an object, got {_short(pointer['scores'])}"
    if not isinstance(pointer["promoted_at"], str):
        return f"'promoted_at' must be a string, got {_short(pointer['promoted_at'])}"
    return None


def check_pointer(pointer: Any, where: str) -> dict[str, Any]:
    """A pointer read some other way (a promotion history entry): the same checks as read_pointer."""
    problem = _pointer_problem(pointer)
    if problem:
        raise ValueError(f"{where} is not a promotion pointer ({problem}); {_REWRITE}")
    return pointer


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else f"a JSON {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def write_pointer(store: ArtifactStore, pointer: dict[str, Any]) -> dict[str, str]:
    """Publish a promotion: history entry, then the profile's pointer, then the global one. Returns their URIs."""
    for part in ("checkpoint", "tokenizer"):
        key = pointer[part]["key"]
        if not store.is_published(key):
            raise ValueError(f"cannot promote: the {part} artifact {store.uri(key)} is not (completely) published")
    stamp = datetime.now(timezone.utc).strftime(STAMP_FORMAT)
    pointer = {**pointer, "version": POINTER_VERSION, "promoted_at": pointer.get("promoted_at") or stamp}
    keys = {
        "history": history_key(stamp, pointer["checkpoint"]["sha256"]),
        "profile": profile_pointer_key(pointer["profile"], pointer["checkpoint"]["model_tag"]),
        "latest": LATEST_KEY,
    }
    for key in keys.values():
        store.write_json(key, pointer)
    return {name: store.uri(key) for name, key in keys.items()}
