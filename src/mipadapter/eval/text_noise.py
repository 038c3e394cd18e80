"""The relevance experiment's perturbation on the base model: an eval-only attention processor.

The paper's §4 runs the experiment "in the original text-to-image diffusion model": no adapter, no
reference photos. `TextNoiseProcessor` is diffusers' SDPA attention (``AttnProcessor2_0``) plus one
step in the cross-attention layers: when the call carries a `TextNoisePlan`, the text attention output
``Z_text`` [b, h, p, d] of the *conditional* half of the batch gets noise before ``to_out``:

* uniform: ``level · rms(Z_text) · ε`` per batch row;
* weighted: ``ε ⊙ A_i / mean_p A_i`` rescaled to the uniform noise's norm, where ``A_i`` [p] is the
  relevance of subject i's name (the layer's own query against the frozen ``to_k`` of the name's rows,
  the name encoded on its own by `mipadapter.pipeline.encode_names`; the same ops as the MIP processor's).

Classifier-free guidance (the paper says nothing about it): only the conditional half is perturbed and
the relevance maps come from its queries. The unconditional half encodes the negative prompt, where an
object's name has no place; perturbing it too would make guidance (``uncond + w·(cond − uncond)``)
subtract part of the same noise again. So the image sees the noise amplified by the guidance scale
``w``, the same for the uniform and the weighted run. Without CFG the whole batch is conditional.

Per-call data flows through ``cross_attention_kwargs={"text_noise": plan}``; `installed` puts the
processor on every attention layer of a UNet for the duration of a ``with`` block and restores the
processors that were there, so the base pipeline is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mipadapter import ops
from mipadapter.modeling.processor import finish_attention, name_keys, text_attention

KWARG = "text_noise"

__all__ = ["KWARG", "TextNoisePlan", "TextNoiseProcessor", "installed"]


@dataclass
class TextNoisePlan:
    """One generation call's perturbation.

    perturb: ``f(z [b', h, p, d], relevance [b', n, p]) -> z`` (see `mipadapter.eval.relevance.relevance_noise`),
    applied to the conditional rows; name_embeds [n, m, c_text] and name_mask [n, m] (bool): the
    subjects' name rows; cfg: whether the batch is [unconditional; conditional] halves.
    """

    perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    name_embeds: torch.Tensor
    name_mask: torch.Tensor
    cfg: bool


class TextNoiseProcessor:
    """SDPA attention exactly as diffusers' ``AttnProcessor2_0`` (the MIP processor's text branch,
    ``text_attention`` / ``finish_attention``); with a plan, cross-attention layers add the plan's noise to
    the conditional rows' ``Z_text`` (module docstring)."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.plain = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        text_noise: TextNoisePlan | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if text_noise is None or encoder_hidden_states is None:  # self-attention, or no experiment
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        query, out, shape = text_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch = query.shape[0]
        first = batch // 2 if text_noise.cfg else 0  # rows [first:] are conditional
        keys = name_keys(attn, text_noise.name_embeds.unsqueeze(0))  # [1, h, n·m, d]
        n = text_noise.name_mask.shape[0]
        weights = ops.relevance_weights(
            text_noise.name_mask.unsqueeze(0), attn.heads, torch.arange(n, device=query.device),
            with_total=False, dtype=ops.working_dtype(query.dtype),
        )  # fmt: skip
        with torch.no_grad():
            maps = ops.position_maps(query[first:], keys.expand(batch - first, -1, -1, -1), weights.expand(batch - first, -1, -1))
        relevance = maps.transpose(1, 2).to(query.dtype)  # [b', n, p]
        out = torch.cat([out[:first], text_noise.perturb(out[first:], relevance)])
        return finish_attention(attn, out, hidden_states, shape)


@contextlib.contextmanager
def installed(unet) -> Iterator[None]:
    """`TextNoiseProcessor` on every attention layer of ``unet`` inside the block; the previous
    processors are put back afterwards (also on error)."""
    before = dict(unet.attn_processors)
    unet.set_attn_processor({name: TextNoiseProcessor() for name in before})
    try:
        yield
    finally:
        unet.set_attn_processor(before)
