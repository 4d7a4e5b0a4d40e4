"""Samplers: pure tensor programs over a run-state allocated once.

A step reads the denoiser's logits [2B, N, K] (cond rows then uncond rows; any backend)
and updates ``z`` and ``M`` in place. No host reads, no ``.item()``/``.nonzero()``, no
new state: everything a step writes lives in ``RunState``. The loop reads one flag
(``any(M)``) per step for the stop test.
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
        self.step = torch.zeros((), dtype=torch.long, **kw)  # [] steps taken
        self.l_sum = torch.zeros((), **kw)  # [] sum of the guided logits: NaN/inf anywhere makes it non-finite
        self.nonfinite = torch.zeros((), dtype=torch.bool, **kw)  # [] set once any step saw NaN/inf logits
        self.n0 = torch.empty(B, dtype=torch.long, **kw)  # [B] masks at the start
        # Trace, written at row `step` on the device and read once after the run.
        self.trace_masked = torch.zeros(T + 1, B, dtype=torch.long, **kw)  # [T+1, B] sum(M) after each step
        self.trace_rescued = torch.zeros(T, B, dtype=torch.long, **kw)  # [T, B] tokens rescued
        self.trace_t_eff = torch.zeros(T, B, dtype=torch.float64, **kw)  # [T, B]
        self.gen = torch.Generator(device=device)
        self.reset(seed)

    def reset(self, seed: int) -> None:
        self.z.fill_(self.mask_id)
        self.M.fill_(True)
        self.step.zero_()
        self.nonfinite.fill_(False)
        self.n0.fill_(self.N)
        self.trace_masked.zero_()
        self.trace_masked[0].fill_(self.N)
        self.trace_rescued.zero_()
        self.trace_t_eff.zero_()
        self.gen.manual_seed(seed)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def any_masked(self) -> bool:
        return bool(self.M.any())

    def keep_going(self) -> bool:
        """The one host read per step: something is still masked and no logits were NaN/inf
        (a broken model stops at once instead of running T evaluations into a blank image)."""
        return bool(self.M.any() & ~self.nonfinite)

    def saw_nonfinite(self) -> bool:
        return bool(self.nonfinite)

    def read_trace(self, n_steps: int) -> dict:
        return {
            "masked": self.trace_masked[: n_steps + 1].T.tolist(),
            "rescued": self.trace_rescued[:n_steps].T.tolist(),
            "t_eff": self.trace_t_eff[:n_steps].T.tolist(),
        }


def gumbel_(u: torch.Tensor) -> torch.Tensor:
    """Uniform noise -> Gumbel(0, 1) in place (the official formula's 1e-20 guards)."""
    return u.add_(1e-20).log_().neg_().add_(1e-20).log_().neg_()


class Sampler:
    """Shared predict stage (shared/spec/ladr.md step 2); subclasses select what to unmask."""

    name = "?"

    def __init__(self, cfg: SamplerConfig, state: RunState):
        self.cfg, self.s = cfg, state

    def predict(self, logits: torch.Tensor, need_margin: bool) -> None:
        s, cfg, B = self.s, self.cfg, self.s.B
        # l = (1 + s) l_cond - s l_uncond in fp32 whatever the engine's dtype; written as the
        # official generator writes it so fp32 runs round identically. s.u is scratch here.
        s.l.copy_(logits[:B])
        if cfg.cfg > 0:
            s.u.copy_(logits[B:]).mul_(cfg.cfg)
            s.l.mul_(1 + cfg.cfg).sub_(s.u)
        # One fp32 reduction on the device flags NaN/inf (inf - inf and NaN propagate into the sum);
        # the loop reads the flag with its stop test, so there is no extra host sync.
        torch.sum(s.l, dim=None, out=s.l_sum)
        s.nonfinite.logical_or_(~torch.isfinite(s.l_sum))
        torch.softmax(s.l, dim=-1, out=s.P)
        if cfg.temperature > 0:  # Gumbel-max: argmax(l + temp * g) == argmax(l / temp + g)
            s.u.uniform_(generator=s.gen)
            gumbel_(s.u).mul_(cfg.temperature).add_(s.l)
            torch.argmax(s.u, dim=-1, out=s.z_pred)
        else:
            torch.argmax(s.l, dim=-1, out=s.z_pred)
        torch.gather(s.P, -1, s.z_pred.unsqueeze(-1), out=s.conf.unsqueeze(-1))
        if need_margin:
            torch.topk(s.P, 2, dim=-1, out=(s.top2, s.top2_idx))
            torch.sub(s.top2[..., 0], s.top2[..., 1], out=s.delta)
        if cfg.temperature > 0:
            s.u2.uniform_(generator=s.gen)
            gumbel_(s.u2)

    def rank_ascending(self, key: torch.Tensor, descending: bool = False) -> torch.Tensor:
        """rank[b, i] = position of i in the stable sort of key[b] (ties: lower index first)."""
        s = self.s
        torch.sort(key, dim=-1, descending=descending, stable=True, out=(s.sorted, s.order))
        s.rank.scatter_(1, s.order, s.arange)
        return s.rank

    def keep_lowest(self, n_keep: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: the n_keep [B] masked positions with the lowest c = log(conf) + temp * g
        (ties: lower index first). ladr.md step 3, the backbone's selection."""
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
        s.M.logical_and_(self.remask(baseline_keep(s.n0, s.step, self.cfg.steps)))
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
        idx = s.step.clamp_max(s.T - 1).view(1)
        s.trace_masked.index_copy_(0, idx + 1, s.M.sum(-1).view(1, -1))
        s.trace_t_eff.index_copy_(0, idx, t_eff.view(1, -1))
        if rescued is not None:
            s.trace_rescued.index_copy_(0, idx, rescued.sum(-1).view(1, -1))
        s.step.add_(1)


class LadrSampler(BaselineSampler):
    """shared/spec/ladr.md: inverse-schedule keep count, standard selection, then the
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
        n_keep, t_eff = ladr_keep(n_masked, N, self.cfg.steps)  # [B], [B]
        self.predict(logits, need_margin=True)
        # 3. standard selection: the n_keep lowest-scoring masked positions stay masked.
        s.M.logical_and_(self.keep_lowest(n_keep))  # M is now M_std
        # 4. frontier C: masked positions with an unmasked 8-neighbour (dilation of ~M_std).
        unmasked = (~s.M).view(B, 1, H, W).float()
        near = F.max_pool2d(unmasked, p.kernel, stride=1, padding=p.kernel // 2).view(B, N) > 0
        C = s.M & near
        tau, alpha = phase_params(t_eff, p)  # [B], [B]
        V = C & (s.delta.double() > tau.unsqueeze(1))
        k = torch.minimum(torch.floor(C.sum(-1).double() * alpha).long(), V.sum(-1))  # [B]
        # rescue the k members of V with the largest margin (ties: lower index first)
        s.score.copy_(s.delta).masked_fill_(~V, -math.inf)
        rank = self.rank_ascending(s.score, descending=True)
        rescued = V & (rank < k.unsqueeze(1))
        s.M.logical_and_(~rescued)
        self._commit(rescued=rescued, t_eff=t_eff)


REGISTRY: dict[str, type[Sampler]] = {"baseline": BaselineSampler, "ladr": LadrSampler, "ladr-delayed": LadrSampler}


def make_sampler(cfg: SamplerConfig, state: RunState, default_cfg: float = ModelConfig.default_cfg) -> Sampler:
    """``default_cfg``: the guidance scale when ``cfg.cfg`` is None (the pipeline passes the model's)."""
    import dataclasses

    cfg.validate()
    if cfg.cfg is None:
        cfg = dataclasses.replace(cfg, cfg=default_cfg)
    if cfg.name == "ladr-delayed" and not cfg.ladr.delayed:
        cfg = dataclasses.replace(cfg, ladr=dataclasses.replace(cfg.ladr, delayed=True))
    return REGISTRY[cfg.name](cfg, state)


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
        s.M.logical_and_(self.remask(baseline_keep(s.n0, s.step, self.cfg.steps)))
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
        n_keep, t_eff = ladr_keep(n_masked, s.N, self.cfg.steps)
        self.predict(logits, need_margin=False)
        s.M.logical_and_(self.keep_lowest(n_keep)).logical_and_(s.conf <= self.cfg.threshold.threshold)
        self._commit(rescued=None, t_eff=t_eff)


REGISTRY["prophet"] = ProphetSampler
REGISTRY["threshold"] = ThresholdSampler
