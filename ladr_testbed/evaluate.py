"""Generate the held-out evaluation prompts with one sampler setting and score the grids:
the measurement behind the sampler study, the guidance sweep and the shipped-model test."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ladr_rt.config import SamplerConfig
from .scenes import Spec


@dataclass
class Evaluation:
    specs: list[Spec]
    grids: list[np.ndarray]  # int64 [H, W] codes per image
    evaluations: list[int]  # model evaluations per image
    seconds: list[float]  # prompt -> codes, per image (a batched call's wall time shared by its images)
    cfg: float  # the guidance scale the pipeline used (the model's default when asked for None)
    testbed: str = "v2"  # whose scorer applies: "v2" or "v3" (both v3 layouts)
    calls: list[float] = field(default_factory=list)  # wall seconds of each pipeline call

    @property
    def score(self) -> dict:
        from . import scorer_for

        return scorer_for(self.testbed)(self.specs, self.grids)


def evaluate(pipe, items: list[Spec], seeds=(0,), testbed: str = "v2", probe=None, **sampler) -> Evaluation:
    """Every item once per seed; image k of seed s uses sampler seed ``1000 * s + k``.

    A pipeline of batch B runs B consecutive items per call (row b of a call seeded at
    ``1000 * s + k0`` draws with ``1000 * s + k0 + b``, so every image equals its batch-1 run);
    a short last chunk is padded with repeats of its last prompt, whose images are dropped.
    Each image's evaluations are its own row's steps (a finished row stops counting).
    ``probe`` (``diagnostics.Probe``) is called after every step and told each call's grids."""
    B = pipe.batch
    out = Evaluation([], [], [], [], sampler.get("cfg"), testbed)
    for seed in seeds:
        for k0 in range(0, len(items), B):
            chunk = items[k0: k0 + B]
            prompts = [sp.prompt for sp in chunk] + [chunk[-1].prompt] * (B - len(chunk))
            if probe is not None:
                probe.begin(pipe)
            codes, trace, n, sec = pipe.generate_codes(prompts, SamplerConfig(**sampler, seed=seed * 1000 + k0),
                                                       on_step=probe)
            steps = pipe.state.step.tolist()  # [B] each row's own evaluations
            grids = codes.cpu().numpy()
            if probe is not None:
                probe.end(grids[: len(chunk)])
            out.calls.append(sec)
            for b, sp in enumerate(chunk):
                out.specs.append(sp)
                out.grids.append(grids[b])
                out.evaluations.append(int(steps[b]))
                out.seconds.append(sec / len(chunk))
            out.cfg = trace["cfg"]
    return out
