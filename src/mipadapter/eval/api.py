"""Model loading for evaluation runs, for the CLI: which pipelines, encoders and detector a run uses.

`ModelOptions` names the models (hub ids or local paths; presets fill the rest) plus the device and
dtype the *caller* chose. ``tiny=True`` swaps every model for tiny random ones (an offline smoke test).
`evaluate_concept101`, `evaluate_dreambench` and `evaluate_relevance` build lazy loaders from the
options and call the runners: every model (pipelines, the detector, the metric encoders) loads only when
the run reaches the step that needs it, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mipadapter.encoders import CLIP_MODEL_ID, DINO_MODEL_ID, FeatureEncoders
from mipadapter.eval.detect import GROUNDING_DINO_ID, Detector, load_grounding_dino
from mipadapter.eval.relevance import run_relevance
from mipadapter.eval.runner import run_concept101, run_dreambench
from mipadapter.eval.variants import resolve_variants

__all__ = [
    "ModelOptions",
    "evaluate_concept101",
    "evaluate_dreambench",
    "evaluate_relevance",
    "tiny_encoders",
]


@dataclass(frozen=True)
class ModelOptions:
    """The models of an evaluation. ``preset`` / ``ip_preset`` fill what is not given (see
    ``mipadapter.config.PRESETS``); ``device`` / ``torch_dtype`` are applied when given (None: leave the
    models where they load, on the CPU in float32)."""

    preset: str = "mip-sdxl"
    base_model: str | None = None
    adapter: str | None = None
    image_encoder: str | None = None
    ip_preset: str = "ip-sdxl"
    ip_base_model: str | None = None
    ip_adapter: str | None = None
    ip_image_encoder: str | None = None
    clip: str = CLIP_MODEL_ID
    dino: str = DINO_MODEL_ID
    detector: str = GROUNDING_DINO_ID
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    device: Any = None
    torch_dtype: torch.dtype | None = None
    tiny: bool = False

    def describe(self, model: str) -> dict[str, str]:
        """The ids a results file records for ``"mip"`` or ``"ip"``."""
        from mipadapter.config import PRESETS

        if self.tiny:
            adapter = self._given(model)[1]
            return {
                "base_model": "tiny-sdxl (random)",
                "adapter": str(Path(adapter).resolve()) if adapter else f"tiny-{model} (random)",
                "image_encoder": "tiny",
            }
        preset = PRESETS[self.preset if model == "mip" else self.ip_preset]
        given = self._given(model)
        return {
            "preset": self.preset if model == "mip" else self.ip_preset,
            "base_model": str(given[0] or preset.base_model),
            "adapter": str(given[1] or preset.adapter),
            "image_encoder": str(given[2] or preset.image_encoder),
        }

    def check_tiny(self) -> None:
        """With ``tiny``, refuse real base models and image encoders (the tiny ones are used), in one line
        naming the flag, as ``generate --tiny`` does; adapter files are loaded onto the tiny models."""
        if not self.tiny:
            return
        for flag, value in (
            ("--base-model", self.base_model),
            ("--image-encoder", self.image_encoder),
            ("--ip-base-model", self.ip_base_model),
            ("--ip-image-encoder", self.ip_image_encoder),
        ):
            if value:
                raise ValueError(f"{flag} cannot be used with --tiny (it picks the tiny base model and image encoder)")

    def identities(self, model: str, *, base_only: bool = False) -> dict[str, dict[str, Any]]:
        """``{role: identity}`` (see `mipadapter.provenance`) of the models ``"mip"`` or ``"ip"`` uses,
        found without loading them (adapter files hashed; Hub ids resolved from the cache, or their
        configs fetched); an adapter file given with ``tiny`` is checked against the tiny models here.
        base_only: the base model alone (the relevance experiment)."""
        from mipadapter.config import PRESETS
        from mipadapter.hub import resolve_file, resolve_folder_file
        from mipadapter.provenance import source_identity

        flag = "--" if model == "mip" else "--ip-"
        base, adapter, encoder = self._given(model)
        if self.tiny:
            found = {f"{model}.base_model": _tiny_identity("sdxl", _TINY_SEEDS[model])}
            if not base_only:
                if adapter:
                    path = resolve_file(adapter, "adapter", f"{flag}adapter")
                    self._tiny_adapter_pipeline(path)  # refuse a file that does not fit, before the run
                    found[f"{model}.adapter"] = source_identity(adapter, path)
                else:
                    found[f"{model}.adapter"] = {"tiny": f"{model} adapter", "seed": _TINY_SEEDS[model]}
            return found
        preset = PRESETS[self.preset if model == "mip" else self.ip_preset]
        base = str(base or preset.base_model)
        marker = resolve_folder_file(base, "model_index.json", "base model", f"{flag}base-model")
        found = {f"{model}.base_model": source_identity(base, marker.parent, folder_marker=marker)}
        if base_only:
            return found
        adapter = str(adapter or preset.adapter)
        found[f"{model}.adapter"] = source_identity(adapter, resolve_file(adapter, "adapter", f"{flag}adapter"))
        encoder = str(encoder or preset.image_encoder)
        marker = resolve_folder_file(encoder, "config.json", "image encoder", f"{flag}image-encoder")
        found[f"{model}.image_encoder"] = source_identity(encoder, marker.parent, folder_marker=marker)
        return found

    def _tiny_adapter_pipeline(self, path):
        from mipadapter.testing.mip import tiny_pipeline_with_adapter

        return tiny_pipeline_with_adapter("sdxl", path, "--tiny")[0]

    def _given(self, model: str) -> tuple[str | None, str | None, str | None]:
        if model == "mip":
            return self.base_model, self.adapter, self.image_encoder
        return self.ip_base_model, self.ip_adapter, self.ip_image_encoder

    def pipeline_factory(self, model: str) -> Callable[[], Any]:
        def load():
            adapter = self._given(model)[1]
            if self.tiny and adapter:
                from mipadapter.hub import resolve_file

                flag = "--adapter" if model == "mip" else "--ip-adapter"
                pipe = self._tiny_adapter_pipeline(resolve_file(adapter, "adapter", flag))
            elif self.tiny:
                from mipadapter.testing.mip import tiny_mip_pipeline

                pipe = tiny_mip_pipeline("sdxl", "basic", text_weight=model == "mip", seed=_TINY_SEEDS[model])
            else:
                from mipadapter.pipeline import MIPAdapterPipeline

                # only what the user gave: the preset fills the rest (and its scale for its adapter)
                given = self._given(model)
                pipe = MIPAdapterPipeline.from_pretrained(
                    *given,
                    preset=self.preset if model == "mip" else self.ip_preset,
                    torch_dtype=self.torch_dtype,
                )
            if self.device is not None:
                pipe.to(self.device)
            return pipe

        return load

    def base_pipeline_factory(self) -> Callable[[], Any]:
        """The main preset's base diffusers pipeline alone (no adapter, no image encoder): the model of
        the relevance experiment."""

        def load():
            if self.tiny:
                from mipadapter.testing import tiny_sdxl_pipeline

                pipe = tiny_sdxl_pipeline(0)  # the base of the tiny "mip" pipeline
            else:
                from diffusers import DiffusionPipeline

                from mipadapter.config import PRESETS
                from mipadapter.hub import fetch_failed, resolve_folder

                source = str(self.base_model or PRESETS[self.preset].base_model)
                location, subfolder = resolve_folder(
                    source, "base model", "--base-model", marker="model_index.json"
                )
                extra = {"subfolder": subfolder} if subfolder else {}
                try:
                    pipe = DiffusionPipeline.from_pretrained(location, torch_dtype=self.torch_dtype, **extra)
                except OSError as error:
                    raise fetch_failed(source, "base model", "--base-model", error) from error
            if self.device is not None:
                pipe.to(self.device)
            return pipe

        return load

    def encoders(self) -> FeatureEncoders:
        if self.tiny:
            return tiny_encoders()
        return FeatureEncoders.from_pretrained(self.clip, self.dino, device=self.device)

    def load_detector(self) -> Detector:
        if self.tiny:
            return _CentreBoxDetector()
        return load_grounding_dino(
            self.detector,
            box_threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            device=self.device,
        )


_TINY_SEEDS = {"mip": 0, "ip": 1}  # the tiny "mip" and "ip" models differ by their seed


def _tiny_identity(arch: str, seed: int) -> dict[str, Any]:
    """A tiny base model's identity: factory, seed and its tokenizer's (the environment decides whether
    the tests' fallback vocabulary or CLIP's real BPE is used)."""
    from mipadapter.provenance import tokenizer_identity
    from mipadapter.testing import build_clip_tokenizer

    return {"tiny": arch, "seed": seed, "tokenizer": tokenizer_identity(build_clip_tokenizer())}


class _CentreBoxDetector:
    """Tiny mode's detector: the centre half of the image for every label."""

    model_id = "centre-box (tiny mode)"

    def detect(self, image, labels):
        w, h = image.size
        return [(w / 4, h / 4, 3 * w / 4, 3 * h / 4) for _ in labels]


def tiny_encoders(seed: int = 0) -> FeatureEncoders:
    """Tiny random CLIP (width 16, projection 12, 32-px images) and DINO-shaped ViT encoders, offline."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from mipadapter.encoders import ClipFeatures, DinoFeatures
    from mipadapter.testing import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(vocab="fallback", model_max_length=32)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = CLIPModel(
            CLIPConfig(
                text_config=dict(
                    **tower,
                    vocab_size=len(tokenizer),
                    max_position_embeddings=32,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                ),
                vision_config=dict(**tower, image_size=32, patch_size=8),
                projection_dim=12,
            )
        )
        dino = ViTModel(ViTConfig(**tower, image_size=32, patch_size=8), add_pooling_layer=False)
    return FeatureEncoders(
        ClipFeatures(clip, tokenizer, model_id="tiny-clip (random)"),
        DinoFeatures(dino, model_id="tiny-dino (random)"),
    )


def _run_kwargs(options: ModelOptions, variants: Sequence[str] | str) -> dict[str, Any]:
    chosen = resolve_variants(variants if isinstance(variants, str) else list(variants))
    models = sorted({v.model for v in chosen})
    options.check_tiny()
    identities = {role: found for model in models for role, found in options.identities(model).items()}
    return {
        "identities": identities,
        "variants": variants,
        "pipelines": {model: options.pipeline_factory(model) for model in models},
        "encoders": options.encoders,  # loaded when scoring starts
        "detector": options.load_detector,  # loaded only if a box must be detected
        "models": {model: options.describe(model) for model in models},
    }


def evaluate_concept101(
    benchmark_dir: str | Path,
    out_dir: str | Path,
    *,
    options: ModelOptions,
    variants: Sequence[str] | str = "official",
    **kwargs: Any,
) -> dict[str, Any] | None:
    """`run_concept101` with the models of ``options``."""
    return run_concept101(benchmark_dir, out_dir, **_run_kwargs(options, variants), **kwargs)


def evaluate_dreambench(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    options: ModelOptions,
    variants: Sequence[str] | str = "official",
    **kwargs: Any,
) -> dict[str, Any] | None:
    """`run_dreambench` with the models of ``options``."""
    return run_dreambench(dataset_dir, out_dir, **_run_kwargs(options, variants), **kwargs)


def evaluate_relevance(
    benchmark_dir: str | Path,
    out_dir: str | Path,
    *,
    options: ModelOptions,
    model: str = "base",
    **kwargs: Any,
) -> dict[str, Any]:
    """`run_relevance` with the detector of ``options`` and either the main preset's base pipeline alone
    (``model="base"``, the paper's setting) or the main MIP pipeline (``model="adapter"``)."""
    if model == "base":
        description = {"base_model": options.describe("mip")["base_model"], "adapter": None}
        pipeline = options.base_pipeline_factory()
    else:
        description, pipeline = options.describe("mip"), options.pipeline_factory("mip")
    return run_relevance(
        benchmark_dir,
        out_dir,
        pipeline=pipeline,
        detector=options.load_detector(),
        model=model,
        models={"mip" if model == "adapter" else "base": description},
        **kwargs,
    )
