"""
Which model the app serves: find the checkpoints it could serve, load one (model and tokenizer once, shared by
every user), switch to another without a restart, and notice when the pipeline promotes a new one.

The model picker lists, in this order:
1. a checkpoint directory named on the command line (--checkpoint: a nanochat dir of model_<step>.pt + meta);
2. the promoted model: the pointer promoted/latest.json written by the Dagster `promoted_model` asset;
3. earlier promotions (promoted/history/*.json);
4. every other published checkpoint in the artifact store (sft_checkpoint/, mid_checkpoint/, base_checkpoint/).
Scores and dates come from the DuckDB eval history (a short read-only connection), else from the pointer.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from nanochat.checkpoint_manager import CheckpointError, build_model, find_last_step, model_path, source_of, step_of
from nanochat.common import serving_dtype
from nanochat.engine import Engine
from nanochat.safe_io import clip, is_panic
from nanochat.tokenizer import load_tokenizer
from store import eval_queries, eval_store
from store.artifact_store import MANIFEST_NAME, ArtifactStore
from store.promotion import LATEST_KEY, check_pointer, read_pointer

log = logging.getLogger("app")

STAGES = ("sft", "mid", "base")  # published checkpoints live under <stage>_checkpoint/<profile>/<tag>/<run id>
HISTORY_PREFIX = "promoted/history"
MAX_HISTORY = 50  # promotions listed in the picker, newest first


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
    promoted: bool = False  # named by promoted/latest.json right now
    origin: str | None = None  # an imported checkpoint's source (hf:OWNER/REPO, s3://..., a path)
    error: str | None = None  # why it could not be loaded the last time it was tried (shown in the picker)

    def label(self) -> str:
        where = " ".join(x for x in (self.profile, self.model_tag) if x) or self.source
        parts = [f"{'★ ' if self.promoted else ''}{self.stage} {where}",
                 f"step {self.step}" if self.step is not None else "step ?"]
        if self.date:
            parts.append(self.date.strftime("%Y-%m-%d %H:%M"))
        parts += [f"{name} {value:.4f}" for name, value in self.scores.items()]
        if self.source == "command line":
            parts.append(str(self.checkpoint_dir))
        if self.origin:
            parts.append(f"from {self.origin}")
        if self.error:
            parts.append(f"⚠ unavailable: {clip(self.error, 400)}")
        return " · ".join(parts)


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


# -----------------------------------------------------------------------------
# Discovery


def _parse_stamp(value: Any) -> datetime | None:
    """promoted_at is written as 20250101T120000123456Z (UTC)."""
    if isinstance(value, datetime):
        return value
    try:
        return datetime.strptime(str(value), "%Y%m%dT%H%M%S%fZ")
    except ValueError:
        return None


def _pointer_scores(scores: dict) -> dict[str, float]:
    out = {}
    for name, label in (("core", "CORE"), ("chatcore", "ChatCORE")):
        custom = scores.get(f"{name}_label")
        if isinstance(scores.get(name), (int, float)):
            out[custom[:40] if isinstance(custom, str) and custom else label] = float(scores[name])
    return out


def is_failure(e: BaseException) -> bool:
    """An error one bad artifact can cause: any Exception, or a Rust panic from tiktoken/tokenizers (a
    BaseException). KeyboardInterrupt and SystemExit are not: they still stop the app."""
    return isinstance(e, Exception) or is_panic(e)


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
    """{checkpoint_id and uri: {"checkpoint_id", "step", "created_at", "scores"}} from the eval history, and a note
    when it could not be read. An SFT or mid checkpoint also shows the CORE of its run's base checkpoint (CORE is
    measured on base models; ChatCORE on chat models)."""
    if not db_path or not Path(db_path).exists():
        return {}, None
    try:
        with eval_store.connect_ro(db_path, retries=2, backoff=0.1) as conn:
            eval_store.check_schema(conn)
            checkpoints = eval_queries.checkpoint_scores(conn)
    except eval_store.DatabaseLockedError:
        return {}, "eval history busy (a writer holds it): scores not shown; refresh the list to retry"
    except (duckdb.Error, eval_store.SchemaVersionError, OSError) as e:
        return {}, f"eval history unreadable ({type(e).__name__}: {e}): scores not shown"
    index: dict[str, dict] = {}
    for c in checkpoints:
        entry = {k: c[k] for k in ("checkpoint_id", "step", "created_at", "scores")}
        index[c["checkpoint_id"]] = index[c["uri"]] = entry
    return index, None


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
                promoted = from_pointer(store, pointer, "promoted", store.uri(LATEST_KEY))
                promoted.promoted = True
                candidates.append(promoted)
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
        keys = [k for k in store.list_keys(HISTORY_PREFIX) if k.endswith(".json")]
    except Exception as e:
        notes.append(f"cannot read the promotion history: {clip(str(e), 300)}")
        return out
    for key in sorted(keys, reverse=True)[:MAX_HISTORY]:  # names start with the UTC time: newest first
        try:  # one bad entry hides only itself
            out.append(from_pointer(store, store.read_json(key), "history", store.uri(key)))
        except Exception as e:
            notes.append(f"skipped promotion history entry {store.uri(key)}: {clip(str(e), 300)}")
    return out


def _published(store: ArtifactStore, notes: list[str]) -> list[Candidate]:
    out = []
    for stage in STAGES:
        try:
            keys = store.list_keys(f"{stage}_checkpoint")
        except Exception as e:
            notes.append(f"cannot list {stage} checkpoints: {e}")
            continue
        for key in keys:
            if not key.endswith(f"/{MANIFEST_NAME}"):
                continue
            prefix = key[: -len(MANIFEST_NAME) - 1]
            parts = prefix.split("/")  # <stage>_checkpoint/<profile>/<tag>/<run id>
            out.append(Candidate(id=prefix, stage=stage, step=_manifest_step(store, key), source="store",
                                 checkpoint_key=prefix,
                                 uri=store.uri(prefix), profile=parts[1] if len(parts) > 1 else None,
                                 model_tag=parts[2] if len(parts) > 2 else None,
                                 origin=_import_origin(store, prefix) if parts[1:2] == ["imported"] else None))
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
# Loading


def guess_tokenizer_key(store: ArtifactStore, candidate: Candidate, known: list[Candidate]) -> str:
    """A published checkpoint does not name its tokenizer. Try the tokenizer of the same pipeline run, then the one
    a promotion of the same profile used, then the profile's only tokenizer (the vocab size is checked on load)."""
    parts = (candidate.checkpoint_key or "").split("/")
    if len(parts) >= 4 and store.is_published(f"tokenizer/{parts[1]}/{parts[3]}"):
        return f"tokenizer/{parts[1]}/{parts[3]}"
    for other in known:
        if other.tokenizer_key and other.profile == candidate.profile:
            return other.tokenizer_key
    published = sorted({k.rsplit("/", 1)[0] for k in store.list_keys(f"tokenizer/{candidate.profile}")
                        if k.endswith(f"/{MANIFEST_NAME}")})
    if len(published) == 1:
        return published[0]
    raise CheckpointError(f"cannot tell which tokenizer {candidate.checkpoint_key} was trained with "
                          f"({len(published)} tokenizers published for profile {candidate.profile!r}); promote it "
                          "through the pipeline, or download it and pass --checkpoint and --tokenizer-dir")


def load_candidate(store: ArtifactStore | None, candidate: Candidate, device: str,
                   known: list[Candidate] = (), dtype: str = "auto") -> Loaded:
    """Download (into the sha-keyed cache) and build the model and tokenizer of a candidate."""
    started = time.perf_counter()
    sha256 = candidate.sha256
    if candidate.checkpoint_dir is not None:
        checkpoint_dir, tokenizer_dir = candidate.checkpoint_dir, candidate.tokenizer_dir
    else:
        if store is None:
            raise CheckpointError(f"{candidate.id} is in an artifact store, but the app has none configured")
        checkpoint_dir = store.get_dir(candidate.checkpoint_key)
        tokenizer_key = candidate.tokenizer_key or guess_tokenizer_key(store, candidate, list(known))
        tokenizer_dir = store.get_dir(tokenizer_key)
        # The cached copy holds the manifest it was verified against: its sha256 is the checkpoint's identity.
        actual = hashlib.sha256((checkpoint_dir / MANIFEST_NAME).read_bytes()).hexdigest()
        if sha256 and actual != sha256:
            log.warning("%s was republished: the pointer names sha256 %s, the store holds %s", candidate.id,
                        sha256[:12], actual[:12])
        sha256 = actual
    step = candidate.step
    if step is None or not model_path(checkpoint_dir, step).is_file():
        step = find_last_step(checkpoint_dir)
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    model, tokenizer, meta = build_model(checkpoint_dir, step, device, phase="eval", tokenizer=tokenizer)
    model.prepare_for_inference(serving_dtype(device, dtype))  # weights in the serving dtype, q/k/v fused
    return Loaded(candidate, model, tokenizer, Engine(model, tokenizer), meta, step, sha256, str(device),
                  time.perf_counter() - started)


# -----------------------------------------------------------------------------
# The shared model


class ModelManager:
    """Holds the one model every chat uses, the picker's candidates, and what the promotion watcher has seen.

    step_lock is taken for each forward pass (see app.chat.stream_reply): chats share the model and take turns
    token by token. A switch loads the new model beside the old one, then swaps a single reference, so no reply is
    interrupted: replies in flight finish on the model they started with.
    """

    def __init__(self, store: ArtifactStore | None, db_path: str | Path | None, device: str,
                 local: Candidate | None = None, auto_reload: bool = False, dtype: str = "auto"):
        self.store, self.db_path, self.device, self.local = store, db_path, device, local
        self.dtype = dtype
        self.auto_reload = auto_reload
        self.step_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.current: Loaded | None = None
        self.candidates: list[Candidate] = []
        self.notes: list[str] = []
        self.pointer_seen: dict | None = None  # the promotion pointer as last read
        self.offer: Candidate | None = None  # promoted since we loaded, not loaded yet (without --auto-reload)
        self.last_reply: dict | None = None
        self._stop = threading.Event()

    def refresh(self) -> list[Candidate]:
        """Re-read what can be served. Never raises: what cannot be read becomes a note, and the list it had stays."""
        try:
            candidates, pointer, notes = discover(self.store, self.db_path, self.local)
        except BaseException as e:
            if not is_failure(e):
                raise
            log.error("refreshing the model list failed: %s", e)
            self.notes = [*self.notes, f"refreshing the model list failed: {clip(str(e), 300)}"][-20:]
            return self.candidates
        errors = {c.id: c.error for c in self.candidates if c.error}  # remembered until it loads
        for c in candidates:
            c.error = errors.get(c.id)
        self.candidates, self.notes = candidates, notes
        if pointer is not None:
            self.pointer_seen = pointer
        return candidates

    def find(self, candidate_id: str) -> Candidate:
        for c in self.candidates:
            if c.id == candidate_id:
                return c
        for c in self.refresh():
            if c.id == candidate_id:
                return c
        raise KeyError(f"no checkpoint {candidate_id!r} is known (refresh the model list)")

    def load(self, candidate_id: str) -> Loaded:
        with self._load_lock:
            candidate = self.find(candidate_id)
            current = self.current
            if current is not None and current.candidate.id == candidate_id and candidate.sha256 in (
                    None, current.sha256):
                return current  # already served (a republished key has a new sha256 and loads again)
            log.info("loading %s", candidate.label())
            try:
                loaded = load_candidate(self.store, candidate, self.device, self.candidates, self.dtype)
            except BaseException as e:
                if not is_failure(e):
                    raise
                candidate.error = f"{type(e).__name__}: {clip(str(e), 400)}"
                if isinstance(e, Exception):
                    raise
                raise CheckpointError(f"loading {candidate.id} failed: {candidate.error}") from None
            candidate.error = None
            self.current = loaded
            if self.offer is not None and self.offer.id == candidate_id:
                self.offer = None
            log.info("serving %s (step %d, loaded in %.1f s)", candidate.id, loaded.step, loaded.load_seconds)
            return loaded

    def load_default(self) -> Loaded | None:
        """The first candidate that loads: the command-line checkpoint, else the promoted model, else the newest
        published one. None (the app still starts, and says so) when there is nothing to serve."""
        if not self.candidates:
            self.refresh()
        for c in self.candidates:
            try:
                return self.load(c.id)
            except Exception as e:
                self.notes.append(f"could not load {c.id}: {clip(str(e), 300)}")
                log.error("could not load %s: %s", c.id, e)
                if c.source == "command line":
                    raise  # the user asked for exactly this one: do not silently serve another
        return None

    # -- the promotion watcher -------------------------------------------------------------------------------

    def check_promotion(self) -> Candidate | None:
        """Read the pointer; when it names a checkpoint other than the last one seen, load it (with --auto-reload,
        or when nothing is served yet) or offer it. Returns the newly promoted candidate, if any."""
        if self.store is None:
            return None
        pointer = read_pointer(self.store, LATEST_KEY)
        if pointer is None:
            return None
        previous, self.pointer_seen = self.pointer_seen, pointer
        same = previous is not None and (previous["checkpoint"]["key"], previous["checkpoint"].get("sha256")) == (
            pointer["checkpoint"]["key"], pointer["checkpoint"].get("sha256"))
        if same:
            return None
        self.refresh()
        new = self.find(pointer["checkpoint"]["key"])
        if self.current is not None and self.current.candidate.id == new.id and self.current.sha256 == (
                new.sha256 or self.current.sha256):
            return None
        log.info("a new model was promoted: %s", new.label())
        if self.auto_reload or self.current is None:  # nothing served yet: nobody to surprise
            self.load(new.id)
        else:
            self.offer = new
        return new

    def start_watcher(self, interval: float) -> threading.Thread:
        def watch() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check_promotion()
                except BaseException as e:  # a store hiccup or a bad artifact must not end the watcher
                    if not is_failure(e):
                        raise
                    log.warning("promotion check failed: %s", clip(str(e), 300))

        thread = threading.Thread(target=watch, name="promotion-watcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    # -- reporting -------------------------------------------------------------------------------------------

    def record_reply(self, num_tokens: int, seconds: float, candidate_id: str) -> None:
        self.last_reply = {"tokens": num_tokens, "seconds": round(seconds, 3),
                           "tok_per_sec": round(num_tokens / seconds, 1) if seconds > 0 else None,
                           "model": candidate_id}

    def health(self) -> dict[str, Any]:
        loaded = self.current
        pointer = self.pointer_seen
        return {
            "status": "ok" if loaded else "no model loaded",
            "model": loaded.candidate.label() if loaded else None,
            "checkpoint": None if loaded is None else {
                "id": loaded.candidate.id, "uri": loaded.candidate.uri, "sha256": loaded.sha256,
                "stage": loaded.candidate.stage, "step": loaded.step,
                "model_config": loaded.meta.get("model_config"),
            },
            "device": self.device,
            "last_reply_tok_per_sec": (self.last_reply or {}).get("tok_per_sec"),
            "last_reply": self.last_reply,
            "promoted_pointer_seen": None if pointer is None else {
                "key": pointer["checkpoint"]["key"], "sha256": pointer["checkpoint"].get("sha256"),
                "promoted_at": pointer.get("promoted_at"),
            },
            "new_model_offered": self.offer.id if self.offer else None,
            "notes": self.notes,
        }


def describe(loaded: Loaded | None) -> str:
    if loaded is None:
        return "no model loaded"
    config = loaded.model.config
    n = loaded.model.num_params()
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    dtype = str(loaded.model.lm_head.weight.dtype).removeprefix("torch.")  # the serving dtype replies run in
    return (f"{loaded.candidate.label()} · {config.n_layer} layers, {size} params, context {config.sequence_len}, "
            f"{dtype}")

