"""The user-facing generation API over a stock diffusers SDXL or SD1.5 pipeline."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mipadapter.alignment import align_subjects, unnamed_subjects
from mipadapter.config import PRESETS, MergeRule, MultiImageMode, RegionMode
from mipadapter.modeling.adapter import MIPAdapter
from mipadapter.modeling.conditioning import (
    CROSS_ATTENTION_KWARG,
    RelevanceRecorder,
    ShareMeter,
    SubjectConditioning,
)
from mipadapter.pipeline.encoding import (
    encode_names,
    encode_photos,
    tokenizers_of,
    unconditional_features,
    unconditional_names,
)
from mipadapter.pipeline.loading import default_feature_extractor
from mipadapter.pipeline.subjects import Subject, region_mask

logger = logging.getLogger(__name__)


STARVED_SHARE = 0.2
"""A subject routed less than this fraction of its fair share (1/n of the image) gets a warning."""
NAME_WINDOW = 8
"""Name rows of a compiled pipeline are padded to multiples of this many tokens (one graph for all calls)."""


@dataclass(frozen=True)
class SubjectWarning:
    """Something about one subject of a call that the user can act on.

    subject: its name; index: its position in the call's subject list (two subjects may share a name);
    kind: ``starved`` (its routed share of the image fell below the threshold) or ``not_named`` (its
    name is not in the prompt, allowed with ``require_names_in_prompt=False``); message: one line with
    the fix to try.
    """

    subject: str
    index: int
    kind: str
    message: str


@dataclass
class MIPAdapterOutput:
    """images: the generated images (PIL unless ``output_type`` says otherwise).

    relevance: when asked for, one dict per image: subject label → [H, W] float32 map in [0, 1] at the
    image's size, averaged over layers and steps (where each reference went). Labels are the subject
    names, with ``#2``, ``#3``… appended to repeats of a name (see ``subject_labels``).
    relevance_by_resolution: likewise per layer grid (h, w): label → {(h, w): [H, W] map}.
    image_attention: when asked for, one dict per image: label → [H, W] map of where the subject's image
    tokens attend (the image branch's attention, softmax over positions, mean over tokens and heads).
    warnings: ``SubjectWarning``s of the call (also logged).
    settings: the call's resolved settings (prompt, negative_prompt, guidance_scale, num_inference_steps,
    height, width, num_images_per_prompt, rule, use_text_weight, multi_image, region_mode, scales by
    label, names, scheduler): everything needed to run it again.
    """

    images: Any
    relevance: list[dict[str, np.ndarray]] | None = None
    relevance_by_resolution: list[dict[str, dict[tuple[int, int], np.ndarray]]] | None = None
    image_attention: list[dict[str, np.ndarray]] | None = None
    warnings: list[SubjectWarning] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


class MIPAdapterPipeline:
    """Multi-subject generation: a diffusers pipeline with a UNet, an adapter and an image encoder.

    ``pipe`` is a stock SDXL or SD1.5 pipeline (text-to-image, img2img, inpainting, ControlNet: any with
    a ``unet``); ``adapter`` a loaded ``MIPAdapter`` (attached to ``pipe.unet`` here); ``image_encoder`` a
    ``CLIPVisionModelWithProjection`` and ``feature_extractor`` its image processor; ``negative_prompt``
    the default negative prompt of calls that give none (``from_pretrained`` takes the preset's). The
    constructor does no I/O: ``from_pretrained`` loads. The pipeline follows its models' device and
    dtype; move everything with ``.to(...)``.
    """

    def __init__(
        self, pipe, adapter: MIPAdapter, image_encoder, feature_extractor=None, *, negative_prompt: str | None = None
    ) -> None:
        if getattr(pipe, "unet", None) is None:
            raise TypeError(
                f"{type(pipe).__name__} has no UNet: MIP-Adapter runs on SDXL / SD1.5 UNet pipelines"
            )
        self.pipe = pipe
        self.adapter = adapter
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor or default_feature_extractor(image_encoder)
        self.default_negative_prompt = negative_prompt or None
        self.name_window: int | None = None  # set by ``compile``
        self._uncompiled_forward = None
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
        of h94/authors files; files in our format keep their own. The preset's negative prompt (the
        authors' for the ``mip-*`` presets) becomes the default negative prompt.
        """
        from mipadapter.pipeline.loading import load_components

        pipe, adapter, encoder, feature_extractor = load_components(
            base_model, adapter, image_encoder, preset=preset, torch_dtype=torch_dtype, **pipeline_kwargs
        )
        return cls(pipe, adapter, encoder, feature_extractor, negative_prompt=PRESETS[preset].negative_prompt)

    def to(self, *args, **kwargs) -> MIPAdapterPipeline:
        """Move the diffusers pipeline, the adapter and the image encoder (``torch.nn.Module.to`` arguments)."""
        self.pipe.to(*args, **kwargs)
        self.adapter.to(*args, **kwargs)
        self.image_encoder.to(*args, **kwargs)
        return self

    def compile(self, **compile_kwargs) -> MIPAdapterPipeline:
        """Compile the UNet's forward with ``torch.compile(**compile_kwargs)``; returns the pipeline.

        The first call pays the compilation (minutes for SDXL on a GPU). Later calls with the same image
        size, number of subjects (and of photos under ``multi_image="each"``), batch size and merge rule
        reuse it, whatever the prompt, photos, scales or names: name rows are padded to a fixed window
        (``NAME_WINDOW`` tokens) and every per-call value reaches the graph as a tensor.
        ``return_relevance`` and ``text_perturbation`` run Python code at every layer and break the graph.
        """
        unet = self.pipe.unet
        if self._uncompiled_forward is None:
            self._uncompiled_forward = unet.forward
        unet.forward = torch.compile(self._uncompiled_forward, **compile_kwargs)
        self.name_window = NAME_WINDOW
        return self

    def unload(self):
        """Detach the adapter (and undo ``compile``); return the plain diffusers pipeline, as it was."""
        self.adapter.detach()
        if self._uncompiled_forward is not None:
            del self.pipe.unet.forward  # the class's forward again
            self._uncompiled_forward = None
            self.name_window = None
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
        require_names_in_prompt: bool = True,
        return_relevance: bool = False,
        return_image_attention: bool = False,
        starved_share: float | None = STARVED_SHARE,
        text_perturbation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        output_type: str = "pil",
        show_progress: bool = True,
        **pipeline_kwargs,
    ) -> MIPAdapterOutput:
        """Generate images of ``prompt`` with each subject routed to where its name is relevant.

        rule: ``official`` (default for adapters with a text weight), ``paper`` (default otherwise: the
        training-free mode) or ``uniform`` (plain IP-Adapter). use_text_weight: gate with the trained
        text weight (default: when the adapter has one). multi_image: ``mean`` of a subject's photos'
        image tokens (the authors' choice) or ``each`` photo its own condition. negative_prompt: None
        uses the pipeline's default (``default_negative_prompt``), ``""`` none. height, width: the
        output size (multiples of the VAE's factor); None leaves it to the diffusers pipeline (its
        default, or the size of an img2img / inpainting / ControlNet image).
        require_names_in_prompt: every name must occur in the prompt (a typo fails fast); False allows
        a subject the prompt does not name (its routing still comes from its own name, encoded alone)
        and reports it in ``warnings``. starved_share: warn about a subject routed less than this
        fraction of its fair share of the image (None: no check). Classifier-free guidance's
        unconditional half sees unconditional image features and the authors' empty names (see
        ``unconditional_names``). Other keyword arguments go to the diffusers pipeline.
        """
        pipe = self.pipe
        subjects = self._check_call(
            prompt, subjects, num_inference_steps, guidance_scale, height, width, num_images_per_prompt
        )
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
        names = [subject.name for subject in subjects]
        warnings_ = self._check_names(prompt, names, require_names_in_prompt)
        modes = {s.region_mode for s in subjects if s.region is not None}
        if len(modes) > 1:
            raise ValueError("all subjects with a region must use the same region_mode in one call")
        expected_size = self._expected_size(height, width, pipeline_kwargs)
        guidance_scale = (
            guidance_scale if guidance_scale is not None else (5.0 if hasattr(pipe, "tokenizer_2") else 7.5)
        )
        cfg = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
        negative = self.default_negative_prompt if negative_prompt is None else (negative_prompt or None)

        conditioning = self.build_conditioning(
            prompt_rows=num_images_per_prompt,
            subjects=subjects,
            cfg=cfg,
            rule=rule,
            use_text_weight=use_text_weight,
            multi_image=multi_image,
            image_size=expected_size,
            record=return_relevance,
            record_image_attention=return_image_attention,
            measure_shares=starved_share is not None and rule != MergeRule.UNIFORM and len(subjects) > 1,
        )
        conditioning.text_perturbation = text_perturbation
        self.adapter.prepare(conditioning)
        cross_attention_kwargs = dict(pipeline_kwargs.pop("cross_attention_kwargs", None) or {})
        cross_attention_kwargs[CROSS_ATTENTION_KWARG] = conditioning
        sizes = {key: value for key, value in (("height", height), ("width", width)) if value is not None}
        previous_progress = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=not show_progress)
        hook = pipe.unet.register_forward_pre_hook(
            self._latent_size_hook(conditioning, subjects), with_kwargs=True
        )
        try:
            result = pipe(
                prompt=prompt,
                negative_prompt=negative,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                output_type=output_type,
                cross_attention_kwargs=cross_attention_kwargs,
                **sizes,
                **pipeline_kwargs,
            )
        finally:
            hook.remove()
            pipe._progress_bar_config = previous_progress  # the wrapped pipeline's own setting, as it was
        image_size = tuple(side * pipe.vae_scale_factor for side in conditioning.latent_size)
        labels = subject_labels(names)
        output = MIPAdapterOutput(images=result.images)
        output.settings = {
            "prompt": prompt,
            "negative_prompt": negative,
            "guidance_scale": float(guidance_scale),
            "num_inference_steps": int(num_inference_steps),
            "height": image_size[0],
            "width": image_size[1],
            "num_images_per_prompt": int(num_images_per_prompt),
            "rule": rule.value,
            "use_text_weight": use_text_weight,
            "multi_image": multi_image.value,
            "region_mode": modes.pop().value if modes else None,
            "names": names,
            "scales": dict(zip(labels, conditioning.scales[-1].tolist(), strict=True)),
            "scheduler": type(pipe.scheduler).__name__,
        }
        rows = num_images_per_prompt
        if return_relevance:
            output.relevance, output.relevance_by_resolution = _relevance_arrays(
                conditioning.recorder, labels, image_size
            )
        if return_image_attention:
            output.image_attention, _ = _relevance_arrays(conditioning.image_attention, labels, image_size)
        if conditioning.share_meter is not None:
            shares = conditioning.share_meter.shares(conditioning.first_condition)[-rows:].mean(dim=0)
            warnings_ += _starved(names, shares.tolist(), starved_share)
        for warning in warnings_:
            logger.warning("%s", warning.message)
        output.warnings = warnings_
        return output

    def _check_call(self, prompt, subjects, steps, guidance, height, width, rows) -> list[Subject]:
        """Everything about a call's arguments that can be checked before any model runs."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        subjects = list(subjects)
        if not subjects:
            raise ValueError("give at least one subject (or use the diffusers pipeline directly for text only)")
        if not all(isinstance(subject, Subject) for subject in subjects):
            kinds = sorted({type(subject).__name__ for subject in subjects})
            raise TypeError(f"subjects must be Subject objects, got {kinds}")
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {rows!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer ≥ 1, got {steps!r}")
        if guidance is not None and not (math.isfinite(float(guidance)) and float(guidance) >= 0):
            raise ValueError(f"guidance_scale must be a finite number ≥ 0, got {guidance!r}")
        factor = self.pipe.vae_scale_factor
        for name, side in (("height", height), ("width", width)):
            if side is not None and (not isinstance(side, int) or side <= 0 or side % factor):
                raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE's factor), got {side!r}")
        return subjects

    def _check_names(self, prompt: str, names: list[str], required: bool) -> list[SubjectWarning]:
        """Raise for a name missing from the prompt (or claimed twice); with ``required=False`` a missing
        name is a ``not_named`` warning instead."""
        tokenizers = tokenizers_of(self.pipe)
        if required:
            align_subjects(tokenizers, prompt, names)
            return []
        missing = unnamed_subjects(tokenizers, prompt, names)
        named = [name for index, name in enumerate(names) if index not in missing]
        align_subjects(tokenizers, prompt, named)  # the named ones still need their own mentions
        return [
            SubjectWarning(
                names[index],
                index,
                "not_named",
                f"subject {names[index]!r} is not named in the prompt: it is routed by its name alone; "
                "mention it in the prompt for the text to describe it",
            )
            for index in missing
        ]

    def _expected_size(self, height, width, pipeline_kwargs) -> tuple[int, int] | None:
        """The output size (H, W) the diffusers pipeline will produce, when it is known before it runs:
        given, a text-to-image default, or an img2img image's size; else None (the latents will tell)."""
        pipe = self.pipe
        if height is not None and width is not None:
            return (height, width)
        parameters = inspect.signature(pipe.__call__).parameters
        if "image" not in parameters:  # text-to-image: diffusers' default size
            default = pipe.unet.config.sample_size * pipe.vae_scale_factor
            return (height or default, width or default)
        image = pipeline_kwargs.get("image")
        if isinstance(image, (list, tuple)) and image:
            image = image[0]
        if "height" not in parameters and hasattr(image, "size") and hasattr(image, "convert"):
            factor = pipe.vae_scale_factor  # img2img keeps the image's size, rounded down to the factor
            return (image.height // factor * factor, image.width // factor * factor)
        return None

    def _latent_size_hook(self, conditioning: SubjectConditioning, subjects: list[Subject]):
        """A UNet forward pre-hook that places the conditioning on the latents the UNet really receives
        (img2img, inpainting, ControlNet and odd sizes included), rasterising the regions at that size."""
        factor = self.pipe.vae_scale_factor

        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            size = tuple(sample.shape[-2:])
            if conditioning.latent_size != size:
                image_size = (size[0] * factor, size[1] * factor)
                regions = self._region_masks(subjects, image_size, size, conditioning.batch_size)
                conditioning.set_latent_size(size, regions)

        return hook

    def _region_masks(self, subjects, image_size, latent_size, batch: int) -> torch.Tensor | None:
        """[b, n, H, W] region masks at latent resolution, or None when no subject has a region."""
        if all(s.region is None for s in subjects):
            return None
        device = next(self.adapter.parameters()).device
        maps = [
            region_mask(s, image_size, latent_size) if s.region is not None else torch.zeros(latent_size)
            for s in subjects
        ]
        return torch.stack(maps).to(device).expand(batch, -1, -1, -1)

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
        image_size: tuple[int, int] | None,
        record: bool = False,
        record_image_attention: bool = False,
        measure_shares: bool = False,
    ) -> SubjectConditioning:
        """Everything the processors need for one call, computed once (not per step).

        Batch rows are laid out as diffusers does: the unconditional half (when ``cfg``) first, then the
        conditional half, ``prompt_rows`` rows each. image_size: the expected output size (H, W), to place
        the regions before the call; None when only the latents will tell (the pipeline's pre-hook sets
        the latent size either way).
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

        name_embeds, name_mask = encode_names(self.pipe, [s.name for s in subjects], device, self.name_window)
        scales = torch.tensor(
            [adapter.config.default_scale if s.scale is None else float(s.scale) for s in subjects],
            device=device,
        )

        rows_cond = prompt_rows
        image_rows = [cond_tokens.expand(rows_cond, *cond_tokens.shape)]
        name_rows = [name_embeds.expand(rows_cond, *name_embeds.shape)]
        mask_rows = [name_mask.expand(rows_cond, *name_mask.shape)]
        if cfg:
            uncond = adapter.project(
                unconditional_features(
                    self.image_encoder, self.feature_extractor, adapter.config.uses_hidden_states, features[0]
                )
            )  # [1, t, c]
            image_rows.insert(0, uncond.expand(rows_cond, len(owner), *uncond.shape[1:]))
            empty = unconditional_names(self.pipe, name_mask, device)  # [n, m, c]: the authors' empty names
            name_rows.insert(0, empty.expand(rows_cond, *empty.shape))
            mask_rows.insert(0, mask_rows[0])
        batch = rows_cond * (2 if cfg else 1)

        regions = has_region = None
        if any(s.region is not None for s in subjects):
            has_region = torch.tensor([s.region is not None for s in subjects], device=device)
        latent_size = None
        if image_size is not None:
            factor = self.pipe.vae_scale_factor
            latent_size = (image_size[0] // factor, image_size[1] // factor)
            regions = self._region_masks(subjects, image_size, latent_size, batch)  # checks the boxes now
        modes = {s.region_mode for s in subjects if s.region is not None}

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
            image_attention=RelevanceRecorder(latent_size, keep_last=rows_cond) if record_image_attention else None,
            share_meter=ShareMeter(batch, len(owner), device) if measure_shares else None,
        )


def subject_labels(names: Sequence[str]) -> list[str]:
    """Unique labels of a call's subjects: the names, with ``#2``, ``#3``… on repeats ("dog", "dog#2")."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


def _starved(names: list[str], shares: list[float], threshold: float) -> list[SubjectWarning]:
    """Warnings for the subjects routed less than ``threshold`` of a fair share (1/n) of the image."""
    fair = 1.0 / len(names)
    return [
        SubjectWarning(
            name,
            index,
            "starved",
            f"subject {name!r} was routed {share:.1%} of the image (a fair share is {fair:.0%}): its photos "
            "barely reach the result; raise its scale, give it a region, or name it more prominently in "
            "the prompt",
        )
        for index, (name, share) in enumerate(zip(names, shares, strict=True))
        if share < threshold * fair
    ]


def _relevance_arrays(recorder: RelevanceRecorder, labels: list[str], image_size: tuple[int, int]):
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
    per_image = [{label: averaged[k, i] for i, label in enumerate(labels)} for k in range(averaged.shape[0])]
    per_grid = [
        {label: {grid: maps[k, i] for grid, maps in by_grid.items()} for i, label in enumerate(labels)}
        for k in range(averaged.shape[0])
    ]
    return per_image, per_grid
