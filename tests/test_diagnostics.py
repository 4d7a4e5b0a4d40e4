"""The sampler study's diagnostics (issue 16): the error map, the step probe that charges every
committed token to a route and phase, the pipeline's on_step hook, and train.py's warm start of
a v3 model from the v2 checkpoint."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import ladr_testbed as testbed
from ladr_rt.config import SamplerConfig
from ladr_testbed import parse_prompt, scenes, scenes_v3
from ladr_testbed.diagnostics import Probe, error_tokens, slot_cells
from ladr_testbed.scorer_v3 import background_breaks, incoherent_tokens

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["two red circles above a blue square", "three triangles", "a green square", "a yellow circle and a "
           "purple triangle"]


def v2_scene(prompt, seed):
    return scenes.render(scenes.sample_scene(parse_prompt(prompt), np.random.default_rng(seed)))


def v3_scene(prompt, seed):
    return scenes_v3.draw(parse_prompt(prompt), np.random.default_rng(seed), "slots")


@pytest.mark.parametrize("tb,draw", [("v2", v2_scene), ("v3", v3_scene)])
def test_drawn_scenes_have_no_errors_and_noise_has_many(tb, draw):
    rng = np.random.default_rng(0)
    for seed, prompt in enumerate(PROMPTS * 3):
        grid = draw(prompt, seed)
        assert not error_tokens(grid, tb).any(), (prompt, seed)
        shuffled = rng.permutation(grid.ravel()).reshape(grid.shape)
        assert error_tokens(shuffled, tb).sum() >= 10, (prompt, seed)


def test_an_off_colour_token_and_a_field_break_are_each_one_error():
    grid = v3_scene("a red square", 1)
    obj = np.argwhere(scenes_v3.CODE_COLOUR[grid] > 0)
    r, c = obj[len(obj) // 2]
    bad = grid.copy()
    bad[r, c] = scenes_v3.interior_code(scenes.COLOURS.index("blue"), 3)  # one blue token inside the red square
    assert np.argwhere(incoherent_tokens(bad)).tolist() == [[r, c]]
    bg = np.argwhere(scenes_v3.CODE_COLOUR[grid] == 0)
    r, c = next((r, c) for r, c in bg if 0 < r < 15 and 0 < c < 15 and
                (scenes_v3.CODE_COLOUR[grid[r - 1:r + 2, c - 1:c + 2]] == 0).all())
    jump = grid.copy()
    level = int(grid[r, c])
    jump[r, c] = level + 10 if level < 30 else level - 10
    breaks = background_breaks(jump)
    assert breaks[r, c] and breaks.sum() == 1 + sum(  # the token and those of its neighbours it breaks
        1 for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    assert error_tokens(jump, "v3").sum() == breaks.sum()


def test_slot_cells_are_the_nine_slots():
    cells = slot_cells()
    assert len(cells) == 9 and all(len(c) == scenes.OBJ ** 2 for c in cells)
    assert len(set(np.concatenate(cells).tolist())) == 9 * scenes.OBJ ** 2


@pytest.fixture(scope="module")
def pipe():
    from ladr_rt.pipeline import LadrPipeline

    return LadrPipeline.from_pretrained(testbed.model_dir(), 256, 256, 24, batch=2)


def test_on_step_sees_every_step(pipe):
    seen = []
    codes, trace, n, _ = pipe.generate_codes(PROMPTS[:2], SamplerConfig(name="ladr", steps=64, seed=3),
                                             on_step=lambda s: seen.append((int(s.s.step.max()), int(s.s.M.sum()))))
    assert [k for k, _ in seen] == list(range(1, n + 1))
    assert seen[-1][1] == 0
    again, *_ = pipe.generate_codes(PROMPTS[:2], SamplerConfig(name="ladr", steps=64, seed=3))
    assert torch.equal(codes, again)  # watching does not change the run


@pytest.mark.parametrize("name,T", [("baseline", 12), ("ladr", 64)])
def test_probe_charges_every_token_once(pipe, name, T):
    from ladr_testbed.evaluate import evaluate

    probe = Probe("v2")
    items = testbed.eval_items(1)[:3]
    ev = evaluate(pipe, items, (0,), "v2", probe, name=name, steps=T)
    d = probe.summary()
    assert d["images"] == 3 and d["tokens"] == 3 * 256  # every token committed exactly once, padding row dropped
    assert abs(sum(d["commits"].values()) - 1) < 1e-3
    if name == "baseline":
        assert d["rescued_share"] == 0 and d["frontier_margin"] == {"explore": None, "structure": None, "refine": None}
        assert ev.evaluations == [T] * 3
    else:
        assert d["rescued_share"] > 0.3  # the rescue does most of LADR's work on this model
        assert d["frontier_margin"]["structure"]["n"] > 0
        assert all(n < T for n in ev.evaluations)
    b = d["at_refinement_bound"]
    assert 0 <= b["slots_wholly_masked"] <= 9 and 0 <= b["final_objects_not_started"] <= b["final_objects"]
    errs = sum(v for v in d["errors_by"].values() if v is not None)
    assert d["errors"] == 0 or abs(errs - 1) < 1e-3


def test_batched_evaluation_equals_batch_one(pipe):
    """evaluate() with a batch-2 pipeline gives each image its batch-1 codes and evaluation count."""
    from ladr_rt.pipeline import LadrPipeline
    from ladr_testbed.evaluate import evaluate

    one = LadrPipeline.from_pretrained(testbed.model_dir(), 256, 256, 24)
    items = testbed.eval_items(1)[:3]
    a = evaluate(pipe, items, (1,), name="ladr", steps=64)
    b = evaluate(one, items, (1,), name="ladr", steps=64)
    assert a.evaluations == b.evaluations
    assert all(np.array_equal(x, y) for x, y in zip(a.grids, b.grids))


def load_train():
    spec = importlib.util.spec_from_file_location("tb_train3", ROOT / "bench" / "testbed" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_v3_code_map_keeps_colour_and_fill():
    tr = load_train()
    m = tr.v3_to_v2_code()
    assert m.shape == (scenes_v3.CODEBOOK,)
    assert (m[scenes_v3.CODE_KIND == scenes_v3.KIND_BG] == 0).all()
    assert (scenes.CODE_COLOUR[m] == scenes_v3.CODE_COLOUR).all()
    full = scenes.PATTERNS[0]
    interior = scenes_v3.CODE_KIND == scenes_v3.KIND_INTERIOR
    assert all(scenes.CODES[k][1] == full for k in m[interior])
    assert all(scenes.CODES[k][1] != full for k in m[scenes_v3.CODE_KIND == scenes_v3.KIND_RIM])


def test_warm_start_from_v2_keeps_the_trunk_and_maps_the_vocabulary():
    from ladr_rt.checkpoint import load_state_dict
    from ladr_rt.model import DimooModel

    tr = load_train()

    class A:
        testbed, grid, d_model, heads, layers, mlp = "v3-slots", 16, 128, 4, 4, 384

    model = DimooModel(tr.model_config(A))
    v2 = load_state_dict(testbed.model_dir())
    sd = tr.warm_start(v2, model.state_dict(), "v3-slots", torch.Generator().manual_seed(0))
    model.load_state_dict(sd)  # shapes fit
    off = testbed.layout("v3").image_offset
    m = torch.from_numpy(tr.v3_to_v2_code())
    for k, v in sd.items():
        if v.shape == v2[k].shape:
            assert torch.equal(v, v2[k]), k
        else:  # the embedding and the head: text rows as is, code rows from their v2 counterparts plus noise
            assert torch.equal(v[:off], v2[k][:off])
            d = v[off:] - v2[k][off + m]
            assert 0.005 < float(d.std()) < 0.02, k
    with pytest.raises(SystemExit, match="v2 checkpoint"):
        tr.warm_start(sd, DimooModel(tr.model_config(type("B", (A,), {"testbed": "v2"}))).state_dict(), "v2",
                      torch.Generator())
