"""
Where a run's processes work, and how artifacts move between the artifact store and that place.

Every materialization gets its own directory under the workspace root (so concurrent runs never share files),
laid out as a nanochat base dir: base_data/, tokenizer/, base_checkpoints/<tag>/, ... Inputs are fetched
from the artifact store (through its sha-keyed cache) and outputs uploaded back; nothing else is shared.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from nanochat.checkpoint_manager import (
    PHASE_DIRS,
    atomic_json_save,
    meta_path,
    read_meta,
    step_files,
    tokenizer_record,
    with_tokenizer,
)
from nanochat.tokenizer import fingerprint, load_tokenizer
from orchestration.partitions import require_upstreams, upstream_metadata
from store.artifact_store import ArtifactStore, ArtifactStoreError
from store.home import workspace_dir


class Workspace(dg.ConfigurableResource):
    """Local scratch space for runs: $NANOCHAT_WORKSPACE, else $NANOCHAT_HOME/work (store/home.py)."""

    root: str = ""

    def run_dir(self, context: dg.AssetExecutionContext) -> Path:
        root = Path(self.root).resolve() if self.root else workspace_dir()
        path = root / context.run.run_id / context.asset_key.to_user_string().replace("/", "_")
        path.mkdir(parents=True, exist_ok=True)
        return path


def nanochat_env(run_dir: Path) -> dict[str, str]:
    """
    Environment for nanochat entry points working inside run_dir (<root>/<run id>/<asset>). Compile decisions and
    Inductor's cache are shared by every run under <root>/compile: a shape timed or compiled once is not again.
    """
    return {"NANOCHAT_BASE_DIR": str(run_dir), "NANOCHAT_DATA_DIR": str(run_dir / "base_data"),
            "NANOCHAT_COMPILE_DIR": str(run_dir.parent.parent / "compile")}


def fetch_into(store: ArtifactStore, key: str, dest: Path) -> Path:
    """Download a published directory (verified by sha256, via the cache) and place its files at dest."""
    cached = store.get_dir(key)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cached, dest, ignore=shutil.ignore_patterns("manifest.json"))
    return dest


def fetch_upstream(context, store: ArtifactStore, asset_key: str, dest: Path) -> dict:
    meta = upstream_metadata(context, asset_key)
    fetch_into(store, meta["key"], dest)
    return meta


def fetch_inputs(context, store: ArtifactStore, inputs: dict[str, str], run_dir: Path, model_tag: str) -> dict:
    """
    Fetch upstream artifacts into run_dir laid out as a nanochat base dir ({asset: directory}: checkpoints go
    under <phase dir>/<model tag>/, shards and the tokenizer directly under their directory). Returns
    {asset: its upstream metadata, from this run's partition}. A store fault retries the step; a missing upstream
    fails it before anything is fetched.
    """
    require_upstreams(context, list(inputs))
    fetched = {}
    for asset, where in inputs.items():
        dest = run_dir / where / model_tag if where in PHASE_DIRS.values() else run_dir / where
        with retry_on_store_faults():
            fetched[asset] = fetch_upstream(context, store, asset, dest)
    return fetched


def tokenizer_record_of(fetched: dict, tokenizer_dir: Path) -> dict:
    """The record a stage's checkpoints carry (nanochat.checkpoint_manager): the key its tokenizer was fetched from
    and the fingerprint of the files it trained with."""
    return tokenizer_record(fetched["key"], fingerprint(load_tokenizer(tokenizer_dir)))


def publish_checkpoint(store: ArtifactStore, checkpoint_dir: Path, step: int, key: str, staging: Path,
                       tokenizer: dict, include_optimizer: bool = False):
    """Upload one saved step (model + meta naming its tokenizer, and optimizer shards if asked) as a directory
    artifact. Required, so that no published checkpoint leaves the app guessing which tokenizer it needs."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in step_files(checkpoint_dir, step, include_optimizer):
        src = checkpoint_dir / name
        if not src.exists():
            raise dg.Failure(f"training reported step {step} but {src} is missing")
        os.link(src, staging / name)  # a hard link: no copy of a multi-GB file
    # Renamed over the link: the run directory's meta stays as training wrote it.
    atomic_json_save(with_tokenizer(read_meta(checkpoint_dir, step), tokenizer), meta_path(staging, step))
    return store.put_dir(staging, key)


@contextmanager
def retry_on_store_faults(max_retries: int = 3) -> Iterator[None]:
    """
    An artifact-store fault (S3 down, a corrupt download) retries the step with exponential backoff; any other
    error fails it at once. Not a RetryPolicy on purpose: that would also retry bugs, and re-run a week of
    training for them. Waits: $NANOCHAT_STORE_RETRY_WAIT_S (default 10 s) doubled per retry, jittered
    (x0.5-1, so runs hit by one outage do not come back in lockstep): 35-70 s of outage ridden out by default.
    """
    try:
        yield
    except ArtifactStoreError as e:
        base = float(os.environ.get("NANOCHAT_STORE_RETRY_WAIT_S", "10"))
        wait = base * 2 ** dg.OpExecutionContext.get().retry_number * random.uniform(0.5, 1.0)
        raise dg.RetryRequested(max_retries=max_retries, seconds_to_wait=wait) from e
