"""
Sample continuations from a saved checkpoint (base models complete text; chat models use chat_cli).

    python -m nanochat.sample --source=base --prompt="The capital of France is" --num-samples=3
"""

from __future__ import annotations

import argparse

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type
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
    parser.add_argument("--device-type", default="")
    args = parser.parse_args(argv)

    device = torch.device(args.device_type or autodetect_device_type())
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    print(f"loaded {args.source} checkpoint step {meta.get('step')} (val bpb {meta.get('val_bpb')})")
    engine = Engine(model, tokenizer)
    outputs = []
    for prompt in args.prompt or ["The meaning of life is"]:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        rows, _ = engine.generate_batch(ids, num_samples=args.num_samples, max_tokens=args.max_tokens,
                                        temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        texts = [tokenizer.decode(row[1:]) for row in rows]
        for text in texts:
            print(f"--- {text!r}")
        outputs.append(texts)
    return outputs


if __name__ == "__main__":
    main()
