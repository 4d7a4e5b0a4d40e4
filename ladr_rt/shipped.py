"""Where the checkpoints shipped inside the package live (``ladr_rt/assets``).

A deployment needs only these paths; the testbed tooling that trained and scores the models
(``ladr_testbed``) is a separate package that imports this module, never the other way round.
"""
from __future__ import annotations

from pathlib import Path

MODELS = {"v2": "testbed", "v3": "testbed_v3"}  # testbed name -> directory under assets/


def model_dir(testbed: str = "v2") -> Path:
    """A checkpoint shipped inside the package: ``v2`` (the default model of ``ladr-rt generate``)
    or ``v3`` (testbed v3, trained on the ``v3-slots`` scenes)."""
    if testbed not in MODELS:
        raise ValueError(f"no shipped testbed model {testbed!r}; choose {' or '.join(MODELS)}")
    return Path(__file__).resolve().parent / "assets" / MODELS[testbed]
