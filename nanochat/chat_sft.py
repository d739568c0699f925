"""
Supervised fine-tuning: train on whole conversations, one per batch row, with the loss only on the assistant's
tokens (the render mask), at a small fraction of the base learning rates, decaying linearly to zero.

    python -m nanochat.chat_sft                      # from the latest mid checkpoint
    torchrun --standalone --nproc_per_node=8 -m nanochat.chat_sft --source=mid

Writes <base_dir>/chatsft_checkpoints/<tag>/.
"""

from __future__ import annotations

import argparse
import time

import torch

from nanochat.checkpoint_manager import (
    checkpoint_dir_for,
    load_model,
    loader_states_meta,
    resume_training,
    save_checkpoint,
)
from nanochat.cli import check_ranges
from nanochat.common import (
    all_reduce_avg,
    autocast_for,
    is_distributed,
    print0,
    scale_initial_lr,
    set_lr_multiplier,
    synchronize,
)
from nanochat.dataloader import SFTBatchLoader
from nanochat.pipes import loss_curve, run_training
from nanochat.tasks import sft_mixture, sft_val


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Supervised fine-tuning on a conversation mixture")
    p.add_argument("--device-type", default="")
    p.add_argument("--dtype", default="", help="bfloat16|float32 (default: bf16 on cuda)")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                   help="torch.compile with dynamic shapes (auto: no, SFT batches vary in length)")
    p.add_argument("--source", default="mid", choices=["base", "mid"], help="checkpoint to start from")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=0, help="crop conversations (default: model sequence_len)")
    p.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward/backward")
    p.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step")
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument("--num-iterations", type=int, default=-1, help="override the epoch-based horizon")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--init-lr-frac", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=100, help="val batches per evaluation")
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--data-dir", default=None, help="local task data (default: hub, else shared data)")
    p.add_argument("--resume", action="store_true", help="continue from the last SFT checkpoint of this tag")
    p.add_argument("--resume-from-step", type=int, default=-1, help="continue from this saved step (implies --resume)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-every", type=int, default=1)
    return check_ranges(
        p, p.parse_args(argv),
        positive=("device_batch_size", "examples_per_step", "num_epochs", "eval_steps", "init_lr_frac", "log_every"),
        non_negative=("max_seq_len", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay"),
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

    optimizers = model.setup_optimizers(args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay)
    scale_initial_lr(optimizers, args.init_lr_frac)

    tag = args.model_tag or f"d{model.config.n_layer}"
    checkpoint_dir = checkpoint_dir_for("sft", tag)
    step, loader_state, val_loss = 0, None, None
    # Tokens of the examples trained on: every rank's up to the step resumed from, then this rank's own since.
    tokens_before, local_tokens = 0, 0
    if args.resume or args.resume_from_step >= 0:
        # The last complete step unless one is named (a kill mid-save leaves a newer, partial one); each rank its
        # own data position.
        from_step = args.resume_from_step if args.resume_from_step >= 0 else None
        step, meta, loader_state = resume_training(checkpoint_dir, model, optimizers, device, rank, world_size,
                                                   from_step)
        val_loss, tokens_before = meta.get("val_loss"), int(meta.get("tokens_seen") or 0)
        print0(f"resumed SFT from {checkpoint_dir} step {step}")
    start_step = step  # the step we resumed from is on disk already: not saved (or scored) again
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
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            with autocast:
                val_loader = SFTBatchLoader(tokenizer, val_set, B, T, device, rank, world_size)
                val_loss = evaluate_loss(model, val_loader, args.eval_steps)
            print0(f"step {step:05d} | val loss {val_loss:.4f}")
            reporter.metrics(step, val_loss=val_loss)
            model.train()
        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            tokens_seen = tokens_before + sum_over_ranks(local_tokens, device)
            meta = {"step": step, "val_loss": val_loss, "tokens_seen": tokens_seen,
                    "model_config": model.config.to_dict(), "user_config": vars(args), "world_size": world_size,
                    "source": args.source, "source_step": source_meta.get("step"),
                    **loader_states_meta(train_loader.state_dict()), "num_iterations": num_iterations,
                    "final": last_step}
            save_checkpoint(checkpoint_dir, step, model.state_dict(), [o.state_dict() for o in optimizers],
                            meta, rank=rank)
        if last_step:
            break

        synchronize(device)
        t0 = time.time()
        num_tokens = 0
        for _ in range(grad_accum_steps):
            x, y = next(train_loader)
            with autocast:
                loss = train_model(x, y)
            (loss / grad_accum_steps).backward()
            num_tokens += int((y >= 0).sum())
            local_tokens += train_loader.batch_tokens
        lrm = 1.0 - step / num_iterations
        set_lr_multiplier(optimizers, lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.time() - t0
        step += 1
        losses.append(loss.item())
        tokens_per_sec = num_tokens * world_size / dt
        if step % args.log_every == 0:
            print0(f"step {step:05d}/{num_iterations:05d} | loss {losses[-1]:.4f} | lrm {lrm:.3f} | "
                   f"supervised tok/s {tokens_per_sec:,.0f}")
            reporter.metrics(step, loss=losses[-1])

    summary = {"checkpoint_dir": str(checkpoint_dir), "step": step, "val_loss": val_loss, "tokens_seen": tokens_seen,
               "final_loss": losses[-1] if losses else None, "losses": losses}
    reporter.result({**{k: v for k, v in summary.items() if k != "losses"}, "loss_curve": loss_curve(losses)})
    return summary


if __name__ == "__main__":
    main()
