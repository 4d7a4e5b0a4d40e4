"""VQ decode: image codes [B, H, W] -> RGB in [0, 1] [B, 3, H*16, W*16] -> PNG.

DiMOO ships a diffusers ``VQModel`` in ``vqvae/``; it runs in fp32 (this decoder family
overflows to NaN in fp16). Any decoder with the same ``decode`` signature works.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError


class DiffusersVQ:
    def __init__(self, path: str | os.PathLike, device="cpu"):
        from diffusers import VQModel
        from diffusers.utils import logging as diffusers_logging

        # diffusers logs a load failure before raising it; the caller turns the exception into
        # the one line a user sees, so the log would only repeat it.
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
        try:
            # disable_mmap: the weights are read into memory of their own; mapped, they would keep
            # reading the file, and a file truncated under a running server would kill it (SIGBUS).
            self.vq = VQModel.from_pretrained(str(path), use_safetensors=True, torch_dtype=torch.float32,
                                              low_cpu_mem_usage=False, disable_mmap=True)
        finally:
            diffusers_logging.set_verbosity(level)
        self.vq = self.vq.to(device).eval().requires_grad_(False)
        self.scale = 2 ** (len(self.vq.config.block_out_channels) - 1)
        self.device = torch.device(device)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        B, H, W = codes.shape
        C = self.vq.config.vq_embed_dim or self.vq.config.latent_channels
        x = self.vq.decode(codes.to(self.device).reshape(B, H * W).long(), force_not_quantize=True,
                           shape=(B, H, W, C)).sample
        return x.float().clamp_(0, 1)  # DiMOO's VQ decodes straight to [0, 1] (official: .clip(0, 1))


def load_vq(model_dir: str | os.PathLike, device="cpu", layout=None):
    """The checkpoint's VQ decoder; with ``layout`` (a TokenLayout) also checked against it, so a
    decoder with fewer codes or another pixel scale fails here, not after sampling."""
    from .checkpoint import _read_json

    path = Path(model_dir) / "vqvae"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}/config.json is missing: the checkpoint has no VQ decoder; restore vqvae/")
    d = _read_json(cfg_file, "restore vqvae/ from the checkpoint's source")
    cls = d.get("_class_name", "VQModel") if isinstance(d, dict) else None
    if cls == "VQModel":
        try:
            vq = DiffusersVQ(path, device)
        except ImportError:
            raise CheckpointError(f"{path} is a diffusers VQModel and diffusers is not installed; pip install "
                                  "diffusers") from None
        except Exception as e:  # noqa: BLE001 - diffusers raises OSError/ValueError/TypeError/KeyError alike
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{path}: the VQ decoder cannot be loaded ({first}); restore vqvae/ (config.json "
                                  "and diffusion_pytorch_model.safetensors) from the checkpoint's source") from None
        codebook = vq.vq.config.num_vq_embeddings
    elif cls == "PaletteVQ":
        from .palette import PaletteVQ

        vq = PaletteVQ.from_pretrained(path, device)
        codebook = vq.codebook
    else:
        raise CheckpointError(f"{cfg_file}: unknown VQ decoder class {cls!r}; expected VQModel or PaletteVQ")
    if layout is not None:
        if codebook < layout.codebook:
            raise CheckpointError(f"{path} decodes {codebook} codes but config.json's layout has a codebook of "
                                  f"{layout.codebook}; the VQ decoder belongs to another model")
        if vq.scale != layout.vq_scale:
            raise CheckpointError(f"{path} decodes {vq.scale} px per token but config.json's layout says vq_scale "
                                  f"{layout.vq_scale}; the VQ decoder belongs to another model")
    return vq


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, h, w] in [0, 1] -> [B, h, w, 3] uint8."""
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
