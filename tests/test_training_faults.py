"""
Training faults: kill -9 a run at random points (one process, and rank 1 of a 2-process torchrun job), then
--resume until it finishes: the final weights must be bit-identical to an uninterrupted run. That holds for
base_train, mid_train and chat_sft alike. A checkpoint cut short mid-write is never loaded, and a disk that fills
up during a save leaves the previous checkpoint intact with an error naming the file.

Quick by default (base: 2 single-process trials, 1 torchrun trial; mid and SFT: 1 torchrun trial each); the
full trial counts (10 of each, mid and SFT single-process too) with one command:

    NANOCHAT_FAULT_TRIALS=10 .venv/bin/pytest tests/test_training_faults.py -s
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanochat.checkpoint_manager import find_last_complete_step, load_checkpoint, missing_files

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("NANOCHAT_FAULT_TRIALS", "0"))
SINGLE_TRIALS = TRIALS or 2  # kill -9 of a single-process run
DDP_TRIALS = TRIALS or 1  # kill -9 of rank 1 under 2-process torchrun (each trial is ~2 torchrun launches)
CHAT_TRIALS = TRIALS or 1  # mid_train / chat_sft, per process count
# Quick mode kills mid/SFT only under torchrun (the path that used to resume rank 1 from rank 0's data position);
# the full run adds the single-process kills.
CHAT_NPROCS = (1, 2) if TRIALS else (2,)
STEPS, SAVE_EVERY = 20, 5
TINY = [
    "--depth=2",
    "--head-dim=64",
    "--max-seq-len=64",
    "--device-batch-size=8",
    "--total-batch-size=1024",
    "--eval-tokens=4096",
    "--sample-every=-1",
    "--device-type=cpu",
]
# --log-every=1: rank 0's per-step lines are the clock the kills are timed against.
COMMON = [*TINY, f"--num-iterations={STEPS}", "--eval-every=-1", f"--save-every={SAVE_EVERY}", "--log-every=1"]


@dataclass(frozen=True)
class Job:
    """A training script under test: its module, arguments (without --model-tag) and checkpoint folder."""

    name: str
    module: str
    args: tuple[str, ...]
    phase_dir: str


BASE = Job("base", "nanochat.base_train", tuple(COMMON), "base_checkpoints")
# mid and SFT start from a copy of the reference base model (same tag), on the conversation mixtures of the shared
# data. SFT starts from base so that a trial needs no mid run first.
CHAT_COMMON = (
    "--device-type=cpu",
    f"--num-iterations={STEPS}",
    "--eval-every=-1",
    f"--save-every={SAVE_EVERY}",
    "--log-every=1",
)
MID = Job(
    "mid",
    "nanochat.mid_train",
    (*CHAT_COMMON, "--max-seq-len=64", "--device-batch-size=8", "--total-batch-size=1024", "--eval-tokens=512"),
    "mid_checkpoints",
)
SFT = Job(
    "sft",
    "nanochat.chat_sft",
    (
        *CHAT_COMMON,
        "--source=base",
        "--max-seq-len=64",
        # ~1k tokens a step, like base and mid: the kill delay (up to 0.4 s) must land before the run can finish.
        "--device-batch-size=8",
        "--examples-per-step=16",
        "--eval-steps=1",
    ),
    "chatsft_checkpoints",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_base_dir, shared_data) -> Path:
    """One NANOCHAT_BASE_DIR for the module: the references are trained once and every trial uses its own tag."""
    base = tmp_path_factory.mktemp("faults")
    shutil.copytree(tokenizer_base_dir / "tokenizer", base / "tokenizer")
    return base


def launch(base: Path, args: list[str], nproc: int = 1, module: str = BASE.module) -> subprocess.Popen:
    # NANOCHAT_DATA_DIR and NANOCHAT_SHARED_DATA come from os.environ (the data_dir fixture sets them).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(base)}
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            module,
            *args,
        ]
    # A session of its own, so the whole process group can be killed at once.
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module", autouse=True)
def data_dir(shared_data):
    # launch() reads them from the environment; set once for the module, restored afterwards.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_DATA_DIR", str(shared_data / "pretrain"))
        mp.setenv("NANOCHAT_SHARED_DATA", str(shared_data))
        yield


def ckpt_dir(base: Path, tag: str, job: Job = BASE) -> Path:
    return base / job.phase_dir / tag


@pytest.fixture(scope="module")
def references(base) -> dict[int, Path]:
    """Uninterrupted 1-process and 2-process runs, trained side by side (the wall time is mostly start-up)."""
    procs = {n: launch(base, [*COMMON, f"--model-tag=ref{n}"], n) for n in (1, 2)}
    for proc in procs.values():
        finish(proc)
    return {n: ckpt_dir(base, f"ref{n}") for n in procs}


@pytest.fixture(scope="module")
def reference(references) -> Path:
    return references[1]


@pytest.fixture(scope="module")
def reference_ddp(references) -> Path:
    return references[2]


def assert_bit_identical(a_dir: Path, b_dir: Path, nproc: int = 1) -> None:
    """Final model and every rank's optimizer shard equal tensor for tensor (torch.equal, not allclose)."""
    files = [f"model_{STEPS:06d}.pt"] + [f"optim_{STEPS:06d}_rank{r}.pt" for r in range(nproc)]
    for name in files:
        a, b = (torch.load(d / name, weights_only=True) for d in (a_dir, b_dir))
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert flat_a.keys() == flat_b.keys(), name
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{name}: {k} differs"


def _tensors(obj, prefix: str = "") -> dict:
    """Every tensor in a nested state (dicts/lists), keyed by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def last_complete_on_disk(directory: Path, nproc: int) -> int:
    """The test's own view of the newest resumable step: model, meta and every rank's shard are files."""
    steps = [
        s
        for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)
        if all(
            (directory / n).is_file()
            for n in [f"model_{s:06d}.pt", f"meta_{s:06d}.json"] + [f"optim_{s:06d}_rank{r}.pt" for r in range(nproc)]
        )
    ]
    return max(steps, default=0)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun's workers are children of its agent), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # Field 4 of /proc/<pid>/stat is the parent pid; the command name (field 2) may hold spaces.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def worker_with_rank(agent_pid: int, rank: int) -> int:
    for pid in descendants(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no torchrun worker with RANK={rank} under pid {agent_pid}")


# A training step's log line in every script: "step 00007/00020 | loss ..." or "step 00007 (3.5%) | loss ...".
STEP_LINE = re.compile(r"^step (\d+)\b.*\| loss ", re.M)


def kill_and_resume(base: Path, tag: str, rng: random.Random, nproc: int, job: Job = BASE) -> dict:
    """
    Start a run, SIGKILL it (nproc=1: its process group; nproc=2: only the rank-1 worker) at a seeded random
    point after the first checkpoint, then --resume it to the end. Returns what happened, for the report.
    """
    directory = ckpt_dir(base, tag, job)
    # A checkpoint exists by then, and the run cannot finish within one more step.
    kill_after = rng.randint(SAVE_EVERY + 1, STEPS - 2)
    # A fraction of one step's time (measured below: steps take 0.05-0.3 s depending on the script and the load),
    # so the kill lands anywhere in the next step, the save before it included.
    fraction = rng.uniform(0.0, 1.0)
    proc = launch(base, [*job.args, f"--model-tag={tag}"], nproc, job.module)
    seen, step_times = [], []
    for line in proc.stdout:
        seen.append(line)
        if m := STEP_LINE.match(line):
            step_times.append(time.monotonic())
            if int(m.group(1)) == kill_after:
                break
    else:
        proc.wait()
        raise AssertionError("run ended before the kill point:\n" + "".join(seen))
    delay = fraction * (step_times[-1] - step_times[-2])
    time.sleep(delay)
    if nproc == 1:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        # Kill the non-zero rank only: torchrun notices the dead worker and tears the job down.
        os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
    rest, _ = proc.communicate(timeout=120)
    killed_log = "".join(seen) + rest
    assert proc.returncode != 0, "a killed run must not exit 0"
    if _alive_group(proc.pid):  # torchrun should have ended rank 0 itself; never leave a straggler behind
        os.killpg(proc.pid, signal.SIGKILL)
    assert not (directory / f"model_{STEPS:06d}.pt").exists(), "the run finished before it was killed"

    killed_at = max(int(s) for s in STEP_LINE.findall(killed_log))
    logged_saves = [int(s) for s in re.findall(r"saved checkpoint step (\d+)", killed_log)]
    expected = last_complete_on_disk(directory, nproc)
    out = finish(launch(base, [*job.args, f"--model-tag={tag}", "--resume"], nproc, job.module))
    # "resumed from", "resumed mid-training from", "resumed SFT from"
    resumed_from = int(re.search(r"resumed (?:\S+ )?from \S+ step (\d+)", out).group(1))
    # Resume from the newest complete checkpoint: every save the killed run reported, and none it had not finished.
    assert resumed_from == expected, (resumed_from, expected, out)
    assert max(logged_saves, default=0) <= resumed_from <= killed_at
    return {
        "job": job.name,
        "tag": tag,
        "killed_after_step": killed_at,
        "delay_s": round(delay, 2),
        "resumed_from": resumed_from,
        "skipped_incomplete": re.findall(r"skipping incomplete checkpoint step (\d+)", out),
    }


def _alive_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_kill_single_process_at_random_points_then_resume_bit_identical(base, reference):
    rng = random.Random(1234)
    for trial in range(SINGLE_TRIALS):
        result = kill_and_resume(base, f"kill1_{trial}", rng, nproc=1)
        assert_bit_identical(reference, ckpt_dir(base, f"kill1_{trial}"))
        print(f"1-process trial {trial}: {result} -> bit-identical")


def test_kill_rank1_under_torchrun_then_resume_bit_identical(base, reference_ddp):
    rng = random.Random(4321)
    for trial in range(DDP_TRIALS):
        result = kill_and_resume(base, f"kill2_{trial}", rng, nproc=2)
        assert_bit_identical(reference_ddp, ckpt_dir(base, f"kill2_{trial}"), nproc=2)
        print(f"torchrun rank-1 trial {trial}: {result} -> bit-identical")


# --- mid_train and chat_sft: the same kills, the same bit-identical finish --------------------------------------


def seed_base_model(base: Path, reference: Path, tag: str) -> None:
    """mid/SFT load base_checkpoints/<tag> (their --model-tag names both): a copy of the reference's final step."""
    directory = ckpt_dir(base, tag)
    directory.mkdir(parents=True)
    for name in (f"model_{STEPS:06d}.pt", f"meta_{STEPS:06d}.json"):
        shutil.copy(reference / name, directory / name)


@pytest.fixture(scope="module")
def chat_references(base, reference) -> dict[tuple[str, int], Path]:
    """Uninterrupted mid and SFT runs, 1 and 2 processes each, trained side by side."""
    procs = {}
    for job in (MID, SFT):
        for n in CHAT_NPROCS:
            tag = f"{job.name}_ref{n}"
            seed_base_model(base, reference, tag)
            procs[job.name, n] = launch(base, [*job.args, f"--model-tag={tag}"], n, job.module)
    for proc in procs.values():
        finish(proc)
    return {(name, n): ckpt_dir(base, f"{name}_ref{n}", MID if name == "mid" else SFT) for name, n in procs}


@pytest.mark.parametrize("nproc", CHAT_NPROCS, ids=lambda n: "1-process" if n == 1 else "torchrun-rank1")
@pytest.mark.parametrize("job", [MID, SFT], ids=lambda j: j.name)
def test_kill_mid_and_sft_then_resume_bit_identical(base, reference, chat_references, job, nproc):
    # Under torchrun each rank reads conversations r, r+W, ...: resuming rank 1 from rank 0's position (what
    # mid/SFT did before) trains it on rank 0's data and the weights differ from the reference.
    rng = random.Random({"mid": 100, "sft": 200}[job.name] + nproc)
    for trial in range(CHAT_TRIALS):
        tag = f"{job.name}_kill{nproc}_{trial}"
        seed_base_model(base, reference, tag)
        result = kill_and_resume(base, tag, rng, nproc, job)
        assert_bit_identical(chat_references[job.name, nproc], ckpt_dir(base, tag, job), nproc)
        print(f"{job.name} {nproc}-process trial {trial}: {result} -> bit-identical")


def interrupted_atomic_write(path: Path, garbage: bytes) -> None:
    """Die by SIGKILL inside nanochat.common.atomic_write, leaving exactly the temp file it leaves in real life."""
    code = (
        "import os, signal, sys\nfrom nanochat.common import atomic_write\n"
        "def half(f):\n    f.write(sys.stdin.buffer.read()); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], half)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], input=garbage, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_checkpoint_interrupted_mid_write_is_never_loaded(base, reference):
    directory = ckpt_dir(base, "torn")
    shutil.copytree(reference, directory)
    for p in directory.iterdir():
        if int(re.search(r"_(\d{6})", p.name).group(1)) > 10:
            p.unlink()
    # Step 15: model + meta renamed into place, the optimizer shard never written.
    for name in ("model_000015.pt", "meta_000015.json"):
        shutil.copy(reference / name, directory / name)
    # Step 20: meta and shard whole, the model killed halfway through its write (a temp file of garbage).
    for name in ("meta_000020.json", "optim_000020_rank0.pt"):
        shutil.copy(reference / name, directory / name)
    interrupted_atomic_write(directory / "model_000020.pt", (reference / "model_000020.pt").read_bytes()[:5000])
    temps = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert temps and temps[0].startswith(".model_000020.pt."), temps
    assert find_last_complete_step(directory, 1) == 10

    out = finish(launch(base, [*COMMON, "--model-tag=torn", "--resume"]))
    assert re.search(r"resumed from \S+ step 10\b", out), out
    assert "skipping incomplete checkpoint step 15" in out and "optim_000015_rank0.pt" in out
    assert_bit_identical(reference, directory)


# --- disk full during a save ------------------------------------------------------------------------------------

SAVE_SCRIPT = """
import resource, signal, torch
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
directory, step, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])  # sys: injected, or the real one
if fsize:  # a file-size limit: writes past it fail with EFBIG (SIGXFSZ ignored so the process lives to report it)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
torch.manual_seed(step)
config = GPTConfig(sequence_len=16, vocab_size=256, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device="cpu")
model.init_weights()
optim = [{"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}]  # small: fits where the model does not
save_checkpoint(directory, step, model.state_dict(), optim, {"step": step, "model_config": config.to_dict()})
"""
FREE_BYTES = 64 * 1024  # room for the optimizer shard and meta, not for the ~330 KB model file


def save_in_subprocess(directory: Path, step: int, fsize: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + SAVE_SCRIPT, str(directory), str(step), str(fsize)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )


def fill_disk(directory: Path, leave: int) -> None:
    """Fill the filesystem of `directory` until a write fails, then give `leave` bytes back."""
    filler = directory.parent / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def _digests(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, how):
    mount = tmp_path / "disk"
    mount.mkdir()
    if how == "tmpfs":
        # The real thing: a 1 MiB filesystem that fills up. Needs root and mount rights (skipped otherwise; the
        # rlimit variant below always runs).
        if (
            os.geteuid() != 0
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
            ).returncode
            != 0
        ):
            pytest.skip("cannot mount a tmpfs here (not root / no mount rights)")
    try:
        directory = mount / "ckpt" / "d1"
        exec(SAVE_SCRIPT, {"sys": SimpleNamespace(argv=["-", str(directory), "1", "0"])})  # step 1, in-process
        before = _digests(directory)
        if how == "tmpfs":
            fill_disk(directory, FREE_BYTES)
            with pytest.raises(OSError) as failed:
                exec(SAVE_SCRIPT, {"sys": SimpleNamespace(argv=["-", str(directory), "2", "0"])})
            error = f"OSError: {failed.value}"
        else:
            # The limit applies to the whole process, so this save runs in a child.
            failed = save_in_subprocess(directory, 2, fsize=FREE_BYTES)
            assert failed.returncode != 0
            error = failed.stderr.strip().splitlines()[-1]
        assert error.startswith("OSError") and "could not write" in error and "model_000002.pt" in error, error
        assert "disk is full" in error, error
        # The previous checkpoint is byte for byte what it was and loads; the new step is not visible as a
        # model file, no temp file is left behind, and resume would pick step 1.
        names = [p.name for p in directory.iterdir()]
        assert {n: d for n, d in _digests(directory).items() if n in before} == before
        model_data, optim_data, meta = load_checkpoint(directory, 1, load_optimizer=True)
        assert meta["step"] == 1 and model_data and optim_data
        assert "model_000002.pt" not in names and not [n for n in names if n.endswith(".tmp")], names
        assert missing_files(directory, 2, 1) == [directory / "model_000002.pt"]
        assert find_last_complete_step(directory, 1) == 1
        print(f"disk full ({how}): {error}")
    finally:
        if how == "tmpfs" and os.path.ismount(mount):
            subprocess.run(["umount", str(mount)], check=True)
