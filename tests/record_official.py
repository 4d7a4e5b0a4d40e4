"""Record the official Lumina-DiMOO implementation's outputs on our tiny checkpoints.

The official code is never committed; it is run from a scratch copy:

    DIMOO_SRC=/path/to/Lumina-DiMOO  # git snapshot of Alpha-VLLM/Lumina-DiMOO (81344e6 was used)
    python tests/record_official.py --harness /path/to/run_official.py

`run_official.py` imports the official modules from $DIMOO_SRC, builds
`LLaDAForMultiModalGeneration` from our config.json, loads our safetensors strictly, and
calls the official `generate_image` unchanged (modes: logits, generate). It writes
tests/data/official_tiny.npz, which tests/test_official.py compares against.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
# The cases the test replays: (checkpoint kwargs, seed)
CKPTS = {"mha": ({}, 0), "gqa": ({"n_kv_heads": 2}, 1)}
PROMPT = "a red circle left of a blue square"
GEN_CASES = [  # (name, height, width, steps, cfg)
    ("cfg4", 64, 96, 8, 4.0),
    ("cfg0", 96, 48, 6, 0.0),
]


def columns(V: int, seed: int = 0) -> np.ndarray:
    """A fixed spread of vocabulary columns: text ids, the special ids, codebook ids."""
    from ladr_rt.config import BOA, BOI, EOA, EOI, IMAGE_OFFSET, MASK, NEWLINE, UNCONDITION

    rng = np.random.default_rng(seed)
    cols = set(rng.choice(V, 1536, replace=False).tolist()) | set(range(0, 64))
    cols |= {MASK, NEWLINE, BOA, BOI, EOA, EOI, UNCONDITION, IMAGE_OFFSET, V - 1}
    return np.array(sorted(cols), dtype=np.int64)


def cond_ids(ckpt: Path, height: int, width: int) -> np.ndarray:
    """The unpadded conditional row, as the official generator builds it."""
    from ladr_rt.checkpoint import load_tokenizer, read_config
    from ladr_rt.config import ImageSpec
    from ladr_rt.tokens import SequenceLayout, text_ids

    lay = read_config(ckpt).layout
    tok = load_tokenizer(ckpt)
    t = text_ids(tok, PROMPT, lay)
    seq = SequenceLayout(ImageSpec(height, width, len(t)), lay)
    return np.array([t + seq.image_region()], dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", required=True)
    ap.add_argument("--out", default=str(HERE / "data" / "official_tiny.npz"))
    a = ap.parse_args()
    from ladr_rt.tiny import tiny_config, write_tiny_checkpoint

    rec = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kw, seed) in CKPTS.items():
            ckpt = write_tiny_checkpoint(Path(tmp) / name, tiny_config(**kw), seed=seed)
            ids = cond_ids(ckpt, 48, 80)  # 3 x 5 grid: non-square
            np.save(Path(tmp) / "ids.npy", ids)
            subprocess.run([sys.executable, a.harness, "--mode", "logits", "--ckpt", str(ckpt), "--ids",
                            str(Path(tmp) / "ids.npy"), "--out", str(Path(tmp) / "logits.npy")], check=True)
            logits = np.load(Path(tmp) / "logits.npy")[0]  # [L, V]
            cols = columns(logits.shape[-1])
            rec[f"{name}_ids"] = ids
            rec[f"{name}_cols"] = cols
            rec[f"{name}_logits_cols"] = logits[:, cols]  # [L, C]
            from ladr_rt.config import MASK

            rec[f"{name}_logits_image"] = logits[ids[0] == MASK, -8192:]  # [N, 8192] codebook columns
            if name != "mha":
                continue
            for case, h, w, steps, cfg in GEN_CASES:
                out = Path(tmp) / f"{case}.npy"
                subprocess.run([sys.executable, a.harness, "--mode", "generate", "--ckpt", str(ckpt), "--prompt",
                                PROMPT, "--height", str(h), "--width", str(w), "--steps", str(steps), "--cfg",
                                str(cfg), "--temperature", "0", "--seed", "0", "--out", str(out)], check=True)
                rec[f"gen_{case}"] = np.load(out)
    np.savez_compressed(a.out, **rec)
    print(f"wrote {a.out}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in rec.items()))


if __name__ == "__main__":
    main()
