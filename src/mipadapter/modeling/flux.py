"""MIP-Adapter's processor for FLUX's double-stream blocks: the joint attention, and the routed image term.

FLUX's IP-Adapter (XLabs' layout, diffusers' ``FluxIPAdapterAttnProcessor``) adds, in each double-stream
block, an attention of the image stream's queries to the reference's image tokens; the block adds that
term to the image stream after its feed-forward. Here that term becomes the routed sum of
``modeling.routing.route``, with the relevance of image position ``p`` to subject ``i`` measured against
the queries the joint attention really uses (after RoPE) and the name's keys from the block's own text
path (``add_k_proj`` → ``norm_added_k`` → RoPE at text positions). docs/flux.md has the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from torch import nn

from mipadapter import ops
from mipadapter.modeling import routing
from mipadapter.modeling.conditioning import LayerInputs, SubjectConditioning

NAME_ROWS = "flux_name_rows"  # the prepare cache's key for the names' rows entering every block
NAME_ROTARY = "flux_name_rotary"  # ... and for their rotary table (cos, sin) [m, d]


class MIPFluxAttnProcessor(nn.Module):
    """A FLUX double-stream block's attention with multi-subject routing of the IP-Adapter term.

    Without a ``SubjectConditioning`` in the call it is diffusers' ``FluxAttnProcessor`` itself. With one,
    it computes the same joint attention and returns, as diffusers' IP-Adapter processor does, a third
    output: the routed image term ``[b, p, C]``, which the block adds to the image stream.

    Args:
        hidden_size: the block's inner width ``C``; cross_attention_dim: the image tokens' width ``J``
            (FLUX's ``joint_attention_dim``); layer_name: the block's attention module name; diagnose:
            whether it reports routed shares to a conditioning's meter.
    """

    text_to_weight = None  # XLabs' FLUX adapters carry no text weight

    def __init__(
        self, hidden_size: int, cross_attention_dim: int, layer_name: str = "", diagnose: bool = True
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.layer_name = layer_name
        self.diagnose = diagnose
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=True)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=True)
        self._plain = FluxAttnProcessor()

    # ------------------------------------------------------------------ once per call
    def prepare(self, attn, cond: SubjectConditioning, cache: dict, sources: Sequence[nn.Module] = ()) -> LayerInputs:
        """This block's per-call constants. ``cache`` carries the names' rows entering every block and their
        rotary table (``MIPAdapter.prepare`` puts them there), and the weight matrices shared by blocks;
        sources: this block's processors of the call's adapters (empty: this one alone)."""
        sources = list(sources) or [self]
        return routing.layer_inputs(
            cond,
            attn.heads,
            routing.image_keys_values(
                [(source.to_k_ip, source.to_v_ip) for source in sources], cond, attn.heads, self.layer_name
            ),
            lambda: self._name_keys(attn, cache[NAME_ROWS], cache[NAME_ROTARY]),
            ops.working_dtype(attn.to_q.weight.dtype),
            cache,
        )

    @staticmethod
    def _name_keys(attn, rows: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The block's text keys of the names' rows [b, n, m, C], RoPE'd, scaled by ``1/sqrt(d)``:
        [b, h, n·m, d]."""
        b, n, m, _ = rows.shape
        with torch.no_grad():
            keys = attn.add_k_proj(rows.to(attn.add_k_proj.weight.dtype)).unflatten(-1, (-1, attn.head_dim))
            keys = attn.norm_added_k(keys)  # [b, n, m, h, d]
            keys = apply_rotary_emb(keys.flatten(0, 1), rotary, sequence_dim=1).view(b, n, m, attn.heads, -1)
            return routing.flat_name_keys(keys)

    # ------------------------------------------------------------------ every step
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        ip_hidden_states: SubjectConditioning | None = None,
        **unused,
    ):
        if ip_hidden_states is None:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        cond = routing.check_conditioning(ip_hidden_states, self)
        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} runs in double-stream blocks, which have a text stream")
        # The joint attention, as diffusers' FluxAttnProcessor computes it, keeping the image queries.
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        image_query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [b, p, h, d], before RoPE
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([encoder_query, image_query], dim=1)  # [b, s + p, h, d]
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        joint = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        joint = joint.flatten(2, 3).to(query.dtype)  # [b, s + p, C]
        text_rows = encoder_hidden_states.shape[1]
        context, image = joint.split_with_sizes([text_rows, joint.shape[1] - text_rows], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        context = attn.to_add_out(context.contiguous())

        b, positions = hidden_states.shape[:2]
        routed = routing.route(
            cond,
            self.layer_name,
            relevance_query=query[:, text_rows:].transpose(1, 2),  # the image rows the joint attention used
            image_query=image_query.transpose(1, 2),  # the IP term attends before RoPE, as diffusers'
            base=None,
            gate=None,
            diagnose=self.diagnose,
        )  # [b, h, p, d]
        return image, context, routed.transpose(1, 2).reshape(b, positions, -1).to(image.dtype)


def name_rows(transformer, cond: SubjectConditioning) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The names' rows as they enter every double block's text path, once per call.

    cond.name_embeds [b, n, m, J] (each name's T5 rows, encoded on its own) → rows [b, n, m, C]: through
    the transformer's ``context_embedder`` (as the prompt's rows enter block 0), then the blocks' LayerNorm
    of the text stream — without its timestep modulation, which the attention processor never sees (a
    documented choice: docs/flux.md). Also the rotary table (cos, sin) [m, d] of text positions
    0…m−1; FLUX gives every text row the position id 0.
    """
    names = cond.name_embeds
    m = names.shape[2]
    with torch.no_grad():
        rows = transformer.context_embedder(names.to(transformer.context_embedder.weight.dtype))
        rows = transformer.transformer_blocks[0].norm1_context.norm(rows)  # no parameters: the same in every block
        rotary = transformer.pos_embed(torch.zeros(m, 3, device=rows.device))
    return rows, rotary
