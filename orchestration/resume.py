"""
Resume points: a training stage that dies (a preempted node, an evicted pod, a killed run worker) continues from
its newest published step instead of step 0.

While the entry point trains, a watcher thread notices each newly completed save in the run directory (the model
file is written last, after every rank's optimizer shard: see nanochat/checkpoint_manager.py) and publishes it,
optimizer shards and loader state included, to the artifact store under

    resume/<profile>/<stage>/<fingerprint>/step_<step:06d>/   (store/keys.py builds and parses it)

The key holds no run id: a retried step, a run re-executed from failure, or a new run on another machine against
the same store all find it. The fingerprint is the sha256 of the stage's inputs (their sha256s), the entry point,
its arguments and the world size, so changed inputs or config start fresh instead of loading optimizer state that
belongs to another run. Only the newest published step is kept; when the stage completes, its resume points are
deleted unless the profile keeps them (keep_resume_points).

With core_every, base_train scores CORE at those steps and writes the score into the step's meta; publishing the
step records it in the eval history with its step and tokens seen (`nanochat-evals history --by-step`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.checkpoint_manager import find_last_complete_step, missing_files, read_meta, step_files, step_of
from orchestration.workspace import fetch_into, publish_checkpoint
from store import eval_store
from store.artifact_store import MANIFEST_NAME, ArtifactInfo, ArtifactIntegrityError, ArtifactStore
from store.keys import resume_prefix, resume_step_key, resume_step_under

# Flags that change when or what is saved, logged or scored, never the weights: a resume across them is exact.
_NEUTRAL_FLAGS = ("--run", "--save-every", "--resume", "--resume-from-step", "--log-every", "--sample-every",
                  "--core-metric-every", "--core-metric-max-per-task")
# How often the watcher looks for a new save ($NANOCHAT_RESUME_POLL_S): a save every few minutes at d20 scale.
DEFAULT_POLL_S = 10.0


def stage_args(stage: str, settings: dict) -> list[str]:
    """The entry point's save (and, for base, CORE) flags for a profile's save_every / core_every."""
    args = [f"--save-every={settings['save_every'] or -1}"]
    if stage == "base" and settings["core_every"]:
        args += [f"--core-metric-every={settings['core_every']}",
                 f"--core-metric-max-per-task={settings['core_max_per_task']}"]
    return args


def fingerprint(module: str, args: list[str], inputs: dict[str, str], world_size: int) -> str:
    """sha256 of what determines the trained weights: inputs' sha256s, entry point, arguments, world size."""
    kept = sorted(a for a in args if a.split("=", 1)[0] not in _NEUTRAL_FLAGS)
    blob = json.dumps({"module": module, "args": kept, "inputs": dict(sorted(inputs.items())),
                       "world_size": world_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class ResumePoints:
    """The resume points of one stage's lineage in the store, and the run directory its entry point saves to."""

    store: ArtifactStore
    prefix: str
    checkpoint_dir: Path
    world_size: int
    tokenizer: dict  # the record each published step's meta carries (nanochat.checkpoint_manager.tokenizer_record)
    restored: int = -1  # the step restore() fetched (-1: none)

    def published_steps(self) -> list[int]:
        """Steps published completely (a directory exists once its manifest, written last, does), newest first."""
        keys = self.store.list_keys(self.prefix)
        steps = {resume_step_under(self.prefix, k) for k in keys if k.endswith("/" + MANIFEST_NAME)}
        return sorted((s for s in steps if s is not None), reverse=True)

    def restore(self, log) -> tuple[int, dict] | None:
        """Fetch the newest complete published step into checkpoint_dir: (step, its meta), or None (start fresh)."""
        for step in self.published_steps():
            try:
                fetch_into(self.store, resume_step_key(self.prefix, step), self.checkpoint_dir)
            except ArtifactIntegrityError as e:  # a damaged object: an older point is still exact
                log.warning(f"resume point step {step} is damaged, trying an older one: {e}")
                continue
            missing = missing_files(self.checkpoint_dir, step, self.world_size)
            if missing:  # not loadable by this job: leave nothing of it where the entry point saves
                log.warning(f"resume point step {step} lacks {', '.join(p.name for p in missing)}; trying an older one")
                shutil.rmtree(self.checkpoint_dir)
                continue
            self.restored = step
            return step, read_meta(self.checkpoint_dir, step)
        return None

    def publish(self, step: int, staging: Path) -> ArtifactInfo:
        """
        Publish a saved step with its optimizer shards, then drop the older points, in the store and in the run
        directory (the newest is enough; at d20 every save is ~4.7 GB, and a run saves ~40 times).
        """
        info = publish_checkpoint(self.store, self.checkpoint_dir, step, resume_step_key(self.prefix, step), staging,
                                  self.tokenizer, include_optimizer=True)
        for older in self.published_steps():
            if older < step:
                self.store.delete_prefix(resume_step_key(self.prefix, older))
        for path in self.checkpoint_dir.glob("model_*.pt"):
            older = step_of(path.name)
            if older is not None and older < step:
                for name in step_files(self.checkpoint_dir, older, include_optimizer=True):  # the model file first
                    (self.checkpoint_dir / name).unlink(missing_ok=True)
        return info



def points_for(context, store: ArtifactStore, profile, stage: str, module: str, args: list[str],
               inputs: dict[str, str], world_size: int, checkpoint_dir: Path, tokenizer: dict) -> ResumePoints:
    """The resume points of a stage in this run's partition (its profile), for these inputs and this command."""
    partition = context.partition_key if context.has_partition_key else profile.name.value
    # The asset's code_version too: bumping it is how a change to the training code says "do not resume".
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    lineage = fingerprint(module, args, {**inputs, "code_version": code_version}, world_size)
    return ResumePoints(store, resume_prefix(partition, stage, lineage), checkpoint_dir, world_size, tokenizer)


def clear(points: ResumePoints, log) -> int:
    """Delete every resume point of this lineage (the stage completed); the number of objects deleted."""
    deleted = points.store.delete_prefix(points.prefix) if points.store.list_keys(points.prefix) else 0
    if deleted:
        log.info(f"deleted the resume points under {points.prefix} ({deleted} objects): the stage completed")
    return deleted


def resume_args(points: ResumePoints, log) -> list[str]:
    """`--resume-from-step=N` when a resume point exists (logging "resuming from step N of M"), else nothing."""
    found = points.restore(log)
    if found is None:
        log.info(f"no resume point under {points.prefix}: training from step 0")
        return []
    step, meta = found
    total = meta.get("num_iterations")
    if not total and meta.get("progress"):  # mid-training sized by its epoch: estimate from progress
        total = f"~{round(step / meta['progress'])}"
    log.info(f"resuming from step {step} of {total or '?'} ({points.store.uri(resume_step_key(points.prefix, step))})")
    return [f"--resume-from-step={step}"]


@dataclass
class Watcher:
    """A thread that publishes each newly completed, non-final save of the run while the entry point trains."""

    points: ResumePoints
    staging: Path
    log: object
    on_published: Callable[[int, ArtifactInfo, dict], None] | None = None
    last: int = -1  # the newest step published (or restored)
    poll_s: float = field(default_factory=lambda: float(os.environ.get("NANOCHAT_RESUME_POLL_S", DEFAULT_POLL_S)))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="resume-publisher", daemon=True)
        self._thread.start()

    def stop(self, flush: bool) -> None:
        """Stop watching; with flush (the stage failed), publish a newer save the last poll has not seen yet."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if flush:
            self.publish_new()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.publish_new()

    def publish_new(self) -> None:
        try:
            step = find_last_complete_step(self.points.checkpoint_dir, self.points.world_size)
        except FileNotFoundError:  # nothing saved yet
            return
        if step <= self.last:
            return
        try:
            meta = read_meta(self.points.checkpoint_dir, step)
            if meta.get("final"):  # the stage publishes its final step itself, as the asset's checkpoint
                return
            t0 = time.monotonic()
            info = self.points.publish(step, self.staging)
            self.last = step
            self.log.info(f"published resume point step {step}: {info.size / 1e6:.1f} MB in "
                          f"{time.monotonic() - t0:.1f} s ({info.uri})")
            if self.on_published is not None:
                self.on_published(step, info, meta)
        except Exception as e:  # a store outage must not stop training: the next poll tries again
            self.log.warning(f"could not publish resume point step {step} (retrying at the next poll): "
                             f"{type(e).__name__}: {e}")


@contextmanager
def publishing(points: ResumePoints, staging: Path, log,
               on_published: Callable[[int, ArtifactInfo, dict], None] | None = None) -> Iterator[Watcher]:
    """Publish resume points while the body (the launcher) runs; on failure, publish what the last poll missed."""
    watcher = Watcher(points, staging, log, on_published, last=points.restored)
    watcher.start()
    ok = False
    try:
        yield watcher
        ok = True
    finally:
        watcher.stop(flush=not ok)


def core_recorder(record: Callable[[dict, dict], int],
                  total_batch_size: int) -> Callable[[int, ArtifactInfo, dict], None]:
    """
    on_published for base training: a step scored with CORE (meta "core") goes to the eval history through
    `record(checkpoint, scores)` (EvalHistory.record), the resume point's sha256 as the checkpoint's id.
    """
    def on_published(step: int, info: ArtifactInfo, meta: dict) -> None:
        core = meta.get("core")
        if not core or core.get("core") is None:
            return
        scores = {eval_store.AGGREGATE_TASK: {core["core_label"]: float(core["core"])}}
        scores.update({label: {"accuracy": float(t["accuracy"]), "centered": float(t["centered"])}
                       for label, t in (core.get("tasks") or {}).items()})
        record({"sha256": info.sha256, "uri": info.uri, "step": step, "tokens_seen": step * total_batch_size}, scores)
    return on_published
