"""Precision ``fp8``: the trunk's linear layers in float8 (e4m3), everything else in the compute dtype.

Each linear layer of the transformer blocks (q/k/v/o projections, the MLP's gate/up/down) keeps
its weight as ``float8_e4m3fn`` with one fp32 scale per output channel (row-wise), quantized once
when the checkpoint loads, from the checkpoint's own values (never from a copy already rounded to
the compute dtype). Activations get one scale per token at run time. The matmul is
``torch._scaled_mm`` with those row-wise scales; where the device's torch has no row-wise
``_scaled_mm`` (torch 2.11's CPU build only takes per-tensor scales), ``dequant`` runs the same
quantized operands through a plain matmul: identical fp8 values and scales, only the accumulation
order and the output rounding may differ.

What stays in the compute dtype (bf16 on CUDA, fp32 on the CPU), and why:
- the token embedding: a lookup, no matmul to speed up, and its rows are the prompt's whole signal;
- RMSNorm: fp32 statistics already; its weight is d_model numbers, nothing to save;
- RoPE: rotation angles in fp32 — fp8 positions would blur neighbouring tokens' phases;
- attention (QK^T, softmax, PV): activation-by-activation products whose per-row ranges move with
  every step; an fp8 softmax input would flatten the attention of a 4k-token sequence;
- the codebook head: LADR ranks masked tokens by the top-1/top-2 probability margin and rescues by
  it, so a head error moves margins directly into which tokens commit; it is one GEMM of
  8192 x 4096 on the image rows, a small share of an evaluation's FLOPs.

``Fp8Linear`` is plain tensor math on buffers (no host sync, no data-dependent branch), so it
traces under ``torch.export`` and captures in a CUDA graph.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A scale's floor: an all-zero weight row or activation row gets this instead of 0 (0/0 = NaN).
MIN_SCALE = 1e-12
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards
FP8_CARDS = "L4, L40S, RTX 4090, H100, H200"


class Fp8Unsupported(ValueError):
    """fp8 asked for on a device or backend that has no fp8 path; the message names the fix."""


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """What everything outside the fp8 linears runs in: bf16 on CUDA, fp32 on the CPU (CPU bf16
    matmuls are slow and CPU results are the reference the tests compare with)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_fp8_device(device: str | torch.device) -> None:
    """Refuses a CUDA device without fp8 tensor cores (compute capability < 8.9), naming the card."""
    d = torch.device(device)
    if d.type != "cuda":
        return
    idx = d.index if d.index is not None else torch.cuda.current_device()
    cap = tuple(torch.cuda.get_device_capability(idx))
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(idx)
        raise Fp8Unsupported(f"--dtype fp8 needs a GPU with fp8 tensor cores (compute capability 8.9 or newer: "
                             f"{FP8_CARDS}); {name} has {cap[0]}.{cap[1]}: use --dtype bf16")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] -> (fp8 values [..., K], fp32 scales [..., 1]) with one scale per row:
    amax / 448, so each row's largest magnitude lands on e4m3's largest finite value.
    NaN/inf stay NaN (an inf amax makes every scaled value NaN): a broken input is never
    turned into finite numbers here; the pipeline's non-finite check reports it."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


_SCALED_MM: dict[tuple[str, int | None], bool] = {}


def scaled_mm_works(device: torch.device) -> bool:
    """Whether this torch runs a row-wise-scaled fp8 ``_scaled_mm`` on ``device`` (probed once
    per device with a 16x16 product; torch 2.11's CPU build takes per-tensor scales only)."""
    key = (device.type, device.index)
    if key not in _SCALED_MM:
        try:
            a = torch.ones(16, 16, device=device).to(FP8)
            s = torch.ones(16, 1, device=device)
            y = torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.t(), out_dtype=compute_dtype(device))
            _SCALED_MM[key] = bool((y.float() == 16).all())
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            _SCALED_MM[key] = False
    return _SCALED_MM[key]


class Fp8Linear(nn.Module):
    """``y = x W^T`` with W in e4m3 and one scale per output channel, x quantized per token.

    ``weight`` [out, in] float8_e4m3fn and ``weight_scale`` [out, 1] fp32 are buffers, not
    parameters: nothing trains them, and ``next(model.parameters())`` (which the eager denoiser
    reads its dtype from) keeps meaning the compute dtype. ``mode`` is "scaled_mm" or "dequant",
    fixed at construction so that ``forward`` has no branch on data."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype, mode: str):
        super().__init__()
        if mode not in ("scaled_mm", "dequant"):
            raise ValueError(f"Fp8Linear mode must be scaled_mm or dequant, got {mode!r}")
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1).contiguous())
        self.out_dtype, self.mode = out_dtype, mode
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_weight(cls, w: torch.Tensor, out_dtype: torch.dtype, mode: str | None = None) -> "Fp8Linear":
        q, s = quantize_rows(w)
        if mode is None:
            # _scaled_mm wants both matmul dims of the weight in multiples of 16 (cuBLASLt's fp8 layout)
            ok = w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
            mode = "scaled_mm" if ok and scaled_mm_works(w.device) else "dequant"
        return cls(q, s, out_dtype, mode)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, {self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, shape[-1]))  # [M, K] e4m3, [M, 1] fp32: one scale per token
        if self.mode == "scaled_mm":
            # weight.t() is a column-major view of the row-major [out, in] buffer: the layout
            # _scaled_mm wants for its second operand, with no copy.
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.t(),
                                 out_dtype=self.out_dtype)
        else:
            # e4m3 values are exact in bf16 and fp32, so this is the same product of the same
            # quantized operands; the scales apply after the matmul, as _scaled_mm applies them.
            acc = torch.float32 if self.out_dtype == torch.float32 else self.out_dtype
            y = ((xq.to(acc) @ self.weight.to(acc).t()).float() * xs * self.weight_scale.t()).to(self.out_dtype)
        return y.reshape(*shape[:-1], self.out_features)


def dequant_reference(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """The fp32 dequantise-then-matmul reference of ``layer(x)`` (tests): x and W quantized as
    the layer does, then dequantized and multiplied in fp32."""
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    w = layer.weight.float() * layer.weight_scale
    return ((xq.float() * xs) @ w.t()).reshape(*x.shape[:-1], layer.out_features)


def quantize_trunk(model: nn.Module, sd: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                   prefix: str = "model.transformer.blocks.") -> dict[str, torch.Tensor]:
    """Every ``nn.Linear`` under ``model.model.transformer.blocks`` replaced by an ``Fp8Linear``
    quantized from ``sd``'s tensor (moved to ``device`` one at a time, so the full-precision trunk
    never sits on the GPU at once). Returns the rest of ``sd`` — embeddings, norms, the head —
    for the caller to load in the compute dtype."""
    rest = dict(sd)
    modes = set()
    for name, mod in list(model.model.transformer.blocks.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        key = f"{prefix}{name}.weight"
        w = rest.pop(key).to(device)
        fp8 = Fp8Linear.from_weight(w, dtype)
        del w
        modes.add(fp8.mode)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.model.transformer.blocks.get_submodule(parent_name), attr, fp8)
    if torch.device(device).type == "cuda" and "dequant" in modes:
        warnings.warn(f"this torch has no row-wise fp8 _scaled_mm on {device}: the fp8 layers dequantize before "
                      "each matmul (fp8 memory, no fp8 speed-up)", RuntimeWarning, stacklevel=3)
    return rest


def load_fp8(model: nn.Module, sd: dict[str, torch.Tensor], device: str | torch.device) -> nn.Module:
    """``model`` (built on the meta device) with the trunk's linears in fp8 and the rest of ``sd``
    in the compute dtype of ``device``; eval mode, no grad."""
    check_fp8_device(device)
    dev = torch.device(device)
    dtype = compute_dtype(dev)
    rest = quantize_trunk(model, sd, dev, dtype)
    rest = {k: v.to(device=dev, dtype=dtype) for k, v in rest.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    # The only keys not loaded may be the fp8 layers' own buffers (already set from sd).
    left = [k for k in missing if not isinstance(model.get_submodule(k.rpartition(".")[0]), Fp8Linear)]
    if left or unexpected:
        raise RuntimeError(f"fp8 load left keys {left[:3]} unloaded, {unexpected[:3]} unexpected")
    return model.eval().requires_grad_(False)


def weight_bytes(cfg, precision: str) -> dict[str, int]:
    """Bytes of the model's weights at ``precision`` (fp32, bf16 or fp8), from the config alone:
    ``trunk_linear`` (the fp8 layers, with their fp32 scales at fp8), ``other`` (embedding,
    norms, head: fp32 for fp32, bf16 for bf16 and fp8), ``total``."""
    if precision not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"precision must be fp32, bf16 or fp8, got {precision!r}")
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    outs = [d, kv, kv, d, cfg.mlp_hidden_size, cfg.mlp_hidden_size, d]  # q k v o gate up down
    ins = [d, d, d, d, d, d, cfg.mlp_hidden_size]
    linear_params = cfg.n_layers * sum(o * i for o, i in zip(outs, ins))
    linear_rows = cfg.n_layers * sum(outs)
    other_params = cfg.vocab_size * d + (0 if cfg.weight_tying else cfg.vocab_size * d) + (2 * cfg.n_layers + 1) * d
    width = {"fp32": 4, "bf16": 2, "fp8": 1}[precision]
    other_width = 4 if precision == "fp32" else 2
    trunk = linear_params * width + (linear_rows * 4 if precision == "fp8" else 0)
    other = other_params * other_width
    return {"trunk_linear": trunk, "other": other, "total": trunk + other}
