"""
SmolTalk: HuggingFaceTB/smol-smoltalk (~460K train / ~24K test general chat conversations), the original's
main mid-training and SFT chat data. Hub only, unless a data_dir holds `smoltalk/{split}.jsonl` (or .parquet)
with rows `{"messages": [...]}`. Offline without it, use ChatJSONL.
"""

from __future__ import annotations

import os

from nanochat.tasks.common import Conversation, DatasetTask, validate_conversation


class SmolTalk(DatasetTask):
    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None, **slice_kwargs: int | None):
        super().__init__(**slice_kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.load(
            what=f"SmolTalk {split}",
            hub=("HuggingFaceTB/smol-smoltalk", None, split),
            local=[f"smoltalk/{split}"],
            data_dir=data_dir,
        )

    def get_example(self, index: int) -> Conversation:
        # Validated on access: checking 460K hub rows up front would cost minutes at every start.
        conversation = {"messages": list(self.row(index)["messages"])}
        try:
            validate_conversation(conversation)
        except ValueError as e:
            raise ValueError(f"SmolTalk {self.split} row {self.order[index]}: {e}") from None
        return conversation
