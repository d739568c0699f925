"""
Sample from a saved checkpoint: base models complete text; with --chat, the prompt is a user message and the
reply is the assistant's turn (with calculator tool use), as a mid or SFT model expects.

    python -m nanochat.sample --source=base --prompt="The capital of France is" --num-samples=3
    python -m nanochat.sample --source=sft --chat --prompt="What is 12 times 7?"
"""

from __future__ import annotations

import argparse

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import SERVING_DTYPES, autodetect_device_type, serving_dtype
from nanochat.engine import Engine


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description="Sample text from a nanochat checkpoint")
    parser.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"])
    parser.add_argument("--model-tag", default=None, help="e.g. d20 (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="default: the last saved step")
    parser.add_argument("--prompt", action="append", help="repeat for several prompts")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--chat", action="store_true", help="treat each prompt as a user message")
    parser.add_argument("--device-type", default="")
    parser.add_argument("--dtype", default="auto", choices=SERVING_DTYPES,
                        help="weights' dtype (auto: bf16 on CUDA and bf16-capable CPUs, else fp32)")
    args = parser.parse_args(argv)

    device = torch.device(args.device_type or autodetect_device_type())
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    score = {k: meta[k] for k in ("val_bpb", "val_loss") if meta.get(k) is not None}
    model.prepare_for_inference(serving_dtype(device, args.dtype))
    print(f"loaded {args.source} checkpoint step {meta.get('step')} {score}, {model.lm_head.weight.dtype}")
    engine = Engine(model, tokenizer)
    outputs = []
    for prompt in args.prompt or ["The meaning of life is"]:
        if args.chat:
            conversation = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]}
            ids = tokenizer.render_for_completion(conversation)
        else:
            ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        rows, _ = engine.generate_batch(ids, num_samples=args.num_samples, max_tokens=args.max_tokens,
                                        temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        # Base: show prompt + completion. Chat: show only the assistant's reply.
        texts = [tokenizer.decode(row[len(ids):] if args.chat else row[1:]) for row in rows]
        for text in texts:
            print(f"--- {prompt!r} -> {text!r}" if args.chat else f"--- {text!r}")
        outputs.append(texts)
    return outputs


if __name__ == "__main__":
    main()
