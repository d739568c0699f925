"""
Supervised fine-tuning: train on whole conversations, one per batch row, with the loss only on the assistant's
tokens (the render mask), at a small fraction of the base learning rates, decaying linearly to zero.

    python -m nanochat.chat_sft                      # from the latest mid checkpoint
    torchrun --standalone --nproc_per_node=8 -m nanochat.chat_sft --source=mid

Writes <base_dir>/chatsft_checkpoints/<tag>/.
"""

from __future__ import annotations

import argparse

import torch

from nanochat import cli, training
from nanochat.checkpoint_manager import load_model, loader_states_meta
from nanochat.common import all_reduce_avg, autocast_for, is_distributed, print0
from nanochat.dataloader import SFTBatchLoader
from nanochat.pipes import run_training
from nanochat.tasks import sft_mixture, sft_val


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Supervised fine-tuning on a conversation mixture")
    cli.add_device_flags(p)
    cli.add_run_flags(p, compile_help="torch.compile with dynamic shapes (auto: no, SFT batches vary in length)")
    p.add_argument("--source", default="mid", choices=["base", "mid"], help="checkpoint to start from")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=0, help="crop conversations (default: model sequence_len)")
    p.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward/backward")
    p.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step")
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument("--num-iterations", type=int, default=-1, help="override the epoch-based horizon")
    cli.add_optimizer_flags(p, init_lr_frac=0.02)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=100, help="val batches per evaluation")
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--data-dir", default=None, help="local task data (default: hub, else shared data)")
    cli.add_resume_flags(p, "SFT checkpoint of this tag")
    return cli.check_ranges(
        p, p.parse_args(argv),
        positive=("device_batch_size", "examples_per_step", "num_epochs", "eval_steps", "init_lr_frac", "log_every"),
        non_negative=("max_seq_len", *cli.OPTIMIZER_FLAGS),
        horizons=("num_iterations",),
    )


def main(argv=None) -> dict:
    return run_training(train, parse_args(argv))


@torch.no_grad()
def evaluate_loss(model, loader, steps: int) -> float:
    """Mean assistant-token loss over `steps` batches (each batch weighted by its number of target tokens)."""
    device = model.get_device()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for _ in range(steps):
        x, y = next(loader)
        losses = model(x, y, loss_reduction="none")
        total += losses.sum()
        count += (y >= 0).sum()
    if is_distributed():
        all_reduce_avg(total)
        all_reduce_avg(count)
    return (total / count.clamp(min=1)).item()


def sum_over_ranks(n: int, device) -> int:
    """n summed over every rank (a collective: all ranks call it at the same step)."""
    if not is_distributed():
        return n
    t = torch.tensor([float(n)], dtype=torch.float64, device=device)
    return round(all_reduce_avg(t).item() * torch.distributed.get_world_size())


def train(args, rank, world_size, device, reporter) -> dict:
    autocast = autocast_for(device, args.dtype)
    model, tokenizer, source_meta = load_model(args.source, device, phase="train", model_tag=args.model_tag,
                                               step=args.step)
    T = args.max_seq_len or model.config.sequence_len
    B = args.device_batch_size
    if args.examples_per_step % (B * world_size):
        raise SystemExit(f"--examples-per-step={args.examples_per_step} must be a multiple of device_batch_size x "
                         f"world_size = {B * world_size}")
    grad_accum_steps = args.examples_per_step // (B * world_size)
    train_set, val_set = sft_mixture(args.data_dir, seed=args.seed), sft_val(args.data_dir)
    num_iterations = (args.num_iterations if args.num_iterations > 0
                      else max(1, int(args.num_epochs * len(train_set)) // args.examples_per_step))
    print0(f"SFT mixture: {len(train_set):,} conversations; val {len(val_set):,}; {num_iterations} steps of "
           f"{args.examples_per_step} conversations ({grad_accum_steps} accumulation steps)")

    optimizers = training.make_optimizers(model, args)

    checkpoint_dir = training.checkpoint_dir_of("sft", args, model)
    step, meta, loader_state = training.resume_if_asked(args, checkpoint_dir, model, optimizers, device, rank,
                                                        world_size, "SFT")
    start_step, val_loss = step, meta.get("val_loss")
    # Tokens of the examples trained on: every rank's up to the step resumed from, then this rank's own since.
    tokens_before, local_tokens = int(meta.get("tokens_seen") or 0), 0
    train_loader = SFTBatchLoader(tokenizer, train_set, B, T, device, rank, world_size, loader_state)
    # SFT batches are padded to their longest conversation, so shapes change from step to step: a static compile
    # would recompile per length and a dynamic one gains little, so auto stays eager (as the original does).
    use_compile = args.compile == "yes"
    print0(f"torch.compile: {'yes (dynamic shapes)' if use_compile else 'no'} "
           f"({'--compile=yes' if use_compile else 'variable-length batches'})")
    train_model = torch.compile(model, dynamic=True) if use_compile else model

    losses: list[float] = []
    tokens_per_sec = 0.0
    while True:
        last_step = step == num_iterations
        if last_step or training.due(args.eval_every, step):
            model.eval()
            with autocast:
                val_loader = SFTBatchLoader(tokenizer, val_set, B, T, device, rank, world_size)
                val_loss = evaluate_loss(model, val_loader, args.eval_steps)
            print0(f"step {step:05d} | val loss {val_loss:.4f}")
            reporter.metrics(step, val_loss=val_loss)
            model.train()
        if last_step or (step > start_step and training.due(args.save_every, step)):
            tokens_seen = tokens_before + sum_over_ranks(local_tokens, device)
            meta = {"step": step, "val_loss": val_loss, "tokens_seen": tokens_seen,
                    "model_config": model.config.to_dict(), "user_config": vars(args), "world_size": world_size,
                    "source": args.source, "source_step": source_meta.get("step"),
                    **loader_states_meta(train_loader.state_dict()), "num_iterations": num_iterations,
                    "final": last_step}
            training.save_step(checkpoint_dir, step, model, optimizers, meta, rank)
        if last_step:
            break

        t0 = training.synced_clock(device)
        num_tokens = 0
        for _ in range(grad_accum_steps):
            x, y = next(train_loader)
            with autocast:
                loss = train_model(x, y)
            (loss / grad_accum_steps).backward()
            num_tokens += int((y >= 0).sum())
            local_tokens += train_loader.batch_tokens
        lrm = 1.0 - step / num_iterations
        training.optimizer_step(model, optimizers, lrm)
        dt = training.synced_clock(device) - t0
        step += 1
        losses.append(loss.item())
        tokens_per_sec = num_tokens * world_size / dt
        if step % args.log_every == 0:
            print0(f"step {step:05d}/{num_iterations:05d} | loss {losses[-1]:.4f} | lrm {lrm:.3f} | "
                   f"supervised tok/s {tokens_per_sec:,.0f}")
            reporter.metrics(step, loss=losses[-1])

    summary = {"checkpoint_dir": str(checkpoint_dir), "step": step, "val_loss": val_loss, "tokens_seen": tokens_seen,
               "final_loss": losses[-1] if losses else None, "losses": losses}
    training.report_summary(reporter, summary)
    return summary


if __name__ == "__main__":
    main()
