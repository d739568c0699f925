"""
What a checkpoint must satisfy before anything is allocated for it: a model_config with every field an int in range,
the memory that config implies, a state dict whose keys, shapes, strides and dtypes are exactly the model's, and
finite weights. Shapes and sizes are worked out arithmetically: a hostile config (a million layers, a context of
5e7) is refused without building anything. The file-level checks (regular file, bounded size, no compression, no
zero-stride views) are in nanochat/safe_io.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from nanochat.gpt import GPTConfig
from nanochat.safe_io import check_tensor, clip, memory_limit_bytes, nonfinite_count, short

logger = logging.getLogger("nanochat")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, malformed, or does not match the model it should load into."""


# The fields of meta_*.json that code reads back, and the types they must have (anything else is kept as is).
META_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "model_config": (dict,), "world_size": (int,), "val_bpb": (int, float, type(None)),
    "val_loss": (int, float, type(None)), "loop_state": (dict,), "dataloader_state_dict": (dict, type(None)),
    "dataloader_state_dicts": (list, type(None)),
}


def parse_meta(data: bytes, path: Path) -> dict:
    """A meta_*.json's bytes: a JSON object whose known fields have the right types."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON or a 5000-digit number
        raise CheckpointError(f"metadata file {path} is not valid JSON: {clip(str(e), 200)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"metadata file {path} holds a JSON {type(meta).__name__}, expected an object")
    for key, types in META_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, types) or isinstance(value, bool)):
            raise CheckpointError(f"metadata file {path}: field {key!r} is {short(value, 80)} "
                                  f"({type(value).__name__}), expected {' or '.join(t.__name__ for t in types)}")
    return meta


# What a model_config may ask for. Far above any real nanochat model (d32: 32 layers, 2048 wide, 65k vocab, 2k
# context) yet small enough that a config is refused before anything is built; memory is checked next.
CONFIG_LIMITS = {"sequence_len": 1 << 20, "vocab_size": 1 << 24, "n_layer": 1024, "n_head": 1024, "n_kv_head": 1024,
                 "n_embd": 1 << 16}


def parse_model_config(model_config: object, source: Path | str) -> GPTConfig:
    """A GPTConfig from a meta's model_config, every field an int in range; CheckpointError naming the field."""
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{source}: model_config is a {type(model_config).__name__}, expected an object with "
                              f"{sorted(CONFIG_LIMITS)}")
    unknown = sorted(map(str, set(model_config) - set(CONFIG_LIMITS)))
    if unknown:
        raise CheckpointError(f"{source}: model_config has unknown fields {short(unknown, 200)}; expected "
                              f"{sorted(CONFIG_LIMITS)}")
    for name, high in CONFIG_LIMITS.items():
        value = model_config.get(name)
        if type(value) is not int or not 1 <= value <= high:
            raise CheckpointError(f"{source}: model_config.{name} = {short(value, 60)} must be an integer in "
                                  f"1..{high:,}")
    try:
        return GPTConfig(**model_config)
    except ValueError as e:
        raise CheckpointError(f"{source}: model_config {short(model_config, 300)} is inconsistent: {e}") from None


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The state_dict a GPT of this config has, worked out without building one (a hostile config could not be)."""
    C, V, head_dim = config.n_embd, config.vocab_size, config.n_embd // config.n_head
    shapes = {"transformer.wte.weight": (V, C), "lm_head.weight": (V, C)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        kv = config.n_kv_head * head_dim
        shapes |= {h + "attn.c_q.weight": (config.n_head * head_dim, C), h + "attn.c_k.weight": (kv, C),
                   h + "attn.c_v.weight": (kv, C), h + "attn.c_proj.weight": (C, C),
                   h + "mlp.c_fc.weight": (4 * C, C), h + "mlp.c_proj.weight": (C, 4 * C)}
    return shapes


def model_bytes(config: GPTConfig) -> int:
    """Peak memory to build this model: fp32 weights plus the rotary tables (10x the context, built in fp32)."""
    params = sum(math.prod(s) for s in param_shapes(config).values())
    rotary = 10 * config.sequence_len * (config.n_embd // config.n_head // 2) * 24
    return params * 4 + rotary


def check_fits(config: GPTConfig, device, source: Path | str) -> None:
    device = torch.device(device)
    limit = memory_limit_bytes()
    if device.type == "cuda":
        limit = min(limit, torch.cuda.get_device_properties(device).total_memory)
    need = model_bytes(config)
    if need > limit:
        raise CheckpointError(
            f"{source}: model_config {config.to_dict()} needs {need / 2**30:,.1f} GiB to build, over the "
            f"{limit / 2**30:,.1f} GiB this {device.type} machine allows (set NANOCHAT_MAX_MODEL_BYTES to change it)")


def check_state_dict(config: GPTConfig, state: dict, source: Path) -> None:
    """Name every missing, unexpected, wrongly shaped or malformed key instead of load_state_dict's first complaint."""
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(map(str, set(state) - set(expected)))
    not_tensors = [k for k in expected if k in state and not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint {source}: {not_tensors[:4]} are not tensors")
    bad_shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                  for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {short(unexpected[:8], 400)}{' ...' if len(unexpected) > 8 else ''}")
        if bad_shapes:
            parts.append(f"shape mismatches {bad_shapes[:8]}")
        raise CheckpointError(f"checkpoint {source} does not match model_config {config.to_dict()}: "
                              + "; ".join(parts))
    for k in expected:
        problem = check_tensor(state[k], k)
        if problem is None and not state[k].is_floating_point():
            problem = f"{k} has dtype {state[k].dtype}, expected a floating-point dtype"
        if problem:
            raise CheckpointError(f"checkpoint {source}: {problem}")


def check_finite(state: dict, source: Path | str, allow_nonfinite: bool) -> None:
    bad = {k: n for k, v in state.items() if (n := nonfinite_count(v))}
    if not bad:
        return
    message = (f"checkpoint {source} holds NaN/inf weights ({short(bad, 300)}): training diverged or the file is "
               "damaged")
    if not allow_nonfinite:
        raise CheckpointError(message + "; load an earlier step (or pass allow_nonfinite=True to load it anyway)")
    logger.warning("LOADING ANYWAY (allow_nonfinite=True): %s; its outputs are not meaningful", message)
