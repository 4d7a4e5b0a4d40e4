"""Independent slots (issue 15 part 1) and the scheduler above them (part 2).

A request's codes depend only on (model, prompt, size, sampler config, seed): whatever else
shares the batch, whichever slot it lands in, whenever it is admitted. Sampler-level checks
run on hand-built logits; pipeline and scheduler checks on the tiny checkpoint at 48x80
(3 x 5 = 15 codes).
"""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from ladr_rt.config import SAMPLERS, SamplerConfig
from ladr_rt.pipeline import LadrPipeline
from ladr_rt.samplers import RunState, make_sampler
from ladr_rt.serve import QueueFull, Scheduler
from conftest import requires_cuda
from test_samplers import MASK_ID, no_host_reads

H, W, K, T = 5, 6, 16, 12

# ------------------------------------------------------------------ sampler level, hand-built logits


def slot_logits(seed: int, step: int, N: int = H * W) -> torch.Tensor:
    """[2, N, K] cond + uncond logits of one request at one step: a function of its own
    (seed, step) only, as a model's would be of its prompt and current tokens."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    return torch.randn(2, N, K, generator=g) * 3


def batch_logits(st: RunState, seeds: list) -> torch.Tensor:
    """[2B, N, K]: each busy slot's own request's logits at its own step; idle rows random."""
    B = st.B
    out = torch.randn(2 * B, st.N, K) * 3
    steps = st.step.tolist()  # test-side read, outside the step
    for b, seed in enumerate(seeds):
        if seed is not None:
            lg = slot_logits(seed, steps[b])
            out[b], out[B + b] = lg[0], lg[1]
    return out


def solo(name: str, seed: int, steps: int, guidance: float):
    cfg = SamplerConfig(name=name, steps=steps, cfg=guidance, temperature=1.0, seed=seed)
    st = RunState(1, H, W, K, steps, MASK_ID, "cpu", seed)
    sampler = make_sampler(cfg, st)
    while st.any_masked():
        sampler.step(slot_logits(seed, int(st.step[0])))
    return st.z[0].clone(), st.trace_masked[: int(st.step[0]) + 1, 0].clone()


@pytest.mark.parametrize("name", SAMPLERS)
def test_slot_draws_and_results_equal_a_solo_run(name):
    """Three slots with different seeds, T and guidance, one admitted mid-run into the slot
    another request just left: each request ends with the solo B = 1 run's codes and trace."""
    reqs = {7: (12, 4.0), 8: (5, 1.5), 9: (9, 0.5), 10: (3, 2.0)}  # seed -> (steps, guidance)
    st = RunState(3, H, W, K, T, MASK_ID, "cpu")
    sampler = make_sampler(SamplerConfig(name=name, steps=T, cfg=4.0, temperature=1.0), st)
    for b in range(3):
        st.retire(b)
    seeds = [None, None, None]
    pending, got = [8, 10, 9, 7], {}
    for b in (2, 0):  # slot 1 stays idle at first
        seed = pending.pop(0)
        st.admit(b, seed, *reqs[seed])
        seeds[b] = seed
    while any(s is not None for s in seeds) or pending:
        sampler.step(batch_logits(st, seeds))
        for b, d in enumerate(st.read_done()):
            if d and seeds[b] is not None:
                n = int(st.step[b])
                got[seeds[b]] = (st.z[b].clone(), st.trace_masked[: n + 1, b].clone(), b)
                st.retire(b)
                seeds[b] = None
        for b in range(3):
            if seeds[b] is None and pending:
                seed = pending.pop(0)
                st.admit(b, seed, *reqs[seed])
                seeds[b] = seed
    assert sorted(got) == sorted(reqs)
    assert len({slot for _, _, slot in got.values()}) >= 2
    for seed, (steps, guidance) in reqs.items():
        z, masked = solo(name, seed, steps, guidance)
        assert torch.equal(got[seed][0], z), (seed, got[seed][2])
        assert torch.equal(got[seed][1], masked)


def _rows(st: RunState, slots) -> dict:
    """Every per-slot tensor's rows for ``slots`` (trace: columns), cloned."""
    out = {}
    for k, v in st.tensors().items():
        if k in ("z", "M", "step", "n0", "done", "nonfinite", "own", "steps", "steps_f32", "steps_f64", "cfg_hi",
                 "cfg_lo"):
            out[k] = v[list(slots)].clone()
        elif k.startswith("trace_"):
            out[k] = v[:, list(slots)].clone()
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", SAMPLERS)
def test_idle_slot_is_inert_and_admission_touches_only_its_slot(name):
    st = RunState(3, H, W, K, T, MASK_ID, "cpu")
    sampler = make_sampler(SamplerConfig(name=name, steps=T, cfg=4.0, temperature=1.0), st)
    st.retire(1)
    idle = _rows(st, [1])
    assert st.read_done() == [False, True, False]
    ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
    for _ in range(3):
        with no_host_reads():
            sampler.step(torch.randn(6, st.N, K) * 0.5)  # unconfident: nothing finishes early
    _same(_rows(st, [1]), idle)  # z, M, step, trace column and done flag of the idle slot: unchanged
    assert int(st.step[0]) == 3 and st.read_done()[1]
    others = _rows(st, [0, 2])
    st.admit(1, seed=5, steps=7, guidance=1.0)
    _same(_rows(st, [0, 2]), others)
    assert st.M[1].all() and int(st.step[1]) == 0 and not st.read_done()[1] and int(st.steps[1]) == 7
    with no_host_reads():
        sampler.step(torch.randn(6, st.N, K) * 0.5)  # unconfident: nothing finishes early
    others = _rows(st, [1, 2])
    st.retire(0)
    _same(_rows(st, [1, 2]), others)
    assert st.read_done()[0] and not st.M[0].any()
    assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs, "admission/retire moved a state tensor"


def test_non_finite_logits_stop_only_their_slot():
    st = RunState(2, H, W, K, T, MASK_ID, "cpu")
    sampler = make_sampler(SamplerConfig(name="ladr", steps=T, cfg=2.0, temperature=1.0), st)
    logits = torch.randn(4, st.N, K) * 0.5
    logits[3, 4, 1] = float("inf")  # slot 1's uncond row
    sampler.step(logits)
    assert st.nonfinite.tolist() == [False, True] and st.read_done() == [False, True]
    assert not st.keep_going(), "a whole-batch call still stops at the first NaN/inf"
    st.retire(1)
    st.admit(1, seed=0)
    assert st.nonfinite.tolist() == [False, False], "a new request starts clean"


def test_admission_refuses_a_longer_schedule_than_the_state():
    st = RunState(2, H, W, K, T, MASK_ID, "cpu")
    with pytest.raises(ValueError, match="between 1 and"):
        st.admit(0, seed=0, steps=T + 1, guidance=1.0)
    with pytest.raises(ValueError, match="both"):
        st.admit(0, seed=0, steps=4)


# ------------------------------------------------------------------ pipeline and scheduler on the tiny model

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a circle", "a yellow star"]
BATCH_CFG = SamplerConfig(name="ladr", steps=10, cfg=4.0, temperature=1.0)


class GreyVQ:
    """Codes -> grey tiles: the tests compare codes, and the diffusers decoder costs ~0.5 s a call."""

    def decode(self, codes):  # [n, h, w] -> [n, 3, 16h, 16w] in [0, 1]
        g = (codes % 256).float().div(255).repeat_interleave(16, 1).repeat_interleave(16, 2)
        return g.unsqueeze(1).expand(-1, 3, -1, -1)


@pytest.fixture(scope="module")
def pipes(tiny_ckpt):
    """Pipelines of batch 1, 2 and 3 over one model (grey decoder); "real": batch 3 with the
    checkpoint's VQ decoder."""
    p1 = LadrPipeline.from_pretrained(tiny_ckpt, height=48, width=80, prompt_budget=32)
    out = {"real": LadrPipeline(p1.denoiser, p1.tokenizer, p1.vq, p1.layout, p1.seq.spec, 3, p1.default_cfg,
                                p1.vocab_size)}
    for B in (1, 2, 3):
        out[B] = LadrPipeline(p1.denoiser, p1.tokenizer, GreyVQ(), p1.layout, p1.seq.spec, B, p1.default_cfg,
                              p1.vocab_size)
    return out


REQUESTS = [  # (prompt, seed, steps, guidance): different prompts, seeds, T and scales
    (PROMPTS[0], 1, 10, 4.0), (PROMPTS[1], 2, 3, 2.0), (PROMPTS[2], 3, 6, 4.0), (PROMPTS[3], 4, 3, 1.0),
    (PROMPTS[0], 5, 4, 4.0),
]


@pytest.fixture(scope="module")
def solo_codes(pipes):
    """Each request run alone through the unchanged Python API (batch 1)."""
    out = []
    for prompt, seed, steps, g in REQUESTS:
        codes, trace, evals, _ = pipes[1].generate_codes(prompt, dataclasses.replace(BATCH_CFG, seed=seed, steps=steps,
                                                                                     cfg=g))
        out.append((codes[0], trace["masked"][0], evals))
    return out


def serve_all(pipe, mode, order):
    sched = Scheduler(pipe, BATCH_CFG, mode=mode, start=False)
    try:
        futs = {i: sched.submit(*REQUESTS[i][:1], seed=REQUESTS[i][1], steps=REQUESTS[i][2], cfg=REQUESTS[i][3])
                for i in order}
        sched.run_until_idle()
        return {i: f.result(timeout=0) for i, f in futs.items()}, sched.steps_run
    finally:
        sched.close()


def _check(results, solo_codes):
    for i, r in results.items():
        codes, masked, evals = solo_codes[i]
        assert torch.equal(torch.from_numpy(r.codes), codes), (i, r.slot)
        assert r.trace["masked"] == masked and r.evaluations == evals


def test_modes_return_the_solo_images_and_continuous_takes_fewer_steps(pipes, solo_codes):
    runs = {
        "continuous": serve_all(pipes[2], "continuous", [0, 1, 2, 3, 4]),
        "continuous, other order, B=3": serve_all(pipes[3], "continuous", [3, 4, 1, 0, 2]),
        "static": serve_all(pipes[2], "static", [0, 1, 2, 3, 4]),
        "sequential": serve_all(pipes[1], "sequential", [0, 1, 2, 3, 4]),
    }
    for results, _ in runs.values():
        _check(results, solo_codes)
    cont, stat, seq = runs["continuous"][1], runs["static"][1], runs["sequential"][1]
    evals = [e for _, _, e in solo_codes]
    assert seq == sum(evals)
    assert cont < stat < seq, (cont, stat, seq)
    slots = {r.slot for r in runs["continuous, other order, B=3"][0].values()}
    assert slots == {0, 1, 2}
    # continuous: requests entered slots that others had just left, mid-run; static: only at batch starts
    mid = [r for r in runs["continuous"][0].values() if r.admitted_step > 0]
    assert mid and all(r.admitted_step < cont for r in mid)
    starts = sorted({r.admitted_step for r in runs["static"][0].values()})
    assert starts[0] == 0 and len(starts) == 3  # 5 requests, 2 slots: three batches
    # the legacy batch call: row b draws from seed + b, so it is the solo call with that seed
    codes, _, _, _ = pipes[2].generate_codes([PROMPTS[1], PROMPTS[2]], dataclasses.replace(BATCH_CFG, seed=2, steps=3,
                                                                                           cfg=2.0))
    assert torch.equal(codes[0], solo_codes[1][0])


def test_queue_full_and_bad_requests_come_back_on_the_future(pipes):
    sched = Scheduler(pipes[2], BATCH_CFG, max_queue=2, start=False)
    try:
        f1, f2, f3 = (sched.submit(PROMPTS[0], seed=i) for i in range(3))
        assert isinstance(f3.exception(timeout=0), QueueFull) and "queue is full (2 waiting" in str(f3.exception())
        assert not f1.done() and not f2.done()
        assert "over this scheduler's 10" in str(sched.submit(PROMPTS[0], steps=11).exception(timeout=0))
        assert "switch it on or off" in str(sched.submit(PROMPTS[0], cfg=0.0).exception(timeout=0))
        with pytest.raises(RuntimeError, match="belong to a serve.Scheduler"):
            pipes[2].generate_codes([PROMPTS[0]] * 2, BATCH_CFG)
        sched.run_until_idle()
        assert f1.result(timeout=0).codes.shape == (3, 5)
    finally:
        sched.close()
    pipes[2].generate_codes([PROMPTS[0]] * 2, BATCH_CFG)  # the pipeline is free again


def test_futures_complete_from_other_threads(pipes, solo_codes):
    with Scheduler(pipes["real"], BATCH_CFG) as sched:
        futs = {}

        def client(i):
            p, seed, steps, g = REQUESTS[i]
            futs[i] = sched.submit(p, seed=seed, steps=steps, cfg=g)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(REQUESTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {i: f.result(timeout=60) for i, f in futs.items()}
    _check(results, solo_codes)
    assert all(r.image.size == (80, 48) for r in results.values())


def test_scheduler_replays_one_step_graph_with_every_slot_generator(pipes, solo_codes):
    """The whole step captured once (the CPU stand-in of test_gpu_ready) with all B slot
    generators registered; admissions then write the captured buffers between replays."""
    import copy

    from test_gpu_ready import RecordingGraphs

    p2 = pipes[2]
    den = copy.copy(p2.denoiser)
    den.graph_safe = True
    pipe = LadrPipeline(den, p2.tokenizer, p2.vq, p2.layout, p2.seq.spec, 2, p2.default_cfg, p2.vocab_size)
    graphs = pipe.graphs = RecordingGraphs()
    sched = Scheduler(pipe, BATCH_CFG, start=False)
    try:
        st = sched.state
        assert len(graphs.generators) == 1 and list(graphs.generators[0]) == st.gens
        ptrs = {k: v.data_ptr() for k, v in st.tensors().items()} | {"ids": pipe.ids.data_ptr()}
        futs = [sched.submit(p, seed=seed, steps=steps, cfg=g) for p, seed, steps, g in REQUESTS]
        sched.run_until_idle()
        _check({i: f.result(timeout=0) for i, f in enumerate(futs)}, solo_codes)
        assert len(graphs.generators) == 1, "an admission forced a second capture"
        assert ({k: v.data_ptr() for k, v in st.tensors().items()} | {"ids": pipe.ids.data_ptr()}) == ptrs
    finally:
        sched.close()


def test_cancel_frees_a_waiting_request_at_once_and_a_running_slot_at_the_next_step(pipes, solo_codes):
    """A cancelled future (an HTTP client that went away): queued, it stops counting against
    max_queue; running, its slot is retired at the next step boundary and taken by the next
    request, whose image is still its solo run's."""
    sched = Scheduler(pipes[1], BATCH_CFG, max_queue=2, start=False)
    try:
        running = sched.submit(REQUESTS[0][0], seed=REQUESTS[0][1], steps=REQUESTS[0][2], cfg=REQUESTS[0][3])
        waiting = sched.submit(PROMPTS[1], seed=9)
        assert sched.run_once() and sched.busy == 1 and sched.waiting == 1
        assert sched.cancel(waiting) and sched.waiting == 0 and sched.cancelled == 1
        p, seed, steps, g = REQUESTS[1]
        later = sched.submit(p, seed=seed, steps=steps, cfg=g)
        assert sched.waiting == 1 and not later.done(), "the cancelled request still held its queue place"
        assert running.cancel()
        steps_before = sched.steps_run
        assert sched.run_once()  # retires the cancelled slot, admits `later`, steps it
        assert sched.cancelled == 2 and sched.busy == 1 and sched.waiting == 0
        sched.run_until_idle()
        assert sched.busy == 0
        assert sched.steps_run - steps_before == solo_codes[1][2], "the cancelled request kept stepping"
        assert running.cancelled() and waiting.cancelled()
        _check({1: later.result(timeout=0)}, solo_codes)
        assert not sched.cancel(later), "a finished request cannot be cancelled"
    finally:
        sched.close()


class BlockingVQ(GreyVQ):
    """A decoder that holds its first call until released, and records its thread."""

    def __init__(self):
        self.release, self.entered, self.threads, self.fail = threading.Event(), threading.Event(), [], False

    def decode(self, codes):
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(30), "never released"
        if self.fail:
            raise RuntimeError("decoder broke")
        return super().decode(codes)


def test_vq_decode_runs_off_the_step_loop(pipes, solo_codes):
    """While a finished request's decode is held, the loop admits the next request into the
    freed slot and steps it to the end: decoding never stalls the batch. A decoder error fails
    only the requests it was decoding."""
    p1 = pipes[1]
    vq = BlockingVQ()
    pipe = LadrPipeline(p1.denoiser, p1.tokenizer, vq, p1.layout, p1.seq.spec, 1, p1.default_cfg, p1.vocab_size)
    with Scheduler(pipe, BATCH_CFG) as sched:
        first, second = (sched.submit(p, seed=seed, steps=steps, cfg=g) for p, seed, steps, g in REQUESTS[:2])
        assert vq.entered.wait(30)
        # first's decode is held; second still runs all its steps on the loop thread meanwhile
        deadline = threading.Event()
        for _ in range(300):
            if sched.steps_run == solo_codes[0][2] + solo_codes[1][2] and sched.busy == 0:
                break
            deadline.wait(0.05)
        assert sched.steps_run == solo_codes[0][2] + solo_codes[1][2] and sched.busy == 0
        assert not first.done() and not second.done()
        vq.release.set()
        _check({0: first.result(timeout=30), 1: second.result(timeout=30)}, solo_codes)
        assert set(vq.threads) == {"ladr-rt-decode_0"}, vq.threads
        assert first.result().decode_seconds > 0
        vq.fail = True
        broken = sched.submit(PROMPTS[0], seed=11)
        with pytest.raises(RuntimeError, match="decoder broke"):
            broken.result(timeout=30)
        vq.fail = False
        p, seed, steps, g = REQUESTS[3]
        _check({3: sched.submit(p, seed=seed, steps=steps, cfg=g).result(timeout=30)}, solo_codes)


def test_a_finished_request_is_freed_without_the_cyclic_gc(pipes):
    """Once the caller drops a finished request's future, its result (image, codes, trace) is
    freed by reference counting alone: no cycle through the future's callbacks, the scheduler
    or the HTTP layer's asyncio bridge holds it until the cyclic GC (which, in a server holding
    a model, runs rarely: its RSS grew by tens of MiB per 1000 requests with such a cycle)."""
    import asyncio
    import gc
    import weakref

    from ladr_rt.serve.app import _bridge

    gc.collect()
    gc.disable()
    try:
        with Scheduler(pipes[1], BATCH_CFG) as sched:
            fut = sched.submit(PROMPTS[0], seed=1, steps=3)
            res = fut.result(timeout=30)
            sched._decoder.submit(lambda: None).result()  # the decode thread has let go of its job
            refs = [weakref.ref(res), weakref.ref(fut)]
            del res, fut
            assert [r() for r in refs] == [None, None]

            async def through_the_bridge():
                f = sched.submit(PROMPTS[1], seed=2, steps=3)
                r = await _bridge(f, asyncio.get_running_loop())
                return weakref.ref(r), weakref.ref(f)

            refs = asyncio.run(through_the_bridge())
            sched._decoder.submit(lambda: None).result()
            # The loop thread may still be between steps with the request in a local for a moment
            # (seen under CPU load); with the cyclic GC off, only reference counting can free it.
            for _ in range(200):
                if [r() for r in refs] == [None, None]:
                    break
                time.sleep(0.01)
            assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def test_decode_thread_copies_codes_on_the_decode_stream(pipes, solo_codes, monkeypatch):
    """The finished codes' host copy runs on the decode stream and waits on its own event: a
    copy on the default stream (``grid.cpu()`` after the decode block) queues behind the step
    the loop launched since. torch.cuda's stream pieces are faked here; the GPU test below
    runs the real ones."""
    import contextlib

    from ladr_rt.serve import scheduler as sched_mod

    current = ["default"]

    class FakeStream:
        def wait_event(self, ev):
            pass

    class FakeEvent:
        synced = 0

        def record(self):
            pass

        def synchronize(self):
            FakeEvent.synced += 1

    @contextlib.contextmanager
    def stream(s):
        prev, current[0] = current[0], s
        try:
            yield
        finally:
            current[0] = prev

    copies = []

    def copy_to_host(grid):
        copies.append(current[0])
        return grid.clone(), FakeEvent()

    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    monkeypatch.setattr(sched_mod, "_copy_to_host", copy_to_host)
    sched = Scheduler(pipes[1], BATCH_CFG, start=False)
    decode_stream = sched._decode_stream = FakeStream()
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)  # the step side's "ready" event too
    try:
        p, seed, steps, g = REQUESTS[1]
        fut = sched.submit(p, seed=seed, steps=steps, cfg=g)
        sched.run_until_idle()
        _check({1: fut.result(timeout=30)}, solo_codes)
    finally:
        sched.close()
    assert copies == [decode_stream] and FakeEvent.synced == 1


@pytest.mark.gpu
@requires_cuda
def test_decode_thread_host_copy_does_not_wait_for_the_default_stream(tiny_ckpt):
    """A finished grid's codes reach its future while the default stream is still busy (a
    ~1 s sleep kernel stands in for the next step)."""
    import types
    from concurrent.futures import Future

    p = LadrPipeline.from_pretrained(tiny_ckpt, height=48, width=80, prompt_budget=32, device="cuda")
    pipe = LadrPipeline(p.denoiser, p.tokenizer, GreyVQ(), p.layout, p.seq.spec, 1, p.default_cfg, p.vocab_size)
    sched = Scheduler(pipe, BATCH_CFG, start=False)
    try:
        grid = torch.randint(0, 100, (1, 3, 5), device="cuda")
        want = grid.cpu()
        ready = torch.cuda.Event()
        ready.record()
        torch.cuda._sleep(2_000_000_000)  # the next step, on the default stream
        req = types.SimpleNamespace(future=Future(), guidance=4.0, admitted_step=0, admitted=0.0, submitted=0.0)
        sched._decode(grid, ready, [(0, req, {"rescued": []}, 0.0)])
        assert req.future.done()
        busy = not torch.cuda.current_stream().query()
        assert torch.equal(torch.from_numpy(req.future.result().codes), want[0])
        assert busy, "the host copy waited for the default stream's next step"
    finally:
        torch.cuda.synchronize()
        sched.close()
