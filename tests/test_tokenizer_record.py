"""The tokenizer a checkpoint records (nanochat.checkpoint_manager.tokenizer_record): the fingerprint is stable
across re-saving and re-publishing the same tokenizer and differs for another one of the same vocab size; a step
published by orchestration/workspace.py carries the record in its meta (the run directory's meta left as training
wrote it); build_model refuses any tokenizer but the recorded one, and a checkpoint without a record still loads."""

from __future__ import annotations

import json
import pickle

import pytest
import tiktoken

from nanochat.checkpoint_manager import (
    CheckpointError,
    build_model,
    meta_path,
    read_meta,
    recorded_tokenizer,
    save_checkpoint,
    tokenizer_record,
    with_tokenizer,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer, fingerprint, load_tokenizer, save_token_bytes
from orchestration.workspace import publish_checkpoint, tokenizer_record_of
from store.artifact_store import LocalArtifactStore
from store.keys import checkpoint_key, tokenizer_key


def save_model(checkpoint_dir, vocab_size: int, step: int = 3, meta_extra: dict | None = None) -> dict:
    config = GPTConfig(sequence_len=32, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    meta = {"step": step, "model_config": config.to_dict(), "val_bpb": 2.5, **(meta_extra or {})}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None, meta)
    return meta


def test_fingerprint_is_the_tokenizers_content_not_its_file(tmp_path, small_tokenizer, other_tokenizer,
                                                            monkeypatch):
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    expected = fingerprint(small_tokenizer)
    assert len(expected) == 64 and expected != fingerprint(other_tokenizer)
    assert small_tokenizer.get_vocab_size() == other_tokenizer.get_vocab_size()
    # Re-pickled under another Encoding name and pickle protocol: other bytes, the same tokenizer.
    enc = small_tokenizer.enc
    renamed = tiktoken.Encoding("renamed", pat_str=enc._pat_str, mergeable_ranks=dict(enc._mergeable_ranks),
                                special_tokens=dict(enc._special_tokens))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.pkl").write_bytes(pickle.dumps(renamed, protocol=5))
    small_tokenizer.save(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.pkl").read_bytes() != (tmp_path / "b" / "tokenizer.pkl").read_bytes()
    # Published twice under different keys and loaded back from the store: still the same fingerprint.
    store = LocalArtifactStore(root=str(tmp_path / "artifacts"))
    for run, directory in (("run-a", tmp_path / "a"), ("run-b", tmp_path / "b")):
        store.put_dir(directory, tokenizer_key("tiny", run))
        assert fingerprint(load_tokenizer(store.get_dir(tokenizer_key("tiny", run)))) == expected
    # One change anywhere (a special token's id, the split pattern) is another tokenizer.
    swapped = dict(enc._special_tokens)
    first, second = sorted(swapped)[:2]
    swapped[first], swapped[second] = swapped[second], swapped[first]
    other_ids = tiktoken.Encoding("x", pat_str=enc._pat_str, mergeable_ranks=dict(enc._mergeable_ranks),
                                  special_tokens=swapped)
    other_split = tiktoken.Encoding("x", pat_str=r"\S+|\s+", mergeable_ranks=dict(enc._mergeable_ranks),
                                    special_tokens=dict(enc._special_tokens))
    assert expected not in {fingerprint(RustBPETokenizer(other_ids)), fingerprint(RustBPETokenizer(other_split))}


def test_a_published_step_records_its_tokenizer_in_meta(tmp_path, small_tokenizer, monkeypatch):
    """The metadata round trip through the publish path every stage and resume point uses."""
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    store = LocalArtifactStore(root=str(tmp_path / "artifacts"))
    small_tokenizer.save(tmp_path / "run" / "tokenizer")
    save_token_bytes(small_tokenizer, tmp_path / "run" / "tokenizer")
    tok = store.put_dir(tmp_path / "run" / "tokenizer", tokenizer_key("tiny", "run-1"))
    record = tokenizer_record_of({"key": tok.key, "sha256": tok.sha256}, tmp_path / "run" / "tokenizer")
    assert record == {"key": "tokenizer/tiny/run-1", "fingerprint": fingerprint(small_tokenizer)}

    checkpoint_dir = tmp_path / "run" / "base_checkpoints" / "d1"
    meta = save_model(checkpoint_dir, small_tokenizer.get_vocab_size())
    written = meta_path(checkpoint_dir, 3).read_bytes()
    key = checkpoint_key("base", "tiny", "d1", "run-1")
    publish_checkpoint(store, checkpoint_dir, 3, key, tmp_path / "staging", record)
    published = store.get_dir(key)
    assert read_meta(published, 3) == {**meta, "tokenizer": record} == with_tokenizer(meta, record)
    assert recorded_tokenizer(read_meta(published, 3), key) == record
    assert meta_path(checkpoint_dir, 3).read_bytes() == written  # the run directory's copy is untouched
    model, tokenizer, _ = build_model(published, 3, "cpu", tokenizer=load_tokenizer(store.get_dir(tok.key)))
    assert tokenizer.get_vocab_size() == model.config.vocab_size


def test_a_record_is_checked_and_a_missing_one_is_not_a_guess(tmp_path, small_tokenizer, other_tokenizer):
    vocab = small_tokenizer.get_vocab_size()
    record = tokenizer_record("tokenizer/tiny/run-1", fingerprint(small_tokenizer))
    save_model(tmp_path / "new", vocab, meta_extra={"tokenizer": record})
    build_model(tmp_path / "new", 3, "cpu", tokenizer=small_tokenizer)
    with pytest.raises(CheckpointError) as info:
        build_model(tmp_path / "new", 3, "cpu", tokenizer=other_tokenizer, tokenizer_source="tokenizer/tiny/run-2")
    message = str(info.value)
    for fragment in ("tokenizer mismatch", "trained with tokenizer tokenizer/tiny/run-1", record["fingerprint"][:12],
                     "not tokenizer/tiny/run-2", fingerprint(other_tokenizer)[:12], "512 tokens",
                     "Serve it with the tokenizer it records (tokenizer/tiny/run-1)"):
        assert fragment in message, message
    # Saved before checkpoints recorded their tokenizer: whatever tokenizer of the right size the caller names loads.
    save_model(tmp_path / "old", vocab)
    assert recorded_tokenizer(read_meta(tmp_path / "old", 3), "old") is None
    build_model(tmp_path / "old", 3, "cpu", tokenizer=other_tokenizer)
    # A malformed record is an error naming the field, not a silent fallback.
    meta = json.loads(meta_path(tmp_path / "old", 3).read_text())
    meta_path(tmp_path / "old", 3).write_text(json.dumps({**meta, "tokenizer": {"key": "tokenizer/tiny/x"}}))
    with pytest.raises(CheckpointError, match="meta field 'tokenizer' must be"):
        build_model(tmp_path / "old", 3, "cpu", tokenizer=small_tokenizer)
    with pytest.raises(ValueError, match="64-hex-digit fingerprint"):
        tokenizer_record("tokenizer/tiny/run-1", "not-a-sha")
