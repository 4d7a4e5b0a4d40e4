"""The eager reference transformer: LLaDA's "llama" block, bidirectional, as DiMOO uses it.

State-dict keys match the Hugging Face checkpoint (``model.transformer.*``), so
``load_state_dict`` takes the published safetensors as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, key_padding
from .attention import context as attention_context
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics even for bf16/fp16 activations, as the official block does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, head_dim] in fp32 for positions 0..seq_len-1 (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [L, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [L, head_dim]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, head_dim]; rotation in fp32, result in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # gated branch (SiLU)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # linear branch
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin, attn_bias, attention: str = "sdpa"):
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # GQA: share each kv head across its query group
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # Bidirectional: no causal mask. attn_bias (attention.key_padding: [B, 1, 1, L] bias, or a
        # FlexAttention block mask) only hides left-padding keys.
        a = attend(q, k, v, attn_bias, attention)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


def key_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] bool (True = real token) -> additive SDPA bias [B, 1, 1, L] in ``dtype``: 0 for
    real keys, the dtype's most negative finite value for left padding.

    A float bias rather than the boolean mask: the ONNX exporter lowers SDPA with a *boolean*
    mask to Softmax -> IsNaN -> Where (its guard for fully masked rows), which materialises the
    [B, heads, L, L] weights a second time and can keep TensorRT from fusing the attention; a
    float mask lowers to a plain Add. No row here is fully masked (the image region is always
    real), so the guard was never needed, and exp(min - max) is exactly 0 as with -inf."""
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill_(~key_mask.bool(), torch.finfo(dtype).min)[:, None, None, :]


def run_trunk(wte: nn.Embedding, blocks: nn.ModuleList, ln_f: RMSNorm, input_ids: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None,
              attention: str = "sdpa") -> torch.Tensor:
    """Embedding -> blocks -> final norm, [B, L] ids -> [B, L, d]; the reference model and
    the engine graph both run the stack through here, so they cannot drift apart.
    The key-padding mask is built once here, not per layer. ``attention``: a resolved kernel
    (``attention.resolve``); the engine graph keeps the default, SDPA + bias, the portable path."""
    x = wte(input_ids)
    bias = None if key_mask is None else key_padding(key_mask, x.dtype, attention)
    with attention_context(attention):
        for block in blocks:
            x = block(x, cos, sin, bias, attention)
    return ln_f(x)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            self.ff_out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)


class _Wrapper(nn.Module):  # gives the checkpoint's "model." key prefix
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transformer = Transformer(cfg)


class DimooModel(nn.Module):
    """LLaDA/DiMOO transformer.

    ``forward(input_ids [B, L])`` -> full-vocabulary logits [B, L, V].
    ``forward(input_ids, key_mask, image_positions=pos [N])`` -> image-code logits
    [B, N, codebook]: hidden states are gathered at the image positions before the head,
    and the head is sliced to the codebook rows, so the [B, L, V] tensor never exists.

    ``rope=(cos, sin)`` passes RoPE tables the caller owns (``EagerDenoiser`` keeps its own per
    sequence length). Without it, tables are computed for the call and dropped: the model keeps
    no table cache, since a cache on a module shared by several pipelines would be replaced under
    a CUDA graph that reads the old tables.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Wrapper(cfg)

    @property
    def head_weight(self) -> torch.Tensor:
        t = self.model.transformer
        return t.wte.weight if self.cfg.weight_tying else t.ff_out.weight

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh cos, sin [seq_len, head_dim] fp32 for this model's head_dim and theta."""
        return rope_tables(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device)

    def hidden(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None,
               rope: tuple[torch.Tensor, torch.Tensor] | None = None, attention: str = "sdpa") -> torch.Tensor:
        """Final-norm hidden states [B, L, d]."""
        t = self.model.transformer
        cos, sin = rope if rope is not None else self.rope(input_ids.shape[1], input_ids.device)
        return run_trunk(t.wte, t.blocks, t.ln_f, input_ids.long(), cos, sin, key_mask, attention)

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None,
                image_positions: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, attention: str = "sdpa") -> torch.Tensor:
        h = self.hidden(input_ids, key_mask, rope, attention)
        if image_positions is None:
            return F.linear(h, self.head_weight)
        lay = self.cfg.layout
        h = h.index_select(1, image_positions)  # [B, N, d]
        w = self.head_weight[lay.image_offset: lay.image_offset + lay.codebook]  # [codebook, d]
        return F.linear(h, w)  # [B, N, codebook]
