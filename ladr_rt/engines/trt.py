"""TensorRT: strongly typed plan from the engine's ONNX, and a runner over named tensors.

``tensorrt`` is imported lazily (only ``--backend tensorrt`` and ``.plan`` engines need it),
so the package and CLI work without it. Written against the TensorRT 10 Python API (and
TensorRT 11's, where the STRONGLY_TYPED flag is deprecated because every network is).

Precision is carried by the ONNX graph's types (STRONGLY_TYPED network: no fp16/bf16
builder flags, no layer-precision guessing), so the norms' fp32 statistics and the fp32
logits the export wrote stay fp32. Shapes are static: one resolution, one batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..denoiser import canonical_device
from ..fileio import atomic_write_bytes

from .manifest import BuildError, EngineError

INSTALL = "pip install 'ladr-rt[tensorrt]' (needs an NVIDIA GPU and driver)"


def import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(f"TensorRT is not installed; {INSTALL}") from None
    if not hasattr(trt, "Builder"):  # the PyPI placeholder package imports but has no API
        raise EngineError(f"the installed `tensorrt` package is a placeholder without the TensorRT API; {INSTALL}")
    return trt


def compute_capability(device: torch.device | str = "cuda") -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def build_plan(onnx_path: Path, plan_path: Path, precision: str, workspace_gib: float = 8.0,
               timing_cache: str | Path | None = None, log=print) -> None:
    """Parse ``onnx_path`` into a strongly typed network and write the plan to ``plan_path``.

    fp32 plans are built with BuilderFlag.TF32 cleared: it is on by default ("Allow (but not
    require) computations on tensors of type DataType.FLOAT to use TF32 ... Enabled by
    default", TensorRT IBuilderConfig docs) and strong typing does not touch it (TensorRT 11,
    where every network is strongly typed, still has kTF32): an fp32 plan with TF32 fails its
    own fp32 validation. bf16/fp16 graphs keep the default (their fp32 islands are norms).

    ``timing_cache`` (already resolved to an absolute path, its directory created by the
    build) is read if present and valid, else replaced by a fresh one; it is written after the
    plan, and a failure to write it is a warning: the plan is never lost to the cache."""

    trt = import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 deprecates the flag (always strongly typed) but keeps it for compatibility.
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser finds NAME.onnx.data beside the file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = None
    if cache_path is not None and cache_path.is_file():
        try:
            cache = config.create_timing_cache(cache_path.read_bytes())
        except Exception as e:  # noqa: BLE001 - TensorRT raises its own types; a bad cache only costs time
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            log(f"[build] warning: timing cache {cache_path} is unreadable ({first}); starting a fresh one")
            cache = None
        # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused by
        # TensorRT (set_timing_cache returns False), and replaced rather than trusted.
        if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
            log(f"[build] warning: timing cache {cache_path} was made by another GPU or TensorRT version; "
                "starting a fresh one")
            cache = None
    if cache is None:
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    dynamic = False
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        dynamic |= any(d < 0 for d in shape)
        profile.set_shape(t.name, shape, shape, shape)  # static: min = opt = max
    if dynamic:  # the exporter writes fixed shapes; a profile only matters if a dim slipped through
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT failed to build an engine from {onnx_path.name} at {precision} (see the "
                         "TensorRT log above); try a larger workspace_gib in the profile")
    atomic_write_bytes(plan_path, plan)
    del plan
    if cache_path is not None:
        try:
            atomic_write_bytes(cache_path, config.get_timing_cache().serialize())
        except (OSError, AttributeError) as e:
            why = getattr(e, "strerror", None) or e
            log(f"[build] warning: could not write the timing cache {cache_path} ({why}); the plan is unaffected, "
                "the next build just tunes from scratch")


TORCH_OF = {"INT32": torch.int32, "BOOL": torch.bool, "FLOAT": torch.float32, "HALF": torch.float16,
            "BF16": torch.bfloat16, "INT64": torch.int64}


class TrtDenoiser:
    """``denoiser(ids [2B, L] int32, key_mask [2B, L] bool, out [2B, N, K] fp32)`` on a TensorRT plan.

    Tensors are bound by name to the caller's preallocated CUDA buffers once; each call is
    one ``execute_async_v3``, replayed from a CUDA graph after the first call. Inside a
    step capture (the pipeline's) it enqueues on the capturing stream instead.
    """

    name = "tensorrt"
    ids_dtype = torch.int32
    logits_dtype = torch.float32
    graph_safe = True

    def __init__(self, plan_path: str | Path, device: str | torch.device = "cuda", cuda_graph: bool = True):
        trt = import_trt()
        self.device = canonical_device(device)
        if self.device.type != "cuda":
            raise EngineError("a TensorRT engine runs on a CUDA device; use --device cuda")
        self.path = Path(plan_path)
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):  # TensorRT allocates on the current device
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT cannot deserialize {self.path} (truncated, or built by another TensorRT "
                              "version or GPU); rebuild it with `ladr-rt build --backend tensorrt`")
        with torch.cuda.device(self.device):
            self.context = self.engine.create_execution_context()
        self.io = {}
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            self.io[n] = (tuple(self.engine.get_tensor_shape(n)), str(self.engine.get_tensor_dtype(n)).split(".")[-1])
        if set(self.io) != {"input_ids", "key_mask", "logits"}:
            raise EngineError(f"{self.path} has I/O {sorted(self.io)}, not input_ids, key_mask -> logits; rebuild it")
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self._bound: tuple | None = None

    def io_spec(self) -> dict[str, tuple[list, str]]:
        """{name: (shape, dtype)} of the plan, in the manifest's dtype names."""
        names = {torch.int32: "int32", torch.bool: "bool", torch.float32: "float32", torch.float16: "float16",
                 torch.bfloat16: "bfloat16", torch.int64: "int64"}
        return {n: (list(shape), names.get(TORCH_OF.get(dt), dt)) for n, (shape, dt) in self.io.items()}

    def _bind(self, input_ids, key_mask, out) -> None:
        for n, t in (("input_ids", input_ids), ("key_mask", key_mask), ("logits", out)):
            shape, dt = self.io[n]
            if tuple(t.shape) != shape or t.dtype != TORCH_OF.get(dt) or not t.is_contiguous():
                raise ValueError(f"{n}: engine wants {dt} {list(shape)}, got {t.dtype} {list(t.shape)}")
            # TensorRT reports a name the plan lacks or a pointer it cannot use (misaligned) by
            # returning False, not by raising; executing after that reads or writes elsewhere.
            if not self.context.set_tensor_address(n, t.data_ptr()):
                raise EngineError(f"TensorRT refused the buffer of tensor {n!r} (set_tensor_address returned False "
                                  f"for address {t.data_ptr():#x}: the plan has no tensor of that name, or the "
                                  "address is not aligned as TensorRT needs); pass a buffer allocated on its own "
                                  "(not an offset view), or rebuild the plan with `ladr-rt build --backend tensorrt`")

    def __call__(self, input_ids: torch.Tensor, key_mask: torch.Tensor, out: torch.Tensor) -> None:
        key = (input_ids.data_ptr(), key_mask.data_ptr(), out.data_ptr())
        if key != self._bound:
            self._bind(input_ids, key_mask, out)
            self._bound, self.graph = key, None
        cur = torch.cuda.current_stream(self.device)
        if torch.cuda.is_current_stream_capturing():  # part of the pipeline's step graph
            self._enqueue(cur)
            return
        if not self.cuda_graph:
            self.stream.wait_stream(cur)
            self._enqueue(self.stream)
            cur.wait_stream(self.stream)
            return
        if self.graph is None:
            self.stream.wait_stream(cur)
            self._enqueue(self.stream)  # first run outside capture: TensorRT allocates lazily
            self.stream.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=self.stream):
                self._enqueue(self.stream)
            self.graph = g
        self.graph.replay()  # on the current stream

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path}")


def plan_runner(plan_path: Path, rows: int, L: int, N: int, K: int, device: torch.device):
    """(ids, mask) -> logits as numpy, for the build's validation."""
    den = TrtDenoiser(plan_path, device, cuda_graph=False)
    ids = torch.empty(rows, L, dtype=torch.int32, device=device)
    mask = torch.empty(rows, L, dtype=torch.bool, device=device)
    out = torch.empty(rows, N, K, dtype=torch.float32, device=device)

    def run(i, m) -> np.ndarray:
        ids.copy_(i)
        mask.copy_(m)
        den(ids, mask, out)
        torch.cuda.synchronize(device)
        return out.cpu().numpy()

    return run
