"""
Save and load checkpoints in the original nanochat layout:

    <base>/<phase>_checkpoints/<model_tag>/model_<step:06d>.pt        model state_dict (rank 0)
    <base>/<phase>_checkpoints/<model_tag>/meta_<step:06d>.json       metadata (rank 0)
    <base>/<phase>_checkpoints/<model_tag>/optim_<step:06d>_rank<r>.pt optimizer shard of rank r

Every file is written to a temporary name and renamed into place, so a crash mid-save never leaves a file
that looks complete. The model file is the last file of a step: under torchrun every rank writes its optimizer
shard, all ranks meet at a barrier, and only then does rank 0 write meta and model. So a model_*.pt that exists
is whole and its meta and shards are on disk; find_last_complete_step still checks every file, because a run
killed between the barrier and the rename, or a directory touched by hand, can leave a step half there.
Loading uses torch.load(weights_only=True): a checkpoint is data, never code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.checkpoint_checks import (
    CheckpointError,
    check_finite,
    check_fits,
    check_state_dict,
    parse_meta,
    parse_model_config,
)
from nanochat.common import all_ranks, atomic_write, get_base_dir
from nanochat.gpt import GPT
from nanochat.safe_io import MAX_JSON_BYTES, clip, load_torch_file, memory_limit_bytes, read_bounded, short

logger = logging.getLogger("nanochat")

PHASE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}


# -----------------------------------------------------------------------------
# Atomic writes


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_save(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode("utf-8")))


# -----------------------------------------------------------------------------
# The layout: this module is the one place that builds and parses checkpoint paths and file names

MODEL_RE = re.compile(r"model_(\d+)\.pt")
OPTIM_RE = re.compile(r"optim_(\d+)_rank(\d+)\.pt")


def checkpoints_dir_for(source: str, base_dir: str | os.PathLike | None = None) -> Path:
    """<base>/<phase dir> for a source ("base", "mid", "sft", "rl")."""
    if source not in PHASE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {sorted(PHASE_DIRS)}")
    return Path(base_dir or get_base_dir()) / PHASE_DIRS[source]


def checkpoint_dir_for(source: str, model_tag: str, base_dir: str | os.PathLike | None = None) -> Path:
    """<base>/<phase dir>/<model tag>: where a training entry point saves its steps."""
    return checkpoints_dir_for(source, base_dir) / model_tag


def default_model_tag(n_layer: int) -> str:
    """The tag a model of this depth is saved under when none is given (find_largest_model reads it back)."""
    return f"d{n_layer}"


def source_of(checkpoint_dir: str | os.PathLike) -> str | None:
    """The source ("base", "mid", ...) a <base>/<phase dir>/<tag> directory belongs to; None outside the layout."""
    phase_dir = Path(checkpoint_dir).parent.name
    return next((source for source, name in PHASE_DIRS.items() if name == phase_dir), None)


def model_path(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoint_dir) / f"model_{step:06d}.pt"


def meta_path(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoint_dir) / f"meta_{step:06d}.json"


def optim_path(checkpoint_dir: str | os.PathLike, step: int, rank: int) -> Path:
    return Path(checkpoint_dir) / f"optim_{step:06d}_rank{rank:d}.pt"


def step_of(filename: str) -> int | None:
    """The step of a model_<step>.pt file name (any directory part is ignored); None for any other name."""
    m = MODEL_RE.fullmatch(Path(filename).name)
    return int(m.group(1)) if m else None


def step_files(checkpoint_dir: str | os.PathLike, step: int, include_optimizer: bool = False) -> list[str]:
    """The file names of one saved step: model and meta, plus the optimizer shards on disk when asked."""
    names = [model_path(".", step).name, meta_path(".", step).name]
    if include_optimizer:
        names += sorted(p.name for p in Path(checkpoint_dir).glob(f"optim_{step:06d}_rank*.pt")
                        if (m := OPTIM_RE.fullmatch(p.name)) and int(m.group(1)) == step)
    return names


# -----------------------------------------------------------------------------
# Save / load one step


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    model_data: dict | None,
    optimizer_data,
    meta_data: dict | None,
    rank: int = 0,
) -> None:
    """
    Every rank writes its own optimizer shard (when optimizer_data is given), then rank 0 writes meta + model.
    Under torchrun every rank must call this (they meet at a barrier).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if optimizer_data is not None:
        atomic_torch_save(optimizer_data, optim_path(checkpoint_dir, step, rank))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # model_<step>.pt is the "this step exists" marker: rank 0 must not write it while another rank is still
        # writing its shard, or a kill of that rank in between leaves a step that --resume picks and cannot load.
        dist.barrier()
    if rank == 0:
        if meta_data is not None:
            atomic_json_save(meta_data, meta_path(checkpoint_dir, step))
        if model_data is not None:
            # Drop a torch.compile wrapper prefix so the checkpoint loads into a plain model.
            model_data = {_strip_compile_prefix(k): v for k, v in model_data.items()}
            atomic_torch_save(model_data, model_path(checkpoint_dir, step))
        logger.info("saved checkpoint step %d to %s", step, checkpoint_dir)


def _strip_compile_prefix(key: str) -> str:
    return key.removeprefix("_orig_mod.")


def _torch_load(path: Path, device) -> object:
    """A weights-only, bounded, checked torch.load of one checkpoint file (see nanochat/safe_io.py)."""
    obj = load_torch_file(path, memory_limit_bytes(), CheckpointError)
    return _to_device(obj, torch.device(device))


def _to_device(obj, device: torch.device):
    if device.type == "cpu":
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def read_meta(checkpoint_dir: str | os.PathLike, step: int) -> dict:
    """meta_<step>.json: a bounded read of a regular file, a JSON object whose known fields have the right types."""
    path = meta_path(checkpoint_dir, step)
    return parse_meta(read_bounded(path, MAX_JSON_BYTES, CheckpointError, "metadata file"), path)


def load_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    device: torch.device | str = "cpu",
    load_optimizer: bool = False,
    rank: int = 0,
) -> tuple[dict, object, dict]:
    """Return (model_state_dict, optimizer_data or None, meta_data) for one saved step."""
    checkpoint_dir = Path(checkpoint_dir)
    meta_data = read_meta(checkpoint_dir, step)  # first: it is small, and says what the model file must hold
    model_data = _torch_load(model_path(checkpoint_dir, step), device)
    if not isinstance(model_data, dict) or not all(isinstance(k, str) for k in model_data):
        raise CheckpointError(f"{model_path(checkpoint_dir, step)} holds a {type(model_data).__name__}, "
                              "expected a state_dict (dict of name -> tensor)")
    model_data = {_strip_compile_prefix(k): v for k, v in model_data.items()}
    optimizer_data = _torch_load(optim_path(checkpoint_dir, step, rank), device) if load_optimizer else None
    return model_data, optimizer_data, meta_data


def load_training_state(checkpoint_dir, step: int, model, optimizers, device, rank: int, world_size: int) -> dict:
    """Restore the model and this rank's optimizer shard from a saved step, for --resume; return its meta."""
    # The meta first: a wrong world size or model shape is refused before the (large) model file is read.
    meta = read_meta(checkpoint_dir, step)
    saved_world = meta.get("world_size", world_size)
    if saved_world != world_size:
        raise CheckpointError(f"{checkpoint_dir} step {step} was saved by {saved_world} ranks (optimizer state is "
                              f"sharded per rank); resume it with --nproc_per_node={saved_world}, not {world_size}")
    if meta.get("model_config") != model.config.to_dict():
        raise CheckpointError(f"cannot resume: {meta_path(checkpoint_dir, step)} has model_config "
                              f"{short(meta.get('model_config'), 300)}, this run builds {model.config.to_dict()}")
    model_data, optim_data, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    check_state_dict(model.config, model_data, model_path(checkpoint_dir, step))
    check_finite(model_data, model_path(checkpoint_dir, step), allow_nonfinite=False)
    model.load_state_dict(model_data, strict=True)
    if not isinstance(optim_data, list) or len(optim_data) != len(optimizers):
        raise CheckpointError(f"{optim_path(checkpoint_dir, step, rank)} does not hold {len(optimizers)} optimizer "
                              "states ([AdamW, Muon])")
    for i, (opt, state) in enumerate(zip(optimizers, optim_data)):
        try:
            opt.load_state_dict(state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{optim_path(checkpoint_dir, step, rank)}: optimizer state {i} does not fit this "
                                  f"run's {type(opt).__name__}: {type(e).__name__}: {clip(str(e), 200)}") from None
    return meta


def loader_states_meta(state: dict) -> dict:
    """
    The meta entries for where the training data stands: every rank's loader state, in rank order, plus rank 0's
    under the original nanochat's key. Each rank reads its own slice of the data (row groups or conversations
    r, r+W, ...), so each must resume from its own position. A collective: under torchrun every rank calls it.
    """
    return {"dataloader_state_dict": state, "dataloader_state_dicts": all_ranks(state)}


def resume_training(
    checkpoint_dir, model, optimizers, device, rank: int, world_size: int, step: int | None = None
) -> tuple[int, dict, dict | None]:
    """
    --resume for every training script: restore the model and this rank's optimizer shard from `step`, by
    default the last *complete* one (a newer step that a kill cut short is skipped). Returns (step, meta, this
    rank's dataloader state).
    """
    if step is None:
        step = find_last_complete_step(checkpoint_dir, world_size)
    meta = load_training_state(checkpoint_dir, step, model, optimizers, device, rank, world_size)
    rank_states = meta.get("dataloader_state_dicts")
    if rank_states:
        if len(rank_states) != world_size or not isinstance(rank_states[rank], dict | None):
            raise CheckpointError(f"{meta_path(checkpoint_dir, step)}: field 'dataloader_state_dicts' must hold one "
                                  f"object per rank ({world_size}), got {short(rank_states, 120)}")
        return step, meta, rank_states[rank]
    if world_size > 1:
        # Saved before per-rank states existed: rank 0's position is exact for rank 0 only.
        logger.warning("%s step %d holds only rank 0's dataloader position; rank %d resumes from it, so its data "
                       "order differs from an uninterrupted run", checkpoint_dir, step, rank)
    return step, meta, meta.get("dataloader_state_dict")


# -----------------------------------------------------------------------------
# Build a model from a checkpoint


def model_from_state_dict(model_data: dict, model_config: dict, device, source: Path | str = "<memory>",
                          allow_nonfinite: bool = False) -> GPT:
    """
    Build a GPT from its config on `device` and load the weights (strict). Everything is checked before anything
    is allocated: the config's fields and the memory it implies, then every key, shape, stride and dtype, then that
    every weight is finite; only then are weights converted (bf16 -> fp32 on CPU) and the model built.
    """
    config = parse_model_config(model_config, source)
    check_fits(config, device, source)
    check_state_dict(config, model_data, Path(str(source)))
    check_finite(model_data, source, allow_nonfinite)
    device = torch.device(device)
    if device.type in ("cpu", "mps"):
        # GPU-trained checkpoints keep the embedding in bf16; CPU/MPS run everything in fp32.
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_rotary()  # rotary tables are not in the checkpoint; the weights are assigned next
    model.load_state_dict(model_data, strict=True, assign=True)
    return model


def build_model(checkpoint_dir: str | os.PathLike, step: int, device, phase: str = "eval", tokenizer=None,
                allow_nonfinite: bool = False, tokenizer_source: str | None = None):
    """Load (model, tokenizer, meta). phase 'eval' puts the model in eval mode, 'train' in train mode. The tokenizer
    must be the one meta records, when it records one (check_tokenizer); tokenizer_source names it in errors."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    # The config is checked (fields, implied memory) before the model file is even opened.
    meta = read_meta(checkpoint_dir, step)
    if "model_config" not in meta:
        raise CheckpointError(f"{meta_path(checkpoint_dir, step)} has no 'model_config'")
    check_fits(parse_model_config(meta["model_config"], meta_path(checkpoint_dir, step)), device,
               meta_path(checkpoint_dir, step))
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    model = model_from_state_dict(model_data, meta["model_config"], device, model_path(checkpoint_dir, step),
                                  allow_nonfinite)
    model.train() if phase == "train" else model.eval()
    source = tokenizer_source or "the tokenizer passed in"
    if tokenizer is None:
        from nanochat.tokenizer import PKL_NAME, get_tokenizer

        tokenizer, source = get_tokenizer(), str(get_base_dir() / "tokenizer" / PKL_NAME)
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer vocab size {tokenizer.get_vocab_size()} ({source}) != model vocab size "
            f"{model.config.vocab_size} for {checkpoint_dir}: this checkpoint was trained with a different "
            "tokenizer. Use the tokenizer of the run that trained it (NANOCHAT_BASE_DIR/tokenizer/), or train "
            f"the model again on this tokenizer"
        )
    check_tokenizer(meta, tokenizer, f"{checkpoint_dir} step {step}", source)
    return model, tokenizer, meta


# -----------------------------------------------------------------------------
# The tokenizer a checkpoint was trained with: meta["tokenizer"] = {"key": ..., "fingerprint": ...}. The key is
# where that tokenizer is published (store/keys.py builds it; to nanochat it is a label); the fingerprint is
# nanochat.tokenizer.fingerprint of it. Whoever publishes a checkpoint adds the record (orchestration/workspace.py,
# importer/cli.py, importer/demo.py): a training entry point does not know where its tokenizer is published.

TOKENIZER_FIELD = "tokenizer"
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def tokenizer_record(key: str, fingerprint: str) -> dict:
    if not isinstance(key, str) or not key or not _FINGERPRINT.fullmatch(str(fingerprint)):
        raise ValueError(f"a tokenizer record needs a key and a 64-hex-digit fingerprint, got {key!r}, {fingerprint!r}")
    return {"key": key, "fingerprint": fingerprint}


def with_tokenizer(meta: dict, record: dict) -> dict:
    """meta naming the tokenizer its model was trained with (a record from tokenizer_record)."""
    return {**meta, TOKENIZER_FIELD: tokenizer_record(record["key"], record["fingerprint"])}


def recorded_tokenizer(meta: dict, where: str) -> dict | None:
    """meta's tokenizer record {"key", "fingerprint"}; None for a checkpoint saved before checkpoints recorded it."""
    record = meta.get(TOKENIZER_FIELD)
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str) or not _FINGERPRINT.fullmatch(
            str(record.get("fingerprint"))):
        raise CheckpointError(f"{where}: meta field {TOKENIZER_FIELD!r} must be {{\"key\": str, \"fingerprint\": 64 "
                              f"hex digits}}, got {short(record, 120)}")
    return record


def check_tokenizer(meta: dict, tokenizer, where: str, source: str) -> None:
    """Refuse a tokenizer other than the one meta records (same vocab size or not): its ids mean other text."""
    from nanochat.tokenizer import fingerprint

    record = recorded_tokenizer(meta, where)
    if record is None or (actual := fingerprint(tokenizer)) == record["fingerprint"]:
        return
    raise CheckpointError(
        f"tokenizer mismatch: {where} was trained with tokenizer {record['key']} (fingerprint "
        f"{record['fingerprint'][:12]}), not {source} (fingerprint {actual[:12]}, {tokenizer.get_vocab_size():,} "
        f"tokens): its ids would decode to other text. Serve it with the tokenizer it records ({record['key']})")


# -----------------------------------------------------------------------------
# Find the checkpoint to load


def find_largest_model(checkpoints_dir: str | os.PathLike) -> str:
    """The model tag d<N> with the largest N; otherwise the most recently modified tag directory."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints directory {checkpoints_dir}")
    tags = [p.name for p in checkpoints_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not tags:
        raise FileNotFoundError(f"no model tags (e.g. d20/) in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: (checkpoints_dir / t).stat().st_mtime)


def _saved_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    # fullmatch: atomic_write's temp files (".model_000010.pt.<random>.tmp") never count as a saved step.
    return [step for p in Path(checkpoint_dir).glob("model_*.pt") if (step := step_of(p.name)) is not None]


def find_last_step(checkpoint_dir: str | os.PathLike) -> int:
    steps = _saved_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no model_<step>.pt checkpoints in {checkpoint_dir}")
    return max(steps)


def missing_files(checkpoint_dir: str | os.PathLike, step: int, world_size: int) -> list[Path]:
    """The files of a resumable step (model, meta, one optimizer shard per rank) that are not on disk."""
    needed = [model_path(checkpoint_dir, step), meta_path(checkpoint_dir, step)]
    needed += [optim_path(checkpoint_dir, step, r) for r in range(world_size)]
    return [p for p in needed if not p.is_file()]


def find_last_complete_step(checkpoint_dir: str | os.PathLike, world_size: int) -> int:
    """
    The newest step that --resume can load with `world_size` ranks: model, meta and every rank's optimizer
    shard present. Newer incomplete steps (a kill mid-save) are skipped with a warning naming what is missing.
    """
    for step in sorted(_saved_steps(checkpoint_dir), reverse=True):
        missing = missing_files(checkpoint_dir, step, world_size)
        if not missing:
            return step
        logger.warning("skipping incomplete checkpoint step %d in %s (missing %s): it was interrupted mid-save",
                       step, checkpoint_dir, ", ".join(p.name for p in missing))
    raise FileNotFoundError(f"no complete checkpoint (model + meta + {world_size} optimizer shard(s)) in "
                            f"{checkpoint_dir}; start without --resume")


def load_model_from_dir(
    checkpoints_dir: str | os.PathLike,
    device,
    phase: str,
    model_tag: str | None = None,
    step: int | None = None,
    tokenizer=None,
):
    model_tag = model_tag or find_largest_model(checkpoints_dir)
    checkpoint_dir = Path(checkpoints_dir) / model_tag
    step = find_last_step(checkpoint_dir) if step is None else step
    logger.info("loading model %s step %d from %s", model_tag, step, checkpoint_dir)
    return build_model(checkpoint_dir, step, device, phase, tokenizer=tokenizer)


def load_model(
    source: str,
    device,
    phase: str,
    model_tag: str | None = None,
    step: int | None = None,
    base_dir: str | os.PathLike | None = None,
    tokenizer=None,
):
    """load_model('sft', device, phase='eval') -> (model, tokenizer, meta); largest tag, last step by default."""
    return load_model_from_dir(checkpoints_dir_for(source, base_dir), device, phase, model_tag, step, tokenizer)
