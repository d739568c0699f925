"""
Tasks: datasets of conversations for mid-training, SFT and chat evals, one task per module, plus the
mixtures the training scripts use.

Eval tasks (have `eval_type` and `evaluate`): ARC, MMLU (categorical); GSM8K, HumanEval, SpellingBee
(generative). Training material: SmolTalk / ChatJSONL (chat), GSM8K train (calculator use), SpellingBee and
SimpleSpelling (letters), Identity / CustomJSON (who the model is), MMLU auxiliary_train and ARC train
(multiple choice; hub or a given data_dir only).

Each dataset-backed task reads the Hugging Face hub when `datasets` is installed and online, else the shared
offline data (`nanochat.common.get_shared_data_dir()`); an explicit `data_dir=` means "read only this folder".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from nanochat.tasks.arc import ARC
from nanochat.tasks.chatjsonl import ChatJSONL
from nanochat.tasks.common import (
    Conversation,
    DatasetUnavailableError,
    Task,
    TaskMixture,
    TaskSequence,
    render_mc,
    validate_conversation,
)
from nanochat.tasks.customjson import CustomJSON
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.identity import Identity
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spellingbee import SimpleSpelling, SpellingBee

__all__ = [
    "ARC",
    "GSM8K",
    "MMLU",
    "ChatJSONL",
    "Conversation",
    "CustomJSON",
    "DatasetUnavailableError",
    "HumanEval",
    "Identity",
    "SimpleSpelling",
    "SmolTalk",
    "SpellingBee",
    "Task",
    "TaskMixture",
    "TaskSequence",
    "mid_train_mixture",
    "mid_train_val",
    "render_mc",
    "sft_mixture",
    "sft_val",
    "validate_conversation",
]

logger = logging.getLogger("nanochat")

DataDir = str | os.PathLike | None


def _optional(make: Callable[[], Task]) -> list[Task]:
    """[task] if its data is available, else [] (logged). Only 'unavailable' is tolerated, never a bad file."""
    try:
        return [make()]
    except DatasetUnavailableError as e:
        logger.info("skipping a task whose data is unavailable: %s", e)
        return []


def _identity(identity_path: str | os.PathLike | None, size: int, seed: int) -> Task:
    return CustomJSON(identity_path) if identity_path is not None else Identity(size=size, seed=seed)


def mid_train_mixture(
    data_dir: DataDir = None,
    seed: int = 42,
    simple_spelling_size: int = 4_000,
    spelling_bee_size: int = 2_000,
    identity_size: int = 1_000,
    identity_epochs: int = 2,
    identity_path: str | os.PathLike | None = None,
) -> TaskMixture:
    """
    The mid-training mixture, from whatever is available:

    - chat: ChatJSONL train split (offline, always) + SmolTalk train (hub or data_dir only)
    - multiple choice: MMLU auxiliary_train (hub or data_dir only)
    - GSM8K train (calculator tool use)
    - identity (synthetic, or `identity_path` jsonl via CustomJSON) x `identity_epochs`
    - SimpleSpelling + SpellingBee (train words)

    The original uses SmolTalk 460K + MMLU aux 100K + GSM8K 8K + identity 1K x2 + SimpleSpelling 200K +
    SpellingBee 80K (~848K). Offline the real data is ~12K conversations, so the default spelling sizes are
    scaled down to keep spelling about a third of the mixture, as in the original; with the hub sets present,
    pass the original sizes.
    """
    tasks: list[Task] = []
    tasks += _optional(lambda: ChatJSONL(split="train", data_dir=data_dir))
    tasks += _optional(lambda: SmolTalk(split="train", data_dir=data_dir))
    tasks += _optional(lambda: MMLU(subset="auxiliary_train", split="train", data_dir=data_dir))
    tasks += _optional(lambda: GSM8K(split="train", data_dir=data_dir))
    tasks += [_identity(identity_path, identity_size, seed)] * identity_epochs
    tasks += _optional(lambda: SimpleSpelling(size=simple_spelling_size, split="train", seed=seed, data_dir=data_dir))
    tasks += _optional(lambda: SpellingBee(size=spelling_bee_size, split="train", seed=seed, data_dir=data_dir))
    return _mixture(tasks, seed, "mid-training")


def sft_mixture(
    data_dir: DataDir = None,
    seed: int = 42,
    smoltalk_size: int = 10_000,
    simple_spelling_size: int = 300,
    spelling_bee_size: int = 300,
    identity_size: int = 1_000,
    identity_path: str | os.PathLike | None = None,
) -> TaskMixture:
    """
    The SFT mixture (the original: ARC-Easy train 2.3K, ARC-Challenge train 1.1K, GSM8K train 8K, SmolTalk
    train first 10K, identity 1K, SimpleSpelling 300, SpellingBee 300):

    - ARC-Easy / ARC-Challenge train (hub or data_dir only: offline there is only ARC test, never trained on)
    - GSM8K train
    - chat: ChatJSONL train split + the first `smoltalk_size` of SmolTalk train (hub or data_dir only)
    - identity, SimpleSpelling, SpellingBee (train words)
    """
    tasks: list[Task] = []
    tasks += _optional(lambda: ARC(subset="ARC-Easy", split="train", data_dir=data_dir))
    tasks += _optional(lambda: ARC(subset="ARC-Challenge", split="train", data_dir=data_dir))
    tasks += _optional(lambda: GSM8K(split="train", data_dir=data_dir))
    tasks += _optional(lambda: ChatJSONL(split="train", data_dir=data_dir))
    tasks += _optional(lambda: SmolTalk(split="train", data_dir=data_dir, stop=smoltalk_size))
    tasks += [_identity(identity_path, identity_size, seed)]
    tasks += _optional(lambda: SimpleSpelling(size=simple_spelling_size, split="train", seed=seed, data_dir=data_dir))
    tasks += _optional(lambda: SpellingBee(size=spelling_bee_size, split="train", seed=seed, data_dir=data_dir))
    return _mixture(tasks, seed, "SFT")


def mid_train_val(
    data_dir: DataDir = None, seed: int = 42, smoltalk_size: int = 5_000, spelling_size: int = 500
) -> TaskMixture:
    """
    Validation for mid-training, from held-out material that no eval scores: the ChatJSONL val split, SmolTalk
    test (when available) and SpellingBee / SimpleSpelling on test words.

    Unlike the original (which also validates on MMLU test and GSM8K test), GSM8K test, ARC, MMLU and HumanEval
    are left out: they are the chat evals, and choosing checkpoints by their loss would leak them.
    """
    return _val_mixture(data_dir, seed, smoltalk_size, spelling_size, "mid-training val")


def sft_val(
    data_dir: DataDir = None, seed: int = 42, smoltalk_size: int = 5_000, spelling_size: int = 200
) -> TaskMixture:
    """Validation for SFT: the same held-out sources as `mid_train_val` (the original uses SmolTalk test)."""
    return _val_mixture(data_dir, seed, smoltalk_size, spelling_size, "SFT val")


def _val_mixture(data_dir: DataDir, seed: int, smoltalk_size: int, spelling_size: int, what: str) -> TaskMixture:
    tasks: list[Task] = []
    tasks += _optional(lambda: ChatJSONL(split="val", data_dir=data_dir))
    tasks += _optional(lambda: SmolTalk(split="test", data_dir=data_dir, stop=smoltalk_size))
    tasks += _optional(lambda: SimpleSpelling(size=spelling_size, split="test", seed=seed, data_dir=data_dir))
    tasks += _optional(lambda: SpellingBee(size=spelling_size, split="test", seed=seed, data_dir=data_dir))
    return _mixture(tasks, seed, what)


def _mixture(tasks: list[Task], seed: int, what: str) -> TaskMixture:
    mixture = TaskMixture(tasks, seed=seed)
    if len(mixture) == 0:
        raise DatasetUnavailableError(f"the {what} mixture is empty: no task's data is available")
    logger.info("%s mixture: %d conversations from %s", what, len(mixture), tasks)
    return mixture
