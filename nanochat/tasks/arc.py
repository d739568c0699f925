"""
ARC (AI2 Reasoning Challenge): grade-school science multiple choice, "ARC-Easy" or "ARC-Challenge".
Categorical eval: the model answers with one letter, scored over the choice letters only.

Hub `allenai/ai2_arc` (train / validation / test). Locally `arc/ARC-<Easy|Challenge>-<Train|Dev|Test>.jsonl`
with rows `{question, choices: {text, label}, answerKey}`; the shared data holds only the Test files, so a
train split offline is an error, never a silent substitution of test data.
"""

from __future__ import annotations

import os

from nanochat.tasks.common import Conversation, MultipleChoiceTask, mc_conversation

LOCAL_SPLIT_NAMES = {"train": "Train", "validation": "Dev", "test": "Test"}
LETTERS = "ABCDEFGH"


class ARC(MultipleChoiceTask):
    def __init__(
        self,
        subset: str = "ARC-Easy",
        split: str = "test",
        data_dir: str | os.PathLike | None = None,
        **slice_kwargs: int | None,
    ):
        super().__init__(**slice_kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be 'ARC-Easy' or 'ARC-Challenge', got {subset!r}")
        if split not in LOCAL_SPLIT_NAMES:
            raise ValueError(f"ARC split must be one of {list(LOCAL_SPLIT_NAMES)}, got {split!r}")
        self.subset, self.split = subset, split
        self.load(
            what=f"{subset} {split}",
            hub=("allenai/ai2_arc", subset, split),
            local=[f"arc/{subset}-{LOCAL_SPLIT_NAMES[split]}"],
            data_dir=data_dir,
            local_note=(
                "The shared offline data holds only the ARC test split, and test data is never used in its place."
                if split != "test"
                else ""
            ),
        )

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
        answer = row["answerKey"]
        if not all(label in LETTERS for label in labels):
            # A few original ARC items are labelled 1..4; the model should always answer with a letter.
            answer = LETTERS[labels.index(answer)]
            labels = list(LETTERS[: len(labels)])
        if answer not in labels:
            raise ValueError(f"{self.subset} row {self.order[index]}: answerKey {answer!r} not in {labels}")
        return mc_conversation(row["question"], labels, texts, answer)
