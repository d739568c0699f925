"""
CustomJSON: conversations from a user-provided jsonl file, e.g. the original's identity_conversations.jsonl.

Each line is either an object `{"messages": [...], ...}` or, as in the original's files, a bare list of
messages `[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]`. Every line is
validated up front (alternating user/assistant, optional leading system message, ends with the assistant) so a
bad file fails at load time with its file:line, not halfway through a training run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nanochat.tasks.common import Conversation, Task, validate_conversation


def load_conversations(path: str | os.PathLike) -> list[Conversation]:
    """All conversations of a jsonl file (blank lines skipped); ValueError naming file:line on a bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file {path} does not exist")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conversation = json.loads(line)
                if isinstance(conversation, list):
                    conversation = {"messages": conversation}
                validate_conversation(conversation)
            except (json.JSONDecodeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: malformed conversation: {e}") from None
            conversations.append(conversation)
    return conversations


class CustomJSON(Task):
    """The conversations of one jsonl file, in file order."""

    def __init__(self, path: str | os.PathLike, **slice_kwargs: int | None):
        super().__init__(**slice_kwargs)
        self.path = Path(path)
        self.conversations = load_conversations(self.path)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return self.conversations[index]
