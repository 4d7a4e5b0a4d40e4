"""Weight memory of the 8B DiMOO config per precision (fp32, bf16, fp8), computed from the config,
and an estimate of one image's activations: which cards a 1024x1024 image fits.

    python bench/fp8_memory.py              # markdown table on stdout, then one JSON line
    python bench/fp8_memory.py --size 512

Weights: ``ladr_rt.fp8.weight_bytes`` (tested against the model built on the meta device in
tests/test_fp8.py). Activations are an ESTIMATE, not a measurement: the largest set of tensors
alive at once in one eager evaluation (batch 2: cond + uncond rows), counted from the shapes —
the residual stream, the MLP's gate/up/product, the attention's q/k/v/output, the image-code
logits and the sampler's run-state — with attention as a fused kernel (flash / memory-efficient
SDPA, no [L, L] matrix) and, as the worst case, the math kernel's [2, heads, L, L] scores in
fp32. fp8 adds the per-token quantization temporaries (an fp32 copy of the widest activation and
its e4m3 copy). Peak GPU memory per image is measured by bench/gpu_check.py stage 2 on a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ladr_rt.config import ImageSpec, ModelConfig  # noqa: E402
from ladr_rt.fp8 import MIN_CAPABILITY, weight_bytes  # noqa: E402
from ladr_rt.tokens import SequenceLayout  # noqa: E402

GIB = 2 ** 30
# Headroom a process needs beyond its tensors: CUDA context, cuBLAS workspace, allocator
# fragmentation. An assumption (typical 0.5-1.5 GiB), not a measurement.
OVERHEAD_GIB = 1.5
# (card, memory GiB as the driver reports it, compute capability)
CARDS = [("RTX 4070 (12 GB)", 11.7, (8, 9)), ("RTX 4080 / 4060 Ti 16 GB", 15.7, (8, 9)),
         ("T4 (16 GB)", 14.6, (7, 5)), ("RTX 3090 / A10 (24 GB)", 23.6, (8, 6)),
         ("RTX 4090 / L4 (24 GB)", 23.6, (8, 9)), ("A100 40 GB", 39.4, (8, 0)), ("L40S (48 GB)", 44.4, (8, 9)),
         ("A100 80 GB", 79.2, (8, 0)), ("H100 80 GB", 79.1, (9, 0)), ("H200 (141 GB)", 139.8, (9, 0))]


def activation_bytes(cfg: ModelConfig, height: int, width: int, precision: str, attention: str = "fused") -> int:
    """Estimated bytes of the tensors alive at the peak of one eager evaluation (see the module
    docstring); ``attention`` "fused" (flash / memory-efficient SDPA) or "math" ([L, L] scores)."""
    seq = SequenceLayout(ImageSpec(height, width, 64), cfg.layout)
    L, N, K = seq.seq_len, seq.n_image, cfg.layout.codebook
    rows, act = 2, (4 if precision == "fp32" else 2)  # cond + uncond; fp32 or bf16 activations
    tok = rows * L
    d, mlp, hd = cfg.d_model, cfg.mlp_hidden_size, cfg.head_dim
    resid = 2 * tok * d * act  # x and the normed h
    mlp_live = 3 * tok * mlp * act  # gate, up, silu(gate) * up
    attn_live = 4 * tok * cfg.n_heads * hd * act  # q, k, v, output (rope's fp32 temporaries are per tensor: below)
    rope_tmp = 2 * tok * cfg.n_heads * hd * 4
    scores = rows * cfg.n_heads * L * L * 4 if attention == "math" else 0
    block = resid + max(mlp_live, attn_live + rope_tmp + scores)
    if precision == "fp8":  # quantize_rows of the widest input (the down projection's [tok, mlp]): fp32 + e4m3
        block += tok * mlp * (4 + 1)
    logits = rows * N * K * 4  # [2, N, K] fp32 engine output buffer
    state = 6 * N * K * 4  # run-state: guided logits, probabilities, noise buffers [B=1, N, K] fp32
    return int(block + logits + state)


def report(size: int) -> dict:
    cfg = ModelConfig()
    out: dict = {"config": "Lumina-DiMOO 8B (ladr_rt.config.ModelConfig defaults)", "size": size,
                 "overhead_gib_assumed": OVERHEAD_GIB, "precisions": {}}
    for p in ("fp32", "bf16", "fp8"):
        w = weight_bytes(cfg, p)
        a_fused = activation_bytes(cfg, size, size, p, "fused")
        a_math = activation_bytes(cfg, size, size, p, "math")
        out["precisions"][p] = {"weights": w, "weights_gib": w["total"] / GIB,
                                "activations_est_gib": {"fused_attention": a_fused / GIB, "math_attention": a_math / GIB}}
    cards = []
    for name, mem, cap in CARDS:
        fits = {}
        for p in ("bf16", "fp8"):
            if p == "fp8" and cap < MIN_CAPABILITY:
                fits[p] = "no fp8 tensor cores"
                continue
            e = out["precisions"][p]
            need = e["weights_gib"] + e["activations_est_gib"]["fused_attention"] + OVERHEAD_GIB
            need_math = e["weights_gib"] + e["activations_est_gib"]["math_attention"] + OVERHEAD_GIB
            fits[p] = "yes" if need_math <= mem else ("yes with fused attention" if need <= mem else "no")
        cards.append({"card": name, "memory_gib": mem, "compute_capability": f"{cap[0]}.{cap[1]}", **fits})
    out["cards"] = cards
    return out


def markdown(rep: dict) -> str:
    s = rep["size"]
    lines = ["| precision | trunk linears GiB | embedding + head + norms GiB | weights GiB | activations GiB, est. "
             f"({s}x{s}; fused / math attention) |", "|---|---|---|---|---|"]
    for p, e in rep["precisions"].items():
        w = e["weights"]
        a = e["activations_est_gib"]
        lines.append(f"| {p} | {w['trunk_linear'] / GIB:.2f} | {w['other'] / GIB:.2f} | {e['weights_gib']:.2f} | "
                     f"{a['fused_attention']:.2f} / {a['math_attention']:.2f} |")
    lines += ["", f"| card | memory GiB | compute capability | {s}x{s} bf16 | {s}x{s} fp8 |", "|---|---|---|---|---|"]
    for c in rep["cards"]:
        lines.append(f"| {c['card']} | {c['memory_gib']} | {c['compute_capability']} | {c['bf16']} | {c['fp8']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 16)")
    a = ap.parse_args(argv)
    if a.size <= 0 or a.size % 16:
        ap.error(f"--size must be a positive multiple of 16, got {a.size}")
    rep = report(a.size)
    print(markdown(rep))
    print(json.dumps({p: round(e["weights_gib"], 3) for p, e in rep["precisions"].items()}))


if __name__ == "__main__":
    main()
