"""
What the artifact store holds that a model server could serve: the promoted model, earlier promotions and every
published checkpoint, each a Candidate with its stage, step, date and scores (from the DuckDB eval history, else
from its promotion pointer). Dagster-free; the chat app's model picker is this list, in this order:

1. a checkpoint directory named on the command line (a nanochat dir of model_<step>.pt + meta);
2. the promoted model: the pointer promoted/latest.json written by the Dagster `promoted_model` asset;
3. earlier promotions (promoted/history/*.json), newest first;
4. every other published checkpoint (sft_checkpoint/, mid_checkpoint/, base_checkpoint/), newest first.

Nothing here raises for one bad artifact: what cannot be read becomes a note (a string) beside the list.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nanochat.checkpoint_manager import (
    CheckpointError,
    build_model,
    find_last_step,
    model_path,
    read_meta,
    recorded_tokenizer,
    source_of,
    step_of,
)
from nanochat.common import serving_dtype
from nanochat.engine import Engine
from nanochat.safe_io import clip
from nanochat.tokenizer import load_tokenizer
from store import eval_queries, keys
from store.artifact_store import MANIFEST_NAME, ArtifactStore
from store.promotion import LATEST_KEY, STAMP_FORMAT, check_pointer, read_pointer

# Every time shown to a user (the app's picker, Scores axis and table) is in this one 24-hour format, in UTC: the
# pipeline records naive UTC times, and a server's users may sit in any time zone.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
MAX_HISTORY = 50  # promotions listed in the picker, newest first
# How the picker tells the served promotion from earlier ones (a history entry is never the current one: the
# first mention of a checkpoint wins, and the promoted one comes before the history).
SOURCE_MARKS = {"promoted": "★ promoted · ", "history": "↩ earlier promotion · "}
log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A checkpoint the app can serve: in the artifact store (checkpoint_key) or on local disk (checkpoint_dir)."""

    id: str  # the store key of the checkpoint directory, or "dir:<path>" for a local one
    stage: str
    step: int | None
    source: str  # "command line", "promoted", "history" or "store"
    checkpoint_key: str | None = None
    tokenizer_key: str | None = None
    checkpoint_dir: Path | None = None
    tokenizer_dir: Path | None = None
    uri: str | None = None
    sha256: str | None = None  # the artifact's manifest sha256: the checkpoint_id in the eval history
    profile: str | None = None
    model_tag: str | None = None
    date: datetime | None = None  # when it was promoted (or created)
    scores: dict[str, float] = field(default_factory=dict)  # e.g. {"CORE": 0.21, "ChatCORE[5/6]": 0.3}
    origin: str | None = None  # an imported checkpoint's source (hf:OWNER/REPO, s3://..., a path)
    error: str | None = None  # why it could not be loaded the last time it was tried (shown in the picker)

    def label(self) -> str:
        where = " ".join(x for x in (self.profile, self.model_tag) if x) or self.source
        parts = [f"{SOURCE_MARKS.get(self.source, '')}{self.stage} {where}",
                 f"step {self.step}" if self.step is not None else "step ?"]
        if self.date:
            parts.append(f"{self.date.strftime(TIME_FORMAT)} UTC")
        parts += [f"{name} {value:.4f}" for name, value in self.scores.items()]
        if self.source == "command line":
            parts.append(str(self.checkpoint_dir))
        if self.origin:
            parts.append(f"from {self.origin}")
        if self.error:
            parts.append(f"⚠ unavailable: {clip(self.error, 400)}")
        return " · ".join(parts)


def _parse_stamp(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.strptime(str(value), STAMP_FORMAT)
    except ValueError:
        return None


def _pointer_scores(scores: dict) -> dict[str, float]:
    out = {}
    for name, label in (("core", "CORE"), ("chatcore", "ChatCORE")):
        custom = scores.get(f"{name}_label")
        if isinstance(scores.get(name), (int, float)):
            out[custom[:40] if isinstance(custom, str) and custom else label] = float(scores[name])
    return out


def from_pointer(store: ArtifactStore, pointer: dict, source: str, where: str = "the promotion pointer") -> Candidate:
    pointer = check_pointer(pointer, where)
    ck = pointer["checkpoint"]
    return Candidate(
        id=ck["key"], stage=ck.get("stage") or "sft", step=ck.get("step"), source=source, checkpoint_key=ck["key"],
        tokenizer_key=pointer["tokenizer"]["key"], uri=ck.get("uri") or store.uri(ck["key"]), sha256=ck.get("sha256"),
        profile=pointer.get("profile"), model_tag=ck.get("model_tag"), date=_parse_stamp(pointer.get("promoted_at")),
        scores=_pointer_scores(pointer.get("scores") or {}), origin=pointer.get("source"),
    )


def local_candidate(checkpoint_dir: str | Path, tokenizer_dir: str | Path | None = None,
                    step: int | None = None) -> Candidate:
    """A checkpoint dir from the command line. Its tokenizer: --tokenizer-dir, else the base dir's tokenizer/ that
    the standard layout <base>/<phase dir>/<tag>/ implies."""
    checkpoint_dir = Path(checkpoint_dir).expanduser().resolve()
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint_dir} is not a directory")
    step = find_last_step(checkpoint_dir) if step is None else step
    if tokenizer_dir is None:
        tokenizer_dir = checkpoint_dir.parent.parent / "tokenizer"
    stage = source_of(checkpoint_dir) or "checkpoint"
    return Candidate(id=f"dir:{checkpoint_dir}", stage=stage, step=step, source="command line",
                     checkpoint_dir=checkpoint_dir, tokenizer_dir=Path(tokenizer_dir).expanduser().resolve(),
                     model_tag=checkpoint_dir.name, uri=checkpoint_dir.as_uri())


def read_eval_index(db_path: str | Path | None) -> tuple[dict[str, dict], str | None]:
    """{checkpoint_id and uri: a checkpoint of eval_queries.checkpoint_scores} from the eval history, and a note
    when it could not be read."""
    if not db_path or not Path(db_path).exists():
        return {}, None
    try:
        checkpoints = eval_queries.read_history(db_path, eval_queries.checkpoint_scores, retries=2)
    except eval_queries.HistoryUnavailable as e:
        return {}, f"{e}: scores not shown" + ("; refresh the list to retry" if e.busy else "")
    return {key: c for c in checkpoints for key in (c["checkpoint_id"], c["uri"])}, None


def discover(store: ArtifactStore | None, db_path: str | Path | None = None,
             local: Candidate | None = None) -> tuple[list[Candidate], dict | None, list[str]]:
    """(candidates in picker order, the promotion pointer or None, notes about what could not be read)."""
    notes: list[str] = []
    candidates: list[Candidate] = [local] if local else []
    pointer = None
    if store is not None:
        try:
            pointer = read_pointer(store, LATEST_KEY)
            if pointer is not None:
                candidates.append(from_pointer(store, pointer, "promoted", store.uri(LATEST_KEY)))
        except Exception as e:  # unreachable S3, a malformed pointer: the app still serves what it can
            pointer = None
            notes.append(f"cannot read the promotion pointer {store.uri(LATEST_KEY)}: {clip(str(e), 500)}")
        candidates += _history(store, notes)
        candidates += _published(store, notes)
    index, note = read_eval_index(db_path)
    if note:
        notes.append(note)
    seen: set[str] = set()
    unique = []
    for c in candidates:  # the first mention wins: command line, then promoted, then history, then the store
        if c.id in seen:
            continue
        seen.add(c.id)
        entry = index.get(c.sha256 or "") or index.get(c.uri or "")
        if entry:
            c.sha256 = c.sha256 or entry["checkpoint_id"]
            c.step = c.step if c.step is not None else entry["step"]
            c.date = c.date or entry["created_at"]
            c.scores = entry["scores"] or c.scores
        unique.append(c)
    head = [c for c in unique if c.source in ("command line", "promoted")]
    rest = sorted((c for c in unique if c.source not in ("command line", "promoted")),
                  key=lambda c: (c.date or datetime.min, c.id), reverse=True)
    return head + rest, pointer, notes


def _history(store: ArtifactStore, notes: list[str]) -> list[Candidate]:
    out = []
    try:
        listed = [k for k in store.list_keys(keys.HISTORY_PREFIX) if k.endswith(".json")]
    except Exception as e:
        notes.append(f"cannot read the promotion history: {clip(str(e), 300)}")
        return out
    for key in sorted(listed, reverse=True)[:MAX_HISTORY]:  # names start with the UTC time: newest first
        try:  # one bad entry hides only itself
            out.append(from_pointer(store, store.read_json(key), "history", store.uri(key)))
        except Exception as e:
            notes.append(f"skipped promotion history entry {store.uri(key)}: {clip(str(e), 300)}")
    return out


def _published(store: ArtifactStore, notes: list[str]) -> list[Candidate]:
    out = []
    for stage in keys.STAGES:
        try:
            listed = store.list_keys(keys.checkpoints_prefix(stage))
        except Exception as e:
            notes.append(f"cannot list {stage} checkpoints: {e}")
            continue
        for key in (k for k in listed if k.endswith(f"/{MANIFEST_NAME}")):
            prefix = key[: -len(MANIFEST_NAME) - 1]
            try:
                ck = keys.parse_checkpoint_key(prefix)
            except ValueError:  # not in the layout store/keys.py writes: nothing the pipeline published
                continue
            out.append(Candidate(id=prefix, stage=stage, step=_manifest_step(store, key), source="store",
                                 checkpoint_key=prefix, uri=store.uri(prefix), profile=ck.profile,
                                 model_tag=ck.model_tag,
                                 origin=_import_origin(store, prefix) if ck.profile == "imported" else None))
    return out


def _import_origin(store: ArtifactStore, prefix: str) -> str | None:
    """Where an imported checkpoint came from (its import.json, written by importer/cli.py)."""
    try:
        return store.read_json(f"{prefix}/import.json").get("source")
    except Exception:
        return None


def _manifest_step(store: ArtifactStore, manifest_key: str) -> int | None:
    """The step of a published checkpoint, from the model_<step>.pt its manifest lists."""
    try:
        files = store.read_json(manifest_key)["files"]
        steps = [step for f in files if (step := step_of(f["path"])) is not None]
    except Exception:
        return None
    return max(steps, default=None)


# -----------------------------------------------------------------------------
# Loading one (the app, importer.bench)


@dataclass
class Loaded:
    """The model being served. Replaced as a whole on a switch; replies in flight keep the one they started with."""

    candidate: Candidate
    model: Any
    tokenizer: Any
    engine: Engine
    meta: dict
    step: int
    sha256: str | None
    device: str
    load_seconds: float


def tokenizer_key_for(candidate: Candidate, meta: dict) -> str:
    """A published checkpoint's tokenizer: its pointer's, else the one its meta records (build_model refuses any but the
    recorded one). Published before checkpoints recorded it and never promoted: refused, nothing says which."""
    recorded = recorded_tokenizer(meta, candidate.id)
    if candidate.tokenizer_key or recorded:
        return candidate.tokenizer_key or recorded["key"]
    raise CheckpointError(f"{candidate.id} does not record its tokenizer (published before checkpoints did): "
                          "re-publish it (materialize its stage again, or nanochat-import it), or serve it with "
                          "--checkpoint and --tokenizer-dir")


def load_candidate(store: ArtifactStore | None, candidate: Candidate, device: str, dtype: str = "auto") -> Loaded:
    """Download (into the sha-keyed cache) and build the model and tokenizer of a candidate."""
    started = time.perf_counter()
    sha256 = candidate.sha256
    if candidate.checkpoint_dir is not None:
        checkpoint_dir = candidate.checkpoint_dir
    else:
        if store is None:
            raise CheckpointError(f"{candidate.id} is in an artifact store, but the app has none configured")
        checkpoint_dir = store.get_dir(candidate.checkpoint_key)
        # The cached copy holds the manifest it was verified against: its sha256 is the checkpoint's identity.
        actual = hashlib.sha256((checkpoint_dir / MANIFEST_NAME).read_bytes()).hexdigest()
        if sha256 and actual != sha256:
            log.warning("%s was republished: the pointer names sha256 %s, the store holds %s", candidate.id,
                        sha256[:12], actual[:12])
        sha256 = actual
    step = candidate.step
    if step is None or not model_path(checkpoint_dir, step).is_file():
        step = find_last_step(checkpoint_dir)
    key = None if candidate.checkpoint_dir else tokenizer_key_for(candidate, read_meta(checkpoint_dir, step))
    tokenizer_dir = Path(store.get_dir(key) if key else candidate.tokenizer_dir)
    model, tokenizer, meta = build_model(checkpoint_dir, step, device, phase="eval", tokenizer=load_tokenizer(
        tokenizer_dir), tokenizer_source=key or str(tokenizer_dir))
    model.prepare_for_inference(serving_dtype(device, dtype))  # weights in the serving dtype, q/k/v fused
    return Loaded(candidate, model, tokenizer, Engine(model, tokenizer), meta, step, sha256, str(device),
                  time.perf_counter() - started)
