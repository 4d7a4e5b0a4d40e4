"""Engines: fixed-shape builds of the transformer and the runners that replay them.

    manifest.py   what an engine was built from/for; the check a run makes before using it
    graph.py      the fixed-shape evaluation that is exported (ids, mask -> codebook logits)
    ort.py        onnxruntime runner (CPU EP; CUDA/TensorRT EPs with onnxruntime-gpu)
    trt.py        TensorRT plan builder and runner (lazy import)
    inductor.py   AOTInductor .pt2 package builder and runner (torch only)
    torch_graph.py  eager model under CUDA-graph replay (the no-TensorRT GPU baseline)

Every runner has the ``Denoiser`` call signature (``ladr_rt.denoiser``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .manifest import EngineError, EngineMismatch, check_files, check_io, check_manifest, read_manifest

__all__ = ["EngineError", "EngineMismatch", "read_manifest", "check_manifest", "load_denoiser"]


def load_denoiser(m: dict[str, Any], device: str | torch.device = "auto"):
    """The runner the manifest names, on ``device`` (auto: cuda for TensorRT or when
    onnxruntime has a CUDA provider, the compiled device for inductor, else cpu), after checking that every engine file holds
    what the build wrote and that the loaded graph's I/O is the manifest's."""
    check_files(m)
    d = Path(m["_dir"])
    if m["runner"] == "tensorrt":
        from .trt import TrtDenoiser

        if str(device) == "auto":
            device = "cuda"
        if not torch.cuda.is_available():
            raise EngineError(f"engine {d / m['name']} is a TensorRT plan and needs a CUDA GPU; on this machine build "
                              f"an onnx engine: `ladr-rt build ... --backend onnx --out {d / m['name']}`")
        from .trt import compute_capability

        # A plan is compiled for one GPU architecture: refuse another before deserializing.
        check_manifest(m, compute_capability=compute_capability(device))
        den = TrtDenoiser(d / f"{m['name']}.plan", device)
        check_io(m, den.io_spec(), den.path)
        return den
    if m["runner"] == "aoti":
        from .inductor import InductorDenoiser, check_package, check_target

        dev = torch.device(m["target"]["device"] if str(device) == "auto" else device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"engine {d / m['name']} was compiled for CUDA and torch sees no CUDA device here; "
                              f"build one for this machine: `ladr-rt build ... --backend inductor --device cpu "
                              f"--out {d / m['name']}`")
        # Before the package's shared object is loaded: a foreign torch, ISA or GPU
        # architecture fails inside it (or kills the process with SIGILL).
        check_target(m, dev)
        path = d / f"{m['name']}.pt2"
        check_package(m, path)
        shapes = {t["name"]: list(t["shape"]) for t in m["io"]["inputs"] + m["io"]["outputs"]}
        return InductorDenoiser(path, dev, shapes)
    if m["runner"] == "onnxruntime":
        from .ort import OrtDenoiser, import_ort

        if str(device) == "auto":
            cuda_ep = "CUDAExecutionProvider" in import_ort().get_available_providers()
            device = "cuda" if cuda_ep and torch.cuda.is_available() else "cpu"
        # An fp32 engine runs fp32 matmuls: onnxruntime's CUDA EP would use TF32 by default.
        den = OrtDenoiser(d / f"{m['name']}.onnx", device, tf32=False if m["precision"] == "fp32" else None)
        check_io(m, den.io_spec(), den.path)
        return den
    raise EngineError(f"{d / m['name']}.json names runner {m['runner']!r}, which this ladr-rt does not know; "
                      "upgrade ladr-rt or rebuild the engine")
