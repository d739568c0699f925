"""
Mid-training: teach a base model the conversation format, tool use (calculator), multiple choice and spelling,
by continuing pretraining on a mixture of rendered conversations (loss on every token), for one epoch.

    python -m nanochat.mid_train --device-batch-size=16
    torchrun --standalone --nproc_per_node=8 -m nanochat.mid_train

Loads the latest base checkpoint (or --model-tag/--step), writes <base_dir>/mid_checkpoints/<tag>/.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from nanochat import cli, compile_policy, training
from nanochat.checkpoint_manager import load_model, loader_states_meta
from nanochat.common import autocast_for, default_dtype, grad_accum_steps, is_distributed, print0
from nanochat.dataloader import ConversationTokenLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.pipes import run_training
from nanochat.tasks import mid_train_mixture, mid_train_val
from nanochat.tokenizer import get_token_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mid-train a base model on a conversation mixture")
    cli.add_device_flags(p)
    p.add_argument("--model-tag", default=None, help="base model tag to start from (default: largest)")
    p.add_argument("--step", type=int, default=None, help="base checkpoint step (default: last)")
    p.add_argument("--max-seq-len", type=int, default=0, help="default: the base model's sequence_len")
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--num-iterations", type=int, default=-1, help="default: one epoch of the mixture")
    cli.add_optimizer_flags(p, init_lr_frac=1.0)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--data-dir", default=None, help="local task data (default: hub, else shared data)")
    cli.add_resume_flags(p, "mid checkpoint of this tag")
    cli.add_run_flags(p)
    return cli.check_ranges(
        p, p.parse_args(argv),
        positive=("device_batch_size", "total_batch_size", "eval_tokens", "init_lr_frac", "log_every"),
        non_negative=("max_seq_len", *cli.OPTIMIZER_FLAGS),
        horizons=("num_iterations",),
    )


def lr_multiplier(progress: float) -> float:
    """Constant for the first 80% of the epoch, then linearly down to 0."""
    return 1.0 if progress < 0.8 else max(0.0, 1 - (progress - 0.8) / 0.2)


def main(argv=None) -> dict:
    return run_training(train, parse_args(argv))


def train(args, rank, world_size, device, reporter) -> dict:
    autocast = autocast_for(device, args.dtype)
    model, tokenizer, base_meta = load_model("base", device, phase="train", model_tag=args.model_tag, step=args.step)
    T = args.max_seq_len or model.config.sequence_len
    B = args.device_batch_size
    tokens_per_fwdbwd = B * T * world_size
    accum_steps = grad_accum_steps(args.total_batch_size, tokens_per_fwdbwd)
    optimizers = training.make_optimizers(model, args)

    checkpoint_dir = training.checkpoint_dir_of("mid", args, model)
    step, meta, loader_state = training.resume_if_asked(args, checkpoint_dir, model, optimizers, device, rank,
                                                        world_size, "mid-training")
    start_step, val_bpb = step, meta.get("val_bpb")

    train_set, val_set = mid_train_mixture(args.data_dir, seed=args.seed), mid_train_val(args.data_dir)
    print0(f"mixture: {len(train_set):,} conversations; val: {len(val_set):,}; grad accumulation {accum_steps}")
    train_loader = ConversationTokenLoader(tokenizer, train_set, B, T, device, rank, world_size, loader_state)
    token_bytes = get_token_bytes(device=device)
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd)

    def progress() -> float:
        if args.num_iterations > 0:
            return step / args.num_iterations
        return train_loader.progress()

    def is_last_step() -> bool:
        done = torch.tensor(int(progress() >= 1.0), device=device)
        if is_distributed():  # ranks must agree, or one would wait in a collective forever
            dist.all_reduce(done, op=dist.ReduceOp.MAX)
        return bool(done.item())

    losses: list[float] = []
    state_before_xy = train_loader.state_dict()
    progress_before = train_loader.progress()
    x, y = next(train_loader)
    if args.num_iterations > 0:
        planned_steps = args.num_iterations - step
    else:  # one epoch of the mixture: what one batch advanced the loader says how many steps remain
        per_batch = max(train_loader.progress() - progress_before, 1e-9)
        planned_steps = max(0, round((1.0 - progress_before) / (per_batch * accum_steps)))
    compiler = compile_policy.compile_for_run(
        model, args.compile, device, args.dtype or default_dtype(device), B, T, world_size, planned_steps)
    smooth, tok_per_sec = 0.0, 0.0
    while True:
        last_step = is_last_step()
        if last_step or training.due(args.eval_every, step):
            model.eval()
            with autocast:
                val_loader = ConversationTokenLoader(tokenizer, val_set, B, T, device, rank, world_size)
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            reporter.metrics(step, val_bpb=val_bpb)
            model.train()
        if last_step or (step > start_step and training.due(args.save_every, step)):
            meta = {"step": step, "val_bpb": val_bpb, "model_config": model.config.to_dict(),
                    "user_config": vars(args), "world_size": world_size, "base_checkpoint_step": base_meta.get("step"),
                    **loader_states_meta(state_before_xy), "progress": progress(), "final": last_step,
                    "num_iterations": args.num_iterations if args.num_iterations > 0 else None}
            training.save_step(checkpoint_dir, step, model, optimizers, meta, rank)
        if last_step:
            break

        t0 = training.synced_clock(device)
        loss, x, y, state_before_xy = training.accumulate(compiler.model, train_loader, x, y, accum_steps, autocast)
        lrm = lr_multiplier(progress())
        training.optimizer_step(model, optimizers, lrm)
        dt = training.synced_clock(device) - t0
        step += 1
        compiler.step_done(dt, planned_steps - (step - start_step))
        smooth = 0.9 * smooth + 0.1 * loss.item()
        losses.append(smooth / (1 - 0.9**step))
        tok_per_sec = args.total_batch_size / dt
        if step % args.log_every == 0:
            print0(f"step {step:05d} ({100 * progress():.1f}%) | loss {losses[-1]:.4f} | lrm {lrm:.2f} | "
                   f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f}")
            reporter.metrics(step, loss=losses[-1], progress=progress())

    compiler.finish(rank == 0)
    summary = {"checkpoint_dir": str(checkpoint_dir), "step": step, "val_bpb": val_bpb,
               "final_loss": losses[-1] if losses else None, "tok_per_sec": tok_per_sec, "losses": losses}
    training.report_summary(reporter, summary)
    return summary


if __name__ == "__main__":
    main()
