"""
What every task shares: the `Task` base (a sliceable view over a dataset of conversations), mixtures,
conversation validation, and the loader that picks the Hugging Face hub or a local data directory.

A conversation is `{"messages": [{"role": "user" | "assistant" | "system", "content": ...}], ...}`; eval tasks
may add fields (e.g. `letters` for multiple choice). Assistant content is a str or a list of parts
`{"type": "text" | "python" | "python_output", "text": str}` (see `Tokenizer.render_conversation`).
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import json
import logging
import os
import random
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanochat.common import get_shared_data_dir

logger = logging.getLogger("nanochat")

Conversation = dict[str, Any]

# Local files may be stored in any of these formats; the first one found wins.
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


class DatasetUnavailableError(FileNotFoundError):
    """A task's data is neither on the hub (reachable) nor in the local directory. Mixture builders catch
    exactly this to skip optional sources; any other error (a malformed file, a bug) still propagates."""


# -----------------------------------------------------------------------------
# Task base class and combinators


class Task:
    """
    A dataset of conversations, viewed through a `start:stop:step` slice.

    Subclasses implement `num_examples()` and `get_example(i)` over the *underlying* dataset; `len(task)` and
    `task[i]` see the slice (so `GSM8K(split="test", stop=420)` is the first 420 test problems). Eval tasks
    also set `eval_type` ("categorical": score the logits of `conversation["letters"]`; "generative": sample
    a reply and check it) and implement `evaluate(conversation, assistant_response)`.
    """

    eval_type: str | None = None  # None for training-only tasks

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"invalid slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        raise NotImplementedError

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool | int:
        raise NotImplementedError(f"{type(self).__name__} is a training task: it has no evaluate()")

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))  # ceil division

    def __getitem__(self, index: int) -> Conversation:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range (len {n})")
        return self.get_example(self.start + index * self.step)

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        fields = [f"{k}={getattr(self, k)!r}" for k in ("subset", "split") if getattr(self, k, None) is not None]
        return f"{type(self).__name__}({', '.join([*fields, f'len={len(self)}'])})"


class DatasetTask(Task):
    """
    A task over the rows of one dataset split, seen in the original's fixed shuffled order. A subclass checks its
    arguments, calls `self.load(...)` (the keywords of `load_rows`) and reads example i as `self.row(i)`.
    """

    rows: Sequence[dict]
    order: list[int]  # row order[i] is example i (shuffled_order)

    def load(self, **where: Any) -> None:
        self.rows = load_rows(**where)
        self.order = shuffled_order(len(self.rows))

    def num_examples(self) -> int:
        return len(self.rows)

    def row(self, index: int) -> dict:
        return self.rows[self.order[index]]


class MultipleChoiceTask(DatasetTask):
    """Categorical eval: the model answers with one letter (scored over `conversation["letters"]`)."""

    eval_type = "categorical"

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool:
        return assistant_response.strip() == conversation["messages"][-1]["content"]


class TaskSequence(Task):
    """The tasks one after another (no shuffling): useful to evaluate several tasks as one, or for curricula."""

    def __init__(self, tasks: Sequence[Task], **slice_kwargs: int | None):
        super().__init__(**slice_kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> Conversation:
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(index)


class TaskMixture(Task):
    """
    Every example of every task, in one deterministic shuffled order (seeded).

    A task listed twice contributes each of its examples twice (two epochs of it), which is how a small task
    is up-weighted. Shuffling the union, rather than sampling tasks by weight, means one pass over the mixture
    sees every example exactly once per listing, and the order depends only on the seed and the task lengths.
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **slice_kwargs: int | None):
        super().__init__(**slice_kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]
        self.offsets = list(itertools.accumulate(self.lengths, initial=0))  # task i owns [offsets[i], offsets[i+1])
        order = list(range(self.offsets[-1]))
        random.Random(seed).shuffle(order)
        # A compact array, not a list of (task, example) tuples: ~850K entries would cost tens of MB per rank.
        self.order = array("q", order)

    def num_examples(self) -> int:
        return len(self.order)

    def get_example(self, index: int) -> Conversation:
        position = self.order[index]
        task_index = bisect.bisect_right(self.offsets, position) - 1
        return self.tasks[task_index][position - self.offsets[task_index]]

    def __repr__(self) -> str:
        return f"TaskMixture(len={len(self)}, tasks={self.tasks})"


# -----------------------------------------------------------------------------
# Prompt helpers


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """
    The user prompt of a multiple-choice question, as the original formats it:

        Multiple Choice question: <question>
        - <choice A>=A
        - <choice B>=B
        ...

        Respond only with the letter of the correct answer.

    Each letter comes right *after* its choice text (a small model binds "text=letter" more easily than a
    letter followed by a long text) and is glued to "=" with no space, so the letter is tokenized the same way
    as the bare letter the assistant answers with.
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, letters: Sequence[str], choices: Sequence[str], answer: str,
                    **fields: Any) -> Conversation:
    """A multiple-choice example: the render_mc prompt, the answer letter, extra `fields`, then `letters`."""
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": answer},
        ],
        **fields,
        "letters": list(letters),
    }


# -----------------------------------------------------------------------------
# Conversation validation


def validate_conversation(conversation: Any) -> None:
    """Raise ValueError unless `conversation` is trainable: an optional system message, then turns alternating
    user/assistant that start with the user and end with the assistant; user text is a str, assistant content
    a str or a list of well-formed parts."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('expected an object with a "messages" list')
    messages = conversation["messages"]
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        messages = messages[1:]
    if len(messages) < 2:
        raise ValueError("a conversation needs at least one user and one assistant message")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            got = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"message {i} should be {expected!r}, got {got!r} (turns must alternate)")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if expected == "user" or not isinstance(content, list):
            raise ValueError(f"message {i} ({expected}) has content of type {type(content).__name__}")
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") in ("text", "python", "python_output")
                and isinstance(part.get("text"), str)
            ):
                raise ValueError(f"message {i} has a malformed part {part!r}")
    if len(messages) % 2:
        raise ValueError("the last message must be the assistant's")


# -----------------------------------------------------------------------------
# Loading: Hugging Face hub or a local directory


def read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl, .jsonl.gz or .parquet file. A bad JSON line is reported as file:line."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
    return rows


def find_local(data_dir: Path, stems: Sequence[str]) -> Path | None:
    """The first existing `data_dir/<stem><suffix>` over stems x LOCAL_SUFFIXES."""
    for stem in stems:
        for suffix in LOCAL_SUFFIXES:
            if (data_dir / (stem + suffix)).is_file():
                return data_dir / (stem + suffix)
    return None


def hub_enabled() -> bool:
    """Whether to try the hub at all: `datasets` is importable and the user has not declared offline mode."""
    if any(
        os.environ.get(k, "0") not in ("", "0", "false", "False") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    ):
        return False
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def load_rows(
    *,
    what: str,
    hub: tuple[str, str | None, str] | None,
    local: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    local_note: str = "",
) -> Sequence[dict]:
    """
    The rows of one dataset split, from wherever they are available.

    - `data_dir` given: only that local directory is read (the caller said where the data is).
    - otherwise: the hub `(path, config, split)` via `datasets.load_dataset` when `datasets` is installed and
      not in offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); if that is unavailable or fails, the shared
      data directory (`nanochat.common.get_shared_data_dir()`).
    `local` lists candidate file stems relative to the directory (suffixes from LOCAL_SUFFIXES). The hub returns
    a `datasets.Dataset` (indexable, not materialized); local files return a list of dicts.
    Raises DatasetUnavailableError naming both options when neither works.
    """
    hub_status = "not tried: the `datasets` package is not installed, or HF offline mode is set"
    if hub is None:
        hub_status = "not on the hub"
    elif data_dir is not None:
        hub_status = "not tried: data_dir was given"
    elif hub_enabled():
        import datasets

        try:
            return datasets.load_dataset(hub[0], hub[1], split=hub[2])
        except Exception as e:  # no network, unknown config or split, ...: fall back to the local copy
            hub_status = f"failed: {type(e).__name__}: {e}"
            logger.warning("%s: loading from the hub %s; trying the local data directory", what, hub_status)

    if data_dir is not None:
        directory = Path(data_dir)
    else:
        try:
            directory = get_shared_data_dir()
        except FileNotFoundError:
            directory = None
    path = find_local(directory, local) if directory is not None else None
    if path is not None:
        return read_records(path)

    # Neither worked: say what was tried, how to enable each option, and what the local folder does hold.
    hub_name = f"{hub[0]}{'/' + hub[1] if hub[1] else ''} split {hub[2]!r}" if hub else "-"
    wanted = [stem + LOCAL_SUFFIXES[0] for stem in local]
    present = ""
    folder = (directory / local[0]).parent if directory is not None and local else None
    if folder is not None and folder.is_dir():
        present = f" Present in {folder}: {sorted(p.name for p in folder.iterdir())}."
    raise DatasetUnavailableError(
        f"{what} is unavailable. (1) Hugging Face hub {hub_name}: {hub_status}; to use it, `pip install datasets`, "
        f"be online and leave data_dir=None. (2) Local directory {directory or '(none: shared data not found)'}: "
        f"no {wanted} (nor .jsonl.gz/.parquet); to use it, pass data_dir= (or set NANOCHAT_SHARED_DATA) to a "
        f"folder holding that file.{present}{(' ' + local_note) if local_note else ''}"
    )


def shuffled_order(n: int, seed: int = 42) -> list[int]:
    """A fixed permutation of range(n): row `order[i]` is the i-th example. Source files are often sorted (MMLU
    by subject, ARC by source), and evals take prefixes (`--max-per-task`). The original shuffles each dataset
    with Hugging Face `datasets`' `Dataset.shuffle(seed=42)`, which is `np.random.default_rng(seed).permutation
    (len(ds))` followed by `select`; drawing the same permutation means a K-example subset holds the same rows
    as the original's, so subset scores are comparable with the numbers it published."""
    return np.random.default_rng(seed).permutation(n).tolist()
