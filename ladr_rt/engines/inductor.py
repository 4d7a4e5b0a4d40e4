"""AOTInductor runner: the engine graph compiled ahead of time into a ``.pt2`` package.

``torch.export`` -> ``torch._inductor.aoti_compile_and_package``: C++/OpenMP kernels on the
CPU (needs a C++ compiler at build time), Triton kernels on CUDA (needs Triton at build
time). Nothing beyond torch is needed to run it, but the package is tied to what it was
compiled with and for: the torch version (the C++ ABI of its runtime shim), the device kind,
the CPU's vector ISA (an AVX-512 build dies with SIGILL on an AVX2 CPU) or the GPU's compute
capability. The manifest records all of them and ``check_target`` refuses a mismatch before
the shared object is loaded. The package carries the same facts in its own metadata, so a
manifest that was edited or belongs to another package is caught as well.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..denoiser import canonical_device
from .manifest import BuildError, EngineError, EngineMismatch, build_command

# torch.backends.cpu.get_cpu_capability(): ATen's dispatch level, which is also what the
# package's kernels were vectorized for (inductor picks the best ISA the build machine has).
_CPU_LEVEL = {"DEFAULT": 0, "VSX": 1, "ZVECTOR": 1, "SVE256": 1, "AVX2": 2, "AVX512": 3}
META_PREFIX = "ladr_rt."


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def check_toolchain(device: torch.device) -> None:
    """Refuse a build that could only fail after the export: the C++ compiler inductor will use
    must compile and link an OpenMP shared object (CPU kernels and the package's wrapper, on
    every device), and on CUDA Triton must import. Takes well under a second."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
            from torch.utils._triton import has_triton
        except ImportError:
            raise BuildError("--backend inductor on CUDA needs Triton, which is not installed; pip install "
                             "triton (the version your torch names), or build with --backend onnx") from None
        if not has_triton():
            raise BuildError("--backend inductor on CUDA needs Triton, but this Triton cannot compile for this GPU "
                             "(torch.utils._triton.has_triton() is False); install the triton that matches your "
                             "torch, or build with --backend onnx")
    from torch._inductor import cpp_builder

    try:
        cxx = cpp_builder.get_cpp_compiler()
    except Exception:  # torch._inductor.exc.InvalidCxxCompiler, and whatever a broken config raises
        raise BuildError("--backend inductor needs a C++ compiler (g++ or clang++ on PATH, or $CXX) and none was "
                         "found; install one (e.g. apt-get install g++), or build with --backend onnx") from None
    src = '#include <omp.h>\nextern "C" int ladr_probe() { return omp_get_max_threads(); }\n'
    with tempfile.TemporaryDirectory(prefix="ladr-cxx-") as d:
        cmd = [cxx, "-shared", "-fPIC", "-fopenmp", "-x", "c++", "-", "-o", os.path.join(d, "probe.so")]
        try:
            r = subprocess.run(cmd, input=src, capture_output=True, text=True, timeout=120)
            ok, why = r.returncode == 0, (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        except (OSError, subprocess.SubprocessError) as e:
            ok, why = False, str(e)
    if not ok:
        raise BuildError(f"--backend inductor needs a working C++ compiler with OpenMP, and {cxx} cannot build a "
                         f"shared object ({why[:160]}); install g++ (with libgomp) or point $CXX at one, or build "
                         "with --backend onnx")


def target_of(device: torch.device) -> dict[str, Any]:
    """What a package compiled here on ``device`` is tied to (the manifest's ``target``)."""
    t: dict[str, Any] = {"device": device.type, "torch": torch.__version__}
    if device.type == "cpu":
        t["cpu_capability"] = cpu_capability()
        # The package's OpenMP regions are sized at compile time (inductor's cpp.threads
        # default: torch's thread count then); recorded so a timing says what it ran with.
        t["threads"] = torch.get_num_threads()
    return t


def compile_package(graph: torch.nn.Module, path: Path, rows: int, seq_len: int,
                    metadata: dict[str, str]) -> None:
    """Export at the fixed shape and compile into ``path``. ``metadata`` goes into the
    package (string values), where ``package_metadata`` reads it back without loading code."""
    import warnings

    dev = graph.head.device
    ids = torch.zeros(rows, seq_len, dtype=torch.int32, device=dev)
    mask = torch.ones(rows, seq_len, dtype=torch.bool, device=dev)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = torch.export.export(graph, (ids, mask), strict=False)
        meta = {f"{META_PREFIX}{k}": str(v) for k, v in metadata.items()}
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                 inductor_configs={"aot_inductor.metadata": meta})
    if not path.is_file():
        raise BuildError(f"AOTInductor wrote no package at {path}; this torch ({torch.__version__}) is not "
                         "supported for --backend inductor: use torch>=2.6")


def package_metadata(path: Path) -> dict[str, str]:
    """The package's own metadata (AOTI_* keys inductor writes, ladr_rt.* keys the build adds),
    read from the archive: nothing is loaded or executed."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("wrapper_metadata.json")]
            if len(names) != 1:
                raise EngineError(f"{path} holds {len(names)} compiled models, expected 1: it is not a package "
                                  "ladr-rt built; rebuild the engine with `ladr-rt build --backend inductor`")
            meta = json.loads(z.read(names[0]))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError) as e:
        raise EngineError(f"{path} is not a readable AOTInductor package ({type(e).__name__}: {str(e)[:80]}); "
                          "rebuild the engine with `ladr-rt build --backend inductor`") from None
    if not isinstance(meta, dict):
        raise EngineError(f"{path} has malformed package metadata; rebuild the engine with `ladr-rt build "
                          "--backend inductor`")
    return {str(k): str(v) for k, v in meta.items()}


def check_target(m: dict[str, Any], device: torch.device) -> None:
    """Refuse to load a package that this torch, device kind or CPU/GPU could not run:
    a version mismatch breaks the shim ABI, a foreign ISA or architecture crashes or fails in
    the kernels. One line naming what differs and the rebuild."""
    t = m["target"]
    name = Path(m["_dir"]) / m["name"]
    rebuild = build_command(m, device=device.type)
    if device.type != t["device"]:
        raise EngineMismatch(f"engine {name} was compiled for {t['device']}, this run asks for {device.type}; run it "
                             f"with --device {t['device']}, or build one for {device.type}: `{rebuild}`")
    if t["torch"] != torch.__version__:
        raise EngineMismatch(f"engine {name} was compiled by torch {t['torch']}, this is torch {torch.__version__} "
                             f"(an AOTInductor package runs only on the torch that built it); rebuild it here: "
                             f"`{rebuild}`")
    if device.type == "cpu":
        built, have = t["cpu_capability"], cpu_capability()
        if _CPU_LEVEL.get(have, -1) < _CPU_LEVEL.get(built, 99) and have != built:
            raise EngineMismatch(f"engine {name} was compiled for {built} CPUs, this CPU runs {have} (its kernels "
                                 f"would stop on an illegal instruction); rebuild it on this machine: `{rebuild}`")
    else:
        from .trt import compute_capability
        from .manifest import check_manifest

        check_manifest(m, compute_capability=compute_capability(device))


def check_package(m: dict[str, Any], path: Path) -> None:
    """The package's own metadata against the manifest: same engine name, device, torch,
    precision and I/O. Catches a manifest edited to fit (or copied from) another package."""
    meta = package_metadata(path)
    t = m["target"]
    want = {"device": t["device"], "torch": t["torch"], "precision": m["precision"],
            "io": json.dumps(m["io"], sort_keys=True)}
    key = {"device": "AOTI_DEVICE_KEY"}
    diffs = []
    for k, v in want.items():
        got = meta.get(f"{META_PREFIX}{k}")
        if k == "device" and meta.get(key[k]) not in (None, v):
            got = meta[key[k]]
        if got != v:
            diffs.append(f"{k}: package {got if got is not None else 'missing'}, manifest {v}")
    if m.get("gpu") and meta.get("AOTI_COMPUTE_CAPABILITY"):
        cc = m["gpu"]["compute_capability"].replace(".", "")
        if meta["AOTI_COMPUTE_CAPABILITY"] != cc:
            diffs.append(f"compute capability: package {meta['AOTI_COMPUTE_CAPABILITY']}, manifest {cc}")
    if diffs:
        raise EngineError(f"{path} and its manifest disagree ({'; '.join(d[:120] for d in diffs)}): the manifest was "
                          f"edited or belongs to another build; rebuild: `{build_command(m)}`")


def load_package(path: Path, device: torch.device):
    """``aoti_load_package``; single-threaded runner on CUDA (no per-call thread pool or
    stream handoff: what a CUDA-graph capture around the call needs)."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=device.type == "cuda",
                                                 device_index=index)
    except Exception as e:  # the loader raises RuntimeError from C++ for any broken archive
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EngineError(f"AOTInductor cannot load {path} ({first}); the file is damaged or was built by another "
                          "torch: rebuild the engine with `ladr-rt build --backend inductor`") from None


def package_runner(path: Path, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], "np.ndarray"]:  # noqa: F821
    """(ids, mask) on the host -> logits as numpy, for the build's validation."""
    model = load_package(path, device)

    def run(ids, mask):
        with torch.inference_mode():
            return model.loader.run([ids.to(device), mask.to(device)])[0].float().cpu().numpy()

    return run


class InductorDenoiser:
    """``denoiser(ids [2B, L] int32, key_mask [2B, L] bool, out [2B, N, K] fp32)``.

    On CUDA the call is capturable (no host sync, no allocation outside the caching
    allocator's pool), so the pipeline graphs the whole step around it: AOTInductor itself
    has no CUDA graphs. On the CPU it is called directly."""

    name = "inductor"
    ids_dtype = torch.int32
    logits_dtype = torch.float32

    def __init__(self, path: str | Path, device: str | torch.device, shapes: dict[str, list[int]]):
        self.device = canonical_device(device)
        self.path = Path(path)
        self.graph_safe = self.device.type == "cuda"
        self._shapes = shapes
        self.model = load_package(self.path, self.device)
        self._run = self.model.loader.run

    def __call__(self, input_ids: torch.Tensor, key_mask: torch.Tensor, out: torch.Tensor) -> None:
        for n, t in (("input_ids", input_ids), ("key_mask", key_mask), ("logits", out)):
            if t.device != self.device or not t.is_contiguous():
                raise ValueError("the inductor runner needs contiguous tensors on its device (the pipeline's "
                                 "preallocated buffers are)")
            if list(t.shape) != self._shapes[n]:
                raise ValueError(f"{n}: the engine {self.path} takes shape {self._shapes[n]}, got {list(t.shape)}; "
                                 "build an engine for this shape with `ladr-rt build`")
        if input_ids.dtype != torch.int32 or key_mask.dtype != torch.bool or out.dtype != torch.float32:
            raise ValueError("engine I/O is input_ids int32, key_mask bool -> logits float32; got "
                             f"{input_ids.dtype}, {key_mask.dtype}, {out.dtype}")
        with torch.inference_mode():
            out.copy_(self._run([input_ids, key_mask])[0])
