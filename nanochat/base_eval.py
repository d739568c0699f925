"""
Evaluate a base model: CORE (the DCLM in-context tasks), bits per byte on the train and val shards, and a few
greedy samples.

    python -m nanochat.base_eval --model-tag=d4 --device-type=cpu --max-per-task=100 --output=results.json
    torchrun --standalone --nproc_per_node=8 -m nanochat.base_eval

Missing data never fails the run: without an eval bundle CORE is skipped ("core_skipped" says why and how to
get it), without shards bpb is skipped ("bpb_skipped"). Rank 0 prints a table, writes --output and, when
Dagster launched us, reports the result through Pipes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch.distributed as dist

from nanochat.base_train import sample_prompts
from nanochat.checkpoint_manager import PHASE_DIRS, checkpoints_dir_for, find_largest_model, find_last_step, load_model
from nanochat.common import atomic_write, autocast_for, eval_dtype, is_distributed, print0
from nanochat.core_eval import EvalDataUnavailable, evaluate_core, find_eval_bundle
from nanochat.dataloader import DistributedTokenLoader
from nanochat.dataset import split_files
from nanochat.loss_eval import evaluate_bpb
from nanochat.pipes import run_training
from nanochat.tokenizer import get_token_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a nanochat base model: CORE, bits per byte, samples")
    p.add_argument("--source", default="base", choices=sorted(PHASE_DIRS), help="which checkpoints to load")
    p.add_argument("--model-tag", default=None, help="e.g. d20 (default: the largest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last saved)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="", help="bfloat16|float32 (default: bf16 on cuda, fp32 on CPU)")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per CORE task (-1: all)")
    p.add_argument("--core-tasks", default="", help="comma-separated CORE labels (default: all of core.yaml)")
    p.add_argument("--bundle-dir", default=None, help="eval bundle folder (default: see core_eval.find_eval_bundle)")
    p.add_argument("--no-core", action="store_true", help="skip CORE")
    p.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens per split for bpb")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per bpb forward pass")
    p.add_argument("--data-dir", default=None, help="shard directory (default $NANOCHAT_DATA_DIR)")
    p.add_argument("--output", default=None, help="write the result as JSON here (rank 0)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run_training(evaluate, parse_args(argv))


def locate_bundle(bundle_dir: str | None, rank: int) -> tuple[str | None, str | None]:
    """(bundle path, None) or (None, why it is unavailable). Rank 0 looks (and may download) for all ranks."""
    found: list = [None, None]
    if rank == 0:
        try:
            found = [str(find_eval_bundle(bundle_dir)), None]
        except EvalDataUnavailable as e:
            found = [None, str(e)]
    if is_distributed():
        dist.broadcast_object_list(found, src=0)
    return found[0], found[1]


def bits_per_byte(model, tokenizer, args, rank, world_size, device, autocast) -> tuple[dict, str | None]:
    """({"train": bpb, "val": bpb}, None), or ({}, why it was skipped) when there are no shards."""
    try:
        split_files("train", args.data_dir)  # raises when the shard directory is absent or holds < 2 shards
        token_bytes = get_token_bytes(device=device)
    except FileNotFoundError as e:
        return {}, str(e)
    B, T = args.device_batch_size, model.config.sequence_len
    steps = max(1, args.split_tokens // (B * T * world_size))
    bpb = {}
    for split in ("train", "val"):
        loader = DistributedTokenLoader(tokenizer, B, T, split, device, rank, world_size, args.data_dir)
        with autocast:
            bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
    return bpb, None


def print_report(result: dict) -> None:
    tasks = result["core_tasks"] or {}
    if tasks:
        print0(f"{'task':<34} {'type':<18} {'n':>6} {'accuracy':>9} {'centered':>9} {'baseline%':>9} {'s':>7}")
        for label, t in tasks.items():
            print0(f"{label:<34} {t['task_type']:<18} {t['examples']:>6} {t['accuracy']:>9.4f} "
                   f"{t['centered']:>9.4f} {t['random_baseline']:>9.1f} {t['seconds']:>7.1f}")
    if result["core"] is not None:
        print0(f"{result['core_label']}: {result['core']:.4f} ({result['core_examples_per_sec']:.1f} examples/s, "
               f"{result['core_dtype']})")
    for label in result["core_missing"] or []:
        print0(f"missing (no data file): {label}")
    if result["core_skipped"]:
        print0(f"CORE skipped: {result['core_skipped']}")
    if result["bpb_skipped"]:
        print0(f"bpb skipped: {result['bpb_skipped']}")
    else:
        print0(f"train bpb: {result['train_bpb']:.4f} | val bpb: {result['val_bpb']:.4f}")
    for sample in result["samples"]:
        print0(f"  sample: {sample!r}")
    print0(f"eval time: {result['eval_time_s']:.1f}s")


def evaluate(args, rank, world_size, device, reporter) -> dict:
    t0 = time.time()
    checkpoints_dir = checkpoints_dir_for(args.source)
    model_tag = args.model_tag or find_largest_model(checkpoints_dir)
    step = args.step if args.step is not None else find_last_step(checkpoints_dir / model_tag)
    model, tokenizer, _ = load_model(args.source, device, "eval", model_tag=model_tag, step=step)
    print0(f"evaluating {args.source} model {model_tag} step {step} on {world_size} x {device}")
    autocast = autocast_for(device, args.dtype or eval_dtype(device))

    core, core_skipped = None, None
    if args.no_core:
        core_skipped = "disabled with --no-core"
    else:
        bundle, core_skipped = locate_bundle(args.bundle_dir, rank)
        if bundle is not None:
            tasks = [t.strip() for t in args.core_tasks.split(",") if t.strip()] or None
            core = evaluate_core(model, tokenizer, device, bundle, args.max_per_task, tasks, autocast)

    bpb, bpb_skipped = bits_per_byte(model, tokenizer, args, rank, world_size, device, autocast)

    samples: list[str] = []
    if rank == 0:
        with autocast:
            samples = sample_prompts(model, tokenizer)

    core = core or {}
    result = {
        "source": args.source,
        "model_tag": model_tag,
        "step": step,
        "core": core.get("core"),
        "core_label": core.get("core_label"),
        "core_tasks_covered": core.get("tasks_covered"),
        "core_tasks_total": core.get("tasks_total"),
        "core_tasks": core.get("tasks"),
        "core_missing": core.get("missing"),
        "core_skipped": core_skipped,
        "core_examples_per_sec": core.get("examples_per_sec"),
        "core_dtype": core.get("dtype"),
        "train_bpb": bpb.get("train"),
        "val_bpb": bpb.get("val"),
        "bpb_skipped": bpb_skipped,
        "samples": samples,
        "eval_time_s": time.time() - t0,
    }
    if rank == 0:
        print_report(result)
        if args.output:
            text = json.dumps(result, indent=2)
            atomic_write(args.output, lambda f: f.write(text.encode("utf-8")))
    reporter.result(result)
    return result


if __name__ == "__main__":
    main()
