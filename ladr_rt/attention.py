"""Attention over left-padded rows: which kernel runs, and the call each choice makes.

Every row of an evaluation carries a key-padding mask (prompts are left-padded to one
budget), so plain SDPA with its additive bias cannot use FlashAttention on CUDA and runs the
memory-efficient kernel. Choices (``ATTENTION_CHOICES``):

- ``sdpa``: ``F.scaled_dot_product_attention`` with the additive key bias. The portable path,
  and the one the exported engine graph holds (``engines/graph.py`` never passes a choice).
- ``cudnn``: the same SDPA call with cuDNN attention put first in SDPA's priority order; cuDNN
  takes an additive bias. Where cuDNN refuses the inputs, SDPA falls through its usual order
  (flash, efficient, math), so this choice never fails where ``sdpa`` runs.
- ``flex``: FlexAttention (compiled) with a block mask whose ``mask_mod`` reads the key mask
  by address. Its block structure does not depend on the mask's values (every block is
  "partial", so ``mask_mod`` runs everywhere): a CUDA graph captured once stays right when a
  serving slot admits a new prompt, since admission only rewrites the key-mask buffer in place.
- ``auto``: ``cudnn`` on CUDA, ``sdpa`` elsewhere (docs/attention.md says why).

``attention_kernel`` names the kernel a choice will run at given shapes; ``time_candidates``
times each choice alone at real shapes, for the GPU check to pick from numbers.
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from .config import ATTENTION_CHOICES

KERNELS = ("sdpa", "cudnn", "flex")  # what a choice resolves to


class AttentionError(ValueError):
    """A choice this device cannot run."""


def resolve(choice: str, device: torch.device | str) -> str:
    """``auto`` -> the device's default; a forced choice checked against the device."""
    device = torch.device(device)
    if choice not in ATTENTION_CHOICES:
        raise AttentionError(f"attention {choice!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "auto":
        return "cudnn" if device.type == "cuda" else "sdpa"
    if choice == "cudnn" and device.type != "cuda":
        raise AttentionError(f"attention 'cudnn' needs a CUDA device, not {device.type}; use auto or sdpa")
    return choice


def key_padding(key_mask: torch.Tensor, dtype: torch.dtype, kernel: str):
    """What ``attend`` takes for this kernel: the additive SDPA bias [B, 1, 1, L] (``sdpa``,
    ``cudnn``), or a FlexAttention ``BlockMask`` over ``key_mask`` (``flex``)."""
    if kernel == "flex":
        return _flex_block_mask(key_mask)
    from .model import key_bias

    return key_bias(key_mask, dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, kernel: str = "sdpa") -> torch.Tensor:
    """Bidirectional attention, q/k/v [B, heads, L, head_dim] (k, v already repeated for GQA),
    ``mask`` from ``key_padding``: hides left-padding keys only."""
    # cudnn is the same SDPA call, made inside ``context("cudnn")`` (entered once per evaluation
    # in run_trunk), which puts cuDNN first in SDPA's kernel order
    if kernel in ("sdpa", "cudnn"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
    if kernel == "flex":
        return _flex()(q, k, v, block_mask=mask)
    raise AttentionError(f"attention kernel {kernel!r}: choose one of {', '.join(KERNELS)}")


def context(kernel: str):
    """What ``attend`` calls for ``kernel`` run inside: for ``cudnn``, SDPA's priority order with
    cuDNN attention first (process-wide flags, set and restored on the calling thread's way
    through one evaluation); nothing for the others."""
    if kernel != "cudnn":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


# ---------------------------------------------------------------------------------------- flex

FLEX_BLOCK = 128
_FLEX_COMPILED = None


def _flex():
    """flex_attention compiled once per process on CUDA (eager flex is a reference implementation
    that materialises the scores); on CPU the eager one unless ``flex_compile_cpu`` is set (the
    compiled CPU kernel needs a C++ toolchain and a long first compile)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, block_mask: (_FLEX_COMPILED if q.device.type == "cuda" or flex_compile_cpu
                                        else flex_attention)(q, k, v, block_mask=block_mask)


flex_compile_cpu = False
# The eager flex on CPU is chosen knowingly (it is what --attention flex runs there): its
# multi-line advice to compile would only clutter a user's terminal.
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)


def _flex_block_mask(key_mask: torch.Tensor):
    """The block mask over ``key_mask``, built on the first call for that tensor and kept on it.

    A pipeline's key-mask buffer keeps its address for its life, so its mask is built once (in
    the warm-up call every capture runs first, never inside a graph) and reads the buffer's
    current values at every call. Kept as an attribute of the buffer itself: a captured graph
    reads the mask's block tables by address, so they must live exactly as long as the buffer
    the graph was captured with; a cache with eviction could free them under a graph."""
    bm = getattr(key_mask, "_ladr_block_mask", None)
    if bm is not None:
        return bm
    from torch.nn.attention.flex_attention import BlockMask

    B, L = key_mask.shape
    n = -(-L // FLEX_BLOCK)
    dev = key_mask.device
    km = key_mask if key_mask.dtype == torch.bool else key_mask.bool()

    def mask_mod(b, h, q_idx, kv_idx):
        return km[b, kv_idx]

    kv_num = torch.full((B, 1, n), n, dtype=torch.int32, device=dev)
    kv_idx = torch.arange(n, dtype=torch.int32, device=dev).expand(B, 1, n, n).contiguous()
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(L, L))
    if km is key_mask:  # a converted copy would not follow later writes to the buffer: not kept
        key_mask._ladr_block_mask = bm
    return bm


# ------------------------------------------------------------------------------ which kernel runs

_SDPA_NAMES = {"FLASH_ATTENTION": "sdpa-flash", "EFFICIENT_ATTENTION": "sdpa-efficient", "MATH": "sdpa-math",
               "CUDNN_ATTENTION": "sdpa-cudnn", "OVERRIDEABLE": "sdpa-overrideable"}


def attention_kernel(device: torch.device | str, dtype: torch.dtype, head_dim: int, seq_len: int,
                     choice: str = "auto", n_heads: int = 1, batch: int = 2, masked: bool = True) -> str:
    """The kernel that ``choice`` runs at these shapes: ``sdpa-flash``, ``sdpa-efficient``,
    ``sdpa-cudnn``, ``sdpa-math`` (CUDA, by SDPA's own checks in its priority order),
    ``sdpa-cpu``, ``flex-triton`` or ``flex-cpu``. ``masked``: rows carry the key bias
    (every row of this project's evaluation does; the official-style row does not)."""
    device = torch.device(device)
    kernel = resolve(choice, device)
    if kernel == "flex":
        return "flex-triton" if device.type == "cuda" else ("flex-cpu-compiled" if flex_compile_cpu else "flex-cpu")
    if device.type != "cuda":
        return "sdpa-cpu"
    from torch.nn.attention import SDPBackend

    t = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    q = t(batch, n_heads, seq_len, head_dim)
    bias = t(batch, 1, 1, seq_len) if masked else None  # as key_padding passes it
    params = torch.backends.cuda.SDPAParams(q, q, q, bias, 0.0, False, False)
    check = {"FLASH_ATTENTION": (torch.backends.cuda.can_use_flash_attention, torch.backends.cuda.flash_sdp_enabled),
             "EFFICIENT_ATTENTION": (torch.backends.cuda.can_use_efficient_attention,
                                     torch.backends.cuda.mem_efficient_sdp_enabled),
             "CUDNN_ATTENTION": (torch.backends.cuda.can_use_cudnn_attention, torch.backends.cuda.cudnn_sdp_enabled),
             "MATH": (lambda p, debug=False: True, torch.backends.cuda.math_sdp_enabled)}
    names = {int(v): k for k, v in SDPBackend.__members__.items()}
    order = [names[i] for i in torch._C._get_sdp_priority_order()]
    if kernel == "cudnn":
        order = ["CUDNN_ATTENTION"] + [o for o in order if o != "CUDNN_ATTENTION"]
    for name in order:
        if name in check and check[name][1]() and check[name][0](params, False):
            return _SDPA_NAMES[name]
    return "sdpa-none"


def describe(denoiser, head_dim: int, seq_len: int, n_heads: int = 1) -> str:
    """The ``attention`` field of a benchmark row: the kernel a denoiser's evaluation runs."""
    choice = getattr(denoiser, "attention", None)
    if choice is not None:
        return attention_kernel(denoiser.device, denoiser.logits_dtype, head_dim, seq_len, choice, n_heads)
    if getattr(denoiser, "name", "") == "official-style":  # unpadded rows, no mask
        return attention_kernel(denoiser.device, next(denoiser.model.parameters()).dtype, head_dim, seq_len, "sdpa",
                                n_heads, batch=1, masked=False)
    return f"{getattr(denoiser, 'name', type(denoiser).__name__)}: the exported SDPA + bias, as its runtime runs it"


def time_candidates(device: torch.device | str, dtype: torch.dtype, rows: int, n_heads: int, head_dim: int,
                    seq_len: int, n_pad: int, warmup: int = 3, reps: int = 10) -> dict:
    """Each choice's attention alone at one shape, rows [rows, n_heads, seq_len, head_dim] with
    ``n_pad`` left-padding keys in every other row: {choice: {"kernel", "s" (median seconds)}}
    or {choice: {"kernel", "error"}}; plus ``unmasked-sdpa``, the unpadded ceiling (no bias:
    flash on CUDA). CUDA events on CUDA, wall clock elsewhere."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(rows, n_heads, seq_len, head_dim, dtype=dtype, device=device, generator=g) for _ in "qkv")
    key_mask = torch.ones(rows, seq_len, dtype=torch.bool, device=device)
    key_mask[::2, :n_pad] = False
    out: dict = {}
    cands = [c for c in KERNELS if device.type == "cuda" or c != "cudnn"] + ["unmasked-sdpa"]
    for c in cands:
        kernel = "sdpa" if c == "unmasked-sdpa" else c
        try:
            name = attention_kernel(device, dtype, head_dim, seq_len, kernel, n_heads, rows, masked=c != "unmasked-sdpa")
            mask = None if c == "unmasked-sdpa" else key_padding(key_mask, dtype, kernel)
            fn = lambda: attend(q, k, v, mask, kernel)  # noqa: E731
            with torch.inference_mode(), context(kernel):
                for _ in range(warmup):
                    fn()
                out[c] = {"kernel": name, "s": statistics.median(_times(fn, device, reps))}
        except Exception as e:  # a kernel this torch/GPU lacks: say which and why, time the rest
            out[c] = {"kernel": c, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    return out


def _times(fn, device: torch.device, reps: int) -> list[float]:
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return ts


__all__ = ["ATTENTION_CHOICES", "AttentionError", "attend", "attention_kernel", "describe", "key_padding",
           "resolve", "time_candidates"]


def main(argv=None) -> int:
    """``python -m ladr_rt.attention``: each choice's attention timed alone at DiMOO's shapes
    (32 heads of 128, cond + uncond rows per prompt) for one image size, as one JSON line."""
    import argparse
    import json

    from .config import ImageSpec, ModelConfig, TokenLayout
    from .tokens import SequenceLayout

    ap = argparse.ArgumentParser(prog="python -m ladr_rt.attention", description=main.__doc__)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--prompt-budget", type=int, default=ImageSpec.prompt_budget)
    ap.add_argument("--batch", type=int, default=1, help="prompts (2x rows)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="[default: bf16 on cuda, else fp32]")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args(argv)
    spec = ImageSpec(a.height, a.width, a.prompt_budget)
    try:
        spec.validate()
    except ValueError as e:
        ap.error(str(e))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")]
    cfg, L = ModelConfig(), SequenceLayout(spec, TokenLayout()).seq_len
    n_pad = a.prompt_budget // 2  # a short prompt's padding in every other row (the uncond template is shorter)
    t = time_candidates(a.device, dtype, 2 * a.batch, cfg.n_heads, cfg.head_dim, L, n_pad, reps=a.reps)
    print(json.dumps({"seq_len": L, "rows": 2 * a.batch, "n_heads": cfg.n_heads, "head_dim": cfg.head_dim,
                      "n_pad": n_pad, "dtype": str(dtype).replace("torch.", ""), "device": a.device,
                      "torch": torch.__version__, "candidates": t}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
