"""
MMLU (Hendrycks et al. 2021): 57-subject multiple choice with four options. Categorical eval.

- subset "all": splits "test" / "validation" / "dev" (hub `cais/mmlu`). Offline the shared data holds
  `mmlu/mmlu_redux_test.jsonl`: MMLU-Redux, 57 subjects x 100 questions drawn from the MMLU test set (rows
  `{subject, question, choices[4], answer: 0-3}`). Its `answer` is the original MMLU label, kept as is so the
  score means what an MMLU score means (Redux flags some labels as wrong; they are not corrected here).
- subset "auxiliary_train": split "train" only, ~100K questions from ARC, MC_TEST, OBQA and RACE; the original
  mid-trains on it. Hub only, unless a data_dir holds `mmlu/auxiliary_train.jsonl`.
"""

from __future__ import annotations

import os

from nanochat.tasks.common import Conversation, MultipleChoiceTask, mc_conversation

LETTERS = ("A", "B", "C", "D")


class MMLU(MultipleChoiceTask):
    def __init__(
        self,
        subset: str = "all",
        split: str = "test",
        data_dir: str | os.PathLike | None = None,
        **slice_kwargs: int | None,
    ):
        super().__init__(**slice_kwargs)
        if subset == "all":
            if split not in ("test", "validation", "dev"):
                raise ValueError(f"MMLU 'all' split must be 'test', 'validation' or 'dev', got {split!r}")
            local = [f"mmlu/{split}", f"mmlu/mmlu_{split}", f"mmlu/mmlu_redux_{split}"]
        elif subset == "auxiliary_train":
            if split != "train":
                raise ValueError(f"MMLU 'auxiliary_train' only has split 'train', got {split!r}")
            local = ["mmlu/auxiliary_train"]
        else:
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', got {subset!r}")
        self.subset, self.split = subset, split
        self.load(
            what=f"MMLU {subset} {split}",
            hub=("cais/mmlu", subset, split),
            local=local,
            data_dir=data_dir,
            local_note=(
                "The shared offline data holds only an MMLU test set (MMLU-Redux); it is never used for training."
                if split != "test"
                else ""
            ),
        )

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        if "train" in row and isinstance(row["train"], dict):
            row = row["train"]  # the hub's auxiliary_train rows are nested one level down
        choices = list(row["choices"])
        if len(choices) != len(LETTERS) or not 0 <= row["answer"] < len(LETTERS):
            raise ValueError(f"MMLU row {self.order[index]}: expected 4 choices and answer 0-3")
        return mc_conversation(row["question"], LETTERS, choices, LETTERS[row["answer"]],
                               subject=row.get("subject", ""))
