"""
GSM8K: grade-school math word problems (Cobbe et al. 2021), used to teach calculator tool use and evaluated
generatively (the number after "####").

Reference answers carry calculator annotations, e.g. "48/2 = <<48/2=24>>24 clips". Each `<<expr=result>>`
becomes a `python` part (the model learns to emit `<|python_start|>48/2<|python_end|>`) followed by a
`python_output` part (the result; at inference the Engine's calculator injects it, so it is never trained on).
"""

from __future__ import annotations

import os
import re

from nanochat.tasks.common import Conversation, DatasetTask

ANNOTATION_RE = re.compile(r"<<([^>]*)>>")
ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")


def extract_answer(text: str) -> str | None:
    """The number after the FIRST "####" (commas removed), or None. The original takes the first match, and a
    model that runs on after its answer ("#### 18 ... #### 20") is scored on what it committed to first."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).replace(",", "").rstrip(".") or None


def answer_to_parts(answer: str) -> list[dict[str, str]]:
    """Split a reference answer into text / python / python_output parts at its <<expr=result>> annotations."""
    parts: list[dict[str, str]] = []
    pieces = ANNOTATION_RE.split(answer)  # even indices: text between annotations; odd: annotation bodies
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
            continue
        expr, _, result = piece.rpartition("=")
        if not expr:  # an annotation without "=": keep the expression, there is no result to show
            expr, result = result, ""
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
    return parts


class GSM8K(DatasetTask):
    """GSM8K `main` config, split "train" (7,473) or "test" (1,319). Hub `openai/gsm8k`; locally
    `gsm8k/{split}.jsonl` with rows `{question, answer}`."""

    eval_type = "generative"

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None, **slice_kwargs: int | None):
        super().__init__(**slice_kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.load(
            what=f"GSM8K {split}", hub=("openai/gsm8k", "main", split), local=[f"gsm8k/{split}"], data_dir=data_dir
        )

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answer_to_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: Conversation, assistant_response: str) -> int:
        """1 if the response's final "#### number" equals the reference's, else 0."""
        content = conversation["messages"][-1]["content"]
        reference = content if isinstance(content, str) else "".join(p["text"] for p in content)
        expected = extract_answer(reference)
        got = extract_answer(assistant_response)
        if expected is None:
            raise ValueError("reference answer has no '#### number'")
        return int(got is not None and _same_number(got, expected))

    def reward(self, conversation: Conversation, assistant_response: str) -> float:
        """RL reward: exactly the eval outcome."""
        return float(self.evaluate(conversation, assistant_response))


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)  # "18" vs "18.00"
    except ValueError:
        return a == b
