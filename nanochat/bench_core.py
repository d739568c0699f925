"""
`python -m nanochat.bench core`: CORE examples/s per task type, and with --baseline the original nanochat's
evaluation loop on the same model and examples, timed task by task alternately with ours.

The baseline is the original's compute (core_eval.py of late-2025 nanochat): one forward pass per example with
its choices as the rows, logits (soft-capped) at every position, per-position cross-entropy and argmax over
the whole (B, T, V) tensor, then the mean of each row's continuation slice. Its prompts are rendered and
tokenized by our code (the original renders a Jinja template per example, which is slower): the ratio is, if
anything, in the original's favour. `identical` says whether every per-row score (mean loss, or the greedy
verdict) is bit-identical to the baseline's, `same_answers` whether every example's outcome (chosen option, or
verdict) is the same, `max_rel_diff` the largest relative difference of a mean loss.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

from nanochat.bench import device_and_dtype, load_or_train_tokenizer, machine_info, random_model
from nanochat.common import autocast_for, eval_dtype
from nanochat.core_batch import outcome
from nanochat.core_eval import (
    SHUFFLE_SEED,
    evaluate_core,
    example_batch,
    find_eval_bundle,
    load_core_tasks,
    load_task_data,
    sample_fewshot,
    task_scores,
)


@torch.inference_mode()
def original_example_scores(model, rows: list[list[int]], spans: list[tuple[int, int]], task_type: str,
                            pad_id: int, device) -> list:
    """The original nanochat's forward_model + scoring of one example: per row, the mean continuation loss or
    (language_modeling, one row) whether every argmax prediction matches."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    ids = ids.to(device)
    batch, seq = ids.size()
    logits = model(ids)
    targets = torch.roll(ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.view(batch * seq, -1), targets.view(batch * seq), reduction="none")
    losses = losses.view(batch, seq)
    predictions = logits.argmax(dim=-1)
    if task_type == "language_modeling":
        start, end = spans[0]
        return [bool(torch.all(predictions[0, start - 1 : end - 1] == ids[0, start:end]))]
    return [losses[i, start - 1 : end - 1].mean().item() for i, (start, end) in enumerate(spans)]


def original_task_scores(model, tokenizer, data: list[dict], task_type: str, num_fewshot: int, delimiter: str,
                         max_per_task: int, device) -> list[list]:
    """Per example (the same shuffle, truncation and few-shot draws as core_eval.task_scores, one process), the
    original's per-row scores."""
    data = list(data)
    random.Random(SHUFFLE_SEED).shuffle(data)
    n = len(data) if max_per_task <= 0 else min(max_per_task, len(data))
    pool = data[: max(n, num_fewshot + 1)]
    scores = []
    for idx in range(n):
        fewshot = [pool[i] for i in sample_fewshot(len(pool), idx, num_fewshot)]
        rows, spans = example_batch(tokenizer, data[idx], task_type, delimiter, fewshot, model.config.sequence_len)
        scores.append(original_example_scores(model, rows, spans, task_type, tokenizer.get_bos_token_id(), device))
    return scores


def compare_with_original(model, tokenizer, device, autocast, bundle_dir, max_per_task: int,
                          tasks: list[str] | None) -> dict:
    """Per task type: examples, seconds and examples/s of ours and of the original's loop (alternating which
    runs first, task by task, so that load on a shared machine hits both alike), their ratio, whether every
    score was identical, every answer the same, and the largest relative difference of a mean loss."""
    by_type: dict[str, dict] = {}
    model.eval()
    with autocast:
        for i, task in enumerate(t for t in load_core_tasks(find_eval_bundle(bundle_dir))
                                 if t["path"].is_file() and (tasks is None or t["label"] in tasks)):
            data = load_task_data(task["path"], task["task_type"])
            args = (model, tokenizer, data, task["task_type"], task["num_fewshot"], task["delimiter"], max_per_task,
                    device)
            timed = {}
            for which in (("ours", "original") if i % 2 == 0 else ("original", "ours")):
                t0 = time.perf_counter()
                scores = task_scores(*args)[2] if which == "ours" else original_task_scores(*args)
                timed[which] = (time.perf_counter() - t0, scores)
            entry = by_type.setdefault(task["task_type"], {"tasks": 0, "examples": 0, "ours_s": 0.0,
                                                           "original_s": 0.0, "identical": True,
                                                           "same_answers": True, "max_rel_diff": 0.0})
            entry["tasks"] += 1
            entry["examples"] += len(timed["ours"][1])
            entry["ours_s"] += timed["ours"][0]
            entry["original_s"] += timed["original"][0]
            ours, original = timed["ours"][1], timed["original"][1]
            entry["identical"] &= ours == original
            entry["same_answers"] &= all(outcome(a, task["task_type"]) == outcome(b, task["task_type"])
                                         for a, b in zip(ours, original, strict=True))
            if task["task_type"] != "language_modeling":
                entry["max_rel_diff"] = max([entry["max_rel_diff"]] + [abs(x - y) / max(abs(y), 1e-30)
                                            for a, b in zip(ours, original) for x, y in zip(a, b, strict=True)])
    for entry in by_type.values():
        entry["ours_examples_per_sec"] = round(entry["examples"] / entry["ours_s"], 2)
        entry["original_examples_per_sec"] = round(entry["examples"] / entry["original_s"], 2)
        entry["ratio"] = round(entry["original_s"] / entry["ours_s"], 2)
        entry["ours_s"], entry["original_s"] = round(entry["ours_s"], 3), round(entry["original_s"], 3)
        entry["max_rel_diff"] = float(f"{entry['max_rel_diff']:.2g}")
    return by_type


def bench_core(args, tokenizer=None) -> dict:
    """CORE (nanochat.core_eval) on a checkpoint or a random model: examples/s per task type and overall, in the
    dtype evaluations default to (common.eval_dtype: fp32 on CPU) unless --dtype says otherwise."""
    from nanochat.checkpoint_manager import build_model, find_last_step
    from nanochat.tokenizer import RustBPETokenizer

    device, _ = device_and_dtype(args)
    dtype = args.dtype or eval_dtype(device)
    if args.checkpoint_dir:
        step = args.step if args.step is not None else find_last_step(args.checkpoint_dir)
        tokenizer = RustBPETokenizer.from_directory(args.tokenizer_dir) if args.tokenizer_dir else None
        model, tokenizer, _ = build_model(args.checkpoint_dir, step, device, "eval", tokenizer=tokenizer)
        model_name = f"{args.checkpoint_dir} step {step}"
    else:
        tokenizer = tokenizer or load_or_train_tokenizer(args.tokenizer_dir, args.vocab_size)
        vocab = tokenizer.get_vocab_size()
        model_vocab = getattr(args, "model_vocab_size", 0) or vocab
        if model_vocab < vocab:
            raise ValueError(f"--model-vocab-size {model_vocab} is smaller than the tokenizer's vocab {vocab}")
        model = random_model(args, model_vocab, device, args.seq_len)
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # a zero lm_head would make every choice tie
        model_name = f"random d{args.depth}"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
    core = evaluate_core(model, tokenizer, device, args.bundle_dir, args.max_per_task, tasks,
                         autocast_for(device, dtype))

    by_type: dict[str, dict] = {}
    for t in core["tasks"].values():
        entry = by_type.setdefault(t["task_type"], {"tasks": 0, "examples": 0, "seconds": 0.0})
        entry["tasks"] += 1
        entry["examples"] += t["examples"]
        entry["seconds"] += t["seconds"]
    for entry in by_type.values():
        entry["examples_per_sec"] = round(entry["examples"] / entry["seconds"], 2) if entry["seconds"] else 0.0
        entry["seconds"] = round(entry["seconds"], 3)
    line = {
        "bench": "core", **machine_info(device), "device": device.type, "dtype": dtype, "model": model_name,
        "params": model.num_params(), "seq_len": model.config.sequence_len, "vocab_size": model.config.vocab_size,
        "max_per_task": args.max_per_task, "core_label": core["core_label"], "core": core["core"],
        "examples": core["examples"], "seconds": round(sum(by_type[k]["seconds"] for k in by_type), 3),
        "examples_per_sec": round(core["examples_per_sec"], 2), "by_task_type": by_type,
    }
    if getattr(args, "baseline", False):
        line["vs_original"] = compare_with_original(model, tokenizer, device, autocast_for(device, dtype),
                                                    args.bundle_dir, args.max_per_task, tasks)
    return line
