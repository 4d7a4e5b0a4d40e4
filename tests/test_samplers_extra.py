"""The Prophet-style and threshold samplers on hand-built logits: the invariants every
sampler keeps, and each one's own rule."""
from __future__ import annotations

import math

import torch

from ladr_rt.config import SAMPLERS, ProphetParams, SamplerConfig, ThresholdParams
from ladr_rt.samplers import REGISTRY, RunState, make_sampler
from ladr_rt.schedule import baseline_keep, ladr_keep
from test_samplers import random_logits, run

MASK_ID = 126336
EXTRA = ["prophet", "threshold"]


def make(name, H=6, W=7, K=16, T=16, temp=1.0, cfg=0.0, seed=0, B=1, **params):
    scfg = SamplerConfig(name=name, steps=T, cfg=cfg, temperature=temp, seed=seed, **params)
    state = RunState(B, H, W, K, T, MASK_ID, "cpu", seed)
    return make_sampler(scfg, state), state


def peaked(N, K, top: torch.Tensor, log_gap: torch.Tensor, B=1) -> torch.Tensor:
    """[2B, N, K] logits: code 0 wins by ``log_gap[i]`` over code 1, the rest far below."""
    lg = torch.full((2 * B, N, K), -30.0)
    lg[..., 0] = log_gap
    lg[..., 1] = 0.0
    return lg


def test_registry_offers_every_configured_sampler():
    assert set(SAMPLERS) == set(REGISTRY)
    for name in SAMPLERS:
        SamplerConfig(name=name).validate()


# ---------------------------------------------------------------- Prophet

def test_prophet_commits_everything_when_confident():
    sampler, st = make("prophet", temp=0.0, T=64)
    lg = peaked(st.N, st.K, None, torch.full((st.N,), 10.0))  # gap 10 > 7.5 from the first step
    assert run(sampler, st, lambda s: lg) == 1
    assert (st.z == 0).all()


def test_prophet_equals_baseline_when_never_confident():
    g = torch.Generator().manual_seed(3)
    logits = [random_logits(g, 1, 42, 16, scale=0.3) for _ in range(16)]  # mean gaps far below 2.5
    out = {}
    for name in ("baseline", "prophet"):
        sampler, st = make(name, temp=1.0, T=16, seed=5)
        masks = []
        run(sampler, st, lambda s: logits[s], lambda M0, z0: masks.append(st.M.clone()))
        out[name] = (st.z.clone(), masks)
    assert torch.equal(out["baseline"][0], out["prophet"][0])
    assert all(torch.equal(a, b) for a, b in zip(out["baseline"][1], out["prophet"][1]))


def test_prophet_threshold_follows_the_progress_band():
    # gaps in [5.6, 6.4] clear only the mid (5.0) and late (2.5) bars: the first commit-all
    # comes at the first step that starts with at least 33% of the tokens decoded. (Distinct
    # gaps: with equal confidences the baseline rule unmasks every tie at once.)
    T, N = 16, 42
    sampler, st = make("prophet", temp=0.0, T=T)
    lg = peaked(N, 16, None, torch.linspace(5.6, 6.4, N))
    evals = run(sampler, st, lambda s: lg)
    n0 = torch.tensor([N])
    remaining, expect = N, None
    for s in range(T):
        if 1 - remaining / N >= ProphetParams().early_until:
            expect = s + 1
            break
        remaining = int(baseline_keep(n0, torch.tensor(s), T)[0])
    assert expect is not None and 1 < expect < T
    assert evals == expect
    # raising the mid bar above the gap defers the commit to the late band
    sampler, st = make("prophet", temp=0.0, T=T, prophet=ProphetParams(gap_mid=6.5))
    assert run(sampler, st, lambda s: lg) > expect
    sampler, st = make("prophet", temp=0.0, T=T, prophet=ProphetParams(gap_mid=6.5, gap_late=6.5))
    assert run(sampler, st, lambda s: lg) == T  # never confident enough: the baseline's T steps


# ---------------------------------------------------------------- threshold

def test_threshold_commits_every_confident_token_at_once():
    N = 42
    sampler, st = make("threshold", temp=0.0, T=64)
    gap = torch.zeros(N)
    confident = torch.arange(N) % 5 == 0  # scattered: no locality involved
    gap[confident] = 4.0  # P(top1) = 1 / (1 + e^-4) = 0.982 > 0.9
    sampler.step(peaked(N, 16, None, gap))
    assert not st.M[0, confident].any()
    n_keep, _ = ladr_keep(torch.tensor([N]), N, 64)
    unconfident_left = int(st.M[0, ~confident].sum())
    assert unconfident_left == min(int(n_keep), int((~confident).sum()))


def test_threshold_above_one_is_the_plain_inverse_schedule():
    T, N = 16, 42
    sampler, st = make("threshold", temp=1.0, T=T, threshold=ThresholdParams(threshold=1.0))
    g = torch.Generator().manual_seed(1)
    counts = []
    run(sampler, st, lambda s: random_logits(g, 1, N, 16, scale=8.0), lambda M0, z0: counts.append(int(st.M.sum())))
    remaining = N
    for c in counts:
        t_next = min(1.0, (2 / math.pi) * math.acos(remaining / N) + 1 / T)
        assert c == (0 if t_next == 1.0 else math.floor(N * math.cos(math.pi / 2 * t_next)))
        remaining = c
