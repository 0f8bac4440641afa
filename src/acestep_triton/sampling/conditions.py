"""Building the encoder states of the guidance branches, exactly as upstream does.

A generation encodes its prompt and lyrics once and reuses the states at every step:

- conditional ``P(x | speaker, text, lyric)``: the real text states, zero speaker (the released
  checkpoint has no speaker model), the lyric ids, normal lyric attention.
- unconditional, with ``use_erg_lyric``: text states from the ERG-weakened text encoder when
  ``use_erg_tag`` (else zeros), zero speaker, the *real* lyric ids through an ERG-weakened
  Conformer (blocks 4–5 queries × 0.01).
- unconditional, without ``use_erg_lyric``: zero text states, zero speaker, zero lyric ids
  (the ERG-tag text states are then unused, as upstream).
- text-only (double-condition guidance only): real text, zero speaker, and ERG-weakened
  lyrics (``use_erg_lyric``) or zero lyric ids.

Every branch keeps the conditional branch's encoder mask. Branches that the configuration
never uses are not computed (upstream computes some and throws them away; results are equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .backend import ComponentBackend
from .config import SamplerConfig
from .erg import lyric_query_scale, text_query_scale

#: Width of the speaker embedding input of the condition encoder.
SPEAKER_DIM = 512


@dataclass(frozen=True)
class PromptTokens:
    """A request's tokenised prompt and lyrics: ids and masks INT64, [B, T] and [B, Tl].

    The four tensors always travel together (the tokenizers produce them per request, every
    condition builder encodes all four), so they are one argument.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lyric_ids: torch.Tensor
    lyric_mask: torch.Tensor

    def to(self, device: torch.device | str) -> PromptTokens:
        """The same tokens on ``device`` (where the sampling loop runs)."""
        return PromptTokens(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.lyric_ids,
                                                      self.lyric_mask)))


@dataclass(frozen=True)
class PromptStates:
    """UMT5 states of the prompt, plus the ERG-weakened ones when ``use_erg_tag`` needs them."""

    states: torch.Tensor
    mask: torch.Tensor
    erg_states: torch.Tensor | None = None


@dataclass(frozen=True)
class EncodedConditions:
    """Encoder states [B,S,D] per guidance branch and the shared encoder mask [B,S].

    B is the number of items or 1 (one encoding shared by every item: all items of a request
    have the same prompt and lyrics, so encoding once is enough; ``expand`` broadcasts).
    ``uncond_mask`` is the unconditional branch's own encoder mask where it differs from
    ``mask`` (edit's null condition masks the lyrics out); None: it shares ``mask``.
    """

    cond: torch.Tensor
    mask: torch.Tensor
    uncond: torch.Tensor | None = None
    text_only: torch.Tensor | None = None
    uncond_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.cond.shape[0])

    def expand(self, items: int) -> EncodedConditions:
        """The same conditions with batch ``items`` (from 1 by broadcasting, or unchanged)."""
        if self.batch_size == items:
            return self
        if self.batch_size != 1:
            raise ValueError(f"conditions have batch {self.batch_size}, cannot serve {items} items")

        def grow(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.expand(items, *t.shape[1:])

        return replace(
            self,
            cond=grow(self.cond),
            mask=grow(self.mask),
            uncond=grow(self.uncond),
            text_only=grow(self.text_only),
            uncond_mask=grow(self.uncond_mask),
        )


def lyric_inputs(token_ids: Sequence[int], batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Lyric ids and mask INT64 [B, Tl]; no lyrics becomes one masked-out id 0, as upstream."""
    if len(token_ids) == 0:
        ids, mask = [0], [0]
    else:
        ids, mask = list(token_ids), [1] * len(token_ids)
    ids_t = torch.tensor([ids], dtype=torch.int64).repeat(batch_size, 1)
    mask_t = torch.tensor([mask], dtype=torch.int64).repeat(batch_size, 1)
    return ids_t, mask_t


def encode_prompt(
    backend: ComponentBackend,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    with_erg: bool,
) -> PromptStates:
    """Run the text encoder normally and, if ``with_erg``, with UMT5 blocks 8–9 weakened."""
    layers, device = backend.text_layers, input_ids.device
    states = backend.encode_text(input_ids, attention_mask, text_query_scale(layers, False, device))
    erg = None
    if with_erg:
        erg = backend.encode_text(input_ids, attention_mask, text_query_scale(layers, True, device))
    return PromptStates(states=states, mask=attention_mask, erg_states=erg)


def speaker_or_zeros(speaker: torch.Tensor | None, text_states: torch.Tensor) -> torch.Tensor:
    """The speaker embedding [B, 512], zeros when none is given: the released checkpoint has no
    speaker model, so upstream always feeds zeros."""
    if speaker is not None:
        return speaker
    return torch.zeros(text_states.shape[0], SPEAKER_DIM, dtype=torch.float32, device=text_states.device)


def encode_branches(
    backend: ComponentBackend,
    prompt: PromptStates,
    lyric_ids: torch.Tensor,
    lyric_mask: torch.Tensor,
    *,
    use_erg_tag: bool,
    use_erg_lyric: bool,
    need_uncond: bool,
    need_text_only: bool,
    speaker: torch.Tensor | None = None,
) -> EncodedConditions:
    """Encoder states of the conditional branch and of the requested extra branches."""
    text, text_mask = prompt.states, prompt.mask
    speaker = speaker_or_zeros(speaker, text)
    zero_speaker = torch.zeros_like(speaker)
    zero_lyrics = torch.zeros_like(lyric_ids)
    normal = lyric_query_scale(backend.lyric_layers, False, text.device)
    weakened = lyric_query_scale(backend.lyric_layers, True, text.device)

    cond, mask = backend.encode_conditions(text, text_mask, speaker, lyric_ids, lyric_mask, normal)

    uncond = None
    if need_uncond:
        if use_erg_lyric:
            if use_erg_tag and prompt.erg_states is None:
                raise ValueError("use_erg_tag needs the ERG text states (encode_prompt(with_erg=True))")
            null_text = prompt.erg_states if use_erg_tag else torch.zeros_like(text)
            uncond, _ = backend.encode_conditions(
                null_text, text_mask, zero_speaker, lyric_ids, lyric_mask, weakened
            )
        else:
            uncond, _ = backend.encode_conditions(
                torch.zeros_like(text), text_mask, zero_speaker, zero_lyrics, lyric_mask, normal
            )

    text_only = None
    if need_text_only:
        if use_erg_lyric:
            text_only, _ = backend.encode_conditions(
                text, text_mask, zero_speaker, lyric_ids, lyric_mask, weakened
            )
        else:
            text_only, _ = backend.encode_conditions(
                text, text_mask, zero_speaker, zero_lyrics, lyric_mask, normal
            )
    return EncodedConditions(cond=cond, mask=mask, uncond=uncond, text_only=text_only)


def build_conditions(
    backend: ComponentBackend, tokens: PromptTokens, config: SamplerConfig, speaker: torch.Tensor | None = None
) -> EncodedConditions:
    """Everything the text2music loop needs from the encoders, for ``config``'s guidance."""
    need_uncond = config.do_guidance
    need_text_only = config.do_guidance and config.double_condition
    with_erg_text = need_uncond and config.use_erg_tag and config.use_erg_lyric
    prompt = encode_prompt(backend, tokens.input_ids, tokens.attention_mask, with_erg=with_erg_text)
    return encode_branches(
        backend,
        prompt,
        tokens.lyric_ids,
        tokens.lyric_mask,
        use_erg_tag=config.use_erg_tag,
        use_erg_lyric=config.use_erg_lyric,
        need_uncond=need_uncond,
        need_text_only=need_text_only,
        speaker=speaker,
    )
