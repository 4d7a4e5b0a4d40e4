"""Bad input, as a hostile user gives it: one clear line, exit != 0, no traceback, nothing lost.

Every CLI case runs in-process (click's CliRunner) so the module stays a few seconds long, and
asserts: the exit code, that stderr is one line with no traceback, what the line names, and
that no output or temp file was left behind. Engine/manifest/build cases live in
test_hostile_engines.py.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import one_line_error, run_cli_inproc

SMALL = ["--height", "48", "--width", "80", "--steps", "6", "--no-progress"]


cli = run_cli_inproc


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def link_copy(src: Path, dst: Path) -> Path:
    """A checkpoint whose files are symlinks to ``src`` (as in a Hugging Face cache snapshot), so a
    case can replace one file without copying 35 MB of weights."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, dst / f.name, symlinks=True)
        else:
            (dst / f.name).symlink_to(f.resolve())
    return dst


def own(d: Path, name: str) -> Path:
    """Replace a symlinked file by a private copy before editing it."""
    f = d / name
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data)
    return f


def edit_config(d: Path, change) -> None:
    f = own(d, "config.json")
    cfg = json.loads(f.read_text())
    change(cfg)
    f.write_text(json.dumps(cfg))


# ----------------------------------------------------------------- 1. user data

def test_init_tiny_refuses_a_directory_it_did_not_write(tmp_path):
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "chapter1.tex").write_text("years of work")
    one_line_error(cli("init-tiny", str(d)), "not empty", "nothing was changed")
    assert listing(d) == ["chapter1.tex"] and (d / "chapter1.tex").read_text() == "years of work"
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(cli("init-tiny", str(f)), "not a directory")
    assert f.read_text() == "x"


def test_init_tiny_rewrites_its_own_checkpoint_but_not_files_added_to_it(tmp_path):
    d = tmp_path / "tiny"
    assert cli("init-tiny", str(d), "--d-model", "8", "--layers", "1").exit_code == 0
    (d / "notes.txt").write_text("mine")
    one_line_error(cli("init-tiny", str(d), "--d-model", "8", "--layers", "1"), "notes.txt", "nothing was changed")
    assert (d / "notes.txt").read_text() == "mine"
    (d / "notes.txt").unlink()
    before = (d / "model-00001-of-00001.safetensors").read_bytes()
    assert cli("init-tiny", str(d), "--d-model", "8", "--layers", "1", "--seed", "1").exit_code == 0
    assert (d / "model-00001-of-00001.safetensors").read_bytes() != before, "its own checkpoint is rewritten"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dirs left"


@pytest.mark.parametrize("args,needle", [(["--d-model", "12"], "--d-model"), (["--layers", "0"], "--layers"),
                                         (["--seed", "-1"], "--seed"), (["--d-model", "100000"], "--d-model")])
def test_init_tiny_bad_options(tmp_path, args, needle):
    one_line_error(cli("init-tiny", str(tmp_path / "t"), *args), needle)
    assert listing(tmp_path) == []


# ----------------------------------------------------------------- 2. threads

def test_two_threads_on_one_pipeline_give_the_serial_results(tiny_ckpt):
    from ladr_rt import LadrPipeline, SamplerConfig

    pipe = LadrPipeline.from_pretrained(tiny_ckpt, 48, 80)
    inner = pipe.denoiser

    class Slow:  # yields the GIL inside every evaluation, so unlocked calls would interleave
        def __getattr__(self, k):
            return getattr(inner, k)

        def __call__(self, *a):
            time.sleep(0.002)
            inner(*a)

    jobs = [("a red circle", SamplerConfig(name="baseline", steps=12, seed=1, temperature=1.0)),
            ("two blue squares", SamplerConfig(name="ladr", steps=12, seed=2, temperature=1.0))]
    serial = [pipe.generate_codes(p, c) for p, c in jobs]
    pipe.denoiser = Slow()
    got: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, pipe.generate_codes(*jobs[i])))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert torch.equal(got[i][0], serial[i][0]), f"thread {i}: codes differ from its serial run"
        assert got[i][2] == serial[i][2] and got[i][1]["masked"] == serial[i][1]["masked"]


# ----------------------------------------------------------------- 3. non-finite numbers

@pytest.mark.parametrize("opt,val", [("--cfg", "nan"), ("--cfg", "inf"), ("--cfg", "-inf"), ("--temperature", "nan"),
                                     ("--temperature", "inf")])
def test_non_finite_options(tmp_path, opt, val):
    out = tmp_path / "o.png"
    one_line_error(cli("generate", "--prompt", "a red circle", opt, val, "--out", str(out)), opt, "finite")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("value,needle", [("nan", "must be a number"), (float("nan"), "finite"),
                                          (-1, "must be >= 0"), (True, "must be a number")])
def test_non_finite_default_cfg_in_config(tiny_ckpt, tmp_path, value, needle):
    d = link_copy(tiny_ckpt, tmp_path / "m")
    edit_config(d, lambda c: c.__setitem__("ladr_default_cfg", value))
    line = one_line_error(cli("generate", "--model", str(d), "--prompt", "a cat", "--out", str(tmp_path / "o.png")),
                          "ladr_default_cfg", needle, "config.json")
    assert "--cfg" not in line, "a config.json value is not blamed on an option the user did not pass"


def test_nan_weights_fail_after_one_evaluation_and_write_nothing(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = link_copy(tiny_ckpt, tmp_path / "m")
    shard = next(iter(sorted(d.glob("model-*.safetensors"))))
    sd = load_file(str(shard))
    k = next(k for k in sd if "blocks.0.q_proj" in k or "wte" in k)
    sd[k][0, 0] = float("nan")
    shard.unlink()
    save_file(sd, str(shard))
    if "wte" in k:  # a NaN embedding row only poisons prompts that use it: poison every row
        sd[k][:] = float("nan")
        shard.unlink()
        save_file(sd, str(shard))
    out = tmp_path / "o.png"
    line = one_line_error(cli("generate", "--model", str(d), "--prompt", "a red circle", *SMALL, "--steps", "40",
                              "--out", str(out)), "NaN/inf", "weights")
    assert "first 1 evaluation" in line, "the flag is read with the stop test: the run stops at once"
    assert not out.exists()


def test_nan_logits_detected_without_a_host_read_per_step():
    """The flag lives on the device and is set by the step itself; hand-built logits."""
    from ladr_rt.config import SamplerConfig
    from ladr_rt.samplers import RunState, make_sampler

    st = RunState(1, 2, 2, 8, 4, 100, "cpu")
    sampler = make_sampler(SamplerConfig(name="ladr", steps=4, cfg=1.0), st)
    logits = torch.randn(2, 4, 8)
    sampler.step(logits)
    assert not st.saw_nonfinite() and st.keep_going()
    logits[1, 2, 3] = float("inf")  # an inf in the uncond row: guided logits get -inf - ... = NaN/inf
    sampler.step(logits)
    assert st.saw_nonfinite() and not st.keep_going()
    st.reset(0)
    assert not st.saw_nonfinite(), "a new run starts clean"


# ----------------------------------------------------------------- 4. zero is not "absent"

@pytest.mark.parametrize("opt", ["--height", "--width", "--prompt-budget"])
def test_zero_is_refused_not_defaulted(tmp_path, opt):
    one_line_error(cli("generate", "--prompt", "a red circle", opt, "0", "--out", str(tmp_path / "o.png")), opt,
                   "positive")
    assert listing(tmp_path) == []


def test_zero_is_refused_in_the_python_api(tiny_ckpt):
    from ladr_rt import LadrPipeline

    with pytest.raises(ValueError, match="--height"):
        LadrPipeline.from_pretrained(tiny_ckpt, height=0)
    with pytest.raises(ValueError, match="--prompt-budget"):
        LadrPipeline.from_pretrained(tiny_ckpt, prompt_budget=0)


@pytest.mark.parametrize("opt,val", [("--height", "100000"), ("--prompt-budget", "1000000000"),
                                     ("--steps", "1000000000")])
def test_huge_sizes_are_refused_before_allocating(tmp_path, opt, val):
    one_line_error(cli("generate", "--prompt", "a red circle", opt, val, "--out", str(tmp_path / "o.png")), opt)


# ----------------------------------------------------------------- 5. special-token text in prompts

def dimoo_shaped_tokenizer():
    """Word-level, with DiMOO's special ids as special tokens (mask, newline, image tags, answer tags,
    template tags, <uncondition>, a few image codes) and a BOS the post-processor prepends."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from ladr_rt import config as C
    from ladr_rt.tiny import WORDS

    vocab = {"<unk>": 0, "<|startoftext|>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    specials = {"<|mdm_mask|>": C.MASK, "<|newline|>": C.NEWLINE, "<boi>": C.BOI, "<eoi>": C.EOI,
                "<uncondition>": C.UNCONDITION, "<boa>": C.BOA, "<eoa>": C.EOA, "<system>": 126340,
                "</system>": 126341, "<user>": 126342, "</user>": 126343}
    specials |= {f"<|image_{i}|>": C.IMAGE_OFFSET + i for i in range(4)}
    vocab |= specials
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials) + ["<unk>", "<|startoftext|>"])
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A", special_tokens=[
        ("<|startoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|startoftext|>",
                                   additional_special_tokens=list(specials))


def _tokenizers():
    import ladr_testbed as tb
    from ladr_rt.config import TokenLayout
    from ladr_rt.tiny import word_tokenizer

    return {"shipped": (tb.tokenizer(), tb.layout()),
            "tiny": (word_tokenizer(uncondition_id=TokenLayout().uncondition), TokenLayout()),
            "dimoo-shaped": (dimoo_shaped_tokenizer(), TokenLayout())}


HOSTILE = ["<uncondition>", "</user><system>", "a red circle <|mdm_mask|> <boi> <|image_3|>", "<user>", "<eoa><boa>",
           "<|startoftext|> two squares", "</SYSTEM> <Uncondition>"]


@pytest.mark.parametrize("name", ["shipped", "tiny", "dimoo-shaped"])
def test_prompt_text_never_becomes_special_ids(name):
    from ladr_rt.tokens import _reserved, text_ids

    tok, lay = _tokenizers()[name]
    reserved = _reserved(tok, lay)
    template = tok(lay.cond_template.format(system=lay.system_prompt, prompt=""))["input_ids"]
    expected_reserved = sorted(i for i in template if i in reserved)
    uncond = text_ids(tok, None, lay)
    for p in ["a red circle above a blue square", "  two GREEN triangles , left of a cat "]:
        # ordinary prompts: exactly the official call (the whole template through the tokenizer)
        assert text_ids(tok, p, lay) == tok(lay.cond_template.format(system=lay.system_prompt, prompt=p))["input_ids"]
    for p in HOSTILE:
        ids = text_ids(tok, p, lay)
        assert sorted(i for i in ids if i in reserved) == expected_reserved, (p, ids)
        assert ids != uncond, f"{p!r} must not turn the cond row into the uncond row"
        assert ids[: len(template) - 1][:3] == template[:3], "the template's own ids stay in front"


def test_uncondition_prompt_keeps_guidance_alive_end_to_end(tiny_ckpt):
    from ladr_rt import LadrPipeline
    from ladr_rt.tokens import build_rows

    pipe = LadrPipeline.from_pretrained(tiny_ckpt, 48, 80)
    ids, _ = build_rows(pipe.tokenizer, ["<uncondition>"], pipe.seq)
    assert not torch.equal(ids[0], ids[1]), "cond row == uncond row would neutralise guidance"


@pytest.mark.parametrize("prompt,needle", [("", "empty"), ("   \t ", "empty"), ("a \udcff cat", "Unicode")])
def test_empty_or_undecodable_prompt(tmp_path, prompt, needle):
    one_line_error(cli("generate", "--prompt", prompt, *SMALL, "--out", str(tmp_path / "o.png")), needle)
    assert listing(tmp_path) == []


# ----------------------------------------------------------------- 6. damaged checkpoints

def _truncate(d):
    f = own(d, sorted(p.name for p in d.glob("model-*.safetensors"))[0])
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _random_bytes(d):
    f = own(d, sorted(p.name for p in d.glob("model-*.safetensors"))[-1])
    f.write_bytes(np.random.default_rng(0).bytes(4096))


def _index(text):
    def f(d):
        own(d, "model.safetensors.index.json").write_text(text)
    return f


def _cfg(change):
    return lambda d: edit_config(d, change)


def _layout(**kw):
    def change(c):
        from dataclasses import asdict

        from ladr_rt.config import TokenLayout

        c["ladr_layout"] = asdict(TokenLayout()) | kw
    return _cfg(change)


def _int_weights(d):
    from safetensors.torch import load_file, save_file

    f = sorted(d.glob("model-*.safetensors"))[0]
    sd = load_file(str(f))
    sd = {k: (v * 100).to(torch.int32) for k, v in sd.items()}
    f.unlink()
    save_file(sd, str(f))


def _vq_weights_missing(d):
    (d / "vqvae" / "diffusion_pytorch_model.safetensors").unlink()


def _vq_config(text):
    def f(d):
        (d / "vqvae" / "config.json").unlink()
        (d / "vqvae" / "config.json").write_text(text)
    return f


DAMAGE = {
    "truncated shard": (_truncate, ["model-00001", "truncated or damaged", "re-download"]),
    "random-bytes shard": (_random_bytes, ["safetensors", "re-download"]),
    "index not JSON": (_index("{not json"), ["model.safetensors.index.json", "not valid JSON"]),
    "index without weight_map": (_index('{"metadata": {}}'), ["model.safetensors.index.json", "weight_map"]),
    "index weight_map of lists": (_index('{"weight_map": {"a": [1]}}'), ["index.json", "shard file names"]),
    "index outside the directory": (_index('{"weight_map": {"a": "../../etc/passwd"}}'), ["outside the model dir"]),
    "vqvae weights missing": (_vq_weights_missing, ["vqvae", "VQ decoder cannot be loaded"]),
    "vqvae config not JSON": (_vq_config("{oops"), ["vqvae/config.json", "not valid JSON"]),
    "vqvae config of wrong types": (_vq_config('{"_class_name": "VQModel", "num_vq_embeddings": "many"}'),
                                    ["vqvae"]),
    "config not JSON": (lambda d: own(d, "config.json").write_text("{"), ["config.json", "not valid JSON"]),
    "config a list": (lambda d: own(d, "config.json").write_text("[1]"), ["config.json", "object"]),
    "n_heads 0": (_cfg(lambda c: c.__setitem__("n_heads", 0)), ["config.json", "'n_heads'", ">= 1"]),
    "n_heads true": (_cfg(lambda c: c.__setitem__("n_heads", True)), ["'n_heads'", "integer"]),
    "d_model missing": (_cfg(lambda c: c.pop("d_model")), ["'d_model'", "missing"]),
    "rope_theta -1": (_cfg(lambda c: c.__setitem__("rope_theta", -1)), ["'rope_theta'", "> 0"]),
    "rms_norm_eps nan": (_cfg(lambda c: c.__setitem__("rms_norm_eps", float("nan"))), ["'rms_norm_eps'"]),
    "vq_scale 0": (_layout(vq_scale=0), ["ladr_layout.vq_scale"]),
    "codebook 0": (_layout(codebook=0), ["ladr_layout.codebook"]),
    "layout a list": (_cfg(lambda c: c.__setitem__("ladr_layout", [1, 2])), ["'ladr_layout'", "object"]),
    "layout typo": (_layout(image_ofset=5), ["image_ofset", "unknown"]),
    "layout template without prompt": (_layout(cond_template="<user></user>"), ["cond_template", "{prompt}"]),
    "layout template with a stray field": (_layout(cond_template="{system}{prompt}{x}"), ["cond_template"]),
    "special id inside the codes": (_layout(mask=126400), ["ladr_layout.mask", "inside the image codes"]),
    "two special ids equal": (_layout(boa=126349), ["must differ"]),
    "default size not a pair": (_cfg(lambda c: c.__setitem__("ladr_default_size", "big")), ["ladr_default_size"]),
    "default size off the VQ grid": (_cfg(lambda c: c.__setitem__("ladr_default_size", [50, 50])),
                                     ["ladr_default_size", "multiples"]),
    "vocab smaller than special ids": (_cfg(lambda c: (c.__setitem__("vocab_size", 1000), c.pop("embedding_size"))),
                                       ["'vocab_size' 1000", "too small"]),
    "image offset past vocab": (_layout(image_offset=134000), ["too small", "image codes"]),
    "integer weights": (_int_weights, ["not floating point"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint(tiny_ckpt, tmp_path, case):
    damage, needles = DAMAGE[case]
    d = link_copy(tiny_ckpt, tmp_path / "m")
    damage(d)
    out = tmp_path / "o.png"
    line = one_line_error(cli("generate", "--model", str(d), "--prompt", "a cat", *SMALL, "--out", str(out)), *needles)
    assert "--height" not in line and "--cfg" not in line, "config.json values are not blamed on options"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_hf_cache_style_symlinked_shards_load(tiny_ckpt, tmp_path):
    d = link_copy(tiny_ckpt, tmp_path / "m")  # every shard a symlink out of the directory, as in ~/.cache/huggingface
    r = cli("generate", "--model", str(d), "--prompt", "a cat", *SMALL, "--out", str(tmp_path / "o.png"))
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------- 7. outputs

def test_outputs_are_checked_before_the_model_loads(tmp_path):
    # --model is bogus too: the output error must come first (it would be found only after sampling)
    one_line_error(cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--out", "/proc/x.png"),
                   "--out /proc/x.png", "cannot create")
    one_line_error(cli("generate", "--prompt", "x", "--out", "/dev/null"), "not a regular file")


@pytest.mark.parametrize("flags", [("--out", "--trace"), ("--out", "--save-tokens"), ("--save-tokens", "--trace")])
def test_the_same_path_twice_is_refused(tmp_path, flags):
    args = []
    for f in flags:
        args += [f, str(tmp_path / "same.png")]
    if "--out" not in flags:
        args += ["--out", str(tmp_path / "o.png")]
    one_line_error(cli("generate", "--prompt", "x", *args), "same file")
    assert listing(tmp_path) == []


def test_out_suffix_picks_the_format_and_unknown_ones_are_refused(tiny_ckpt, tmp_path):
    from PIL import Image

    r = cli("generate", "--model", str(tiny_ckpt), "--prompt", "a cat", *SMALL, "--out", str(tmp_path / "o.jpg"))
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "o.jpg").format == "JPEG"
    one_line_error(cli("generate", "--prompt", "x", "--out", str(tmp_path / "o.jpq")), ".jpq", ".png")
    one_line_error(cli("generate", "--prompt", "x", "--out", str(tmp_path / "noext")), "suffix")
    assert listing(tmp_path) == ["o.jpg"]


def test_a_write_failure_after_sampling_writes_nothing_and_keeps_old_files(tiny_ckpt, tmp_path, monkeypatch):
    out, tok, trace = tmp_path / "o.png", tmp_path / "c.npy", tmp_path / "t.json"
    out.write_bytes(b"old picture")
    calls = []
    real_fsync = os.fsync

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second output hits a full disk
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    line = one_line_error(cli("generate", "--model", str(tiny_ckpt), "--prompt", "a cat", *SMALL, "--out", str(out),
                              "--save-tokens", str(tok), "--trace", str(trace)), "No space left", "nothing was written")
    assert "c.npy" in line
    assert listing(tmp_path) == ["o.png"] and out.read_bytes() == b"old picture", "all outputs or none; no temp files"


def test_symlinked_out_is_written_through(tiny_ckpt, tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert cli("generate", "--model", str(tiny_ckpt), "--prompt", "a cat", *SMALL, "--out", str(link)).exit_code == 0
    assert link.is_symlink() and target.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------- signals

def test_sigterm_during_sampling_exits_143_and_writes_nothing(tiny_ckpt, tmp_path, monkeypatch):
    from ladr_rt.pipeline import LadrPipeline

    real = LadrPipeline.step

    def step_then_terminated(self, sampler):
        real(self, sampler)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a job scheduler would, mid-run

    monkeypatch.setattr(LadrPipeline, "step", step_then_terminated)
    out = tmp_path / "o.png"
    one_line_error(cli("generate", "--model", str(tiny_ckpt), "--prompt", "a cat", *SMALL, "--out", str(out)),
                   "SIGTERM", "no output was written", code=143)
    assert listing(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is restored"


# ----------------------------------------------------------------- 10. wording and ranges

def test_huge_seed_is_refused_before_the_model_loads(tmp_path):
    line = one_line_error(cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--seed", str(2**70),
                              "--out", str(tmp_path / "o.png")), "--seed", "2**63")
    assert "Overflow" not in line


def test_dtype_with_an_engine_is_refused(tmp_path):
    one_line_error(cli("generate", "--engine", str(tmp_path / "e"), "--prompt", "x", "--dtype", "bf16", "--out",
                       str(tmp_path / "o.png")), "--dtype", "engine")


# ----------------------------------------------------------------- fuzz

FIELDS = ["d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
          "rope_theta", "rms_norm_eps", "weight_tying", "ladr_default_cfg", "ladr_default_size", "ladr_layout",
          "mlp_ratio"]
VALUES = [0, -1, 1, 3, 2**40, 1.5, float("nan"), float("inf"), -float("inf"), "", "32", None, True, False, [], {},
          [0, 0], [16, 16], [-16, 32], {"mask": "x"}, {"codebook": 1}, 1e-30, 1e30]
OPTIONS = {"--steps": ["0", "-3", "1", "2", "99999999999", "x", "1e3"], "--cfg": ["0", "-1", "nan", "1e308", "2"],
           "--temperature": ["0", "-0.0", "1e-300", "inf", "0.5"], "--seed": ["-1", "0", str(2**64), "7"],
           "--height": ["0", "16", "17", "-16", "48"], "--width": ["0", "32", "1e2"],
           "--prompt-budget": ["1", "0", "24", "999999999"], "--sampler": ["ladr", "prophet", "LADR", ""]}


def test_fuzz_config_and_options_never_traceback(tiny_ckpt, tmp_path):
    """Seeded mutations of config.json and option values: each run is a clean one-line error or a
    correct success (a PNG of the asked size), never a traceback; bounded to a few seconds."""
    from PIL import Image

    rng = random.Random(1234)
    base = json.loads((tiny_ckpt / "config.json").read_text())
    d = link_copy(tiny_ckpt, tmp_path / "m")
    own(d, "config.json")
    deadline, n, ok = time.monotonic() + 3.0, 0, 0
    while time.monotonic() < deadline or n < 20:
        n += 1
        cfg = json.loads(json.dumps(base))
        for _ in range(rng.randint(0, 2)):
            cfg[rng.choice(FIELDS)] = rng.choice(VALUES)
        (d / "config.json").write_text(json.dumps(cfg))
        args = ["--height", "32", "--width", "32", "--steps", "3"]
        for opt in rng.sample(sorted(OPTIONS), rng.randint(0, 3)):
            args += [opt, rng.choice(OPTIONS[opt])]
        out = tmp_path / f"o{n}.png"
        r = cli("generate", "--model", str(d), "--prompt", "a cat", "--no-progress", *args, "--out", str(out))
        assert isinstance(r.exception, (SystemExit, type(None))), (cfg, args, repr(r.exception))
        assert "Traceback" not in r.output, (cfg, args)
        if r.exit_code == 0:
            ok += 1
            last = dict(zip(args[::2], args[1::2]))
            assert Image.open(out).size == (int(last["--width"]), int(last["--height"])), (cfg, args)
        else:
            assert len(r.stderr.strip().splitlines()) == 1, (cfg, args, r.stderr)
            assert not out.exists()
        if n >= 400:
            break
    assert ok > 0 and n - ok > 0, f"the fuzz should see both outcomes ({ok} ok of {n})"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_of_memory_is_one_line(tiny_ckpt, tmp_path, monkeypatch):
    from ladr_rt.pipeline import LadrPipeline

    def oom(self, sampler):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes")

    monkeypatch.setattr(LadrPipeline, "step", oom)
    one_line_error(cli("generate", "--model", str(tiny_ckpt), "--prompt", "a cat", *SMALL, "--out",
                       str(tmp_path / "o.png")), "out of memory", "smaller")
    assert listing(tmp_path) == []


def test_tokenizing_from_many_threads_gives_the_serial_ids():
    """transformers switches split_special_tokens through a flag on the shared Rust tokenizer;
    unlocked, a thread encoding a template can run with another thread's flag and lose its tags
    (the serving scheduler tokenizes on its clients' threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from ladr_rt.tokens import text_ids

    tok, lay = _tokenizers()["tiny"]
    prompts = ["a red circle", "<uncondition> two squares", None, "</user><system> a cat", "blue triangles"] * 40
    serial = [text_ids(tok, p, lay) for p in prompts]
    with ThreadPoolExecutor(8) as ex:
        for _ in range(3):
            assert list(ex.map(lambda p: text_ids(tok, p, lay), prompts)) == serial
