"""onnxruntime runner: the engine's ONNX graph behind the ``Denoiser`` call signature.

CPU EP everywhere; CUDA EP (and the TensorRT EP when asked) where onnxruntime-gpu is
installed. Inputs and the output are bound to the caller's preallocated torch tensors
(IO binding by pointer), so a call copies nothing through numpy and allocates no output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..denoiser import canonical_device

from .manifest import EngineError

NP_DTYPES = {torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_, torch.float32: np.float32,
             torch.float16: np.float16}
TORCH_DTYPES = {"int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "float32": torch.float32,
                "float16": torch.float16, "bfloat16": torch.bfloat16}


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise EngineError("onnxruntime is not installed; pip install 'ladr-rt[onnx]' (CPU) or "
                          "'ladr-rt[gpu]' (CUDA)") from None
    return onnxruntime


ORT_DTYPES = {"tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}
CUDA_LIBS = ("the CUDA/cuDNN libraries onnxruntime-gpu was built against were not found or do not match it "
             "(see https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements); "
             "install them, or run with --device cpu")


def providers_for(device: torch.device, tensorrt_ep: bool = False, tf32: bool | None = None) -> list:
    """onnxruntime ``providers`` for ``device``: names, or (name, options) for the CUDA EP.

    The CUDA EP gets ``device_id`` (cuda:N runs on GPU N, not on 0) and, with ``tf32=False``,
    ``use_tf32=0``: the EP's default is TF32 on (onnxruntime cuda_execution_provider_info.h:
    ``bool use_tf32{true}``), which rounds fp32 matmul inputs to 10 mantissa bits: an fp32
    engine would not be fp32."""
    ort = import_ort()
    have = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in have:
            raise EngineError("this onnxruntime has no CUDA provider; pip install 'ladr-rt[gpu]' (onnxruntime-gpu, "
                              "instead of onnxruntime) or run with --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        opts = {"device_id": str(index)}
        if tf32 is False:
            opts["use_tf32"] = "0"
        want = (["TensorrtExecutionProvider"] if tensorrt_ep and "TensorrtExecutionProvider" in have else [])
        return want + [("CUDAExecutionProvider", opts)]
    return ["CPUExecutionProvider"]


def provider_names(providers: list) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def open_session(path: Path, providers: list, threads: int | None = None):
    ort = import_ort()
    names = provider_names(providers)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's per-node warnings are not actionable for a user
    if threads:
        so.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types without a common base
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "NOT_IMPLEMENTED" in first:
            raise EngineError(f"onnxruntime ({', '.join(names)}) has no kernels for {path}'s types "
                              f"({first[:160]})") from None
        cuda_words = ("CUDAExecutionProvider", "providers_cuda", "libcu", "cudnn", "cuDNN", "CUDA error")
        if "CUDAExecutionProvider" in names and any(w in str(e) for w in cuda_words):
            raise EngineError(f"onnxruntime could not start its CUDA provider for {path} ({first[:160]}): "
                              f"{CUDA_LIBS}") from None
        raise EngineError(f"onnxruntime cannot load {path} ({first[:200]}); the file is truncated or corrupt: "
                          "rebuild the engine with `ladr-rt build`") from None
    # A provider that fails to start is dropped with a log line and the session falls back
    # to the CPU (onnxruntime issues #23372, #21424): a CUDA run would then bind device
    # pointers to a CPU session. Refuse instead.
    got = sess.get_providers()
    missing = [n for n in names if n not in got]
    if missing:
        cause = CUDA_LIBS if "CUDAExecutionProvider" in missing else "its libraries were not found"
        raise EngineError(f"onnxruntime did not start {', '.join(missing)} for {path} (the session has only "
                          f"{', '.join(got)}): {cause}")
    return sess


class OrtDenoiser:
    """``denoiser(ids [2B, L] int32, key_mask [2B, L] bool, out [2B, N, K] fp32)``."""

    name = "onnxruntime"
    ids_dtype = torch.int32
    logits_dtype = torch.float32

    def __init__(self, onnx_path: str | Path, device: str | torch.device = "cpu", tensorrt_ep: bool = False,
                 threads: int | None = None, tf32: bool | None = None):
        """``tf32=False`` keeps fp32 matmuls fp32 on the CUDA EP (``load_denoiser`` passes it for
        fp32 engines); None leaves onnxruntime's default."""
        self.device = canonical_device(device)
        self.path = Path(onnx_path)
        self.session = open_session(self.path, providers_for(self.device, tensorrt_ep, tf32), threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0]
        missing = {"input_ids", "key_mask"} - set(self.inputs)
        if missing or self.output.name != "logits" or len(self.session.get_outputs()) != 1:
            raise EngineError(f"{self.path} does not have the engine I/O (input_ids, key_mask -> logits); "
                              "rebuild it with `ladr-rt build`")
        self._shapes = {a.name: list(a.shape) for a in (*self.inputs.values(), self.output)}
        self.binding = self.session.io_binding()
        self._bound: tuple | None = None
        self._dev = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)

    def io_spec(self) -> dict[str, tuple[list, str]]:
        """{name: (shape, dtype)} of the loaded graph, in the manifest's dtype names."""
        return {a.name: (list(a.shape), ORT_DTYPES.get(a.type, a.type))
                for a in (*self.session.get_inputs(), *self.session.get_outputs())}

    def _bind(self, name: str, t: torch.Tensor, out: bool) -> None:
        if list(t.shape) != self._shapes[name]:  # binding by pointer: a wrong size would be read past
            raise ValueError(f"{name}: the engine {self.path} takes shape {self._shapes[name]}, got "
                             f"{list(t.shape)}; build an engine for this shape with `ladr-rt build`")
        kind, idx = self._dev
        fn = self.binding.bind_output if out else self.binding.bind_input
        fn(name, kind, idx, NP_DTYPES[t.dtype], list(t.shape), t.data_ptr())

    def __call__(self, input_ids: torch.Tensor, key_mask: torch.Tensor, out: torch.Tensor) -> None:
        for t in (input_ids, key_mask, out):
            if not t.is_contiguous() or t.device != self.device:
                raise ValueError("onnxruntime runner needs contiguous tensors on its device (the pipeline's "
                                 "preallocated buffers are)")
        if input_ids.dtype != torch.int32 or key_mask.dtype != torch.bool or out.dtype != torch.float32:
            raise ValueError("engine I/O is input_ids int32, key_mask bool -> logits float32; got "
                             f"{input_ids.dtype}, {key_mask.dtype}, {out.dtype}")
        # The pipeline passes the same buffers every step: bind once, then just run.
        key = (input_ids.data_ptr(), key_mask.data_ptr(), out.data_ptr(), input_ids.shape, out.shape)
        if key != self._bound:
            self.binding.clear_binding_inputs()
            self.binding.clear_binding_outputs()
            self._bind("input_ids", input_ids, False)
            self._bind("key_mask", key_mask, False)
            self._bind("logits", out, True)
            self._bound = key
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch kernels
        self.session.run_with_iobinding(self.binding)
