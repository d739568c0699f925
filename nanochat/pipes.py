"""
Report to Dagster when Dagster launched us (through Dagster Pipes), and do nothing otherwise.

Only rank 0 ever opens the Pipes context: under torchrun every rank shares the launcher's environment, and
N processes writing to one Pipes channel would corrupt it. `dagster-pipes` is a small dependency-free package;
it is imported only when a Pipes context is actually present, so the library runs without it.
"""

from __future__ import annotations

import os

from nanochat.common import compute_cleanup, compute_init, is_rank0


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


def run_training(train_fn, args):
    """
    The shell of every training entry point: join the process group, open the Pipes reporter (rank 0, under
    Dagster), run train_fn(args, rank, world_size, device, reporter), and always close both, reporting a
    failure to Dagster before re-raising it.
    """
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
