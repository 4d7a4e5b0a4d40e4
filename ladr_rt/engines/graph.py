"""The fixed-shape evaluation an engine is built from, as one ``nn.Module``.

    (input_ids [2B, L] int32, key_mask [2B, L] bool) -> logits [2B, N, codebook] fp32

It reuses the reference blocks (``model.py`` stays the only place that knows the
architecture) and bakes in what a fixed shape makes constant: the RoPE tables for L, the
image positions, and the head sliced to the codebook rows, so the exported graph carries
8192 head rows instead of 134548 and never forms a [2B, L, V] tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import Block, RMSNorm, rope_tables, run_trunk

INPUTS = ("input_ids", "key_mask")
OUTPUTS = ("logits",)


class EngineGraph(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_len: int, image_positions: torch.Tensor,
                 wte: nn.Embedding, blocks: nn.ModuleList, ln_f: RMSNorm, head: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.wte, self.blocks, self.ln_f = wte, blocks, ln_f
        self.head = nn.Parameter(head, requires_grad=False)  # [codebook, d]
        cos, sin = rope_tables(seq_len, cfg.head_dim, cfg.rope_theta, head.device)
        self.register_buffer("cos", cos, persistent=False)  # [L, head_dim] fp32
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("positions", image_positions.to(head.device), persistent=False)  # [N]

    @classmethod
    def from_model(cls, model, seq_len: int, image_positions: torch.Tensor) -> "EngineGraph":
        t, lay = model.model.transformer, model.cfg.layout
        head = model.head_weight[lay.image_offset: lay.image_offset + lay.codebook].detach().clone()
        return cls(model.cfg, seq_len, image_positions, t.wte, t.blocks, t.ln_f, head).eval().requires_grad_(False)

    @classmethod
    def random(cls, cfg: ModelConfig, seq_len: int, image_positions: torch.Tensor, dtype=torch.float32,
               seed: int = 0) -> "EngineGraph":
        """Random weights at any size without the full-vocabulary head (the export-size test)."""
        g = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
            blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        mods = nn.ModuleList([wte, blocks, ln_f]).to_empty(device="cpu").to(dtype)
        for p in mods.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 1.0 if p.shape[0] == cfg.vocab_size else p.shape[1] ** -0.5, generator=g)
        head = torch.empty(cfg.layout.codebook, cfg.d_model, dtype=dtype).normal_(0, cfg.d_model ** -0.5,
                                                                                   generator=g)
        return cls(cfg, seq_len, image_positions, wte, blocks, ln_f, head).eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # key_mask [2B, L] hides left-padding keys only; run_trunk turns it into one additive
        # float bias for every layer (model.key_bias: a boolean mask would export an IsNaN guard).
        x = run_trunk(self.wte, self.blocks, self.ln_f, input_ids, self.cos, self.sin, key_mask)  # [2B, L, d]
        h = x.index_select(1, self.positions)  # [2B, N, d]
        # The head runs in the model's dtype (as eager does); the engine boundary is fp32 so
        # every backend hands the sampler the same logits dtype.
        return F.linear(h, self.head).float()  # [2B, N, codebook]
