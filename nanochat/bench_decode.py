"""`python -m nanochat.bench decode`: the Engine's prefill and decode speed on a random model in its serving form
(GPT.prepare_for_inference), next to the copy probe (docs/performance.md)."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from nanochat.bench import (
    decode_bytes_per_step,
    device_and_dtype,
    last_level_cache_bytes,
    load_or_train_tokenizer,
    machine_info,
    memory_bandwidth,
    random_model,
    shared_texts,
)
from nanochat.common import autocast_for, synchronize
from nanochat.engine import Engine


def bench_decode(args, tokenizer=None) -> list[dict]:
    """Engine.generate at each batch size: prefill (prompt to first token) and decode (every later token)."""
    device, dtype = device_and_dtype(args)
    tokenizer = tokenizer or load_or_train_tokenizer(args.tokenizer_dir, args.vocab_size)
    model = random_model(args, tokenizer.get_vocab_size(), device, args.prompt_len + args.max_new_tokens)
    # A zero lm_head (the init) makes every token tie. Random rows instead, but zero for the special tokens:
    # with top-k sampling they are then never drawn, so no row stops early or enters tool mode mid-benchmark.
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    with torch.no_grad():
        model.lm_head.weight[-len(tokenizer.get_special_tokens()):] = 0
    model.eval()
    compute_dtype = getattr(torch, dtype)
    plain = getattr(args, "plain", False)
    if not plain:
        model.prepare_for_inference(compute_dtype)  # as served: weights in the dtype, q/k/v fused
    engine = Engine(model, tokenizer)
    text = " ".join(shared_texts(args.prompt_len * 8))
    prompt = tokenizer.encode(text, prepend="<|bos|>")[: args.prompt_len]
    autocast = autocast_for(device, dtype) if plain else nullcontext()
    bandwidth = memory_bandwidth(device)
    llc = last_level_cache_bytes()

    results = []
    for batch in args.batch_sizes:
        with autocast:
            for _ in engine.generate(prompt, batch, max_tokens=4, top_k=50):  # warm-up
                pass
            synchronize(device)
            t0 = time.perf_counter()
            steps = 0
            for _ in engine.generate(prompt, batch, max_tokens=args.max_new_tokens, top_k=50, seed=1):
                if steps == 0:
                    synchronize(device)
                    t_first = time.perf_counter()
                steps += 1
            synchronize(device)
            t_end = time.perf_counter()
        prefill_s, decode_s = t_first - t0, t_end - t_first
        # Decode step i (i = 1..steps-1) feeds the token at position prompt_len + i - 1, reading that many + 1.
        read = sum(decode_bytes_per_step(model, batch, len(prompt) + i, compute_dtype) for i in range(1, steps))
        weights_bytes = decode_bytes_per_step(model, batch, 0, compute_dtype)
        achieved = read / decode_s
        results.append({
            "bench": "decode", **machine_info(device), "device": device.type, "dtype": dtype, "depth": args.depth,
            "form": "plain (autocast, fp32 weights)" if plain else "serving (weights in dtype, fused q/k/v)",
            "params": model.num_params(), "batch": batch, "prompt_tokens": len(prompt), "new_tokens": steps,
            "prefill_ms": round(prefill_s * 1000, 2), "prefill_tok_per_sec": round(len(prompt) / prefill_s, 1),
            "decode_ms_per_step": round(1000 * decode_s / max(steps - 1, 1), 3),
            "decode_tok_per_sec": round(batch * (steps - 1) / decode_s, 1),
            "bytes_per_step": round(read / max(steps - 1, 1)), "achieved_bytes_per_sec": achieved,
            "memory_bandwidth": bandwidth, "ratio_to_bandwidth": round(achieved / bandwidth, 4),
            "weights_mib": round(weights_bytes / 2**20, 2), "last_level_cache_mib": (llc or 0) / 2**20,
            "weights_fit_in_cache": llc is not None and weights_bytes <= llc,
        })
    return results
