"""A one-layer GPT for the bad-input tests: small enough to build, save and load in a moment."""

from __future__ import annotations

import torch

from nanochat.gpt import GPT, GPTConfig

CONFIG = GPTConfig(sequence_len=32, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)


def tiny_model(config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model
