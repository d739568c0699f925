"""Which model the chat app serves and how it loads it, in process (ModelManager) and from the command line:
discovery and picker labels, promotion pointers (auto reload, the first promotion), a real S3 server (SeaweedFS),
a checkpoint directory given on the command line, the tokenizer a checkpoint records, the served dtype, the
command-line options, the scores plot; and, with a real `python -m app` per case, startup whatever one artifact
holds. Switching models in the running server: test_app.py.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import requests
import torch
from app_server import TIME, AppServer

from app.chat import stream_reply
from app.models import ModelManager
from app.scores import read_scores
from nanochat.checkpoint_manager import CheckpointError, meta_path, read_meta, recorded_tokenizer, save_checkpoint
from nanochat.gpt import GPTConfig
from store.artifact_store import LocalArtifactStore
from store.catalog import discover, local_candidate
from store.promotion import read_pointer, write_pointer

# -----------------------------------------------------------------------------
# Discovery, labels and promotion pointers


def test_discovery_lists_promoted_history_and_scores(demo):
    candidates, pointer, notes = discover(demo["store"], demo["db_path"])
    assert notes == []
    assert pointer["checkpoint"]["sha256"] == demo["v2"]["sha256"]
    assert [c.id for c in candidates] == [demo["v2"]["key"], demo["v1"]["key"]]
    promoted, older = candidates
    assert promoted.source == "promoted" and older.source == "history"
    label = older.label()
    assert label.startswith("↩ earlier promotion · sft demo d1 · step 40 · ") and "ChatCORE[5/6] 0.1234" in label
    assert "CORE[18/22] 0.0567" in label  # the CORE of the same run's base checkpoint
    assert re.match(f"★ promoted · sft demo d1 · step 80 · {TIME} UTC", promoted.label())


def test_auto_reload_switches_by_itself(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    manager = ModelManager(demo["store"], demo["db_path"], "cpu", auto_reload=True)
    manager.refresh()
    manager.load(demo["v1"]["key"])
    assert manager.check_promotion() is None  # the pointer (v2) was already seen by refresh()
    # Pretend the last pointer seen named v1: the current one (v2) is then a new promotion.
    manager.pointer_seen = {"checkpoint": {"key": demo["v1"]["key"], "sha256": demo["v1"]["sha256"]}}
    assert manager.check_promotion().id == demo["v2"]["key"]
    assert manager.current.sha256 == demo["v2"]["sha256"] and manager.offer is None


def test_nothing_served_yet_loads_the_first_promotion(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    empty = LocalArtifactStore(root=str(tmp_path / "artifacts"))
    manager = ModelManager(empty, None, "cpu")
    assert manager.load_default() is None and manager.health()["status"] == "no model loaded"
    pointer = read_pointer(demo["store"])
    for part in ("checkpoint", "tokenizer"):  # the pipeline publishes into the (so far empty) store
        copy_published(demo["store"], empty, pointer[part]["key"], tmp_path / part)
    pointer.pop("promoted_at")
    write_pointer(empty, pointer)
    assert manager.check_promotion().id == pointer["checkpoint"]["key"]
    assert manager.current.sha256 == demo["v2"]["sha256"] and manager.offer is None


def test_serving_the_promoted_model_from_s3(s3_store, demo, tmp_path, monkeypatch):
    """The same promotion, published to a real S3 server (SeaweedFS): discovered and loaded from there."""
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    pointer = read_pointer(demo["store"])
    for part in ("checkpoint", "tokenizer"):
        info = copy_published(demo["store"], s3_store, pointer[part]["key"], tmp_path / part)
        assert info.sha256 == pointer[part]["sha256"]  # same files, same manifest
        pointer[part] = {**pointer[part], "uri": info.uri}
    pointer.pop("promoted_at")
    write_pointer(s3_store, pointer)
    manager = ModelManager(s3_store, None, "cpu")
    loaded = manager.load_default()
    assert loaded.candidate.source == "promoted" and loaded.candidate.uri.startswith("s3://")
    assert loaded.sha256 == demo["v2"]["sha256"] and loaded.step == demo["v2"]["step"]
    assert manager.health()["promoted_pointer_seen"]["sha256"] == demo["v2"]["sha256"]


def copy_published(source: LocalArtifactStore, target, key: str, staging: Path):
    """Publish a copy of one of source's directories into target under the same key."""
    shutil.copytree(source.root_path / key, staging, ignore=shutil.ignore_patterns("manifest.json"))
    return target.put_dir(staging, key)



# -----------------------------------------------------------------------------
# Checkpoints from disk, their tokenizers, dtype and options


def test_checkpoint_dir_from_the_command_line(tmp_path, tokenizer_base_dir, small_tokenizer):
    from nanochat.gpt import GPT

    base = tmp_path / "base"
    (base / "tokenizer").mkdir(parents=True)
    for f in (tokenizer_base_dir / "tokenizer").iterdir():
        (base / "tokenizer" / f.name).write_bytes(f.read_bytes())
    config = GPTConfig(sequence_len=64, vocab_size=small_tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                       n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    save_checkpoint(base / "chatsft_checkpoints" / "d1", 3, model.state_dict(), None,
                    {"model_config": config.to_dict()})
    local = local_candidate(base / "chatsft_checkpoints" / "d1")
    assert local.step == 3 and local.stage == "sft" and local.tokenizer_dir == (base / "tokenizer").resolve()
    manager = ModelManager(None, None, "cpu", local=local)
    loaded = manager.load_default()
    assert loaded.candidate.source == "command line" and loaded.step == 3
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        local_candidate(tmp_path / "missing")


def published_copy(demo, tmp_path, monkeypatch) -> LocalArtifactStore:
    """A copy of the demo's store, for a test that rewrites what is published."""
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    shutil.copytree(demo["store"].root_path, tmp_path / "artifacts")
    return LocalArtifactStore(root=str(tmp_path / "artifacts"))


def test_a_checkpoint_is_served_only_with_the_tokenizer_its_meta_records(demo, tmp_path, monkeypatch,
                                                                          other_tokenizer):
    store = published_copy(demo, tmp_path, monkeypatch)
    v2 = store.get_dir(demo["v2"]["key"])
    record = recorded_tokenizer(read_meta(v2, demo["v2"]["step"]), demo["v2"]["key"])
    assert record["key"] == demo["tokenizer"].key  # published with its record (as the pipeline publishes)
    # From disk with another tokenizer of the same vocab size: refused, naming both; with its own: served.
    other_tokenizer.save(tmp_path / "other")
    manager = ModelManager(None, None, "cpu", local=local_candidate(v2, tmp_path / "other"))
    with pytest.raises(CheckpointError, match="tokenizer mismatch") as info:
        manager.load_default()
    assert f"trained with tokenizer {record['key']}" in str(info.value) and str(tmp_path / "other") in str(info.value)
    assert "unavailable: CheckpointError: tokenizer mismatch" in manager.candidates[0].label()
    local = local_candidate(v2, store.get_dir(record["key"]))
    assert ModelManager(None, None, "cpu", local=local).load_default().step == demo["v2"]["step"]
    # The tokenizer it records, re-published under the same key with another one's files: refused too.
    store.put_dir(tmp_path / "other", record["key"])
    manager = ModelManager(store, None, "cpu")
    assert manager.load_default() is None
    assert all("tokenizer mismatch" in c.error for c in manager.candidates), [c.error for c in manager.candidates]


def test_a_checkpoint_published_before_tokenizer_records(demo, tmp_path, monkeypatch):
    """No guess: served with the tokenizer its promotion names, or from disk with --tokenizer-dir; else refused."""
    store = published_copy(demo, tmp_path, monkeypatch)
    step, old = demo["v1"]["step"], tmp_path / "old"
    shutil.copytree(store.get_dir(demo["v1"]["key"]), old, ignore=shutil.ignore_patterns("manifest.json"))
    meta = read_meta(old, step)
    del meta["tokenizer"]
    meta_path(old, step).write_text(json.dumps(meta))
    key = "sft_checkpoint/demo/d1/before-records"
    info = store.put_dir(old, key)
    manager = ModelManager(store, None, "cpu")
    manager.refresh()
    with pytest.raises(CheckpointError, match=f"{key} does not record its tokenizer"):
        manager.load(key)
    label = next(c for c in manager.candidates if c.id == key).label()
    assert "unavailable" in label and "re-publish it" in label and "--tokenizer-dir" in label
    pointer = read_pointer(store)
    pointer["checkpoint"] = {**pointer["checkpoint"], "key": key, "uri": info.uri, "sha256": info.sha256,
                             "step": step}
    pointer.pop("promoted_at")
    write_pointer(store, pointer)  # promoted: the pointer names its tokenizer
    manager.refresh()
    loaded = manager.load(key)
    assert loaded.candidate.source == "promoted" and loaded.sha256 == info.sha256
    tokenizer_dir = store.get_dir(demo["tokenizer"].key)
    assert ModelManager(None, None, "cpu", local=local_candidate(old, tokenizer_dir)).load_default().step == step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_flag_sets_the_served_weights(tmp_path, tokenizer_base_dir, small_tokenizer, dtype):
    from app.__main__ import parse_args
    from app.models import describe
    from nanochat.gpt import GPT

    assert parse_args([]).dtype == "auto" and parse_args(["--dtype", dtype]).dtype == dtype
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "float16"])
    shutil.copytree(tokenizer_base_dir / "tokenizer", tmp_path / "tokenizer")
    config = GPTConfig(sequence_len=64, vocab_size=small_tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                       n_kv_head=2, n_embd=32)
    save_checkpoint(tmp_path / "chatsft_checkpoints" / "d1", 1, GPT(config).state_dict(), None,
                    {"model_config": config.to_dict()})
    manager = ModelManager(None, None, "cpu", local=local_candidate(tmp_path / "chatsft_checkpoints" / "d1"),
                           dtype=dtype)
    loaded = manager.load_default()
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}
    assert describe(loaded).endswith(dtype)
    reply = list(stream_reply(loaded.engine, [small_tokenizer.get_bos_token_id()], max_tokens=4, temperature=0.0,
                              top_k=None, seed=0))[-1]
    assert reply.num_tokens >= 1


def test_command_line_options():
    from app.__main__ import parse_args

    args = parse_args(["--auth", "alice:s3cret", "--auth", "bob:pw:with:colons", "--concurrency", "8",
                       "--max-input-chars", "100", "--auto-reload", "--artifacts", "s3://bucket/prefix"])
    assert args.auth == [("alice", "s3cret"), ("bob", "pw:with:colons")]
    assert (args.concurrency, args.max_input_chars, args.auto_reload, args.host, args.port) == (8, 100, True,
                                                                                              "127.0.0.1", 7860)
    for bad in (["--auth", "nopassword"], ["--step", "3"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)



# -----------------------------------------------------------------------------
# Scores plot


def test_scores_plot_shows_24_hour_utc_times_and_its_whole_legend(demo):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import date2num

    fig = read_scores(demo["db_path"], selected="validation · val_loss").plot()
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    assert ax.xaxis.get_major_formatter()(date2num(datetime(2026, 1, 2, 15, 4, 5))) == "2026-01-02 15:04:05"
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ticks and all(re.fullmatch(TIME, t) for t in ticks), ticks
    assert ax.get_xlabel() == "recorded at (UTC)"
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["demo d1 sft"]
    box, page = legend.get_window_extent(), fig.bbox  # inside the image: nothing clipped
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    assert not box.overlaps(ax.get_window_extent())  # beside the lines, not over them



# -----------------------------------------------------------------------------
# Whatever one artifact holds, the app starts, answers /health and serves the next good model


def panicking_tokenizer_dir(good_tokenizer, directory: Path) -> Path:
    """A tokenizer.pkl that is a well-formed tiktoken Encoding whose pattern makes tiktoken panic (a pattern that
    matches the empty string): PanicException, a BaseException, on the first encode."""
    import pickle

    import tiktoken

    enc = good_tokenizer.enc
    state = {"name": enc.name, "pat_str": "(?=.*)", "mergeable_ranks": dict(enc._mergeable_ranks),
             "special_tokens": dict(enc._special_tokens)}
    original = tiktoken.Encoding.__getstate__
    tiktoken.Encoding.__getstate__ = lambda self: state
    try:
        data = pickle.dumps(enc)
    finally:
        tiktoken.Encoding.__getstate__ = original
    directory.mkdir(parents=True)
    (directory / "tokenizer.pkl").write_bytes(data)
    return directory


@pytest.mark.parametrize("bad", ["pointer whose checkpoint is a string", "promoted tokenizer makes tiktoken panic",
                                 "promoted with another tokenizer of the same vocab size"])
def test_the_app_starts_and_serves_the_next_good_model_whatever_one_artifact_holds(demo, tmp_path, small_tokenizer,
                                                                                   other_tokenizer, monkeypatch, bad):
    shutil.copytree(demo["store"].root_path, tmp_path / "artifacts")
    store = LocalArtifactStore(root=str(tmp_path / "artifacts"))
    pointer = read_pointer(store)
    if bad == "pointer whose checkpoint is a string":
        store.write_json("promoted/latest.json", {**pointer, "checkpoint": pointer["checkpoint"]["key"]})
        # served instead: v2, through its promotion history entry
        says, serves = "'checkpoint' must be an object with a string 'key'", demo["v2"]["sha256"]
    else:
        if bad == "promoted tokenizer makes tiktoken panic":
            store.put_dir(panicking_tokenizer_dir(small_tokenizer, tmp_path / "bad-tokenizer"), "tokenizer/demo/bad")
            says = "PanicException"
        else:  # loads fine, same 512 tokens; v2's meta records another tokenizer's fingerprint
            other_tokenizer.save(tmp_path / "bad-tokenizer")
            store.put_dir(tmp_path / "bad-tokenizer", "tokenizer/demo/bad")
            says = "tokenizer mismatch"
        pointer["tokenizer"] = {"key": "tokenizer/demo/bad"}
        pointer.pop("promoted_at")
        write_pointer(store, pointer)  # v2 with the bad tokenizer; the history's v2 entry is the same checkpoint
        serves = demo["v1"]["sha256"]
    # In process: refresh() and load_default() never raise, and the bad candidate is marked with its reason.
    monkeypatch.setenv("NANOCHAT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    manager = ModelManager(store, demo["db_path"], "cpu")
    manager.refresh()
    loaded = manager.load_default()
    assert loaded is not None and loaded.sha256 == serves
    assert says in " ".join(manager.notes), manager.notes
    if bad != "pointer whose checkpoint is a string":
        broken = next(c for c in manager.candidates if c.source == "promoted")
        assert "unavailable" in broken.label() and "tokenizer" in broken.label() and says in broken.label()
        if says == "tokenizer mismatch":  # which one it records, and which one it was given
            assert f"trained with tokenizer {demo['tokenizer'].key} (fingerprint " in broken.label()
            assert "not tokenizer/demo/bad (fingerprint " in broken.label()
        manager.refresh()  # the reason stays on the candidate until it loads
        assert "unavailable" in next(c for c in manager.candidates if c.source == "promoted").label()
    # The real server: starts, /health answers 200 and names the model it serves and what it could not load.
    app = AppServer({**demo, "store": store}, tmp_path / "app-cache", tmp_path / "app.log")
    try:
        app.wait_ready()
        response = requests.get(f"{app.url}/health", timeout=10)
        assert response.status_code == 200
        health = response.json()
        assert health["status"] == "ok" and health["checkpoint"]["sha256"] == serves
        assert says in " ".join(health["notes"]), health["notes"]
    finally:
        app.stop()
