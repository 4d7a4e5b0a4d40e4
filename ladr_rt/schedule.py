"""Schedules, as tensor math that runs on the device (and on plain floats in tests).

LADR's keep count comes from the *inverse* schedule of the current mask ratio
(docs/ladr.md, step 1), in float64 so every implementation floors alike.
The baseline keep count is the official generator's, in float32 as it computes it.
"""
from __future__ import annotations

import math

import torch

from .config import LadrParams


def gamma(t: torch.Tensor) -> torch.Tensor:
    return torch.cos(t * (math.pi / 2))


def gamma_inv(rho: torch.Tensor) -> torch.Tensor:
    return torch.arccos(rho) * (2 / math.pi)


def ladr_keep(n_masked: torch.Tensor, N: int, T) -> tuple[torch.Tensor, torch.Tensor]:
    """n_masked [B] long, T an int or [B] float64 (each slot's) -> (n_keep [B] long, t_eff [B] float64)."""
    rho = n_masked.double() / N
    t_eff = gamma_inv(rho)
    t_next = torch.clamp(t_eff + 1.0 / T, max=1.0)
    n_keep = torch.floor(N * gamma(t_next)).long()
    n_keep = torch.where(t_next >= 1.0, 0, n_keep)
    return n_keep, t_eff


def baseline_keep(n0: torch.Tensor, step: torch.Tensor, T) -> torch.Tensor:
    """Official keep count: floor(N0 * cos(pi/2 * (s+1)/T)) in float32, >= 1 before the last step.

    n0 [B] long (masks at the start); step [] or [B] long (0-based); T an int or [B] float32
    (each slot's; float32 is what the int is rounded to in the division) -> [B] long.
    """
    ratio = (step.float() + 1) / T
    keep = torch.floor(n0.float() * torch.cos(ratio * (math.pi / 2))).long()
    return torch.where(step >= T - 1, 0, keep.clamp_min(1))


def phase_params(t_eff: torch.Tensor, p: LadrParams) -> tuple[torch.Tensor, torch.Tensor]:
    """t_eff [B] float64 -> (tau [B], alpha [B]) float64 from the phase table.

    tau = -inf in refinement when p.tau_refine is None (every candidate valid).
    """
    tau_r = -math.inf if p.tau_refine is None else p.tau_refine
    alpha_x = 0.0 if p.delayed else p.alpha_explore
    explore, refine = t_eff < p.explore_until, t_eff >= p.refine_from
    def f64(x: float) -> torch.Tensor:  # bare Python floats would make float32 thresholds (0.0500000007)
        return torch.full_like(t_eff, x, dtype=torch.float64)

    tau = torch.where(explore, f64(p.tau_explore), torch.where(refine, f64(tau_r), f64(p.tau_structure)))
    alpha = torch.where(explore, f64(alpha_x), torch.where(refine, f64(p.alpha_refine), f64(p.alpha_structure)))
    return tau, alpha
