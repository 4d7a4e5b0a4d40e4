"""Two exact claims: TensorRT's refusal of a buffer (``set_tensor_address`` returns False, it
does not raise) becomes a clear error naming the tensor; and a sampler step allocates no
[B, N, K] temporary, only small ones (ladr_rt/samplers.py's docstring)."""
from __future__ import annotations

import pytest
import torch

from ladr_rt.config import SAMPLERS
from ladr_rt.engines import EngineError
from test_samplers import make, random_logits


class FakeContext:
    def __init__(self, refuse: str | None):
        self.refuse, self.bound = refuse, {}

    def set_tensor_address(self, name, ptr):
        if name == self.refuse:
            return False
        self.bound[name] = ptr
        return True


def _trt_denoiser(refuse):
    from ladr_rt.engines.trt import TrtDenoiser

    den = object.__new__(TrtDenoiser)  # no TensorRT here: only the binding logic is exercised
    den.io = {"input_ids": ((2, 5), "INT32"), "key_mask": ((2, 5), "BOOL"), "logits": ((2, 3, 4), "FLOAT")}
    den.context = FakeContext(refuse)
    return den


def _buffers():
    return torch.zeros(2, 5, dtype=torch.int32), torch.ones(2, 5, dtype=torch.bool), torch.empty(2, 3, 4)


@pytest.mark.parametrize("refused", ["input_ids", "key_mask", "logits"])
def test_refused_tensor_address_names_the_tensor(refused):
    den = _trt_denoiser(refused)
    with pytest.raises(EngineError, match=rf"refused the buffer of tensor '{refused}'.*set_tensor_address returned "
                                          r"False.*aligned"):
        den._bind(*_buffers())


def test_accepted_addresses_bind_all_three():
    den = _trt_denoiser(None)
    ids, mask, out = _buffers()
    den._bind(ids, mask, out)
    assert den.context.bound == {"input_ids": ids.data_ptr(), "key_mask": mask.data_ptr(), "logits": out.data_ptr()}


def _step_allocations(sampler, logits) -> list[int]:
    """Bytes each op of one step allocated and still held when it returned (its outputs: what a
    temporary is), from the CPU profiler's memory accounting."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sampler.step(logits)
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_allocates_only_small_temporaries(name):
    B, H, W, K = 2, 6, 7, 256
    sampler, st = make(name, H=H, W=W, K=K, temp=1.0, cfg=4.0, B=B)
    g = torch.Generator().manual_seed(0)
    logits = random_logits(g, B, st.N, K)
    sampler.step(logits)  # first step: whatever is allocated once
    allocs = _step_allocations(sampler, logits)
    bnk = B * st.N * K * 4
    small = 4 * B * st.N * 8  # a few [B, N] int64 elements
    assert allocs, "the profiler saw no allocation: the check itself is broken"
    assert max(allocs) <= small < bnk, (max(allocs), small, bnk)

    # the check catches a [B, N, K] temporary when a step makes one
    predict = sampler.predict
    sampler.predict = lambda lg, need_margin: (predict(lg, need_margin), st.l.exp())
    assert max(_step_allocations(sampler, logits)) >= bnk
