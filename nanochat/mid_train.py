"""
Mid-training: teach a base model the conversation format, tool use (calculator), multiple choice and spelling,
by continuing pretraining on a mixture of rendered conversations (loss on every token), for one epoch.

    python -m nanochat.mid_train --device-batch-size=16
    torchrun --standalone --nproc_per_node=8 -m nanochat.mid_train

Loads the latest base checkpoint (or --model-tag/--step), writes <base_dir>/mid_checkpoints/<tag>/.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from nanochat import compile_policy
from nanochat.checkpoint_manager import (
    checkpoint_dir_for,
    load_model,
    loader_states_meta,
    resume_training,
    save_checkpoint,
)
from nanochat.cli import check_ranges
from nanochat.common import (
    autocast_for,
    default_dtype,
    grad_accum_steps,
    is_distributed,
    print0,
    scale_initial_lr,
    set_lr_multiplier,
    synchronize,
)
from nanochat.dataloader import ConversationTokenLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.pipes import loss_curve, run_training
from nanochat.tasks import mid_train_mixture, mid_train_val
from nanochat.tokenizer import get_token_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mid-train a base model on a conversation mixture")
    p.add_argument("--device-type", default="")
    p.add_argument("--dtype", default="", help="bfloat16|float32 (default: bf16 on cuda)")
    p.add_argument("--model-tag", default=None, help="base model tag to start from (default: largest)")
    p.add_argument("--step", type=int, default=None, help="base checkpoint step (default: last)")
    p.add_argument("--max-seq-len", type=int, default=0, help="default: the base model's sequence_len")
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    p.add_argument("--num-iterations", type=int, default=-1, help="default: one epoch of the mixture")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--init-lr-frac", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--data-dir", default=None, help="local task data (default: hub, else shared data)")
    p.add_argument("--resume", action="store_true", help="continue from the last mid checkpoint of this tag")
    p.add_argument("--resume-from-step", type=int, default=-1, help="continue from this saved step (implies --resume)")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                   help="torch.compile (auto: when the planned steps amortise it; see nanochat/compile_policy.py)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-every", type=int, default=1)
    return check_ranges(
        p, p.parse_args(argv),
        positive=("device_batch_size", "total_batch_size", "eval_tokens", "init_lr_frac", "log_every"),
        non_negative=("max_seq_len", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay"),
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
    optimizers = model.setup_optimizers(args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay)
    scale_initial_lr(optimizers, args.init_lr_frac)

    tag = args.model_tag or f"d{model.config.n_layer}"
    checkpoint_dir = checkpoint_dir_for("mid", tag)
    step, loader_state, val_bpb = 0, None, None
    if args.resume or args.resume_from_step >= 0:
        # The last complete step unless one is named (a kill mid-save leaves a newer, partial one); each rank its
        # own data position.
        from_step = args.resume_from_step if args.resume_from_step >= 0 else None
        step, meta, loader_state = resume_training(checkpoint_dir, model, optimizers, device, rank, world_size,
                                                   from_step)
        val_bpb = meta.get("val_bpb")
        print0(f"resumed mid-training from {checkpoint_dir} step {step}")
    start_step = step  # the step we resumed from is on disk already: not saved (or scored) again

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
    train_model, compile_decision = compile_policy.compile_for_run(
        model, args.compile, device, args.dtype or default_dtype(device), B, T, world_size, planned_steps,
        args.total_batch_size)
    step_times: list[float] = []
    smooth, tok_per_sec = 0.0, 0.0
    while True:
        last_step = is_last_step()
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            with autocast:
                val_loader = ConversationTokenLoader(tokenizer, val_set, B, T, device, rank, world_size)
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            reporter.metrics(step, val_bpb=val_bpb)
            model.train()
        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            meta = {"step": step, "val_bpb": val_bpb, "model_config": model.config.to_dict(),
                    "user_config": vars(args), "world_size": world_size, "base_checkpoint_step": base_meta.get("step"),
                    **loader_states_meta(state_before_xy), "progress": progress(), "final": last_step,
                    "num_iterations": args.num_iterations if args.num_iterations > 0 else None}
            save_checkpoint(checkpoint_dir, step, model.state_dict(), [o.state_dict() for o in optimizers],
                            meta, rank=rank)
        if last_step:
            break

        synchronize(device)
        t0 = time.time()
        for _ in range(accum_steps):
            with autocast:
                loss = train_model(x, y)
            (loss / accum_steps).backward()
            state_before_xy = train_loader.state_dict()
            x, y = next(train_loader)
        lrm = lr_multiplier(progress())
        set_lr_multiplier(optimizers, lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.time() - t0
        step_times.append(dt)
        step += 1
        smooth = 0.9 * smooth + 0.1 * loss.item()
        losses.append(smooth / (1 - 0.9**step))
        tok_per_sec = args.total_batch_size / dt
        if step % args.log_every == 0:
            print0(f"step {step:05d} ({100 * progress():.1f}%) | loss {losses[-1]:.4f} | lrm {lrm:.2f} | "
                   f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f}")
            reporter.metrics(step, loss=losses[-1], progress=progress())

    if rank == 0:
        compile_policy.record(compile_decision.key, compile_decision.compile, step_times)
    summary = {"checkpoint_dir": str(checkpoint_dir), "step": step, "val_bpb": val_bpb,
               "final_loss": losses[-1] if losses else None, "tok_per_sec": tok_per_sec, "losses": losses}
    reporter.result({**{k: v for k, v in summary.items() if k != "losses"}, "loss_curve": loss_curve(losses)})
    return summary


if __name__ == "__main__":
    main()
