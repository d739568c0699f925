"""Chat evals on the real offline data: task scoring, categorical logits, ChatCORE and the entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanochat import chat_eval
from nanochat.chat_eval import CHAT_TASKS, chatcore, predict_letters, run_chat_eval
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks import GSM8K, MMLU, HumanEval

RESULT_KEYS = {"source", "model_tag", "step", "chatcore", "chatcore_label", "chatcore_nosb", "chatcore_nosb_label",
               "chatcore_tasks_covered",
               "chatcore_tasks_total", "chat_tasks", "chat_missing", "examples_per_sec", "dtype", "samples",
               "eval_time_s"}


def random_model(vocab_size: int, seed: int = 0, n_layer: int = 1, n_embd: int = 32) -> GPT:
    """A tiny GPT with every weight random (init_weights zeroes the output projections and lm_head)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_kv_head=2,
                          n_embd=n_embd))
    model.init_weights()
    for name, p in model.named_parameters():
        if "c_proj" in name or "lm_head" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def assistant_text(tokenizer, conversation) -> str:
    """The reference reply as the Engine would hand it to evaluate(): its tokens decoded, tool-call and tool-output
    markers included (everything between <|assistant_start|> and <|assistant_end|>)."""
    ids, _ = tokenizer.render_conversation(conversation, max_tokens=10**6)
    start = len(ids) - 1 - ids[::-1].index(tokenizer.encode_special("<|assistant_start|>"))
    assert ids[-1] == tokenizer.encode_special("<|assistant_end|>")
    return tokenizer.decode(ids[start + 1 : -1])


# -----------------------------------------------------------------------------
# Generative tasks: the reference answer scores 1, a wrong one 0


def test_gsm8k_reference_answers_score_one_and_changed_numbers_zero(shared_data, small_tokenizer):
    task = GSM8K(split="test", data_dir=shared_data)
    rows = {}
    for line in open(shared_data / "gsm8k/test.jsonl", encoding="utf-8"):
        row = json.loads(line)
        rows[row["question"]] = row["answer"]
    for i in range(0, len(task), 5):  # every 5th of the 1,319 problems
        conversation = task[i]
        answer = rows[conversation["messages"][0]["content"]]  # the raw reference text, <<calc>> annotations and all
        final = answer.rsplit("#### ", 1)[1].strip()
        assert task.evaluate(conversation, answer) == 1
        assert task.evaluate(conversation, f"So the answer is:\n#### {final}.") == 1
        changed = float(final.replace(",", "")) + 1
        assert task.evaluate(conversation, answer.rsplit("#### ", 1)[0] + f"#### {changed:g}") == 0
        assert task.evaluate(conversation, answer.replace("####", "answer:")) == 0  # no final "####" line
        if i % 25 == 0:
            # Calculator style: what the model emits, with <|python_start|>expr<|python_end|> and the forced
            # <|output_start|>result<|output_end|>, decoded as the evaluator sees it.
            reply = assistant_text(small_tokenizer, conversation)
            assert "<|python_start|>" in reply or "<<" not in answer
            assert task.evaluate(conversation, reply) == 1
            assert task.evaluate(conversation, reply.rsplit("#### ", 1)[0] + f"#### {changed:g}") == 0


def test_spellingbee_reference_scores_one_and_wrong_count_zero(shared_data, small_tokenizer):
    task = CHAT_TASKS["SpellingBee"][0](shared_data)
    assert len(task) == 256 and task.split == "test"
    for i in range(0, 256, 4):
        conversation = task[i]
        count = conversation["word"].count(conversation["letter"])  # counted here, not by the task
        reply = assistant_text(small_tokenizer, conversation)
        assert reply.endswith(f"#### {count}") and "<|python_start|>" in reply
        assert task.evaluate(conversation, reply) == 1
        assert task.evaluate(conversation, reply.removesuffix(f"#### {count}") + f"#### {count + 1}") == 0
        assert task.evaluate(conversation, f"I think it is {count}.") == 0  # no "#### n": not graded as correct


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_return_none_fails(shared_data):
    task = HumanEval(data_dir=shared_data)
    assert len(task) == 164

    def check(i: int) -> tuple[int, int]:
        conversation = task[i]
        canonical = conversation["messages"][1]["content"]  # prompt + canonical_solution, as the task builds it
        assert conversation["messages"][0]["content"].endswith("\n")
        return task.evaluate(conversation, canonical), task.evaluate(conversation, "    return None\n")

    # Each evaluation is a fresh sandboxed interpreter (~80 ms); two threads keep both cores busy.
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(check, range(len(task))))
    assert [i for i, (good, _) in enumerate(outcomes) if good != 1] == []
    assert [i for i, (_, bad) in enumerate(outcomes) if bad != 0] == []


# -----------------------------------------------------------------------------
# Categorical tasks: logits at the last real position, restricted to the letters


def test_categorical_scores_the_fraction_of_answers_with_the_favoured_letter(shared_data, small_tokenizer):
    """
    With zeroed output projections (init_weights) every block adds nothing, so the logits at a position depend
    only on the token there. lm_head is then set so that after <|assistant_start|> (the real last position of
    every prompt) "B" wins, after BOS (the padding) "A" wins and after <|user_end|> "C" wins: reading the wrong
    position would show up as a different score.
    """
    tok = small_tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=512, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                          n_embd=64))
    model.init_weights()
    model.eval()
    special = tok.encode_special
    favourite = {"B": special("<|assistant_start|>"), "A": tok.get_bos_token_id(), "C": special("<|user_end|>")}
    with torch.no_grad():
        embeddings = torch.nn.functional.rms_norm(model.transformer.wte.weight, (64,))
        for letter, token in favourite.items():
            (letter_id,) = tok.encode(letter)
            model.lm_head.weight[letter_id] = embeddings[token] / 8.0
        letter_ids = [tok.encode(letter)[0] for letter in "ABCDE"]
        for letter, token in favourite.items():  # the construction does what it says
            logits = model(torch.tensor([[token]]))[0, -1, letter_ids]
            assert "ABCDE"[int(logits.argmax())] == letter

    # Independently of the task code: the share of "B" answers in the raw file (labels are already letters).
    rows = [json.loads(line) for line in open(shared_data / "arc/ARC-Challenge-Test.jsonl", encoding="utf-8")]
    expected = sum(row["answerKey"] == "B" for row in rows) / len(rows)
    result = run_chat_eval(model, tok, "cpu", ["ARC-Challenge"], batch_size=32, data_dir=shared_data)
    assert result["tasks"]["ARC-Challenge"]["examples"] == len(rows) == 1172
    assert result["tasks"]["ARC-Challenge"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert 0.2 < expected < 0.35  # a real spread of answers, so "always B" is not trivially 0 or 1


def test_batched_predictions_match_one_at_a_time(shared_data, small_tokenizer):
    model = random_model(small_tokenizer.get_vocab_size(), seed=1, n_layer=2)
    conversations = [CHAT_TASKS["ARC-Easy"][0](shared_data)[i] for i in range(12)]
    mmlu = MMLU(data_dir=shared_data)
    conversations += [mmlu[i] for i in range(12)]
    one_by_one = predict_letters(model, small_tokenizer, conversations, batch_size=1)
    assert predict_letters(model, small_tokenizer, conversations, batch_size=7) == one_by_one
    assert len(set(one_by_one)) > 1  # a random model does not answer one letter to everything
    assert all(answer in c["letters"] for answer, c in zip(one_by_one, conversations))


# -----------------------------------------------------------------------------
# ChatCORE and coverage


def test_chatcore_by_hand():
    out = chatcore({"ARC-Easy": 0.5, "GSM8K": 0.1}, list(CHAT_TASKS))
    assert out["centered"] == pytest.approx({"ARC-Easy": 1 / 3, "GSM8K": 0.1})
    assert out["chatcore"] == pytest.approx((1 / 3 + 0.1) / 2)
    assert out["chatcore_label"] == "ChatCORE[2/6]" and (out["tasks_covered"], out["tasks_total"]) == (2, 6)

    full = {"ARC-Easy": 0.25, "ARC-Challenge": 1.0, "MMLU": 0.0, "GSM8K": 0.5, "HumanEval": 0.2, "SpellingBee": 0.9}
    out = chatcore(full, list(CHAT_TASKS))
    assert out["chatcore"] == pytest.approx((0.0 + 1.0 - 1 / 3 + 0.5 + 0.2 + 0.9) / 6)
    assert out["chatcore_label"] == "ChatCORE"
    # Without SpellingBee (ours is synthetic): the mean of the five real tasks, labelled as such.
    assert out["chatcore_nosb"] == pytest.approx((0.0 + 1.0 - 1 / 3 + 0.5 + 0.2) / 5)
    assert out["chatcore_nosb_label"] == "ChatCORE-noSB"
    partial = chatcore({"GSM8K": 0.5, "SpellingBee": 0.9}, list(CHAT_TASKS))
    assert partial["chatcore_nosb"] == pytest.approx(0.5) and partial["chatcore_nosb_label"] == "ChatCORE-noSB[1/5]"
    assert chatcore({"SpellingBee": 0.9}, list(CHAT_TASKS))["chatcore_nosb"] is None
    # Only the requested tasks count, and a restricted request is labelled as partial.
    out = chatcore(full, ["GSM8K"])
    assert out["chatcore"] == pytest.approx(0.5) and out["chatcore_label"] == "ChatCORE[1/6]"
    assert chatcore({}, ["MMLU"])["chatcore"] is None
    with pytest.raises(ValueError, match="unknown chat task.*'arc-easy'.*choose from"):
        chatcore({}, ["arc-easy"])


def test_missing_task_is_reported_and_chatcore_is_labelled_partial(shared_data, small_tokenizer, tmp_path):
    for folder in shared_data.iterdir():  # everything but HumanEval
        if folder.name != "humaneval":
            (tmp_path / folder.name).symlink_to(folder)
    model = random_model(small_tokenizer.get_vocab_size())
    result = run_chat_eval(model, small_tokenizer, "cpu", list(CHAT_TASKS), max_per_task=2, max_new_tokens=4,
                           data_dir=tmp_path)
    assert list(result["missing"]) == ["HumanEval"]
    assert "HumanEval is unavailable" in result["missing"]["HumanEval"]
    assert "humaneval/HumanEval.jsonl" in result["missing"]["HumanEval"]
    assert set(result["tasks"]) == set(CHAT_TASKS) - {"HumanEval"}
    assert result["chatcore_label"] == "ChatCORE[5/6]"
    assert (result["tasks_covered"], result["tasks_total"]) == (5, 6)
    centered = [r["centered"] for r in result["tasks"].values()]
    assert result["chatcore"] == pytest.approx(sum(centered) / 5)
    for name, r in result["tasks"].items():
        baseline = CHAT_TASKS[name][1]
        assert r["examples"] == 2 and r["random_baseline"] == baseline and "pass_at_k" not in r
        assert r["centered"] == pytest.approx((r["accuracy"] - baseline) / (1 - baseline))


# -----------------------------------------------------------------------------
# Sampling settings


def test_num_samples_without_temperature_is_a_clear_error(small_tokenizer, tmp_path, monkeypatch):
    model = random_model(small_tokenizer.get_vocab_size())
    with pytest.raises(ValueError, match=r"num_samples=4 with temperature=0.0 .*temperature > 0"):
        run_chat_eval(model, small_tokenizer, "cpu", ["GSM8K"], num_samples=4, temperature=0.0)
    # The entry point refuses before it looks for a checkpoint.
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="identical greedy replies"):
        chat_eval.main(["-i", "sft", "--num-samples=2", "--device-type=cpu"])
    with pytest.raises(ValueError, match="unknown chat task"):
        run_chat_eval(model, small_tokenizer, "cpu", ["HellaSwag"])


def test_num_samples_reports_pass_at_k(shared_data, small_tokenizer):
    model = random_model(small_tokenizer.get_vocab_size())
    result = run_chat_eval(model, small_tokenizer, "cpu", ["SpellingBee", "ARC-Easy"], max_per_task=2,
                           num_samples=3, temperature=1.0, max_new_tokens=4, data_dir=shared_data)
    bee = result["tasks"]["SpellingBee"]
    assert bee["examples"] == 2 and 0.0 <= bee["accuracy"] <= bee["pass_at_k"] <= 1.0
    assert "pass_at_k" not in result["tasks"]["ARC-Easy"]  # categorical answers are not sampled
    assert result["chatcore_label"] == "ChatCORE[2/6]"


# -----------------------------------------------------------------------------
# Entry point, end to end


@pytest.fixture(scope="module")
def sft_base_dir(tmp_path_factory, small_tokenizer, tokenizer_base_dir):
    """A NANOCHAT_BASE_DIR with the small tokenizer and a random-init SFT checkpoint chatsft_checkpoints/d1 step 7."""
    base = tmp_path_factory.mktemp("chat_eval_base")
    shutil.copytree(tokenizer_base_dir / "tokenizer", base / "tokenizer")
    model = random_model(small_tokenizer.get_vocab_size())
    save_checkpoint(base / "chatsft_checkpoints" / "d1", 7, model.state_dict(), None,
                    {"step": 7, "model_config": model.config.to_dict()})
    return base


def test_entry_point_on_a_tiny_sft_checkpoint(shared_data, sft_base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(sft_base_dir))
    output = tmp_path / "results.json"
    t0 = time.time()
    summary = chat_eval.main(["-i", "sft", "--max-per-task=4", "--max-new-tokens=16", "--device-type=cpu",
                              f"--data-dir={shared_data}", f"--output={output}"])
    elapsed = time.time() - t0

    assert set(summary) == RESULT_KEYS
    assert (summary["source"], summary["model_tag"], summary["step"]) == ("sft", "d1", 7)
    assert summary["dtype"] == "float32"  # CPU evals run in fp32 unless --dtype says otherwise (common.eval_dtype)
    assert summary["chat_missing"] == {}
    assert summary["chatcore_label"] == "ChatCORE"
    assert (summary["chatcore_tasks_covered"], summary["chatcore_tasks_total"]) == (6, 6)
    assert list(summary["chat_tasks"]) == list(CHAT_TASKS)
    for r in summary["chat_tasks"].values():
        assert r["examples"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] >= 0
    assert isinstance(summary["chatcore"], float) and summary["examples_per_sec"] > 0
    assert len(summary["samples"]) == 3
    assert all(len(pair) == 2 and all(isinstance(s, str) and len(s) <= 300 for s in pair)
               for pair in summary["samples"])
    assert json.loads(output.read_text()) == summary
    assert elapsed < 60, f"tiny end-to-end eval took {elapsed:.1f}s"


def test_missing_checkpoint_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no mid checkpoint to evaluate.*nanochat.mid_train"):
        chat_eval.main(["-i", "mid", "--device-type=cpu"])


@pytest.mark.slow
def test_two_processes_give_the_same_scores_as_one(shared_data, sft_base_dir, tmp_path, monkeypatch):
    """Under torchrun each rank takes every other example; the summed counts equal a one-process run."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(sft_base_dir))
    args = ["-i", "sft", "-a", "ARC-Easy|GSM8K|SpellingBee", "--max-per-task=5", "--max-new-tokens=8",
            "--device-type=cpu", f"--data-dir={shared_data}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nanochat.chat_eval", *args, f"--output={tmp_path / 'ddp.json'}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = chat_eval.main(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["chatcore_label"] == single["chatcore_label"] == "ChatCORE[3/6]"
    assert ddp["chatcore"] == pytest.approx(single["chatcore"])
    for name, r in single["chat_tasks"].items():
        assert ddp["chat_tasks"][name]["examples"] == r["examples"] == 5
        assert ddp["chat_tasks"][name]["accuracy"] == pytest.approx(r["accuracy"])
    assert out.count("ChatCORE[3/6]: ") == 1  # only rank 0 prints the table
