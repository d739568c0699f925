"""
The chat itself, without any Gradio: check what the user typed, turn the conversation into prompt tokens (dropping
the oldest turns when it no longer fits the model's context), stream a reply from Engine.generate, and render it
as markdown with calculator calls shown apart from the text.

A conversation is the tokenizer's format: alternating {"role": "user"/"assistant", "content": ...} messages, where
an assistant's content is a string or a list of parts {"type": "text"/"python"/"python_output", "text": ...}. Keeping
the parts (not the rendered markdown) means the next turn's prompt shows the model its own tool calls exactly as
it wrote them.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

MAX_INPUT_CHARS = 8000

# C0 and C1 control characters except tab and newline (carriage returns are normalized first), and lone UTF-16
# surrogates, which JSON can carry but UTF-8 cannot encode.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")

# Tokens that end a reply. The Engine stops at assistant_end and bos; a model that starts a new turn by itself has
# also finished its reply (a small model does that often), so those end it too instead of showing up as text.
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>")


class InputError(ValueError):
    """Something we will not send to the model; the message says why, in words meant for the user."""


# -----------------------------------------------------------------------------
# User input


def clean_message(text: Any, max_chars: int = MAX_INPUT_CHARS) -> str:
    """The message to send, or InputError. Control characters are removed; special-token-looking text such as
    "<|bos|>" is kept as it is: the tokenizer encodes it as ordinary text, so it can never act as a token."""
    if not isinstance(text, str):
        raise InputError(f"The message must be text, not {type(text).__name__}.")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    cleaned = CONTROL_CHARS.sub("", text).strip()
    if not cleaned:
        if text.strip():
            raise InputError("The message holds only control characters; type some text.")
        raise InputError("The message is empty; type something first.")
    if len(cleaned) > max_chars:
        raise InputError(f"The message is {len(cleaned):,} characters long; the limit is {max_chars:,}. "
                         "Shorten it (the server's --max-input-chars sets the limit).")
    return cleaned


# -----------------------------------------------------------------------------
# Conversation -> prompt


@dataclass
class Prompt:
    tokens: list[int]
    dropped_exchanges: int  # oldest user/assistant pairs left out because the whole conversation did not fit
    budget: int  # prompt tokens allowed: the model's sequence length minus the room kept for the reply


def _rendered_length(tokenizer, messages: list[dict]) -> int:
    """Tokens these messages add to a conversation (render_conversation's leading BOS not counted)."""
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=sys.maxsize)
    return len(ids) - 1


def build_prompt(tokenizer, messages: list[dict], sequence_len: int, reply_room: int) -> Prompt:
    """Prompt tokens for the reply to messages[-1] (a user message): BOS, the newest exchanges that fit, the new
    message, <|assistant_start|>. Older exchanges are dropped whole, oldest first, so the model never sees half
    a turn. The reply keeps `reply_room` tokens of the sequence length for itself."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("build_prompt needs a conversation that ends with a user message")
    budget = sequence_len - reply_room
    needed = 1 + _rendered_length(tokenizer, messages[-1:]) + 1  # BOS + the new message + <|assistant_start|>
    if needed > budget:
        raise InputError(f"The message is {needed - 2:,} tokens long, but this model reads at most {budget:,} "
                         f"tokens of prompt (its context is {sequence_len:,} tokens, {reply_room:,} of them kept "
                         "for the reply). Shorten the message or lower max tokens.")
    exchanges = [messages[i:i + 2] for i in range(0, len(messages) - 1, 2)]
    kept: list[list[dict]] = []
    for exchange in reversed(exchanges):
        cost = _rendered_length(tokenizer, exchange)
        if needed + cost > budget:
            break  # this one and every older one are dropped: the kept history stays contiguous
        kept.insert(0, exchange)
        needed += cost
    conversation = [m for exchange in kept for m in exchange] + messages[-1:]
    ids, _ = tokenizer.render_conversation({"messages": conversation}, max_tokens=sys.maxsize)
    ids.append(tokenizer.encode_special("<|assistant_start|>"))
    return Prompt(ids, len(exchanges) - len(kept), budget)


def default_max_tokens(sequence_len: int) -> int:
    """The reply length the app starts with: a quarter of the context (at most 512), so a first exchange at full
    length leaves room for the second turn's question and reply (at the whole context, the second turn of every
    chat would drop the first)."""
    return max(1, min(512, sequence_len // 4))


def reply_room(sequence_len: int, max_tokens: int) -> int:
    """Room kept for the reply: what was asked for, but never more than half the context (a long max-tokens
    setting must not squeeze the conversation out entirely)."""
    return max(1, min(max_tokens, sequence_len // 2))


# -----------------------------------------------------------------------------
# A reply as it streams in


@dataclass
class Part:
    type: str  # "text", "python" (the model's calculator expression) or "python_output" (the calculator's result)
    ids: list[int] = field(default_factory=list)


class Reply:
    """Collects the reply's tokens into parts as the Engine yields them; knows when the reply has ended."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.stop_ids = {special(name) for name in STOP_TOKENS}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.parts: list[Part] = []
        self.done = False  # a stop token arrived (or the caller stopped)
        self.num_tokens = 0  # every token the Engine produced, forced calculator output and the stop token included
        self.started = time.perf_counter()
        self.finished: float | None = None

    def add(self, token: int) -> None:
        if self.done:
            return
        self.num_tokens += 1
        if token in self.stop_ids:
            self.finish()
        elif token == self.python_start:
            self.parts.append(Part("python"))
        elif token == self.output_start:
            self.parts.append(Part("python_output"))
        elif token in (self.python_end, self.output_end):
            self.parts.append(Part("text"))  # back to plain text after a tool part
        else:
            if not self.parts:
                self.parts.append(Part("text"))
            self.parts[-1].ids.append(token)

    def finish(self) -> None:
        self.done = True
        self.finished = self.finished or time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def tok_per_sec(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0

    def decoded(self) -> list[dict[str, str]]:
        """The parts as text, in the tokenizer's conversation format (empty text parts left out).

        While streaming, the last part may end inside a multi-byte character: its bytes decode to U+FFFD until the
        rest arrives, so trailing replacement characters are trimmed from an unfinished reply.
        """
        out = []
        for i, part in enumerate(self.parts):
            text = self.tokenizer.decode(part.ids)
            if not self.done and i == len(self.parts) - 1:
                text = text.rstrip("\ufffd")
            if part.type != "text" or text:
                out.append({"type": part.type, "text": text})
        return out

    def message(self) -> dict[str, Any]:
        """The assistant message to keep in the conversation."""
        parts = self.decoded()
        if all(p["type"] == "text" for p in parts):
            return {"role": "assistant", "content": "".join(p["text"] for p in parts)}
        return {"role": "assistant", "content": parts}

    def markdown(self) -> str:
        return render_markdown(self.decoded(), streaming=not self.done)


# -----------------------------------------------------------------------------
# Rendering


def inline_code(text: str) -> str:
    """`text` as a markdown code span, whatever backticks it contains (on one line: a span cannot hold newlines)."""
    text = " ".join(text.split("\n"))
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_markdown(parts: str | list[dict[str, str]], streaming: bool = False) -> str:
    """An assistant message as markdown: text as it is, each calculator call as its own quoted line
    "🧮 calculator: `expr` = `result`" (the Engine forced the result; the model only wrote the expression)."""
    if isinstance(parts, str):
        return parts
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part["type"] == "text":
            out.append(part["text"])
        elif part["type"] == "python":
            expr = part["text"].strip()
            has_result = i + 1 < len(parts) and parts[i + 1]["type"] == "python_output"
            if has_result:
                result = inline_code(parts[i + 1]["text"].strip())
                i += 1
            elif streaming and i == len(parts) - 1:
                result = "…"
            else:
                result = "*(not evaluated: the calculator accepts arithmetic and 'text'.count('x') only)*"
            out.append(f"\n\n> 🧮 calculator: {inline_code(expr)} = {result}\n\n")
        else:  # a python_output the model wrote itself, without a call before it
            out.append(f"\n\n> 🧮 output: {inline_code(part['text'].strip())}\n\n")
        i += 1
    text = "".join(out).strip()
    return text + " ▌" if streaming else text


# -----------------------------------------------------------------------------
# Streaming


def stream_reply(
    engine,
    prompt_tokens: list[int],
    *,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    step_lock: threading.Lock | None = None,
) -> Iterator[Reply]:
    """Yield the Reply after every token until it ends, max_tokens is reached or the caller stops iterating.

    `step_lock` is held for one forward pass at a time: concurrent chats on a shared model take turns token by
    token (each forward pass gets all of torch's threads) instead of thrashing the CPU together.
    """
    reply = Reply(engine.tokenizer)
    steps = engine.generate(prompt_tokens, max_tokens=max_tokens, temperature=temperature, top_k=top_k or None,
                            seed=seed)
    try:
        while not reply.done:
            with step_lock or nullcontext():  # no autocast: the weights are in the serving dtype
                column = next(steps, None)
            if column is None:
                break  # max_tokens (or the model's position limit) reached
            reply.add(column[0][0])
            if not reply.done:
                yield reply
    finally:
        steps.close()
        reply.finish()
    yield reply  # the finished reply, once: its render has no cursor
