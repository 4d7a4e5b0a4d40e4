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

from dataclasses import dataclass
from functools import cached_property

import torch

from .config import ImageSpec, TokenLayout


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


def text_ids(tokenizer, prompt: str | None, layout: TokenLayout) -> list[int]:
    """Token ids of the conditional template (prompt given) or the unconditional one (None)."""
    if prompt is None:
        text = layout.uncond_template.format(system=layout.system_prompt)
    else:
        text = layout.cond_template.format(system=layout.system_prompt, prompt=prompt)
    # Called exactly as the official generator calls it (default add_special_tokens), so a
    # checkpoint whose tokenizer prepends BOS gets it here too.
    return list(tokenizer(text)["input_ids"])


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
