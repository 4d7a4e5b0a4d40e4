"""CPU intra-op threads: one for a small model's steps (torch's spinning threads lose 10x and
more on a shared machine), more for big matmuls, and the user's choice always wins."""
from __future__ import annotations

import pytest
import torch

from ladr_rt import threads
from ladr_rt.config import SamplerConfig


@pytest.fixture
def two_threads(monkeypatch):
    """torch at 2 threads, as on this project's 2-core machines, whatever this host has; the
    count is put back after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "AT_IMPORT", 2)
    for k in threads.ENV:
        monkeypatch.delenv(k, raising=False)
    yield
    torch.set_num_threads(before)


def test_choice_follows_the_work(two_threads):
    small = threads.largest_matmul_flops(128, 384, 2, 350)  # the shipped testbed model at 256x256
    big = threads.largest_matmul_flops(4096, 12288, 2, 1120)  # DiMOO 8B at 512x512
    assert threads.choose(small) == 1
    assert threads.choose(big) == 2  # capped at torch's own count
    assert threads.choose(None) is None  # nothing to size: leave torch alone


def test_the_users_setting_wins(two_threads, monkeypatch):
    small = threads.largest_matmul_flops(128, 384, 2, 350)
    assert threads.choose(small, requested=2) == 2
    with pytest.raises(ValueError, match="positive integer"):
        threads.choose(small, requested=0)
    torch.set_num_threads(1)  # after import: the user's call
    assert threads.choose(threads.largest_matmul_flops(4096, 12288, 2, 1120)) is None
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose(small) is None


@pytest.fixture(scope="module")
def spied():
    """The shipped model's pipeline, and the thread count torch had at each of its evaluations."""
    from ladr_rt.pipeline import LadrPipeline

    pipe = LadrPipeline.from_pretrained(None)
    seen: list[int] = []
    pipe.denoiser.model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    return pipe, seen


@pytest.mark.parametrize("env,requested,inside", [(None, None, 1), ("2", None, 2), (None, 2, 2)])
def test_shipped_model_steps_on_the_chosen_threads(two_threads, monkeypatch, spied, env, requested, inside):
    pipe, seen = spied
    if env is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    monkeypatch.setattr(pipe, "cpu_threads", requested)
    seen.clear()
    pipe.generate_codes("a red circle", SamplerConfig(steps=4, seed=0))
    assert seen and set(seen) == {inside}
    assert torch.get_num_threads() == 2  # the caller's count is back


def test_scheduler_steps_on_the_chosen_threads(two_threads, spied):
    from ladr_rt.serve import Scheduler

    pipe, seen = spied
    seen.clear()
    sched = Scheduler(pipe, SamplerConfig(steps=4), start=False)
    try:
        fut = sched.submit("a red circle", seed=0)
        while not fut.done():
            sched.run_once()
        fut.result(timeout=60)
    finally:
        sched.close()
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2


def test_a_bad_thread_count_is_refused_before_loading():
    from ladr_rt.pipeline import LadrPipeline

    with pytest.raises(ValueError, match="positive integer"):
        LadrPipeline.from_pretrained(None, cpu_threads=-1)
    import numpy as np

    # a numpy integer is a count like every other count of the API
    assert LadrPipeline.from_pretrained(None, cpu_threads=np.int64(1)).cpu_threads == 1
