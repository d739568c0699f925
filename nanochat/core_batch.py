"""
Batched CORE scoring: the forward passes behind nanochat.core_eval.

The original nanochat runs one forward pass per example (its choices as the rows) and unembeds every position.
Here, for a chunk of examples at a time:
- rows are tokenized in one call, cropped once, sorted by length and packed into forward passes of up to
  `batch_tokens` tokens (rows of many examples together, right-padded once per pass);
- a multiple-choice (or schema) example whose options share a long token prefix (the few-shot block and the
  query) runs that prefix once, batch 1, and then only each option's remainder, attending to the prefix's
  keys/values; it does so only when the tokens saved outweigh the extra forward pass (`shares_prefix`);
- only the positions that predict a continuation token go through lm_head.

Right padding never changes a real token's result: attention is causal, so padding (after every real token)
is seen by no real position. Rows without a shared prefix therefore get bit-identical losses to the original's
per-example pass in fp32 (tests/test_core_eval.py checks it); rows scored after a shared prefix agree to
float rounding (a different summation order in attention), and give the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# One forward pass costs about as much as this many extra tokens (dispatching a few hundred small ops of a
# small model on CPU); a shared prefix must save more than the extra pass it needs.
FORWARD_OVERHEAD_TOKENS = 64
BATCH_TOKENS = 8192  # rows x padded width of one flat forward pass
CHUNK_EXAMPLES = 256  # examples prepared (tokenized) at a time: bounds memory on a full task of 10,000


@dataclass
class Prepared:
    """One example's token rows (cropped), the [start, end) of each row's scored continuation, and how many
    leading tokens all rows share and run once (0: each row goes through the model whole)."""

    rows: list[list[int]]
    spans: list[tuple[int, int]]
    shared: int = 0


def common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def shares_prefix(rows: list[list[int]], spans: list[tuple[int, int]]) -> int:
    """How many leading tokens the rows run once: their common prefix, up to (not including) the first position
    whose hidden state is scored; 0 when that saves less than the extra forward pass costs."""
    if len(rows) < 2:
        return 0
    shared = min(common_prefix(rows), min(start for start, _ in spans) - 1)
    return shared if shared * (len(rows) - 1) > 2 * FORWARD_OVERHEAD_TOKENS else 0


class PrefixCache:
    """The keys and values of one shared prefix (computed with batch 1), put in front of every row of the pass
    that follows. Implements what GPT's attention calls on a kv cache: get_pos() and insert_kv()."""

    def __init__(self, n_layer: int):
        self.prefix: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stored = self.prefix[layer_idx]
        if stored is None:  # the prefix pass: keep its keys/values
            self.prefix[layer_idx] = (k, v)
            if layer_idx == len(self.prefix) - 1:
                self.pos = k.size(2)
            return k, v
        pk, pv = stored
        batch = k.size(0)
        return (torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2),
                torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2))


def score_pass(model, rows: list[list[int]], spans: list[tuple[int, int]], task_type: str, pad_id: int,
               device: torch.device | str, kv_cache: PrefixCache | None = None) -> list:
    """One forward pass over right-padded rows (positions after kv_cache's prefix, if any). Per row: the mean
    cross-entropy of its continuation, or (language_modeling) whether greedy decoding reproduces it."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long).to(device)
    hidden = model.hidden_states(ids, kv_cache)
    # Position t predicts token t + 1: a span [start, end) is scored from positions start-1 .. end-2.
    row_idx = [i for i, (s, e) in enumerate(spans) for _ in range(e - s)]
    pos_idx = [t for s, e in spans for t in range(s - 1, e - 1)]
    row_idx_t = torch.tensor(row_idx, device=ids.device)
    pos_idx_t = torch.tensor(pos_idx, device=ids.device)
    logits = model.unembed(hidden[row_idx_t, pos_idx_t])
    targets = ids[row_idx_t, pos_idx_t + 1]
    lengths = [e - s for s, e in spans]
    if task_type == "language_modeling":
        hits = (logits.argmax(dim=-1) == targets).split(lengths)
        return [bool(h.all()) for h in hits]
    # The original's arithmetic: per-position fp32 cross-entropy, then the mean of each row's slice.
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    return torch.stack([seg.mean() for seg in losses.split(lengths)]).tolist()


def pack(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of rows grouped into passes: sorted by length, each pass at most batch_tokens (rows x the
    longest), so padding stays small. A row longer than batch_tokens gets a pass of its own."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    passes: list[list[int]] = []
    for i in order:
        if passes and (len(passes[-1]) + 1) * lengths[i] <= batch_tokens:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


@torch.inference_mode()
def score_examples(model, examples: list[Prepared], task_type: str, pad_id: int, device: torch.device | str,
                   batch_tokens: int = BATCH_TOKENS) -> list[list]:
    """Per example, per row: the mean continuation loss (multiple_choice, schema) or whether the continuation
    is reproduced greedily (language_modeling), in the order given."""
    results: list[list] = [[None] * len(ex.rows) for ex in examples]
    flat = [(e, r) for e, ex in enumerate(examples) if not ex.shared for r in range(len(ex.rows))]
    for group in pack([len(examples[e].rows[r]) for e, r in flat], batch_tokens):
        members = [flat[i] for i in group]
        scores = score_pass(model, [examples[e].rows[r] for e, r in members],
                            [examples[e].spans[r] for e, r in members], task_type, pad_id, device)
        for (e, r), score in zip(members, scores):
            results[e][r] = score
    for e, ex in enumerate(examples):
        if ex.shared:
            cache = PrefixCache(model.config.n_layer)
            model.hidden_states(torch.tensor([ex.rows[0][: ex.shared]], dtype=torch.long, device=device), cache)
            results[e] = score_pass(model, [r[ex.shared:] for r in ex.rows],
                                    [(s - ex.shared, end - ex.shared) for s, end in ex.spans],
                                    task_type, pad_id, device, cache)
    return results


def outcome(scores: list, task_type: str) -> int | bool:
    """The predicted choice (the first of the lowest mean losses, as the original's list.index(min)), or
    (language_modeling) whether the continuation was reproduced."""
    if task_type == "language_modeling":
        return scores[0]
    return scores.index(min(scores))
