"""
Run profiles: named sets of settings for every stage. The profile is the run's partition (orchestration.partitions):
materializing partition `d20` trains with the d20 settings, and its stages only ever read d20 upstreams. Any single
field is overridable per run in the launchpad (resources.profile.config); the profile itself is not, the partition
chooses it.

    tiny   CPU, minutes: 4k vocab, depth 4, a few hundred steps on a small public-domain corpus
    tiny2  tiny at depth 2: a second CPU profile, so two lineages can be trained side by side in minutes
    d20    the speedrun: 8 GPUs, 240 FineWeb-Edu shards, vocab 65,536, depth 20 (~561M parameters)
    d26    ~1.1B parameters, 450 shards
    d32    ~1.9B parameters, 800 shards (the original's $800 tier)
"""

from __future__ import annotations

import math
from enum import Enum

import dagster as dg
from pydantic import model_validator

_TINY = dict(
    device_type="cpu", nproc_per_node=1, corpus="shakespeare", num_shards=0,
    tok_max_chars=20_000_000, vocab_size=4096,
    depth=4, max_seq_len=256, device_batch_size=16, total_batch_size=4096, base_iterations=120,
    eval_every=40, eval_tokens=65536,
    mid_iterations=40, mid_device_batch_size=16, sft_iterations=40, sft_device_batch_size=4, sft_examples_per_step=8,
    core_max_per_task=20, chat_max_per_task=16, chat_max_new_tokens=64, chat_num_samples=1, chat_temperature=0.0,
    promotion_tolerance=0.02, save_every=40, core_every=0, keep_resume_points=False,
)
_SPEEDRUN = dict(
    device_type="cuda", nproc_per_node=8, corpus="fineweb", num_shards=240,
    tok_max_chars=2_000_000_000, vocab_size=65536,
    depth=20, max_seq_len=2048, device_batch_size=32, total_batch_size=524288, base_iterations=-1,
    eval_every=250, eval_tokens=20 * 524288,
    mid_iterations=-1, mid_device_batch_size=32, sft_iterations=-1, sft_device_batch_size=4, sft_examples_per_step=32,
    core_max_per_task=-1, chat_max_per_task=-1, chat_max_new_tokens=512, chat_num_samples=1, chat_temperature=0.0,
    promotion_tolerance=0.01, save_every=500, core_every=2000, keep_resume_points=False,
)
PROFILES: dict[str, dict] = {
    "tiny": _TINY,
    "tiny2": {**_TINY, "depth": 2},
    "d20": _SPEEDRUN,
    "d26": {**_SPEEDRUN, "depth": 26, "num_shards": 450, "device_batch_size": 16, "mid_device_batch_size": 16},
    "d32": {**_SPEEDRUN, "depth": 32, "num_shards": 800, "device_batch_size": 8, "mid_device_batch_size": 8},
}


# What a real run can use, per field (inclusive). Checked before every other rule, so a value like depth=1e6 or
# chat_temperature=NaN is refused naming its field instead of sizing a run that cannot exist. A field added to
# RunProfile gets a line here; a number without one must at least be finite.
BOUNDS: dict[str, tuple[float, float]] = {
    "nproc_per_node": (1, 64), "num_shards": (-1, 1823), "tok_max_chars": (1, 10**12), "vocab_size": (266, 1 << 21),
    "depth": (1, 256), "max_seq_len": (1, 1 << 17), "device_batch_size": (1, 4096), "total_batch_size": (1, 1 << 30),
    "base_iterations": (-1, 10**8), "eval_every": (-1, 10**8), "eval_tokens": (1, 10**11),
    "mid_iterations": (-1, 10**8), "mid_device_batch_size": (1, 4096), "sft_iterations": (-1, 10**8),
    "sft_device_batch_size": (1, 4096), "sft_examples_per_step": (1, 1 << 20), "core_max_per_task": (-1, 10**7),
    "chat_max_per_task": (-1, 10**7), "chat_max_new_tokens": (1, 1 << 17), "chat_num_samples": (1, 1024),
    "chat_temperature": (0.0, 10.0), "promotion_tolerance": (0.0, 0.999),
}
MAX_STRING_CHARS = 4096


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def check_bounds(settings: dict, name: str) -> None:
    """Every number finite and within BOUNDS, every string short and free of control characters (NUL included)."""
    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"profile {name}: {key} must be a finite number, got {value}")
        if isinstance(value, int | float) and not isinstance(value, bool) and key in BOUNDS:
            low, high = BOUNDS[key]
            if not low <= value <= high:
                raise ValueError(f"profile {name}: {key}={_num(value)} is out of range; a real run uses "
                                 f"{_num(low)}..{_num(high)}")
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise ValueError(f"profile {name}: {key} is {len(value):,} characters, over {MAX_STRING_CHARS:,}")
            bad = next((c for c in value if ord(c) < 32 or 127 <= ord(c) < 160), None)
            if bad is not None:
                raise ValueError(f"profile {name}: {key} contains the control character {bad!r}; remove it")


class ProfileName(str, Enum):
    tiny = "tiny"
    tiny2 = "tiny2"
    d20 = "d20"
    d26 = "d26"
    d32 = "d32"


class RunProfile(dg.ConfigurableResource):
    """
    The profile of a run: which profile (the partition key) and the run's overrides. Leave a field unset (None)
    to take the profile's value. Assets call `for_partition(context.partition_key)`; `name` exists for code that
    runs outside a partitioned run (launchers, examples) and, when set in a run's config, must equal the partition.
    """

    name: ProfileName | None = None
    device_type: str | None = None  # cpu | cuda | mps
    nproc_per_node: int | None = None
    corpus: str | None = None  # shakespeare | shared | fineweb | local:<dir> | store:<key prefix>
    num_shards: int | None = None
    tok_max_chars: int | None = None
    vocab_size: int | None = None
    depth: int | None = None
    max_seq_len: int | None = None
    device_batch_size: int | None = None
    total_batch_size: int | None = None
    base_iterations: int | None = None
    eval_every: int | None = None
    eval_tokens: int | None = None
    mid_iterations: int | None = None
    mid_device_batch_size: int | None = None
    sft_iterations: int | None = None
    sft_device_batch_size: int | None = None
    sft_examples_per_step: int | None = None
    core_max_per_task: int | None = None  # CORE examples per task in base_eval (-1: all)
    chat_max_per_task: int | None = None  # ChatCORE examples per task in chat_eval (-1: all)
    chat_max_new_tokens: int | None = None  # generation budget of the generative chat tasks
    chat_num_samples: int | None = None  # samples per problem (pass@k when > 1)
    chat_temperature: float | None = None  # 0: greedy
    promotion_tolerance: float | None = None  # how far CORE / ChatCORE may fall below the promoted model's
    # Resume points (orchestration/resume.py): save and publish every N training steps (0: only the final step);
    # CORE of the base model every N steps, a multiple of save_every (0: off); keep them after the stage completes.
    save_every: int | None = None
    core_every: int | None = None
    keep_resume_points: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> RunProfile:
        if self.name is not None:
            validate(self.name.value, self.settings())
            return self
        # No profile yet (the partition chooses it at run time): refuse now what no profile could run; the rest
        # is checked by for_partition, once the profile is known.
        errors = []
        for name, values in PROFILES.items():
            try:
                validate(name, {**values, **self.overrides()})
                return self
            except ValueError as e:
                errors.append(e)
        raise ValueError(f"{errors[0]} (no profile accepts it: {', '.join(PROFILES)})")

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}

    def for_partition(self, partition_key: str) -> RunProfile:
        """This run's profile: the partition's settings with the run's overrides, validated for that profile."""
        if partition_key not in PROFILES:
            raise ValueError(f"partition {partition_key!r} is not a profile; pick one of {', '.join(PROFILES)}")
        if self.name is not None and self.name.value != partition_key:
            raise ValueError(f"the run config sets resources.profile.config.name={self.name.value!r} but the run "
                             f"materializes partition {partition_key!r}: the partition chooses the profile, so leave "
                             "name unset (or pick the partition you meant)")
        return RunProfile(name=partition_key, **self.overrides())

    def settings(self) -> dict:
        """The profile's values with this run's overrides applied."""
        if self.name is None:
            raise ValueError("this RunProfile names no profile yet: the run's partition chooses it "
                             "(use profile.for_partition(context.partition_key))")
        return {**PROFILES[self.name.value], **self.overrides()}

    @property
    def model_tag(self) -> str:
        return f"d{self.settings()['depth']}"


def validate(name: str, s: dict) -> None:
    """Raise ValueError naming the field when settings s (of profile `name`) cannot run."""
    check_bounds(s, name)
    if s["device_type"] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"profile {name}: device_type must be cpu, cuda or mps, got {s['device_type']!r}")
    for key in ("nproc_per_node", "vocab_size", "depth", "max_seq_len", "device_batch_size", "total_batch_size",
                "tok_max_chars", "sft_device_batch_size", "sft_examples_per_step", "mid_device_batch_size"):
        if s[key] <= 0:
            raise ValueError(f"profile {name}: {key} must be positive, got {s[key]}")
    for key in ("core_max_per_task", "chat_max_per_task"):
        if s[key] == 0 or s[key] < -1:
            raise ValueError(f"profile {name}: {key} must be -1 (all examples) or positive, got {s[key]}")
    # 0 would not fail: base_train would silently size the run from its tokens:params ratio instead.
    for key in ("base_iterations", "mid_iterations", "sft_iterations"):
        if s[key] == 0 or s[key] < -1:
            raise ValueError(f"profile {name}: {key} must be -1 (the default horizon) or positive, got {s[key]}")
    if s["save_every"] < 0 or s["core_every"] < 0:
        raise ValueError(f"profile {name}: save_every and core_every must be >= 0 (0: off)")
    if s["core_every"] and (not s["save_every"] or s["core_every"] % s["save_every"]):
        raise ValueError(f"profile {name}: core_every={s['core_every']} must be a multiple of save_every="
                         f"{s['save_every']} (CORE scores the published steps)")
    if s["num_shards"] < -1:
        raise ValueError(f"profile {name}: num_shards must be -1 (all), 0 (corpus without shards) or positive, "
                         f"got {s['num_shards']}")
    if s["eval_tokens"] <= 0:
        raise ValueError(f"profile {name}: eval_tokens must be positive, got {s['eval_tokens']}")
    if s["chat_temperature"] < 0:
        raise ValueError(f"profile {name}: chat_temperature must be >= 0 (0: greedy), got {s['chat_temperature']}")
    if s["chat_max_new_tokens"] <= 0 or s["chat_num_samples"] <= 0:
        raise ValueError(f"profile {name}: chat_max_new_tokens and chat_num_samples must be positive")
    if s["chat_num_samples"] > 1 and s["chat_temperature"] <= 0:
        raise ValueError(f"profile {name}: chat_num_samples={s['chat_num_samples']} draws identical greedy "
                         "samples; set chat_temperature > 0 (e.g. 0.7) for pass@k")
    if not 0 <= s["promotion_tolerance"] < 1:
        raise ValueError(f"profile {name}: promotion_tolerance must be in [0, 1), got {s['promotion_tolerance']}")
    if s["vocab_size"] < 266:
        raise ValueError(f"profile {name}: vocab_size must exceed 265 (256 bytes + 9 special tokens)")
    per_step = s["device_batch_size"] * s["max_seq_len"] * s["nproc_per_node"]
    if s["total_batch_size"] % per_step:
        raise ValueError(f"profile {name}: total_batch_size={s['total_batch_size']} must be a multiple of "
                         f"device_batch_size x max_seq_len x nproc_per_node = {per_step}")
    corpus = s["corpus"]
    if corpus not in ("shakespeare", "shared", "fineweb") and not corpus.startswith(("local:", "store:")):
        raise ValueError(f"profile {name}: corpus must be shakespeare, shared, fineweb, local:<dir> or "
                         f"store:<artifact key prefix>, got {corpus!r}")

