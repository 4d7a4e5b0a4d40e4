"""Sampler invariants on hand-built logits (no model): shared/spec/ladr.md's properties."""
from __future__ import annotations

import math
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from conftest import requires_cuda
from ladr_rt.config import SAMPLERS, LadrParams, SamplerConfig
from ladr_rt.samplers import RunState, make_sampler
from ladr_rt.schedule import baseline_keep

MASK_ID = 126336


def make(name="ladr", H=6, W=7, K=16, T=16, temp=1.0, cfg=0.0, seed=0, B=1, ladr=LadrParams(), device="cpu"):
    scfg = SamplerConfig(name=name, steps=T, cfg=cfg, temperature=temp, seed=seed, ladr=ladr)
    state = RunState(B, H, W, K, T, MASK_ID, device, seed)
    return make_sampler(scfg, state), state


def random_logits(gen, B, N, K, scale=3.0, device="cpu"):
    return torch.randn(2 * B, N, K, generator=gen, device=device) * scale  # [2B, N, K]


def run(sampler, state, logits_fn, check=None):
    """Drive a sampler to completion; returns the evaluation count."""
    evals = 0
    while evals < state.T and state.any_masked():
        before_M, before_z = state.M.clone(), state.z.clone()
        sampler.step(logits_fn(evals))
        evals += 1
        if check:
            check(before_M, before_z)
    return evals


def strictly_progressive(state):
    def check(M0, z0):
        live = M0.any(-1)  # in a batch, a finished image waits (unchanged) for the others
        assert (state.M.sum(-1) < M0.sum(-1))[live].all(), "sum(M) must strictly decrease every step"
        assert not (state.M & ~M0).any(), "a token was re-masked"
        unmasked_before = ~M0
        assert torch.equal(state.z[unmasked_before], z0[unmasked_before]), "an unmasked token changed"
        assert (state.z[~state.M] != MASK_ID).all() and (state.z[state.M] == MASK_ID).all()

    return check


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("temp,cfg", [(0.0, 0.0), (1.0, 4.0), (0.5, 1.5)])
@pytest.mark.parametrize("T", [1, 3, 16, 64])
def test_progress_and_immutability(name, temp, cfg, T):
    sampler, st = make(name, T=T, temp=temp, cfg=cfg, B=2)
    g = torch.Generator().manual_seed(T)
    evals = run(sampler, st, lambda s: random_logits(g, 2, st.N, st.K), strictly_progressive(st))
    assert evals <= T
    assert not st.any_masked(), "every run ends fully unmasked"


# ---------------------------------------------------------------- LADR step, against a plain-Python reading of the spec

def neighbours(i, H, W, k=3):
    r, c = divmod(i, W)
    for dr in range(-(k // 2), k // 2 + 1):
        for dc in range(-(k // 2), k // 2 + 1):
            if (dr or dc) and 0 <= r + dr < H and 0 <= c + dc < W:
                yield (r + dr) * W + c + dc


def spec_ladr_step(M_prev, conf, delta, g2, temp, H, W, T, p: LadrParams, with_frontier=False):
    """shared/spec/ladr.md steps 1, 3, 4 with lists and loops. Returns (M, rescued, t_eff[, C])."""
    N = H * W
    n_masked = sum(M_prev)
    t_eff = (2 / math.pi) * math.acos(n_masked / N)
    t_next = min(1.0, t_eff + 1 / T)
    n_keep = 0 if t_next == 1.0 else math.floor(N * math.cos(math.pi / 2 * t_next))
    masked = [i for i in range(N) if M_prev[i]]
    score = {i: math.log(conf[i]) + (temp * g2[i] if temp > 0 else 0.0) for i in masked}
    keep = set(sorted(masked, key=lambda i: (score[i], i))[:n_keep])
    M_std = [i in keep for i in range(N)]
    C = [i for i in range(N) if M_std[i] and any(not M_std[j] for j in neighbours(i, H, W, p.kernel))]
    if t_eff < p.explore_until:
        tau, alpha = p.tau_explore, (0.0 if p.delayed else p.alpha_explore)
    elif t_eff < p.refine_from:
        tau, alpha = p.tau_structure, p.alpha_structure
    else:
        tau, alpha = (-math.inf if p.tau_refine is None else p.tau_refine), p.alpha_refine
    V = [i for i in C if delta[i] > tau]
    k = min(math.floor(len(C) * alpha), len(V))
    rescued = set(sorted(V, key=lambda i: (-delta[i], i))[:k])
    assert rescued <= set(C), "rescued tokens are frontier tokens"
    assert all(delta[i] > tau for i in rescued), "rescued tokens have margin > tau"
    M = [M_std[i] and i not in rescued for i in range(N)]
    return (M, rescued, t_eff, C) if with_frontier else (M, rescued, t_eff)


@pytest.mark.parametrize("temp", [0.0, 1.0])
@pytest.mark.parametrize("delayed", [False, True])
@pytest.mark.parametrize("HW", [(6, 7), (1, 9), (8, 8)])
def test_ladr_step_equals_spec(temp, delayed, HW):
    H, W = HW
    p = LadrParams(delayed=delayed)
    sampler, st = make("ladr", H=H, W=W, K=12, T=20, temp=temp, cfg=2.0, ladr=p)
    g = torch.Generator().manual_seed(7)
    phases_seen = set()
    while st.any_masked():
        M_prev = st.M[0].tolist()
        # Coarse logits so the margin straddles tau = 0.05 and ties occur.
        logits = (random_logits(g, 1, st.N, st.K, scale=2.0) * 4).round() / 4
        sampler.step(logits)
        # step 2 recomputed independently: l = (1 + s) l_cond - s l_uncond, P = softmax(l)
        l = 3.0 * logits[0].double() - 2.0 * logits[1].double()
        P = torch.softmax(l, dim=-1)
        top2 = P.topk(2, dim=-1).values
        torch.testing.assert_close(st.delta[0].double(), top2[:, 0] - top2[:, 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(st.conf[0].double(), P.gather(1, st.z_pred[0, :, None])[:, 0], rtol=0, atol=1e-6)
        if temp == 0:
            assert torch.equal(st.z_pred[0], l.argmax(-1))
        conf, delta, g2 = st.conf[0].tolist(), st.delta[0].tolist(), st.u2[0].tolist()
        M_ref, rescued, t_eff, C = spec_ladr_step(M_prev, conf, delta, g2, temp, H, W, 20, p, with_frontier=True)
        phases_seen.add(0 if t_eff < 0.2 else 1 if t_eff < 0.7 else 2)
        assert st.M[0].tolist() == M_ref
        step = int(st.step) - 1
        assert st.trace_rescued[step, 0].item() == len(rescued)
        # the step leaves its frontier and rescued set in the run-state (the study's diagnostics read them)
        assert torch.nonzero(st.rescued[0]).flatten().tolist() == sorted(rescued)
        assert torch.nonzero(st.frontier[0]).flatten().tolist() == sorted(C)
        if delayed and t_eff < 0.2:
            assert not rescued
    assert phases_seen == {0, 1, 2}


@pytest.mark.parametrize("name", ["baseline", "prophet", "threshold"])
def test_non_ladr_samplers_leave_rescued_and_frontier_empty(name):
    """A run-state reused by another sampler (the pipeline keeps one per T) must not report the
    previous LADR run's rescues: reset clears them and a non-LADR step never sets them."""
    sampler, st = make("ladr", T=8)
    g = torch.Generator().manual_seed(3)
    while st.any_masked() and not st.rescued.any():
        sampler.step(random_logits(g, 1, st.N, st.K, scale=6.0))
    assert st.rescued.any()
    st.reset(1)
    assert not st.rescued.any() and not st.frontier.any()
    other = make_sampler(SamplerConfig(name=name, steps=8, cfg=0.0, temperature=1.0), st)
    run(other, st, lambda s: random_logits(g, 1, st.N, st.K, scale=6.0))
    assert not st.rescued.any() and not st.frontier.any()


def test_rescue_ties_go_to_the_lower_index():
    """Identical distributions everywhere: every frontier token has the same margin."""
    H, W, K, T = 6, 6, 8, 8
    sampler, st = make("ladr", H=H, W=W, K=K, T=T, temp=0.0)
    st.M[0, :12] = False  # two rows known: t_eff ~ 0.54, the structure phase (alpha 0.3)
    st.z[0, :12] = 1
    logits = torch.zeros(2, H * W, K)
    logits[..., 2] = 3.0
    M_prev = st.M[0].tolist()
    sampler.step(logits)
    M_ref, rescued, t_eff, C = spec_ladr_step(M_prev, st.conf[0].tolist(), st.delta[0].tolist(),
                                              st.u2[0].tolist(), 0.0, H, W, T, LadrParams(), with_frontier=True)
    assert 0.2 <= t_eff < 0.7
    assert st.M[0].tolist() == M_ref
    assert 0 < len(rescued) < len(C), "some equal-margin frontier tokens must lose the tie"
    assert sorted(rescued) == sorted(C)[: len(rescued)]


def test_k_is_min_of_alpha_share_and_valid_count():
    """k = min(floor(|C| * alpha), |V|): with tau above every margin, V is empty and nothing is rescued.
    A margin top1 - top2 lies in [0, 1], so tau 1 is above every margin and tau 0 below every margin of
    random logits (the ends of the range LadrParams.validate accepts)."""
    for tau, expect_zero in ((1.0, True), (0.0, False)):
        p = LadrParams(tau_explore=tau, tau_structure=tau, tau_refine=tau)
        sampler, st = make("ladr", temp=0.0, T=10, ladr=p)
        g = torch.Generator().manual_seed(0)
        run(sampler, st, lambda s: random_logits(g, 1, st.N, st.K))
        total = st.trace_rescued.sum().item()
        assert (total == 0) == expect_zero


def test_temperature_zero_is_deterministic_and_seed_reproducible():
    g = torch.Generator()
    logits = [random_logits(g.manual_seed(s), 1, 42, 16) for s in range(16)]
    results = {}
    for temp in (0.0, 1.0):
        for seed in (0, 0, 1):
            sampler, st = make("ladr", temp=temp, seed=seed, cfg=1.0)
            run(sampler, st, lambda s: logits[s])
            results.setdefault((temp, seed), []).append(st.z.clone())
    for runs in results.values():
        assert all(torch.equal(runs[0], r) for r in runs)
    assert torch.equal(results[(0.0, 0)][0], results[(0.0, 1)][0]), "temperature 0 ignores the seed"
    assert not torch.equal(results[(1.0, 0)][0], results[(1.0, 1)][0])


def test_rescue_disabled_tracks_baseline_schedule():
    """alpha = 0 everywhere: LADR's inverse schedule follows the official cosine keep counts.

    Each count is the cosine schedule one step (1/T) past the current effective time; the
    floor only moves t_eff ahead (arccos is steep near rho = 1, so it does so mostly early),
    hence at most T evaluations, counts never above the baseline's, and per-step decrements
    that differ from the baseline's by at most one step of the cosine's steepest slope.
    """
    off = LadrParams(alpha_explore=0.0, alpha_structure=0.0, alpha_refine=0.0)
    for H, W, T in ((16, 16, 64), (32, 32, 64), (16, 24, 16), (8, 8, 8)):
        sampler, st = make("ladr", H=H, W=W, K=8, T=T, temp=1.0, ladr=off)
        g = torch.Generator().manual_seed(1)
        evals = run(sampler, st, lambda s: random_logits(g, 1, st.N, st.K))
        N = st.N
        assert T // 2 < evals <= T
        counts = st.trace_masked[: evals + 1, 0].tolist()
        for prev, cur in zip(counts, counts[1:]):
            t_next = min(1.0, (2 / math.pi) * math.acos(prev / N) + 1 / T)
            assert cur == (0 if t_next == 1.0 else math.floor(N * math.cos(math.pi / 2 * t_next)))
        base = [N] + [baseline_keep(torch.tensor([N]), torch.tensor(s), T)[0].item() for s in range(T)]
        assert all(c <= b for c, b in zip(counts, base)), "the floor only moves t_eff ahead"
        steepest = math.ceil(N * math.pi / (2 * T))
        dec_ladr = [a - b for a, b in zip(counts, counts[1:])]
        dec_base = [a - b for a, b in zip(base, base[1:])][:evals]
        assert max(abs(a - b) for a, b in zip(dec_ladr[:-1], dec_base)) <= steepest + 1
        assert st.trace_rescued.sum().item() == 0


def test_ladr_with_rescue_needs_fewer_evaluations_on_confident_logits():
    """Peaked logits (large margins) let the rescue unmask the frontier early: fewer evaluations."""
    counts = {}
    for name in ("baseline", "ladr"):
        sampler, st = make(name, H=16, W=16, K=16, T=64, temp=1.0)
        g = torch.Generator().manual_seed(3)
        counts[name] = run(sampler, st, lambda s: random_logits(g, 1, st.N, st.K, scale=8.0))
    assert counts["baseline"] == 64
    assert counts["ladr"] < 40


# ---------------------------------------------------------------- in-place, no host reads

@contextmanager
def no_host_reads():
    def boom(*a, **k):
        raise AssertionError("host read inside a sampler step")

    with mock.patch.object(torch.Tensor, "item", boom), mock.patch.object(torch.Tensor, "tolist", boom), \
            mock.patch.object(torch.Tensor, "nonzero", boom), mock.patch.object(torch.Tensor, "__bool__", boom), \
            mock.patch.object(torch.Tensor, "numpy", boom), mock.patch.object(torch, "nonzero", boom):
        yield


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_keeps_state_in_place_and_reads_nothing_back(name):
    sampler, st = make(name, temp=1.0, cfg=4.0, B=2)
    ptrs = {k: v.data_ptr() for k, v in st.tensors().items()}
    g = torch.Generator().manual_seed(0)
    logits = [random_logits(g, 2, st.N, st.K) for _ in range(4)]
    for lg in logits:
        with no_host_reads():
            sampler.step(lg)
    assert {k: v.data_ptr() for k, v in st.tensors().items()} == ptrs
    with pytest.raises(AssertionError, match="host read"):
        with no_host_reads():
            st.M.any().item()  # the guard itself works


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["baseline", "ladr"])
def test_cuda_step_has_no_sync_and_graph_replay_equals_eager(name):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    logits = [random_logits(g, 1, 64 * 64, 512, device=dev) for _ in range(6)]

    def fresh():
        return make(name, H=64, W=64, K=512, T=16, temp=1.0, cfg=4.0, device=dev)

    eager, st_e = fresh()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lg in logits:
            eager.step(lg)
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graphed, st_g = fresh()
    static = logits[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture
        w_sampler, w_st = fresh()
        w_sampler.step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if hasattr(graph, "register_generator_state"):
        graph.register_generator_state(st_g.gen)
    st_g.reset(0)
    with torch.cuda.graph(graph):
        graphed.step(static)
    st_g.reset(0)  # capture does not run the kernels; start the replay run from scratch
    for lg in logits:
        static.copy_(lg)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(st_g.z, st_e.z) and torch.equal(st_g.M, st_e.M)


def test_phase_table_is_exact_float64():
    """delta > tau compares against 0.05 itself, not float32(0.05) = 0.0500000007."""
    from ladr_rt.schedule import phase_params

    tau, alpha = phase_params(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), LadrParams())
    assert tau.dtype == alpha.dtype == torch.float64
    assert tau.tolist()[:2] == [0.05, 0.05] and tau.tolist()[2] == -math.inf
    assert alpha.tolist() == [0.1, 0.3, 1.0]


@pytest.mark.parametrize("kernel", [0, 2, 4])
def test_even_or_empty_kernel_is_refused(kernel):
    with pytest.raises(ValueError, match="odd"):
        SamplerConfig(ladr=LadrParams(kernel=kernel)).validate()
