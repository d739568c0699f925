"""
Pretrain the base model.

    python -m nanochat.base_train --depth=4 --max-seq-len=256 --device-batch-size=8 --total-batch-size=4096
    torchrun --standalone --nproc_per_node=8 -m nanochat.base_train --depth=20

Model width and heads follow from --depth; the run length from --num-iterations, or from a tokens:params
ratio (Chinchilla, 20 by default). The total batch is counted in tokens and filled with gradient accumulation
when device_batch x seq_len x world_size is smaller. Saves model + optimizer shards + dataloader position, and
--resume continues bit for bit where a run stopped.
"""

from __future__ import annotations

import argparse
import math

import torch

from nanochat import cli, compile_policy, training
from nanochat.checkpoint_manager import loader_states_meta
from nanochat.common import autocast_for, default_dtype, gpu_peak_flops, grad_accum_steps, print0
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import DistributedTokenLoader
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.pipes import run_training
from nanochat.tokenizer import get_token_bytes, get_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain a nanochat base model")
    p.add_argument("--run", default="dummy", help="run name (for logs)")
    cli.add_device_flags(p, "cuda|cpu|mps (default: autodetect)",
                     "bfloat16|float32 (default: bf16 on cuda and bf16-capable CPUs)")
    # model
    p.add_argument("--depth", type=int, default=20, help="number of transformer layers")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio")
    p.add_argument("--head-dim", type=int, default=128, help="target attention head size")
    p.add_argument("--n-kv-head", type=int, default=0, help="key/value heads for GQA (default: = n_head)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    # horizon
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps")
    p.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per parameter")
    # batch
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    # optimization
    cli.add_optimizer_flags(p)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    cli.add_run_flags(p)  # --compile, --seed, --log-every
    # evaluation / output
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=-1, help="-1: only at the end")
    p.add_argument("--model-tag", default="", help="checkpoint subdirectory (default d<depth>)")
    p.add_argument("--data-dir", default=None, help="shard directory (default $NANOCHAT_DATA_DIR)")
    cli.add_resume_flags(p, "checkpoint of this model tag")
    # CORE during training, as the original's --core-metric-every: the score goes into that step's meta (saved when
    # the step is a save step) and to Dagster as a progress message. The final CORE is base_eval's job.
    p.add_argument("--core-metric-every", type=int, default=-1, help="CORE every N steps (-1: off)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="CORE examples per task (-1: all)")
    return cli.check_ranges(
        p, p.parse_args(argv),
        positive=("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "total_batch_size",
                  "eval_tokens", "log_every"),
        horizons=("num_iterations", "core_metric_max_per_task"),
        non_negative=("n_kv_head", "target_param_data_ratio", *cli.OPTIMIZER_FLAGS, "grad_clip"),
        fractions=("warmup_ratio", "warmdown_ratio", "final_lr_frac"),
    )


def model_config_for(args, vocab_size: int) -> GPTConfig:
    model_dim = args.depth * args.aspect_ratio
    n_head = max(1, math.ceil(model_dim / args.head_dim))
    while model_dim % n_head:  # keep heads an exact split of the width
        n_head += 1
    n_kv_head = args.n_kv_head or n_head
    return GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth,
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=model_dim)


def lr_multiplier(it: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final: float) -> float:
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final


def muon_momentum(it: int) -> float:
    frac = min(it / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def sample_prompts(model, tokenizer, max_tokens: int = 16) -> list[str]:
    prompts = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then",
               "The opposite of hot is", "The planets of the solar system are:"]
    engine = Engine(model, tokenizer)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        rows, _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0)
        out.append(tokenizer.decode(rows[0][1:]))
    return out


def main(argv=None) -> dict:
    return run_training(train, parse_args(argv))


def core_eval_bundle(args, rank: int) -> str | None:
    """The eval bundle for --core-metric-every, or None (off, or no bundle: training goes on without CORE)."""
    if args.core_metric_every <= 0:
        return None
    from nanochat.base_eval import locate_bundle  # base_eval imports this module: import it when asked for

    bundle, why = locate_bundle(None, rank)
    if bundle is None:
        print0(f"--core-metric-every={args.core_metric_every}: CORE skipped during training: {why}")
    return bundle


def train(args, rank, world_size, device, reporter) -> dict:
    user_config, master = vars(args).copy(), rank == 0
    autocast = autocast_for(device, args.dtype)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    config = model_config_for(args, tokenizer.get_vocab_size())
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"model config: {config.to_dict()}; parameters: {num_params:,}; FLOPs/token: {flops_per_token:.3e}")

    # Batch bookkeeping: total batch in tokens, gradient accumulation to reach it.
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size
    accum_steps = grad_accum_steps(args.total_batch_size, tokens_per_fwdbwd)
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_param_data_ratio > 0:
        num_iterations = max(1, int(args.target_param_data_ratio * num_params) // args.total_batch_size)
    else:
        raise SystemExit("set --num-iterations or --target-param-data-ratio")
    print0(f"grad accumulation steps: {accum_steps}; iterations: {num_iterations:,}; "
           f"tokens: {num_iterations * args.total_batch_size:,}")

    optimizers = training.make_optimizers(model, args)
    adamw, muon = optimizers

    checkpoint_dir = training.checkpoint_dir_of("base", args, model)
    step, meta, loader_state = training.resume_if_asked(args, checkpoint_dir, model, optimizers, device, rank,
                                                        world_size)
    start_step = step
    loop_state = meta["loop_state"] if meta else {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0,
                                                  "total_training_time": 0.0}
    val_bpb = meta.get("val_bpb")

    compiler = compile_policy.compile_for_run(
        model, args.compile, device, args.dtype or default_dtype(device), args.device_batch_size, args.max_seq_len,
        world_size, num_iterations - step)

    def loader(split, state=None):
        return DistributedTokenLoader(tokenizer, args.device_batch_size, args.max_seq_len, split, device, rank,
                                      world_size, args.data_dir, state)

    train_loader = loader("train", loader_state)
    # Batches are prefetched one ahead; a checkpoint records where the prefetched batch (x, y) starts, so a
    # resumed run trains on exactly that batch next.
    state_before_xy = train_loader.state_dict()
    x, y = next(train_loader)

    smooth_loss = loop_state["smooth_train_loss"]
    total_time = loop_state["total_training_time"]
    history: list[dict] = []
    tok_per_sec = flops_per_sec = mfu = 0.0
    peak = gpu_peak_flops(device)
    samples: list[str] = []
    core_bundle = core_eval_bundle(args, rank)
    while True:
        last_step = step == num_iterations
        core = None
        if core_bundle and start_step < step < num_iterations and training.due(args.core_metric_every, step):
            core = evaluate_core(model, tokenizer, device, core_bundle, args.core_metric_max_per_task,
                                 autocast=autocast)
            print0(f"step {step:05d} | {core['core_label']} {core['core']:.4f}")
            reporter.metrics(step, core=core["core"], core_label=core["core_label"],
                             tokens_seen=step * args.total_batch_size)
        if last_step or training.due(args.eval_every, step):
            model.eval()
            eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
            with autocast:
                val_bpb = evaluate_bpb(model, loader("val"), eval_steps, token_bytes)
            loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            reporter.metrics(step, val_bpb=val_bpb)
            model.train()
        if master and (last_step or (step > 0 and training.due(args.sample_every, step))):
            model.eval()
            with autocast:
                samples = sample_prompts(model, tokenizer)
            for s in samples:
                print0(f"  sample: {s!r}")
            model.train()
        if last_step or (step > start_step and training.due(args.save_every, step)):
            loop_state.update(smooth_train_loss=smooth_loss, total_training_time=total_time)
            meta = {
                "step": step, "val_bpb": val_bpb, "model_config": config.to_dict(), "user_config": user_config,
                "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
                "total_batch_size": args.total_batch_size, "world_size": world_size,
                **loader_states_meta(state_before_xy), "loop_state": loop_state,
                "num_iterations": num_iterations, "final": last_step,
            }
            if core is not None:
                meta["core"] = core
            training.save_step(checkpoint_dir, step, model, optimizers, meta, rank)
        if last_step:
            break

        # One optimizer step: accum_steps micro-batches, then AdamW + Muon.
        t0 = training.synced_clock(device)
        train_loss, x, y, state_before_xy = training.accumulate(compiler.model, train_loader, x, y, accum_steps,
                                                                autocast)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        training.optimizer_step(model, optimizers, lrm)
        dt = training.synced_clock(device) - t0
        step += 1
        compiler.step_done(dt, num_iterations - step)

        # Logging: EMA of the train loss (debiased), throughput, FLOP/s and (on a known GPU) MFU.
        beta = 0.9
        smooth_loss = beta * smooth_loss + (1 - beta) * train_loss.item()
        debiased = smooth_loss / (1 - beta**step)
        tok_per_sec = args.total_batch_size / dt
        flops_per_sec = flops_per_token * args.total_batch_size / dt
        mfu = 100 * flops_per_sec / (peak * world_size) if peak else 0.0
        if step > 10:
            total_time += dt  # the first steps include compilation/warm-up
        history.append({"step": step, "loss": debiased, "lrm": lrm, "dt": dt})
        if step % args.log_every == 0 or step == num_iterations:
            mfu_text = f" | mfu {mfu:.2f}%" if peak else ""
            print0(f"step {step:05d}/{num_iterations:05d} | loss {debiased:.6f} | lrm {lrm:.2f} | "
                   f"dt {dt * 1000:.1f}ms | tok/s {tok_per_sec:,.0f} | flop/s {flops_per_sec:.3e}{mfu_text}")
            reporter.metrics(step, loss=debiased, tok_per_sec=tok_per_sec, mfu=mfu)

    compiler.finish(master)
    summary = {
        "checkpoint_dir": str(checkpoint_dir), "step": step, "val_bpb": val_bpb,
        "min_val_bpb": loop_state["min_val_bpb"], "final_loss": history[-1]["loss"] if history else None,
        "num_params": num_params, "tok_per_sec": tok_per_sec, "flops_per_sec": flops_per_sec, "mfu": mfu,
        "total_training_time": total_time, "samples": samples, "losses": [h["loss"] for h in history],
    }
    training.report_summary(reporter, summary)
    if device.type == "cuda":
        print0(f"peak memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return summary


if __name__ == "__main__":
    main()

