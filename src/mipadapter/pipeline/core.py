"""The user-facing generation API over a stock diffusers SDXL or SD1.5 pipeline."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mipadapter.alignment import align_subjects, subject_labels, unnamed_subjects
from mipadapter.config import PRESETS, MergeRule, MultiImageMode, NegativeImage, RegionMode
from mipadapter.modeling.adapter import MIPAdapter
from mipadapter.modeling.conditioning import (
    CROSS_ATTENTION_KWARG,
    RelevanceRecorder,
    ShareMeter,
    SubjectConditioning,
)
from mipadapter.pipeline.adapters import DEFAULT_ADAPTER, AdapterSet, check_new_name, mixed_rule
from mipadapter.pipeline.encoding import (
    denoiser,
    encode_names,
    encode_photos,
    is_flux,
    max_sequence_length,
    tokenizers_of,
    unconditional_features,
    unconditional_names,
)
from mipadapter.pipeline.loading import default_feature_extractor, load_checked_adapter
from mipadapter.pipeline.subjects import Subject, region_mask
from mipadapter.scales import is_layered, layer_scales

logger = logging.getLogger(__name__)


STARVED_SHARE = 0.2
"""A subject routed less than this fraction of its fair share (1/n of the image) gets a warning."""
NAME_WINDOW = 8
"""Name rows of a compiled pipeline are padded to multiples of this many tokens (one graph for all calls)."""
DIFFUSERS_IMAGE_ARGUMENTS = (
    "ip_adapter_image",
    "ip_adapter_image_embeds",
    "negative_ip_adapter_image",
    "negative_ip_adapter_image_embeds",
)
"""diffusers' own IP-Adapter arguments: refused, the photos come as ``Subject``s (docs/flux.md)."""


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
    settings: the call's resolved settings (prompt, negative_prompt, negative_image, guidance_scale,
    num_inference_steps, height, width, num_images_per_prompt, rule, use_text_weight, multi_image,
    region_mode, scales by label — a number, or per-layer scales as given —, names, scheduler; on FLUX also
    true_cfg_scale, max_sequence_length, prompt_2 when given, and negative_prompt_embeds: True when the
    negative came as embeddings, which a recipe cannot hold): everything needed to run it again.
    """

    images: Any
    relevance: list[dict[str, np.ndarray]] | None = None
    relevance_by_resolution: list[dict[str, dict[tuple[int, int], np.ndarray]]] | None = None
    image_attention: list[dict[str, np.ndarray]] | None = None
    warnings: list[SubjectWarning] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


class MIPAdapterPipeline:
    """Multi-subject generation: a diffusers pipeline, an adapter and an image encoder.

    ``pipe`` is a stock SDXL or SD1.5 pipeline (text-to-image, img2img, inpainting, ControlNet: any with
    a ``unet``) or a ``FluxPipeline``; ``adapter`` a loaded ``MIPAdapter`` of the same architecture
    (attached to the UNet or FLUX transformer here); ``image_encoder`` a
    ``CLIPVisionModelWithProjection`` and ``feature_extractor`` its image processor; ``negative_prompt``
    the default negative prompt of calls that give none (``from_pretrained`` takes the preset's). The
    constructor does no I/O: ``from_pretrained`` loads. The pipeline follows its models' device and
    dtype; move everything with ``.to(...)``.

    That adapter is the ``"default"`` one. On SDXL and SD1.5, ``add_adapter`` adds more under their own
    names (a face adapter beside a general one), each with its image encoder (one copy per distinct
    encoder); a ``Subject(..., adapter=name)`` is encoded by the one it names, and the subjects of one
    call are routed together whatever their adapters (docs/adapters.md).
    """

    def __init__(
        self, pipe, adapter: MIPAdapter, image_encoder, feature_extractor=None, *, negative_prompt: str | None = None
    ) -> None:
        if getattr(pipe, "unet", None) is None and not is_flux(pipe):
            raise TypeError(
                f"{type(pipe).__name__} has neither a UNet nor a FLUX transformer: MIP-Adapter runs on SDXL, "
                "SD1.5 and FLUX.1 pipelines"
            )
        self.pipe = pipe
        self.adapter = adapter
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor or default_feature_extractor(image_encoder)
        self.default_negative_prompt = negative_prompt or None
        # calls that give no guidance scale use the wrapped pipeline's own default (SDXL 5, SD1.5 7.5,
        # FLUX.1 3.5 — FLUX's is the distilled guidance, not CFG); set it to change the default
        self.default_guidance_scale = float(inspect.signature(pipe.__call__).parameters["guidance_scale"].default)
        self.name_window: int | None = None  # set by ``compile``
        self._uncompiled_forward = None
        self._adapters = AdapterSet(adapter, image_encoder, self.feature_extractor)
        adapter.attach(denoiser(pipe))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | Path | None = None,
        adapter: str | Path | None = None,
        image_encoder: str | Path | None = None,
        *,
        preset: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **pipeline_kwargs,
    ) -> MIPAdapterPipeline:
        """Load the three models from Hub ids or local paths (a ``preset`` fills the ones not given; None:
        ``ip-flux`` for a FLUX base model, else ``mip-sdxl``).

        base_model: a diffusers model folder or Hub id; adapter: a checkpoint file, local or
        ``owner/repo/file``; image_encoder: a folder or ``owner/repo/subfolder``. The preset's image scale
        (0.75 for ``mip-sdxl``, 0.65 for ``mip-sdxl-plus``, as the authors use) becomes the default scale
        of h94/authors files; files in our format keep their own. The preset's negative prompt (the
        authors' for the ``mip-*`` presets) becomes the default negative prompt.
        """
        from mipadapter.pipeline.loading import default_preset, load_components

        preset = preset or default_preset(base_model, cache_dir=pipeline_kwargs.get("cache_dir"))
        pipe, adapter, encoder, feature_extractor = load_components(
            base_model, adapter, image_encoder, preset=preset, torch_dtype=torch_dtype, **pipeline_kwargs
        )
        pipeline = cls(pipe, adapter, encoder, feature_extractor, negative_prompt=PRESETS[preset].negative_prompt)
        pipeline._adapters.remember_source(image_encoder or PRESETS[preset].image_encoder, encoder, feature_extractor)
        return pipeline

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        """The adapters' names, the default one first, then in the order they were added."""
        return self._adapters.names

    @property
    def adapters(self) -> Mapping[str, MIPAdapter]:
        """name → adapter (read-only; ``add_adapter`` adds)."""
        return self._adapters.mapping

    def add_adapter(
        self,
        name: str,
        adapter: str | Path | MIPAdapter | None = None,
        image_encoder: str | Path | Any | None = None,
        feature_extractor=None,
        *,
        preset: str | None = None,
        default_scale: float | None = None,
        cache_dir: str | Path | None = None,
    ) -> MIPAdapterPipeline:
        """Add an adapter under ``name`` for subjects that say ``adapter=name``; returns the pipeline.

        adapter: a loaded ``MIPAdapter``, or a checkpoint file (local, or ``owner/repo/file``: h94, the
        authors' or ours) checked against this pipeline's UNet. image_encoder: a loaded
        ``CLIPVisionModelWithProjection``, or a folder / ``owner/repo/subfolder``; an encoder loaded
        already from the same place is reused, and None reuses the first loaded one that gives the
        features the adapter takes. preset: fills the adapter, the encoder and the default scale it
        does not give (e.g. ``ip-sdxl-plus-face``). default_scale: the image scale of this adapter's
        subjects that give none (files in our format keep their own; a loaded adapter keeps its config's,
        and is refused one). What is loaded follows the default
        adapter's device and dtype.
        """
        check_new_name(name, self._adapters.mapping)
        if is_flux(self.pipe):
            raise ValueError(
                "adding adapters is for SDXL and SD1.5 pipelines: FLUX has one adapter kind (XLabs'), loaded "
                "as the default"
            )
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
            defaults = PRESETS[preset]
            adapter = adapter or defaults.adapter
            image_encoder = image_encoder or defaults.image_encoder
            default_scale = defaults.scale if default_scale is None else default_scale
        if adapter is None:
            raise ValueError(f"adapter {name!r}: give an adapter file (or a preset)")
        if isinstance(adapter, MIPAdapter) and default_scale is not None and preset is None:
            raise ValueError(
                f"adapter {name!r}: default_scale is for an adapter file; a loaded adapter keeps its "
                f"config's ({adapter.config.default_scale:g})"
            )
        if not isinstance(adapter, MIPAdapter):
            reference = next(self.adapter.parameters())
            adapter = load_checked_adapter(adapter, denoiser(self.pipe), f"adapter {name!r}", default_scale, cache_dir)
            adapter.to(device=reference.device, dtype=reference.dtype)
        self._adapters.add(name, adapter, image_encoder, feature_extractor, cache_dir)
        return self

    @property
    def architecture(self) -> str:
        """``unet`` (SDXL, SD1.5) or ``flux``."""
        return self.adapter.config.architecture

    def to(self, *args, **kwargs) -> MIPAdapterPipeline:
        """Move the diffusers pipeline, the adapters and the image encoders (``torch.nn.Module.to`` arguments)."""
        self.pipe.to(*args, **kwargs)
        for module in self._adapters.modules():
            module.to(*args, **kwargs)
        return self

    def compile(self, **compile_kwargs) -> MIPAdapterPipeline:
        """Compile the UNet's (FLUX: the transformer's) forward with ``torch.compile(**compile_kwargs)``.

        The first call pays the compilation (minutes for SDXL on a GPU). Later calls with the same image
        size, number of subjects (and of photos under ``multi_image="each"``), batch size and merge rule
        reuse it, whatever the prompt, photos, scales or names: name rows are padded to a fixed window
        (``NAME_WINDOW`` tokens) and every per-call value reaches the graph as a tensor.
        ``return_relevance`` and ``text_perturbation`` run Python code at every layer and break the graph.
        """
        model = denoiser(self.pipe)
        if self._uncompiled_forward is None:
            self._uncompiled_forward = model.forward
        model.forward = torch.compile(self._uncompiled_forward, **compile_kwargs)
        self.name_window = NAME_WINDOW
        return self

    def unload(self):
        """Detach the adapter (and undo ``compile``); return the plain diffusers pipeline, as it was."""
        self.adapter.detach()
        if self._uncompiled_forward is not None:
            del denoiser(self.pipe).forward  # the class's forward again
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
        negative_image: NegativeImage | str | None = None,
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
        uses the pipeline's default (``default_negative_prompt``), ``""`` none (on FLUX, where a negative
        prompt only acts with ``true_cfg_scale`` > 1, ``""`` is an empty negative prompt, as in
        diffusers; ``negative_prompt_embeds`` with ``negative_pooled_prompt_embeds`` in their place turn true
        CFG on the same way). negative_image: what the unconditional side sees instead of the photos,
        ``black`` (a black image through the image encoder: diffusers' FLUX pipeline and x-flux; the
        default on FLUX) or ``zeros`` (IP-Adapter's zero embedding; the default on UNets). FLUX's
        ``prompt_2`` (the text T5 encodes) and ``max_sequence_length`` are honoured: the names are
        checked against the text T5 reads and encoded at that length. height, width: the output size (multiples of one latent cell: 8 px, 16 on FLUX);
        None leaves it to the diffusers pipeline (its default, or the size of an img2img / inpainting /
        ControlNet image).
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
        refused = [key for key in DIFFUSERS_IMAGE_ARGUMENTS if pipeline_kwargs.get(key) is not None]
        if refused:
            raise ValueError(
                f"{refused[0]} is not taken: MIPAdapterPipeline takes reference photos as subjects, "
                "Subject(name, images) or Subject(name, image_embeds=...), and the negative image as "
                "negative_image='black' or 'zeros'"
            )
        if CROSS_ATTENTION_KWARG in (pipeline_kwargs.get("cross_attention_kwargs") or {}):
            raise ValueError(f"cross_attention_kwargs[{CROSS_ATTENTION_KWARG!r}] is set by this pipeline")
        used = self._adapters.used_by(subjects)
        config = self._adapters.adapter(used[0]).config
        if len(used) == 1:
            rule = config.default_rule if rule is None else MergeRule.parse(rule)
            use_text_weight = config.text_weight if use_text_weight is None else bool(use_text_weight)
            if use_text_weight and not config.text_weight:
                raise ValueError(
                    "use_text_weight=True needs an adapter trained with a text weight (a MIP checkpoint)"
                )
        else:
            rule, use_text_weight = mixed_rule(
                [s.name for s in subjects], [self._adapters.of(s).config for s in subjects], rule, use_text_weight
            )
        flux = is_flux(pipe)
        if flux and rule == MergeRule.OFFICIAL and not config.text_weight:
            raise ValueError(
                "rule 'official' is not offered on FLUX: it needs a text weight trained on FLUX, which no FLUX "
                "adapter has yet; use 'paper' or 'uniform'"
            )
        negative_image = NegativeImage.parse(
            negative_image or (NegativeImage.BLACK if flux else NegativeImage.ZEROS)
        )
        multi_image = MultiImageMode(multi_image)
        names = [subject.name for subject in subjects]
        # FLUX routes by T5's rows: the names are checked in the text T5 encodes (diffusers' encode_prompt
        # gives T5 prompt_2 when set); CLIP's prompt only makes the pooled vector, which keys nothing
        keyed_prompt = (pipeline_kwargs.get("prompt_2") or prompt) if flux else prompt
        warnings_ = self._check_names(keyed_prompt, names, require_names_in_prompt)
        modes = {s.region_mode for s in subjects if s.region is not None}
        if len(modes) > 1:
            raise ValueError("all subjects with a region must use the same region_mode in one call")
        expected_size = self._expected_size(height, width, pipeline_kwargs)
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        sequence_length = max_sequence_length(pipe, pipeline_kwargs.get("max_sequence_length")) if flux else None
        negative_embeds_given = False
        if flux:  # guidance-distilled: no unconditional rows; true CFG runs the negative as its own call
            # diffusers' reading: any negative prompt, "" included, or negative_prompt_embeds with
            # negative_pooled_prompt_embeds, with true_cfg_scale > 1 turns it on
            negative_embeds_given = all(
                pipeline_kwargs.get(key) is not None
                for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
            )
            if negative_embeds_given and negative_prompt is not None:
                raise ValueError("give negative_prompt or negative_prompt_embeds, not both (as diffusers)")
            negative = negative_prompt
            if negative is None and not negative_embeds_given:
                negative = self.default_negative_prompt
            true_cfg = _true_cfg(pipeline_kwargs, negative is not None or negative_embeds_given)
            halves = [("cond",)] + ([("uncond",)] if true_cfg else [])
        else:
            negative = self.default_negative_prompt if negative_prompt is None else (negative_prompt or None)
            cfg = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
            halves = [("uncond", "cond") if cfg else ("cond",)]
        encoded = self._encode_subjects(
            subjects,
            multi_image,
            uncond=any("uncond" in h for h in halves),
            negative_image=negative_image,
            sequence_length=sequence_length,
            used=used,
        )
        conditionings = [
            self._assemble(
                encoded,
                subjects,
                halves=half,
                rows=num_images_per_prompt,
                rule=rule,
                use_text_weight=use_text_weight,
                image_size=expected_size,
                record=return_relevance and "cond" in half,
                record_image_attention=return_image_attention and "cond" in half,
                measure_shares="cond" in half
                and starved_share is not None
                and rule != MergeRule.UNIFORM
                and len(subjects) > 1,
            )
            for half in halves
        ]
        for conditioning in conditionings:
            conditioning.text_perturbation = text_perturbation
            self.adapter.prepare(conditioning)  # with the adapters the conditioning records
        conditioning = conditionings[0] if flux else conditionings[-1]  # the one carrying the cond rows
        call = dict(pipeline_kwargs)
        if flux:
            negative_embeds = self._flux_negative(
                negative, num_images_per_prompt, call, len(conditionings) > 1, sequence_length
            )
            hook = self._flux_hook(conditionings, negative_embeds, subjects)
        else:
            call["negative_prompt"] = negative
            call["cross_attention_kwargs"] = {**(call.get("cross_attention_kwargs") or {}), CROSS_ATTENTION_KWARG: conditioning}
            hook = self._latent_size_hook(conditioning, subjects)
        call.update({key: value for key, value in (("height", height), ("width", width)) if value is not None})
        previous_progress = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=not show_progress)
        handle = denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            result = pipe(
                prompt=prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                output_type=output_type,
                **call,
            )
        finally:
            handle.remove()
            pipe._progress_bar_config = previous_progress  # the wrapped pipeline's own setting, as it was
        image_size = tuple(side * _cell(pipe) for side in conditioning.latent_size)
        labels = subject_labels(names)
        output = MIPAdapterOutput(images=result.images)
        unconditional = any("uncond" in half for half in halves)
        output.settings = {
            "prompt": prompt,
            "negative_prompt": negative if unconditional else None,  # what the call used
            "negative_image": negative_image.value,
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
            "scales": {  # as given (a number, a list or diffusers' dict form), else its adapter's default: the
                # Python numbers, not their float32 round trip (0.6, not 0.6000000238418579)
                label: self._adapters.of(subject).config.default_scale if subject.scale is None
                else subject.scale if is_layered(subject.scale) else float(subject.scale)
                for label, subject in zip(labels, subjects, strict=True)
            },
            "scheduler": type(pipe.scheduler).__name__,
        }
        if len(self._adapters) > 1:
            output.settings["adapters"] = {
                label: subject.adapter or DEFAULT_ADAPTER for label, subject in zip(labels, subjects, strict=True)
            }
        if flux:
            output.settings["true_cfg_scale"] = float(pipeline_kwargs.get("true_cfg_scale", 1.0))
            output.settings["max_sequence_length"] = sequence_length
            if pipeline_kwargs.get("prompt_2") is not None:
                output.settings["prompt_2"] = pipeline_kwargs["prompt_2"]
            if negative_embeds_given and unconditional:  # the recipe cannot hold them: it says so
                output.settings["negative_prompt_embeds"] = True
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
        for warning in warnings_:  # a name the caller allowed outside the prompt is expected: not a warning
            logger.log(logging.INFO if warning.kind == "not_named" else logging.WARNING, "%s", warning.message)
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
        factor = _cell(self.pipe)
        for name, side in (("height", height), ("width", width)):
            if side is not None and (not isinstance(side, int) or side <= 0 or side % factor):
                raise ValueError(f"{name} must be a positive multiple of {factor} (one latent cell), got {side!r}")
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
            default = _default_side(pipe)
            return (height or default, width or default)
        image = pipeline_kwargs.get("image")
        if isinstance(image, (list, tuple)) and image:
            image = image[0]
        if "height" not in parameters and hasattr(image, "size") and hasattr(image, "convert"):
            factor = _cell(pipe)  # img2img keeps the image's size, rounded down to the factor
            return (image.height // factor * factor, image.width // factor * factor)
        return None

    def _latent_size_hook(self, conditioning: SubjectConditioning, subjects: list[Subject]):
        """A UNet forward pre-hook that places the conditioning on the latents the UNet really receives
        (img2img, inpainting, ControlNet and odd sizes included), rasterising the regions at that size."""

        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self._place(conditioning, subjects, tuple(sample.shape[-2:]))

        return hook

    def _flux_hook(self, conditionings: list[SubjectConditioning], negative_embeds, subjects: list[Subject]):
        """A FLUX transformer forward pre-hook: hands each call its conditioning (the negative call of true
        CFG, recognised by its prompt embeddings, gets the unconditional one) and places both on the
        latent grid the transformer receives (from its image position ids)."""

        def hook(module, args, kwargs):
            if conditionings[0].latent_size is None:
                ids = kwargs["img_ids"]  # [p, 3]: (0, row, column)
                grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
                for conditioning in conditionings:
                    self._place(conditioning, subjects, grid)
            negative = negative_embeds is not None and kwargs.get("encoder_hidden_states") is negative_embeds
            joint = dict(kwargs.get("joint_attention_kwargs") or {})
            joint[CROSS_ATTENTION_KWARG] = conditionings[-1] if negative else conditionings[0]
            return args, {**kwargs, "joint_attention_kwargs": joint}

        return hook

    def _flux_negative(self, negative: str | None, rows: int, call: dict, true_cfg: bool, sequence_length: int):
        """With true CFG, the negative call's T5 embeddings, which the hook recognises it by: the caller's
        ``negative_prompt_embeds`` (diffusers hands them to the transformer as they are), or the negative
        prompt (and ``negative_prompt_2``) encoded here as diffusers' ``encode_prompt`` would, at the call's
        ``max_sequence_length``, and put in ``call``. None without true CFG."""
        if not true_cfg:
            return None
        if call.get("negative_prompt_embeds") is not None:
            return call["negative_prompt_embeds"]
        device = next(self.adapter.parameters()).device
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=negative,
            prompt_2=call.pop("negative_prompt_2", None),
            device=device,
            num_images_per_prompt=rows,
            max_sequence_length=sequence_length,
        )
        call.update(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled)
        return embeds

    def _place(self, conditioning: SubjectConditioning, subjects: list[Subject], grid: tuple[int, int]) -> None:
        """Set the conditioning's latent grid (rasterising the regions) when it changed."""
        if conditioning.latent_size != grid:
            image_size = (grid[0] * _cell(self.pipe), grid[1] * _cell(self.pipe))
            conditioning.set_latent_size(grid, self._region_masks(subjects, image_size, grid, conditioning.batch_size))

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
        """A subject's image-encoder features, by its adapter's encoder: [k, D] (basic) or [k, L, D] (plus)."""
        adapter = self._adapters.of(subject)
        hidden = adapter.config.uses_hidden_states
        if subject.image_embeds is not None:
            features = subject.image_embeds
            if features.ndim == (2 if hidden else 1):
                features = features.unsqueeze(0)
            return features.to(next(adapter.parameters()).device)
        encoder, processor = self._adapters.encoder(subject.adapter or DEFAULT_ADAPTER)
        return encode_photos(encoder, processor, subject.images, hidden)

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
        subjects = list(subjects)
        return self._assemble(
            self._encode_subjects(subjects, MultiImageMode(multi_image), uncond=cfg, used=self._adapters.used_by(subjects)),
            list(subjects),
            halves=("uncond", "cond") if cfg else ("cond",),
            rows=prompt_rows,
            rule=rule,
            use_text_weight=use_text_weight,
            image_size=image_size,
            record=record,
            record_image_attention=record_image_attention,
            measure_shares=measure_shares,
        )

    def _encode_subjects(
        self,
        subjects: Sequence[Subject],
        multi_image: MultiImageMode,
        uncond: bool,
        negative_image: NegativeImage = NegativeImage.ZEROS,
        sequence_length: int | None = None,
        used: Sequence[str] = (DEFAULT_ADAPTER,),
    ) -> _Encoded:
        """Photos and names through their encoders, once per call (``uncond``: also what the unconditional
        rows see, with ``negative_image`` for the photos); sequence_length: FLUX's T5 length of the call;
        used: the adapters of the call in order of first use (``AdapterSet.used_by``). With several, each
        subject's photos go through its adapter's encoder and projection, and conditions of adapters with
        fewer tokens are zero-padded to the most (``SubjectConditioning.token_counts``)."""
        used = list(used)
        device = next(self.adapter.parameters()).device
        column = [used.index(subject.adapter or DEFAULT_ADAPTER) for subject in subjects]  # each subject's adapter
        adapters = [self._adapters.adapter(used[c]) for c in column]
        features = [self.encode_subject_features(subject) for subject in subjects]
        tokens = [adapter.project(feature) for adapter, feature in zip(adapters, features, strict=True)]  # [k_i, t_i, c]
        counts = {c: t.shape[1] for c, t in zip(column, tokens, strict=True)}  # adapter → its token count
        width = max(counts.values())
        tokens = [_pad_tokens(t, width) for t in tokens]
        if multi_image == MultiImageMode.MEAN:
            cond_tokens = torch.stack([t.mean(dim=0) for t in tokens])  # [n, t, c]
            owner = torch.arange(len(subjects), device=device)
            share = torch.ones(len(subjects), device=device)
            adapter_of = column
        else:
            cond_tokens = torch.cat(tokens)  # [N, t, c]
            owner = torch.cat([torch.full((len(t),), i, device=device) for i, t in enumerate(tokens)])
            share = torch.cat([torch.full((len(t),), 1.0 / len(t), device=device) for t in tokens])
            adapter_of = [column[i] for i, t in enumerate(tokens) for _ in range(len(t))]
        name_embeds, name_mask = encode_names(
            self.pipe, [s.name for s in subjects], device, self.name_window, sequence_length
        )
        # a subject with per-layer scales has none of its own: its layers' scales replace it everywhere
        scales = torch.tensor(
            [adapter.config.default_scale if s.scale is None else 1.0 if is_layered(s.scale) else float(s.scale)
             for adapter, s in zip(adapters, subjects, strict=True)],
            device=device,
        )  # fmt: skip
        encoded = _Encoded(cond_tokens, owner, share, name_embeds, name_mask, scales)
        encoded.sources = tuple(self._adapters.adapter(name) for name in used)
        encoded.layer_scales = self._layer_scales(subjects, scales)
        if len(used) > 1:
            encoded.adapter_of = torch.tensor(adapter_of, device=device)
            encoded.token_counts = tuple(counts[c] for c in range(len(used)))
        if uncond:
            negatives = []
            for c, name in enumerate(used):
                encoder, processor = self._adapters.encoder(name)
                adapter = self._adapters.adapter(name)
                negative = unconditional_features(
                    encoder, processor, adapter.config.uses_hidden_states, features[column.index(c)], negative_image.value
                )
                negatives.append(_pad_tokens(adapter.project(negative), width))  # [1, t, c]
            encoded.uncond_tokens = (
                negatives[0] if len(used) == 1 else torch.cat(negatives).index_select(0, encoded.adapter_of)
            )  # [1, t, c], or [N, t, c] when the call mixes adapters
            encoded.uncond_names = unconditional_names(self.pipe, name_mask, device, sequence_length)  # [n, m, c]
        return encoded

    def _layer_scales(self, subjects: Sequence[Subject], scales: torch.Tensor) -> torch.Tensor | None:
        """[L, n]: every subject's scale on each adapter layer (in ``adapter.layer_specs`` order), when a
        subject gives per-layer scales; None otherwise (one scale per subject on every layer)."""
        if not any(is_layered(s.scale) for s in subjects):
            return None
        names = [layer.name for layer in self.adapter.layer_specs]
        model = denoiser(self.pipe)
        columns = [
            layer_scales(s.scale, names, model, f"subject {s.name!r}")
            if is_layered(s.scale)
            else [float(v)] * len(names)
            for s, v in zip(subjects, scales.tolist(), strict=True)
        ]
        return torch.tensor(columns, device=scales.device).T  # [L, n]

    def _assemble(
        self,
        encoded: _Encoded,
        subjects: list[Subject],
        *,
        halves: Sequence[str],
        rows: int,
        rule: MergeRule,
        use_text_weight: bool,
        image_size: tuple[int, int] | None,
        record: bool,
        record_image_attention: bool,
        measure_shares: bool,
    ) -> SubjectConditioning:
        """The conditioning of one model call: ``halves`` in batch order (``uncond``, ``cond``), ``rows``
        rows each."""
        device = encoded.owner.device
        dtype = denoiser(self.pipe).dtype
        num_cond = len(encoded.owner)
        image_rows, name_rows = [], []
        for half in halves:
            if half == "cond":
                image_rows.append(encoded.cond_tokens.expand(rows, *encoded.cond_tokens.shape))
                name_rows.append(encoded.name_embeds.expand(rows, *encoded.name_embeds.shape))
            else:
                uncond = encoded.uncond_tokens
                image_rows.append(uncond.expand(rows, num_cond, *uncond.shape[1:]))
                name_rows.append(encoded.uncond_names.expand(rows, *encoded.uncond_names.shape))
        batch = rows * len(halves)

        regions = has_region = None
        if any(s.region is not None for s in subjects):
            has_region = torch.tensor([s.region is not None for s in subjects], device=device)
        latent_size = None
        if image_size is not None:
            factor = _cell(self.pipe)
            latent_size = (image_size[0] // factor, image_size[1] // factor)
            regions = self._region_masks(subjects, image_size, latent_size, batch)  # checks the boxes now
        modes = {s.region_mode for s in subjects if s.region is not None}
        keep = rows if "cond" in halves else 0  # recorders keep the conditional rows (the last ones)

        return SubjectConditioning(
            image_tokens=torch.cat(image_rows).to(dtype),
            owner=encoded.owner,
            share=encoded.share,
            scales=encoded.scales.expand(batch, -1),
            name_embeds=torch.cat(name_rows).to(dtype),
            name_mask=encoded.name_mask.expand(batch, -1, -1),
            rule=rule,
            use_text_weight=use_text_weight,
            latent_size=latent_size,
            regions=regions,
            has_region=has_region,
            region_mode=modes.pop() if modes else RegionMode.REPLACE,
            recorder=RelevanceRecorder(latent_size, keep_last=keep) if record else None,
            image_attention=RelevanceRecorder(latent_size, keep_last=keep) if record_image_attention else None,
            share_meter=ShareMeter(batch, num_cond, device) if measure_shares else None,
            adapter_of=encoded.adapter_of,
            token_counts=encoded.token_counts,
            sources=encoded.sources,
            layer_scales=None
            if encoded.layer_scales is None
            else {
                layer.name: row.expand(batch, -1)
                for layer, row in zip(self.adapter.layer_specs, encoded.layer_scales, strict=True)
            },
        )


@dataclass
class _Encoded:
    """A call's subjects after the encoders: cond_tokens [N, t, c], owner [N], share [N], name_embeds
    [n, m, c], name_mask [n, m], scales [n]; uncond_tokens [1, t, c] (one per adapter of a mixed call,
    [N, t, c] there: each condition's own) and uncond_names [n, m, c] when the call has unconditional
    rows."""

    cond_tokens: torch.Tensor
    owner: torch.Tensor
    share: torch.Tensor
    name_embeds: torch.Tensor
    name_mask: torch.Tensor
    scales: torch.Tensor
    uncond_tokens: torch.Tensor | None = None
    uncond_names: torch.Tensor | None = None
    layer_scales: torch.Tensor | None = None  # [L, n] when a subject gives per-layer scales
    adapter_of: torch.Tensor | None = None  # [N]: a mixed call's adapter of each condition
    token_counts: tuple[int, ...] | None = None  # a mixed call's token count of each adapter
    sources: tuple[MIPAdapter, ...] = ()  # the adapters that projected the tokens, in order of first use


def _pad_tokens(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """Image tokens [k, t, c] zero-padded to [k, width, c] (the same tensor when t = width)."""
    missing = width - tokens.shape[1]
    return tokens if missing == 0 else torch.nn.functional.pad(tokens, (0, 0, 0, missing))


def _cell(pipe) -> int:
    """Output pixels per cell of the denoiser's latent grid: the VAE's factor (FLUX packs 2×2 latents)."""
    return pipe.vae_scale_factor * (2 if is_flux(pipe) else 1)


def _default_side(pipe) -> int:
    """The output side (pixels) the diffusers pipeline defaults to."""
    sample_size = pipe.default_sample_size if is_flux(pipe) else pipe.unet.config.sample_size
    return sample_size * pipe.vae_scale_factor


def _true_cfg(pipeline_kwargs: dict, has_negative: bool) -> bool:
    """Whether a FLUX call runs true classifier-free guidance (diffusers' rule in ``FluxPipeline.__call__``:
    ``true_cfg_scale > 1`` and a negative prompt or both negative embeddings)."""
    return float(pipeline_kwargs.get("true_cfg_scale", 1.0)) > 1 and has_negative


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
