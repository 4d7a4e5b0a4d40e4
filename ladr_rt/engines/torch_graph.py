"""torch-graph: the eager model with its evaluation captured in a CUDA graph.

The fair no-TensorRT baseline on a GPU (gpt-fast style): same kernels as eager, minus the
per-kernel launch overhead. ``graph_safe`` lets the pipeline capture the whole step
(evaluation + sampler) instead; on its own, each call replays the captured evaluation.
Static shapes only: the pipeline's buffers never change size or address during a run.
"""
from __future__ import annotations

import torch

from ..denoiser import EagerDenoiser
from ..graphs import CUDA_GRAPHS
from .manifest import EngineError


class TorchGraphDenoiser(EagerDenoiser):
    name = "torch-graph"
    graph_safe = True

    def __init__(self, model, image_positions: torch.Tensor, attention: str = "auto"):
        super().__init__(model, image_positions, attention)
        if self.device.type != "cuda":
            raise EngineError("the torch-graph backend needs a CUDA device (CUDA graphs); use the eager backend on CPU")
        self.graph: torch.cuda.CUDAGraph | None = None
        self._bound: tuple | None = None
        self.cuda_graph = True  # False: plain eager calls (the pipeline sets it while it graphs the whole step)

    def drop_graph(self) -> None:
        """Forget the captured evaluation: the next call captures again."""
        if self.graph is not None:
            import contextlib

            with contextlib.suppress(Exception):
                self.graph.reset()
        self.graph, self._bound = None, None

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, key_mask: torch.Tensor, out: torch.Tensor) -> None:
        if not self.cuda_graph or torch.cuda.is_current_stream_capturing():
            super().__call__(input_ids, key_mask, out)
            return
        key = (input_ids.data_ptr(), key_mask.data_ptr(), out.data_ptr())
        if key != self._bound or self.graph is None:
            # The pipeline's capture code: warm-up and capture on one side stream, streams and
            # the half-made graph cleaned up when capture fails.
            self.graph = None
            try:
                self.graph = CUDA_GRAPHS.capture(lambda: EagerDenoiser.__call__(self, input_ids, key_mask, out),
                                                 self.device)
            except Exception as e:
                import warnings

                warnings.warn(f"CUDA-graph capture of the torch-graph evaluation failed ({type(e).__name__}: "
                              f"{str(e).strip()[:160]}); running it eagerly", RuntimeWarning, stacklevel=2)
                self.cuda_graph = False
                super().__call__(input_ids, key_mask, out)  # this call's result, whatever the failure left in `out`
                return
            self._bound = key
        self.graph.replay()  # on the current stream
