"""The chat app's pieces, without a server or a trained model: input cleaning, prompt building and context
truncation, calculator tool calls rendered as they stream (a scripted model under the real Engine), markdown edge
cases, chatting with no model loaded, and the scores tab with no history. The running server: test_app.py.
"""

from __future__ import annotations

import pytest
import torch
from app_server import SEQUENCE_LEN

from app.chat import (
    InputError,
    Reply,
    build_prompt,
    clean_message,
    inline_code,
    render_markdown,
    reply_room,
    stream_reply,
)
from app.models import ModelManager
from app.scores import read_scores
from app.ui import new_session, respond
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig

# -----------------------------------------------------------------------------
# Input


def test_clean_message_rules():
    assert clean_message("  hi there \n") == "hi there"
    assert clean_message("tab\tkept\nnewline kept") == "tab\tkept\nnewline kept"
    assert clean_message("a\ud800b") == "ab"  # a lone surrogate cannot be encoded
    assert clean_message("\u0085x\u009f") == "x"  # C1 controls
    with pytest.raises(InputError, match="limit is 10"):
        clean_message("x" * 11, max_chars=10)
    with pytest.raises(InputError, match="must be text"):
        clean_message(None)


def test_chat_without_a_model_says_so():
    outputs = list(respond(ModelManager(None, None, "cpu"), 8000, "hello?", new_session(), 0.7, 50, 16))
    _, display, state, status = outputs[-1]
    assert display[-1]["metadata"]["title"].startswith("⚠️ No model loaded") and status == "⚠️ No model loaded."
    assert state["messages"] == [] and display[0] == {"role": "user", "content": "hello?"}



# -----------------------------------------------------------------------------
# Context truncation


def test_long_history_is_truncated_from_the_oldest_turns(small_tokenizer):
    tok = small_tokenizer
    messages = []
    for i in range(8):
        messages += [{"role": "user", "content": f"question {i} " + "about the weather " * 8},
                     {"role": "assistant", "content": f"answer {i} " + "it is sunny today " * 8}]
    messages.append({"role": "user", "content": "the newest question"})
    prompt = build_prompt(tok, messages, SEQUENCE_LEN, reply_room(SEQUENCE_LEN, 64))
    text = tok.decode(prompt.tokens)
    assert len(prompt.tokens) <= prompt.budget == SEQUENCE_LEN - 64
    assert 0 < prompt.dropped_exchanges < 8
    kept = 8 - prompt.dropped_exchanges
    assert "the newest question" in text and f"answer {7}" in text  # the newest turns stay
    assert "question 0 " not in text and f"question {8 - kept - 1} " not in text  # the oldest go, whole
    assert text.startswith("<|bos|><|user_start|>question") and text.endswith("<|assistant_start|>")
    # Everything fits: nothing dropped.
    short = build_prompt(tok, messages[-3:], SEQUENCE_LEN, 64)
    assert short.dropped_exchanges == 0



# -----------------------------------------------------------------------------
# Calculator tool calls


class ScriptedModel(torch.nn.Module):
    """Stands in for a GPT that "wants" to emit a fixed script, one token per forward pass. The real Engine still
    samples from its logits, runs the calculator and forces <|output_start|>result<|output_end|> itself."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.register_buffer("cos", torch.zeros(1, 640, 1, 1))
        self.script, self.calls = script, 0

    def get_device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, ids: torch.Tensor, kv_cache=None, last_only: bool = False) -> torch.Tensor:
        B, T = ids.shape
        kv = torch.zeros(B, 1, T, 2)
        kv_cache.insert_kv(0, kv, kv)
        logits = torch.full((B, 1 if last_only else T, self.config.vocab_size), -1e9)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits


def test_calculator_call_renders_expression_and_result(small_tokenizer):
    tok = small_tokenizer
    special = tok.encode_special
    forced_len = 2 + len(tok.encode("36"))  # <|output_start|> 36 <|output_end|>, forced by the Engine
    filler = tok.encode("Q")[0]  # sampled at the forced positions, then replaced: must never show up
    script = [*tok.encode("Let me compute "), special("<|python_start|>"), *tok.encode("12*3"),
              special("<|python_end|>"), *[filler] * forced_len, *tok.encode(" so it is 36."),
              special("<|assistant_end|>")]
    engine = Engine(ScriptedModel(tok.get_vocab_size(), script), tok)
    prompt = build_prompt(tok, [{"role": "user", "content": "what is 12 times 3?"}], 64, 16)
    replies = [r.markdown() for r in stream_reply(engine, prompt.tokens, max_tokens=40, temperature=0.0, top_k=None,
                                                  seed=0)]
    final = replies[-1]
    assert final == "Let me compute \n\n> 🧮 calculator: `12*3` = `36`\n\n so it is 36."
    assert any("🧮 calculator: `12*3` = …" in r for r in replies)  # while waiting for the tool's output
    assert "Q" not in final and all("<|" not in r for r in replies)
    # The reply is kept as parts, so the next prompt shows the model its tool call exactly as it happened.
    message = {"role": "assistant", "content": [{"type": "text", "text": "Let me compute "},
                                                {"type": "python", "text": "12*3"},
                                                {"type": "python_output", "text": "36"},
                                                {"type": "text", "text": " so it is 36."}]}
    history = [{"role": "user", "content": "what is 12 times 3?"}, message, {"role": "user", "content": "thanks"}]
    ids = build_prompt(tok, history, 256, 16).tokens
    assert tok.decode(ids).count("<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>") == 1


def test_render_markdown_edge_cases(small_tokenizer):
    assert render_markdown([{"type": "python", "text": "1/0"}]) .startswith("> 🧮 calculator: `1/0` = *(not eval")
    assert render_markdown([{"type": "python_output", "text": "7"}]) == "> 🧮 output: `7`"
    assert inline_code("a`b") == "``a`b``" and inline_code("`x") == "`` `x ``"
    assert render_markdown("plain") == "plain"
    # Streaming a multi-byte character split over byte tokens never shows a replacement character.
    reply = Reply(small_tokenizer)
    shown = []
    for t in small_tokenizer.encode("héllo 🧮 wörld"):
        reply.add(t)
        shown.append(reply.markdown())
    assert all("\ufffd" not in s for s in shown)
    reply.add(small_tokenizer.encode_special("<|assistant_end|>"))
    assert reply.done and reply.markdown() == "héllo 🧮 wörld"
    # A model that opens a new user turn has finished its reply.
    reply = Reply(small_tokenizer)
    reply.add(small_tokenizer.encode("hi")[0])
    reply.add(small_tokenizer.encode_special("<|user_start|>"))
    assert reply.done



# -----------------------------------------------------------------------------
# Scores


def test_scores_without_history(tmp_path):
    assert "No eval history" in read_scores(tmp_path / "none.duckdb").message
