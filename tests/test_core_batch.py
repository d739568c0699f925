"""core_batch: packing CORE rows into forward passes, and the batched scores against the original's loop."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_core_eval import tiny_model

from nanochat.bench_core import original_task_scores
from nanochat.core_batch import MIN_PASS_TOKENS, PASS_WASTE, pack
from nanochat.core_eval import (
    evaluate_task,
    load_core_tasks,
    load_task_data,
    prepare_examples,
    sample_fewshot,
    task_scores,
)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine (see tests/test_core_eval.py)
    yield
    torch.set_num_threads(threads)


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


def same_scores(got: list[list], expected: list[list], task_type: str) -> bool:
    """The same verdicts (language_modeling) or, per example, mean losses equal to fp32 rounding and the same
    chosen row. Bit-equality is not asserted: a row's float sums depend on the shapes it is computed in (which
    rows share its pass, its padding), as on the thread count; on this machine they come out bit-identical."""
    if task_type == "language_modeling":
        return got == expected
    return all(len(g) == len(e) and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(g, e))
               and g.index(min(g)) == e.index(min(e)) for g, e in zip(got, expected))


def test_batched_scoring_gives_the_original_per_example_loops_scores(shared_data, small_tokenizer, one_thread):
    """Every available task on a fixed model (fp32): task_scores (examples batched together, shared prefixes run
    once, only continuation positions unembedded) gives the scores of the original nanochat's loop (one pass per
    example, full logits), however its rows are packed into passes; the accuracies are equal."""
    model = tiny_model(seq_len=256, lm_head_std=0.1).eval()
    compared, shared = 0, 0
    for task in load_core_tasks(shared_data / "eval_bundle"):
        if not task["path"].is_file():
            continue
        kind, data = task["task_type"], load_task_data(task["path"], task["task_type"])
        args = (model, small_tokenizer, data, kind, task["num_fewshot"], task["delimiter"], 8, "cpu")
        expected = original_task_scores(*args)
        evaluated, _, batched = task_scores(*args)
        _, _, one_row_per_pass = task_scores(*args, batch_tokens=1)
        assert same_scores(batched, expected, kind) and same_scores(one_row_per_pass, expected, kind), task["label"]
        correct, n = evaluate_task(*args[:7], device="cpu")
        golds = [row.get("gold") for row in evaluated]
        original_correct = sum(bool(s[0]) if kind == "language_modeling" else s.index(min(s)) == g
                               for s, g in zip(expected, golds))
        assert (correct, n) == (original_correct, 8), task["label"]
        if kind != "language_modeling":  # how many examples take the shared-prefix path (few-shot drawn alike)
            fewshots = [[evaluated[i] for i in sample_fewshot(8, idx, task["num_fewshot"])] for idx in range(8)]
            shared += sum(bool(e.shared) for e in prepare_examples(small_tokenizer, evaluated, fewshots, kind,
                                                                   task["delimiter"], 256))
        compared += len(expected)
    assert compared == 18 * 8
    assert 8 <= shared < 11 * 8  # both paths ran: shared prefixes (few-shot multiple choice) and whole rows
