"""Image projections: diffusers' own modules, built from an ``AdapterConfig``."""

from __future__ import annotations

from torch import nn

from mipadapter.config import AdapterConfig

RESAMPLER_HEAD_DIM = 64


def build_image_projection(config: AdapterConfig) -> nn.Module:
    """The projection from image-encoder features to ``num_tokens`` image tokens.

    basic: ``ImageProjection``, [k, image_embed_dim] → [k, num_tokens, cross_attention_dim].
    plus: ``IPAdapterPlusImageProjection``, [k, L, image_embed_dim] → [k, num_tokens, cross_attention_dim].
    """
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    if config.projection == "basic":
        return ImageProjection(
            image_embed_dim=config.image_embed_dim,
            cross_attention_dim=config.cross_attention_dim,
            num_image_text_embeds=config.num_tokens,
        )
    return IPAdapterPlusImageProjection(
        embed_dims=config.image_embed_dim,
        output_dims=config.cross_attention_dim,
        hidden_dims=config.resampler_dim,
        depth=config.resampler_depth,
        dim_head=RESAMPLER_HEAD_DIM,
        heads=config.resampler_heads,
        num_queries=config.num_tokens,
    )
