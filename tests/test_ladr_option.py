"""`--ladr KEY=VALUE,...`: the LADR phase table on the CLI and in the API (issue 16, part 4).

Hostile strings get one line naming the fix, before any model loads; the paper's table is the
default; a non-default table changes what the sampler does; the trace records the table used."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from ladr_rt.config import LadrParams, SamplerConfig
from test_cli import _one_line_error, run_cli, run_subprocess

FIELDS = [f.name for f in dataclasses.fields(LadrParams)]
# shared/spec/ladr.md step 4, written out here so that a changed default cannot pass unnoticed
PAPER = dict(explore_until=0.2, refine_from=0.7, tau_explore=0.05, tau_structure=0.05, tau_refine=None,
             alpha_explore=0.1, alpha_structure=0.3, alpha_refine=1.0, kernel=3, delayed=False)


def test_default_table_is_the_papers():
    assert dataclasses.asdict(LadrParams()) == PAPER
    assert SamplerConfig().ladr == LadrParams()


HOSTILE = [
    (["tau="], ["unknown key 'tau'", "valid keys: " + ", ".join(FIELDS)]),
    (["=1"], ["has no key", "tau_structure"]),
    (["bogus=1"], ["unknown key 'bogus'", "alpha_refine"]),
    (["alpha_refine=nan"], ["--ladr alpha_refine", "finite", "got nan"]),
    (["alpha_refine=inf"], ["--ladr alpha_refine", "finite"]),
    (["tau_explore=1e400"], ["--ladr tau_explore", "finite"]),
    (["tau_explore=-0.1"], ["--ladr tau_explore", "from 0 to 1"]),
    (["alpha_structure=1.5"], ["--ladr alpha_structure", "from 0 to 1"]),
    (["tau_structure=0.1,tau_structure=0.2"], ["gives tau_structure twice"]),
    (["tau_structure=0.1", "tau_structure=0.2"], ["gives tau_structure twice"]),  # two --ladr options
    (["alpha_refine="], ["alpha_refine has no value", "alpha_refine=1.0"]),
    (["alpha_refine"], ["alpha_refine has no value"]),
    (["alpha_refine=0.3,"], ["empty item"]),
    ([""], ["needs KEY=VALUE pairs"]),
    ([" , "], ["needs KEY=VALUE pairs"]),
    (["tau_structure=abc"], ["--ladr tau_structure must be a number", "'abc'"]),
    (["alpha_refine=0.3=0.4"], ["must be a number", "'0.3=0.4'"]),
    (["tau_refine=nothing"], ["must be a number or none"]),
    (["kernel=2"], ["kernel must be an odd integer", "got 2"]),
    (["kernel=3.0"], ["kernel must be an odd integer", "'3.0'"]),
    (["kernel=-1"], ["kernel must be an odd integer"]),
    (["kernel=99999"], ["kernel must be an odd integer from 1 to 63"]),
    (["explore_until=0.8"], ["explore_until (0.8) must be below refine_from (0.7)"]),
    (["explore_until=0.5,refine_from=0.5"], ["must be below refine_from"]),
    (["refine_from=1.5"], ["--ladr refine_from", "from 0 to 1"]),
    (["delayed=maybe"], ["delayed must be true or false", "'maybe'"]),
    (["delayed=1"], ["delayed must be true or false"]),
]


@pytest.mark.parametrize("texts,needles", HOSTILE, ids=[" | ".join(t) or "empty" for t, _ in HOSTILE])
def test_hostile_tables_are_one_line_before_anything_loads(tmp_path, texts, needles):
    out = tmp_path / "o.png"
    args = [a for t in texts for a in ("--ladr", t)]
    # no --model: the shipped model would load, so a refusal here proves it came first
    r = run_cli("generate", "--prompt", "a red circle", "--out", out, "--no-progress", *args)
    _one_line_error(r, *needles)
    assert not out.exists()


@pytest.mark.parametrize("sampler", ["baseline", "prophet", "threshold"])
def test_table_with_a_sampler_that_ignores_it_is_refused(tmp_path, sampler):
    r = run_cli("generate", "--prompt", "a red circle", "--sampler", sampler, "--ladr", "alpha_refine=0.3",
                "--out", tmp_path / "o.png")
    _one_line_error(r, f"--sampler {sampler} does not use it", "--sampler ladr or ladr-delayed")
    with pytest.raises(ValueError, match="does not use it"):  # the API refuses it too: a silently ignored table
        SamplerConfig(name=sampler, ladr=LadrParams(alpha_refine=0.3)).validate()
    SamplerConfig(name=sampler).validate()  # the default table with any sampler is fine


def test_delayed_false_contradicts_ladr_delayed(tmp_path):
    r = run_cli("generate", "--prompt", "a red circle", "--sampler", "ladr-delayed", "--ladr", "delayed=false",
                "--out", tmp_path / "o.png")
    _one_line_error(r, "ladr-delayed always delays", "--sampler ladr")


def test_a_real_process_says_one_line_and_exits_nonzero(tmp_path):
    r = run_subprocess("generate", "--prompt", "a red circle", "--ladr", "alpha_refine=nan", "--out",
                       str(tmp_path / "o.png"))
    assert r.returncode == 1
    _one_line_error(r, "--ladr alpha_refine must be a finite number")


def test_api_validates_the_dataclass_itself():
    for bad, needle in ((dict(alpha_refine=math.nan), "finite"), (dict(tau_structure="0.1"), "finite number"),
                        (dict(kernel=True), "odd integer"), (dict(kernel=4), "odd"), (dict(delayed="yes"), "true or false"),
                        (dict(explore_until=0.7), "below refine_from"), (dict(tau_refine=-1.0), "from 0 to 1")):
        with pytest.raises(ValueError, match=needle):
            SamplerConfig(ladr=LadrParams(**bad)).validate()
    SamplerConfig(ladr=LadrParams(tau_refine=0.05, alpha_refine=0.3, kernel=5, delayed=True)).validate()


def test_option_parses_every_key_and_round_trips():
    p = LadrParams.from_option(" tau_refine = 0.05 , alpha_refine=0.3,kernel=5,delayed=TRUE,explore_until=0,"
                               "refine_from=1")
    assert p == LadrParams(tau_refine=0.05, alpha_refine=0.3, kernel=5, delayed=True, explore_until=0.0,
                           refine_from=1.0)
    assert LadrParams.from_option(["tau_refine=none", "alpha_explore=0"]) == LadrParams(alpha_explore=0.0)
    for table in (LadrParams(), p):
        assert LadrParams.from_option(table.table()) == table
    assert LadrParams().table().startswith("explore_until=0.2,refine_from=0.7,") and "tau_refine=none" in \
        LadrParams().table()


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_help_lists_the_keys_with_the_papers_values(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--ladr KEY=VALUE,..." in text
    for k, v in PAPER.items():
        shown = "none" if v is None else str(v).lower()
        assert f"{k}={shown}" in text, (k, text)


def _generate(tmp_path, name, *extra):
    out, codes, trace = (tmp_path / f"{name}{s}" for s in (".png", ".npy", ".json"))
    r = run_cli("generate", "--prompt", "two red circles above a blue square", "--steps", "64", "--seed", "1",
                "--device", "cpu", "--out", out, "--save-tokens", codes, "--trace", trace, "--no-progress", *extra)
    assert r.returncode == 0, r.stderr
    return np.load(codes), json.loads(trace.read_text())


def test_table_changes_the_samplers_behaviour_and_the_trace_records_it(tmp_path):
    """On the shipped testbed model: no --ladr and the paper's values spelled out give the same
    tokens (the default is the paper's table); refinement with the structure rules (issue 16's
    variant: tau 0.05, alpha 0.3) rescues less at the end, so it takes more evaluations and draws
    other tokens. The trace carries the table that ran, readable back by --ladr."""
    default_codes, default = _generate(tmp_path, "default")
    spelled_codes, spelled = _generate(tmp_path, "spelled", "--ladr", LadrParams().table())
    variant_codes, variant = _generate(tmp_path, "variant", "--ladr", "tau_refine=0.05,alpha_refine=0.3")
    assert default["ladr"] == spelled["ladr"] == PAPER
    assert np.array_equal(default_codes, spelled_codes) and default["evaluations"] == spelled["evaluations"]
    assert variant["ladr"] == PAPER | {"tau_refine": 0.05, "alpha_refine": 0.3}
    assert variant["evaluations"] > default["evaluations"], (variant["evaluations"], default["evaluations"])
    assert not np.array_equal(variant_codes, default_codes)
    # refinement-phase rescues: the paper's alpha 1 commits the whole frontier, the variant a share of it
    late = lambda t: sum(r for r, te in zip(t["rescued"], t["t_eff"]) if te >= 0.7)  # noqa: E731
    assert max(variant["rescued"]) < max(default["rescued"]) or late(variant) < late(default)
    _, delayed = _generate(tmp_path, "delayed", "--sampler", "ladr-delayed")
    assert delayed["ladr"] == PAPER | {"delayed": True}
    _, base = _generate(tmp_path, "base", "--sampler", "baseline")
    assert base["ladr"] is None
