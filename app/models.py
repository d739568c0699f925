"""
Which model the app serves: load one of the candidates store/catalog.py lists (model and tokenizer once, shared by
every user), switch to another without a restart, and notice when the pipeline promotes a new one.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from nanochat.checkpoint_manager import (
    CheckpointError,
)
from nanochat.safe_io import clip, is_panic
from store.artifact_store import ArtifactStore
from store.catalog import Candidate, Loaded, discover, load_candidate
from store.promotion import LATEST_KEY, read_pointer

log = logging.getLogger("app")


def is_failure(e: BaseException) -> bool:
    """An error one bad artifact can cause: any Exception, or a Rust panic from tiktoken/tokenizers (a
    BaseException). KeyboardInterrupt and SystemExit are not: they still stop the app."""
    return isinstance(e, Exception) or is_panic(e)


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
                loaded = load_candidate(self.store, candidate, self.device, self.dtype)
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

