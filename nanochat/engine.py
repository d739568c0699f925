"""
Fast inference: a KV cache and an Engine that streams N samples for one prompt, with calculator tool use.

The prompt is prefilled once at batch size 1, and that cache is copied into a batch-N decode cache, so N
samples cost one prefill. Unlike the original, every row samples its own first token from the prefill
logits, so the N samples are truly independent draws.

Tool use: when a row emits <|python_start|> expr <|python_end|>, the expression goes to a small calculator
and <|output_start|> result <|output_end|> is forced into that row (those tokens carry mask 0: sampled by
the model = 1, forced by the engine = 0).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanochat.gpt import GPT, sample_next_token

# -----------------------------------------------------------------------------
# Calculator


class _Unsupported(Exception):
    pass


MAX_EXPR_CHARS = 256
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _eval_node(node: ast.AST):
    """Evaluate a tiny whitelisted subset of Python: arithmetic on numbers and 'literal'.count('literal')."""
    if isinstance(node, ast.Constant) and (_is_number(node.value) or isinstance(node.value, str)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval_node(node.operand)
        if not _is_number(value):
            raise _Unsupported("unary operator on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        # Numbers only: 'a' * 10**12 would be a memory bomb, and ** is not offered at all.
        if not (_is_number(left) and _is_number(right)):
            raise _Unsupported("arithmetic on a non-number")
        return _BINOPS[type(node.op)](left, right)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and not node.keywords
        and len(node.args) == 1
    ):
        haystack, needle = _eval_node(node.func.value), _eval_node(node.args[0])
        if isinstance(haystack, str) and isinstance(needle, str):
            return haystack.count(needle)
    raise _Unsupported(type(node).__name__)


def use_calculator(expr: str) -> int | float | None:
    """
    Evaluate a model-written calculator expression, or return None if it is not one we allow.

    The original calls eval() under a SIGALRM timeout; SIGALRM only works on the main thread (a served model
    runs in worker threads) and eval is a large attack surface, so this walks a whitelisted AST instead.
    """
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        return _eval_node(tree.body)
    except (SyntaxError, _Unsupported, ArithmeticError, ValueError, TypeError, RecursionError, MemoryError):
        return None


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """
    Keys and values of every layer, shape (n_layer, 2, B, n_kv_head, T, head_dim), allocated once at the full
    length: at construction when dtype is given (the Engine), else on first use with the dtype/device of the first
    keys. It never grows (an insert past the end is an error), so a decode step writes in place and copies nothing
    else. `pos` advances after the last layer inserts. `rotary` may hold the model's rotary tables for the cache's
    positions (GPT.rotary_tables), which the model then uses instead of converting its own every step.
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        self.kv_shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv_cache: torch.Tensor | None = None
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pos = 0
        if dtype is not None:
            self._allocate(dtype, device)

    def _allocate(self, dtype: torch.dtype, device) -> None:
        self.kv_cache = torch.empty(self.kv_shape, dtype=dtype, device=device)
        # Per-layer views, made once: a decode step indexes no more than a time slice of them.
        self.keys, self.values = self.kv_cache[:, 0].unbind(0), self.kv_cache[:, 1].unbind(0)

    def reset(self) -> None:
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def prefill(self, other: KVCache) -> None:
        """Copy another cache's filled prefix into this (unused) one, broadcasting batch 1 to batch N."""
        if self.pos:
            raise RuntimeError("prefill() needs an empty cache")
        if other.kv_cache is None:
            raise RuntimeError("prefill() source cache is empty")
        n_layer, _, batch, heads, seq_len, head_dim = self.kv_shape
        o_layer, _, o_batch, o_heads, _, o_dim = other.kv_shape
        if (n_layer, heads, head_dim) != (o_layer, o_heads, o_dim):
            raise ValueError(f"cache shapes differ: {self.kv_shape} vs {other.kv_shape}")
        if o_batch not in (1, batch):
            raise ValueError(f"cannot broadcast a batch-{o_batch} cache to batch {batch}")
        if seq_len < other.pos:
            raise ValueError(f"cache of length {seq_len} cannot hold a {other.pos}-token prefix")
        if self.kv_cache is None:
            self._allocate(other.kv_cache.dtype, other.kv_cache.device)
        self.kv_cache[:, :, :, :, : other.pos] = other.kv_cache[:, :, :, :, : other.pos]
        self.pos = other.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_cache is None:
            self._allocate(k.dtype, k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.kv_shape[4]:
            raise ValueError(f"KV cache full: {t1} positions asked of a cache sized for {self.kv_shape[4]}")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, t0:t1] = k
        values[:, :, t0:t1] = v
        if layer_idx == self.kv_shape[0] - 1:
            self.pos = t1
        return keys[:, :, :t1], values[:, :, :t1]


# -----------------------------------------------------------------------------
# Engine


@dataclass
class RowState:
    tokens: list[int]
    forced: deque = field(default_factory=deque)  # tokens the engine injects next (tool output)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    completed: bool = False


class Engine:
    def __init__(self, model: GPT, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_ids = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def _check_prompt(self, tokens) -> list[int]:
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError("tokens must be a non-empty list of token ids (start with the BOS id)")
        vocab = self.model.config.vocab_size
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"token id {t!r} is not an int in [0, {vocab})")
        limit = self.model.cos.size(1)
        if len(tokens) >= limit:
            raise ValueError(f"prompt of {len(tokens)} tokens leaves no room (model limit {limit} positions)")
        return list(tokens)

    def _kv_cache(self, batch_size: int, seq_len: int) -> KVCache:
        """A cache allocated now at its full length, in the dtype the model computes keys in (the autocast dtype
        if autocast is on, else its weights'), with the rotary tables of its positions when the model has them."""
        c, device = self.model.config, self.model.get_device()
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        cache = KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, dtype, device)
        if hasattr(self.model, "rotary_tables"):
            cache.rotary = self.model.rotary_tables(seq_len, dtype)
        return cache

    def _advance_tool_state(self, state: RowState, token: int) -> None:
        """The calculator state machine: collect tokens between python_start/end, queue the result."""
        if token == self.python_start:
            state.in_python, state.python_tokens = True, []
        elif token == self.python_end and state.in_python:
            state.in_python = False
            result = use_calculator(self.tokenizer.decode(state.python_tokens))
            if result is not None:
                state.forced.append(self.output_start)
                state.forced.extend(self.tokenizer.encode(str(result)))
                state.forced.append(self.output_end)
            state.python_tokens = []
        elif state.in_python:
            state.python_tokens.append(token)

    @torch.inference_mode()
    def generate(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column) per step: one token per sample row; mask 1 = sampled, 0 = forced."""
        tokens = self._check_prompt(tokens)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        device = self.model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        # Never run past the rotary table: that is the model's hard position limit.
        room = self.model.cos.size(1) - len(tokens)
        max_tokens = room if max_tokens is None else min(max_tokens, room)

        # 1) Prefill once at batch 1, in a cache sized exactly to the prompt.
        prefill_cache = self._kv_cache(1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model.forward(ids, kv_cache=prefill_cache, last_only=True)[:, -1, :]
        # Each row samples its own first token: expand (not share) the prefill logits.
        logits = logits.expand(num_samples, -1)

        # 2) Clone the prefix into the batch-N decode cache.
        decode_cache = self._kv_cache(num_samples, len(tokens) + max_tokens)
        decode_cache.prefill(prefill_cache)
        del prefill_cache

        rows = [RowState(tokens.copy()) for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = [], []
            for state, sampled_token in zip(rows, sampled):
                forced = bool(state.forced)
                token = state.forced.popleft() if forced else sampled_token
                column.append(token)
                masks.append(0 if forced else 1)
                state.tokens.append(token)
                if token in self.stop_ids:
                    state.completed = True
                self._advance_tool_state(state, token)
            yield column, masks
            if all(s.completed for s in rows) or step == max_tokens - 1:
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model.forward(ids, kv_cache=decode_cache)[:, -1, :]

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list, list]:
        """Run generate() to the end; return per-row token lists (prompt included, stop token excluded) and masks."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if completed[i]:
                    continue
                if token in self.stop_ids:
                    completed[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(completed):
                break
        return results, masks
