"""A palette "VQ decoder" for the testbed model: each code is one ``scale`` x ``scale`` tile.

It stands where DiMOO's diffusers VQModel stands (``vqvae/`` of a checkpoint, selected by
``_class_name`` in its config.json) and has the same ``decode`` signature, so the
pipeline treats both alike. Its state is stored as JSON: the palette (background first)
and, optionally, ``codes``: per code a palette index and a ``sub`` x ``sub`` bit mask
(bit ``sub * i + j`` lights sub-cell (i, j) in that colour; the rest is background).
Without ``codes``, code i is palette colour i, flat.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError


class PaletteVQ:
    def __init__(self, palette: list[list[int]], scale: int = 16, device="cpu",
                 codes: list[list[int]] | None = None, sub: int = 4):
        if not palette or any(len(c) != 3 for c in palette):
            raise CheckpointError("PaletteVQ: palette must be a non-empty list of [r, g, b] entries")
        self.palette_rgb = [list(map(int, c)) for c in palette]
        self.scale, self.sub = int(scale), int(sub)
        if self.sub < 1 or self.scale % self.sub:
            raise CheckpointError(f"PaletteVQ: scale {self.scale} must be a multiple of sub {self.sub}")
        self.codes = None if codes is None else [[int(c), int(m)] for c, m in codes]
        full = (1 << self.sub * self.sub) - 1
        pairs = self.codes if self.codes is not None else [[i, full] for i in range(len(self.palette_rgb))]
        if any(not 0 <= c < len(self.palette_rgb) or not 0 <= m <= full for c, m in pairs):
            raise CheckpointError("PaletteVQ: every code needs a palette index and a sub-mask in range")
        self.device = torch.device(device)
        rgb = torch.tensor(self.palette_rgb, dtype=torch.float32) / 255.0  # [P, 3]
        idx = torch.tensor([c for c, _ in pairs])  # [K]
        bits = (torch.tensor([m for _, m in pairs])[:, None] >> torch.arange(self.sub * self.sub)) & 1  # [K, sub*sub]
        on = bits.view(-1, self.sub, self.sub, 1).bool()
        tiles = torch.where(on, rgb[idx][:, None, None, :], rgb[0])  # [K, sub, sub, 3]; palette[0] = background
        f = self.scale // self.sub
        self.tiles = tiles.repeat_interleave(f, 1).repeat_interleave(f, 2).to(self.device)  # [K, scale, scale, 3]

    @property
    def codebook(self) -> int:
        return self.tiles.shape[0]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu") -> "PaletteVQ":
        f = Path(path) / "config.json"
        try:
            d = json.loads(f.read_text())
            return cls(d["palette"], d.get("scale", 16), device, d.get("codes"), d.get("sub", 4))
        except CheckpointError as e:
            raise CheckpointError(f"{f}: {e}") from None
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{f}: not a PaletteVQ config ({type(e).__name__}: {str(e)[:120]}); restore "
                                  "vqvae/config.json") from None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": "PaletteVQ", "palette": self.palette_rgb, "scale": self.scale}
        if self.codes is not None:
            cfg |= {"sub": self.sub, "codes": self.codes}
        (p / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, H, W] long -> RGB [B, 3, H*scale, W*scale] in [0, 1]."""
        codes = codes.to(self.device).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook):
            raise ValueError(f"codes outside the palette's range [0, {self.codebook})")
        B, H, W = codes.shape
        t = self.tiles[codes]  # [B, H, W, scale, scale, 3]
        return t.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, H * self.scale, W * self.scale).contiguous()
