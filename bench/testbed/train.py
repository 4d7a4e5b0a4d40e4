"""Train the testbed mini-DiMOO: DiMOO's architecture and sequence layout, a synthetic task.

    python bench/testbed/train.py --out /tmp/testbed-stage1 --steps 7500 --threads 2 --bf16 --compile \
        --log bench/testbed/loss_stage1.jsonl
    python bench/testbed/train.py --init /tmp/testbed-stage1 --seed 1 --p-relation 0.8 --p-colour-pair 0.85 \
        --lr 1e-3 --out ladr_rt/assets/testbed --steps 4500 --threads 2 --bf16 --compile \
        --log bench/testbed/loss_stage2.jsonl
    # the shipped model's two stages: 32 + 21 min on a 2-core CPU (ladr_rt/assets/testbed/TRAINING.md)
    python bench/testbed/train.py --testbed v3-slots --init /tmp/v3-stage4 --seed 9 --lr 7e-4 --warmup 100 \
        --p-relation 0.9 --p-colour-pair 0.5 --group-loss 1 --p-slot-mask 0.6 --out ladr_rt/assets/testbed_v3 \
        --steps 7000 --stop-after 6072 --threads 2   # the shipped v3 model's last of five stages (its TRAINING.md)

Masked-diffusion objective as DiMOO/MaskGIT train it, matched to the inference loop:
mask ratio gamma(t) = cos(pi t / 2) with t ~ U(0, 1), cross-entropy on the masked image
tokens only, logits over the codebook only, and 10% of prompts replaced by the
unconditional template so classifier-free guidance has an unconditional model to use.
Rows are built by ``ladr_rt.tokens.build_rows`` (the function inference uses), so the
train and inference layouts cannot drift apart. Seeded: the same command gives the same
loss curve: exactly in eager fp32 on a fixed thread count, within noise with --bf16 --compile on
2 threads (TRAINING.md).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from ladr_rt.checkpoint import save_checkpoint
from ladr_rt.config import ImageSpec, ModelConfig
from ladr_rt.model import DimooModel
from ladr_testbed import TESTBEDS, codebook, layout, palette, palette_v3, tokenizer
from ladr_testbed import scenes_v3
from ladr_testbed.scenes import GRID, P_COLOUR_PAIR, P_RELATION, render, sample_scene, sample_train_spec
from ladr_rt.tokens import SequenceLayout, build_rows

PROMPT_BUDGET = 24  # the longest template + prompt is 21 tokens


def model_config(args) -> ModelConfig:
    lay = layout(args.testbed)
    return ModelConfig(d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers,
                       mlp_hidden_size=args.mlp, vocab_size=lay.image_offset + lay.codebook, rope_theta=10000.0,
                       layout=lay, default_size=(args.grid * lay.vq_scale, args.grid * lay.vq_scale))


def draw(spec, rng: np.random.Generator, testbed: str = "v2", grid: int = GRID) -> np.ndarray:
    """int64 [grid, grid] codes of one training scene of ``testbed``."""
    if testbed == "v2":
        return render(sample_scene(spec, rng))
    return scenes_v3.draw(spec, rng, "slots" if testbed == "v3-slots" else "free", grid)


def code_groups(testbed: str) -> torch.Tensor:
    """int64 [codebook]: each code's semantic class for ``--group-loss``: 0 background, else
    (colour, coverage class). v2 codes group by colour; v3 codes by colour and interior / rim
    coverage, so the background level, the shade and the bucket under a rim fall out of it."""
    from ladr_testbed import scenes

    if testbed == "v2":
        return torch.from_numpy(scenes.CODE_COLOUR.astype(np.int64))
    cov = np.searchsorted(np.array(scenes_v3.COVERAGES + (1.0,)), scenes_v3.CODE_COVERAGE)  # 0..3 for objects
    g = np.where(scenes_v3.CODE_COLOUR > 0, 1 + (scenes_v3.CODE_COLOUR - 1) * 4 + cov, 0)
    return torch.from_numpy(g.astype(np.int64))


def group_nll(logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean -log P(the target code's class) with P(class) the sum of its codes' probabilities.
    A proper scoring rule of the class marginal, so adding it leaves the per-code optimum (the
    true conditional) where it was; what it changes is the gradient's make-up: the background
    level's irreducible ~1 nat per token no longer drowns which slot holds what colour and shape."""
    lp = torch.log_softmax(logits.float(), -1)  # [M, K]
    same = groups[None, :] == groups[target][:, None]  # [M, K] codes in each target's class
    return -torch.logsumexp(lp.masked_fill(~same, float("-inf")), -1).mean()


def init_weights(model: DimooModel, n_layers: int, gen: torch.Generator) -> None:
    # GPT-2-style: small normal init, residual output projections scaled by depth so the
    # residual stream starts near the embedding.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight")):
            torch.nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers), generator=gen)
        else:
            torch.nn.init.normal_(p, 0.0, 0.02, generator=gen)


def v3_to_v2_code() -> np.ndarray:
    """int64 [v3 codebook]: for each v3 code, the v2 code that stands for the same thing: a
    background level -> v2's background, a colour's interior -> its full tile, a colour's rim of
    coverage c -> its partial tile whose filled share is nearest c."""
    from ladr_testbed.scenes import CODES

    colour2 = np.array([c for c, _ in CODES])
    fill2 = np.array([bin(m).count("1") / 16 for _, m in CODES])
    out = np.zeros(scenes_v3.CODEBOOK, np.int64)
    for k in range(scenes_v3.CODEBOOK):
        c = scenes_v3.CODE_COLOUR[k]
        if c > 0:
            same = np.flatnonzero(colour2 == c)
            out[k] = same[np.argmin(np.abs(fill2[same] - scenes_v3.CODE_COVERAGE[k]))]
    return out


def warm_start(init: dict, own: dict, testbed: str, gen: torch.Generator) -> dict:
    """``init`` (a checkpoint's state dict) shaped for this model. Same shapes: as is. A v2
    checkpoint for a v3 model: every weight but the vocabulary rows as is, the text and special
    rows as is (v3 keeps v2's text layout), and each v3 code's embedding and head row copied from
    its v2 counterpart (``v3_to_v2_code``) plus noise of std 0.01, so the 48 background levels
    start as v2's background, distinct, and the prompt-to-slot composition v2 learned carries over."""
    if init.keys() == own.keys() and all(init[k].shape == v.shape for k, v in own.items()):
        return init
    if init.keys() != own.keys():
        raise SystemExit(f"--init: the checkpoint's weights are not this architecture's (missing "
                         f"{sorted(own.keys() - init.keys())[:3]}, extra {sorted(init.keys() - own.keys())[:3]}): pass "
                         "the same --d-model/--layers/--heads/--mlp it was trained with")
    v2, v3 = layout("v2"), layout(testbed)
    if testbed == "v2" or v2.image_offset != v3.image_offset:
        raise SystemExit("--init: the checkpoint's shapes differ from this model's, and only a v2 checkpoint can "
                         "warm-start a v3 model")
    src = torch.from_numpy(v2.image_offset + v3_to_v2_code())
    out = {}
    for k, v in own.items():
        w = init[k]
        if w.shape != v.shape:
            if w.shape != (v2.image_offset + v2.codebook, v.shape[1]) or v.shape[0] != v3.image_offset + v3.codebook:
                raise SystemExit(f"--init: {k} has shape {tuple(w.shape)}, expected a v2 checkpoint's vocabulary rows")
            w = torch.cat([w[: v3.image_offset], w[src] + 0.01 * torch.randn(len(src), v.shape[1], generator=gen)])
        out[k] = w
    return out


@functools.lru_cache(maxsize=1)
def slot_regions() -> torch.Tensor:
    """int64 [GRID * GRID]: each token's region for ``--p-slot-mask``: slot k (0..8, the slots
    ``diagnostics.slot_cells`` names) or 9 (the lines between and around them). Built once: the
    training loop asks for it every step, and no caller writes to it."""
    from ladr_testbed.diagnostics import slot_cells

    cells = slot_cells()
    region = torch.full((GRID * GRID,), len(cells), dtype=torch.int64)
    for k, flat in enumerate(cells):
        region[torch.from_numpy(flat)] = k
    return region


def slot_masks(B: int, region: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """bool [B, N]: masks drawn region by region, as the confidence samplers leave them: a
    quarter of the regions wholly masked, a quarter wholly decided, the rest at their own
    cosine-schedule ratio. Uniform random masks almost never show one slot finished while
    another is untouched, yet that is the state in which a sampler must start a scene's second
    object. Any mask is a valid training target (the loss is the conditional of the masked
    tokens given the rest), so this changes which states are practised, not the optimum."""
    R = int(region.max()) + 1
    ratio = torch.cos(torch.rand(B, R, generator=gen) * math.pi / 2)  # [B, R]
    kind = torch.rand(B, R, generator=gen)  # [B, R]
    ratio = torch.where(kind < 0.25, 1.0, torch.where(kind < 0.5, 0.0, ratio))
    u = torch.rand(B, len(region), generator=gen)  # [B, N]
    masked = u < ratio[:, region]
    none = ~masked.any(1, keepdim=True)  # [B, 1] a scene needs one masked token to score
    return masked | (none & (u == u.max(1, keepdim=True).values))


def batch(rng: np.random.Generator, tok, seq: SequenceLayout, B: int, p_uncond: float, gen: torch.Generator,
          p_relation: float = P_RELATION, p_colour_pair: float = P_COLOUR_PAIR, testbed: str = "v2",
          grid: int = GRID, p_slot_mask: float = 0.0):
    specs = [sample_train_spec(rng, p_relation, p_colour_pair) for _ in range(B)]
    codes = torch.from_numpy(np.stack([draw(s, rng, testbed, grid).ravel() for s in specs]))  # [B, N]
    ids, key_mask = build_rows(tok, [s.prompt for s in specs], seq)  # [2B, L] cond rows then uncond rows
    drop = torch.from_numpy(rng.random(B) < p_uncond)
    ids = torch.where(drop[:, None], ids[B:], ids[:B])
    key_mask = torch.where(drop[:, None], key_mask[B:], key_mask[:B])
    N = seq.n_image
    t = torch.rand(B, generator=gen)
    n_mask = torch.ceil(torch.cos(t * math.pi / 2) * N).clamp_(1, N).long()  # [B]
    rank = torch.rand(B, N, generator=gen).argsort(-1).argsort(-1)
    masked = rank < n_mask[:, None]  # [B, N] a uniformly random subset of n_mask positions
    if p_slot_mask > 0:  # drawn only when asked, so runs without it keep their random stream
        by_slot = torch.rand(B, generator=gen) < p_slot_mask  # [B]
        masked = torch.where(by_slot[:, None], slot_masks(B, slot_regions(), gen), masked)
    lay = seq.layout
    img = torch.where(masked, torch.full_like(codes, lay.mask), codes + lay.image_offset)
    ids[:, seq.image_positions] = img
    return ids, key_mask, codes, masked


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write (replaced atomically)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=384)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--p-relation", type=float, default=P_RELATION,
                    help="share of two-group scenes that name a spatial relation (the rest say 'and')")
    ap.add_argument("--p-colour-pair", type=float, default=P_COLOUR_PAIR,
                    help="chance that each group of a two-group scene names its colour (both named: its "
                         "square); more named pairs give more examples binding each colour word to its shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-loss", type=float, default=0.0,
                    help="weight of an extra cross-entropy on each masked token's class (code_groups: background "
                         "or colour, and on v3 the colour's coverage class): pushes capacity to layout and binding over background texture")
    ap.add_argument("--p-slot-mask", type=float, default=0.0,
                    help="share of scenes masked slot by slot (slot_masks: whole slots masked or decided, as a "
                         "confidence sampler leaves them) instead of uniformly; grid 16 only")
    ap.add_argument("--testbed", choices=TESTBEDS, default="v2",
                    help="training data: v2 (the shipped model's), v3 (scenes_v3, free placement) or v3-slots "
                         "(scenes_v3 in v2's slots: issue 16's cheap control)")
    ap.add_argument("--grid", type=int, default=GRID, help="token grid side (v3 only; v2 and v3-slots are 16)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop (and save) after this much wall time even if --steps are not done; the learning "
                         "rate schedule still spans --steps, so pick --steps that fit the budget")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop (and save) after this many steps, the learning rate schedule still spanning "
                         "--steps: reproduces a run that --minutes or a hand stopped early, on any machine")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads: 2 on 2 otherwise idle cores (0.33 s/step against 0.68 for 1); "
                         "1 when another job shares the cores (OpenMP barriers stall under contention)")
    ap.add_argument("--init", default=None,
                    help="start from this checkpoint's weights (a second stage; the optimizer starts fresh)")
    ap.add_argument("--log", default=None, help="also write the loss curve here (JSON lines)")
    ap.add_argument("--save-every", type=int, default=500, help="checkpoint every this many steps")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for matmuls and attention (weights, optimizer and loss stay fp32): "
                         "0.25 against 0.34 s/step on the 2-core Zen 4 VM")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (inductor, about 30 s once): 0.32 s/step, 0.23 with --bf16")
    args = ap.parse_args(argv)
    if args.grid != GRID and args.testbed != "v3":
        ap.error(f"--grid {args.grid}: only --testbed v3 draws other grids than {GRID}")
    if not 0 <= args.group_loss < math.inf:
        ap.error(f"--group-loss must be a finite weight >= 0, got {args.group_loss}")
    if not 0 <= args.p_slot_mask <= 1:
        ap.error(f"--p-slot-mask must be a share in [0, 1], got {args.p_slot_mask}")
    if args.p_slot_mask and args.grid != GRID:
        ap.error(f"--p-slot-mask: the slots are v2's {GRID}x{GRID} grid's; drop it for --grid {args.grid}")
    if args.minutes is not None and not args.minutes > 0:
        ap.error(f"--minutes must be positive, got {args.minutes}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        ap.error(f"--stop-after must lie between 1 and --steps ({args.steps}), got {args.stop_after}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = model_config(args)
    tok = tokenizer()
    seq = SequenceLayout(ImageSpec(args.grid * 16, args.grid * 16, PROMPT_BUDGET), cfg.layout)
    model = DimooModel(cfg)
    init_weights(model, args.layers, gen)
    if args.init:
        from ladr_rt.checkpoint import CheckpointError, load_state_dict

        try:
            init = load_state_dict(args.init)
        except CheckpointError as e:
            raise SystemExit(f"--init: {e}") from None
        model.load_state_dict(warm_start(init, model.state_dict(), args.testbed, gen))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "wte" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    command = "python bench/testbed/train.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"{n_params / 1e6:.2f}M parameters, seq_len {seq.seq_len}, testbed {args.testbed}, codebook "
          f"{cfg.layout.codebook}; {command}", flush=True)
    log_f = open(args.log, "w") if args.log else None
    recent: list[float] = []
    t0 = time.time()

    def save(step: int) -> None:
        final = float(np.mean(recent[-100:]))
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        info = {"command": command, "steps": step, "final_loss_last100": round(final, 4),
                "params": n_params, "seconds": round(time.time() - t0, 1), "threads": args.threads,
                "torch": torch.__version__, "seed": args.seed, "testbed": args.testbed, "init": args.init,
                "lr": args.lr, "batch": args.batch, "group_loss": args.group_loss, "p_slot_mask": args.p_slot_mask, "p_relation": args.p_relation, "p_colour_pair": args.p_colour_pair,
                "arch": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                         "mlp": cfg.mlp_hidden_size, "codebook": cfg.layout.codebook, "grid": args.grid}}
        if args.minutes is not None:
            info["minutes_budget"] = args.minutes
        vq = palette() if args.testbed == "v2" else palette_v3()
        save_checkpoint(args.out, cfg, sd, tok, vq=vq, extra_files={
            "TRAINING.md": training_md(info), "training.json": json.dumps(info, indent=1) + "\n"})

    groups = code_groups(args.testbed)  # [codebook]
    model.train()
    forward = torch.compile(model) if args.compile else model  # same parameters; saving reads `model`
    done = args.steps if args.stop_after is None else args.stop_after
    for step in range(done):
        if args.minutes is not None and step > 0 and time.time() - t0 > 60 * args.minutes:  # one step at least
            done = step
            print(f"--minutes {args.minutes} reached after {step} steps", flush=True)
            break
        ids, key_mask, codes, masked = batch(rng, tok, seq, args.batch, args.p_uncond, gen, args.p_relation,
                                             args.p_colour_pair, args.testbed, args.grid, args.p_slot_mask)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = forward(ids, key_mask, image_positions=seq.image_positions)  # [B, N, K]
        ce = F.cross_entropy(logits[masked].float(), codes[masked])  # the logged loss: comparable across runs
        loss = ce + args.group_loss * group_nll(logits[masked], codes[masked], groups) if args.group_loss else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(ce.item())
        if step % 25 == 0 or step == done - 1:
            rec = {"step": step, "loss": round(float(np.mean(recent[-25:])), 4), "lr": round(lr_at(step), 6),
                   "seconds": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            if log_f:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < done:
            save(step + 1)
    save(done)
    print(f"done: final loss (mean of last 100 steps) {np.mean(recent[-100:]):.4f} in {time.time() - t0:.0f} s")


CODEBOOK_KIND = {"v2": "colour x edge-pattern", "v3": "background-level / shaded-colour / anti-aliased-rim",
                 "v3-slots": "background-level / shaded-colour / anti-aliased-rim"}
DATA = {"v2": "`ladr_testbed/scenes.py`", "v3": "`ladr_testbed/scenes_v3.py`, free layout",
        "v3-slots": "`ladr_testbed/scenes_v3.py`, v2's slot layout"}


def training_md(info: dict) -> str:
    a = info["arch"]
    return (
        "# Testbed mini-DiMOO: how this checkpoint was made\n\n"
        "Written by `bench/testbed/train.py` at the end of its run (numbers from that run).\n\n"
        "Lumina-DiMOO's architecture (LLaDA block: RMSNorm, RoPE, bidirectional attention, SwiGLU) and "
        "its text-to-image sequence layout (system/user template, BOA BOI, rows of codes each ending in "
        "NEWLINE, EOI EOA, left-padded prompt), shrunk: "
        f"d_model {a['d_model']}, {a['n_layers']} layers, {a['n_heads']} heads, MLP {a['mlp']}, "
        f"a {a['codebook']}-code {CODEBOOK_KIND[info.get('testbed', 'v2')]} codebook, a {a['grid']}x{a['grid']} "
        f"token grid ({a['grid'] * 16}x{a['grid'] * 16} px). Data: {DATA[info.get('testbed', 'v2')]} (held-out "
        "prompts never drawn).\n\n"
        f"- command (from the repository root): `{info['command']}`\n"
        + (f"- warm start: every weight from `{info['init']}` (`train.warm_start`: a checkpoint of the same "
           "shapes as is, a v2 checkpoint's code rows mapped onto v3's codes by `v3_to_v2_code`), so this model's cost includes that checkpoint's training\n"
           if info.get("init") else "") +
        (f"- objective: masked-token cross-entropy plus {info['group_loss']:g} x the class loss (`train.group_nll`: "
           "-log of the target's class probability; classes: background or colour, on v3 colour x coverage), which keeps the "
           "per-code optimum and weights layout and binding over background texture\n"
           if info.get("group_loss") else "") +
        (f"- masks: {info['p_slot_mask']:g} of the scenes masked slot by slot (`train.slot_masks`: a quarter of the slots "
           "wholly masked, a quarter wholly decided, the rest at their own ratio, as a confidence sampler leaves them), the "
           "rest uniformly\n" if info.get("p_slot_mask") else "") +
        f"- steps: {info['steps']}; parameters: {info['params']}\n"
        f"- final training loss (mean cross-entropy on masked image tokens, last 100 steps): "
        f"{info['final_loss_last100']}\n"
        f"- wall time: {info['seconds']} s on {info['threads']} CPU thread(s), torch {info['torch']}\n"
        f"- seed {info['seed']}: the same command on the same thread count gives the same loss curve (exactly "
        "in eager fp32; within noise with --bf16 --compile on more than one thread; "
        "`tests/test_testbed.py::test_training_is_seeded`)\n"
    )


if __name__ == "__main__":
    main()
