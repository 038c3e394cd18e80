"""The training step: frozen encoders under no_grad, the adapter-equipped UNet with gradients.

Everything is batched: the references of all subjects of all samples go through the image encoder in
one call, all names through the text encoders in one call, and the UNet runs once; the processors
handle every subject of every layer in batched tensor ops. No Python loop over layers or subjects.

Variable subject counts: padded subjects have scale 0 and are marked absent in the conditioning's
``present`` mask, which zeroes their routing weight under every rule (under ``official`` their relevance
would otherwise enter ``Σ_k A_k``), so a padded sample computes what the unpadded one does.

Several views per subject (``views`` K > 1, single-object multi-view training): each view is its own
condition owned by its subject with a share of 1/K, as ``multi_image="each"`` routes several photos at
inference.

A dropped image (condition dropout) follows the authors and the inference pipeline's unconditional
input: basic adapters get a zero image embedding; Plus adapters get the image encoder's hidden states of
an all-zero (normalised) pixel input, which the resampler then projects (``train_sdxl_plus.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mipadapter.config import MergeRule
from mipadapter.modeling import MIPAdapter, SubjectConditioning
from mipadapter.modeling.conditioning import CROSS_ATTENTION_KWARG
from mipadapter.training.batching import TrainBatch
from mipadapter.training.text import TextConditioner


def subject_conditioning(
    image_tokens: torch.Tensor,
    subject_mask: torch.Tensor,
    name_embeds: torch.Tensor,
    name_mask: torch.Tensor,
    rule: MergeRule | str,
    use_text_weight: bool,
    latent_size: tuple[int, int],
    views: int = 1,
) -> SubjectConditioning:
    """The conditioning of a padded training batch (``views`` photos per subject, each its own condition).

    image_tokens [B, n·K, t, c] (subject-major); subject_mask [B, n] (bool); name_embeds [B, n, m, c];
    name_mask [B, n, m].
    """
    n = subject_mask.shape[1]
    device = image_tokens.device
    return SubjectConditioning(
        image_tokens=image_tokens,
        owner=torch.arange(n, device=device).repeat_interleave(views),
        share=torch.full((n * views,), 1.0 / views, device=device, dtype=image_tokens.dtype),
        scales=subject_mask.to(image_tokens.dtype),
        name_embeds=name_embeds,
        name_mask=name_mask,
        rule=MergeRule.parse(rule),
        use_text_weight=use_text_weight,
        latent_size=latent_size,
        present=None if bool(subject_mask.all()) else subject_mask,
    )


class AdapterUNet(nn.Module):
    """The frozen UNet with the adapter attached: the one module accelerate prepares (under DDP only the
    trainable adapter parameters are synchronised)."""

    def __init__(self, unet: nn.Module, adapter: MIPAdapter, rule: MergeRule | str) -> None:
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        self.rule = MergeRule.parse(rule)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        added_cond_kwargs: dict | None,
        image_features: torch.Tensor,
        subject_mask: torch.Tensor,
        name_embeds: torch.Tensor,
        name_mask: torch.Tensor,
        views: int = 1,
    ) -> torch.Tensor:
        """noisy_latents [B, 4, h, w]; image_features [B, n·K, D] or [B, n·K, L, D] (K = views) →
        prediction [B, 4, h, w]."""
        b = subject_mask.shape[0]
        conditions = image_features.shape[1]  # n·K
        tokens = self.adapter.project(image_features.flatten(0, 1))  # [B·n·K, t, c]
        tokens = tokens.view(b, conditions, *tokens.shape[1:])  # [B, n·K, t, c]
        cond = subject_conditioning(
            tokens,
            subject_mask,
            name_embeds,
            name_mask,
            self.rule,
            self.adapter.config.text_weight,
            tuple(noisy_latents.shape[-2:]),
            views,
        )
        self.adapter.prepare(cond)  # image keys/values with gradients, name keys frozen: once per step
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs={CROSS_ATTENTION_KWARG: cond},
        ).sample


@dataclass
class FrozenModels:
    """The frozen parts of a pipeline used in a step; ``weight_dtype`` is what the encoders run in."""

    vae: nn.Module
    text: TextConditioner
    image_encoder: nn.Module
    noise_scheduler: object  # a DDPMScheduler
    uses_hidden_states: bool
    weight_dtype: torch.dtype = torch.float32

    @property
    def arch(self) -> str:
        return self.text.arch


@torch.no_grad()
def encode_images(image_encoder: nn.Module, references: torch.Tensor, hidden_states: bool) -> torch.Tensor:
    """references [B, n, 3, S, S] → features [B, n, D] (projected embeds) or [B, n, L, D] (penultimate
    hidden states, for Plus projections), in one encoder call."""
    b, n = references.shape[:2]
    param = next(image_encoder.parameters())
    pixels = references.flatten(0, 1).to(param.device, param.dtype)  # [B·n, 3, S, S]
    if hidden_states:
        features = image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    else:
        features = image_encoder(pixels).image_embeds
    return features.view(b, n, *features.shape[1:])


@torch.no_grad()
def encode_dropped(
    image_encoder: nn.Module, references: torch.Tensor, drop: torch.Tensor, hidden_states: bool
) -> torch.Tensor:
    """`encode_images` with condition dropout: references [B, n, 3, S, S], drop [B] (bool).

    A dropped sample's features are what the inference pipeline feeds the unconditional half: zero
    embeddings (basic), or the hidden states of all-zero normalised pixels (Plus), as the authors do.
    """
    b = references.shape[0]
    keep = (~drop).view(b, *([1] * (references.ndim - 1)))
    if hidden_states:  # zero the pixels, then encode (train_sdxl_plus.py)
        return encode_images(image_encoder, references * keep.to(references.dtype), True)
    features = encode_images(image_encoder, references, False)
    return features * keep.view(b, 1, 1).to(features.dtype)  # zero embeddings (train_sdxl.py)


@torch.no_grad()
def encode_latents(vae: nn.Module, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """pixel_values [B, 3, R, R] in [-1, 1] → scaled latents [B, 4, R/8, R/8], sampled with ``generator``
    (a CPU generator: the draw does not depend on the device)."""
    param = next(vae.parameters())
    posterior = vae.encode(pixel_values.to(param.device, param.dtype)).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
    latents = posterior.mean + posterior.std * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def training_loss(
    model: nn.Module,
    frozen: FrozenModels,
    batch: TrainBatch,
    generator: torch.Generator,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """Epsilon (or v) prediction MSE of one batch with uniform timesteps; random draws from ``generator``."""
    device = batch.pixel_values.device
    dtype = frozen.weight_dtype
    latents = encode_latents(frozen.vae, batch.pixel_values, generator).to(dtype)  # [B, 4, h, w]
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    noise = noise.to(device, dtype)
    scheduler = frozen.noise_scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    with torch.no_grad():
        prompt_embeds, pooled = frozen.text.encode_prompts(batch.prompt_ids)
        name_embeds = frozen.text.encode_names(batch.name_ids, batch.name_mask)
        features = encode_dropped(
            frozen.image_encoder, batch.references, batch.drop_image, frozen.uses_hidden_states
        )
    added = None
    if frozen.arch == "sdxl":
        added = {"text_embeds": pooled.to(dtype), "time_ids": batch.time_ids.to(device, dtype)}
    prediction = model(
        noisy,
        timesteps,
        prompt_embeds.to(dtype),
        added,
        features,
        batch.subject_mask,
        name_embeds.to(dtype),
        batch.name_mask,
        batch.views,
    )
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())
