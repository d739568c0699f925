"""
The GPT model, compatible with the original nanochat's late-2025 checkpoints.

Notable choices (all as in the original, so its checkpoints load and give the same logits):
- rotary embeddings (RoPE, base 10k, half-split rotation), no positional embedding table
- QK-norm: parameter-free RMSNorm on queries and keys after RoPE
- grouped-query attention: n_kv_head divides n_head (equal by default)
- parameter-free RMSNorm after the embedding, before every block and before lm_head
- ReLU² MLP, no biases anywhere, untied embedding and lm_head
- logits soft-capped at 15 with tanh
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.chunked_loss import softcap_cross_entropy

LOGIT_SOFTCAP = 15.0
ROPE_BASE = 10_000


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # number of query heads
    n_kv_head: int = 6  # number of key/value heads (GQA when < n_head)
    n_embd: int = 768

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head_dim={self.n_embd // self.n_head} must be even for rotary embeddings")

    def to_dict(self) -> dict:
        return asdict(self)


def norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free RMSNorm: no learnable gain, so nothing to store in the checkpoint.
    if x.is_cuda:
        return F.rms_norm(x, (x.size(-1),))  # a fused kernel
    # On CPU F.rms_norm runs as ~12 small ops (dtype round trips included); this is the same arithmetic in 5,
    # bit-identical (tests/test_bench.py) and 2.5x faster on a 16 x 256 x 256 activation.
    # Like F.rms_norm it accumulates in fp32 and uses fp32's epsilon whatever the input dtype.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)).to(x.dtype)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (not interleaved pairs); x is (B, T, H, D), cos/sin (1, T, 1, D/2), or
    the serving tables (1, T, 1, D) from GPT.rotary_tables: [cos, cos] and [sin, -sin] in x's dtype."""
    d = x.shape[3] // 2
    if cos.size(-1) == x.size(-1):
        # The same products and sums as below, bit for bit (y2 adds the same two terms the other way round), in
        # 4 kernels instead of 8 and without converting the bf16 tables on every decode step.
        return x * cos + torch.cat([x[..., d:], x[..., :d]], dim=3) * sin
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=3).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        # Set by fuse_qkv() for inference: one (H + 2 Hkv) x D by n_embd matrix whose row blocks c_q, c_k and c_v's
        # weights are views of. Non-persistent: checkpoints keep the three separate keys.
        self.register_buffer("qkv_weight", None, persistent=False)

    def fuse_qkv(self) -> None:
        """One matmul for q, k and v instead of three; the parameters become views of the fused matrix, so the
        state dict (keys, shapes, values) is unchanged and load_state_dict still writes through to it. Called again
        (after a cast or a move), it rebuilds the fused matrix from the parameters as they are."""
        fused = torch.cat([self.c_q.weight.detach(), self.c_k.weight.detach(), self.c_v.weight.detach()])
        nq, nk = self.c_q.weight.size(0), self.c_k.weight.size(0)
        self.c_q.weight = nn.Parameter(fused[:nq], requires_grad=False)
        self.c_k.weight = nn.Parameter(fused[nq : nq + nk], requires_grad=False)
        self.c_v.weight = nn.Parameter(fused[nq + nk :], requires_grad=False)
        self.qkv_weight = fused

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache=None) -> torch.Tensor:
        B, T, _ = x.size()
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        cos, sin = cos_sin
        if self.qkv_weight is not None:
            # Inference: one matmul, then rotary and QK-norm on queries and keys together (both act per head).
            qkv = F.linear(x, self.qkv_weight)
            qk = norm(apply_rotary_emb(qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D), cos, sin))
            q, k = qk[:, :, :H], qk[:, :, H:]
            v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D)
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)
            q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
            q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        if kv_cache is not None:
            # The cache returns every key/value up to and including this chunk.
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        enable_gqa = self.n_head != self.n_kv_head
        if Tq == Tk:
            # Training, or prefill into an empty cache: ordinary causal attention.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        elif Tq == 1:
            # One new token attends to everything before it: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=enable_gqa)
        else:
            # A chunk appended to a non-empty cache: see the whole prefix, causal within the chunk.
            prefix = Tk - Tq
            mask = torch.ones((Tq, Tk), dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)

    def forward_at(self, x: torch.Tensor, pos: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                   kv_cache=None) -> torch.Tensor:
        """forward's output at positions pos (B, W) of each row only, (B, W, n_embd): keys and values for every
        position (into kv_cache too), queries and attention for those W. The same arithmetic per position (a
        matmul over fewer rows may round its last bit differently)."""
        B, T, _ = x.size()
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        cos, sin = cos_sin
        k = norm(apply_rotary_emb(self.c_k(x).view(B, T, Hkv, D), cos, sin)).transpose(1, 2)
        v = self.c_v(x).view(B, T, Hkv, D).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        W = pos.size(1)
        if W == 0:
            return x.new_zeros(B, 0, self.n_embd)
        xq = x.gather(1, pos.unsqueeze(-1).expand(B, W, x.size(-1)))
        q = norm(apply_rotary_emb(self.c_q(xq).view(B, W, H, D), cos[0, pos], sin[0, pos])).transpose(1, 2)
        # Query at position p (after the cache's Tk - T) sees keys up to Tk - T + p.
        Tk = k.size(2)
        mask = torch.arange(Tk, device=x.device) <= (pos + (Tk - T)).unsqueeze(-1)  # (B, W, Tk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=H != Hkv)
        return self.c_proj(y.transpose(1, 2).reshape(B, W, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos_sin, kv_cache=None) -> torch.Tensor:
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x

    def forward_at(self, x: torch.Tensor, pos: torch.Tensor, cos_sin, kv_cache=None) -> torch.Tensor:
        """forward's output at positions pos (B, W) of each row only (keys/values still from every position)."""
        xs = x.gather(1, pos.unsqueeze(-1).expand(*pos.shape, x.size(-1)))
        xs = xs + self.attn.forward_at(norm(x), pos, cos_sin, kv_cache)
        return xs + self.mlp(norm(xs))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 10x the training length so generation can run past it. They are derived
        # data, so non-persistent: checkpoints never carry them.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("lm_head_t", None, persistent=False)  # prepare_for_inference's decode layout

    def init_weights(self) -> None:
        """The original init: scaled normal Linears, N(0,1) embedding, zeroed output projections and lm_head."""
        self.apply(self._init_module)
        torch.nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
        self.init_rotary()
        if self.transformer.wte.weight.device.type == "cuda":
            # Embedding lookups don't need fp32 masters; bf16 halves their memory (the original does this).
            self.transformer.wte.to(dtype=torch.bfloat16)

    def init_rotary(self) -> None:
        """(Re)compute the rotary buffers: a model built on the meta device then `to_empty`'d has garbage ones."""
        cos, sin = self._precompute_rotary(self.rotary_seq_len, self.config.n_embd // self.config.n_head)
        self.cos, self.sin = cos, sin

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=1.0)

    def _precompute_rotary(self, seq_len: int, head_dim: int, base: int = ROPE_BASE, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        # Stored in bf16 as the original does, so logits match its checkpoints bit for bit in spirit.
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]

    def prepare_for_inference(self, dtype: torch.dtype) -> GPT:
        """Serving form, done once at load: weights cast to dtype (no autocast needed), q/k/v fused, eval mode.
        State-dict keys and shapes are unchanged; the model is for inference only afterwards. Call it again after
        loading other weights (the fused q/k/v follow load_state_dict, the fp32 lm_head copy does not)."""
        with torch.no_grad():
            for p in self.parameters():
                p.requires_grad_(False)
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
        for block in self.transformer.h:
            block.attn.fuse_qkv()
        # fp32 on CPU: F.linear of one row against the (vocab, n_embd) lm_head ran at half the speed of x @ W^T
        # stored contiguous, and of 2-8 rows at half the speed of W @ x^T (MKL, docs/performance.md). Keeping
        # both layouts costs one more copy of lm_head (bf16 and CUDA paths were not measured: F.linear there).
        fp32_cpu = dtype == torch.float32 and self.get_device().type == "cpu"
        self.lm_head_t = self.lm_head.weight.detach().t().contiguous() if fp32_cpu else None
        return self.eval()

    def rotary_tables(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of positions [0, seq_len) in apply_rotary_emb's one-pass form, in dtype: computed
        once per KV cache rather than converted on every decode step."""
        if seq_len > self.cos.size(1):
            raise ValueError(f"{seq_len} positions exceed the rotary table ({self.cos.size(1)} positions)")
        cos, sin = self.cos[:, :seq_len], self.sin[:, :seq_len]
        return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([sin, -sin], dim=-1).to(dtype)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per non-embedding parameter plus the attention score/value matmuls."""
        nparams_embedding = self.transformer.wte.weight.numel()
        l, h = self.config.n_layer, self.config.n_head
        q, t = self.config.n_embd // self.config.n_head, self.config.sequence_len
        return 6 * (self.num_params() - nparams_embedding) + 12 * l * h * q * t

    def setup_optimizers(
        self,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
    ) -> list[torch.optim.Optimizer]:
        """[AdamW for wte and lm_head, Muon for every block matrix], as the original groups them."""
        from nanochat.adamw import DistAdamW
        from nanochat.muon import Muon

        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        n_all = len(list(self.parameters()))
        if len(matrix_params) + len(embedding_params) + len(lm_head_params) != n_all:
            raise RuntimeError("setup_optimizers: some parameters belong to no optimizer group")
        # The AdamW learning rates were tuned at width 768; scale them as 1/sqrt(width).
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adamw = DistAdamW(
            [
                dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
                dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
            ],
            betas=(0.8, 0.95),
            eps=1e-10,
            weight_decay=weight_decay,
        )
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
        optimizers: list[torch.optim.Optimizer] = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]  # LR schedules scale from this
        return optimizers

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache=None,
        loss_reduction: str = "mean",
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) when targets is None ((B, 1, V) with last_only), else the cross-entropy loss
        (ignore_index -1)."""
        x = self.hidden_states(idx, kv_cache)
        if last_only and targets is None:
            # Prefill needs only the next token's logits; the unembedding of every prompt position would cost
            # T x n_embd x vocab FLOPs (at vocab 65,536 several times the whole transformer's).
            x = x[:, -1:]

        if targets is not None:
            # lm_head + soft-cap + cross-entropy in blocks of rows (nanochat/chunked_loss.py): the same loss, in
            # fp32, without the (tokens x vocab) logits in memory.
            return softcap_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                         LOGIT_SOFTCAP, reduction=loss_reduction)
        return self.unembed(x)

    def hidden_states(self, idx: torch.Tensor, kv_cache=None, at: torch.Tensor | None = None) -> torch.Tensor:
        """The final normed activations (B, T, n_embd), before lm_head: callers that need the logits of only a
        few positions (CORE scores continuation tokens) unembed just those. With at (B, W) positions: only those
        positions' activations (B, W, n_embd), the last block computing keys and values for every position and
        the rest (queries, attention, MLP: ~5/6 of its work) for those alone; W = 0 fills kv_cache only."""
        T = idx.size(1)
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        # A KV cache may carry its own tables (GPT.rotary_tables, built by the Engine for the cache's length).
        rotary = getattr(kv_cache, "rotary", None)
        cos, sin = rotary or (self.cos, self.sin)
        if T0 + T > cos.size(1):
            where = "the KV cache" if rotary else "the rotary table"
            raise ValueError(f"sequence of {T0 + T} tokens exceeds {where} ({cos.size(1)} positions)")
        cos_sin = cos[:, T0 : T0 + T], sin[:, T0 : T0 + T]
        x = self.transformer.wte(idx)
        if x.dtype != self.lm_head.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # A bf16 embedding (as on CUDA) feeding fp32 layers without autocast: match the layers' dtype.
            x = x.to(self.lm_head.weight.dtype)
        x = norm(x)
        blocks = self.transformer.h
        for block in blocks if at is None else blocks[:-1]:
            x = block(x, cos_sin, kv_cache)
        if at is not None:
            x = blocks[-1].forward_at(x, at, cos_sin, kv_cache)
        x = norm(x)
        return x

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits of hidden states x (..., n_embd)."""
        rows = x.numel() // x.size(-1)
        if self.lm_head_t is not None and rows <= 8:  # decode in the serving form: see prepare_for_inference
            x2 = x.reshape(rows, x.size(-1))
            logits = x2 @ self.lm_head_t if rows == 1 else (self.lm_head.weight @ x2.t()).t()
            logits = logits.reshape(*x.shape[:-1], logits.size(-1))
        else:
            logits = self.lm_head(x)
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    @torch.inference_mode()
    def generate(
        self,
        tokens: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[int]:
        """Naive streaming generation: recompute the whole sequence every step. The reference for Engine."""
        if not tokens:
            raise ValueError("generate needs at least one prompt token (e.g. the BOS id)")
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            next_id = sample_next_token(logits, rng, temperature, top_k)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()


def sample_next_token(
    logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """Sample one token per row of (B, V) logits -> (B, 1). temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float()
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return idx.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)
