"""Prompt -> token rows, and the one place that knows where image tokens sit.

Row layout (every row of a batch, cond and uncond alike):

    [pad … pad | prompt text ids | BOA BOI | (W codes, NEWLINE) x H | EOI EOA]
     <-------- prompt_budget P -------->

Prompts are LEFT-padded to P with masked keys, so the image region sits at the same
offset in every row and every run (a fixed shape an engine can be built for). RoPE
depends only on distances, so outputs at real positions equal the unpadded evaluation.
Batch rows are [cond_0 … cond_{B-1}, uncond_0 … uncond_{B-1}].
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import torch

from .config import SPECIAL_FIELDS, ImageSpec, TokenLayout


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class SequenceLayout:
    spec: ImageSpec
    layout: TokenLayout

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.grid(self.layout.vq_scale)

    @property
    def n_image(self) -> int:  # N
        h, w = self.grid
        return h * w

    @property
    def image_start(self) -> int:  # index of the first grid token
        return self.spec.prompt_budget + 2

    @property
    def seq_len(self) -> int:  # L
        h, w = self.grid
        return self.image_start + h * (w + 1) + 2

    @cached_property
    def image_positions(self) -> torch.Tensor:
        """[N] long: sequence index of grid cell (r, c), row-major, newlines skipped."""
        h, w = self.grid
        r = torch.arange(h).repeat_interleave(w)
        c = torch.arange(w).repeat(h)
        return self.image_start + r * (w + 1) + c

    def image_region(self) -> list[int]:
        """BOA BOI, H rows of (W MASK + NEWLINE), EOI EOA."""
        lay = self.layout
        h, w = self.grid
        return [lay.boa, lay.boi] + ([lay.mask] * w + [lay.newline]) * h + [lay.eoi, lay.eoa]


class PromptError(ValueError):
    """A prompt that cannot be used as it is; the message names the fix."""


# transformers implements split_special_tokens by setting a flag on the shared Rust tokenizer
# (`encode_special_tokens`) before each encode, so two threads encoding at once can each run
# with the other's setting: a template's tags then come out as plain text. text_ids, the one
# caller of _ids, holds this lock for all of its encodes (the scheduler tokenizes on its
# clients' threads).
TOKENIZER_LOCK = threading.Lock()


def _ids(tokenizer, text: str, specials: bool, split: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=specials, split_special_tokens=split)["input_ids"])


def check_prompt(prompt) -> None:
    """What a prompt must be before any tokenizer sees it (the CLI calls it before loading)."""
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise PromptError("the prompt is empty; describe the image to generate (guidance needs a prompt to differ "
                          "from the unconditional row)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError("the prompt holds characters that are not valid Unicode text (undecodable bytes from the "
                          "command line?); pass UTF-8 text") from None


def _reserved(tokenizer, layout: TokenLayout) -> set[int]:
    """Ids user text must never produce: the layout's special ids and image codes, and the
    tokenizer's special tokens (template tags, BOS/EOS) except <unk>, the normal outcome of an
    unknown word. The tokenizer is given its chance first (split_special_tokens) — this is the
    check that what it returned holds."""
    ids = {getattr(layout, k) for k in SPECIAL_FIELDS}
    ids |= set(range(layout.image_offset, layout.image_offset + layout.codebook))
    unk = getattr(tokenizer, "unk_token_id", None)
    ids |= {i for i in tokenizer.all_special_ids if i != unk}
    return ids


def text_ids(tokenizer, prompt: str | None, layout: TokenLayout) -> list[int]:
    """Token ids of the conditional template (prompt given) or the unconditional one (None).

    User text is data, never markup: "<uncondition>" or "</user><system>" typed in a prompt
    must not become the special ids that make a cond row equal the uncond row or inject
    template tags. An ordinary prompt is tokenized exactly as the official generator does it
    (the whole template in one call, default add_special_tokens, so a tokenizer that prepends
    BOS gets it here too); one whose text holds special-token strings is encoded with
    special-token parsing off and spliced between the template's own ids.
    """
    with TOKENIZER_LOCK:
        return _text_ids(tokenizer, prompt, layout)


def _text_ids(tokenizer, prompt: str | None, layout: TokenLayout) -> list[int]:
    if prompt is None:
        return _ids(tokenizer, layout.uncond_template.format(system=layout.system_prompt), True)
    check_prompt(prompt)
    parts = [part.format(system=layout.system_prompt) for part in layout.cond_template.split("{prompt}")]
    reserved = _reserved(tokenizer, layout)
    template_only = _ids(tokenizer, "".join(parts), True)
    allowed = _count(template_only, reserved)
    user = _ids(tokenizer, prompt, False, split=True)
    if _ids(tokenizer, prompt, False) == user:  # no special-token text inside: the official call, unchanged
        ids = _ids(tokenizer, prompt.join(parts), True)
        if _count(ids, reserved) == allowed:
            return ids
    bad = sorted({i for i in user if i in reserved})
    if bad:
        raise PromptError(f"the prompt's text maps to reserved token id(s) {', '.join(map(str, bad[:5]))} even with "
                          "special-token parsing off (this tokenizer normalises text into them); reword the prompt")
    plain: list[int] = []
    for i, part in enumerate(parts):
        if i:
            plain += user
        plain += _ids(tokenizer, part, False)
    # Whatever add_special_tokens adds around the template (BOS, EOS), added around the splice.
    template_plain = _ids(tokenizer, "".join(parts), False)
    n = len(template_plain)
    for k in range(len(template_only) - n + 1):
        if template_only[k:k + n] == template_plain:
            return template_only[:k] + plain + template_only[k + n:]
    return plain


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The pieces of ``prompt`` the tokenizer can only map to its unknown token (each once, in
    order): a word-level vocabulary drops them, and the image then ignores them. A byte-level
    tokenizer (DiMOO's) has none."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not isinstance(prompt, str):
        return []
    with TOKENIZER_LOCK:
        try:
            enc = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            pieces = [prompt[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
        except NotImplementedError:  # a slow tokenizer has no offsets: word by word
            pieces = [w for w in prompt.split() if unk in _ids(tokenizer, w, False, split=True)]
    return list(dict.fromkeys(p for p in pieces if p.strip()))


def vocabulary(tokenizer) -> list[str]:
    """The tokenizer's text tokens (special tokens left out), by id."""
    specials = set(tokenizer.all_special_tokens)
    vocab = tokenizer.get_vocab()
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]


def _count(ids: list[int], reserved: set[int]) -> Counter:
    return Counter(i for i in ids if i in reserved)


def build_rows(tokenizer, prompts: list[str], seq: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [2B, L] int64 and key_mask [2B, L] bool (True = real token) for a batch of prompts."""
    budget = seq.spec.prompt_budget
    texts = [text_ids(tokenizer, p, seq.layout) for p in prompts]
    texts += [text_ids(tokenizer, None, seq.layout)] * len(prompts)
    for p, t in zip(prompts, texts):
        if len(t) > budget:
            raise PromptTooLong(f"prompt {p[:40]!r}{'…' if len(p) > 40 else ''} is {len(t)} tokens with its "
                                f"template, over the prompt budget of {budget}; shorten it or use "
                                f"--prompt-budget {len(t)} or more")
    if len(texts[-1]) > budget:
        raise PromptTooLong(f"the unconditional template is {len(texts[-1])} tokens, over the prompt budget of "
                            f"{budget}; use --prompt-budget {len(texts[-1])} or more")
    region = seq.image_region()
    ids = torch.full((len(texts), seq.seq_len), seq.layout.mask, dtype=torch.long)  # [2B, L]
    key_mask = torch.zeros(len(texts), seq.seq_len, dtype=torch.bool)  # [2B, L]
    for i, t in enumerate(texts):
        row = t + region
        ids[i, seq.seq_len - len(row):] = torch.tensor(row)
        key_mask[i, seq.seq_len - len(row):] = True
    return ids, key_mask


def write_image_tokens(ids: torch.Tensor, positions: torch.Tensor, z: torch.Tensor, M: torch.Tensor,
                       layout: TokenLayout, scratch: torch.Tensor) -> None:
    """In place: ids[:, positions] <- MASK where M else IMAGE_OFFSET + z, for cond and uncond rows.

    ids [2B, L]; positions [N]; z, M [B, N]; scratch [B, N] of ids' dtype (no allocation).
    """
    B = z.shape[0]
    torch.add(z, layout.image_offset, out=scratch)
    scratch.masked_fill_(M, layout.mask)
    ids[:B].index_copy_(1, positions, scratch)
    ids[B:].index_copy_(1, positions, scratch)
