"""
Verify a checkpoint before it is published: nothing reaches the artifact store that the app could not serve.

1. Files are regular and bounded (sizes checked from the listing before any download, and again on disk).
2. The meta's model_config is this architecture's (the late-2025 nanochat GPT). A checkpoint of the 2026
   upstream model (value embeddings, per-layer lambdas, smear/backout, sliding windows) is refused with the
   config and state-dict keys it would need, never loaded with those weights silently dropped.
3. The tokenizer's vocabulary size equals the model's; token_bytes.pt (if shipped) matches it.
4. A forward pass on a short prompt gives logits of the right shape, all finite.

The model file is memory-mapped and its tensors become the model's parameters (meta-device init, then
load_state_dict(assign=True)): a 2 GB checkpoint costs 2 GB of page cache, not two copies in RAM.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from importer.layout import Layout
from nanochat.checkpoint_manager import CheckpointError, check_tokenizer, model_from_state_dict
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes

GIB = 1 << 30
# Per-role size limits. A d32 (1.9B parameters) is 7.6 GB in fp32; NANOCHAT_IMPORT_MAX_MODEL_GB raises the cap.
LIMITS = {"meta": 1 << 20, "tokenizer": 64 << 20, "token_bytes": 16 << 20, "card": 1 << 20}
PROBE_PROMPT = "The capital of France is"

# State-dict key fragments and config keys of the 2026 upstream model, with what they are (for the message).
UPSTREAM_FEATURES = {
    "value_embeds": "value embeddings", "ve_gate": "value-embedding gates", "resid_lambdas": "per-layer residual "
    "scales", "x0_lambdas": "per-layer embedding re-injection", "smear": "smear", "backout": "backout",
    "window_pattern": "sliding-window attention",
}


class VerificationError(ValueError):
    """The checkpoint is not one this project can serve; the message says what is wrong and what to do."""


class UnsupportedArchitecture(VerificationError):
    """The checkpoint needs model features this architecture does not have."""


def max_model_bytes() -> int:
    return int(float(os.environ.get("NANOCHAT_IMPORT_MAX_MODEL_GB", "32")) * GIB)


def roles(layout: Layout) -> dict[str, str]:
    """{relative path: role} of the files an import reads."""
    out = {layout.model: "model", layout.meta: "meta", layout.tokenizer: "tokenizer"}
    if layout.token_bytes:
        out[layout.token_bytes] = "token_bytes"
    if layout.card:
        out[layout.card] = "card"
    return out


def check_size(name: str, role: str, size: int | None) -> None:
    """size < 0: not a regular file; None: not known yet (checked again once on disk)."""
    if size is None:
        return
    if size < 0:
        raise VerificationError(f"{name} is not a regular file (a directory, device, FIFO or dangling link); "
                                "replace it with the real file")
    limit = max_model_bytes() if role == "model" else LIMITS[role]
    if size > limit:
        hint = " (raise NANOCHAT_IMPORT_MAX_MODEL_GB if this model is really that big)" if role == "model" else ""
        raise VerificationError(f"{name} is {size:,} bytes, over the {limit:,}-byte limit for a {role} file{hint}")
    if size == 0:
        raise VerificationError(f"{name} is empty: the upload or download was cut short; fetch it again")


def check_listing(layout: Layout, files: dict[str, int | None]) -> None:
    for name, role in roles(layout).items():
        check_size(name, role, files.get(name))


def check_fetched(layout: Layout, paths: dict[str, Path]) -> None:
    for name, role in roles(layout).items():
        path = paths[name]
        try:
            st = path.stat()  # follows the hub cache's snapshot -> blob links
        except OSError as e:
            raise VerificationError(f"{name} could not be read at {path}: {e}") from e
        check_size(name, role, st.st_size if path.is_file() else -1)


def read_meta(path: Path, name: str) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, a 5000-digit number, nesting 100k deep
        raise VerificationError(f"{name} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise VerificationError(f"{name} has no 'model_config' object: it is not a nanochat checkpoint's meta file")
    return meta


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", key)


def check_architecture(meta: dict, state_keys: list[str], name: str) -> GPTConfig:
    """The GPTConfig of a supported checkpoint; UnsupportedArchitecture naming every foreign key otherwise."""
    known = {f.name for f in fields(GPTConfig)}
    config = meta["model_config"]
    unknown_config = sorted(set(config) - known)
    try:
        gpt_config = GPTConfig(**{k: v for k, v in config.items() if k in known})
    except (TypeError, ValueError) as e:
        raise VerificationError(f"{name}: model_config {config} is invalid: {e}") from e
    with torch.device("meta"):
        expected = set(GPT(gpt_config).state_dict())
    unexpected = sorted({_pattern(k) for k in state_keys} - {_pattern(k) for k in expected})
    if unknown_config or unexpected:
        found = sorted({what for frag, what in UPSTREAM_FEATURES.items()
                        if any(frag in k for k in [*unknown_config, *unexpected])})
        raise UnsupportedArchitecture(
            f"{name}: unsupported architecture: model_config keys {unknown_config or 'none'} and state-dict keys "
            f"{unexpected[:10] or 'none'}{' ...' if len(unexpected) > 10 else ''} are not part of this model"
            f"{' (' + ', '.join(found) + ': the 2026 upstream nanochat)' if found else ''}. This project runs the "
            "late-2025 nanochat GPT; import a checkpoint of that architecture (e.g. one trained by this pipeline or "
            "by nanochat before value embeddings and sliding windows)")
    return gpt_config


def load_state_dict(path: Path, name: str) -> dict:
    """The model's tensors, memory-mapped (weights_only: a checkpoint is data, never code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise VerificationError(f"cannot read {name} ({path.stat().st_size:,} bytes): {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}. The file is truncated, corrupt or not "
                                "a weights-only PyTorch checkpoint; download it again") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VerificationError(f"{name} does not hold a state_dict (a dict of tensors)")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


@dataclass
class Verified:
    model: GPT
    tokenizer: RustBPETokenizer
    token_bytes: torch.Tensor
    meta: dict
    config: GPTConfig


def verify(layout: Layout, paths: dict[str, Path], meta: dict) -> Verified:
    """Steps 2-4 of the module docstring on fetched files; returns the loaded model for the caller to drop."""
    state = load_state_dict(paths[layout.model], layout.model)
    config = check_architecture(meta, list(state), layout.model)
    try:
        tokenizer = RustBPETokenizer.from_directory(paths[layout.tokenizer].parent)
    except Exception as e:
        raise VerificationError(f"cannot load {layout.tokenizer}: {e}") from e
    vocab = tokenizer.get_vocab_size()
    if vocab != config.vocab_size:
        raise VerificationError(f"vocab mismatch: {layout.tokenizer} has {vocab:,} tokens, the model "
                                f"({layout.model}) {config.vocab_size:,}: the tokenizer is not the one this model "
                                "was trained with; ship the training run's tokenizer.pkl beside it")
    try:  # a checkpoint that records its tokenizer (one of ours, re-imported): the shipped one must be that one
        check_tokenizer(meta, tokenizer, layout.meta, layout.tokenizer)
    except CheckpointError as e:
        raise VerificationError(str(e)) from e
    if layout.token_bytes:
        try:
            token_bytes = torch.load(paths[layout.token_bytes], map_location="cpu", weights_only=True)
        except Exception as e:
            raise VerificationError(f"cannot read {layout.token_bytes}: {type(e).__name__}: {e}") from e
        if not isinstance(token_bytes, torch.Tensor) or tuple(token_bytes.shape) != (vocab,):
            raise VerificationError(f"{layout.token_bytes} should be a ({vocab},) tensor of token byte lengths, got "
                                    f"{getattr(token_bytes, 'shape', type(token_bytes).__name__)}")
    else:
        token_bytes = compute_token_bytes(tokenizer)
    try:
        model = model_from_state_dict(state, config.to_dict(), "cpu", layout.model)
    except CheckpointError as e:
        raise VerificationError(str(e)) from e
    model.eval()
    ids = tokenizer.encode(PROBE_PROMPT, prepend=tokenizer.get_bos_token_id())
    with torch.inference_mode():
        logits = model(torch.tensor([ids], dtype=torch.long))
    if tuple(logits.shape) != (1, len(ids), config.vocab_size) or not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise VerificationError(f"{layout.model}: a forward pass on {PROBE_PROMPT!r} gave {bad} non-finite logits "
                                f"(shape {tuple(logits.shape)}): the weights are damaged (NaN/inf)")
    return Verified(model, tokenizer, token_bytes, meta, config)
