"""Step-by-step diagnostics of a sampler on the testbed: why a sampler gains or loses.

A ``Probe`` is the pipeline's ``on_step`` callback (``evaluate(..., probe=probe)``). After every
step it reads the run-state on the host (the diagnostics pay a sync per step; the sampler does
not know it is watched) and records, per image and per token committed in that step:

* the route: the backbone's standard selection, or LADR's rescue (``RunState.rescued``);
* the phase of the step, by ``t_eff`` (the inverse schedule of the mask ratio before the step)
  against the phase table's bounds, for every sampler alike;
* the predictive entropy (nats) and top-1/top-2 margin of the distribution it was drawn from,
  and the code committed (background or object).

Also per step of a LADR run: the frontier C's margins (how many clear tau = 0.05: "saturation").
At the refinement bound (the first state with ``t_eff >= refine_from``) it keeps M and z, and
after the run, given the final grids, it counts object tokens decided at the bound, 3x3 slots
still wholly masked, and final objects none of whose tokens was decided by then. Errors are
tokens of the final grid that break local coherence (``scorer_v3.incoherent_tokens``: speckle
and off-colour object tokens; on v3 also background tokens that break the field's smoothness):
each is charged to the route and phase that committed it.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ladr_rt.config import LadrParams
from ladr_rt.schedule import gamma_inv
from . import scenes, scenes_v3, scorer, scorer_v3
from .scorer import components

PHASES = ("explore", "structure", "refine")
ROUTES = ("standard", "rescue")
SATURATION_TAU = 0.05  # the paper's tau for exploration and structure


def _code_colour(testbed: str) -> np.ndarray:
    return scenes.CODE_COLOUR if testbed == "v2" else scenes_v3.CODE_COLOUR


def error_tokens(grid: np.ndarray, testbed: str) -> np.ndarray:
    """bool [H, W]: the final grid's tokens that break local coherence (drawn scenes: none)."""
    if testbed == "v2":
        return scorer_v3.incoherent_tokens(grid, scenes.CODE_COLOUR, scorer.MIN_CELLS)
    return scorer_v3.incoherent_tokens(grid) | scorer_v3.background_breaks(grid)


def slot_cells() -> list[np.ndarray]:
    """Flat indices of each of the 3x3 slots' OBJ x OBJ tokens on the 16x16 grid (v2 and v3-slots)."""
    out = []
    for sr, sc in scenes.SLOTS:
        r0, c0 = scenes.SLOT_ORIGINS[sr], scenes.SLOT_ORIGINS[sc]
        rr, cc = np.mgrid[r0: r0 + scenes.OBJ, c0: c0 + scenes.OBJ]
        out.append((rr * scenes.GRID + cc).ravel())
    return out


class Probe:
    """Records one evaluation run (many calls, every row of each); ``summary()`` aggregates."""

    def __init__(self, testbed: str, params: LadrParams | None = None):
        self.testbed = testbed
        self.p = params or LadrParams()  # the phase bounds; a non-LADR sampler is phased by the paper's
        self.colour = _code_colour(testbed)
        self.slots = slot_cells()
        self.tok = defaultdict(list)  # per committed token: route, phase, entropy, margin, object, error
        self.frontier = {ph: [] for ph in PHASES}  # margins of frontier tokens, per phase (LADR)
        self.bound = defaultdict(list)  # per image: object tokens decided, slots masked, objects not started
        self.rows = 0

    def begin(self, pipe) -> None:
        B, N = pipe.batch, pipe.seq.n_image
        # [B, N] each, per token as committed: route and phase (-1: not yet), entropy and margin
        self.commit = {"route": np.full((B, N), -1), "phase": np.full((B, N), -1),
                       "entropy": np.full((B, N), np.nan), "margin": np.full((B, N), np.nan)}
        self.M_bound = np.ones((B, N), bool)  # [B, N] the mask at the refinement bound
        self.z_bound = np.zeros((B, N), np.int64)  # [B, N]
        self.seen_bound = np.zeros(B, bool)  # [B]

    def _phase(self, t_eff: np.ndarray) -> np.ndarray:
        return np.where(t_eff < self.p.explore_until, 0, np.where(t_eff >= self.p.refine_from, 2, 1))

    def __call__(self, sampler) -> None:
        s = sampler.s
        newly_t = s.M_prev & ~s.M  # [B, N] committed by this step
        M_prev, M, newly = s.M_prev.cpu().numpy(), s.M.cpu().numpy(), newly_t.cpu().numpy()
        N = M.shape[1]
        t_eff = gamma_inv(s.M_prev.sum(-1).double() / N).cpu().numpy()  # [B] the step's own t_eff (before it)
        phase = self._phase(t_eff)
        # entropy and margin of the distributions the committed tokens were drawn from, only theirs
        P_new = s.P[newly_t]  # [n, K]
        ent = -(P_new * torch.log(P_new.clamp_min(1e-30))).sum(-1).cpu().numpy()  # [n] nats
        top2 = torch.topk(P_new, 2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).cpu().numpy()  # [n]
        rescued = s.rescued.cpu().numpy()
        c = self.commit
        c["route"][newly] = rescued[newly]
        c["phase"][newly] = np.broadcast_to(phase[:, None], newly.shape)[newly]
        c["entropy"][newly] = ent
        c["margin"][newly] = margin
        if sampler.cfg.name in ("ladr", "ladr-delayed"):  # s.delta: the step's top-1 - top-2 margins
            C = s.frontier.cpu().numpy()  # [B, N]; a finished row's is empty
            delta = s.delta.cpu().numpy()
            for b in np.flatnonzero(C.any(1)):
                self.frontier[PHASES[phase[b]]].append(delta[b][C[b]])
        after = gamma_inv(s.M.sum(-1).double() / N).cpu().numpy() >= self.p.refine_from  # [B] at the bound now
        for b in np.flatnonzero(after & ~self.seen_bound & M_prev.any(1)):
            self.M_bound[b], self.z_bound[b] = M[b], s.z[b].cpu().numpy()
            self.seen_bound[b] = True

    def end(self, grids: np.ndarray) -> None:
        """``grids`` [n, H, W]: the call's first n rows are real images (the rest were padding)."""
        for b, grid in enumerate(grids):
            flat = grid.ravel()
            err = error_tokens(grid, self.testbed).ravel()
            obj = self.colour[flat] > 0
            route, phase = self.commit["route"][b], self.commit["phase"][b]
            ok = route >= 0  # every token of a finished image
            t = self.tok
            t["route"].append(route[ok])
            t["phase"].append(phase[ok])
            t["entropy"].append(self.commit["entropy"][b][ok])
            t["margin"].append(self.commit["margin"][b][ok])
            t["object"].append(obj[ok])
            t["error"].append(err[ok])
            decided = ~self.M_bound[b]
            self.bound["object_tokens_decided"].append(int((decided & (self.colour[self.z_bound[b]] > 0)).sum()))
            self.bound["slots_wholly_masked"].append(int(sum(self.M_bound[b][cells].all() for cells in self.slots)))
            colour = self.colour[grid]
            started = [bool(decided.reshape(grid.shape)[cells[:, 0], cells[:, 1]].any())
                       for cells in components(colour > 0) if len(cells) >= scorer.MIN_CELLS]
            self.bound["final_objects"].append(len(started))
            self.bound["final_objects_not_started"].append(len(started) - sum(started))
            self.rows += 1

    def summary(self) -> dict:
        """Shares and means over every image recorded (null where nothing was counted)."""
        t = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.tok.items()}
        n = len(t.get("route", []))
        out: dict = {"images": self.rows, "tokens": n}
        if n == 0:
            return out

        def share(mask, of=None):
            of = np.ones(n, bool) if of is None else of
            d = int(of.sum())
            return None if d == 0 else round(float((mask & of).sum()) / d, 4)

        def mean(x, of):
            return None if not of.any() else round(float(x[of].mean()), 4)

        resc = t["route"] == 1
        early = t["phase"] < 2
        out["rescued_share"] = share(resc)
        out["rescued_background_share"] = share(~t["object"], resc)
        out["rescued_background_share_explore_structure"] = share(~t["object"], resc & early)
        out["entropy_nats"] = {r: mean(t["entropy"], (t["route"] == i)) for i, r in enumerate(ROUTES)}
        out["entropy_nats_rescued_background"] = mean(t["entropy"], resc & ~t["object"])
        out["entropy_nats_rescued_object"] = mean(t["entropy"], resc & t["object"])
        out["margin_median"] = {r: (None if not (t["route"] == i).any() else
                                    round(float(np.median(t["margin"][t["route"] == i])), 4))
                                for i, r in enumerate(ROUTES)}
        out["commits"] = {f"{r}/{ph}": share((t["route"] == i) & (t["phase"] == j))
                          for i, r in enumerate(ROUTES) for j, ph in enumerate(PHASES)}
        err = t["error"]
        out["error_share_of_tokens"] = share(err)
        out["errors"] = int(err.sum())
        out["errors_by"] = {f"{r}/{ph}": share((t["route"] == i) & (t["phase"] == j), err)
                            for i, r in enumerate(ROUTES) for j, ph in enumerate(PHASES)}
        out["error_rate_by"] = {f"{r}/{ph}": share(err, (t["route"] == i) & (t["phase"] == j))
                                for i, r in enumerate(ROUTES) for j, ph in enumerate(PHASES)}
        fr = {}
        for ph in PHASES:
            m = np.concatenate(self.frontier[ph]) if self.frontier[ph] else np.zeros(0)
            fr[ph] = None if len(m) == 0 else {"n": int(len(m)), "above_tau": round(float((m > SATURATION_TAU).mean()), 4),
                                               "median": round(float(np.median(m)), 4)}
        out["frontier_margin"] = fr
        out["at_refinement_bound"] = {k: round(float(np.mean(v)), 3) for k, v in self.bound.items()}
        return out
