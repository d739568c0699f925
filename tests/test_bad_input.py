"""
Bad input everywhere: each bad file or value gets an error that names the file or field and says what to do,
and nothing already stored is damaged (the files on disk are byte-identical afterwards).

Covered elsewhere, not repeated here: truncated / mismatched / code-running model checkpoints and tokenizer
pickles (test_checkpoint.py, test_tokenizer.py), malformed eval bundle lines (test_core_eval.py), a DuckDB file
from a newer schema refused by every writer (test_eval_store.py), huge / empty / control-character /
special-token chat messages through the running app (test_app.py), a bad profile through the launchpad
(test_orchestration.py).
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
import torch

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

CONFIG = GPTConfig(sequence_len=32, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)


def tiny_model(config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


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


# --- hostile checkpoint, meta and tokenizer files: refused before anything large is allocated ---------------------
# Each load runs in a child process under RLIMIT_AS (3 GiB) and a 60 s timeout: an attack that allocated (a
# zero-stride tensor upcast to 6 GB, a 5e7-token rotary table) or blocked (a FIFO) would fail the test, not the
# machine. The child prints the error it got, its time and its peak RSS.

LOAD_IN_CHILD = r"""
import json, resource, sys, time
what, path = sys.argv[1], sys.argv[2]
started = time.monotonic()
try:
    if what == "model":
        from nanochat.checkpoint_manager import build_model
        build_model(path, 1, "cpu")
    elif what == "resume":
        from nanochat.checkpoint_manager import read_meta, resume_training
        from nanochat.gpt import GPT, GPTConfig
        model = GPT(GPTConfig(**json.load(open(path + "/meta_000001.json"))["model_config"]))
        resume_training(path, model, model.setup_optimizers(0.004, 0.2, 0.02, 0.0), "cpu", rank=0, world_size=1,
                        step=1)
    elif what == "tokenizer":
        from nanochat.tokenizer import load_tokenizer
        load_tokenizer(path)
    elif what == "token_bytes":
        from nanochat.tokenizer import get_token_bytes
        get_token_bytes(base_dir=path)
    result = "LOADED"
except BaseException as e:
    result = f"{type(e).__name__}: {e}"
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"result": result, "seconds": round(time.monotonic() - started, 2), "peak_mib": peak_mib}))
"""
CHILD_MEMORY = 3 << 30


def load_in_child(what: str, path: Path) -> dict:
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("NANOCHAT_MAX_MODEL_BYTES", None)
    out = subprocess.run([sys.executable, "-c", LOAD_IN_CHILD, what, str(path)], capture_output=True, text=True,
                         timeout=60, env=env, preexec_fn=limit)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def good_state(config: GPTConfig = CONFIG) -> dict:
    return tiny_model(config).state_dict()


def write_step(directory: Path, state, meta: dict | str | bytes | None = None, config: GPTConfig = CONFIG) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"step": 1, "model_config": config.to_dict(), "world_size": 1} if meta is None else meta
    raw = meta if isinstance(meta, bytes) else (meta if isinstance(meta, str) else json.dumps(meta)).encode()
    (directory / "meta_000001.json").write_bytes(raw)
    if state is not None:
        torch.save(state, directory / "model_000001.pt")
    return directory


def pickle_bomb(path: Path, opcodes: bytes) -> None:
    """Replace the pickle record of a torch.save zip by `opcodes` (stored, as torch writes it)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        records = [(info.filename, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records:
            z.writestr(name, b"\x80\x02" + opcodes + b"." if name.endswith("data.pkl") else data)


def deflated(path: Path) -> None:
    """Rewrite a torch.save zip with every record deflate-compressed (torch itself never compresses)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        records = [(info.filename, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in records:
            z.writestr(name, data)


def hostile_model(how: str, d: Path) -> tuple[str, str]:
    """Plant one hostile step in d; return (the file the error must name, what it must say)."""
    cfg = CONFIG.to_dict()
    if how == "zero-stride bf16 tensor (6.4 GB as fp32)":
        write_step(d, {**good_state(), "transformer.wte.weight": torch.zeros(1, 1, dtype=torch.bfloat16).expand(
            40_000, 40_000)})
        return "model_000001.pt", "zero-stride or overlapping"
    if how == "tensors sharing one storage":
        base = torch.zeros(512 * 64)
        write_step(d, {k: base[: v.numel()].view(v.shape) for k, v in good_state().items()})
        return "model_000001.pt", "share storage"
    if how == "deflate-compressed records":
        write_step(d, good_state())
        deflated(d / "model_000001.pt")
        return "model_000001.pt", "is compressed"
    if how == "legacy (non-zip) format":
        d.mkdir(parents=True)
        write_step(d, None)
        torch.save(good_state(), d / "model_000001.pt", _use_new_zipfile_serialization=False)
        return "model_000001.pt", "not a PyTorch checkpoint"
    if how == "a 3 MiB pickle of EMPTY_LIST opcodes (torch's unpickler: ~2 s a MiB)":
        write_step(d, good_state())
        pickle_bomb(d / "model_000001.pt", b"]" * (3 << 20))
        return "model_000001.pt", "limit for a checkpoint's pickle"
    if how == "int8 weights":
        write_step(d, {k: v.to(torch.int8) for k, v in good_state().items()})
        return "model_000001.pt", "torch.int8"
    if how == "a list, not a state dict":
        write_step(d, [torch.zeros(2)])
        return "model_000001.pt", "expected a state_dict"
    if how == "model file is a FIFO":
        write_step(d, None)
        os.mkfifo(d / "model_000001.pt")
        return "model_000001.pt", "is a FIFO"
    if how == "model file is a symlink to /dev/zero":
        write_step(d, None)
        (d / "model_000001.pt").symlink_to("/dev/zero")
        return "model_000001.pt", "character device"
    if how == "meta is a symlink to /dev/zero":
        write_step(d, good_state())
        (d / "meta_000001.json").unlink()
        (d / "meta_000001.json").symlink_to("/dev/zero")
        return "meta_000001.json", "character device"
    if how == "meta is a FIFO":
        write_step(d, good_state())
        (d / "meta_000001.json").unlink()
        os.mkfifo(d / "meta_000001.json")
        return "meta_000001.json", "is a FIFO"
    configs = {
        "n_layer=1e6": ({**cfg, "n_layer": 10**6}, "model_config.n_layer"),
        "n_embd=1e9": ({**cfg, "n_embd": 10**9}, "model_config.n_embd"),
        "vocab_size=1e12": ({**cfg, "vocab_size": 10**12}, "model_config.vocab_size"),
        "sequence_len=5e7": ({**cfg, "sequence_len": 50_000_000}, "model_config.sequence_len"),
        "sequence_len=true": ({**cfg, "sequence_len": True}, "model_config.sequence_len"),
        "n_head as a string": ({**cfg, "n_head": "2"}, "model_config.n_head"),
        "n_head=0 (a division by zero)": ({**cfg, "n_head": 0}, "model_config.n_head"),
        "n_embd not divisible by n_head": ({**cfg, "n_embd": 66, "n_head": 4}, "inconsistent"),
        "every field in range, 3 TB in all": ({"sequence_len": 1 << 20, "vocab_size": 1 << 24, "n_layer": 1024,
                                               "n_head": 64, "n_kv_head": 64, "n_embd": 8192}, "GiB to build"),
        "model_config a string": ("d20", "field 'model_config' is 'd20' (str)"),
        "unknown model_config field": ({**cfg, "n_experts": 8}, "unknown fields"),
    }
    if how in configs:
        config, says = configs[how]
        write_step(d, good_state(), {"step": 1, "model_config": config})
        return "meta_000001.json", says
    metas = {
        "meta nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        "meta with a 5000-digit number": ('{"step": ' + "9" * 5000 + "}", "not valid JSON"),
        "meta is a JSON list": ("[1, 2]", "expected an object"),
        "meta step is a string": (json.dumps({"step": "one", "model_config": cfg}), "field 'step'"),
        "meta is not UTF-8": (b"\xff\xfe{", "not valid JSON"),
    }
    meta, says = metas[how]
    write_step(d, good_state(), meta)
    return "meta_000001.json", says


HOSTILE_MODELS = [
    "zero-stride bf16 tensor (6.4 GB as fp32)", "tensors sharing one storage", "deflate-compressed records",
    "legacy (non-zip) format", "a 3 MiB pickle of EMPTY_LIST opcodes (torch's unpickler: ~2 s a MiB)",
    "int8 weights", "a list, not a state dict", "model file is a FIFO",
    "model file is a symlink to /dev/zero", "meta is a symlink to /dev/zero", "meta is a FIFO", "n_layer=1e6",
    "n_embd=1e9", "vocab_size=1e12", "sequence_len=5e7", "sequence_len=true", "n_head as a string",
    "n_head=0 (a division by zero)", "n_embd not divisible by n_head", "every field in range, 3 TB in all",
    "model_config a string", "unknown model_config field", "meta nested 100,000 deep",
    "meta with a 5000-digit number", "meta is a JSON list", "meta step is a string", "meta is not UTF-8",
]


@pytest.mark.parametrize("how", HOSTILE_MODELS)
def test_hostile_checkpoint_is_refused_in_bounded_time_and_memory(tmp_path, how):
    d = tmp_path / "base_checkpoints" / "d1"
    names, says = hostile_model(how, d)
    before = {p.name: (p.is_symlink(), p.lstat().st_size) for p in d.iterdir()}
    out = load_in_child("model", d)
    print(how, out)
    assert out["result"].startswith("CheckpointError: "), out
    assert str(d / names) in out["result"] and says in out["result"], out
    assert len(out["result"]) < 1500, "the error message must stay short"
    assert out["peak_mib"] < 1500, out  # torch + tokenizer libraries take ~400 MiB; nothing big was allocated
    assert {p.name: (p.is_symlink(), p.lstat().st_size) for p in d.iterdir()} == before


@pytest.mark.parametrize("how", ["optimizer shard is a FIFO", "dataloader_state_dicts is a string",
                                 "one loader state for two ranks", "world_size is a list"])
def test_hostile_resume_state_is_refused_naming_the_field(tmp_path, how):
    d = tmp_path / "mid_checkpoints" / "d1"
    meta = {"step": 1, "model_config": CONFIG.to_dict(), "world_size": 1}
    if how == "optimizer shard is a FIFO":
        write_step(d, good_state(), meta)
        os.mkfifo(d / "optim_000001_rank0.pt")
        name, says = "optim_000001_rank0.pt", "is a FIFO"
    else:
        meta |= {"dataloader_state_dicts is a string": {"dataloader_state_dicts": "x" * 10_000},
                 "one loader state for two ranks": {"dataloader_state_dicts": [{"a": 1}, {"b": 2}]},
                 "world_size is a list": {"world_size": [1]}}[how]
        model = tiny_model()
        save_checkpoint(d, 1, model.state_dict(), [o.state_dict() for o in model.setup_optimizers(
            0.004, 0.2, 0.02, 0.0)], meta)
        name = "meta_000001.json"
        says = "world_size" if how == "world_size is a list" else "dataloader_state_dicts"
    out = load_in_child("resume", d)
    assert out["result"].startswith("CheckpointError: "), out
    assert str(d / name) in out["result"] and says in out["result"] and len(out["result"]) < 1500, out


def test_nan_weights_are_refused_unless_explicitly_allowed(tmp_path, small_tokenizer, caplog):
    from nanochat.checkpoint_manager import build_model

    config = GPTConfig(**{**CONFIG.__dict__, "vocab_size": small_tokenizer.get_vocab_size()})
    state = good_state(config)
    state["transformer.h.0.mlp.c_fc.weight"][3, 7] = float("nan")
    state["lm_head.weight"][0, 0] = float("inf")
    d = write_step(tmp_path / "d1", state, config=config)
    with pytest.raises(CheckpointError, match="NaN/inf weights") as err:
        build_model(d, 1, "cpu", tokenizer=small_tokenizer)
    assert "model_000001.pt" in str(err.value) and "transformer.h.0.mlp.c_fc.weight" in str(err.value)
    assert "allow_nonfinite=True" in str(err.value)
    model, _, _ = build_model(d, 1, "cpu", tokenizer=small_tokenizer, allow_nonfinite=True)
    assert torch.isnan(model.transformer.h[0].mlp.c_fc.weight).any()
    assert "LOADING ANYWAY" in caplog.text and "lm_head.weight" in caplog.text


def encoding_pickle(state, monkeypatch, enc) -> bytes:
    """A genuine tiktoken Encoding pickle (tiktoken.core.Encoding + BUILD) carrying the given state."""
    import tiktoken

    with monkeypatch.context() as m:
        m.setattr(tiktoken.Encoding, "__getstate__", lambda self: state)
        return pickle.dumps(enc)


def hostile_tokenizer(how: str, d: Path, enc, monkeypatch) -> tuple[str, str]:
    d.mkdir(parents=True)
    good = {"name": enc.name, "pat_str": enc._pat_str, "mergeable_ranks": dict(enc._mergeable_ranks),
            "special_tokens": dict(enc._special_tokens)}
    if how == "a 200-byte pickle whose repr is 2**60 items":
        dag = "x"
        for _ in range(60):
            dag = (dag, dag)  # tuples: opcodes a pickled Encoding may use, so the state check quotes it
        data = encoding_pickle(dag, monkeypatch, enc)
        assert len(data) < 1000
        (d / "tokenizer.pkl").write_bytes(data)
        return "tokenizer.pkl", "self-contained"
    # Opcodes that make the C unpickler allocate what the stream declares, before any check could run.
    bombs = {
        "11 bytes whose memo index makes the unpickler zero 16 GiB": b"\x80\x04Nr" + (0x3FFFFFFF).to_bytes(4, "little"),
        "11 bytes whose memo index zeroes 2 GiB (inside the test's limit)": b"\x80\x04Nr"
        + (0x0FFFFFFF).to_bytes(4, "little"),
        "BINBYTES8 declaring 1 TiB": b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"x" * 16,
        "a million MARKs (8 bytes each in the unpickler)": b"\x80\x04" + b"(" * 1_000_000,
        "a million empty lists (~80 bytes each)": b"\x80\x04" + b"]" * 1_000_000,
    }
    if how in bombs:
        (d / "tokenizer.pkl").write_bytes(bombs[how] + b".")
        return "tokenizer.pkl", "not a pickled tiktoken Encoding"
    if how == "tokenizer.pkl is a FIFO":
        os.mkfifo(d / "tokenizer.pkl")
        return "tokenizer.pkl", "is a FIFO"
    if how == "tokenizer.pkl is a symlink to /dev/zero":
        (d / "tokenizer.pkl").symlink_to("/dev/zero")
        return "tokenizer.pkl", "character device"
    if how == "tokenizer.json nested 100,000 deep":
        (d / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
        return "tokenizer.json", "not a valid tokenizers JSON file"
    if how == "tokenizer.json of the wrong shape":
        (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": [1, 2]}}))
        return "tokenizer.json", "not a valid tokenizers JSON file"
    ranks = good["mergeable_ranks"]
    states = {
        # tiktoken panics (PanicException, a BaseException) on a pattern that matches the empty string.
        "a pattern that makes tiktoken panic": ({**good, "pat_str": "(?=.*)"}, "PanicException"),
        "an invalid pattern": ({**good, "pat_str": "(unclosed"}, "cannot be built"),
        "a byte with no token (tiktoken panics on it)": (
            {**good, "mergeable_ranks": {k: v for k, v in ranks.items() if k != b"e"}}, "mergeable_ranks"),
        "special ids colliding with merges": (
            {**good, "special_tokens": {k: i for i, k in enumerate(good["special_tokens"])}}, "special_tokens"),
        "no <|output_end|> (the chat format needs it)": (
            {**good, "special_tokens": {k: v for k, v in good["special_tokens"].items() if k != "<|output_end|>"}},
            "lacks the special tokens"),
        "a huge pattern": ({**good, "pat_str": "a" * 100_000}, "pat_str"),
        "rank ids that are not integers": ({**good, "mergeable_ranks": {**ranks, b"zz": "1"}}, "mergeable_ranks"),
    }
    state, says = states[how]
    (d / "tokenizer.pkl").write_bytes(encoding_pickle(state, monkeypatch, enc))
    return "tokenizer.pkl", says


HOSTILE_TOKENIZERS = [
    "a 200-byte pickle whose repr is 2**60 items", "tokenizer.pkl is a FIFO", "tokenizer.pkl is a symlink to /dev/zero",
    "tokenizer.json nested 100,000 deep", "tokenizer.json of the wrong shape", "a pattern that makes tiktoken panic",
    "an invalid pattern", "a byte with no token (tiktoken panics on it)", "special ids colliding with merges",
    "no <|output_end|> (the chat format needs it)", "a huge pattern", "rank ids that are not integers",
    "11 bytes whose memo index makes the unpickler zero 16 GiB",
    "11 bytes whose memo index zeroes 2 GiB (inside the test's limit)", "BINBYTES8 declaring 1 TiB",
    "a million MARKs (8 bytes each in the unpickler)", "a million empty lists (~80 bytes each)",
]


@pytest.mark.parametrize("how", HOSTILE_TOKENIZERS)
def test_hostile_tokenizer_is_refused_in_bounded_time_and_memory(tmp_path, small_tokenizer, monkeypatch, how):
    d = tmp_path / "tokenizer"
    name, says = hostile_tokenizer(how, d, small_tokenizer.enc, monkeypatch)
    out = load_in_child("tokenizer", d)
    print(how, out)
    assert out["result"].split(":")[0] in ("CorruptTokenizerFile", "TokenizerFileError"), out
    assert str(d / name) in out["result"] and says in out["result"], out
    assert len(out["result"]) < 1500 and out["peak_mib"] < 1500, out
    assert "MemoryError" not in out["result"], "refused by what it asked for, not by running out of memory"


def test_token_bytes_that_are_not_a_vector_of_ints_are_refused(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    torch.save(torch.ones(3, 3), tmp_path / "tokenizer" / "token_bytes.pt")
    out = load_in_child("token_bytes", tmp_path)
    assert out["result"].startswith("TokenizerFileError: ") and "token_bytes.pt" in out["result"], out
    assert "1-D integer tensor" in out["result"], out


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
