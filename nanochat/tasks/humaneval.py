"""
HumanEval (Chen et al. 2021): 164 Python functions to complete from a signature and docstring, checked by unit
tests. Generative eval: the model's code is run in the sandbox (`nanochat.execution.execute_code`).

Hub `openai/openai_humaneval` (split test); locally `humaneval/HumanEval.jsonl.gz` with rows
`{task_id, prompt, canonical_solution, test, entry_point}`. The conversation is user = the prompt, assistant =
the prompt completed by the canonical solution (a chat model answers with the whole function).
"""

from __future__ import annotations

import os
import re

from nanochat.execution import execute_code
from nanochat.tasks.common import Conversation, DatasetTask

CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str:
    """The first fenced code block of a reply, else the reply itself (a model may answer with bare code)."""
    match = CODE_BLOCK_RE.search(completion)
    return match.group(1) if match else completion


class HumanEval(DatasetTask):
    eval_type = "generative"

    def __init__(self, data_dir: str | os.PathLike | None = None, timeout: float = 5.0, **slice_kwargs: int | None):
        super().__init__(**slice_kwargs)
        self.timeout = timeout
        # Shuffled like the original (seed 42), so `--max-per-task K` evaluates the same K problems it does.
        self.load(
            what="HumanEval",
            hub=("openai/openai_humaneval", None, "test"),
            local=["humaneval/HumanEval"],
            data_dir=data_dir,
        )

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def build_program(self, conversation: Conversation, assistant_response: str) -> str:
        """
        The program to run: prompt, then the model's code, then the tests and `check(entry_point)`.

        The prompt always comes first because it is valid Python on its own (a function whose body is its
        docstring) and carries the imports and helper functions the tests may need. If the model wrote the
        whole function, its definition simply replaces the prompt's; if it wrote only the body, the body
        continues the prompt's function.
        """
        prompt = conversation["messages"][0]["content"]
        code = extract_program(assistant_response)
        defines_entry = re.search(rf"^def {re.escape(conversation['entry_point'])}\(", code, re.MULTILINE)
        program = prompt + "\n\n" + code if defines_entry else prompt + code
        return program + "\n\n" + conversation["test"] + "\n" + f"check({conversation['entry_point']})\n"

    def evaluate(self, conversation: Conversation, assistant_response: str) -> int:
        result = execute_code(self.build_program(conversation, assistant_response), timeout=self.timeout)
        return int(result.success)
