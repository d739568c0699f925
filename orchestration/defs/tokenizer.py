"""tokenizer: BPE trained on the training shards (rustbpe), with its compression per data source."""


import time

import dagster as dg

from nanochat import tok_eval, tok_train
from nanochat.tokenizer import fingerprint, load_tokenizer
from orchestration import metadata as md
from orchestration.defs.resources import ArtifactStore
from orchestration.partitions import PROFILE_PARTITIONS, run_profile
from orchestration.profiles import RunProfile
from orchestration.workspace import Workspace, fetch_upstream, retry_on_store_faults
from store.home import git_sha
from store.keys import tokenizer_key


@dg.asset(group_name="tokenizer", code_version="1", deps=["raw_shards"], kinds={"rust", md.store_kind()},
          partitions_def=PROFILE_PARTITIONS)
def tokenizer(context: dg.AssetExecutionContext, profile: RunProfile, workspace: Workspace,
              artifacts: ArtifactStore) -> dg.MaterializeResult:
    """Train the tokenizer (tokenizer.pkl + token_bytes.pt, the original layout) and report its compression."""
    profile = run_profile(context, profile)
    settings = profile.settings()
    run_dir = workspace.run_dir(context)
    with retry_on_store_faults():
        shards = fetch_upstream(context, artifacts, "raw_shards", run_dir / "base_data")
    out_dir = run_dir / "tokenizer"
    t0 = time.time()
    tok_train.main([f"--max-chars={settings['tok_max_chars']}", f"--vocab-size={settings['vocab_size']}",
                    f"--data-dir={run_dir / 'base_data'}", f"--out-dir={out_dir}"])
    rows = tok_eval.main(["--data-dir", str(run_dir / "base_data"), "--base-dir", str(run_dir)])
    wall = time.time() - t0
    with retry_on_store_faults():
        info = artifacts.put_dir(out_dir, tokenizer_key(profile.name.value, context.run.run_id))
    return dg.MaterializeResult(
        metadata=md.entries({**info.to_metadata(), "vocab_size": settings["vocab_size"],
                             "max_chars": settings["tok_max_chars"], "raw_shards_sha256": shards["sha256"],
                             "compression": md.compression_table(rows), "git_sha": git_sha(), "wall_time_s": wall,
                             # what the checkpoints trained on it record
                             "fingerprint": fingerprint(load_tokenizer(out_dir))}),
        data_version=dg.DataVersion(info.sha256),
    )
