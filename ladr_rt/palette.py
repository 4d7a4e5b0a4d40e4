"""A palette "VQ decoder" for the testbed model: each code is one flat-coloured 16x16 tile.

It stands where DiMOO's diffusers VQModel stands (``vqvae/`` of a checkpoint, selected by
``_class_name`` in its config.json) and has the same ``decode`` signature, so the
pipeline treats both alike. Its only state is the palette, stored as JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError


class PaletteVQ:
    def __init__(self, palette: list[list[int]], scale: int = 16, device="cpu"):
        if not palette or any(len(c) != 3 for c in palette):
            raise CheckpointError("PaletteVQ: palette must be a non-empty list of [r, g, b] entries")
        self.palette_rgb = [list(map(int, c)) for c in palette]
        self.scale = int(scale)
        self.device = torch.device(device)
        self.table = torch.tensor(self.palette_rgb, dtype=torch.float32, device=self.device) / 255.0  # [K, 3]

    @property
    def codebook(self) -> int:
        return len(self.palette_rgb)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu") -> "PaletteVQ":
        f = Path(path) / "config.json"
        try:
            d = json.loads(f.read_text())
            return cls(d["palette"], d.get("scale", 16), device)
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: not a PaletteVQ config ({type(e).__name__}: {e})") from None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": "PaletteVQ", "palette": self.palette_rgb, "scale": self.scale}
        (p / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, H, W] long -> RGB [B, 3, H*scale, W*scale] in [0, 1]."""
        codes = codes.to(self.device).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook):
            raise ValueError(f"codes outside the palette's range [0, {self.codebook})")
        rgb = self.table[codes].permute(0, 3, 1, 2)  # [B, 3, H, W]
        return rgb.repeat_interleave(self.scale, 2).repeat_interleave(self.scale, 3).contiguous()
