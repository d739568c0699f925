"""Tasks on the real offline data: conversions, splits, evaluate(), mixtures, loading and rendering."""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
import types
from collections import Counter

import numpy as np
import pytest

from nanochat.engine import use_calculator
from nanochat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    ChatJSONL,
    CustomJSON,
    DatasetUnavailableError,
    HumanEval,
    Identity,
    SimpleSpelling,
    SpellingBee,
    Task,
    TaskMixture,
    TaskSequence,
    mid_train_mixture,
    mid_train_val,
    render_mc,
    sft_mixture,
    sft_val,
    validate_conversation,
)
from nanochat.tasks.common import shuffled_order
from nanochat.tasks.gsm8k import extract_answer
from nanochat.tasks.spellingbee import load_words


class ListTask(Task):
    """A task over a plain list, for testing the combinators."""

    def __init__(self, items, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.items = items

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return self.items[index]


# -----------------------------------------------------------------------------
# Task base, mixtures


def test_task_slicing():
    task = ListTask(list(range(10)), start=2, stop=9, step=3)
    assert len(task) == 3 and list(task) == [2, 5, 8]
    assert task[-1] == 8
    with pytest.raises(IndexError):
        task[3]
    assert len(ListTask(list(range(10)), stop=100)) == 10


def test_task_mixture_deterministic_and_covers_each_example_once():
    a, b, c = ListTask([f"a{i}" for i in range(50)]), ListTask([f"b{i}" for i in range(7)]), ListTask(["c0"])
    mixture = TaskMixture([a, b, c], seed=3)
    items = list(mixture)
    assert len(mixture) == 58
    assert Counter(items) == Counter(list(a) + list(b) + list(c))  # every example exactly once
    assert items == list(TaskMixture([a, b, c], seed=3))  # same seed, same order
    assert items != list(TaskMixture([a, b, c], seed=4))
    assert items != list(a) + list(b) + list(c)  # actually shuffled


def test_task_mixture_duplicate_is_two_epochs():
    a, b, empty = ListTask(["a0", "a1", "a2"]), ListTask(["b0"]), ListTask([])
    counts = Counter(TaskMixture([empty, a, b, empty, a], seed=0))
    assert counts == {"a0": 2, "a1": 2, "a2": 2, "b0": 1}


def test_task_sequence_concatenates():
    seq = TaskSequence([ListTask([1, 2]), ListTask([3]), ListTask([4, 5, 6], stop=2)])
    assert list(seq) == [1, 2, 3, 4, 5]


def test_render_mc_format():
    prompt = render_mc("What is 2+2?", ["A", "B"], ["3", "4"])
    assert (
        prompt
        == "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer."
    )
    with pytest.raises(ValueError):
        render_mc("q", ["A"], ["x", "y"])


# -----------------------------------------------------------------------------
# GSM8K


def test_gsm8k_tool_calls_evaluate_to_annotated_results(shared_data):
    task = GSM8K("train", data_dir=shared_data)
    assert len(task) == 7473
    rows = {
        json.loads(line)["question"]: json.loads(line)["answer"] for line in open(shared_data / "gsm8k/train.jsonl")
    }
    good = 0
    for conversation in task:
        validate_conversation(conversation)
        user, assistant = conversation["messages"]
        parts = assistant["content"]
        # Reassembling the parts gives back the original annotated answer.
        rebuilt, ok = "", True
        for i, part in enumerate(parts):
            if part["type"] == "text":
                rebuilt += part["text"]
            elif part["type"] == "python":
                output = parts[i + 1]
                assert output["type"] == "python_output"
                rebuilt += f"<<{part['text']}={output['text']}>>"
                value = use_calculator(part["text"])
                try:
                    expected = float(output["text"].replace(",", ""))
                except ValueError:
                    expected = None
                ok = ok and value is not None and expected is not None and abs(value - expected) < 1e-6
        assert rebuilt == rows[user["content"]]
        good += ok and any(p["type"] == "python" for p in parts)
    assert good / len(task) >= 0.95, f"only {good}/{len(task)} examples have fully working calculator calls"


def test_gsm8k_evaluate(shared_data):
    task = GSM8K("test", data_dir=shared_data)
    assert len(task) == 1319
    for conversation in [task[0], task[100], task[-1]]:
        reference = "".join(p["text"] for p in conversation["messages"][-1]["content"] if p["type"] == "text")
        answer = reference.split("####")[-1].strip()
        assert task.evaluate(conversation, reference)
        assert task.evaluate(conversation, f"Some reasoning.\n#### {answer}")
        assert not task.evaluate(conversation, f"#### {float(answer.replace(',', '')) + 1:g}")
        assert not task.evaluate(conversation, "I don't know")
    # commas in numbers are ignored on both sides
    conversation = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "#### 1,450,000"}]}
    assert task.evaluate(conversation, "so #### 1450000") and task.evaluate(conversation, "#### 1,450,000")
    assert not task.evaluate(conversation, "#### 145000")


def test_gsm8k_takes_the_first_answer_as_the_original_does():
    assert extract_answer("#### 18\nActually, let me redo that. #### 20") == "18"
    assert extract_answer("The answer is 1,450,000.\n#### 1,450,000.") == "1450000"
    assert extract_answer("no answer here") is None
    conversation = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "#### 18"}]}
    task = GSM8K.__new__(GSM8K)
    assert task.evaluate(conversation, "#### 18 #### 20") and not task.evaluate(conversation, "#### 20 #### 18")


# numpy's default_rng(42).permutation(n), as Hugging Face `datasets`' Dataset.shuffle(seed=42) draws it; pinned so
# a change of generator cannot slip through as a silently different subset.
ORIGINAL_ORDER_10 = [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]
ORIGINAL_ORDER_164 = [52, 134, 51, 66, 147]


def test_subsets_are_drawn_in_the_originals_order(shared_data):
    assert shuffled_order(10) == ORIGINAL_ORDER_10
    assert shuffled_order(164)[:5] == ORIGINAL_ORDER_164
    for task in (ARC("ARC-Easy", "test", data_dir=shared_data), MMLU("all", "test", data_dir=shared_data),
                 GSM8K("test", data_dir=shared_data)):
        expected = np.random.default_rng(42).permutation(len(task.rows))[:20].tolist()
        assert task.order[:20] == expected, type(task).__name__
    arc = ARC("ARC-Easy", "test", data_dir=shared_data)  # the first example is the permutation's first row
    first = arc.rows[np.random.default_rng(42).permutation(len(arc.rows))[0]]["question"]
    assert arc[0]["messages"][0]["content"].startswith(f"Multiple Choice question: {first}\n")


# -----------------------------------------------------------------------------
# Spelling


def test_spellingbee_answers_are_correct(shared_data):
    task = SpellingBee(size=300, split="train", seed=1, data_dir=shared_data)
    assert len(task) == 300
    for conversation in task:
        validate_conversation(conversation)
        prompt = conversation["messages"][0]["content"]
        parts = conversation["messages"][1]["content"]
        call = next(p["text"] for p in parts if p["type"] == "python")
        match = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call)
        assert match, call
        word, letter = match.groups()
        assert word in prompt.lower() and letter in prompt.lower()
        count = sum(ch == letter for ch in word)  # counted here, independently of the task's code
        assert use_calculator(call) == count
        assert next(p["text"] for p in parts if p["type"] == "python_output") == str(count)
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        assert text.rstrip().endswith(f"#### {count}")
        assert task.evaluate(conversation, f"blah\n#### {count}")
        assert not task.evaluate(conversation, f"#### {count + 1}")
    prompts = {c["messages"][0]["content"].split()[0].lower() for c in task}
    assert len(prompts) >= 5  # varied templates


def test_spelling_splits_disjoint_and_deterministic(shared_data):
    train_words, test_words = load_words(str(shared_data / "spellingbee/words_alpha.txt"))
    assert not set(train_words) & set(test_words)
    assert 0.05 < len(test_words) / (len(train_words) + len(test_words)) < 0.15
    assert all(w.isalpha() and w == w.strip() for w in test_words[:1000])  # CRLF stripped
    for cls in (SpellingBee, SimpleSpelling):
        train = [c["word"] for c in cls(size=2000, split="train", seed=0, data_dir=shared_data)]
        test = [c["word"] for c in cls(size=2000, split="test", seed=0, data_dir=shared_data)]
        assert not set(train) & set(test)
        again = cls(size=2000, split="train", seed=0, data_dir=shared_data)
        assert [again[i] for i in range(50)] == [
            cls(size=50, split="train", seed=0, data_dir=shared_data)[i] for i in range(50)
        ]
        other_seed = cls(size=50, split="train", seed=1, data_dir=shared_data)
        assert [c["word"] for c in other_seed] != train[:50]


def test_simple_spelling(shared_data):
    task = SimpleSpelling(size=100, split="test", data_dir=shared_data)
    for conversation in task:
        answer = conversation["messages"][1]["content"]
        word, letters = answer.split(":")
        assert letters.split(",") == list(word) and word in conversation["messages"][0]["content"]
        assert task.evaluate(conversation, answer) and not task.evaluate(conversation, word)


# -----------------------------------------------------------------------------
# Multiple choice


@pytest.mark.parametrize("subset,n", [("ARC-Easy", 2376), ("ARC-Challenge", 1172)])
def test_arc(shared_data, subset, n):
    task = ARC(subset, "test", data_dir=shared_data)
    assert len(task) == n and task.eval_type == "categorical"
    source = {}
    for line in open(shared_data / f"arc/{subset}-Test.jsonl"):
        row = json.loads(line)
        source.setdefault(row["question"], set()).add(row["answerKey"])
    for conversation in task:
        letters, answer = conversation["letters"], conversation["messages"][1]["content"]
        prompt = conversation["messages"][0]["content"]
        assert answer in letters and all(f"={letter}\n" in prompt for letter in letters)
        question = prompt.removeprefix("Multiple Choice question: ").split("\n- ")[0]
        assert answer in source[question]
    conversation = task[0]
    right = conversation["messages"][1]["content"]
    wrong = next(letter for letter in conversation["letters"] if letter != right)
    assert task.evaluate(conversation, right) and task.evaluate(conversation, f" {right}\n")
    assert not task.evaluate(conversation, wrong)


def test_mmlu(shared_data):
    task = MMLU("all", "test", data_dir=shared_data)
    assert len(task) == 5700 and task.eval_type == "categorical"
    rows = [json.loads(line) for line in open(shared_data / "mmlu/mmlu_redux_test.jsonl")]
    expected = Counter((r["question"], "ABCD"[r["answer"]]) for r in rows)
    got = Counter()
    for conversation in task:
        prompt, answer = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
        assert conversation["letters"] == ["A", "B", "C", "D"] and prompt.endswith("letter of the correct answer.")
        got[(prompt.removeprefix("Multiple Choice question: ").split("\n- ")[0], answer)] += 1
    assert got == expected
    assert len({task[i]["subject"] for i in range(100)}) > 20  # shuffled, not sorted by subject
    conversation = task[0]
    right = conversation["messages"][1]["content"]
    assert task.evaluate(conversation, right)
    assert not any(task.evaluate(conversation, other) for other in "ABCD" if other != right)


def test_train_splits_offline_raise_clear_error(shared_data, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    for make in (
        lambda: ARC("ARC-Easy", "train"),
        lambda: ARC("ARC-Challenge", "train", data_dir=shared_data),
        lambda: MMLU("auxiliary_train", "train"),
        lambda: MMLU("auxiliary_train", "train", data_dir=shared_data),
    ):
        with pytest.raises(DatasetUnavailableError, match="only .*test") as info:
            make()
        message = str(info.value)
        assert "pip install datasets" in message and "data_dir" in message
        assert "never used" in message


# -----------------------------------------------------------------------------
# Hub / local selection (a stand-in `datasets` module: the real one is not installed here)


def fake_datasets(monkeypatch, behaviour):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return behaviour(path, name, split)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_hub_preferred_when_available(monkeypatch, shared_data):
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    rows = [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]
    calls = fake_datasets(monkeypatch, lambda *a: rows)
    task = GSM8K("train")
    assert calls == [("openai/gsm8k", "main", "train")] and len(task) == 1
    assert task[0]["messages"][1]["content"][1] == {"type": "python", "text": "1+1"}
    # An explicit data_dir means local only: the hub is not consulted.
    assert len(GSM8K("test", data_dir=shared_data)) == 1319 and len(calls) == 1


def test_local_fallback_when_hub_fails(monkeypatch, shared_data, tmp_path):
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))

    def offline(*args):
        raise ConnectionError("no network")

    calls = fake_datasets(monkeypatch, offline)
    assert len(GSM8K("test")) == 1319 and len(calls) == 1
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(tmp_path))  # neither works: the error names both options
    with pytest.raises(DatasetUnavailableError, match="(?s)ConnectionError.*no network.*data_dir"):
        GSM8K("test")


def test_local_parquet_and_gzip(tmp_path, shared_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "gsm8k").mkdir()
    rows = [json.loads(line) for line in open(shared_data / "gsm8k/test.jsonl")][:20]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k/test.parquet")
    with gzip.open(tmp_path / "gsm8k/train.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:5])
    assert len(GSM8K("test", data_dir=tmp_path)) == 20
    assert len(GSM8K("train", data_dir=tmp_path)) == 5


# -----------------------------------------------------------------------------
# Chat data


def test_chat_jsonl_loads_shared_files(shared_data):
    everything = ChatJSONL(data_dir=shared_data)
    assert len(everything) == 2026 + 95 + 427
    assert {p.name for p in everything.paths} == {
        "chatterbot_english.jsonl",
        "oasst_en100_best_path.jsonl",
        "self_instruct_human.jsonl",
    }
    train, val = ChatJSONL(split="train", data_dir=shared_data), ChatJSONL(split="val", data_dir=shared_data)
    assert len(train) + len(val) == len(everything) and 0.05 < len(val) / len(everything) < 0.2
    train_prompts = {c["messages"][0]["content"] for c in train}
    assert not train_prompts & {c["messages"][0]["content"] for c in val}
    assert [c["id"] for c in val] == [c["id"] for c in ChatJSONL(split="val", data_dir=shared_data)]


def test_chat_jsonl_rejects_malformed_file_with_location(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3") + ".*alternate"):
        ChatJSONL([path])
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        ChatJSONL([path])
    ends_with_user = {"messages": [*good["messages"], {"role": "user", "content": "?"}]}
    path.write_text(json.dumps(ends_with_user) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1")):
        ChatJSONL([path])


def test_custom_json_accepts_bare_message_lists(tmp_path):
    path = tmp_path / "identity.jsonl"
    system = {"role": "system", "content": "Be brief."}
    lines = [
        [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "nanochat"}],
        {"messages": [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    task = CustomJSON(path)
    assert len(task) == 2 and task[0]["messages"][1]["content"] == "nanochat"


def test_identity_deterministic(shared_data):
    a, b = Identity(size=200, seed=5), Identity(size=200, seed=5)
    assert list(a) == list(b) and list(a) != list(Identity(size=200, seed=6))
    assert len({json.dumps(c) for c in a}) > 100
    for conversation in a:
        validate_conversation(conversation)
    assert sum("nanochat" in json.dumps(c) for c in a) > 0.6 * len(a)
    assert any("nanochat-dagster" in json.dumps(c) for c in a)


# -----------------------------------------------------------------------------
# HumanEval


def test_humaneval_canonical_passes_and_wrong_fails(shared_data):
    task = HumanEval(data_dir=shared_data)
    assert len(task) == 164 and task.eval_type == "generative"
    for i in range(5):
        conversation = task[i]
        assert conversation["task_id"] == f"HumanEval/{ORIGINAL_ORDER_164[i]}"  # the original's shuffled order
        assert task.evaluate(conversation, conversation["messages"][1]["content"])
    conversation = next(task[i] for i in range(len(task)) if task[i]["task_id"] == "HumanEval/0")
    solution = conversation["messages"][1]["content"]
    body = solution.removeprefix(conversation["messages"][0]["content"])
    assert task.evaluate(conversation, f"Here you go:\n```python\n{solution}```\nDone.")  # fenced full function
    assert task.evaluate(conversation, body)  # bare body continuing the prompt
    assert not task.evaluate(conversation, "")
    assert not task.evaluate(
        conversation, "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"
    )


# -----------------------------------------------------------------------------
# Mixtures render with the tokenizer, mask on assistant tokens only


def check_rendering(tokenizer, conversation):
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**6)
    special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    assert len(ids) == len(mask) and ids[0] == special["<|bos|>"] and mask[0] == 0
    user_texts = [m["content"] for m in conversation["messages"] if m["role"] == "user"]
    state, span, spans = "outside", [], []
    for token, m in zip(ids[1:], mask[1:]):
        if token == special["<|user_start|>"]:
            state, span = "user", []
        elif token == special["<|user_end|>"]:
            spans.append(span)
        elif token == special["<|assistant_start|>"]:
            assert m == 0
            state = "assistant"
            continue
        elif token == special["<|output_start|>"]:
            state = "output"
        elif state == "user":
            span.append(token)
        if state in ("user", "output", "outside"):
            assert m == 0, "user text, tool output and framing must not be trained on"
        else:
            assert m == 1, "every assistant token must be trained on"
        if token == special["<|output_end|>"]:
            state = "assistant"
        elif token == special["<|assistant_end|>"]:
            state = "outside"
    assert [tokenizer.decode(s) for s in spans] == user_texts
    assert sum(mask) > 0


@pytest.mark.parametrize("build", [mid_train_mixture, sft_mixture, mid_train_val, sft_val])
def test_mixtures_render_with_assistant_only_mask(build, shared_data, small_tokenizer):
    mixture = build(data_dir=shared_data)
    names = {type(t).__name__ for t in mixture.tasks}
    assert {"ChatJSONL", "SpellingBee", "SimpleSpelling"} <= names
    assert not names & {"ARC", "MMLU", "HumanEval", "SmolTalk"}  # not available offline, or evaluated
    if build in (mid_train_mixture, sft_mixture):
        assert {"GSM8K", "Identity"} <= names
        assert all(getattr(t, "split", "train") == "train" for t in mixture.tasks)
    else:
        assert "GSM8K" not in names and all(t.split in ("val", "test") for t in mixture.tasks)
    for task in mixture.tasks:  # a few of every task
        for i in range(min(len(task), 10)):
            check_rendering(small_tokenizer, task[i])
    for i in random.Random(0).sample(range(len(mixture)), 200):
        check_rendering(small_tokenizer, mixture[i])


def test_mixture_sizes_offline(shared_data):
    mid = mid_train_mixture(data_dir=shared_data, simple_spelling_size=10, spelling_bee_size=20, identity_size=30)
    chat_train = len(ChatJSONL(split="train", data_dir=shared_data))
    assert len(mid) == chat_train + 7473 + 2 * 30 + 10 + 20
    sft = sft_mixture(data_dir=shared_data, simple_spelling_size=10, spelling_bee_size=20, identity_size=30)
    assert len(sft) == chat_train + 7473 + 30 + 10 + 20
