"""The eager reference transformer: LLaDA's "llama" block, bidirectional, as DiMOO uses it.

State-dict keys match the Hugging Face checkpoint (``model.transformer.*``), so
``load_state_dict`` takes the published safetensors as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x, cos, sin, attn_mask):
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # GQA: share each kv head across its query group
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # Bidirectional: no causal mask. attn_mask only hides left-padding keys.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


def run_trunk(wte: nn.Embedding, blocks: nn.ModuleList, ln_f: RMSNorm, input_ids: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Embedding -> blocks -> final norm, [B, L] ids -> [B, L, d]; the reference model and
    the engine graph both run the stack through here, so they cannot drift apart."""
    x = wte(input_ids)
    for block in blocks:
        x = block(x, cos, sin, attn_mask)
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
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Wrapper(cfg)
        self._rope: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    @property
    def head_weight(self) -> torch.Tensor:
        t = self.model.transformer
        return t.wte.weight if self.cfg.weight_tying else t.ff_out.weight

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0] != seq_len or self._rope[1] != device:
            cos, sin = rope_tables(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device)
            self._rope = (seq_len, device, cos, sin)
        return self._rope[2], self._rope[3]

    def hidden(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, L, d]."""
        t = self.model.transformer
        cos, sin = self.rope(input_ids.shape[1], input_ids.device)
        attn_mask = None
        if key_mask is not None:  # [B, L] True = real token -> [B, 1, 1, L] for SDPA
            attn_mask = key_mask.bool()[:, None, None, :]
        return run_trunk(t.wte, t.blocks, t.ln_f, input_ids.long(), cos, sin, attn_mask)

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None,
                image_positions: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(input_ids, key_mask)
        if image_positions is None:
            return F.linear(h, self.head_weight)
        lay = self.cfg.layout
        h = h.index_select(1, image_positions)  # [B, N, d]
        w = self.head_weight[lay.image_offset: lay.image_offset + lay.codebook]  # [codebook, d]
        return F.linear(h, w)  # [B, N, codebook]
