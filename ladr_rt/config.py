"""Every knob of ladr-rt, as a few frozen dataclasses with one set of defaults.

The CLI and the Python API build these; nothing else holds defaults.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

# --- Lumina-DiMOO special token ids (the official config.py) ---
MASK = 126336
NEWLINE = 126084
IMAGE_OFFSET = 126356  # image code c has token id IMAGE_OFFSET + c
BOI = 126349  # begin of image
EOI = 126350  # end of image
UNCONDITION = 126351
BOA = 126354  # begin of answer
EOA = 126355  # end of answer
CODEBOOK = 8192
VQ_SCALE = 16  # pixels per VQ token along each side

SYSTEM_PROMPT = "Generate an image according to the text prompt."
COND_TEMPLATE = "<system>{system}</system><user>{prompt}</user>"
UNCOND_TEMPLATE = "<system>{system}</system><user><uncondition></user>"


@dataclass(frozen=True)
class TokenLayout:
    """Where the special tokens and image codes live in the vocabulary.

    Defaults are DiMOO's. A checkpoint may override them in config.json under
    ``ladr_layout`` (the shipped testbed model does: its vocabulary is tiny).
    """

    mask: int = MASK
    newline: int = NEWLINE
    image_offset: int = IMAGE_OFFSET
    boi: int = BOI
    eoi: int = EOI
    uncondition: int = UNCONDITION
    boa: int = BOA
    eoa: int = EOA
    codebook: int = CODEBOOK
    vq_scale: int = VQ_SCALE
    system_prompt: str = SYSTEM_PROMPT
    cond_template: str = COND_TEMPLATE
    uncond_template: str = UNCOND_TEMPLATE

    @classmethod
    def from_dict(cls, d: Any, where: str = "ladr_layout") -> "TokenLayout":
        """Field by field: a typo'd key or a wrong type is refused, never silently defaulted."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ConfigError(f"{where!r} must be an object of token ids, got {_show(d)}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{where!r} has unknown key(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(known)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if known[k].type == "str":
                if not isinstance(v, str):
                    raise ConfigError(f"'{where}.{k}' must be a string, got {_show(v)}")
                kw[k] = v
            else:
                kw[k] = _int(v, f"{where}.{k}", minimum=1 if k in ("codebook", "vq_scale") else 0, maximum=MAX_VOCAB)
        lay = cls(**kw)
        lay.check(where)
        return lay

    def check(self, where: str = "ladr_layout") -> None:
        ids = {k: getattr(self, k) for k in SPECIAL_FIELDS}
        seen: dict[int, str] = {}
        for k, v in ids.items():
            if v in seen:
                raise ConfigError(f"'{where}.{k}' and '{where}.{seen[v]}' are both {v}; special ids must differ")
            seen[v] = k
            if self.image_offset <= v < self.image_offset + self.codebook:
                raise ConfigError(f"'{where}.{k}' {v} lies inside the image codes [{self.image_offset}, "
                                  f"{self.image_offset + self.codebook}); move it or image_offset")
        for name, tmpl, fields in (("cond_template", self.cond_template, ("system", "prompt")),
                                   ("uncond_template", self.uncond_template, ("system",))):
            try:
                tmpl.format(system="", prompt="")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"'{where}.{name}' {tmpl!r} is not a template of {{system}}"
                                  f"{' and {prompt}' if 'prompt' in fields else ''} ({type(e).__name__}: {e})") from None
            missing = [f for f in fields if "{" + f + "}" not in tmpl]
            if missing:
                raise ConfigError(f"'{where}.{name}' {tmpl!r} lacks {', '.join('{' + f + '}' for f in missing)}")


# Sanity bounds on config.json sizes: far above any real model (DiMOO: 4096, 32, 134548), low
# enough that a typo'd 1e12 is refused instead of building a trillion-layer module list.
MAX_DIM = 65536
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 24

SPECIAL_FIELDS = ("mask", "newline", "boi", "eoi", "uncondition", "boa", "eoa")


class ConfigError(ValueError):
    """A config.json field that cannot be used; the message names the field (the caller adds the file)."""


def _show(v: Any) -> str:
    r = repr(v)
    return (r[:40] + "…") if len(r) > 40 else r


def _int(v: Any, name: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    # bool is an int in Python; `"n_heads": true` is a typo, not 1.
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{name!r} must be an integer, got {_show(v)}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{name!r} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"{name!r} must be <= {maximum}, got {v}")
    return v


def _float(v: Any, name: str, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name!r} must be a number, got {_show(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise ConfigError(f"{name!r} must be a finite number, got {v}")
    if positive and v <= 0:
        raise ConfigError(f"{name!r} must be > 0, got {v}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{name!r} must be >= {minimum}, got {v}")
    return v


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name!r} must be true or false, got {_show(v)}")
    return v


@dataclass(frozen=True)
class ModelConfig:
    """Transformer sizes, read from the checkpoint's config.json (LLaDA field names)."""

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 134548
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    layout: TokenLayout = field(default_factory=TokenLayout)
    default_size: tuple[int, int] = (1024, 1024)  # (height, width) generate uses when none is given
    default_cfg: float = 4.0  # guidance scale when SamplerConfig.cfg is None (DiMOO's 4.0 unless config.json says)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_json_dict(cls, d: Any) -> "ModelConfig":
        """Validated field by field; a ConfigError names the field (read_config adds the file)."""
        if not isinstance(d, dict):
            raise ConfigError(f"the top level must be an object, got {_show(d)}")
        for k in ("d_model", "n_heads", "n_layers"):
            if k not in d:
                raise ConfigError(f"required field {k!r} is missing")
        d_model = _int(d["d_model"], "d_model", maximum=MAX_DIM)
        n_heads = _int(d["n_heads"], "n_heads", maximum=d_model)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ConfigError(f"'d_model' {d_model} / 'n_heads' {n_heads} must be an even integer head size "
                              "(RoPE rotates halves of each head)")
        # LLaDA configs may give n_kv_heads as null (= MHA) and the MLP size as a ratio.
        n_kv = n_heads if d.get("n_kv_heads") is None else _int(d["n_kv_heads"], "n_kv_heads", maximum=n_heads)
        if n_heads % n_kv:
            raise ConfigError(f"'n_heads' {n_heads} is not a multiple of 'n_kv_heads' {n_kv} (GQA groups)")
        if d.get("mlp_hidden_size") is not None:
            mlp = _int(d["mlp_hidden_size"], "mlp_hidden_size", maximum=MAX_DIM * 16)
        else:
            mlp = int(_float(d.get("mlp_ratio", 4), "mlp_ratio", positive=True) * d_model)
            if not 1 <= mlp <= MAX_DIM * 16:
                raise ConfigError(f"'mlp_ratio' {d.get('mlp_ratio')} gives an MLP of {mlp}; expected 1 to {MAX_DIM * 16}")
        vkey = "embedding_size" if d.get("embedding_size") is not None else "vocab_size"
        if d.get(vkey) is None:
            raise ConfigError("required field 'vocab_size' (or 'embedding_size') is missing")
        vocab = _int(d[vkey], vkey, maximum=MAX_VOCAB)
        unsupported = [
            k for k in ("include_bias", "include_qkv_bias", "attention_layer_norm", "scale_logits",
                        "input_emb_norm")
            if d.get(k)
        ]
        if unsupported:
            raise ConfigError(f"config.json enables {', '.join(unsupported)}, which DiMOO does not use and "
                              "ladr-rt does not implement")
        layout = TokenLayout.from_dict(d.get("ladr_layout"))
        over = [f"{k} {getattr(layout, k)}" for k in SPECIAL_FIELDS if getattr(layout, k) >= vocab]
        if layout.image_offset + layout.codebook > vocab:
            over.append(f"image codes up to {layout.image_offset + layout.codebook - 1}")
        if over:
            raise ConfigError(f"{vkey!r} {vocab} is too small for the token layout ({', '.join(over)}); "
                              "the config's vocabulary and ladr_layout disagree")
        size = d.get("ladr_default_size")
        if size is None:
            default_size = cls.default_size
        else:
            if not isinstance(size, list) or len(size) != 2:
                raise ConfigError(f"'ladr_default_size' must be [height, width], got {_show(size)}")
            default_size = tuple(_int(v, f"ladr_default_size[{i}]") for i, v in enumerate(size))
            bad = [v for v in default_size if v % layout.vq_scale]
            if bad:
                raise ConfigError(f"'ladr_default_size' {list(default_size)} must be multiples of the VQ scale "
                                  f"{layout.vq_scale}")
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            n_layers=_int(d["n_layers"], "n_layers", maximum=MAX_LAYERS),
            mlp_hidden_size=mlp,
            vocab_size=vocab,
            rope_theta=_float(d.get("rope_theta", 10000.0), "rope_theta", positive=True),
            rms_norm_eps=_float(d.get("rms_norm_eps", 1e-5), "rms_norm_eps", positive=True),
            weight_tying=_bool(d.get("weight_tying", False), "weight_tying"),
            layout=layout,
            default_size=default_size,
            default_cfg=_float(d.get("ladr_default_cfg", cls.default_cfg), "ladr_default_cfg", minimum=0.0),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """LLaDA-style config.json content (what the official loader reads, plus our layout)."""
        d = {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers,
            "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": 4,
            "vocab_size": self.vocab_size,
            "embedding_size": self.vocab_size,
            "rope": True,
            "rope_theta": self.rope_theta,
            "rope_full_precision": True,
            "rms_norm_eps": self.rms_norm_eps,
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "block_type": "llama",
            "weight_tying": self.weight_tying,
            "include_bias": False,
            "include_qkv_bias": False,
            "attention_layer_norm": False,
            "input_emb_norm": False,
            "scale_logits": False,
            "alibi": False,
            "flash_attention": False,
            "block_group_size": 1,
            "max_sequence_length": 4096,
            "mask_token_id": self.layout.mask,
        }
        if self.layout != TokenLayout():
            d["ladr_layout"] = dataclasses.asdict(self.layout)
        if self.default_size != ModelConfig.default_size:
            d["ladr_default_size"] = list(self.default_size)
        if self.default_cfg != ModelConfig.default_cfg:
            d["ladr_default_cfg"] = self.default_cfg
        return d

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # --- cost model, used by benchmarks for the roofline ---
    def flops_per_eval(self, seq_len: int, n_image: int, batch: int) -> float:
        """Forward FLOPs of one evaluation: linear layers, attention, codebook-only head."""
        d, hd = self.d_model, self.head_dim
        kv = self.n_kv_heads * hd
        per_tok_linear = 2 * self.n_layers * (d * d + 2 * d * kv + d * d + 3 * d * self.mlp_hidden_size)
        attn = 4 * seq_len * d * self.n_layers  # QK^T and PV, per token
        head = 2 * d * self.layout.codebook
        return float(batch * (seq_len * (per_tok_linear + attn) + n_image * head))


@dataclass(frozen=True)
class ImageSpec:
    """A fixed output size and prompt budget: what an engine is built for."""

    height: int = 512
    width: int = 512
    prompt_budget: int = 64  # text tokens per prompt row, left-padded

    def grid(self, vq_scale: int = VQ_SCALE) -> tuple[int, int]:
        return self.height // vq_scale, self.width // vq_scale

    def validate(self, vq_scale: int = VQ_SCALE) -> None:
        for name, v in (("height", self.height), ("width", self.width)):
            _option_int(v, f"--{name}")
            if v <= 0 or v % vq_scale:
                raise ValueError(f"--{name} {v} is not a positive multiple of {vq_scale} "
                                 f"(the VQ scale); try {max(vq_scale, round(v / vq_scale) * vq_scale)}")
            if v > MAX_SIDE:
                raise ValueError(f"--{name} {v} is over ladr-rt's limit of {MAX_SIDE} pixels; use {MAX_SIDE} or less")
        _option_int(self.prompt_budget, "--prompt-budget")
        if not 0 < self.prompt_budget <= MAX_PROMPT_BUDGET:
            raise ValueError(f"--prompt-budget must be positive and at most {MAX_PROMPT_BUDGET}, got {self.prompt_budget}")


CUDA_GRAPH_CHOICES = ("auto", "on", "off")
ATTENTION_CHOICES = ("auto", "sdpa", "cudnn", "flex")
# What --cuda-graph auto means on CUDA. Off until the GPU table shows the graphed path is not
# slower than eager (docs/cuda-graphs.md); its parity with eager is tested on the GPU.
CUDA_GRAPH_AUTO_ON_CUDA = False


@dataclass(frozen=True)
class RunOptions:
    """How the eager model runs on its device (not an engine: a built engine runs its own).

    ``cuda_graph``: ``on`` runs each step from a captured CUDA graph (the torch-graph denoiser:
    whole-step capture, falling back to plain steps with a warning), ``off`` the eager denoiser,
    ``auto`` the device's default (``CUDA_GRAPH_AUTO_ON_CUDA`` on CUDA, off elsewhere).
    ``attention``: the attention kernel (``ladr_rt/attention.py``; docs/attention.md)."""

    cuda_graph: str = "auto"
    attention: str = "auto"

    def validate(self, device_type: str | None = None) -> None:
        """Choices checked; with ``device_type`` (cpu, cuda), also against the device."""
        if self.cuda_graph not in CUDA_GRAPH_CHOICES:
            raise ValueError(f"--cuda-graph {_show(self.cuda_graph)}: choose one of {', '.join(CUDA_GRAPH_CHOICES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"--attention {_show(self.attention)}: choose one of {', '.join(ATTENTION_CHOICES)}")
        if device_type is not None and device_type != "cuda":
            if self.cuda_graph == "on":
                raise ValueError(f"--cuda-graph on needs a CUDA device (CUDA graphs), not {device_type}; use "
                                 "--cuda-graph auto or off")
            if self.attention == "cudnn":
                raise ValueError(f"--attention cudnn needs a CUDA device, not {device_type}; use --attention auto, "
                                 "sdpa or flex")

    def graphed(self, device_type: str) -> bool:
        """Whether the torch-graph denoiser runs on this device (validated first)."""
        self.validate(device_type)
        if self.cuda_graph == "auto":
            return device_type == "cuda" and CUDA_GRAPH_AUTO_ON_CUDA
        return self.cuda_graph == "on"

    def refuse_for_engine(self) -> None:
        """An engine fixed its runtime when it was built: these options would be ignored."""
        self.validate()
        for flag, v in (("--cuda-graph", self.cuda_graph), ("--attention", self.attention)):
            if v != "auto":
                raise ValueError(f"{flag} sets how the eager model runs; an engine from `ladr-rt build` runs its own "
                                 f"runtime, so leave {flag} out with --engine")


# Limits on what a request may ask for: past them a run would only exhaust memory (a 1e9-step
# trace, a 1e9-token row) before failing, so they are refused up front.
MAX_SIDE = 8192  # pixels: a 512x512 token grid
MAX_PROMPT_BUDGET = 8192  # text tokens per row
MAX_STEPS = 10_000
MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed


def _option_int(v: Any, flag: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{flag} must be an integer, got {_show(v)}")


def _option_float(v: Any, flag: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{flag} must be a finite number, got {_show(v)}")


SAMPLERS = ("baseline", "ladr", "ladr-delayed", "prophet", "threshold")


LADR_SAMPLERS = ("ladr", "ladr-delayed")  # the samplers that read LadrParams
# A kernel wider than any grid only costs time (max_pool2d does kernel^2 work per token);
# 63 tokens is already 1008 px, wider than DiMOO's 64-token grid's half-width many times over.
MAX_KERNEL = 63


@dataclass(frozen=True)
class LadrParams:
    """The LADR phase table (docs/ladr.md, step 5); defaults are the paper's.

    ``--ladr KEY=VALUE,...`` on the CLI (``LadrParams.from_option``) sets any of these fields.
    """

    explore_until: float = 0.2  # t_eff below this: exploration
    refine_from: float = 0.7  # t_eff at or above this: refinement
    tau_explore: float = 0.05
    tau_structure: float = 0.05
    tau_refine: float | None = None  # None: every frontier candidate is valid
    alpha_explore: float = 0.1
    alpha_structure: float = 0.3
    alpha_refine: float = 1.0
    kernel: int = 3  # neighbourhood: kernel x kernel around each token
    delayed: bool = False  # no rescue in the exploration phase (paper Table 5)

    def validate(self) -> None:
        """One ValueError line naming the key as ``--ladr`` spells it, and its range."""
        for k in ("explore_until", "refine_from"):
            _ladr_unit(getattr(self, k), k, "a phase bound on t_eff")
        if not self.explore_until < self.refine_from:
            raise ValueError(f"--ladr explore_until ({self.explore_until}) must be below refine_from "
                             f"({self.refine_from}): the structure phase lies between them")
        for k in ("tau_explore", "tau_structure", "tau_refine"):
            v = getattr(self, k)
            if not (k == "tau_refine" and v is None):
                # a margin top1 - top2 lies in [0, 1]: a threshold outside it is all-or-nothing by accident
                _ladr_unit(v, k, "a margin threshold" + (", or none (every candidate valid)" if k == "tau_refine"
                                                         else ""))
        for k in ("alpha_explore", "alpha_structure", "alpha_refine"):
            _ladr_unit(getattr(self, k), k, "a share of the frontier")
        kv = self.kernel
        if isinstance(kv, bool) or not isinstance(kv, int) or not 1 <= kv <= MAX_KERNEL or kv % 2 == 0:
            raise ValueError(f"--ladr kernel must be an odd integer from 1 to {MAX_KERNEL} (a centred "
                             f"neighbourhood; the paper's is 3), got {_show(kv)}")
        if not isinstance(self.delayed, bool):
            raise ValueError(f"--ladr delayed must be true or false, got {_show(self.delayed)}")

    def table(self) -> str:
        """The table as ``--ladr`` takes it: every key, in field order (logs, --help, traces)."""
        return ",".join(f"{f.name}={_ladr_text(getattr(self, f.name))}" for f in dataclasses.fields(self))

    @classmethod
    def from_option(cls, text: str | list[str] | tuple[str, ...], sampler: str = "ladr") -> "LadrParams":
        """``"tau_structure=0.05,alpha_refine=0.3"`` (or several such strings, as repeated
        ``--ladr`` options give) -> the paper's table with those keys replaced, validated.
        Keys are the field names; ``tau_refine=none``; ``delayed=true|false``."""
        texts = [text] if isinstance(text, str) else list(text)
        if sampler not in LADR_SAMPLERS:  # even a table equal to the paper's: the user asked for one
            raise _table_unused(sampler)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        keys = ", ".join(fields)
        kw: dict[str, Any] = {}
        items = [item for t in texts for item in t.split(",")]
        if not any(item.strip() for item in items):
            raise ValueError(f"--ladr needs KEY=VALUE pairs separated by commas (e.g. tau_structure=0.05,"
                             f"alpha_refine=0.3); keys: {keys}")
        for item in items:
            key, eq, val = (part.strip() for part in item.partition("="))
            if not item.strip():
                raise ValueError(f"--ladr {','.join(texts)!r} has an empty item (a stray comma); write "
                                 "KEY=VALUE,KEY=VALUE")
            if not key:
                raise ValueError(f"--ladr item {item.strip()!r} has no key; write KEY=VALUE with a key from: {keys}")
            if key not in fields:
                raise ValueError(f"--ladr: unknown key {key!r}; valid keys: {keys}")
            if not eq or not val:
                raise ValueError(f"--ladr {key} has no value; write {key}={_ladr_text(getattr(cls(), key))} "
                                 "(its default) or another value")
            if key in kw:
                raise ValueError(f"--ladr gives {key} twice; give each key once")
            kw[key] = _ladr_value(key, val)
        if sampler == "ladr-delayed" and kw.get("delayed") is False:
            raise ValueError("--sampler ladr-delayed always delays the rescue; use --sampler ladr for "
                             "--ladr delayed=false")
        p = cls(**kw)
        p.validate()
        return p


def _table_unused(sampler: str) -> ValueError:
    return ValueError(f"a LADR phase table (--ladr) was given, but --sampler {sampler} does not use it; use "
                      f"--sampler {' or '.join(LADR_SAMPLERS)}, or leave --ladr out")


def _ladr_unit(v: Any, key: str, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
        raise ValueError(f"--ladr {key} must be a finite number from 0 to 1 ({what}), got {_show(v)}")


def _ladr_text(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)


def _ladr_value(key: str, text: str) -> Any:
    """The text of one ``--ladr`` value as the field's type; range checks are ``validate``'s."""
    low = text.lower()
    if key == "delayed":
        if low not in ("true", "false"):
            raise ValueError(f"--ladr delayed must be true or false, got {text!r}")
        return low == "true"
    if key == "kernel":
        try:
            return int(text, 10)
        except ValueError:
            raise ValueError(f"--ladr kernel must be an odd integer (e.g. 3), got {text!r}") from None
    if key == "tau_refine" and low == "none":
        return None
    try:
        return float(text)
    except ValueError:
        extra = " or none" if key == "tau_refine" else ""
        raise ValueError(f"--ladr {key} must be a number{extra}, got {text!r}") from None


@dataclass(frozen=True)
class ProphetParams:
    """Prophet-style early commit (arXiv 2508.19982, adapted to images as LADR's Table 1 does):
    the baseline schedule, until the mean top-2 log-probability gap over the masked tokens
    clears the threshold of the current progress band; then every masked token is committed."""

    gap_early: float = 7.5  # fraction decoded < early_until
    gap_mid: float = 5.0
    gap_late: float = 2.5  # fraction decoded >= late_from
    early_until: float = 0.33
    late_from: float = 0.67


@dataclass(frozen=True)
class ThresholdParams:
    """Fast-dLLM-style parallel decoding (arXiv 2505.22618): every masked token whose
    confidence exceeds ``threshold`` is committed; LADR's inverse cosine schedule sets the
    minimum progress, so a run still ends within T evaluations."""

    threshold: float = 0.9


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "ladr"
    steps: int = 64  # T
    cfg: float | None = None  # s_cfg; None: the model's default (config.json ladr_default_cfg, else 4.0)
    temperature: float = 1.0
    seed: int = 0
    ladr: LadrParams = field(default_factory=LadrParams)
    prophet: ProphetParams = field(default_factory=ProphetParams)
    threshold: ThresholdParams = field(default_factory=ThresholdParams)

    def validate(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        _option_int(self.steps, "--steps")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"--steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if self.cfg is not None:
            _option_float(self.cfg, "--cfg")  # NaN would silently switch guidance off, inf blank the image
            if self.cfg < 0:
                raise ValueError(f"--cfg must be >= 0, got {self.cfg}")
        _option_float(self.temperature, "--temperature")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        _option_int(self.seed, "--seed")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be between 0 and 2**63 - 1 ({MAX_SEED}), got {self.seed}")
        if not isinstance(self.ladr, LadrParams):
            raise ValueError(f"SamplerConfig.ladr must be a LadrParams, got {_show(self.ladr)}")
        self.ladr.validate()
        # A table the sampler would ignore is refused: a user who set one expects it to act.
        if self.name not in LADR_SAMPLERS and self.ladr != LadrParams():
            raise _table_unused(self.name)

    def phase_table(self) -> dict | None:
        """The LADR phase table this config runs, as a dict (traces, /health); None: the sampler
        reads none."""
        return dataclasses.asdict(self.ladr) if self.name in LADR_SAMPLERS else None
