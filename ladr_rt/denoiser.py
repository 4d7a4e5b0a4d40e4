"""The denoiser: one call signature for every backend.

    denoiser(input_ids [2B, L], key_mask [2B, L], out [2B, N, codebook]) -> None

It writes image-code logits for every row into ``out`` (preallocated by the caller).
Backends (eager here; onnxruntime, tensorrt, torch-graph in ``engines/``) differ only in
how they fill ``out``; the step loop never asks which one it has.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .model import DimooModel


def canonical_device(device: str | torch.device) -> torch.device:
    """'cuda' -> 'cuda:<current>': tensors report an index, so device checks must compare with one."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


class Denoiser(Protocol):
    name: str
    device: torch.device
    logits_dtype: torch.dtype
    ids_dtype: torch.dtype

    def __call__(self, input_ids: torch.Tensor, key_mask: torch.Tensor, out: torch.Tensor) -> None: ...


class EagerDenoiser:
    """The reference model, batch-2 CFG, image-code logits only."""

    name = "eager"
    ids_dtype = torch.long

    def __init__(self, model: DimooModel, image_positions: torch.Tensor, attention: str = "auto"):
        from .attention import resolve

        self.model = model
        p = next(model.parameters())
        self.device, self.logits_dtype = p.device, p.dtype
        self.attention = resolve(attention, self.device)  # the kernel (attention.py); "auto": the device's default
        self.positions = image_positions.to(self.device)  # [N]
        # RoPE tables per sequence length, owned here and never replaced: a captured graph
        # reads them by address, and the model is shared with other denoisers (other L).
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [seq_len, head_dim] fp32, computed on the first call for this length.
        That first call is the warm-up every capture runs outside the graph, so the tables
        are never allocated from a graph's private pool."""
        if seq_len not in self._rope:
            self._rope[seq_len] = self.model.rope(seq_len, self.device)
        return self._rope[seq_len]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, key_mask: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(self.model(input_ids, key_mask, image_positions=self.positions, rope=self.rope(input_ids.shape[1]),
                             attention=self.attention))
