"""
nanochat-import: bring a published nanochat checkpoint into the pipeline: verify it, publish it to the artifact
store in our layout, record it in the eval history, optionally evaluate and promote it.

    nanochat-import hf:karpathy/nanochat-d32                       # newest step, phase from the meta file
    nanochat-import hf:OWNER/REPO@main --phase sft --evaluate --max-per-task 50 --promote
    nanochat-import ~/.cache/nanochat --phase base --step 21400    # a copied NANOCHAT_BASE_DIR
    nanochat-import s3://bucket/models/d20 --name d20-friday

Published as   <phase>_checkpoint/imported/<tag>/<name>/  (model_<step>.pt, meta_<step>.json, import.json)
               tokenizer/imported/<name>/                    (tokenizer.pkl, token_bytes.pt)
so the app lists it like a trained checkpoint (profile "imported"), and the eval history holds a `runs` row
with its source and revision. --promote writes the promotion pointer the app serves; the regression gate
against the promoted import of the same size only warns (an import is another lineage, not a retrain).
The same flow is the Dagster asset `imported_checkpoint` (orchestration/defs/imports.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from importer.hub import Source, SourceError, parse_source, read_card_metadata
from importer.layout import IMPORT_PHASES, Layout, LayoutError, find_layout, phase_from_meta
from importer.scores import card_scores, comparison_table, history_scores
from importer.verify import VerificationError, Verified, check_fetched, check_listing, read_meta, verify
from nanochat.checkpoint_manager import (
    PHASE_DIRS,
    atomic_json_save,
    meta_path,
    model_path,
    tokenizer_record,
    with_tokenizer,
)
from nanochat.tokenizer import PKL_NAME, TOKEN_BYTES_NAME, fingerprint
from store import eval_store, home, keys
from store.artifact_store import ArtifactStore, ArtifactStoreError, artifact_store_from_url

PROFILE = "imported"  # the profile imports are published and promoted under
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
IMPORT_INFO = "import.json"
ImportErrors = (SourceError, LayoutError, VerificationError)


@dataclass
class ImportRequest:
    source: str
    phase: str | None = None
    step: int | None = None
    name: str | None = None
    evaluate: bool = False
    max_per_task: int = 16
    max_new_tokens: int = 256
    promote: bool = False
    device: str = ""  # for --evaluate: cpu | cuda | mps (default: autodetect)


def checkpoint_key(phase: str, tag: str, name: str) -> str:
    return keys.checkpoint_key(phase, PROFILE, tag, name)


def tokenizer_key(name: str) -> str:
    return keys.tokenizer_key(PROFILE, name)


def run_id(name: str) -> str:
    return f"import:{name}"


def import_checkpoint(req: ImportRequest, store: ArtifactStore, db_path: str | os.PathLike, work_dir: Path,
                      log: Callable[[str], None] = print) -> dict:
    """The whole import; returns its summary (also the asset's metadata). Raises one of ImportErrors."""
    source = parse_source(req.source)
    name = req.name or re.sub(r"[^A-Za-z0-9._-]", "-", source.default_name()).strip("-._")
    if not NAME_RE.fullmatch(name or ""):
        raise SourceError(f"import name {name!r} must be 1-64 letters, digits, '.', '_' or '-'; pass --name")
    log(f"listing {source.describe()}")
    listing = source.listing()
    layout = find_layout(listing.files, req.phase, req.step)
    check_listing(layout, listing.files)
    paths = source.fetch(layout.files(), work_dir / "download")
    check_fetched(layout, paths)
    meta = read_meta(paths[layout.meta], layout.meta)
    phase = layout.phase or req.phase or phase_from_meta(meta)
    if phase not in IMPORT_PHASES:
        raise LayoutError(f"cannot tell whether {layout.model} is a base, mid or sft checkpoint (flat layout, and "
                          f"{layout.meta} does not say): pass --phase base|mid|sft")
    log(f"verifying {layout.model} ({phase}, step {layout.step})")
    verified = verify(layout, paths, meta)
    config, num_params = verified.config, verified.model.num_params()
    tag = layout.model_tag or f"d{config.n_layer}"
    base_dir = work_dir / "base"  # a nanochat base dir: what the eval entry points read
    checkpoint_dir = base_dir / PHASE_DIRS[phase] / tag
    info = {"source": source.describe(), "revision": listing.revision, "name": name, "phase": phase,
            "step": layout.step, "model_tag": tag, "num_params": num_params, "files": layout.files()}
    stage_files(layout, paths, verified, tokenizer_key(name), checkpoint_dir, base_dir / "tokenizer")
    (checkpoint_dir / IMPORT_INFO).write_text(json.dumps(info, indent=2))
    del verified  # the eval subprocess loads its own copy; never hold two
    card = read_card_metadata(paths[layout.card]) if layout.card else None

    log(f"publishing to {store.uri(checkpoint_key(phase, tag, name))}")
    ck = store.put_dir(checkpoint_dir, checkpoint_key(phase, tag, name))
    tok = store.put_dir(base_dir / "tokenizer", tokenizer_key(name))
    record(db_path, name, source, listing.revision, phase, layout.step, tag, config.n_layer, ck.sha256, ck.uri, info)

    result = {**info, "checkpoint_key": ck.key, "checkpoint_uri": ck.uri, "sha256": ck.sha256, "bytes": ck.size,
              "tokenizer_key": tok.key, "tokenizer_sha256": tok.sha256, "scores": {}, "duckdb": str(db_path)}
    if req.evaluate:
        evaluation = evaluate(phase, tag, layout.step, base_dir, req, log)
        scores = history_scores(phase, evaluation)
        if scores:
            with eval_store.connect_rw(db_path) as conn:
                result["duckdb_rows"] = eval_store.record_eval_results(
                    conn, run_id(name), phase, ck.sha256, scores, profile=PROFILE, depth=config.n_layer)
        result["scores"] = {k: evaluation.get(k) for k in ("core", "core_label", "chatcore", "chatcore_label",
                                                           "chatcore_nosb", "chatcore_nosb_label")
                            if evaluation.get(k) is not None}
        result["tasks"] = evaluation.get("core_tasks") or evaluation.get("chat_tasks") or {}
    result["comparison"] = comparison_table(result.get("scores", {}), result.get("tasks", {}), card_scores(card))
    log(result["comparison"])
    if req.promote:
        from importer.promote import promote

        result["promotion"] = promote(store, result, phase, tag, config.n_layer, log)
    return result


def stage_files(layout: Layout, paths: dict[str, Path], verified: Verified, tok_key: str, checkpoint_dir: Path,
                tokenizer_dir: Path) -> None:
    """Lay the verified files out in our names; hard links where possible (a multi-GB model is not copied). The meta
    gains the record of the tokenizer it is published with (key and fingerprint: the app serves exactly that one)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    _link_or_copy(paths[layout.model], model_path(checkpoint_dir, layout.step))
    record = tokenizer_record(tok_key, fingerprint(verified.tokenizer))
    atomic_json_save(with_tokenizer(verified.meta, record), meta_path(checkpoint_dir, layout.step))
    _link_or_copy(paths[layout.tokenizer], tokenizer_dir / PKL_NAME)
    torch.save(verified.token_bytes, tokenizer_dir / TOKEN_BYTES_NAME)


def _link_or_copy(src: Path, dest: Path) -> None:
    src = src.resolve()  # the hub cache's snapshot entries are links to blobs
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dest)


def record(db_path, name: str, source: Source, revision: str | None, phase: str, step: int, tag: str, depth: int,
           sha256: str, uri: str, info: dict) -> None:
    from store.home import git_sha

    with eval_store.connect_rw(db_path) as conn:
        eval_store.record_run(conn, run_id(name), profile=PROFILE, depth=depth, git_sha=git_sha(),
                              config={**info, "model_tag": tag}, source=source.describe(), revision=revision)
        eval_store.record_checkpoint(conn, sha256, run_id=run_id(name), stage=phase, step=step, uri=uri)


def evaluate(phase: str, tag: str, step: int, base_dir: Path, req: ImportRequest,
             log: Callable[[str], None]) -> dict:
    """CORE (base) or ChatCORE (mid/sft) through the same entry points the pipeline's eval assets run, in a
    child process (its own memory), its output streamed as progress."""
    out = base_dir / "eval.json"
    if phase == "base":
        cmd = ["nanochat.base_eval", "--source=base", f"--max-per-task={req.max_per_task}"]
    else:
        cmd = ["nanochat.chat_eval", f"--source={phase}", f"--max-per-task={req.max_per_task}",
               f"--max-new-tokens={req.max_new_tokens}"]
    cmd = [sys.executable, "-m", *cmd, f"--model-tag={tag}", f"--step={step}", f"--output={out}"]
    if req.device:
        cmd.append(f"--device-type={req.device}")
    # No shards in the import's base dir: base_eval skips bits per byte instead of reading the user's data.
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(base_dir / "base_data")}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    env.pop("DAGSTER_PIPES_MESSAGES", None)
    log(f"evaluating: {' '.join(cmd[2:])}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log(f"  {line.rstrip()}")
        tail = [*tail[-30:], line]
    if proc.wait() != 0 or not out.is_file():
        raise VerificationError(f"evaluation failed (exit {proc.returncode}):\n{''.join(tail)}")
    return json.loads(out.read_text())


# -----------------------------------------------------------------------------
# The command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanochat-import", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("source", help="hf:OWNER/REPO[@REVISION], s3://bucket/prefix, or a local directory")
    p.add_argument("--phase", choices=IMPORT_PHASES, help="base, mid or sft (default: from the directory or meta)")
    p.add_argument("--step", type=int, help="the step to import (default: the newest)")
    p.add_argument("--name", help="the import's name in the store and the app (default: from the source)")
    p.add_argument("--evaluate", action="store_true", help="run CORE (base) or ChatCORE (mid/sft) into the history")
    p.add_argument("--max-per-task", type=int, default=16, help="examples per eval task (-1: all; default 16)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply budget of the generative chat tasks")
    p.add_argument("--promote", action="store_true", help="make it the model the chat app serves")
    p.add_argument("--device", default="", help="evaluation device: cpu, cuda, mps (default: autodetect)")
    p.add_argument("--artifacts", default=None, help="artifact store: a directory or s3://bucket/prefix (default "
                                                     "$NANOCHAT_ARTIFACTS, else $NANOCHAT_HOME/artifacts)")
    p.add_argument("--duckdb", default=None, help="eval history (default $NANOCHAT_DUCKDB, else "
                                                  "$NANOCHAT_HOME/evals.duckdb)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    args = p.parse_args(argv)
    if args.step is not None and args.step < 0:
        p.error("--step must be >= 0")
    if args.max_per_task == 0 or args.max_per_task < -1 or args.max_new_tokens < 1:
        p.error("--max-per-task must be -1 or positive, --max-new-tokens positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    req = ImportRequest(args.source, args.phase, args.step, args.name, args.evaluate, args.max_per_task,
                        args.max_new_tokens, args.promote, args.device)
    db_path = Path(args.duckdb) if args.duckdb else home.duckdb_path()
    workspace = home.workspace_dir()
    workspace.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="import-", dir=workspace) as work:
        try:
            store = artifact_store_from_url(args.artifacts or home.artifacts_url())
            result = import_checkpoint(req, store, db_path, Path(work))
        except (*ImportErrors, ArtifactStoreError, eval_store.DatabaseLockedError) as e:
            print(f"nanochat-import: error: {e}", file=sys.stderr)
            return 2
    print(f"imported {result['source']} ({result['phase']}, step {result['step']}, {result['num_params']:,} "
          f"parameters) as {result['checkpoint_uri']} (sha256 {result['sha256'][:12]})")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
