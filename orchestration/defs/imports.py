"""
imported_checkpoint: a published nanochat checkpoint brought into the pipeline (importer/cli.py):
verified, published to the artifact store, recorded in the eval history, optionally evaluated and promoted.

Partitioned by import name (dynamic partitions "imports"), not by run profile: an import is its own lineage,
so each imported model gets its own row in the UI with its own materialization history, metadata and score
comparison, and re-importing one (a new revision on the hub) is a new materialization of that row. Add the
partition in the UI ("Add partition", e.g. `nanochat-d32`) or with `instance.add_dynamic_partitions("imports",
[...])`, then launch it with the source in the run config.
"""

import dagster as dg
from pydantic import Field

from importer.cli import ImportErrors, ImportRequest, import_checkpoint
from orchestration import metadata as md
from orchestration.defs.resources import ArtifactStore, EvalHistory
from orchestration.workspace import Workspace, retry_on_store_faults
from store.home import git_sha

imports_partitions = dg.DynamicPartitionsDefinition(name="imports")


class ImportConfig(dg.Config):
    source: str = Field(description="hf:OWNER/REPO[@REVISION], s3://bucket/prefix or a local directory")
    phase: str = Field(default="", description="base, mid or sft ('' : from the directory or meta file)")
    step: int = Field(default=-1, description="the step to import (-1: the newest)")
    evaluate: bool = Field(default=False, description="run CORE (base) or ChatCORE (mid/sft) into the history")
    max_per_task: int = Field(default=16, description="examples per eval task (-1: all)")
    promote: bool = Field(default=False, description="make it the model the chat app serves")


@dg.asset(group_name="imports", code_version="1", partitions_def=imports_partitions, pool="gpu",
          kinds={"pytorch", "huggingface", "duckdb"})
def imported_checkpoint(context: dg.AssetExecutionContext, config: ImportConfig, workspace: Workspace,
                        artifacts: ArtifactStore, duckdb: EvalHistory) -> dg.MaterializeResult:
    """Import a published checkpoint under the partition's name (see the module docstring)."""
    req = ImportRequest(config.source, config.phase or None, None if config.step < 0 else config.step,
                        context.partition_key, config.evaluate, config.max_per_task, promote=config.promote)
    try:
        with retry_on_store_faults():
            result = import_checkpoint(req, artifacts, duckdb.database, workspace.run_dir(context),
                                       log=context.log.info)
    except ImportErrors as e:
        raise dg.Failure(str(e)) from e
    metadata = {
        "key": result["checkpoint_key"], "uri": result["checkpoint_uri"], "sha256": result["sha256"],
        "bytes": result["bytes"], "step": result["step"], "phase": result["phase"], "model_tag": result["model_tag"],
        "source": result["source"], "revision": result["revision"] or "n/a (not a hub source)",
        "num_params": result["num_params"], "tokenizer_key": result["tokenizer_key"], "git_sha": git_sha(),
        "scores": dg.MetadataValue.md(result["comparison"]),
        **{k: v for k, v in result["scores"].items()},
    }
    if "promotion" in result:
        metadata["promoted"] = dg.MetadataValue.json(result["promotion"])
    return dg.MaterializeResult(metadata=md.entries(metadata), data_version=dg.DataVersion(result["sha256"]))
