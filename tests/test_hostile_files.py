"""Hostile checkpoint, meta and tokenizer files: refused, naming the file and what is wrong, before anything large
is allocated (zero-stride tensors, pickle bombs, FIFOs, /dev/zero links, configs that would build terabytes).

Each load runs in a child process under RLIMIT_AS (3 GiB) and a 60 s timeout, so an attack that got through fails the
test, not the machine. The other bad-input tests (shards, resume, run config, chat text) are in test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from tiny_gpt import CONFIG, tiny_model

from nanochat.checkpoint_manager import CheckpointError, save_checkpoint
from nanochat.gpt import GPTConfig

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

