"""Every knob of ladr-rt, as a few frozen dataclasses with one set of defaults.

The CLI and the Python API build these; nothing else holds defaults.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# --- Lumina-DiMOO special token ids (official config.py; shared/spec/dimoo.md) ---
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
    def from_dict(cls, d: dict[str, Any] | None) -> "TokenLayout":
        if not d:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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
    def from_json_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        # LLaDA configs may give the MLP size as a ratio; n_kv_heads may be null (= MHA).
        d_model = int(d["d_model"])
        n_heads = int(d["n_heads"])
        mlp = d.get("mlp_hidden_size") or int(d.get("mlp_ratio", 4) * d_model)
        vocab = int(d.get("embedding_size") or d["vocab_size"])
        unsupported = [
            k for k in ("include_bias", "include_qkv_bias", "attention_layer_norm", "scale_logits",
                        "input_emb_norm")
            if d.get(k)
        ]
        if unsupported:
            raise ValueError(f"config.json enables {', '.join(unsupported)}, which DiMOO does not use and "
                             "ladr-rt does not implement")
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(d.get("n_kv_heads") or n_heads),
            n_layers=int(d["n_layers"]),
            mlp_hidden_size=int(mlp),
            vocab_size=vocab,
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            weight_tying=bool(d.get("weight_tying", False)),
            layout=TokenLayout.from_dict(d.get("ladr_layout")),
            default_size=tuple(d.get("ladr_default_size") or cls.default_size),
            default_cfg=float(d.get("ladr_default_cfg", cls.default_cfg)),
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
            if v <= 0 or v % vq_scale:
                raise ValueError(f"--{name} {v} is not a positive multiple of {vq_scale} "
                                 f"(the VQ scale); try {max(vq_scale, round(v / vq_scale) * vq_scale)}")
        if self.prompt_budget <= 0:
            raise ValueError(f"--prompt-budget must be positive, got {self.prompt_budget}")


SAMPLERS = ("baseline", "ladr", "ladr-delayed", "prophet", "threshold")


@dataclass(frozen=True)
class LadrParams:
    """The LADR phase table (shared/spec/ladr.md step 4); defaults are the paper's."""

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
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.cfg is not None and self.cfg < 0:
            raise ValueError(f"--cfg must be >= 0, got {self.cfg}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.ladr.kernel < 1 or self.ladr.kernel % 2 == 0:
            raise ValueError(f"LadrParams.kernel must be odd and >= 1 (a centred neighbourhood), got {self.ladr.kernel}")
