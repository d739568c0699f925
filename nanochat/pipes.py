"""
Report to Dagster when Dagster launched us (through Dagster Pipes), and do nothing otherwise.

Only rank 0 ever opens the Pipes context: under torchrun every rank shares the launcher's environment, and
N processes writing to one Pipes channel would corrupt it. `dagster-pipes` is a small dependency-free package;
it is imported only when a Pipes context is actually present, so the library runs without it.
"""

from __future__ import annotations

import os
import sys

from nanochat.common import compute_cleanup, compute_init, get_dist_info, is_rank0


class PipesReporter:
    def __init__(self) -> None:
        self._ctx = None
        self._cm = None
        if is_rank0() and os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self._cm = open_dagster_pipes()
            self._ctx = self._cm.__enter__()

    @property
    def active(self) -> bool:
        return self._ctx is not None

    def log(self, message: str) -> None:
        if self._ctx is not None:
            self._ctx.log.info(message)

    def metrics(self, step: int, **values) -> None:
        """A progress message Dagster shows in the run log (metadata is only attached once, at the end)."""
        if self._ctx is not None:
            self._ctx.report_custom_message({"step": step, **values})

    def result(self, metadata: dict, asset_key: str | None = None) -> None:
        """The materialization metadata of the asset this run produces (checkpoint URI, losses, ...)."""
        if self._ctx is not None:
            # Drop the unknowns (None). Pipes reads a dict value as {"raw_value", "type"}, so containers (per-task
            # score tables, missing-task reasons) are marked as JSON explicitly; Dagster then hands back the plain
            # dict/list as the metadata value.
            metadata = {k: {"raw_value": v, "type": "json"} if isinstance(v, (dict, list)) else v
                        for k, v in metadata.items() if v is not None}
            self._ctx.report_asset_materialization(metadata=metadata, asset_key=asset_key)

    def close(self, exc: BaseException | None = None) -> None:
        if self._cm is not None:
            cm, self._cm, self._ctx = self._cm, None, None
            cm.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)

    def __enter__(self) -> PipesReporter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)


def loss_curve(losses: list[float], points: int = 40) -> list[list[float]]:
    """[[step, loss], ...] at most `points` evenly spaced entries (steps count from 1), always with the last."""
    if not losses:
        return []
    stride = max(1, len(losses) // points)
    steps = list(range(stride - 1, len(losses), stride))
    if steps[-1] != len(losses) - 1:
        steps.append(len(losses) - 1)
    return [[i + 1, round(losses[i], 5)] for i in steps]


class _Tee:
    """A text stream that writes to the original stream and to a log file (line-buffered, so a crash loses
    nothing); everything else (fileno, isatty, encoding) is the original stream's."""

    def __init__(self, stream, file):
        self._stream, self._file = stream, file

    def write(self, text: str) -> int:
        self._file.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._file.flush()
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tee_output_to_log() -> None:
    """
    When the launcher asks for it ($NANOCHAT_LOG_FILE), copy this process's stdout and stderr into
    <file>.rank<R>, so that a failed run's last lines (the traceback above all) can be shown in Dagster next to
    the exit code, for every rank, not only the one that talks Pipes.
    """
    path = os.environ.get("NANOCHAT_LOG_FILE")
    if not path or isinstance(sys.stderr, _Tee):
        return
    _, rank, _, _ = get_dist_info()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    file = open(f"{path}.rank{rank}", "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    sys.stdout, sys.stderr = _Tee(sys.stdout, file), _Tee(sys.stderr, file)


def run_training(train_fn, args):
    """
    The shell of every training entry point: join the process group, open the Pipes reporter (rank 0, under
    Dagster), run train_fn(args, rank, world_size, device, reporter), and always close both, reporting a
    failure to Dagster before re-raising it.
    """
    tee_output_to_log()
    reporter = PipesReporter()  # first, so even a failing init is reported to Dagster
    try:
        _, rank, _, world_size, device = compute_init(args.device_type or None, seed=args.seed)
        return train_fn(args, rank, world_size, device, reporter)
    except BaseException as e:
        reporter.close(e)
        raise
    finally:
        reporter.close()
        compute_cleanup()
