"""
Promote an imported checkpoint: the same regression gate as a trained model (store.promotion.compare_with_promoted),
then the same promotion pointer (store/promotion.py) the app follows.

The gate compares with the promoted import of the same size (profile "imported"). A regression is only a
warning here: an import is another lineage, not a retrain, and the user asked for this model by name. What
does block is upstream of this module: an import that failed verification never reaches the store.
"""

from __future__ import annotations

from collections.abc import Callable

from importer.cli import PROFILE
from store.artifact_store import ArtifactStore
from store.home import git_sha
from store.keys import profile_pointer_key
from store.promotion import build_pointer, compare_with_promoted, read_pointer, write_pointer


def promote(store: ArtifactStore, result: dict, phase: str, tag: str, depth: int,
            log: Callable[[str], None]) -> dict:
    what = "core" if phase == "base" else "chatcore"
    scores = result.get("scores") or {}
    promoted = read_pointer(store, profile_pointer_key(PROFILE, tag))
    verdict = compare_with_promoted(scores.get(what), scores.get(f"{what}_label"), promoted, 0.0, what)
    gate = {"passed": bool(verdict["passed"]), "reason": verdict.get("reason")}
    if not gate["passed"]:
        log(f"warning: promotion gate: {gate['reason'] or f'{what} is below the promoted import'} (an import is a "
            "different lineage: promoting anyway)")
    checkpoint = {"key": result["checkpoint_key"], "uri": result["checkpoint_uri"], "sha256": result["sha256"]}
    tokenizer = {"key": result["tokenizer_key"], "uri": store.uri(result["tokenizer_key"]),
                 "sha256": result["tokenizer_sha256"]}
    pointer = build_pointer(PROFILE, depth, checkpoint, phase, result["step"], tag, tokenizer, scores,
                            source=result["source"], revision=result["revision"], git_sha=git_sha())
    uris = write_pointer(store, pointer)
    log(f"promoted: {uris['latest']}")
    return {"gate": gate, **uris}
