"""
CORE: the base-model benchmark of the DCLM paper, as nanochat runs it. 22 in-context-learning tasks, each
scored by accuracy, centred on its random baseline, and averaged.

The eval bundle (nanochat's `eval_bundle.zip`) holds:

    core.yaml           icl_tasks: label, dataset_uri (under eval_data/), num_fewshot, icl_task_type,
                        continuation_delimiter (default " ")
    eval_meta_data.csv  "Eval Task" (= label) -> "Random baseline" (in percent)
    eval_data/...jsonl  one example per line

Three kinds of task (every prompt starts with BOS); how the forward passes are batched across examples, and
which shared prefixes run once, is nanochat/core_batch.py:
- multiple_choice {query, choices, gold}: one prompt per choice; the continuation is what follows the prompts'
  common token prefix; the choice whose continuation has the lowest mean cross-entropy is the answer.
- schema {context_options, continuation, gold}: one prompt per context; the continuation is the common token
  suffix; again the lowest mean cross-entropy wins.
- language_modeling {context, continuation}: correct only if greedy (argmax) decoding reproduces every token
  of the continuation.

A task whose data file is absent is reported as missing, and the score is labelled with its coverage
("CORE[18/22]"): a partial CORE is never presented as comparable with a full one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from nanochat.common import autocast_for, eval_dtype, get_base_dir, get_shared_data_dir
from nanochat.core_batch import (
    BATCH_TOKENS,
    CHUNK_EXAMPLES,
    Prepared,
    common_prefix,
    outcome,
    score_examples,
    shares_prefix,
)

logger = logging.getLogger("nanochat")

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
ROW_FORMATS = {
    "multiple_choice": "{query: str, choices: [str, ...], gold: int}",
    "schema": "{context_options: [str, ...], continuation: str, gold: int}",
    "language_modeling": "{context: str, continuation: str}",
}
SHUFFLE_SEED = 1337  # the order examples are taken in (and truncated by max_per_task)
FEWSHOT_SEED = 1234  # + the example's index: which other examples are shown before it


class EvalDataUnavailable(FileNotFoundError):
    """No eval bundle here and none could be downloaded; the message says what was tried and how to fix it."""


class EvalBundleError(ValueError):
    """The eval bundle is present but malformed (bad YAML/CSV/JSON, missing fields); names the file and line."""


# -----------------------------------------------------------------------------
# Where the bundle comes from


def _is_bundle(path: Path) -> bool:
    return (path / "core.yaml").is_file()


def find_eval_bundle(bundle_dir: str | os.PathLike | None = None) -> Path:
    """
    The eval bundle folder: `bundle_dir`; else $NANOCHAT_EVAL_BUNDLE; else <shared data>/eval_bundle; else
    <base dir>/eval_bundle; else download it into <base dir>/eval_bundle ($NANOCHAT_EVAL_BUNDLE_URL overrides
    the URL). An explicitly named folder must be a bundle: no silent fallback to another one.
    """
    for explicit, what in ((bundle_dir, "bundle_dir (--bundle-dir)"),
                           (os.environ.get("NANOCHAT_EVAL_BUNDLE"), "$NANOCHAT_EVAL_BUNDLE")):
        if explicit:
            path = Path(explicit)
            if not _is_bundle(path):
                raise EvalDataUnavailable(f"{what} = {path} is not an eval bundle (no {path / 'core.yaml'}); "
                                          "point it at the folder holding core.yaml, eval_meta_data.csv and eval_data/")
            return path

    tried = []
    shared_env = "$NANOCHAT_SHARED_DATA" if os.environ.get("NANOCHAT_SHARED_DATA") else "default shared/data"
    try:
        shared = get_shared_data_dir() / "eval_bundle"
    except FileNotFoundError as e:
        tried.append(f"shared data ({shared_env}): {e}")
    else:
        if _is_bundle(shared):
            return shared
        tried.append(f"{shared} ({shared_env}): no core.yaml")
    local = get_base_dir() / "eval_bundle"
    if _is_bundle(local):
        return local
    tried.append(f"{local} ($NANOCHAT_BASE_DIR/eval_bundle): no core.yaml")
    url = os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL
    try:
        return download_eval_bundle(url, local)
    except (OSError, zipfile.BadZipFile, EvalBundleError) as e:  # URLError, refused, timeout, disk full ...
        tried.append(f"download {url}: {type(e).__name__}: {e}")
    raise EvalDataUnavailable(
        "CORE eval bundle not found. Tried:\n  - " + "\n  - ".join(tried) + "\n"
        "To fix: set NANOCHAT_SHARED_DATA to the folder that holds eval_bundle/ (see shared/data/MANIFEST.md), "
        "or NANOCHAT_EVAL_BUNDLE (or --bundle-dir) to an eval bundle folder (core.yaml, eval_meta_data.csv, "
        f"eval_data/), or run once with internet access so that {EVAL_BUNDLE_URL} is downloaded to {local}."
    )


def download_eval_bundle(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download and unzip the bundle next to `dest`, then rename it into place: `dest` is never half-written."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the CORE eval bundle from %s", url)
    with tempfile.TemporaryDirectory(prefix=".eval_bundle.", dir=dest.parent) as tmp:
        zip_path = Path(tmp) / "eval_bundle.zip"
        with urllib.request.urlopen(url, timeout=timeout) as response, open(zip_path, "wb") as f:
            shutil.copyfileobj(response, f)
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(Path(tmp) / "unpacked")  # zipfile drops ".." and absolute parts of member names
        roots = sorted((p.parent for p in (Path(tmp) / "unpacked").rglob("core.yaml")), key=lambda p: len(p.parts))
        if not roots:
            raise EvalBundleError(f"the archive from {url} holds no core.yaml: it is not an eval bundle")
        try:
            os.rename(roots[0], dest)
        except OSError:
            if not _is_bundle(dest):  # not a concurrent download (another rank) that won the race
                raise
    return dest


# -----------------------------------------------------------------------------
# Reading the bundle


def load_core_tasks(bundle_dir: str | os.PathLike) -> list[dict]:
    """core.yaml -> [{label, path, task_type, num_fewshot, delimiter}] in file order."""
    path = Path(bundle_dir) / "core.yaml"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EvalBundleError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("icl_tasks"), list):
        raise EvalBundleError(f"{path} must be a mapping with an 'icl_tasks' list of tasks")
    tasks, labels = [], set()
    for i, t in enumerate(spec["icl_tasks"]):
        where = f"{path}: icl_tasks[{i}]"
        if not isinstance(t, dict):
            raise EvalBundleError(f"{where} is a {type(t).__name__}, expected a mapping")
        missing = [k for k in ("label", "dataset_uri", "icl_task_type") if k not in t]
        if missing:
            raise EvalBundleError(f"{where} lacks {missing}")
        label, task_type = str(t["label"]), t["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise EvalBundleError(f"{where} ({label}) has icl_task_type {task_type!r}; expected one of {TASK_TYPES}")
        shots = t.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) and shots else shots  # a list of settings: CORE uses the first
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise EvalBundleError(f"{where} ({label}) has num_fewshot {t.get('num_fewshot')!r}; expected e.g. [10]")
        if label in labels:
            raise EvalBundleError(f"{where}: label {label!r} appears twice")
        labels.add(label)
        tasks.append({"label": label, "path": Path(bundle_dir) / "eval_data" / str(t["dataset_uri"]),
                      "task_type": task_type, "num_fewshot": shots,
                      "delimiter": str(t.get("continuation_delimiter", " "))})
    return tasks


def load_random_baselines(bundle_dir: str | os.PathLike) -> dict[str, float]:
    """eval_meta_data.csv -> {label: random baseline in percent}."""
    path = Path(bundle_dir) / "eval_meta_data.csv"
    if not path.is_file():
        raise EvalBundleError(f"{path} does not exist; an eval bundle carries the tasks' random baselines in it")
    baselines = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "Eval Task" not in columns or "Random baseline" not in columns:
                raise EvalBundleError(f"{path} needs the columns 'Eval Task' and 'Random baseline', has {columns}")
            for row in reader:
                value = row.get("Random baseline")
                try:
                    baselines[row["Eval Task"]] = float(value)
                except (TypeError, ValueError):
                    raise EvalBundleError(f"{path} line {reader.line_num}: 'Random baseline' of "
                                          f"{row['Eval Task']!r} is {value!r}, not a number (percent)") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise EvalBundleError(f"{path} is not a readable CSV file: {e}") from e
    return baselines


def _row_problem(row, task_type: str) -> str | None:
    """What is wrong with one jsonl row for this task type, or None."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"

    def is_str_list(x) -> bool:
        return isinstance(x, list) and len(x) > 0 and all(isinstance(s, str) for s in x)

    if task_type == "multiple_choice":
        options, fields = row.get("choices"), {"query": str}
    elif task_type == "schema":
        options, fields = row.get("context_options"), {"continuation": str}
    else:
        options, fields = None, {"context": str, "continuation": str}
    for key, kind in fields.items():
        if not isinstance(row.get(key), kind):
            return f"'{key}' is missing or not a string"
    if task_type != "language_modeling":
        key = "choices" if task_type == "multiple_choice" else "context_options"
        if not is_str_list(options):
            return f"'{key}' is missing or not a non-empty list of strings"
        gold = row.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            return f"'gold' is {gold!r}, not an index into the {len(options)} {key}"
    return None


def load_task_data(path: str | os.PathLike, task_type: str) -> list[dict]:
    """Every row of one task's jsonl file, each checked against the task type's format."""
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalBundleError(f"{path} line {line_no}: not valid JSON ({e.msg} at column {e.colno})") from e
                problem = _row_problem(row, task_type)
                if problem:
                    raise EvalBundleError(f"{path} line {line_no}: {problem}; a {task_type} row is "
                                          f"{ROW_FORMATS[task_type]}")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise EvalBundleError(f"{path} is not UTF-8 text: {e}") from e
    if not rows:
        raise EvalBundleError(f"{path} has no examples")
    return rows


# -----------------------------------------------------------------------------
# One example: prompts -> token rows -> continuation spans -> one forward pass -> correct or not


def sample_fewshot(n: int, idx: int, k: int) -> list[int]:
    """
    k distinct indices in [0, n) other than idx, drawn with random.Random(1234 + idx). Identical to nanochat's
    rng.sample([i for i in range(n) if i != idx], k), without building that list for every example.
    """
    k = min(k, n - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(n - 1), k)
    return [i + (i >= idx) for i in picks]


def render_prompts(item: dict, task_type: str, delimiter: str = " ", fewshot: Sequence[dict] = ()) -> list[str]:
    """
    The prompt texts of one example (BOS is added at tokenization): one per choice (multiple_choice), one per
    context option (schema), or [without, with] the continuation (language_modeling). Few-shot examples come
    first, each solved correctly and followed by a blank line.
    """
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{shots}{item['context'].strip()}{delimiter}"
        # Strip the prompt without the continuation: a trailing space would be merged into the continuation's
        # first token in the other prompt, and the two would no longer share a clean token prefix.
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")


def _common_suffix(rows: list[list[int]]) -> int:
    return common_prefix([r[::-1] for r in rows])


def continuation_spans(token_rows: list[list[int]], task_type: str) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """
    From the tokenized prompts, the rows that go through the model and, per row, the [start, end) of the
    continuation tokens being scored. Every span keeps at least one token and starts after the first token
    (BOS), so there is always a position predicting it.
    """
    shortest = min(len(r) for r in token_rows)
    if task_type == "multiple_choice":
        start = min(common_prefix(token_rows), shortest - 1)
        return token_rows, [(start, len(r)) for r in token_rows]
    if task_type == "schema":
        length = max(1, min(_common_suffix(token_rows), shortest - 1))
        return token_rows, [(len(r) - length, len(r)) for r in token_rows]
    without, with_continuation = token_rows
    start = min(common_prefix([without, with_continuation]), len(with_continuation) - 1)
    return [with_continuation], [(start, len(with_continuation))]


def crop_left(rows: list[list[int]], spans: list[tuple[int, int]], max_len: int):
    """Keep the last max_len tokens of each row (the continuation sits at the end) and shift its span."""
    cropped_rows, cropped_spans = [], []
    for row, (start, end) in zip(rows, spans):
        cut = max(0, len(row) - max_len)
        cropped_rows.append(row[cut:])
        # A continuation longer than the whole window loses its head: score the part that fits.
        cropped_spans.append((max(1, start - cut), end - cut))
    return cropped_rows, cropped_spans


def example_batch(tokenizer, item: dict, task_type: str, delimiter: str, fewshot: list[dict], max_len: int):
    """(rows, spans) of one example, cropped to the model's max_len."""
    (prepared,) = prepare_examples(tokenizer, [item], [fewshot], task_type, delimiter, max_len)
    return prepared.rows, prepared.spans


def prepare_examples(tokenizer, items: Sequence[dict], fewshots: Sequence[Sequence[dict]], task_type: str,
                     delimiter: str, max_len: int) -> list[Prepared]:
    """Every example's prompts tokenized in one call, then its rows and spans cropped once, and whether its
    rows share a prefix worth running once (core_batch.shares_prefix)."""
    prompts = [render_prompts(item, task_type, delimiter, fewshot) for item, fewshot in zip(items, fewshots)]
    flat = tokenizer.encode([p for ps in prompts for p in ps], prepend=tokenizer.get_bos_token_id())
    prepared, at = [], 0
    for ps in prompts:
        rows, spans = crop_left(*continuation_spans(flat[at : at + len(ps)], task_type), max_len)
        at += len(ps)
        shared = shares_prefix(rows, spans) if task_type != "language_modeling" else 0
        prepared.append(Prepared(rows, spans, shared))
    return prepared


def evaluate_example(model, tokenizer, item: dict, task_type: str, delimiter: str = " ", fewshot: Sequence[dict] = (),
                     device: torch.device | str | None = None) -> bool:
    device = device or model.get_device()
    examples = prepare_examples(tokenizer, [item], [list(fewshot)], task_type, delimiter, model.config.sequence_len)
    (scores,) = score_examples(model, examples, task_type, tokenizer.get_bos_token_id(), device)
    predicted = outcome(scores, task_type)
    return predicted if task_type == "language_modeling" else predicted == item["gold"]


# -----------------------------------------------------------------------------
# One task, all tasks


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def task_scores(model, tokenizer, data: list[dict], task_type: str, num_fewshot: int = 0, delimiter: str = " ",
                max_per_task: int = -1, device: torch.device | str | None = None,
                batch_tokens: int = BATCH_TOKENS) -> tuple[list[dict], list[int], list[list]]:
    """
    The task's evaluated examples (shuffled with seed 1337, the first max_per_task; <= 0: all), the indices this
    rank evaluates (idx % world_size == rank) and, per such index, each row's score: the mean continuation loss
    (multiple_choice, schema) or whether greedy decoding reproduces the continuation (language_modeling).
    """
    device = device or model.get_device()
    data = list(data)
    random.Random(SHUFFLE_SEED).shuffle(data)
    n = len(data) if max_per_task <= 0 else min(max_per_task, len(data))
    # Few-shot examples come from the evaluated examples, as in nanochat; when there are too few of them for
    # num_fewshot (a small max_per_task), the pool extends into the rest of the shuffled data.
    pool = data[: max(n, num_fewshot + 1)]
    rank, world_size = _dist_rank_world()
    indices = list(range(rank, n, world_size))
    scores: list[list] = []
    for at in range(0, len(indices), CHUNK_EXAMPLES):
        chunk = indices[at : at + CHUNK_EXAMPLES]
        fewshots = [[pool[i] for i in sample_fewshot(len(pool), idx, num_fewshot)] for idx in chunk]
        examples = prepare_examples(tokenizer, [data[idx] for idx in chunk], fewshots, task_type, delimiter,
                                    model.config.sequence_len)
        scores += score_examples(model, examples, task_type, tokenizer.get_bos_token_id(), device, batch_tokens)
    return data[:n], indices, scores


def evaluate_task(model, tokenizer, data: list[dict], task_type: str, num_fewshot: int = 0, delimiter: str = " ",
                  max_per_task: int = -1, device: torch.device | str | None = None) -> tuple[int, int]:
    """(correct, examples) over the task (see task_scores); the counts are summed over ranks."""
    evaluated, indices, scores = task_scores(model, tokenizer, data, task_type, num_fewshot, delimiter,
                                             max_per_task, device)
    correct = 0
    for idx, row_scores in zip(indices, scores):
        predicted = outcome(row_scores, task_type)
        correct += int(predicted if task_type == "language_modeling" else predicted == evaluated[idx]["gold"])
    _, world_size = _dist_rank_world()
    if world_size > 1:
        total = torch.tensor([correct], dtype=torch.long, device=model.get_device())
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        correct = int(total.item())
    return correct, len(evaluated)


def centered_accuracy(accuracy: float, random_baseline_percent: float) -> float:
    """0 at chance, 1 at perfect: (acc - rb) / (1 - rb) with the baseline rb given in percent."""
    rb = 0.01 * random_baseline_percent
    return (accuracy - rb) / (1.0 - rb)


def evaluate_core(model, tokenizer, device: torch.device | str, bundle_dir: str | os.PathLike | None = None,
                  max_per_task: int = -1, tasks: list[str] | str | None = None, autocast=None) -> dict:
    """
    Evaluate every task of core.yaml (or only the labels in `tasks`) whose data is present. Returns a JSON-able
    dict: core (mean centred accuracy, None if nothing was evaluated), core_label ("CORE" only when every task
    of core.yaml was evaluated, else "CORE[covered/total]"), tasks_covered, tasks_total, tasks
    {label: accuracy, centered, random_baseline (%), examples, task_type, seconds}, missing (labels whose data
    file is absent), examples, examples_per_sec. Raises EvalDataUnavailable when there is no bundle at all.
    """
    device = torch.device(device)
    bundle = find_eval_bundle(bundle_dir)
    all_tasks = load_core_tasks(bundle)
    baselines = load_random_baselines(bundle)
    selected = all_tasks
    if tasks is not None:
        wanted = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = sorted(set(wanted) - {t["label"] for t in all_tasks})
        if unknown:
            raise ValueError(f"unknown CORE task label(s) {unknown}; {bundle / 'core.yaml'} has "
                             f"{[t['label'] for t in all_tasks]}")
        selected = [t for t in all_tasks if t["label"] in wanted]
    no_baseline = [t["label"] for t in selected if t["label"] not in baselines]
    if no_baseline:
        raise EvalBundleError(f"{bundle / 'eval_meta_data.csv'} has no 'Random baseline' for {no_baseline}; "
                              "add a row per task (column 'Eval Task' = the core.yaml label)")

    autocast = autocast if autocast is not None else autocast_for(device, eval_dtype(device))
    results: dict[str, dict] = {}
    missing: list[str] = []
    data_cache: dict[Path, list[dict]] = {}  # hellaswag is two tasks (0-shot and 10-shot) over one file
    was_training = model.training
    model.eval()
    try:
        with autocast:
            dtype = str(torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                        else model.lm_head.weight.dtype).removeprefix("torch.")
            for task in selected:
                label, task_type = task["label"], task["task_type"]
                if not task["path"].is_file():
                    missing.append(label)
                    logger.info("CORE %s: missing %s", label, task["path"])
                    continue
                if task["path"] not in data_cache:
                    data_cache[task["path"]] = load_task_data(task["path"], task_type)
                t0 = time.perf_counter()
                correct, n = evaluate_task(model, tokenizer, data_cache[task["path"]], task_type,
                                           task["num_fewshot"], task["delimiter"], max_per_task, device)
                seconds = time.perf_counter() - t0
                accuracy = correct / n
                rb = baselines[label]
                results[label] = {"accuracy": accuracy, "centered": centered_accuracy(accuracy, rb),
                                  "random_baseline": rb, "examples": n, "task_type": task_type, "seconds": seconds}
                logger.info("CORE %s (%d-shot %s): accuracy %.4f | centered %.4f | %d examples in %.1fs",
                            label, task["num_fewshot"], task_type, accuracy, results[label]["centered"], n, seconds)
    finally:
        model.train(was_training)

    covered, total = len(results), len(all_tasks)
    examples = sum(r["examples"] for r in results.values())
    seconds = sum(r["seconds"] for r in results.values())
    return {
        "core": sum(r["centered"] for r in results.values()) / covered if covered else None,
        "core_label": "CORE" if covered == total else f"CORE[{covered}/{total}]",
        "tasks_covered": covered,
        "tasks_total": total,
        "tasks": results,
        "missing": missing,
        "examples": examples,
        "examples_per_sec": examples / seconds if seconds > 0 else 0.0,
        "dtype": dtype,
    }
