"""The user-facing generation API over a stock diffusers SDXL or SD1.5 pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mipadapter.alignment import align_subjects
from mipadapter.config import MergeRule, MultiImageMode, RegionMode
from mipadapter.modeling.adapter import MIPAdapter
from mipadapter.modeling.conditioning import CROSS_ATTENTION_KWARG, RelevanceRecorder, SubjectConditioning
from mipadapter.pipeline.encoding import encode_names, encode_photos, tokenizers_of, unconditional_features
from mipadapter.pipeline.loading import default_feature_extractor
from mipadapter.pipeline.subjects import Subject, region_mask

logger = logging.getLogger(__name__)


@dataclass
class MIPAdapterOutput:
    """images: the generated images (PIL unless ``output_type`` says otherwise).

    relevance: when asked for, one dict per image: subject name → [H, W] float32 map in [0, 1] at the
    image's size, averaged over layers and steps (where each reference went).
    relevance_by_resolution: likewise per layer grid (h, w): subject name → {(h, w): [H, W] map}.
    """

    images: Any
    relevance: list[dict[str, np.ndarray]] | None = None
    relevance_by_resolution: list[dict[str, dict[tuple[int, int], np.ndarray]]] | None = None


class MIPAdapterPipeline:
    """Multi-subject generation: a diffusers text-to-image pipeline, an adapter and an image encoder.

    ``pipe`` is a stock ``StableDiffusionXLPipeline`` or ``StableDiffusionPipeline``; ``adapter`` a loaded
    ``MIPAdapter`` (attached to ``pipe.unet`` here); ``image_encoder`` a ``CLIPVisionModelWithProjection``
    and ``feature_extractor`` its image processor. The constructor does no I/O: ``from_pretrained``
    loads. The pipeline follows its models' device and dtype; move everything with ``.to(...)``.
    """

    def __init__(self, pipe, adapter: MIPAdapter, image_encoder, feature_extractor=None) -> None:
        if getattr(pipe, "unet", None) is None:
            raise TypeError(
                f"{type(pipe).__name__} has no UNet: MIP-Adapter runs on SDXL / SD1.5 UNet pipelines"
            )
        self.pipe = pipe
        self.adapter = adapter
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor or default_feature_extractor(image_encoder)
        adapter.attach(pipe.unet)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | Path | None = None,
        adapter: str | Path | None = None,
        image_encoder: str | Path | None = None,
        *,
        preset: str = "mip-sdxl",
        torch_dtype: torch.dtype | None = None,
        **pipeline_kwargs,
    ) -> MIPAdapterPipeline:
        """Load the three models from Hub ids or local paths (a ``preset`` fills the ones not given).

        base_model: a diffusers model folder or Hub id; adapter: a checkpoint file, local or
        ``owner/repo/file``; image_encoder: a folder or ``owner/repo/subfolder``. The preset's image scale
        (0.75 for ``mip-sdxl``, 0.65 for ``mip-sdxl-plus``, as the authors use) becomes the default scale
        of h94/authors files; files in our format keep their own.
        """
        from mipadapter.pipeline.loading import load_components

        pipe, adapter, encoder, feature_extractor = load_components(
            base_model, adapter, image_encoder, preset=preset, torch_dtype=torch_dtype, **pipeline_kwargs
        )
        return cls(pipe, adapter, encoder, feature_extractor)

    def to(self, *args, **kwargs) -> MIPAdapterPipeline:
        """Move the diffusers pipeline, the adapter and the image encoder (``torch.nn.Module.to`` arguments)."""
        self.pipe.to(*args, **kwargs)
        self.adapter.to(*args, **kwargs)
        self.image_encoder.to(*args, **kwargs)
        return self

    def unload(self):
        """Detach the adapter and return the plain diffusers pipeline, as it was before."""
        self.adapter.detach()
        return self.pipe

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        subjects: Sequence[Subject],
        *,
        rule: MergeRule | str | None = None,
        use_text_weight: bool | None = None,
        multi_image: MultiImageMode | str = MultiImageMode.MEAN,
        negative_prompt: str | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_relevance: bool = False,
        text_perturbation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        output_type: str = "pil",
        show_progress: bool = True,
        **pipeline_kwargs,
    ) -> MIPAdapterOutput:
        """Generate images of ``prompt`` with each subject routed to where its name is relevant.

        rule: ``official`` (default for adapters with a text weight), ``paper`` (default otherwise: the
        training-free mode) or ``uniform`` (plain IP-Adapter). use_text_weight: gate with the trained
        text weight (default: when the adapter has one). multi_image: ``mean`` of a subject's photos'
        image tokens (the authors' choice) or ``each`` photo its own condition. Classifier-free
        guidance's unconditional half sees zero image features and an empty name (see
        ``encode_names``). Other keyword arguments go to the diffusers pipeline.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        subjects = list(subjects)
        if not subjects:
            raise ValueError(
                "give at least one subject (or use the diffusers pipeline directly for text only)"
            )
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be ≥ 1, got {num_images_per_prompt}")
        if CROSS_ATTENTION_KWARG in (pipeline_kwargs.get("cross_attention_kwargs") or {}):
            raise ValueError(f"cross_attention_kwargs[{CROSS_ATTENTION_KWARG!r}] is set by this pipeline")
        config = self.adapter.config
        rule = config.default_rule if rule is None else MergeRule.parse(rule)
        use_text_weight = config.text_weight if use_text_weight is None else bool(use_text_weight)
        if use_text_weight and not config.text_weight:
            raise ValueError(
                "use_text_weight=True needs an adapter trained with a text weight (a MIP checkpoint)"
            )
        multi_image = MultiImageMode(multi_image)
        align_subjects(tokenizers_of(self.pipe), prompt, [subject.name for subject in subjects])

        pipe = self.pipe
        height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
        width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
        latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        guidance_scale = (
            guidance_scale if guidance_scale is not None else (5.0 if hasattr(pipe, "tokenizer_2") else 7.5)
        )
        cfg = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
        halves = 2 if cfg else 1

        conditioning = self.build_conditioning(
            prompt_rows=num_images_per_prompt,
            subjects=subjects,
            cfg=cfg,
            rule=rule,
            use_text_weight=use_text_weight,
            multi_image=multi_image,
            image_size=(height, width),
            latent_size=latent_size,
            record=return_relevance,
        )
        conditioning.text_perturbation = text_perturbation
        cross_attention_kwargs = dict(pipeline_kwargs.pop("cross_attention_kwargs", None) or {})
        cross_attention_kwargs[CROSS_ATTENTION_KWARG] = conditioning
        previous_progress = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=not show_progress)
        try:
            result = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                output_type=output_type,
                cross_attention_kwargs=cross_attention_kwargs,
                **pipeline_kwargs,
            )
        finally:
            pipe._progress_bar_config = previous_progress  # the wrapped pipeline's own setting, as it was
        logger.debug("generated %d rows (%d CFG halves)", num_images_per_prompt * halves, halves)
        output = MIPAdapterOutput(images=result.images)
        if return_relevance:
            output.relevance, output.relevance_by_resolution = _relevance_arrays(
                conditioning.recorder, [s.name for s in subjects], (height, width)
            )
        return output

    def encode_subject_features(self, subject: Subject) -> torch.Tensor:
        """A subject's image-encoder features: [k, D] (basic) or [k, L, D] (plus)."""
        hidden = self.adapter.config.uses_hidden_states
        if subject.image_embeds is not None:
            features = subject.image_embeds
            if features.ndim == (2 if hidden else 1):
                features = features.unsqueeze(0)
            return features.to(next(self.adapter.parameters()).device)
        return encode_photos(self.image_encoder, self.feature_extractor, subject.images, hidden)

    def build_conditioning(
        self,
        *,
        prompt_rows: int,
        subjects: Sequence[Subject],
        cfg: bool,
        rule: MergeRule,
        use_text_weight: bool,
        multi_image: MultiImageMode,
        image_size: tuple[int, int],
        latent_size: tuple[int, int],
        record: bool = False,
    ) -> SubjectConditioning:
        """Everything the processors need for one call, computed once (not per step).

        Batch rows are laid out as diffusers does: the unconditional half (when ``cfg``) first, then the
        conditional half, ``prompt_rows`` rows each.
        """
        adapter = self.adapter
        device = next(adapter.parameters()).device
        dtype = self.pipe.unet.dtype

        features = [self.encode_subject_features(subject) for subject in subjects]
        tokens = [adapter.project(feature) for feature in features]  # each [k_i, t, c]
        if multi_image == MultiImageMode.MEAN:
            cond_tokens = torch.stack([t.mean(dim=0) for t in tokens])  # [n, t, c]
            owner = torch.arange(len(subjects), device=device)
            share = torch.ones(len(subjects), device=device)
        else:
            cond_tokens = torch.cat(tokens)  # [N, t, c]
            owner = torch.cat([torch.full((len(t),), i, device=device) for i, t in enumerate(tokens)])
            share = torch.cat([torch.full((len(t),), 1.0 / len(t), device=device) for t in tokens])

        names = [subject.name for subject in subjects]
        name_embeds, name_mask = encode_names(self.pipe, names + [""], device)  # [n+1, m, c]
        scales = torch.tensor(
            [adapter.config.default_scale if s.scale is None else float(s.scale) for s in subjects],
            device=device,
        )

        rows_cond = prompt_rows
        image_rows = [cond_tokens.expand(rows_cond, *cond_tokens.shape)]
        name_rows = [name_embeds[:-1].expand(rows_cond, *name_embeds[:-1].shape)]
        mask_rows = [name_mask[:-1].expand(rows_cond, *name_mask[:-1].shape)]
        if cfg:
            uncond = adapter.project(
                unconditional_features(
                    self.image_encoder, self.feature_extractor, adapter.config.uses_hidden_states, features[0]
                )
            )  # [1, t, c]
            image_rows.insert(0, uncond.expand(rows_cond, len(owner), *uncond.shape[1:]))
            empty = name_embeds[-1:].expand(len(subjects), -1, -1)  # the empty name for every subject
            name_rows.insert(0, empty.expand(rows_cond, *empty.shape))
            empty_mask = name_mask[-1:].expand(len(subjects), -1)
            mask_rows.insert(0, empty_mask.expand(rows_cond, *empty_mask.shape))
        batch = rows_cond * (2 if cfg else 1)

        regions = has_region = None
        if any(s.region is not None for s in subjects):
            maps = [
                region_mask(s, image_size, latent_size) if s.region is not None else torch.zeros(latent_size)
                for s in subjects
            ]
            regions = torch.stack(maps).to(device).expand(batch, -1, -1, -1)
            has_region = torch.tensor([s.region is not None for s in subjects], device=device)
        modes = {s.region_mode for s in subjects if s.region is not None}
        if len(modes) > 1:
            raise ValueError("all subjects with a region must use the same region_mode in one call")

        return SubjectConditioning(
            image_tokens=torch.cat(image_rows).to(dtype),
            owner=owner,
            share=share,
            scales=scales.expand(batch, -1),
            name_embeds=torch.cat(name_rows).to(dtype),
            name_mask=torch.cat(mask_rows),
            rule=rule,
            use_text_weight=use_text_weight,
            latent_size=latent_size,
            regions=regions,
            has_region=has_region,
            region_mode=modes.pop() if modes else RegionMode.REPLACE,
            recorder=RelevanceRecorder(latent_size, keep_last=rows_cond) if record else None,
        )


def _relevance_arrays(recorder: RelevanceRecorder, names: list[str], image_size: tuple[int, int]):
    """Recorder sums → per-image dicts of [H, W] arrays at the image size."""
    import torch.nn.functional as F

    def upsample(maps: torch.Tensor) -> np.ndarray:  # [k, n, h, w] → [k, n, H, W]
        return (
            F.interpolate(maps.float(), size=image_size, mode="bilinear", align_corners=False)
            .clamp(0, 1)
            .cpu()
            .numpy()
        )

    averaged = upsample(recorder.average())
    by_grid = {
        grid: upsample(maps / maps.flatten(2).amax(-1)[..., None, None].clamp_min(1e-12))
        for grid, maps in recorder.by_resolution().items()
    }
    per_image = [{name: averaged[k, i] for i, name in enumerate(names)} for k in range(averaged.shape[0])]
    per_grid = [
        {name: {grid: maps[k, i] for grid, maps in by_grid.items()} for i, name in enumerate(names)}
        for k in range(averaged.shape[0])
    ]
    return per_image, per_grid
