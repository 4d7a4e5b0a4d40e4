"""The GenEval-style scorer, validated both ways: drawn scenes pass, noise and
near-misses fail, and every category's rule is exercised on its own."""
from __future__ import annotations

import numpy as np
import pytest

from ladr_testbed import CATEGORIES, eval_items, parse_prompt, passes, score
from ladr_testbed.scenes import (CODEBOOK, COLOURS, GRID, OBJ, SHAPES, Group, Spec, category_specs, held_out,
                                    held_out_specs, render, sample_scene, sample_train_spec, template_codes)
from ladr_testbed.scorer import classify, find_objects

rng0 = np.random.default_rng


def draw(*objs) -> np.ndarray:
    """objs: (shape, colour, top, left), anywhere on the grid (the scorer knows no slots)."""
    g = np.zeros((GRID, GRID), np.int64)
    for shape, colour, top, left in objs:
        t = template_codes(shape, colour)
        region = g[top: top + OBJ, left: left + OBJ]
        region[t > 0] = t[t > 0]
    return g


def test_ground_truth_scores_100_percent_in_every_category():
    rng = rng0(0)
    items = eval_items(12)
    grids = [render(sample_scene(s, rng)) for s in items]
    res = score(items, grids)
    assert set(res["categories"]) == set(CATEGORIES)
    assert res["overall"] == 1.0 and all(v == 1.0 for v in res["categories"].values())


def test_training_scenes_pass_their_own_prompts():
    rng = rng0(1)
    specs = [sample_train_spec(rng) for _ in range(300)]
    assert all(passes(s, render(sample_scene(s, rng))) for s in specs)


@pytest.mark.parametrize("kind", ["uniform", "shuffled", "blank", "flood"])
def test_noise_scores_near_zero(kind):
    rng = rng0(2)
    items = eval_items(12)
    grids = []
    for s in items:
        g = render(sample_scene(s, rng))
        if kind == "uniform":
            g = rng.integers(0, CODEBOOK, g.shape)
        elif kind == "shuffled":
            g = rng.permutation(g.ravel()).reshape(g.shape)
        elif kind == "blank":
            g = np.zeros_like(g)
        else:  # one colour everywhere: one huge blob, which is no shape
            g = np.full_like(g, 1 + rng.integers(CODEBOOK - 1))
        grids.append(g)
    assert score(items, grids)["overall"] <= 0.05


@pytest.mark.parametrize("shape", SHAPES)
def test_every_template_classifies_anywhere_and_in_every_colour(shape):
    for colour in COLOURS:
        for top, left in ((0, 0), (3, 7), (GRID - OBJ, GRID - OBJ)):
            (obj,) = find_objects(draw((shape, colour, top, left)))
            assert (obj.shape, obj.colour) == (shape, colour)


def test_broken_or_mixed_shapes_are_no_shape():
    circle = draw(("circle", "red", 2, 2))
    half = circle.copy()
    half[2:6, 4:6] = 0  # right half missing
    assert [o.shape for o in find_objects(half)] == [None]
    squared = circle.copy()
    squared[2:6, 2:6] = template_codes("square", "red")  # every rim tile a full tile: a square now
    assert [o.shape for o in find_objects(squared)] == ["square"]
    mixed = draw(("square", "red", 2, 2))
    mixed[2:4, 2:6] = template_codes("square", "blue")[:2]  # two colours: two 2x4 bars, neither a square
    assert [o.shape for o in find_objects(mixed)] == [None, None]
    cells = np.argwhere(circle > 0)
    assert classify(cells, circle) == "circle" and classify(cells[:2], circle) is None


def test_single_object_and_two_object():
    g = draw(("circle", "red", 1, 1), ("square", "blue", 9, 9))
    assert passes("a circle", g) and passes("a square", g) and not passes("a triangle", g)
    assert passes("a circle and a square", g) and not passes("a circle and a triangle", g)


def test_counting_is_exact():
    three = draw(("triangle", "green", 0, 0), ("triangle", "green", 0, 8), ("triangle", "blue", 8, 0))
    assert passes("three triangles", three)
    assert not passes("two triangles", three) and not passes("four triangles", three)


def test_colors_and_attribution():
    g = draw(("circle", "red", 1, 1), ("square", "blue", 9, 9))
    assert passes("a red circle", g) and not passes("a blue circle", g)
    assert passes("a red circle and a blue square", g)
    assert not passes("a blue circle and a red square", g), "colours swapped between objects must fail"


def test_position():
    g = draw(("circle", "red", 1, 1), ("square", "blue", 9, 9))  # circle top-left of square
    assert passes("a circle above a square", g) and passes("a circle left of a square", g)
    assert not passes("a circle below a square", g) and not passes("a circle right of a square", g)
    assert passes("a square below a circle", g) and passes("a square right of a circle", g)
    side = draw(("circle", "red", 5, 0), ("square", "blue", 5, 10))  # same row
    assert not passes("a circle above a square", side) and not passes("a circle below a square", side)


def test_merged_objects_are_not_counted():
    touching = draw(("square", "red", 2, 2), ("square", "red", 2, 6))  # one 4x8 red bar
    assert not passes("two squares", touching) and not passes("a square", touching)
    apart = draw(("square", "red", 2, 2), ("square", "red", 2, 7))
    assert passes("two squares", apart)


def test_prompts_round_trip_and_bad_prompts_are_named():
    for c in CATEGORIES:
        for s in category_specs(c):
            assert parse_prompt(s.prompt) == s
    assert parse_prompt("two red circles above a blue square") == Spec(
        (Group(2, "circle", "red"), Group(1, "square", "blue")), "above")
    with pytest.raises(ValueError, match="not a shape"):
        parse_prompt("a red hexagon")


def test_held_out_prompts_never_train():
    assert all(held_out(s.prompt) for c in CATEGORIES for s in held_out_specs(c))
    rng = rng0(3)
    assert not any(held_out(sample_train_spec(rng).prompt) for _ in range(2000))
    for c in CATEGORIES:
        assert 1 <= len(held_out_specs(c)) < len(category_specs(c))


def test_training_mix():
    """Counting scenes are about a third of the data; p_relation sets how many two-group
    scenes name a relation (train.py --p-relation)."""
    rng = rng0(5)
    specs = [sample_train_spec(rng) for _ in range(3000)]
    counting = np.mean([len(s.groups) == 1 and s.groups[0].count > 1 for s in specs])
    assert 0.28 < counting < 0.40, counting
    for p in (0.0, 1.0):
        two = [s for s in (sample_train_spec(rng, p) for _ in range(500)) if len(s.groups) == 2]
        assert two and all((s.relation != "and") == (p == 1.0) for s in two)


def test_scenes_fit_the_grid_and_are_seeded():
    s = parse_prompt("four squares")
    a, b = render(sample_scene(s, rng0(7))), render(sample_scene(s, rng0(7)))
    assert a.shape == (GRID, GRID) and np.array_equal(a, b)
    assert len(find_objects(a)) == 4
