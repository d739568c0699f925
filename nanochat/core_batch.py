"""
Batched CORE scoring: the forward passes behind nanochat.core_eval.

The original nanochat runs one forward pass per example (its choices as the rows) and unembeds every position.
Here, for a chunk of examples at a time:
- rows are tokenized in one call, cropped once, sorted by length and packed into forward passes of up to
  `batch_tokens` tokens (rows of many examples together, right-padded once per pass, at most 1/8 padding);
- a multiple-choice (or schema) example whose options share a token prefix (the few-shot block and the query)
  runs that prefix once and then only each option's remainder, attending to the prefix's keys/values
  (`shares_prefix`); examples with prefixes of (nearly) one length do so together, one pass for their
  prefixes and one for all their options' remainders (`prefix_groups`);
- only the positions that predict a continuation token go through lm_head, and through the last block's
  queries, attention and MLP (`GPT.hidden_states(at=...)`: every position still gives that block its keys
  and values; a shared prefix runs nothing else there).

Right padding never changes a real token's result: attention is causal, so padding (after every real token)
is seen by no real position, and a shared prefix's keys/values are the ones each row would compute. The losses
equal the original's per-example pass in fp32 up to float rounding (a row's sums can depend on the shapes it
is computed in, as on the thread count) and give the same answers (tests/test_core_eval.py); `bench core
--baseline` reports whether they came out bit-identical, the same answers, and the largest relative difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A shared prefix must save at least this many tokens: examples sharing prefixes are grouped (below), so the
# extra pass they need is paid once per group, not per example.
MIN_SAVED_TOKENS = 8
# A group runs its shortest member's prefix length; it takes members whose prefix is within 1/GROUP_SLACK of it.
GROUP_SLACK = 16
BATCH_TOKENS = 8192  # rows x padded width of one flat forward pass
# pack closes a pass before its padding passes 1/PASS_WASTE of it, once it holds MIN_PASS_TOKENS (smaller
# passes pay their per-op overhead for little): fewer padded tokens through the model.
PASS_WASTE = 8
MIN_PASS_TOKENS = 1024
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
    whose hidden state is scored; 0 when that saves fewer than MIN_SAVED_TOKENS."""
    if len(rows) < 2:
        return 0
    shared = min(common_prefix(rows), min(start for start, _ in spans) - 1)
    return shared if shared * (len(rows) - 1) >= MIN_SAVED_TOKENS else 0


class PrefixCache:
    """The keys and values of a group of shared prefixes (one row per example, all of one length), put in front
    of each row of the pass that follows: row i continues prefix row_map[i]. Implements what GPT's attention
    calls on a kv cache: get_pos() and insert_kv()."""

    def __init__(self, n_layer: int, row_map: torch.Tensor):
        self.prefix: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.row_map = row_map
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
        return (torch.cat([pk.index_select(0, self.row_map), k], dim=2),
                torch.cat([pv.index_select(0, self.row_map), v], dim=2))


def prefix_groups(examples: list[Prepared], batch_tokens: int) -> list[tuple[int, list[int]]]:
    """(prefix length, example indices) groups: examples sorted by their shared length, each group running the
    shortest one's length (a member with a longer common prefix runs its extra tokens in every row, so a group
    only takes members within 1/16 of its length) and at most batch_tokens in its two passes together."""
    order = sorted((i for i, ex in enumerate(examples) if ex.shared), key=lambda i: examples[i].shared)
    groups: list[tuple[int, list[int]]] = []
    tokens = 0
    for i in order:
        ex = examples[i]
        if groups:
            shared, members = groups[-1]
            # Its prefix, then its rows' remainders: what this example adds to the group's two passes.
            added = shared + sum(len(r) - shared for r in ex.rows)
            if ex.shared - shared <= max(1, shared // GROUP_SLACK) and tokens + added <= batch_tokens:
                members.append(i)
                tokens += added
                continue
        groups.append((ex.shared, [i]))
        tokens = ex.shared + sum(len(r) - ex.shared for r in ex.rows)
    return groups


def score_pass(model, rows: list[list[int]], spans: list[tuple[int, int]], task_type: str, pad_id: int,
               device: torch.device | str, kv_cache: PrefixCache | None = None) -> list:
    """One forward pass over right-padded rows (positions after kv_cache's prefix, if any). Per row: the mean
    cross-entropy of its continuation, or (language_modeling) whether greedy decoding reproduces it."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long).to(device)
    # Position t predicts token t + 1: a span [start, end) is scored from positions start-1 .. end-2.
    row_idx = [i for i, (s, e) in enumerate(spans) for _ in range(e - s)]
    pos_idx = [t for s, e in spans for t in range(s - 1, e - 1)]
    row_idx_t = torch.tensor(row_idx, device=ids.device)
    pos_idx_t = torch.tensor(pos_idx, device=ids.device)
    lengths = [e - s for s, e in spans]
    # Only the scored positions' hidden states (the last block's queries, attention and MLP for them alone):
    # each row's span from its start, padded to the longest span (slots past a row's span, clamped to the row,
    # are computed and dropped).
    at = torch.tensor([[min(s - 1 + j, width - 1) for j in range(max(lengths))] for s, _ in spans],
                      device=ids.device)
    keep = torch.tensor([[j < n for j in range(max(lengths))] for n in lengths], device=ids.device)
    logits = model.unembed(model.hidden_states(ids, kv_cache, at=at)[keep])
    targets = ids[row_idx_t, pos_idx_t + 1]
    if task_type == "language_modeling":
        hits = (logits.argmax(dim=-1) == targets).split(lengths)
        return [bool(h.all()) for h in hits]
    # The original's arithmetic: per-position fp32 cross-entropy, then the mean of each row's slice.
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    return torch.stack([seg.mean() for seg in losses.split(lengths)]).tolist()


def pack(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of rows grouped into passes: sorted by length, each pass at most batch_tokens (rows x the
    longest), and once it holds MIN_PASS_TOKENS, closed before padding would pass 1/PASS_WASTE of it. A row
    longer than batch_tokens gets a pass of its own."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    passes: list[list[int]] = []
    real = 0
    for i in order:
        if passes:
            rows, width = len(passes[-1]), lengths[passes[-1][-1]]
            padded = (rows + 1) * lengths[i]
            small = rows * width < MIN_PASS_TOKENS
            tight = not PASS_WASTE or (padded - real - lengths[i]) * PASS_WASTE <= padded
            if padded <= batch_tokens and (small or tight):
                passes[-1].append(i)
                real += lengths[i]
                continue
        passes.append([i])
        real = lengths[i]
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
    for shared, members in prefix_groups(examples, batch_tokens):
        prefixes = torch.tensor([examples[e].rows[0][:shared] for e in members], dtype=torch.long, device=device)
        row_map = torch.tensor([j for j, e in enumerate(members) for _ in examples[e].rows], device=device)
        cache = PrefixCache(model.config.n_layer, row_map)
        # No prefix position is scored: its last block computes only the keys and values.
        model.hidden_states(prefixes, cache, at=torch.zeros((len(members), 0), dtype=torch.long, device=device))
        scores = score_pass(model, [r[shared:] for e in members for r in examples[e].rows],
                            [(s - shared, end - shared) for e in members for s, end in examples[e].spans],
                            task_type, pad_id, device, cache)
        for e in members:
            results[e], scores = scores[: len(examples[e].rows)], scores[len(examples[e].rows):]
    return results


def outcome(scores: list, task_type: str) -> int | bool:
    """The predicted choice (the first of the lowest mean losses, as the original's list.index(min)), or
    (language_modeling) whether the continuation was reproduced."""
    if task_type == "language_modeling":
        return scores[0]
    return scores.index(min(scores))
