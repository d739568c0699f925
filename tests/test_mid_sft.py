"""Mid-training and SFT on local data: loadable checkpoints, assistant-only SFT loss, resumable loaders."""

from __future__ import annotations

import shutil

import pytest
import torch

from nanochat import base_train, chat_sft, mid_train
from nanochat.checkpoint_manager import load_model
from nanochat.dataloader import ConversationTokenLoader, SFTBatchLoader
from nanochat.engine import Engine
from nanochat.tasks import mid_train_mixture, sft_mixture

TINY_BASE = ["--depth=2", "--head-dim=64", "--max-seq-len=64", "--device-batch-size=8", "--total-batch-size=1024",
             "--eval-tokens=2048", "--eval-every=-1", "--sample-every=-1", "--device-type=cpu", "--num-iterations=20"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tokenizer_base_dir, shared_data):
    base = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(tokenizer_base_dir / "tokenizer", base / "tokenizer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        mp.setenv("NANOCHAT_DATA_DIR", str(shared_data / "pretrain"))
        mp.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
        base_train.main(TINY_BASE)
        mid = mid_train.main(["--device-batch-size=8", "--total-batch-size=1024", "--num-iterations=12",
                              "--eval-every=6", "--eval-tokens=2048", "--device-type=cpu", "--save-every=6"])
        sft = chat_sft.main(["--device-batch-size=4", "--examples-per-step=8", "--num-iterations=12",
                             "--eval-every=6", "--eval-steps=4", "--device-type=cpu"])
    return base, mid, sft


def test_mid_and_sft_write_loadable_checkpoints(pipeline_dir, small_tokenizer):
    base, mid, sft = pipeline_dir
    assert (base / "mid_checkpoints" / "d2" / "model_000012.pt").exists()
    assert (base / "chatsft_checkpoints" / "d2" / "model_000012.pt").exists()
    assert mid["val_bpb"] is not None and sft["val_loss"] is not None
    assert len(mid["losses"]) == 12 and len(sft["losses"]) == 12
    model, _, meta = load_model("sft", "cpu", "eval", base_dir=base, tokenizer=small_tokenizer)
    assert meta["source"] == "mid" and meta["step"] == 12
    conversation = {"messages": [{"role": "user", "content": "Hello! Who are you?"},
                                 {"role": "assistant", "content": ""}]}
    prompt = small_tokenizer.render_for_completion(conversation)
    rows, masks = Engine(model, small_tokenizer).generate_batch(prompt, num_samples=2, max_tokens=10, temperature=1.0)
    assert all(len(r) > len(prompt) for r in rows)


def test_sft_reports_the_tokens_of_the_examples_it_trained_on(pipeline_dir, small_tokenizer, shared_data):
    """12 steps of 8 conversations: the first 96 of the mixture, each cropped to sequence_len + 1 tokens."""
    base, _, sft = pipeline_dir
    _, _, meta = load_model("sft", "cpu", "eval", base_dir=base, tokenizer=small_tokenizer)
    dataset = sft_mixture(None, seed=42)
    T = meta["model_config"]["sequence_len"]
    expected = sum(len(small_tokenizer.render_conversation(dataset[i], max_tokens=T + 1)[0]) - 1 for i in range(96))
    assert sft["tokens_seen"] == meta["tokens_seen"] == expected


def test_mid_resume_continues_from_its_checkpoint(pipeline_dir, monkeypatch, shared_data):
    base, _, _ = pipeline_dir
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
    out = mid_train.main(["--device-batch-size=8", "--total-batch-size=1024", "--num-iterations=14",
                          "--eval-every=-1", "--eval-tokens=1024", "--device-type=cpu", "--resume"])
    assert out["step"] == 14 and len(out["losses"]) == 2  # steps 13 and 14 only


def test_sft_targets_cover_only_assistant_tokens(small_tokenizer, shared_data):
    dataset = sft_mixture(shared_data)
    loader = SFTBatchLoader(small_tokenizer, dataset, B=6, T=4096)
    x, y = next(loader)
    for i in range(6):
        ids, mask = small_tokenizer.render_conversation(dataset[i], max_tokens=4097)
        expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        n = len(ids) - 1
        assert y[i, :n].tolist() == expected
        assert (y[i, n:] == -1).all()
        assert x[i, :n].tolist() == ids[:-1]
        # No user-turn token is ever a target: every supervised position lies inside an assistant turn.
        assert sum(mask[1:]) == int((y[i] >= 0).sum()) > 0
    user_start = small_tokenizer.encode_special("<|user_start|>")
    assert not (y == user_start).any()


def test_conversation_loader_resumes_exactly(small_tokenizer, shared_data):
    dataset = mid_train_mixture(shared_data)
    loader = ConversationTokenLoader(small_tokenizer, dataset, 4, 128, rank=1, world_size=2)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = ConversationTokenLoader(small_tokenizer, dataset, 4, 128, rank=1, world_size=2, state=state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert state["index"] % 2 == 1 and 0 < loader.progress() < 1
