"""Reference model and baseline sampler == the official Lumina-DiMOO implementation.

Recorded values: tests/data/official_tiny.npz, written by

    DIMOO_SRC=/path/to/Lumina-DiMOO python tests/record_official.py --harness /path/to/run_official.py

(see that script's docstring). The checkpoints are rebuilt here from the same seeds
(numpy-generated weights, so identical across torch versions). Where a scratch copy of
the official code exists ($DIMOO_SRC and $DIMOO_HARNESS), the live test also runs it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ladr_rt import load_model
from ladr_rt.config import MASK, SamplerConfig

REC = np.load(Path(__file__).parent / "data" / "official_tiny.npz")
sys.path.insert(0, str(Path(__file__).parent))
from record_official import GEN_CASES, PROMPT  # noqa: E402


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("name,fixture", [("mha", "tiny_ckpt"), ("gqa", "tiny_gqa_ckpt")])
def test_logits_match_official(name, fixture, request):
    ckpt = request.getfixturevalue(fixture)
    model = load_model(ckpt)
    ids = torch.from_numpy(REC[f"{name}_ids"])
    with torch.inference_mode():
        full = model(ids)[0].numpy()  # [L, V]
        pos = torch.nonzero(ids[0] == MASK).flatten()
        image = model(ids, image_positions=pos)[0].numpy()  # [N, 8192] fast path
    assert full.shape[-1] == 134548
    assert rel_err(full[:, REC[f"{name}_cols"]], REC[f"{name}_logits_cols"]) < 1e-5
    assert rel_err(image, REC[f"{name}_logits_image"]) < 1e-5
    # and the fast path is the full path, sliced
    np.testing.assert_allclose(image, full[pos.numpy(), -8192:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,height,width,steps,cfg", GEN_CASES)
def test_baseline_tokens_match_official_generator(tiny_ckpt, case, height, width, steps, cfg):
    """Batch-2 left-padded CFG + our baseline step == official two-forward generator, token for token."""
    from ladr_rt.pipeline import LadrPipeline

    pipe = LadrPipeline.from_pretrained(tiny_ckpt, height, width, prompt_budget=40)
    codes, trace, evals, _ = pipe.generate_codes(
        PROMPT, SamplerConfig(name="baseline", steps=steps, cfg=cfg, temperature=0.0))
    assert evals == steps
    np.testing.assert_array_equal(codes[0].numpy(), REC[f"gen_{case}"])


def _harness():
    src, harness = os.environ.get("DIMOO_SRC"), os.environ.get("DIMOO_HARNESS")
    if not (src and harness and Path(src).is_dir() and Path(harness).is_file()):
        return None
    return harness


@pytest.mark.official
@pytest.mark.skipif(_harness() is None, reason="no scratch copy of the official code: set DIMOO_SRC (a "
                    "Lumina-DiMOO snapshot) and DIMOO_HARNESS (run_official.py) to run it live")
def test_live_official_full_vocab(tiny_ckpt, tmp_path):
    ids = REC["mha_ids"]
    np.save(tmp_path / "ids.npy", ids)
    subprocess.run([sys.executable, _harness(), "--mode", "logits", "--ckpt", str(tiny_ckpt), "--ids",
                    str(tmp_path / "ids.npy"), "--out", str(tmp_path / "out.npy")], check=True)
    ref = np.load(tmp_path / "out.npy")
    with torch.inference_mode():
        ours = load_model(tiny_ckpt)(torch.from_numpy(ids)).numpy()
    assert rel_err(ours, ref) < 1e-5
