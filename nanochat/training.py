"""
The steps base_train, mid_train and chat_sft take the same way: optimizers from the learning-rate flags,
--resume, micro-batch accumulation, the optimizer step, when periodic work falls due, and the summary sent to
Dagster. Each script keeps what is its own (schedule, data, what it evaluates, what its checkpoint records).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from nanochat.checkpoint_manager import checkpoint_dir_for, default_model_tag, resume_training, save_checkpoint
from nanochat.common import print0, scale_initial_lr, set_lr_multiplier, synchronize
from nanochat.pipes import PipesReporter, loss_curve


def make_optimizers(model, args: argparse.Namespace) -> list[torch.optim.Optimizer]:
    """AdamW + Muon at the --embedding/--unembedding/--matrix-lr and --weight-decay flags; a stage that starts
    from a trained model (it has --init-lr-frac) starts at that fraction of them (schedules scale from there)."""
    optimizers = model.setup_optimizers(args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay)
    if "init_lr_frac" in vars(args):
        scale_initial_lr(optimizers, args.init_lr_frac)
    return optimizers


def checkpoint_dir_of(source: str, args: argparse.Namespace, model) -> Path:
    """Where this run saves its steps: the source's checkpoints under --model-tag, else the model's default tag."""
    return checkpoint_dir_for(source, args.model_tag or default_model_tag(model.config.n_layer))


def resume_if_asked(args: argparse.Namespace, checkpoint_dir: Path, model, optimizers, device: torch.device,
                    rank: int, world_size: int, what: str = "") -> tuple[int, dict, dict | None]:
    """
    --resume / --resume-from-step: (step, meta, this rank's dataloader state) of the checkpoint to continue from:
    the last *complete* step unless one is named (a kill mid-save leaves a newer, partial one). A fresh run:
    (0, {}, None). The step resumed from is on disk already, so it is not saved (or scored) again.
    """
    if not (args.resume or args.resume_from_step >= 0):
        return 0, {}, None
    from_step = args.resume_from_step if args.resume_from_step >= 0 else None
    step, meta, loader_state = resume_training(checkpoint_dir, model, optimizers, device, rank, world_size, from_step)
    print0(f"resumed {what + ' ' if what else ''}from {checkpoint_dir} step {step}")
    return step, meta, loader_state


def due(every: int, step: int) -> bool:
    """Whether periodic work (--eval-every, --save-every, ...; <= 0: never) falls on this step."""
    return every > 0 and step % every == 0


def accumulate(train_model, loader: Iterator, x: torch.Tensor, y: torch.Tensor, accum_steps: int,
               autocast: AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """
    accum_steps forward/backward passes, each on the prefetched batch (x, y) while the next one is fetched.
    Returns the last pass's loss (detached), the next batch, and the loader state it starts at: what a checkpoint
    records, so that a resumed run trains on exactly that batch next.
    """
    for _ in range(accum_steps):
        with autocast:
            loss = train_model(x, y)
        (loss / accum_steps).backward()
        state_before_xy = loader.state_dict()
        x, y = next(loader)
    return loss.detach(), x, y, state_before_xy


def optimizer_step(model, optimizers, lr_multiplier: float) -> None:
    """Every group at lr_multiplier x its initial lr, one step of every optimizer, then the gradients cleared."""
    set_lr_multiplier(optimizers, lr_multiplier)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def synced_clock(device: torch.device) -> float:
    """time.time() once the device's queued work is done, so that a step's wall time is the work it queued."""
    synchronize(device)
    return time.time()


def save_step(checkpoint_dir: Path, step: int, model, optimizers, meta: dict, rank: int) -> None:
    """The model, this rank's optimizer shards and meta (with the dataloader positions) of one step."""
    save_checkpoint(checkpoint_dir, step, model.state_dict(), [o.state_dict() for o in optimizers], meta, rank=rank)


def report_summary(reporter: PipesReporter, summary: dict) -> None:
    """The run's summary as the asset's metadata: every figure, with the losses as a short curve."""
    reported = {k: v for k, v in summary.items() if k != "losses"}
    reporter.result({**reported, "loss_curve": loss_curve(summary["losses"])})
