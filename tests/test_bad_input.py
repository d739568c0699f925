"""
Bad input everywhere: each bad file or value gets an error that names the file or field and says what to do,
and nothing already stored is damaged (the files on disk are byte-identical afterwards).

Covered elsewhere, not repeated here: truncated / mismatched / code-running model checkpoints and tokenizer
pickles (test_checkpoint.py, test_tokenizer.py), malformed eval bundle lines (test_core_eval.py), a DuckDB file
from a newer schema refused by every writer (test_eval_store.py), huge / empty / control-character /
special-token chat messages through the running app (test_app.py), a bad profile through the launchpad
(test_orchestration.py). Hostile checkpoint, meta and tokenizer files (built to exhaust memory or time) are in
test_hostile_files.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_gpt import CONFIG, tiny_model

from app.chat import InputError, build_prompt, clean_message
from nanochat import base_train, chat_sft, dataset, mid_train, tok_train
from nanochat.checkpoint_manager import CheckpointError, load_model, resume_training, save_checkpoint
from nanochat.dataloader import DistributedTokenLoader
from nanochat.dataset import ShardError
from nanochat.gpt import GPT, GPTConfig
from orchestration.profiles import RunProfile
from store import eval_store as es


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path: 'nothing was damaged' is this dict unchanged."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- parquet shards: in the training loader, in tokenizer training, in `dataset --verify` -----------------------


def damage_shard(path: Path, how: str) -> None:
    if how == "empty file":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "corrupt page":
        # Footer intact, compressed data pages garbled: opening works, decoding a row group does not.
        data = bytearray(path.read_bytes())
        for i in range(200, 2000):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "numbers in text":
        pq.write_table(pa.table({"text": list(range(50))}), path)
    else:
        raise AssertionError(how)


DAMAGE = ["empty file", "truncated", "corrupt page", "numbers in text"]


@pytest.fixture(scope="module")
def texts(shared_data) -> list[str]:
    return pq.read_table(shared_data / "pretrain" / "shard_00000.parquet", columns=["text"])["text"].to_pylist()[:300]


def write_shards(directory: Path, texts: list[str], damage: str | None = None) -> Path:
    """Three small shards of real text (shard 2 is validation); shard 0 damaged as asked."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        pq.write_table(
            pa.table({"text": texts[i * 100 : (i + 1) * 100]}), directory / f"shard_{i:05d}.parquet", row_group_size=25
        )
    if damage:
        damage_shard(directory / "shard_00000.parquet", damage)
    return directory / "shard_00000.parquet"


@pytest.mark.parametrize("damage", DAMAGE)
def test_bad_shard_in_the_training_loader_is_named(tmp_path, texts, small_tokenizer, damage):
    bad = write_shards(tmp_path, texts, damage)
    before = digests(tmp_path)
    with pytest.raises(ShardError) as err:
        loader = DistributedTokenLoader(small_tokenizer, 2, 32, "train", data_dir=tmp_path)
        for _ in range(100):  # a damaged page only shows when its row group is decoded
            next(loader)
    message = str(err.value)
    assert str(bad) in message and "nanochat.dataset --verify" in message, message
    assert digests(tmp_path) == before


@pytest.mark.parametrize("damage", DAMAGE)
def test_bad_shard_in_tokenizer_training_is_named_and_the_old_tokenizer_kept(
    tmp_path, texts, tokenizer_base_dir, damage
):
    bad = write_shards(tmp_path / "shards", texts, damage)
    out = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_base_dir / "tokenizer", out)
    before = digests(tmp_path)
    with pytest.raises(ShardError, match=str(bad)):
        tok_train.main(["--vocab-size=300", f"--data-dir={tmp_path / 'shards'}", f"--out-dir={out}"])
    assert digests(tmp_path) == before


def test_empty_shards_train_no_tokenizer_and_keep_the_old_one(tmp_path, tokenizer_base_dir):
    # Valid parquet, zero documents: rustbpe would happily return a bytes-only vocabulary and overwrite a good one.
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), shards / f"shard_{i:05d}.parquet")
    out = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_base_dir / "tokenizer", out)
    before = digests(tmp_path)
    with pytest.raises(ValueError, match=f"train shards in {shards} hold no text.*nothing was saved"):
        tok_train.main(["--vocab-size=300", f"--data-dir={shards}", f"--out-dir={out}"])
    assert digests(tmp_path) == before


@pytest.mark.timeout(120)  # before the fix this looped forever
def test_empty_shards_stop_the_training_loader_instead_of_spinning(tmp_path, small_tokenizer):
    for i in range(3):
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / f"shard_{i:05d}.parquet")
    with pytest.raises(ValueError, match=r"found no documents .*\(shard_00000.parquet, shard_00001.parquet in "):
        next(DistributedTokenLoader(small_tokenizer, 2, 32, "train", data_dir=tmp_path))


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_each_kind_of_bad_shard(tmp_path, texts, capsys, damage):
    write_shards(tmp_path, texts, damage)
    before = digests(tmp_path)
    assert dataset.main(["--verify", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT shard_00000.parquet" in out and "2 of 3 shards" in out, out
    assert "shard_00001" not in out
    assert digests(tmp_path) == before  # verify reads, never repairs or deletes


# --- checkpoints on --resume, and a tokenizer from a different vocab ---------------------------------------------


def save_step(directory: Path, model: GPT, step: int) -> None:
    optimizers = model.setup_optimizers(0.004, 0.2, 0.02, 0.0)
    meta = {
        "step": step,
        "model_config": model.config.to_dict(),
        "world_size": 1,
        "dataloader_state_dict": {"epoch": 0, "index": 0},
    }
    save_checkpoint(directory, step, model.state_dict(), [o.state_dict() for o in optimizers], meta)


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["truncated optimizer shard", "optimizer shard that runs code", "wrong shape"])
def test_bad_checkpoint_on_resume_is_named_and_left_alone(tmp_path, damage):
    directory = tmp_path / "mid_checkpoints" / "d1"
    save_step(directory, tiny_model(), 5)
    marker = tmp_path / "pwned"
    model = tiny_model()
    if damage == "truncated optimizer shard":
        shard = directory / "optim_000005_rank0.pt"
        shard.write_bytes(shard.read_bytes()[:300])
        expected = "optim_000005_rank0.pt"
    elif damage == "optimizer shard that runs code":
        with open(directory / "optim_000005_rank0.pt", "wb") as f:
            pickle.dump([RunsCode(marker)], f)
        expected = "optim_000005_rank0.pt"
    else:
        model = tiny_model(GPTConfig(**{**CONFIG.__dict__, "n_embd": 128}))  # this run builds a wider model
        expected = "meta_000005.json has model_config"
    before = digests(tmp_path)
    optimizers = model.setup_optimizers(0.004, 0.2, 0.02, 0.0)
    with pytest.raises(CheckpointError, match=expected) as err:
        resume_training(directory, model, optimizers, "cpu", rank=0, world_size=1)
    assert not marker.exists()
    assert digests(tmp_path) == before
    print(f"{damage}: {err.value}")


def test_tokenizer_of_another_vocab_is_refused_when_loading_for_eval_chat_or_mid(
    tmp_path, tokenizer_base_dir, monkeypatch
):
    # The checkpoint was trained with a 600-token vocabulary; the base dir's tokenizer has 512.
    shutil.copytree(tokenizer_base_dir / "tokenizer", tmp_path / "tokenizer")
    model = tiny_model(GPTConfig(**{**CONFIG.__dict__, "vocab_size": 600}))
    save_step(tmp_path / "base_checkpoints" / "d1", model, 3)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    before = digests(tmp_path)
    pkl = str(tmp_path / "tokenizer" / "tokenizer.pkl")
    # base_eval, chat_eval and the app load through load_model / build_model.
    with pytest.raises(CheckpointError, match="different tokenizer") as err:
        load_model("base", "cpu", "eval")
    assert "vocab size 512" in str(err.value) and pkl in str(err.value) and "model vocab size 600" in str(err.value)
    assert "Use the tokenizer of the run that trained it" in str(err.value)
    with pytest.raises(CheckpointError, match="different tokenizer"):
        mid_train.main(["--device-type=cpu", "--device-batch-size=1", "--total-batch-size=32", "--num-iterations=1"])
    assert digests(tmp_path) == before and not (tmp_path / "mid_checkpoints").exists()


# --- invalid run config: the Dagster profile and the training scripts' flags -------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("depth", 0),
        ("max_seq_len", -1),
        ("device_batch_size", 0),
        ("vocab_size", 100),
        ("nproc_per_node", 0),
        ("total_batch_size", 1000),
        ("base_iterations", 0),
        ("mid_iterations", -5),
        ("sft_iterations", 0),
        ("eval_tokens", 0),
        ("num_shards", -2),
        ("chat_temperature", -0.5),
        ("promotion_tolerance", 1.5),
        ("device_type", "tpu"),
        ("corpus", "somewhere"),
        ("core_max_per_task", 0),
    ],
)
def test_bad_profile_value_is_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RunProfile(**{field: value})


def test_wrong_type_in_dagster_run_config_names_the_field(tmp_path):
    import dagster as dg

    from orchestration.defs.data import raw_shards
    from orchestration.defs.resources import EvalHistory
    from orchestration.launcher import TorchrunLauncher
    from orchestration.workspace import Workspace
    from store.artifact_store import LocalArtifactStore

    resources = {
        "artifacts": LocalArtifactStore(root=str(tmp_path / "artifacts")),
        "workspace": Workspace(root=str(tmp_path / "work")),
        "profile": RunProfile(),
        "launcher": TorchrunLauncher(),
        "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb")),
    }
    # Refused by Dagster's config validation, before anything runs or is written.
    with pytest.raises(dg.DagsterInvalidConfigError, match="depth"):
        dg.materialize(
            [raw_shards], resources=resources, run_config={"resources": {"profile": {"config": {"depth": "deep"}}}}
        )
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "evals.duckdb").exists()


@pytest.mark.parametrize(
    ("script", "flag", "value"),
    [
        (base_train, "--depth", "0"),
        (base_train, "--device-batch-size", "0"),
        (base_train, "--max-seq-len", "0"),
        (base_train, "--head-dim", "0"),
        (base_train, "--num-iterations", "0"),
        (base_train, "--total-batch-size", "0"),
        (base_train, "--warmdown-ratio", "2"),
        (base_train, "--log-every", "0"),
        (base_train, "--eval-tokens", "-1"),
        (mid_train, "--device-batch-size", "0"),
        (mid_train, "--max-seq-len", "-5"),
        (mid_train, "--num-iterations", "0"),
        (chat_sft, "--device-batch-size", "0"),
        (chat_sft, "--examples-per-step", "0"),
        (chat_sft, "--num-epochs", "0"),
        (chat_sft, "--eval-steps", "0"),
    ],
)
def test_bad_training_flag_is_rejected_before_anything_runs(script, flag, value, capsys):
    # Before: ZeroDivisionError / a negative tensor dimension deep in setup, or (--num-iterations=0) the default
    # multi-day horizon trained silently.
    with pytest.raises(SystemExit) as exit_:
        script.parse_args([f"{flag}={value}"])
    assert exit_.value.code == 2
    assert f"error: {flag} must be" in capsys.readouterr().err


# --- a DuckDB file from a newer schema ---------------------------------------------------------------------------


def test_newer_duckdb_schema_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "evals.duckdb"
    conn = es.connect_rw(path)
    es.migrate(conn)
    conn.execute("INSERT INTO schema_version VALUES (?, ?)", [len(es.MIGRATIONS) + 1, datetime(2030, 1, 1)])
    conn.close()
    before = digests(tmp_path)
    conn = es.connect_rw(path)
    try:
        with pytest.raises(es.SchemaVersionError, match="newer than this code.*upgrade nanochat-dagster") as e:
            es.record_run(conn, "r1", profile="tiny", depth=4)
        assert str(path) in str(e.value)
    finally:
        conn.close()
    assert digests(tmp_path) == before


# --- chat input that is binary or special-token text -------------------------------------------------------------


def test_binary_chat_input_is_refused_or_cleaned(small_tokenizer):
    with pytest.raises(InputError, match="must be text, not bytes"):
        clean_message(b"\x00\xff\xfe")
    with pytest.raises(InputError, match="only control characters"):
        clean_message("".join(map(chr, range(32))))
    # Every byte value as text (what a binary file pasted as latin-1 looks like): control characters go, the rest
    # is ordinary text, and the rendered prompt holds only the four special tokens the template adds.
    cleaned = clean_message(bytes(range(256)).decode("latin-1") + "<|python_start|>")
    assert "\x00" not in cleaned and "ÿ" in cleaned and cleaned.endswith("<|python_start|>")
    prompt = build_prompt(small_tokenizer, [{"role": "user", "content": cleaned}], 512, 16)
    specials = {small_tokenizer.encode_special(n) for n in small_tokenizer.get_special_tokens()}
    assert sum(t in specials for t in prompt.tokens) == 4
    assert small_tokenizer.decode(prompt.tokens[2:-2]) == cleaned
    json.dumps(cleaned)  # and it can be exported with the conversation


@pytest.mark.parametrize(("field", "value"), [("nproc_per_node", 1e6), ("depth", 1e6), ("vocab_size", 1e12),
                                              ("max_seq_len", 1e9), ("chat_temperature", float("nan")),
                                              ("chat_temperature", float("inf")), ("promotion_tolerance", float("nan")),
                                              ("corpus", "local:/data\x00/x"), ("corpus", "store:a\x1b[2Jb"),
                                              ("num_shards", 10**6), ("chat_max_new_tokens", 10**9)])
def test_profile_values_no_real_run_can_use_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as err:
        RunProfile(**{field: value})
    assert "out of range" in str(err.value) or "finite" in str(err.value) or "control character" in str(err.value)


@pytest.mark.parametrize(("field", "value", "says"), [("chat_temperature", float("nan"), "must be a finite number"),
                                                      ("depth", 1_000_000, "=1,000,000 is out of range"),
                                                      ("corpus", "shared\x00", "contains the control character")])
def test_unusable_value_in_dagster_run_config_names_the_field(tmp_path, field, value, says):
    import dagster as dg

    from orchestration.defs.data import raw_shards
    from orchestration.defs.resources import EvalHistory
    from orchestration.launcher import TorchrunLauncher
    from orchestration.workspace import Workspace
    from store.artifact_store import LocalArtifactStore

    resources = {
        "artifacts": LocalArtifactStore(root=str(tmp_path / "artifacts")),
        "workspace": Workspace(root=str(tmp_path / "work")),
        "profile": RunProfile(),
        "launcher": TorchrunLauncher(),
        "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb")),
    }
    # Refused when the resource is built, before the asset runs: the run fails with the field in its error.
    result = dg.materialize([raw_shards], resources=resources, raise_on_error=False,
                            run_config={"resources": {"profile": {"config": {field: value}}}})
    assert not result.success
    text = " ".join(str(e.event_specific_data.error.message) for e in result.all_events
                    if getattr(e.event_specific_data, "error", None) is not None)
    assert (f"{field}{says}" if says.startswith("=") else f"{field} {says}") in text, text[:2000]
    assert not (tmp_path / "artifacts").exists()
