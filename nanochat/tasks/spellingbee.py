"""
Synthetic spelling tasks over an English word list (dwyl/english-words `words_alpha.txt`, one word per line).

Small models see tokens, not letters, so "how many r's in strawberry" is hard for them. Two tasks help:
- `SimpleSpelling`: spell a word letter by letter, which teaches the token -> letters mapping.
- `SpellingBee`: count a letter in a word. The assistant spells the word, tallies by hand, then checks with
  the calculator tool (`'strawberry'.count('r')`, which the Engine's calculator allows) and ends with
  "#### <count>" so it can be graded like GSM8K.

Examples are generated on the fly: example i of a task is a pure function of (seed, split, i). Train and test
use disjoint words: a word's split is decided by a hash of the word itself (about 10% go to test), so no test
word is ever trained on, whatever the sizes and seeds.
"""

from __future__ import annotations

import functools
import os
import random
import string
import zlib
from pathlib import Path

from nanochat.common import get_shared_data_dir
from nanochat.tasks.common import Conversation, DatasetUnavailableError, Task
from nanochat.tasks.gsm8k import extract_answer

WORD_LIST = "spellingbee/words_alpha.txt"
TEST_PERCENT = 10

COUNT_TEMPLATES = [
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter} in {word}.",
    "In the word {word}, how many times does {letter} appear?",
    "How often does {letter} occur in the word {word}?",
    "What is the count of the letter {letter} in {word}?",
    "Can you tell me how many {letter} there are in {word}?",
    "how many {letter} in {word}",
    "Number of {letter} in {word}?",
    "I need to know how many times {letter} shows up in the word {word}.",
    "Please count the letter {letter} in {word}.",
    "Tell me the number of occurrences of the letter {letter} in the word {word}.",
]

SPELL_TEMPLATES = [
    "Spell the word: {word}",
    "Spell {word}",
    "How do you spell {word}?",
    "Spell out {word} letter by letter.",
    "Can you spell the word {word} for me?",
    "What are the letters of {word}?",
]


@functools.lru_cache(maxsize=4)
def load_words(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train words, test words) of a word list. The file has CRLF line endings; strip() handles both."""
    train, test = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            word = line.strip().lower()
            if word and word.isascii() and word.isalpha():
                (test if word_split(word) == "test" else train).append(word)
    return tuple(train), tuple(test)


def word_split(word: str) -> str:
    """ "train" or "test" for a word, from a stable hash (crc32, unlike hash(), does not change per process)."""
    return "test" if zlib.crc32(word.encode()) % 100 < TEST_PERCENT else "train"


class _WordTask(Task):
    """Shared setup: `size` examples drawn from the split's words; example i seeded by (seed, split, i)."""

    eval_type = "generative"

    def __init__(
        self,
        size: int = 1000,
        split: str = "train",
        seed: int = 42,
        data_dir: str | os.PathLike | None = None,
        **slice_kwargs: int | None,
    ):
        super().__init__(**slice_kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"{type(self).__name__} split must be 'train' or 'test', got {split!r}")
        path = Path(data_dir if data_dir is not None else get_shared_data_dir()) / WORD_LIST
        if not path.is_file():
            raise DatasetUnavailableError(
                f"{type(self).__name__} needs the word list {path} (dwyl/english-words words_alpha.txt); pass "
                "data_dir= or set NANOCHAT_SHARED_DATA to a folder holding spellingbee/words_alpha.txt"
            )
        train, test = load_words(str(path))
        self.words = train if split == "train" else test
        self.size, self.split, self.seed = size, split, seed

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # A str seed is hashed with sha512 by random.seed: stable across processes and Python versions.
        return random.Random(f"{type(self).__name__}:{self.split}:{self.seed}:{index}")


class SpellingBee(_WordTask):
    """Count the occurrences of a letter in a word, reasoning by hand and then with the calculator tool."""

    def get_example(self, index: int) -> Conversation:
        rng = self._rng(index)
        word = rng.choice(self.words)
        # Mostly ask about a letter of the word; sometimes any letter, so that "0" is a possible answer.
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        shown_letter = letter.upper() if rng.random() < 0.2 else letter
        quote = rng.choice(["", "'", '"'])
        prompt = rng.choice(COUNT_TEMPLATES).format(
            letter=f"{quote}{shown_letter}{quote}", word=f"{quote}{word}{quote}"
        )
        if rng.random() < 0.3:
            prompt = prompt.lower()
        count = word.count(letter)

        tally, lines = 0, []
        for position, char in enumerate(word, 1):
            if char == letter:
                tally += 1
                lines.append(f"{position}. {char} <- match, {tally} so far")
            else:
                lines.append(f"{position}. {char}")
        by_hand = (
            f"I need to count the letter '{letter}' in the word '{word}'. I'll go letter by letter first.\n\n"
            f"Spelled out: {','.join(word)}\n\n" + "\n".join(lines) + f"\n\nCounting by hand gives {count}.\n\n"
            "Let me double-check with Python:\n\n"
        )
        parts = [
            {"type": "text", "text": by_hand},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"},
        ]
        return {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts}],
            "word": word,
            "letter": letter,
        }

    def evaluate(self, conversation: Conversation, assistant_response: str) -> int:
        """1 if the response's final "#### number" equals the true count."""
        expected = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(expected is not None and extract_answer(assistant_response) == expected)


class SimpleSpelling(_WordTask):
    """Spell a word as "word:l,e,t,t,e,r,s"."""

    def get_example(self, index: int) -> Conversation:
        rng = self._rng(index)
        word = rng.choice(self.words)
        prompt = rng.choice(SPELL_TEMPLATES).format(word=word)
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"{word}:{','.join(word)}"},
            ],
            "word": word,
        }

    def evaluate(self, conversation: Conversation, assistant_response: str) -> int:
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])
