"""Checkpoints: original layout, identical logits after a round trip, clean errors on damaged files."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from nanochat.checkpoint_manager import (
    CheckpointError,
    atomic_torch_save,
    build_model,
    checkpoint_dir_for,
    find_largest_model,
    find_last_step,
    load_checkpoint,
    load_model,
    save_checkpoint,
    source_of,
    step_files,
    step_of,
)
from nanochat.gpt import GPT, GPTConfig


def trained_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def save(model: GPT, directory, step: int, optimizer_data=None):
    meta = {"step": step, "model_config": model.config.to_dict(), "val_bpb": 1.23}
    save_checkpoint(directory, step, model.state_dict(), optimizer_data, meta)


def test_save_load_gives_identical_logits_in_original_layout(tmp_path, small_tokenizer):
    model = trained_model(small_tokenizer.get_vocab_size())
    ckpt = tmp_path / "base_checkpoints" / "d2"
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros((1, 4), dtype=torch.long), torch.zeros((1, 4), dtype=torch.long)).backward()
    opt.step()
    save(model, ckpt, 7, optimizer_data=[opt.state_dict()])
    assert sorted(os.listdir(ckpt)) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt"]
    assert json.loads((ckpt / "meta_000007.json").read_text())["model_config"]["n_kv_head"] == 2

    loaded, tok, meta = build_model(ckpt, 7, "cpu", phase="eval", tokenizer=small_tokenizer)
    idx = torch.randint(0, small_tokenizer.get_vocab_size(), (2, 16))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), loaded(idx))
    assert not loaded.training and meta["step"] == 7

    _, optim, _ = load_checkpoint(ckpt, 7, "cpu", load_optimizer=True)
    assert optim[0]["state"][0]["exp_avg"].shape == opt.state_dict()["state"][0]["exp_avg"].shape

    # load_model finds the largest tag and the last step under <base>/<phase>_checkpoints.
    save(model, tmp_path / "base_checkpoints" / "d10", 3)
    save(model, tmp_path / "base_checkpoints" / "d10", 12)
    _, _, meta = load_model("base", "cpu", "eval", base_dir=tmp_path, tokenizer=small_tokenizer)
    assert meta["step"] == 12
    assert find_largest_model(tmp_path / "base_checkpoints") == "d10"
    assert find_last_step(tmp_path / "base_checkpoints" / "d10") == 12


def test_compiled_prefix_and_bf16_embedding_are_handled(tmp_path, small_tokenizer):
    model = trained_model(small_tokenizer.get_vocab_size())
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["_orig_mod.transformer.wte.weight"] = state["_orig_mod.transformer.wte.weight"].bfloat16()
    (tmp_path / "d2").mkdir()
    torch.save(state, tmp_path / "d2" / "model_000001.pt")  # as a GPU run of the original would write it
    (tmp_path / "d2" / "meta_000001.json").write_text(json.dumps({"model_config": model.config.to_dict()}))
    loaded, _, _ = build_model(tmp_path / "d2", 1, "cpu", tokenizer=small_tokenizer)
    assert loaded.transformer.wte.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.transformer.wte.weight, model.transformer.wte.weight.bfloat16().float())


def test_truncated_checkpoint_fails_naming_the_file(tmp_path, small_tokenizer):
    model = trained_model(small_tokenizer.get_vocab_size())
    save(model, tmp_path, 5)
    path = tmp_path / "model_000005.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model_000005.pt") as err:
        build_model(tmp_path, 5, "cpu", tokenizer=small_tokenizer)
    assert "truncated" in str(err.value)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, small_tokenizer):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "model_000001.pt", "wb") as f:
        pickle.dump({"transformer.wte.weight": Evil()}, f, protocol=2)
    config = trained_model(small_tokenizer.get_vocab_size()).config.to_dict()
    (tmp_path / "meta_000001.json").write_text(json.dumps({"model_config": config}))
    with pytest.raises(CheckpointError, match="model_000001.pt"):
        build_model(tmp_path, 1, "cpu", tokenizer=small_tokenizer)
    assert not marker.exists()


def test_mismatched_checkpoint_names_the_keys(tmp_path, small_tokenizer):
    model = trained_model(small_tokenizer.get_vocab_size())
    state = model.state_dict()
    state.pop("transformer.h.1.mlp.c_fc.weight")
    state["transformer.h.0.attn.c_k.weight"] = torch.zeros(3, 3)
    state["transformer.extra.weight"] = torch.zeros(1)
    save_checkpoint(tmp_path, 2, state, None, {"model_config": model.config.to_dict()})
    with pytest.raises(CheckpointError) as err:
        build_model(tmp_path, 2, "cpu", tokenizer=small_tokenizer)
    msg = str(err.value)
    assert "transformer.h.1.mlp.c_fc.weight" in msg and "transformer.extra.weight" in msg
    assert "transformer.h.0.attn.c_k.weight: checkpoint (3, 3)" in msg


def test_missing_meta_and_vocab_mismatch_are_clear(tmp_path, small_tokenizer):
    model = trained_model(small_tokenizer.get_vocab_size() + 1)
    save(model, tmp_path, 1)
    with pytest.raises(CheckpointError, match="different tokenizer"):
        build_model(tmp_path, 1, "cpu", tokenizer=small_tokenizer)
    (tmp_path / "meta_000001.json").unlink()
    with pytest.raises(CheckpointError, match="meta_000001.json"):
        build_model(tmp_path, 1, "cpu", tokenizer=small_tokenizer)
    with pytest.raises(FileNotFoundError, match="no model_"):
        find_last_step(tmp_path / "nothing-here")


def test_interrupted_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "model_000001.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"w": torch.zeros(1000), "x": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model_000001.pt"]  # no temp file left behind


def test_the_layout_is_built_and_parsed_in_one_place(tmp_path):
    directory = checkpoint_dir_for("sft", "d4", base_dir=tmp_path)
    assert directory == tmp_path / "chatsft_checkpoints" / "d4"
    assert source_of(directory) == "sft" and source_of(tmp_path / "elsewhere" / "d4") is None
    assert step_of("model_000120.pt") == 120 and step_of("sub/model_7.pt") == 7
    assert step_of(".model_000120.pt.x1.tmp") is None and step_of("meta_000120.json") is None
    directory.mkdir(parents=True)
    for name in ("optim_000005_rank1.pt", "optim_000005_rank0.pt", "optim_000050_rank0.pt", "optim_000005_rankx.pt"):
        (directory / name).touch()
    assert step_files(directory, 5) == ["model_000005.pt", "meta_000005.json"]
    assert step_files(directory, 5, include_optimizer=True) == [
        "model_000005.pt", "meta_000005.json", "optim_000005_rank0.pt", "optim_000005_rank1.pt"]
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        checkpoint_dir_for("nope", "d4")
