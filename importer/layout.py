"""
Find the checkpoint inside a source's file listing: which directory, step, phase and tokenizer.

Two layouts, both the original nanochat's (file names come from nanochat.checkpoint_manager, their one owner):

    flat (most hub uploads)          base-dir tree (a copied NANOCHAT_BASE_DIR)
    model_<step>.pt                  tokenizer/tokenizer.pkl, tokenizer/token_bytes.pt
    meta_<step>.json                 base_checkpoints/<tag>/model_<step>.pt, meta_<step>.json
    tokenizer.pkl, token_bytes.pt    mid_checkpoints/<tag>/...   chatsft_checkpoints/<tag>/...

The step is the newest unless asked for; the phase comes from the directory, else --phase, else the meta file
(`phase_from_meta`, once it is downloaded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from importer.hub import CARD_NAME
from nanochat.checkpoint_manager import PHASE_DIRS, meta_path, model_path, step_of
from nanochat.tokenizer import PKL_NAME, TOKEN_BYTES_NAME

IMPORT_PHASES = ("base", "mid", "sft")  # the stages the pipeline (and its eval history) knows
TOKENIZER_DIR = "tokenizer"
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class LayoutError(ValueError):
    """The source does not hold a nanochat checkpoint we can find (or not the one asked for)."""


@dataclass(frozen=True)
class Layout:
    checkpoint_dir: str  # relative POSIX dir of model/meta ("" at the top)
    step: int
    phase: str | None  # from the directory; None for a flat layout (decided later)
    model_tag: str | None  # the tree's <tag>; None for a flat layout
    tokenizer: str  # relative path of tokenizer.pkl
    token_bytes: str | None  # relative path of token_bytes.pt, when present
    card: str | None  # README.md at the top, when present

    @property
    def model(self) -> str:
        return _join(self.checkpoint_dir, model_path("", self.step).name)

    @property
    def meta(self) -> str:
        return _join(self.checkpoint_dir, meta_path("", self.step).name)

    def files(self) -> list[str]:
        """Everything to fetch, small files first (a bad meta or tokenizer fails before the big download)."""
        names = [self.meta, self.tokenizer, *(x for x in (self.token_bytes, self.card) if x)]
        return [*names, self.model]


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def find_layout(files: dict[str, int | None], phase: str | None = None, step: int | None = None) -> Layout:
    """The checkpoint to import from a listing {relative path: size}. Raises LayoutError naming what is missing."""
    if phase is not None and phase not in IMPORT_PHASES:
        raise LayoutError(f"--phase must be one of {', '.join(IMPORT_PHASES)}, got {phase!r}")
    steps: dict[str, list[int]] = {}  # directory -> saved steps
    for path in files:
        directory, _, name = path.rpartition("/")
        found = step_of(name)
        if found is not None:
            steps.setdefault(directory, []).append(found)
    if not steps:
        raise LayoutError(f"no model_<step>.pt anywhere in the source (files: {_sample(files)}); expected the flat "
                          "layout (model_<step>.pt, meta_<step>.json, tokenizer.pkl at the top) or a nanochat base "
                          f"dir ({', '.join(PHASE_DIRS[p] for p in IMPORT_PHASES)}/<tag>/)")
    directory, dir_phase, tag = _pick_directory(steps, phase)
    if step is None:
        step = max(steps[directory])
    elif step not in steps[directory]:
        where = directory or "the top of the source"
        raise LayoutError(f"no step {step} in {where}: it holds steps {sorted(steps[directory])}; pass one of them "
                          "to --step, or leave --step out for the newest")
    layout_meta = _join(directory, meta_path("", step).name)
    missing = [layout_meta] if layout_meta not in files else []
    tokenizer_dirs = [TOKENIZER_DIR] if directory else ["", TOKENIZER_DIR]
    tokenizer = next((_join(d, PKL_NAME) for d in tokenizer_dirs if _join(d, PKL_NAME) in files), None)
    if tokenizer is None:
        missing.append(" or ".join(_join(d, PKL_NAME) for d in tokenizer_dirs))
    if missing:
        raise LayoutError(f"the source is missing {', '.join(missing)} for step {step}; a nanochat checkpoint needs "
                          f"model, meta and tokenizer files (files present: {_sample(files)})")
    token_bytes = _join(tokenizer.rpartition("/")[0], TOKEN_BYTES_NAME)
    return Layout(directory, step, dir_phase, tag, tokenizer, token_bytes if token_bytes in files else None,
                  CARD_NAME if CARD_NAME in files else None)


def _pick_directory(steps: dict[str, list[int]], phase: str | None) -> tuple[str, str | None, str | None]:
    """(directory, its phase, its tag): the top level, else <phase dir>/<tag> (the asked-for phase, else the most
    trained one: sft, then mid, then base), taking the deepest d<N> tag."""
    by_phase_dir = {PHASE_DIRS[p]: p for p in IMPORT_PHASES}
    tree: dict[str, list[str]] = {}
    for directory in steps:
        parts = directory.split("/")
        if len(parts) == 2 and parts[0] in by_phase_dir and TAG_RE.fullmatch(parts[1]):
            tree.setdefault(by_phase_dir[parts[0]], []).append(parts[1])
    if "" in steps and not tree:
        return "", None, None
    if not tree:
        raise LayoutError(f"model_<step>.pt files are in {sorted(steps)}, which is neither the top of the source nor "
                          f"<phase dir>/<tag>/ ({', '.join(by_phase_dir)}); point the source at that directory")
    if phase is not None and phase not in tree:
        raise LayoutError(f"no {PHASE_DIRS[phase]}/ in the source; it holds {', '.join(PHASE_DIRS[p] for p in tree)}")
    chosen = phase or next(p for p in ("sft", "mid", "base") if p in tree)
    tags = tree[chosen]
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    tag = max(depths)[1] if depths else sorted(tags)[-1]
    return f"{PHASE_DIRS[chosen]}/{tag}", chosen, tag


def phase_from_meta(meta: dict) -> str | None:
    """The training phase a meta file was written by, from the keys each trainer writes (None: cannot tell).
    SFT records a validation loss; mid-training (ours) its base step; base training its loop state; the
    original's mid-training writes val_bpb and user_config but no data loader state."""
    if "val_loss" in meta:
        return "sft"
    if "base_checkpoint_step" in meta:
        return "mid"
    if "loop_state" in meta:
        return "base"
    if "val_bpb" in meta and "user_config" in meta and "dataloader_state_dict" not in meta:
        return "mid"
    return None


def _sample(files: dict[str, int | None], n: int = 12) -> str:
    names = sorted(files)
    return ", ".join(names[:n]) + (f" ... ({len(names) - n} more)" if len(names) > n else "") if names else "none"
