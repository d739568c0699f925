"""CORE and base_eval on the real eval bundle and shards: tiny models, no mocks."""

from __future__ import annotations

import csv
import http.server
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from nanochat import base_eval, bench
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.core_eval import (
    EvalBundleError,
    EvalDataUnavailable,
    centered_accuracy,
    crop_left,
    evaluate_core,
    evaluate_example,
    evaluate_task,
    example_batch,
    find_eval_bundle,
    load_task_data,
    sample_fewshot,
)
from nanochat.dataloader import DistributedTokenLoader
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import compute_token_bytes

MISSING = ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]  # core.yaml order; their files are not shipped
RESULT_KEYS = {"source", "model_tag", "step", "core", "core_label", "core_tasks_covered", "core_tasks_total",
               "core_tasks", "core_missing", "core_skipped", "core_examples_per_sec", "core_dtype", "train_bpb",
               "val_bpb", "bpb_skipped", "samples", "eval_time_s"}


def tiny_model(seq_len: int = 128, lm_head_std: float = 0.0, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()  # lm_head starts at zero: every token equally likely
    if lm_head_std:
        torch.nn.init.normal_(model.lm_head.weight, std=lm_head_std)  # so choices don't all tie
    return model


def train_on(model: GPT, tokenizer, texts: list[str], steps: int = 40, lr: float = 1e-2) -> float:
    """A few dozen Adam steps on BOS + each text: the model comes to prefer exactly these continuations."""
    bos = tokenizer.get_bos_token_id()
    rows = tokenizer.encode(texts, prepend=bos)
    width = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), width), bos, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
        y[i, : len(r) - 1] = torch.tensor(r[1:])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def rows_of(bundle: Path, uri: str) -> list[dict]:
    with open(bundle / "eval_data" / uri, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/eval_bundle.zip"  # nothing listens there any more: connection refused


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: 2 torch threads collapse when anything else runs (5-30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle(shared_data) -> Path:
    return shared_data / "eval_bundle"


@pytest.fixture(scope="module")
def checkpoint_base(tmp_path_factory, tokenizer_base_dir) -> Path:
    """A NANOCHAT_BASE_DIR with the small tokenizer and a randomly initialised base checkpoint d1, step 0."""
    base = tmp_path_factory.mktemp("evalbase")
    shutil.copytree(tokenizer_base_dir / "tokenizer", base / "tokenizer")
    model = tiny_model(lm_head_std=0.1)
    save_checkpoint(base / "base_checkpoints" / "d1", 0, model.state_dict(), None,
                    {"step": 0, "model_config": model.config.to_dict()})
    return base


@pytest.fixture
def eval_env(monkeypatch, checkpoint_base, shared_data):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(checkpoint_base))
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(shared_data / "pretrain"))
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE_URL", raising=False)
    return checkpoint_base


@pytest.fixture(scope="module")
def core_result(bundle, small_tokenizer) -> dict:
    """One CORE pass of a random tiny model over every available task, 6 examples each."""
    return evaluate_core(tiny_model(lm_head_std=0.1), small_tokenizer, "cpu", bundle, max_per_task=6)


# -----------------------------------------------------------------------------
# Each ICL task type, on a real row, with a model trained to prefer one answer


def test_multiple_choice_picks_the_choice_the_model_was_trained_on(bundle, small_tokenizer):
    row = rows_of(bundle, "commonsense_reasoning/copa.jsonl")[0]
    assert row["choices"] == ["the toilet filled with water.", "water flowed from the spout."]
    # Hand-checked spans: the scored continuation of each prompt is exactly " " + its choice.
    rows, spans = example_batch(small_tokenizer, row, "multiple_choice", " ", [], 128)
    assert [small_tokenizer.decode(r[s:e]) for r, (s, e) in zip(rows, spans)] == [" " + c for c in row["choices"]]
    for preferred in (0, 1):
        model = tiny_model(seed=preferred)
        assert train_on(model, small_tokenizer, [f"{row['query']} {row['choices'][preferred]}"]) < 0.5
        assert evaluate_task(model, small_tokenizer, [{**row, "gold": preferred}], "multiple_choice") == (1, 1)
        assert evaluate_task(model, small_tokenizer, [{**row, "gold": 1 - preferred}], "multiple_choice") == (0, 1)


def test_schema_picks_the_context_the_model_was_trained_on(bundle, small_tokenizer):
    feared, advocated = rows_of(bundle, "language_understanding/winograd_wsc.jsonl")[:2]
    councilmen, demonstrators = feared["context_options"]
    assert advocated["context_options"] == feared["context_options"]
    assert (feared["continuation"], feared["gold"], advocated["continuation"], advocated["gold"]) == \
        ("feared violence.", 0, "advocated violence.", 1)
    rows, spans = example_batch(small_tokenizer, feared, "schema", " ", [], 128)
    assert [small_tokenizer.decode(r[s:e]) for r, (s, e) in zip(rows, spans)] == [" feared violence."] * 2

    truth = tiny_model()
    train_on(truth, small_tokenizer, [f"{councilmen} feared violence.", f"{demonstrators} advocated violence."])
    assert evaluate_task(truth, small_tokenizer, [feared, advocated], "schema") == (2, 2)
    flipped = [{**r, "gold": 1 - r["gold"]} for r in (feared, advocated)]
    assert evaluate_task(truth, small_tokenizer, flipped, "schema") == (0, 2)

    swapped = tiny_model(seed=1)
    train_on(swapped, small_tokenizer, [f"{councilmen} advocated violence.", f"{demonstrators} feared violence."])
    assert evaluate_task(swapped, small_tokenizer, [feared, advocated], "schema") == (0, 2)
    assert evaluate_task(swapped, small_tokenizer, flipped, "schema") == (2, 2)


def test_language_modeling_needs_every_continuation_token_greedily(bundle, small_tokenizer):
    # The shortest of the first 100 LAMBADA passages, so the trained prompt fits the tiny model's window.
    row = min(rows_of(bundle, "language_understanding/lambada_openai.jsonl")[:100], key=lambda r: len(r["context"]))
    rows, spans = example_batch(small_tokenizer, row, "language_modeling", " ", [], 128)
    (s, e), = spans
    assert len(rows) == 1 and small_tokenizer.decode(rows[0][s:e]) == " " + row["continuation"]
    assert small_tokenizer.decode(rows[0][1:s]) == row["context"].strip()

    model = tiny_model()
    train_on(model, small_tokenizer, [f"{row['context'].strip()} {row['continuation']}"], steps=60)
    assert evaluate_task(model, small_tokenizer, [row], "language_modeling") == (1, 1)
    other = {**row, "continuation": "umbrellas"}
    assert evaluate_task(model, small_tokenizer, [other], "language_modeling") == (0, 1)

    model = tiny_model(seed=1)
    train_on(model, small_tokenizer, [f"{row['context'].strip()} umbrellas"], steps=60)
    assert evaluate_task(model, small_tokenizer, [other], "language_modeling") == (1, 1)
    assert evaluate_task(model, small_tokenizer, [row], "language_modeling") == (0, 1)


# -----------------------------------------------------------------------------
# Scoring, coverage, few-shot sampling, cropping


def test_centered_accuracy_and_core_match_a_hand_computation(core_result, bundle):
    with open(bundle / "eval_meta_data.csv", newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    assert centered_accuracy(0.25, 25) == 0.0 and centered_accuracy(1.0, 40.3) == 1.0
    assert centered_accuracy(0.75, 50) == pytest.approx(0.5)
    centred = []
    for label, t in core_result["tasks"].items():
        assert t["examples"] == 6 and t["random_baseline"] == baselines[label]
        correct = round(t["accuracy"] * 6)
        assert t["accuracy"] == correct / 6
        rb = baselines[label] / 100
        assert t["centered"] == pytest.approx((correct / 6 - rb) / (1 - rb), abs=1e-12)
        centred.append((correct / 6 - rb) / (1 - rb))
    assert core_result["core"] == pytest.approx(sum(centred) / len(centred), abs=1e-12)
    assert core_result["examples"] == 18 * 6 and core_result["examples_per_sec"] > 0
    json.dumps(core_result)  # plain JSON-able
    # A random model is not good at everything: some tasks fall below chance, some above.
    assert min(t["centered"] for t in core_result["tasks"].values()) < 0


def test_missing_tasks_are_reported_and_the_label_says_the_coverage(core_result, bundle, small_tokenizer):
    assert core_result["core_label"] == "CORE[18/22]"
    assert (core_result["tasks_covered"], core_result["tasks_total"]) == (18, 22)
    assert core_result["missing"] == MISSING
    available = [t["label"] for t in yaml.safe_load((bundle / "core_available.yaml").read_text())["icl_tasks"]]
    assert list(core_result["tasks"]) == available
    assert {t["task_type"] for t in core_result["tasks"].values()} == {"multiple_choice", "schema",
                                                                        "language_modeling"}

    # A label filter evaluates only those tasks, and the label still says it is not a full CORE.
    part = evaluate_core(tiny_model(), small_tokenizer, "cpu", bundle, max_per_task=2, tasks=["copa", "squad"])
    assert (part["core_label"], part["missing"], list(part["tasks"])) == ("CORE[1/22]", ["squad"], ["copa"])
    with pytest.raises(ValueError, match="'copper'"):
        evaluate_core(tiny_model(), small_tokenizer, "cpu", bundle, tasks=["copper"])


def test_fewshot_sampling_is_deterministic_and_never_includes_the_item():
    for idx in range(40):
        picks = sample_fewshot(40, idx, 10)
        assert picks == sample_fewshot(40, idx, 10)
        assert idx not in picks and len(set(picks)) == 10 and all(0 <= i < 40 for i in picks)
        # The same draw as nanochat's rng.sample over the list of the other indices.
        assert picks == random.Random(1234 + idx).sample([i for i in range(40) if i != idx], 10)
    assert sample_fewshot(40, 3, 10) != sample_fewshot(40, 4, 10)
    assert sorted(sample_fewshot(4, 2, 10)) == [0, 1, 3]  # fewer others than shots: all of them
    assert sample_fewshot(1, 0, 10) == [] and sample_fewshot(40, 5, 0) == []


def test_cropping_from_the_left_keeps_the_continuation(bundle, small_tokenizer):
    data = rows_of(bundle, "world_knowledge/arc_easy.jsonl")[:11]
    item, fewshot = data[0], data[1:]  # 10-shot, as CORE runs arc_easy: ~1000 tokens per prompt
    full_rows, full_spans = example_batch(small_tokenizer, item, "multiple_choice", "\nAnswer: ", fewshot, 10**6)
    rows, spans = example_batch(small_tokenizer, item, "multiple_choice", "\nAnswer: ", fewshot, 64)
    assert min(len(r) for r in full_rows) > 64
    for full, (fs, fe), row, (s, e) in zip(full_rows, full_spans, rows, spans):
        assert len(row) == 64 and row == full[-64:]
        assert row[s:e] == full[fs:fe] and e == len(row)
    assert {small_tokenizer.decode(r[s:e]).strip() for r, (s, e) in zip(rows, spans)} == set(item["choices"])
    # The model with a 64-token window scores the cropped prompts.
    assert evaluate_example(tiny_model(seq_len=64, lm_head_std=0.1), small_tokenizer, item, "multiple_choice",
                            "\nAnswer: ", fewshot) in (True, False)
    # A continuation longer than the window keeps what fits; a position before it always remains.
    (row,), (span,) = crop_left([list(range(100))], [(40, 100)], 50)
    assert row == list(range(50, 100)) and span == (1, 50)


def test_uniform_model_bpb_is_log2_vocab_per_token_over_bytes(shared_data, small_tokenizer):
    model = tiny_model()  # zero lm_head: all logits equal, every token costs ln(V) nats
    vocab, bos = small_tokenizer.get_vocab_size(), small_tokenizer.get_bos_token_id()
    loader = DistributedTokenLoader(small_tokenizer, 4, 64, "val", data_dir=shared_data / "pretrain")
    batches = [next(loader) for _ in range(3)]
    # One more batch with ignored (-1) and BOS targets: neither may count as tokens or bytes.
    x, y = next(loader)
    y = y.clone()
    y[0, :] = -1
    y[1, :5] = bos
    batches.append((x, y))
    token_bytes = compute_token_bytes(small_tokenizer)
    tokens = nbytes = 0
    for _, y in batches:
        for target in y.flatten().tolist():
            if target >= 0 and token_bytes[target] > 0:
                tokens += 1
                nbytes += int(token_bytes[target])
    assert tokens == 4 * 4 * 64 - 64 - 5
    bpb = evaluate_bpb(model, batches, 4, token_bytes)
    assert bpb == pytest.approx(math.log2(vocab) * tokens / nbytes, rel=1e-6)


# -----------------------------------------------------------------------------
# Bundle files: clear errors, download, unavailable


def test_malformed_bundle_files_are_named_in_the_error(tmp_path, bundle):
    bad = tmp_path / "bundle"
    bad.mkdir()
    (bad / "core.yaml").write_text("icl_tasks:\n  - label: copa\n    dataset_uri: [unclosed\n")
    with pytest.raises(EvalBundleError, match=r"core\.yaml is not valid YAML"):
        evaluate_core(tiny_model(), None, "cpu", bad)

    good = rows_of(bundle, "commonsense_reasoning/copa.jsonl")[0]
    jsonl = tmp_path / "copa.jsonl"
    jsonl.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(EvalBundleError, match=r"copa\.jsonl line 2: not valid JSON"):
        load_task_data(jsonl, "multiple_choice")
    jsonl.write_text(json.dumps(good) + "\n" + json.dumps({**good, "gold": 2}) + "\n")
    with pytest.raises(EvalBundleError, match=r"copa\.jsonl line 2: 'gold' is 2, not an index into the 2 choices"):
        load_task_data(jsonl, "multiple_choice")
    with pytest.raises(EvalBundleError, match=r"line 1: 'context' is missing"):
        load_task_data(jsonl, "language_modeling")

    (bad / "core.yaml").write_text("icl_tasks:\n  - label: copa\n    dataset_uri: copa.jsonl\n"
                                   "    icl_task_type: multiple_choice\n")
    (bad / "eval_meta_data.csv").write_text("Eval Task,Baseline\ncopa,50\n")
    with pytest.raises(EvalBundleError, match=r"eval_meta_data\.csv needs the columns 'Eval Task' and 'Random"):
        evaluate_core(tiny_model(), None, "cpu", bad)


def test_bundle_is_downloaded_and_unzipped_into_the_base_dir(tmp_path, monkeypatch, bundle, small_tokenizer):
    # A one-task bundle (copa) served over HTTP on loopback, zipped like eval_bundle.zip (top folder eval_bundle/).
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as z:
        z.writestr("eval_bundle/core.yaml", "icl_tasks:\n- label: copa\n  dataset_uri: cr/copa.jsonl\n"
                                            "  num_fewshot: [0]\n  icl_task_type: multiple_choice\n")
        z.write(bundle / "eval_meta_data.csv", "eval_bundle/eval_meta_data.csv")
        z.write(bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl", "eval_bundle/eval_data/cr/copa.jsonl")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base, empty = tmp_path / "base", tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(empty))
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip")
    try:
        found = find_eval_bundle()
    finally:
        server.shutdown()
        server.server_close()
    assert found == base / "eval_bundle" and (found / "eval_data" / "cr" / "copa.jsonl").is_file()
    assert sorted(p.name for p in base.iterdir()) == ["eval_bundle"]  # the temporary download is gone
    assert find_eval_bundle() == found  # found locally from now on (the server is down)
    result = evaluate_core(tiny_model(lm_head_std=0.1), small_tokenizer, "cpu", max_per_task=4)
    assert result["core_label"] == "CORE" and result["tasks_covered"] == result["tasks_total"] == 1


def test_unavailable_bundle_raises_clearly_and_base_eval_skips_core(tmp_path, monkeypatch, eval_env,
                                                                    small_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    url = closed_port_url()
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(empty))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url)
    with pytest.raises(EvalDataUnavailable) as info:
        evaluate_core(tiny_model(), small_tokenizer, "cpu")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for expected in ("NANOCHAT_SHARED_DATA", str(empty / "eval_bundle"), str(eval_env / "eval_bundle"), url,
                     "NANOCHAT_EVAL_BUNDLE", "internet"):
        assert expected in message, (expected, message)
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(empty))  # named explicitly: no fallback to anything else
    with pytest.raises(EvalDataUnavailable, match=r"\$NANOCHAT_EVAL_BUNDLE = .* is not an eval bundle"):
        find_eval_bundle()
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE")

    result = base_eval.main(["--device-type=cpu", f"--data-dir={empty}"])
    assert result["core_skipped"] == message and result["core"] is None and result["core_label"] is None
    assert "at least 2 shards" in result["bpb_skipped"] and result["val_bpb"] is None
    assert len(result["samples"]) == 5
    assert not (eval_env / "eval_bundle").exists() and not list(eval_env.glob(".eval_bundle*"))


# -----------------------------------------------------------------------------
# base_eval end to end, bench, and 2 processes


def test_base_eval_end_to_end(tmp_path, eval_env, capsys):
    out = tmp_path / "results.json"
    result = base_eval.main(["--device-type=cpu", "--max-per-task=3", "--split-tokens=1024",
                             "--device-batch-size=4", f"--output={out}"])
    assert set(result) == RESULT_KEYS
    assert (result["source"], result["model_tag"], result["step"]) == ("base", "d1", 0)
    assert result["core_label"] == "CORE[18/22]" and result["core_missing"] == MISSING
    assert (result["core_tasks_covered"], result["core_tasks_total"]) == (18, 22)
    assert result["core_skipped"] is None and result["bpb_skipped"] is None
    assert all(t["examples"] == 3 for t in result["core_tasks"].values())
    assert 1 < result["train_bpb"] < 20 and 1 < result["val_bpb"] < 20
    assert len(result["samples"]) == 5 and all(isinstance(s, str) for s in result["samples"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "CORE[18/22]: " in printed and "missing (no data file): squad" in printed and "val bpb" in printed


@pytest.mark.slow
def test_base_eval_reports_its_result_through_dagster_pipes(tmp_path, eval_env, shared_data):
    import dagster as dg

    empty = tmp_path / "no_shards"
    empty.mkdir()
    command = [sys.executable, "-m", "nanochat.base_eval", "--device-type=cpu", "--core-tasks=copa,winograd",
               "--max-per-task=2", f"--data-dir={empty}"]
    env = {"NANOCHAT_BASE_DIR": str(eval_env), "NANOCHAT_SHARED_DATA": str(shared_data), "OMP_NUM_THREADS": "1"}

    @dg.asset(required_resource_keys={"pipes"})  # not a typed parameter: the annotation would be a string here
    def base_eval_asset(context):
        return context.resources.pipes.run(command=command, context=context, env=env).get_materialize_result()

    result = dg.materialize([base_eval_asset], resources={"pipes": dg.PipesSubprocessClient()})
    assert result.success
    (materialization,) = result.asset_materializations_for_node("base_eval_asset")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    # Every non-None key comes through, the per-task table as JSON; None values (core_skipped, bpb) are dropped.
    assert set(metadata) == RESULT_KEYS - {"core_skipped", "train_bpb", "val_bpb"}
    assert metadata["core_label"] == "CORE[2/22]" and metadata["core_missing"] == []
    assert sorted(metadata["core_tasks"]) == ["copa", "winograd"]
    assert metadata["core_tasks"]["copa"]["examples"] == 2 and len(metadata["samples"]) == 5
    assert "at least 2 shards" in metadata["bpb_skipped"]


def test_bench_core_prints_examples_per_second(eval_env, bundle, capsys):
    (result,) = bench.main(["core", f"--checkpoint-dir={eval_env / 'base_checkpoints' / 'd1'}",
                            "--max-per-task=2", "--tasks=copa,winograd,lambada_openai", "--device-type=cpu",
                            f"--bundle-dir={bundle}", "--baseline"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))
    assert printed["bench"] == "core" and printed["device"] == "cpu" and printed["threads"] >= 1
    assert printed["core_label"] == "CORE[3/22]" and printed["examples"] == 6 and printed["examples_per_sec"] > 0
    assert {k: v["examples"] for k, v in printed["by_task_type"].items()} == \
        {"multiple_choice": 2, "schema": 2, "language_modeling": 2}
    assert printed["dtype"] == "float32"  # evals' CPU default (common.eval_dtype), not training's
    # --baseline: the original's per-example loop on the same examples, its speed next to ours, the same scores
    vs = printed["vs_original"]
    assert {k: v["examples"] for k, v in vs.items()} == {"multiple_choice": 2, "schema": 2, "language_modeling": 2}
    assert all(v["ours_examples_per_sec"] > 0 and v["original_examples_per_sec"] > 0 and v["ratio"] > 0
               and isinstance(v["identical"], bool) and v["same_answers"] is True for v in vs.values())
    assert all(0 <= v["max_rel_diff"] <= 1e-5 for v in vs.values())


@pytest.mark.slow
def test_two_processes_give_the_same_core_as_one(tmp_path, eval_env):
    empty = tmp_path / "no_shards"
    empty.mkdir()
    args = ["--device-type=cpu", "--max-per-task=5", f"--data-dir={empty}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nanochat.base_eval", *args, f"--output={tmp_path / 'ddp.json'}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = base_eval.main(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["core_label"] == single["core_label"] == "CORE[18/22]"
    assert ddp["core"] == single["core"]
    assert {k: v["accuracy"] for k, v in ddp["core_tasks"].items()} == \
        {k: v["accuracy"] for k, v in single["core_tasks"].items()}
    assert all(t["examples"] == 5 for t in ddp["core_tasks"].values())
    assert out.count("CORE[18/22]: ") == 1  # only rank 0 prints


def test_core_reports_the_dtype_it_ran_in(core_result):
    assert core_result["dtype"] == "float32"  # CPU evals run in fp32 unless asked (see common.eval_dtype)
