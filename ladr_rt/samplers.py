"""Samplers: pure tensor programs over a run-state allocated once.

A step reads the denoiser's logits [2B, N, K] (cond rows then uncond rows; any backend)
and updates ``z`` and ``M`` in place. No host reads, no ``.item()``/``.nonzero()``, no
new state: everything a step keeps lives in ``RunState``, and every [B, N, K] tensor it
writes is one of RunState's buffers. What a step does allocate is exact: short-lived
temporaries of at most a few [B, N] elements (masks, comparisons, [B, 1, 1] guidance
factors) from torch's caching allocator, which on CUDA serves them from its pool without a
device sync (inside a captured step graph, from the graph's private pool). The loop reads one
flag (``any(M)``, or the ``[B]`` done flags when serving) per step for the stop test.

Each of the B rows is a slot with its own progress (step, n0, T, guidance, trace row,
done flag) and its own noise generator, so a row's result depends only on what was
admitted into it (``RunState.admit``), never on the other rows. A slot whose M is all
False is inert: a step changes none of its z, M, step, trace or done flag.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import LadrParams, ModelConfig, SamplerConfig
from .schedule import baseline_keep, gamma_inv, ladr_keep, phase_params


class RunState:
    """Every buffer a run touches, allocated once. B images, N = H*W codes, K codebook."""

    def __init__(self, B: int, H: int, W: int, K: int, T: int, mask_id: int, device, seed: int = 0):
        self.B, self.H, self.W, self.N, self.K, self.T = B, H, W, H * W, K, T
        self.mask_id = mask_id
        kw = dict(device=device)
        N = self.N
        self.z = torch.full((B, N), mask_id, dtype=torch.long, **kw)  # [B, N] codes; MASK where unknown
        self.M = torch.ones(B, N, dtype=torch.bool, **kw)  # [B, N] True = still masked
        self.l = torch.empty(B, N, K, **kw)  # [B, N, K] fp32 guided logits
        self.P = torch.empty(B, N, K, **kw)  # [B, N, K] fp32 softmax(l)
        self.u = torch.empty(B, N, K, **kw)  # [B, N, K] Gumbel noise for sampling (and scratch)
        self.u2 = torch.empty(B, N, **kw)  # [B, N] uniform noise for the selection score
        self.z_pred = torch.empty(B, N, dtype=torch.long, **kw)  # [B, N] sampled codes
        self.conf = torch.empty(B, N, **kw)  # [B, N] P[i, z_pred_i]
        self.delta = torch.empty(B, N, **kw)  # [B, N] top1(P) - top2(P)
        self.top2 = torch.empty(B, N, 2, **kw)  # [B, N, 2] top-2 probabilities
        self.top2_idx = torch.empty(B, N, 2, dtype=torch.long, **kw)  # [B, N, 2]
        self.score = torch.empty(B, N, **kw)  # [B, N] selection score / rescue key
        self.sorted = torch.empty(B, N, **kw)  # [B, N] sorted scores
        self.order = torch.empty(B, N, dtype=torch.long, **kw)  # [B, N] argsort of score
        self.rank = torch.empty(B, N, dtype=torch.long, **kw)  # [B, N] rank of each position
        self.arange = torch.arange(N, **kw).expand(B, N).contiguous()  # [B, N] 0..N-1
        self.M_prev = torch.empty(B, N, dtype=torch.bool, **kw)  # [B, N] mask before the step
        # The last step's frontier C and rescued set (LADR; all False for other samplers), kept so
        # a caller between steps (pipeline on_step: the sampler study's diagnostics) can see which
        # route committed each token without the step reading anything back.
        self.frontier = torch.zeros(B, N, dtype=torch.bool, **kw)  # [B, N]
        self.rescued = torch.zeros(B, N, dtype=torch.bool, **kw)  # [B, N]
        self.step = torch.zeros(B, dtype=torch.long, **kw)  # [B] steps each slot has taken
        # A slot's own schedule, used where `own` is set (RunState.admit with steps and guidance);
        # elsewhere the sampler's batch config applies. Guidance is kept as the two float32
        # factors of l = (1 + s) l_cond - s l_uncond, rounded on the host from the double exactly
        # as a scalar multiply rounds it, so a slot's own s is bit-identical to the batch's.
        self.own = torch.zeros(B, dtype=torch.bool, **kw)  # [B] slot has its own steps and guidance
        self.steps = torch.full((B,), T, dtype=torch.long, **kw)  # [B] schedule length T_b <= T
        self.steps_f32 = torch.full((B,), float(T), **kw)  # [B] T_b in float32 (the official keep count's math)
        self.steps_f64 = torch.full((B,), float(T), dtype=torch.float64, **kw)  # [B] T_b in float64 (ladr_keep)
        self.cfg_hi = torch.ones(B, 1, 1, **kw)  # [B, 1, 1] float32(1 + s_b)
        self.cfg_lo = torch.zeros(B, 1, 1, **kw)  # [B, 1, 1] float32(s_b)
        self.l_sum = torch.zeros(B, **kw)  # [B] sum of each row's guided logits: NaN/inf makes it non-finite
        self.nonfinite = torch.zeros(B, dtype=torch.bool, **kw)  # [B] set once a step saw NaN/inf in the row
        self.done = torch.zeros(B, dtype=torch.bool, **kw)  # [B] nothing left to do: the serving loop's one read
        self.n0 = torch.empty(B, dtype=torch.long, **kw)  # [B] masks at the start
        # Trace, written at row `step` on the device and read once after the run.
        self.trace_masked = torch.zeros(T + 1, B, dtype=torch.long, **kw)  # [T+1, B] sum(M) after each step
        self.trace_rescued = torch.zeros(T, B, dtype=torch.long, **kw)  # [T, B] tokens rescued
        self.trace_t_eff = torch.zeros(T, B, dtype=torch.float64, **kw)  # [T, B]
        # One noise stream per slot: row b draws u[b] then u2[b] from gens[b] alone, so its noise
        # is a function of its seed only. For B = 1 that is exactly the single-generator draw of
        # u [1, N, K] then u2 [1, N] (same generator, same element count, same order).
        self.gens = [torch.Generator(device=device) for _ in range(B)]
        self.u_rows, self.u2_rows = list(self.u.unbind(0)), list(self.u2.unbind(0))  # views, no storage
        self.reset(seed)

    @property
    def gen(self) -> torch.Generator:
        """Slot 0's generator (the whole batch's noise when B = 1)."""
        return self.gens[0]

    @gen.setter
    def gen(self, g: torch.Generator) -> None:
        self.gens[0] = g

    def reset(self, seed: int) -> None:
        """Every slot starts a run; slot b is seeded ``seed + b`` (so a batch call's row b
        draws what a B = 1 call with seed + b draws)."""
        self.z.fill_(self.mask_id)
        self.M.fill_(True)
        self.step.zero_()
        self.nonfinite.fill_(False)
        self.done.fill_(False)
        self.own.fill_(False)
        self.n0.fill_(self.N)
        self.frontier.fill_(False)
        self.rescued.fill_(False)
        self.trace_masked.zero_()
        self.trace_masked[0].fill_(self.N)
        self.trace_rescued.zero_()
        self.trace_t_eff.zero_()
        for b, g in enumerate(self.gens):
            g.manual_seed(seed + b)

    def admit(self, slot: int, seed: int, steps: int | None = None, guidance: float | None = None) -> None:
        """Slot ``slot`` starts a new image: its rows of z/M/step/n0/trace/flags reset, its
        generator seeded, and its own schedule set (``steps`` and ``guidance`` both given) or
        the sampler's batch config used (both None). Small device writes between steps, on
        the same storage (a captured step graph keeps reading them); no other slot is touched."""
        b = slot
        if (steps is None) != (guidance is None):
            raise ValueError("give a slot both its steps and its guidance, or neither (the batch config's)")
        if steps is not None:
            if not 1 <= steps <= self.T:
                raise ValueError(f"a slot's steps must be between 1 and the run-state's T = {self.T}, got {steps}")
            self.steps[b], self.steps_f32[b], self.steps_f64[b] = steps, float(steps), float(steps)
            self.cfg_hi[b] = f32(1 + guidance)  # the double 1 + s, rounded to float32 as `x.mul_(1 + s)` rounds it
            self.cfg_lo[b] = f32(guidance)
        self.own[b] = steps is not None
        self.z[b].fill_(self.mask_id)
        self.M[b].fill_(True)
        self.step[b] = 0
        self.nonfinite[b] = False
        self.done[b] = False
        self.n0[b] = self.N
        self.frontier[b] = False
        self.rescued[b] = False
        self.trace_masked[:, b].zero_()
        self.trace_masked[0, b] = self.N
        self.trace_rescued[:, b].zero_()
        self.trace_t_eff[:, b].zero_()
        self.gens[b].manual_seed(seed)

    def retire(self, slot: int) -> None:
        """Slot ``slot`` goes idle: M all False makes every step leave it unchanged and its done
        flag read True. z and the trace row stay readable until the next admission."""
        # Positions never decoded (a slot that was never used, or stopped early) take code 0:
        # the idle row's image tokens must stay inside the vocabulary for its discarded evaluation.
        self.z[slot].masked_fill_(self.M[slot], 0)
        self.M[slot].fill_(False)
        self.done[slot] = True

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def any_masked(self) -> bool:
        return bool(self.M.any())

    def keep_going(self) -> bool:
        """The one host read per step of a whole-batch run: something is still masked and no
        row's logits were NaN/inf (a broken model stops at once instead of running T
        evaluations into a blank image)."""
        return bool(self.M.any() & ~self.nonfinite.any())

    def saw_nonfinite(self) -> bool:
        return bool(self.nonfinite.any())

    def read_done(self) -> list[bool]:
        """The serving loop's one host read per step: ``done`` [B], set by the step itself."""
        return self.done.tolist()

    def read_trace_row(self, slot: int) -> dict:
        """One slot's trace, as long as the steps it took."""
        n = int(self.step[slot])
        return {
            "masked": self.trace_masked[: n + 1, slot].tolist(),
            "rescued": self.trace_rescued[:n, slot].tolist(),
            "t_eff": self.trace_t_eff[:n, slot].tolist(),
        }

    def read_trace(self, n_steps: int) -> dict:
        return {
            "masked": self.trace_masked[: n_steps + 1].T.tolist(),
            "rescued": self.trace_rescued[:n_steps].T.tolist(),
            "t_eff": self.trace_t_eff[:n_steps].T.tolist(),
        }


def f32(x: float) -> float:
    """x rounded to float32 (a huge finite x becomes inf, as a float32 multiply by it would)."""
    return torch.tensor(x, dtype=torch.float64).float().item()


def gumbel_(u: torch.Tensor) -> torch.Tensor:
    """Uniform noise -> Gumbel(0, 1) in place (the official formula's 1e-20 guards)."""
    return u.add_(1e-20).log_().neg_().add_(1e-20).log_().neg_()


class Sampler:
    """Shared predict stage (docs/ladr.md, step 2); subclasses select what to unmask."""

    name = "?"

    def __init__(self, cfg: SamplerConfig, state: RunState):
        self.cfg, self.s = cfg, state
        if cfg.cfg is not None:  # the batch's guidance factors, rounded once as a scalar multiply rounds them
            self.cfg_lo32, self.cfg_hi32 = f32(cfg.cfg), f32(1 + cfg.cfg)

    def predict(self, logits: torch.Tensor, need_margin: bool) -> None:
        s, cfg, B = self.s, self.cfg, self.s.B
        # l = (1 + s) l_cond - s l_uncond in fp32 whatever the engine's dtype; written as the
        # official generator writes it so fp32 runs round identically. s.u is scratch here.
        s.l.copy_(logits[:B])
        # The batch config decides whether guidance runs at all; each slot has its own scale
        # (cfg_hi/cfg_lo [B, 1, 1]; a slot at 0 gets l_cond back exactly for finite logits).
        if cfg.cfg > 0:
            lo = torch.where(s.own.view(B, 1, 1), s.cfg_lo, self.cfg_lo32)  # [B, 1, 1]
            hi = torch.where(s.own.view(B, 1, 1), s.cfg_hi, self.cfg_hi32)  # [B, 1, 1]
            s.u.copy_(logits[B:]).mul_(lo)
            s.l.mul_(hi).sub_(s.u)
        # One fp32 reduction per row flags NaN/inf (inf - inf and NaN propagate into the sum);
        # the loop reads the flag with its stop test, so there is no extra host sync.
        torch.sum(s.l, dim=(1, 2), out=s.l_sum)
        s.nonfinite.logical_or_(~torch.isfinite(s.l_sum))
        torch.softmax(s.l, dim=-1, out=s.P)
        if cfg.temperature > 0:  # Gumbel-max: argmax(l + temp * g) == argmax(l / temp + g)
            for u_b, g in zip(s.u_rows, s.gens):
                u_b.uniform_(generator=g)
            gumbel_(s.u).mul_(cfg.temperature).add_(s.l)
            torch.argmax(s.u, dim=-1, out=s.z_pred)
        else:
            torch.argmax(s.l, dim=-1, out=s.z_pred)
        torch.gather(s.P, -1, s.z_pred.unsqueeze(-1), out=s.conf.unsqueeze(-1))
        if need_margin:
            torch.topk(s.P, 2, dim=-1, out=(s.top2, s.top2_idx))
            torch.sub(s.top2[..., 0], s.top2[..., 1], out=s.delta)
        if cfg.temperature > 0:
            for u2_b, g in zip(s.u2_rows, s.gens):
                u2_b.uniform_(generator=g)
            gumbel_(s.u2)

    def slot_steps(self, t: torch.Tensor) -> torch.Tensor:
        """[B] each slot's T in ``t``'s dtype: its own (``t``) where set, else the batch config's."""
        return torch.where(self.s.own, t, self.cfg.steps)

    def rank_ascending(self, key: torch.Tensor, descending: bool = False) -> torch.Tensor:
        """rank[b, i] = position of i in the stable sort of key[b] (ties: lower index first)."""
        s = self.s
        torch.sort(key, dim=-1, descending=descending, stable=True, out=(s.sorted, s.order))
        s.rank.scatter_(1, s.order, s.arange)
        return s.rank

    def keep_lowest(self, n_keep: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: the n_keep [B] masked positions with the lowest c = log(conf) + temp * g
        (ties: lower index first). docs/ladr.md step 3, the backbone's selection."""
        s, temp = self.s, self.cfg.temperature
        torch.log(s.conf, out=s.score)
        if temp > 0:
            s.score.add_(s.u2 * temp)
        s.score.masked_fill_(~s.M, math.inf)
        return self.rank_ascending(s.score) < n_keep.unsqueeze(1)

    def step(self, logits: torch.Tensor) -> None:
        raise NotImplementedError


class BaselineSampler(Sampler):
    """The official DiMOO generator's rule: every masked token takes its sample, then the
    keep_n lowest noisy confidences go back to MASK (cosine keep count over N0)."""

    name = "baseline"

    def step(self, logits: torch.Tensor) -> None:
        s = self.s
        self.predict(logits, need_margin=False)
        s.M_prev.copy_(s.M)
        s.M.logical_and_(self.remask(baseline_keep(s.n0, s.step, self.slot_steps(s.steps_f32))))
        self._commit(rescued=None, t_eff=gamma_inv(s.M_prev.sum(-1).double() / s.N))

    def remask(self, keep_n: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: the official re-mask of keep_n [B] masked positions by noisy confidence."""
        s, temp = self.s, self.cfg.temperature
        # score = log(clamp(conf, 1e-20)) + temp * gumbel on masked positions, +inf elsewhere
        torch.clamp(s.conf, min=1e-20, out=s.score).log_()
        if temp > 0:
            s.score.add_(s.u2 * temp)
        s.score.masked_fill_(~s.M, math.inf)
        torch.sort(s.score, dim=-1, out=(s.sorted, s.order))
        # Official rule: re-mask scores strictly below sorted[min(keep_n, n_masked - 1)] (so ties at
        # the cut stay unmasked, and keep_n = 0 re-masks nothing). Unmasked positions sort last (+inf).
        cut_idx = torch.minimum(keep_n, s.M.sum(-1) - 1).clamp_min(0)  # [B]
        cut = s.sorted.gather(1, cut_idx.unsqueeze(1))  # [B, 1]
        return s.score < cut

    def _commit(self, rescued: torch.Tensor | None, t_eff: torch.Tensor) -> None:
        s = self.s
        # Tokens that leave the mask this step take their prediction; others never change.
        newly = s.M_prev & ~s.M
        torch.where(newly, s.z_pred, s.z, out=s.z)
        # Each slot writes its trace at its own step; a slot that had nothing masked (idle or
        # finished) writes nothing and does not count the step.
        active = s.M_prev.any(-1)  # [B]
        idx = s.step.clamp_max(s.T - 1).view(1, -1)  # [1, B]
        _put(s.trace_masked, idx + 1, s.M.sum(-1), active)
        _put(s.trace_t_eff, idx, t_eff, active)
        if rescued is not None:
            _put(s.trace_rescued, idx, rescued.sum(-1), active)
        s.step.add_(active)
        s.done.copy_(~s.M.any(-1) | s.nonfinite | (s.step >= self.slot_steps(s.steps)))


def _put(trace: torch.Tensor, at: torch.Tensor, value: torch.Tensor, active: torch.Tensor) -> None:
    """trace[at[0, b], b] = value[b] where active[b]; other rows keep what they hold."""
    old = trace.gather(0, at)
    trace.scatter_(0, at, torch.where(active, value.to(trace.dtype), old.view(-1)).view(1, -1))


class LadrSampler(BaselineSampler):
    """docs/ladr.md: inverse-schedule keep count, standard selection, then the
    neighbour rescue of confident frontier tokens."""

    name = "ladr"

    def __init__(self, cfg: SamplerConfig, state: RunState):
        super().__init__(cfg, state)
        self.p: LadrParams = cfg.ladr

    def step(self, logits: torch.Tensor) -> None:
        s, p = self.s, self.p
        B, H, W, N = s.B, s.H, s.W, s.N
        s.M_prev.copy_(s.M)
        n_masked = s.M.sum(-1)  # [B]
        n_keep, t_eff = ladr_keep(n_masked, N, self.slot_steps(s.steps_f64))  # [B], [B]
        self.predict(logits, need_margin=True)
        # 3. standard selection: the n_keep lowest-scoring masked positions stay masked.
        s.M.logical_and_(self.keep_lowest(n_keep))  # M is now M_std
        # 4. frontier C: masked positions with an unmasked 8-neighbour (dilation of ~M_std).
        unmasked = (~s.M).view(B, 1, H, W).float()
        near = F.max_pool2d(unmasked, p.kernel, stride=1, padding=p.kernel // 2).view(B, N) > 0
        C = torch.logical_and(s.M, near, out=s.frontier)
        tau, alpha = phase_params(t_eff, p)  # [B], [B]
        V = C & (s.delta.double() > tau.unsqueeze(1))
        k = torch.minimum(torch.floor(C.sum(-1).double() * alpha).long(), V.sum(-1))  # [B]
        # rescue the k members of V with the largest margin (ties: lower index first)
        s.score.copy_(s.delta).masked_fill_(~V, -math.inf)
        rank = self.rank_ascending(s.score, descending=True)
        rescued = torch.logical_and(V, rank < k.unsqueeze(1), out=s.rescued)
        s.M.logical_and_(~rescued)
        self._commit(rescued=rescued, t_eff=t_eff)


REGISTRY: dict[str, type[Sampler]] = {"baseline": BaselineSampler, "ladr": LadrSampler, "ladr-delayed": LadrSampler}


def make_sampler(cfg: SamplerConfig, state: RunState, default_cfg: float = ModelConfig.default_cfg) -> Sampler:
    """``default_cfg``: the guidance scale when ``cfg.cfg`` is None (the pipeline passes the model's)."""
    cfg = resolve(cfg, default_cfg)
    return REGISTRY[cfg.name](cfg, state)


def resolve(cfg: SamplerConfig, default_cfg: float = ModelConfig.default_cfg) -> SamplerConfig:
    """Validated, with the model's guidance filled in and ladr-delayed's flag set."""
    import dataclasses

    cfg.validate()
    if cfg.cfg is None:
        cfg = dataclasses.replace(cfg, cfg=default_cfg)
    if cfg.name == "ladr-delayed" and not cfg.ladr.delayed:
        cfg = dataclasses.replace(cfg, ladr=dataclasses.replace(cfg.ladr, delayed=True))
    return cfg


class ProphetSampler(BaselineSampler):
    """Prophet-style early commit (config.ProphetParams): the baseline's step, except that a
    row whose mean top-2 log-probability gap over its masked tokens clears the threshold
    of its progress band commits every masked token at once."""

    name = "prophet"

    def step(self, logits: torch.Tensor) -> None:
        s, p = self.s, self.cfg.prophet
        self.predict(logits, need_margin=True)
        s.M_prev.copy_(s.M)
        n_masked = s.M.sum(-1)  # [B]
        # mean gap over the masked tokens; s.score is scratch until the selection below
        gap = torch.clamp(s.top2, min=1e-20).log()
        torch.sub(gap[..., 0], gap[..., 1], out=s.score)
        mean_gap = s.score.masked_fill_(~s.M, 0).sum(-1) / n_masked.clamp_min(1)  # [B]
        done = 1.0 - n_masked.double() / s.N
        bar = torch.where(done < p.early_until, p.gap_early, torch.where(done < p.late_from, p.gap_mid, p.gap_late))
        commit_all = mean_gap.double() >= bar  # [B]
        # the baseline's own rule, then the early commit on top of it
        s.M.logical_and_(self.remask(baseline_keep(s.n0, s.step, self.slot_steps(s.steps_f32))))
        s.M.logical_and_(~commit_all.unsqueeze(1))
        self._commit(rescued=None, t_eff=gamma_inv(n_masked.double() / s.N))


class ThresholdSampler(BaselineSampler):
    """Fast-dLLM-style confidence threshold (config.ThresholdParams): LADR's inverse cosine
    keep count as the floor on progress, plus every masked token whose confidence clears
    the threshold, wherever it is (no locality: the contrast with LADR's rescue)."""

    name = "threshold"

    def step(self, logits: torch.Tensor) -> None:
        s = self.s
        s.M_prev.copy_(s.M)
        n_masked = s.M.sum(-1)
        n_keep, t_eff = ladr_keep(n_masked, s.N, self.slot_steps(s.steps_f64))
        self.predict(logits, need_margin=False)
        s.M.logical_and_(self.keep_lowest(n_keep)).logical_and_(s.conf <= self.cfg.threshold.threshold)
        self._commit(rescued=None, t_eff=t_eff)


REGISTRY["prophet"] = ProphetSampler
REGISTRY["threshold"] = ThresholdSampler
