"""core_batch's packing of CORE rows into forward passes (its scores: tests/test_core_eval.py)."""

from __future__ import annotations

import random

from nanochat.core_batch import MIN_PASS_TOKENS, PASS_WASTE, pack


def test_pack_bounds_each_pass_by_tokens_and_padding():
    """pack: every row in exactly one pass, rows sorted by length, no pass over batch_tokens (unless one row
    is), and a pass of MIN_PASS_TOKENS or more closed before its padding passes 1/PASS_WASTE of it."""
    rng = random.Random(0)
    lengths = [rng.randint(20, 900) for _ in range(300)] + [5000]
    passes = pack(lengths, 4096)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert [lengths[i] for p in passes for i in p] == sorted(lengths)
    for p in passes:
        padded, real = len(p) * max(lengths[i] for i in p), sum(lengths[i] for i in p)
        assert padded <= 4096 or len(p) == 1
        # Without its last row the pass was either small or within the padding bound.
        head = p[:-1]
        head_padded = len(head) * max((lengths[i] for i in head), default=0)
        assert head_padded < MIN_PASS_TOKENS or (padded - real) * PASS_WASTE <= padded
    # 24 rows fit one pass of 8,192 tokens, but with a quarter of it padding: two passes, none.
    assert pack([100] * 12 + [200] * 12, 8192) == [list(range(12)), list(range(12, 24))]
    assert pack([7, 3, 5], 1) == [[1], [2], [0]]  # one row per pass
