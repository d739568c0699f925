"""
Evaluate a chat model (mid-trained or SFT) on the six chat tasks and their aggregate, ChatCORE.

    python -m nanochat.chat_eval -i sft
    python -m nanochat.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-per-task 100
    torchrun --standalone --nproc_per_node=8 -m nanochat.chat_eval -i sft

Two kinds of task:
- categorical (ARC-Easy, ARC-Challenge, MMLU): the question is rendered for completion, so the next token is the
  assistant's answer; one forward pass over a batch of questions gives that token's logits, restricted to the
  choice letters, and the argmax is the model's answer. No sampling, so nothing can go wrong with formatting.
- generative (GSM8K, HumanEval, SpellingBee): the Engine writes a reply (greedy by default, with the calculator
  tool active) and the task checks it. With --num-samples k (and a temperature > 0) each problem gets k replies:
  `accuracy` is then the fraction of correct replies (an estimate of pass@1) and `pass_at_k` the fraction of
  problems with at least one correct reply.

ChatCORE = mean over the tasks of the accuracy centered on its random baseline, (acc - baseline) / (1 - baseline):
0 is chance level, 1 is perfect. A task whose data is unavailable is reported as missing and the mean is taken
over the others, labelled ChatCORE[covered/6], so a partial score is never mistaken for a full one.

SpellingBee is synthetic, and ours generates different problems from the original's (templates, word split,
per-example seeds), so ChatCORE is also reported without it, as ChatCORE-noSB (ChatCORE-noSB[covered/5] when
partial): that one, and the five real tasks, are what compares with numbers the original code published. The
real tasks draw their `--max-per-task` subsets in the original's order (nanochat.tasks.common.shuffled_order).

Under torchrun, rank r evaluates the examples with index = r (mod world size) and the counts are summed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import checkpoints_dir_for, find_largest_model, find_last_step, load_model
from nanochat.common import atomic_write, autocast_for, eval_dtype, print0
from nanochat.engine import Engine
from nanochat.pipes import run_training
from nanochat.tasks import ARC, GSM8K, MMLU, DatasetUnavailableError, HumanEval, SpellingBee, Task

DataDir = str | os.PathLike | None

# name -> (build the eval split of the task, random baseline). SpellingBee is synthetic: 256 problems on words
# that no training split ever uses, as in the original.
CHAT_TASKS: dict[str, tuple[Callable[[DataDir], Task], float]] = {
    "ARC-Easy": (lambda d: ARC(subset="ARC-Easy", split="test", data_dir=d), 0.25),
    "ARC-Challenge": (lambda d: ARC(subset="ARC-Challenge", split="test", data_dir=d), 0.25),
    "MMLU": (lambda d: MMLU(subset="all", split="test", data_dir=d), 0.25),
    "GSM8K": (lambda d: GSM8K(split="test", data_dir=d), 0.0),
    "HumanEval": (lambda d: HumanEval(data_dir=d), 0.0),
    "SpellingBee": (lambda d: SpellingBee(size=256, split="test", data_dir=d), 0.0),
}

SYNTHETIC_TASK = "SpellingBee"  # ours, not the original's problems: left out of ChatCORE-noSB
NOSB_LABEL = "ChatCORE-noSB"
NUM_SAMPLES_SHOWN = 3  # generative completions kept for the report
SAMPLE_CHARS = 300


# -----------------------------------------------------------------------------
# ChatCORE


def chatcore(task_accuracies: dict[str, float], requested: list[str]) -> dict:
    """
    ChatCORE over the requested tasks that have an accuracy: each accuracy is centered on its random baseline,
    (acc - baseline) / (1 - baseline), and ChatCORE is their mean (None if no task has one). The label is plain
    "ChatCORE" only when all six tasks are covered, else "ChatCORE[covered/6]".
    """
    check_task_names(requested)
    covered = [name for name in dict.fromkeys(requested) if name in task_accuracies]
    centered = {}
    for name in covered:
        baseline = CHAT_TASKS[name][1]
        centered[name] = (task_accuracies[name] - baseline) / (1.0 - baseline)
    total = len(CHAT_TASKS)
    real = {name: value for name, value in centered.items() if name != SYNTHETIC_TASK}
    return {
        "chatcore": sum(centered.values()) / len(centered) if centered else None,
        "chatcore_label": "ChatCORE" if len(covered) == total else f"ChatCORE[{len(covered)}/{total}]",
        "chatcore_nosb": sum(real.values()) / len(real) if real else None,
        "chatcore_nosb_label": NOSB_LABEL if len(real) == total - 1 else f"{NOSB_LABEL}[{len(real)}/{total - 1}]",
        "tasks_covered": len(covered),
        "tasks_total": total,
        "centered": centered,
    }


def check_task_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in CHAT_TASKS]
    if unknown:
        raise ValueError(f"unknown chat task(s) {unknown}; choose from {list(CHAT_TASKS)} (names are case-sensitive; "
                         "on the command line separate them with '|', e.g. -a 'ARC-Easy|GSM8K')")


def check_settings(num_samples: int, temperature: float, max_new_tokens: int, batch_size: int) -> None:
    """Reject settings that would silently produce a meaningless number."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if num_samples > 1 and temperature == 0:
        raise ValueError(f"num_samples={num_samples} with temperature={temperature} would draw {num_samples} "
                         "identical greedy replies per problem; pass a temperature > 0 (e.g. 1.0) to sample, "
                         "or num_samples=1 for greedy decoding")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# -----------------------------------------------------------------------------
# Categorical tasks: one forward pass, argmax over the choice letters


def letter_token_ids(tokenizer, letters: list[str]) -> list[int]:
    """The token id of each choice letter, as the assistant writes it (the bare letter, no leading space)."""
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:
            raise ValueError(f"choice letter {letter!r} is {len(tokens)} tokens {tokens} in this tokenizer; "
                             "categorical scoring needs each letter to be a single token")
        ids.append(tokens[0])
    return ids


@torch.inference_mode()
def predict_letters(model, tokenizer, conversations: list[dict], batch_size: int = 8) -> list[str]:
    """
    The model's answer letter to each multiple-choice conversation (which carries its `letters`).

    Questions are batched: each prompt ends with <|assistant_start|>, rows are right-padded (with BOS; causal
    attention means padding after a row's last real token cannot change that token's logits), and the logits
    are read at each row's last real position. Prompts of similar length share a batch, to waste little
    compute on padding. Prompts longer than the model's positions keep their end.
    """
    device = model.get_device()
    limit = model.cos.size(1)  # the rotary table: the model's hard position limit
    pad = tokenizer.get_bos_token_id()
    prompts = [tokenizer.render_for_completion(c)[-limit:] for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(conversations)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lengths = [len(prompts[i]) for i in rows]
        ids = torch.full((len(rows), max(lengths)), pad, dtype=torch.long, device=device)
        for row, i in enumerate(rows):
            ids[row, : lengths[row]] = torch.tensor(prompts[i], dtype=torch.long)
        logits = model(ids)  # (B, T, V)
        last = logits[torch.arange(len(rows), device=device), torch.tensor(lengths, device=device) - 1]
        for row, i in enumerate(rows):
            letters = list(conversations[i]["letters"])
            choice_logits = last[row, letter_token_ids(tokenizer, letters)]
            answers[i] = letters[int(choice_logits.argmax())]
    return answers


def evaluate_categorical(model, tokenizer, task: Task, indices: list[int], batch_size: int) -> tuple[int, int]:
    """(number correct, number of samples) over `indices`; one sample per question."""
    conversations = [task[i] for i in indices]
    letters = predict_letters(model, tokenizer, conversations, batch_size)
    correct = sum(bool(task.evaluate(c, letter)) for c, letter in zip(conversations, letters))
    return correct, len(conversations)


# -----------------------------------------------------------------------------
# Generative tasks: sample with the Engine (calculator on), then let the task check the reply


def evaluate_generative(
    engine: Engine,
    task: Task,
    indices: list[int],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    shown: list[list[str]],
) -> tuple[int, int, int]:
    """(problems with any correct reply, correct replies, replies) over `indices`. Appends the first few
    [question, reply] pairs to `shown`."""
    tokenizer = engine.tokenizer
    room = engine.model.cos.size(1) - max_new_tokens  # prompt tokens that still leave room for the reply
    if room < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model has "
                         f"{engine.model.cos.size(1)} positions; lower --max-new-tokens")
    solved = correct = replies = 0
    for index in indices:
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)[-room:]
        # Seeded by the example's index, so results do not depend on the number of ranks.
        rows, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k if top_k > 0 else None, seed=index)
        completions = [tokenizer.decode(row[len(prompt):]) for row in rows]
        outcomes = [bool(task.evaluate(conversation, completion)) for completion in completions]
        solved += any(outcomes)
        correct += sum(outcomes)
        replies += len(outcomes)
        if len(shown) < NUM_SAMPLES_SHOWN:
            question = conversation["messages"][-2]["content"]
            shown.append([question[:SAMPLE_CHARS], completions[0][:SAMPLE_CHARS]])
    return solved, correct, replies


# -----------------------------------------------------------------------------
# The whole suite


def _sum_over_ranks(counts: list[int], device) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def run_chat_eval(
    model,
    tokenizer,
    device,
    tasks: list[str],
    max_per_task: int = -1,
    batch_size: int = 8,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int = 50,
    data_dir: DataDir = None,
) -> dict:
    """
    Evaluate `model` on the named chat tasks (the first `max_per_task` examples of each; -1 = all) and return
    a JSON-able dict: chatcore, chatcore_label, tasks_covered, tasks_total, tasks (per task: accuracy,
    centered, random_baseline, examples, seconds, and pass_at_k when num_samples > 1), missing (task -> why its
    data could not be loaded), examples_per_sec, and samples (the first few generative [question, reply]
    pairs seen on this rank). Wrap the call in an autocast context for bf16.
    """
    check_task_names(tasks)
    check_settings(num_samples, temperature, max_new_tokens, batch_size)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    engine = Engine(model, tokenizer)

    results: dict[str, dict] = {}
    missing: dict[str, str] = {}
    shown: list[list[str]] = []
    for name in dict.fromkeys(tasks):
        build, baseline = CHAT_TASKS[name]
        t0 = time.time()
        try:
            task = build(data_dir)
        except DatasetUnavailableError as e:
            missing[name] = str(e)
            print0(f"{name}: skipped, its data is unavailable: {e}")
            continue
        n = len(task) if max_per_task < 0 else min(len(task), max_per_task)
        if n == 0:
            missing[name] = f"{name} has no examples to evaluate (max_per_task={max_per_task}, {len(task)} in total)"
            continue
        indices = list(range(rank, n, world_size))
        if task.eval_type == "categorical":
            counts = evaluate_categorical(model, tokenizer, task, indices, batch_size)
            correct, total = _sum_over_ranks(list(counts), device)
            solved, problems = correct, total
        elif task.eval_type == "generative":
            counts = evaluate_generative(engine, task, indices, num_samples, max_new_tokens, temperature, top_k,
                                         shown)
            solved, correct, total = _sum_over_ranks(list(counts), device)
            problems = total // num_samples
        else:
            raise ValueError(f"task {name} has eval_type {task.eval_type!r}; expected categorical or generative")
        accuracy = correct / total
        results[name] = {
            "accuracy": accuracy,
            "centered": (accuracy - baseline) / (1.0 - baseline),
            "random_baseline": baseline,
            "examples": problems,
            "seconds": round(time.time() - t0, 3),
        }
        note = ""
        if task.eval_type == "generative" and num_samples > 1:
            results[name]["pass_at_k"] = solved / problems
            note = f", pass@{num_samples} {solved / problems:.4f}"
        print0(f"{name}: accuracy {accuracy:.4f}{note} ({problems} examples, {results[name]['seconds']:.1f}s)")

    aggregate = chatcore({name: r["accuracy"] for name, r in results.items()}, tasks)
    seconds = sum(r["seconds"] for r in results.values())
    return {
        "chatcore": aggregate["chatcore"],
        "chatcore_label": aggregate["chatcore_label"],
        "chatcore_nosb": aggregate["chatcore_nosb"],
        "chatcore_nosb_label": aggregate["chatcore_nosb_label"],
        "tasks_covered": aggregate["tasks_covered"],
        "tasks_total": aggregate["tasks_total"],
        "tasks": results,
        "missing": missing,
        "examples_per_sec": sum(r["examples"] for r in results.values()) / seconds if seconds > 0 else 0.0,
        "samples": shown,
    }


def format_table(result: dict) -> str:
    lines = [f"{'task':<14} {'accuracy':>9} {'centered':>9} {'baseline':>9} {'examples':>9} {'seconds':>8}"]
    for name, r in result["tasks"].items():
        extra = f"  pass@k {r['pass_at_k']:.4f}" if "pass_at_k" in r else ""
        lines.append(f"{name:<14} {r['accuracy']:>9.4f} {r['centered']:>9.4f} {r['random_baseline']:>9.2f} "
                     f"{r['examples']:>9d} {r['seconds']:>8.1f}{extra}")
    for name, reason in result["missing"].items():
        lines.append(f"{name:<14} missing: {reason}")
    score = "n/a (no task ran)" if result["chatcore"] is None else f"{result['chatcore']:.4f}"
    lines.append(f"{result['chatcore_label']}: {score}")
    if result.get("chatcore_nosb") is not None:
        lines.append(f"{result['chatcore_nosb_label']}: {result['chatcore_nosb']:.4f} (without {SYNTHETIC_TASK}: "
                     "ours is synthetic and differs from the original's, so compare this one with its numbers)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Entry point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat evals (ARC, MMLU, GSM8K, HumanEval, SpellingBee) and ChatCORE")
    p.add_argument("-i", "--source", required=True, choices=["mid", "sft", "rl"], help="checkpoint phase to load")
    p.add_argument("--model-tag", default=None, help="checkpoint subdirectory (default: the largest d<N>)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("-a", "--task-name", default="|".join(CHAT_TASKS),
                   help=f"tasks separated by '|' (default: all of {'|'.join(CHAT_TASKS)})")
    p.add_argument("--max-per-task", type=int, default=-1, help="evaluate only the first N examples (-1 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (categorical tasks)")
    p.add_argument("--num-samples", type=int, default=1, help="replies per problem (generative); k > 1 reports "
                                                              "pass@k and needs --temperature > 0")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="", help="bfloat16|float32 (default: bf16 on cuda, fp32 on CPU)")
    p.add_argument("--data-dir", default=None, help="local task data (default: hub, else the shared data)")
    p.add_argument("--output", default=None, help="write the result as JSON to this file")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run_training(evaluate, parse_args(argv))


def evaluate(args, rank, world_size, device, reporter) -> dict:
    t0 = time.time()
    tasks = [name.strip() for name in args.task_name.split("|") if name.strip()]
    check_task_names(tasks)
    check_settings(args.num_samples, args.temperature, args.max_new_tokens, args.batch_size)

    checkpoints_dir = checkpoints_dir_for(args.source)
    try:
        tag = args.model_tag or find_largest_model(checkpoints_dir)
        step = args.step if args.step is not None else find_last_step(checkpoints_dir / tag)
    except FileNotFoundError as e:
        trainer = {"mid": "nanochat.mid_train", "sft": "nanochat.chat_sft"}.get(args.source, "the trainer")
        raise FileNotFoundError(f"no {args.source} checkpoint to evaluate: {e}. Train one first (python -m "
                                f"{trainer}) or set NANOCHAT_BASE_DIR to the folder that holds it.") from e
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=tag, step=step)
    print0(f"evaluating {args.source} {tag} step {step} on {', '.join(tasks)} ({world_size} rank(s), {device})")

    # fp32 on CPU unless asked (common.eval_dtype); the dtype goes with the score, as CORE's does.
    dtype = args.dtype or eval_dtype(device)
    with autocast_for(device, dtype):
        result = run_chat_eval(model, tokenizer, device, tasks, max_per_task=args.max_per_task,
                               batch_size=args.batch_size, num_samples=args.num_samples,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               data_dir=args.data_dir)
    summary = {
        "source": args.source,
        "model_tag": tag,
        "step": step,
        "chatcore": result["chatcore"],
        "chatcore_label": result["chatcore_label"],
        "chatcore_nosb": result["chatcore_nosb"],
        "chatcore_nosb_label": result["chatcore_nosb_label"],
        "chatcore_tasks_covered": result["tasks_covered"],
        "chatcore_tasks_total": result["tasks_total"],
        "chat_tasks": result["tasks"],
        "chat_missing": result["missing"],
        "examples_per_sec": result["examples_per_sec"],
        "dtype": dtype,
        "samples": result["samples"],
        "eval_time_s": round(time.time() - t0, 3),
    }
    if rank == 0:
        print0(format_table(result))
        print0(f"dtype: {dtype}")
        if args.output:
            atomic_write(args.output, lambda f: f.write(json.dumps(summary, indent=2).encode("utf-8")))
            print0(f"wrote {args.output}")
        reporter.result(summary)
    return summary


if __name__ == "__main__":
    main()
