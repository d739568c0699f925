"""
ChatJSONL: general chat conversations from local jsonl files, the offline stand-in for SmolTalk.

By default it reads every `chat/*.jsonl` of the data directory (the shared data has three: Open-Assistant
best paths, self-instruct human-written tasks, chatterbot scripted dialogs; about 2.5K conversations).
Rows are `{"messages": [...], ...}` (extra fields kept) and are validated at load time (see CustomJSON).

`split="train"` / `"val"` gives a deterministic held-out slice: a conversation goes to val when a hash of its
first user message falls under `val_fraction`. Hashing the prompt (not the position) keeps the split stable
when files grow, and puts conversations that share an opening question on the same side, so the same
question cannot be trained on and then "validated".
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

from nanochat.common import get_shared_data_dir
from nanochat.tasks.common import Conversation, DatasetUnavailableError, Task
from nanochat.tasks.customjson import load_conversations


def is_val(conversation: Conversation, val_fraction: float) -> bool:
    messages = conversation["messages"]
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    return zlib.crc32(first_user.encode("utf-8")) % 10_000 < val_fraction * 10_000


class ChatJSONL(Task):
    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | None = None,
        split: str | None = None,
        val_fraction: float = 0.1,
        data_dir: str | os.PathLike | None = None,
        **slice_kwargs: int | None,
    ):
        """`paths`: jsonl files (default: `<data_dir>/chat/*.jsonl`, sorted); `split`: None (all), "train", "val"."""
        super().__init__(**slice_kwargs)
        if split not in (None, "train", "val"):
            raise ValueError(f"ChatJSONL split must be None, 'train' or 'val', got {split!r}")
        if paths is None:
            folder = Path(data_dir if data_dir is not None else get_shared_data_dir()) / "chat"
            paths = sorted(folder.glob("*.jsonl"))
            if not paths:
                raise DatasetUnavailableError(
                    f"no chat/*.jsonl files in {folder.parent}; pass paths= or data_dir= (or set NANOCHAT_SHARED_DATA)"
                )
        self.paths = [Path(p) for p in paths]
        self.split = split
        self.conversations = [
            c
            for path in self.paths
            for c in load_conversations(path)
            if split is None or is_val(c, val_fraction) == (split == "val")
        ]

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return self.conversations[index]
