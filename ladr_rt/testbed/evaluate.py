"""Generate the held-out evaluation prompts with one sampler setting and score the grids:
the measurement behind the sampler study, the guidance sweep and the shipped-model test."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import SamplerConfig
from .scenes import Spec
from .scorer import score


@dataclass
class Evaluation:
    specs: list[Spec]
    grids: list[np.ndarray]  # int64 [H, W] codes per image
    evaluations: list[int]  # model evaluations per image
    seconds: list[float]  # prompt -> codes, per image
    cfg: float  # the guidance scale the pipeline used (the model's default when asked for None)

    @property
    def score(self) -> dict:
        return score(self.specs, self.grids)


def evaluate(pipe, items: list[Spec], seeds=(0,), **sampler) -> Evaluation:
    """Every item once per seed; image k of seed s uses sampler seed ``1000 * s + k``."""
    out = Evaluation([], [], [], [], sampler.get("cfg"))
    for seed in seeds:
        for k, spec in enumerate(items):
            codes, trace, n, sec = pipe.generate_codes(spec.prompt, SamplerConfig(**sampler, seed=seed * 1000 + k))
            out.specs.append(spec)
            out.grids.append(codes[0].numpy())
            out.evaluations.append(n)
            out.seconds.append(sec)
            out.cfg = trace["cfg"]
    return out
