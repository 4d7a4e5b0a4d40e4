"""Does the model use the relation word? On the held-out position prompts, among images
that contain exactly the two named objects, how often the named relation holds, against
the 37.5% a relation-blind model gets (two random distinct slots of the 3x3 layout are
ordered the named way 3 times in 8).

    python bench/testbed/relation_check.py     # ~2 min on 2 idle cores
    python bench/testbed/relation_check.py --model ladr_rt/assets/testbed_v3   # scored by scorer v3
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp

BLIND = 3 / 8


def _one(job) -> dict:
    import torch

    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import LadrPipeline
    from ladr_testbed import scorer_v3
    from ladr_testbed.scorer import find_objects, passes

    model, testbed, spec, seeds, cfg = job
    if testbed == "v3":  # v3 grids: scorer v3's objects and rules
        find_objects, passes = scorer_v3.find_objects, scorer_v3.passes_v3
    torch.set_num_threads(1)
    pipe = LadrPipeline.from_pretrained(model, None, None, 24)
    both = held = 0
    for k in range(seeds):
        grid = pipe.generate_codes(spec.prompt, SamplerConfig(name="baseline", steps=64, cfg=cfg,
                                                              seed=5000 + k))[0][0].numpy()
        shaped = [o for o in find_objects(grid) if o.shape]
        ok = len(shaped) == 2 and all(any(o.shape == g.shape for o in shaped) for g in spec.groups)
        both += ok
        held += ok and passes(spec, grid)
    return {"prompt": spec.prompt, "images": seeds, "two_objects": both, "relation_holds": held}


def main(argv=None) -> None:
    from ladr_testbed.scenes import held_out_specs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory [default: the shipped testbed model]")
    ap.add_argument("--seeds", type=int, default=24, help="images per prompt (sampler seeds 5000...)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale [default: the model's]")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    args = ap.parse_args(argv)
    from ladr_rt.checkpoint import CheckpointError
    from ladr_testbed import model_dir, testbed_of

    try:
        testbed = testbed_of(args.model or model_dir())  # its scorer; one line here, not a worker traceback
    except (CheckpointError, ValueError) as e:
        ap.error(f"--model: {e}")
    jobs = [(args.model, testbed, s, args.seeds, args.cfg) for s in held_out_specs("position")]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(_one, jobs, chunksize=1)
    for r in rows:
        print(f"{r['prompt']:32s} two objects {r['two_objects']:3d}/{r['images']}  relation holds {r['relation_holds']}")
    both, held = sum(r["two_objects"] for r in rows), sum(r["relation_holds"] for r in rows)
    print(f"relation holds in {held} of {both} two-object images ({held / max(both, 1):.0%}); "
          f"relation-blind placement: {BLIND:.1%}")
    print(json.dumps({"two_object_images": both, "relation_holds": held, "rate": held / max(both, 1),
                      "relation_blind": BLIND, "rows": rows}))


if __name__ == "__main__":
    main()
