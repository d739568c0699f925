"""Property-based fuzzing (hypothesis) of the tokenizer round trip and of chat rendering.

Deterministic (derandomize=True, no example database), bounded so the file runs in seconds in CI. The full run
scales every test up: NANOCHAT_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import SPECIAL_TOKENS

EXAMPLES = int(os.environ.get("NANOCHAT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip

# Arbitrary unicode (hypothesis leaves out lone surrogates, which no str from UTF-8 can hold), plus text dense in
# what tokenizers find hard: whitespace runs, CRLF, digits, contractions, combining marks, emoji with ZWJ, NUL,
# and the pieces of special-token strings.
TRICKY = list(" \t\r\n\x00\x0b0123456789aZé'sS’llve") + ["\u0301", "\u200d", "😀", "👩\u200d💻", "€", "ß", "İ",
                                                          "<|", "|>", "<", "|", ">", "_start", "_end", "bos", "\ufeff"]
TEXT = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(TRICKY), max_size=80).map("".join))
TEXT_WITH_SPECIALS = st.lists(st.one_of(TEXT, st.sampled_from(SPECIAL_TOKENS)), max_size=8).map("".join)


@pytest.fixture(scope="module", params=["rustbpe", "huggingface"])
def tok(request, small_tokenizer, shared_data):
    """Both implementations: they share render_conversation, but not encode and decode."""
    if request.param == "rustbpe":
        return small_tokenizer
    from conftest import shard_texts  # tests/ is on sys.path (rootless)

    from nanochat.tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer.train_from_iterator(iter(shard_texts(shared_data, 0, 1_000_000)), 512)


def special_ids(tok) -> set[int]:
    return {tok.encode_special(name) for name in SPECIAL_TOKENS}


# --- encode / decode -----------------------------------------------------------------------------------------


@FUZZ
@given(text=TEXT)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@FUZZ
@given(text=TEXT_WITH_SPECIALS)
def test_special_token_strings_in_text_are_plain_text(tok, text):
    ids = tok.encode(text)
    assert not set(ids) & special_ids(tok)  # "<|bos|>" typed by a user is never the bos token
    assert tok.decode(ids) == text
    framed = tok.encode(text, prepend="<|bos|>", append="<|assistant_end|>")
    assert framed == [tok.get_bos_token_id(), *ids, tok.encode_special("<|assistant_end|>")]


@FUZZ
@given(texts=st.lists(TEXT_WITH_SPECIALS, max_size=6))
def test_batch_encoding_matches_one_by_one(tok, texts):
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]


# --- render_conversation -------------------------------------------------------------------------------------

PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "python", "python_output"]), "text": TEXT_WITH_SPECIALS})
ASSISTANT_CONTENT = st.one_of(TEXT_WITH_SPECIALS, st.lists(PART, max_size=4))


@st.composite
def conversations(draw, system: bool | None = None) -> dict:
    """A valid conversation: a system message (optional unless `system` says), then user/assistant turns
    alternating from user."""
    turns = draw(st.integers(min_value=1, max_value=6))
    with_system = draw(st.booleans()) if system is None else system
    messages = [{"role": "system", "content": draw(TEXT_WITH_SPECIALS)}] if with_system else []
    for i in range(turns):
        if i % 2 == 0:
            messages.append({"role": "user", "content": draw(TEXT_WITH_SPECIALS)})
        else:
            messages.append({"role": "assistant", "content": draw(ASSISTANT_CONTENT)})
    return {"messages": messages}


def expected_rendering(conversation: dict) -> tuple[str, int]:
    """What the rendered ids must decode to, and how many tokens the model is trained on (mask 1) beyond the
    assistant's own content tokens: one per <|python_start|>, <|python_end|> and <|assistant_end|>."""
    messages = conversation["messages"]
    if messages[0]["role"] == "system":
        first = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [first, *messages[2:]]
    out, trained_specials = ["<|bos|>"], 0
    for message in messages:
        if message["role"] == "user":
            out += ["<|user_start|>", message["content"], "<|user_end|>"]
            continue
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        out.append("<|assistant_start|>")
        for part in parts:
            if part["type"] == "text":
                out.append(part["text"])
            elif part["type"] == "python":
                out += ["<|python_start|>", part["text"], "<|python_end|>"]
                trained_specials += 2
            else:
                out += ["<|output_start|>", part["text"], "<|output_end|>"]
        out.append("<|assistant_end|>")
        trained_specials += 1
    return "".join(out), trained_specials


def trained_content_tokens(tok, conversation: dict) -> int:
    total = 0
    for message in conversation["messages"]:
        if message["role"] == "assistant":
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            total += sum(len(tok.encode(p["text"])) for p in parts if p["type"] != "python_output")
    return total


@FUZZ
@given(conversation=conversations())
def test_render_conversation_on_valid_conversations(tok, conversation):
    ids, mask = tok.render_conversation(conversation, max_tokens=10**9)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    text, trained_specials = expected_rendering(conversation)
    assert tok.decode(ids) == text
    assert sum(mask) == trained_content_tokens(tok, conversation) + trained_specials
    # Each structural special token appears exactly as often as the structure asks: content never adds any.
    roles = [m["role"] for m in conversation["messages"] if m["role"] != "system"]
    counts = {name: ids.count(tok.encode_special(name)) for name in SPECIAL_TOKENS}
    assert counts["<|bos|>"] == 1
    assert counts["<|user_start|>"] == counts["<|user_end|>"] == roles.count("user")
    assert counts["<|assistant_start|>"] == counts["<|assistant_end|>"] == roles.count("assistant")


@FUZZ
@given(conversation=conversations(), max_tokens=st.integers(min_value=0, max_value=300))
def test_truncated_rendering_is_a_prefix(tok, conversation, max_tokens):
    ids, mask = tok.render_conversation(conversation, max_tokens=10**9)
    assert tok.render_conversation(conversation, max_tokens=max_tokens) == (ids[:max_tokens], mask[:max_tokens])


@FUZZ
@given(conversation=conversations().filter(lambda c: c["messages"][-1]["role"] == "assistant"))
def test_render_for_completion(tok, conversation):
    prompt = tok.render_for_completion(conversation)
    without_reply = {"messages": conversation["messages"][:-1]}
    assert prompt == tok.render_conversation(without_reply)[0] + [tok.encode_special("<|assistant_start|>")]


# --- malformed conversations ---------------------------------------------------------------------------------

NOT_STR = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.binary(max_size=4),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))  # fmt: skip
NOT_STR_OR_LIST = st.one_of(NOT_STR, st.lists(st.text(max_size=3), min_size=1, max_size=2))
PART_TYPES = ("text", "python", "python_output")


@st.composite
def malformed_conversations(draw, kind: str) -> dict:
    """A valid conversation broken in one way (`kind`)."""
    if kind == "no_messages":
        return draw(st.sampled_from([{"messages": []}, {"messages": [{"role": "system", "content": "only"}]}]))
    if kind == "conversation_shape":
        return draw(st.sampled_from([{}, {"messages": None}, {"messages": "user: hi"}, {"messages": {"role": "user"}}]))
    conversation = draw(conversations(system=True if kind == "content_type_after_system" else None))
    messages = conversation["messages"]
    turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
    if kind == "content_type":  # with a system message in front, the first user turn is the next finding
        turns = turns[1:] if messages[0]["role"] == "system" else turns
        if not turns:
            messages.append({"role": "assistant", "content": "a"})
            turns = [len(messages) - 1]
    i = draw(st.sampled_from(turns))
    if kind == "wrong_role":
        messages[i]["role"] = draw(st.text(max_size=10).filter(lambda role: role != messages[i]["role"]))
    elif kind in ("content_type", "content_type_after_system"):  # of a user or assistant turn
        if kind == "content_type_after_system":
            i = 1
        bad = NOT_STR_OR_LIST if messages[i]["role"] == "user" else NOT_STR
        messages[i]["content"] = draw(bad)
    elif kind == "system_content_type":
        messages.insert(0, {"role": "system", "content": draw(NOT_STR_OR_LIST)})
        if messages[1]["role"] == "system":
            del messages[1]
    elif kind == "message_shape":
        messages[i] = draw(st.one_of(NOT_STR_OR_LIST, st.fixed_dictionaries({"role": st.just(messages[i]["role"])}),
                                     st.fixed_dictionaries({"content": st.just("x")})))  # fmt: skip
    else:  # one bad part in an assistant turn appended at the end
        part = {"type": "python", "text": "x = 1"}
        if kind == "unknown_part_type":
            part["type"] = draw(st.text(max_size=10).filter(lambda t: t not in PART_TYPES))
        elif kind == "part_text_type":
            part["text"] = draw(NOT_STR_OR_LIST)
        else:  # part_shape
            part = draw(st.one_of(NOT_STR_OR_LIST, st.just({"type": "text"}), st.just({"text": "x"})))
        if messages[-1]["role"] == "assistant":
            messages.append({"role": "user", "content": "q"})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "ok"}, part]})
    return conversation


def assert_clear_value_error(tok, conversation):
    with pytest.raises(ValueError) as raised:
        tok.render_conversation(conversation)
    assert len(str(raised.value)) > 10


# Malformations that already get a ValueError naming the problem.
@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("kind", ["no_messages", "wrong_role", "content_type", "unknown_part_type"])
def test_malformed_conversations_raise_a_clear_value_error(tok, kind, data):
    assert_clear_value_error(tok, data.draw(malformed_conversations(kind)))


# Findings of this fuzzing, for nanochat/tokenizer.py (render_conversation trusts the shape of its input):
# - a part whose "text" is a list of str is silently accepted: encode() takes it for a batch, and lists end up
#   inside the ids; any other non-str text raises TypeError from tiktoken's worker threads;
# - a non-str system message, or a non-str first user message after a system message, raises TypeError (the
#   system message is merged into that user message before the types are checked);
# - a message or part that is not a dict, or lacks a key, raises TypeError/KeyError; so does a conversation
#   without a "messages" list.
# All fixed by tokenizer._check_shape; these now hold for every generated conversation.
@settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
@pytest.mark.parametrize("kind", ["part_text_type", "system_content_type", "content_type_after_system",
                                  "message_shape", "part_shape", "conversation_shape"])  # fmt: skip
def test_malformed_shapes_raise_a_clear_value_error(tok, kind, data):
    assert_clear_value_error(tok, data.draw(malformed_conversations(kind)))


def test_list_part_text_is_refused(tok):
    """The worst of the findings above, pinned down: it used to render silently, with lists inside the ids."""
    conversation = {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": [{"type": "text", "text": ["a", "b"]}]}]}  # fmt: skip
    with pytest.raises(ValueError, match='part 0 must be a dict with "type" and a str "text"'):
        tok.render_conversation(conversation)
