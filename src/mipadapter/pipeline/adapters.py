"""The named adapters of a pipeline, their image encoders, and how a call that mixes them is routed.

A pipeline is built with one adapter, the ``"default"``; more are added under their own names (a face
adapter beside a general one, docs/adapters.md). Image encoders are shared: an adapter added without
one takes the first loaded encoder that gives the features it reads, and one loaded from the same place
as another is that same module, so memory holds one copy per distinct encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from mipadapter.config import ADAPTER_NAME, DEFAULT_ADAPTER, AdapterConfig, MergeRule
from mipadapter.modeling.adapter import MIPAdapter
from mipadapter.pipeline.loading import default_feature_extractor, encoder_fits, load_image_encoder
from mipadapter.pipeline.subjects import Subject


class AdapterSet:
    """name → (adapter, image encoder, its feature extractor), the default first.

    The default adapter is the one attached to the model; the others lend their projections
    (``MIPAdapter.prepare``'s ``sources``). Every adapter fits the default's layers and token width.
    """

    def __init__(self, adapter: MIPAdapter, image_encoder, feature_extractor) -> None:
        self._adapters: dict[str, MIPAdapter] = {DEFAULT_ADAPTER: adapter}
        self._encoders: dict[str, tuple[Any, Any]] = {DEFAULT_ADAPTER: (image_encoder, feature_extractor)}
        self._sources: dict[str, tuple[Any, Any]] = {}  # where an encoder was loaded from → (it, its processor)

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    @property
    def mapping(self) -> Mapping[str, MIPAdapter]:
        return MappingProxyType(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def adapter(self, name: str) -> MIPAdapter:
        return self._adapters[name]

    def encoder(self, name: str) -> tuple[Any, Any]:
        """(image encoder, feature extractor) of the adapter ``name``."""
        return self._encoders[name]

    def of(self, subject: Subject) -> MIPAdapter:
        """The adapter that encodes ``subject``'s photos."""
        return self._adapters[subject.adapter or DEFAULT_ADAPTER]

    def remember_source(self, source: str | Path, encoder, feature_extractor) -> None:
        """Record where a loaded encoder came from, so that an adapter naming the same place shares it."""
        self._sources[str(source)] = (encoder, feature_extractor)

    def add(self, name: str, adapter: MIPAdapter, image_encoder=None, feature_extractor=None, cache_dir=None) -> None:
        """Add ``adapter`` under ``name`` with its encoder (see ``AdapterSet``'s sharing rules)."""
        check_new_name(name, self._adapters)
        self._check_fits(name, adapter)
        self._encoders[name] = self._encoder_for(name, adapter, image_encoder, feature_extractor, cache_dir)
        self._adapters[name] = adapter

    def modules(self) -> list[torch.nn.Module]:
        """Every adapter and image encoder once (an encoder shared by adapters is one module)."""
        modules: list[torch.nn.Module] = []
        for module in [*self._adapters.values(), *(encoder for encoder, _ in self._encoders.values())]:
            if not any(module is seen for seen in modules):
                modules.append(module)
        return modules

    def used_by(self, subjects: Sequence[Subject]) -> list[str]:
        """The adapters a call's subjects use, in order of first use; an unknown name is refused."""
        used: list[str] = []
        for subject in subjects:
            name = subject.adapter or DEFAULT_ADAPTER
            if name not in self._adapters:
                raise ValueError(
                    f"subject {subject.name!r}: no adapter named {name!r}; this pipeline has "
                    f"{', '.join(map(repr, self._adapters))}"
                )
            if name not in used:
                used.append(name)
        return used

    def _check_fits(self, name: str, adapter: MIPAdapter) -> None:
        """Refuse an adapter made for another base model (other layers or token width)."""
        ours = self._adapters[DEFAULT_ADAPTER]
        if (
            adapter.config.architecture != ours.config.architecture
            or adapter.config.cross_attention_dim != ours.config.cross_attention_dim
            or [layer.name for layer in adapter.layer_specs] != [layer.name for layer in ours.layer_specs]
        ):
            raise ValueError(
                f"adapter {name!r} was made for another base model (its attention layers or token width differ "
                "from this pipeline's)"
            )

    def _encoder_for(self, name: str, adapter: MIPAdapter, image_encoder, feature_extractor, cache_dir):
        """(encoder, feature extractor) of a new adapter: given, reused from the same place, or loaded
        (following the default encoder's device and dtype)."""
        config = adapter.config
        if image_encoder is None:
            for encoder, processor in self._encoders.values():
                if encoder_fits(encoder, config):
                    return encoder, processor
            kind = "hidden states" if config.uses_hidden_states else "embeddings"
            raise ValueError(
                f"adapter {name!r} takes {config.image_embed_dim}-wide image {kind}, which no loaded image "
                "encoder gives: give its image_encoder"
            )
        if isinstance(image_encoder, (str, Path)):
            source = str(image_encoder)
            if source not in self._sources:
                encoder, processor = load_image_encoder(
                    source, config, f"image encoder of adapter {name!r}", cache_dir=cache_dir
                )
                reference = next(self._encoders[DEFAULT_ADAPTER][0].parameters())
                encoder.to(device=reference.device, dtype=reference.dtype)
                self._sources[source] = (encoder, processor)
            encoder, processor = self._sources[source]
            if not encoder_fits(encoder, config):
                raise ValueError(f"image encoder {source!r} does not give the features adapter {name!r} takes")
            return encoder, processor
        if not encoder_fits(image_encoder, config):
            raise ValueError(f"the image encoder given for adapter {name!r} does not give the features it takes")
        for encoder, processor in self._encoders.values():
            if encoder is image_encoder:
                return encoder, feature_extractor or processor
        return image_encoder, feature_extractor or default_feature_extractor(image_encoder)


def check_new_name(name, taken: Mapping[str, Any]) -> None:
    """Refuse an adapter name that cannot be typed as ``NAME=FILE`` or is taken."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"an adapter name is letters, digits, '_', '-' or '.' (it is typed as NAME=FILE), got {name!r}"
        )
    if name in taken:
        raise ValueError(f"this pipeline has an adapter named {name!r} already")


class MixedRuleError(ValueError):
    """A rule or text gating a call's mix of adapters cannot give. setting: ``"rule"`` or
    ``"text_weight"`` (what to change); lacking: the subjects whose adapter has no text weight (empty
    when the refusal is paper's one gate). Shells word their own fix from these."""

    def __init__(self, message: str, setting: str, lacking: Sequence[str]) -> None:
        super().__init__(message)
        self.setting, self.lacking = setting, list(lacking)


def mixed_rule(
    names: Sequence[str], configs: Sequence[AdapterConfig], rule, use_text_weight
) -> tuple[MergeRule, bool]:
    """The merge rule and text gating of a call whose subjects (``names``) use several adapters
    (``configs``: each subject's adapter's config, all a file's header tells: the CLI decides before any
    model loads); a ``MixedRuleError`` for a combination the mix cannot run.

    Relevance comes from the base model, so ``paper`` and ``uniform`` route any mix. ``official`` weighs
    each subject by its own adapter's text weight ``g``: every subject's adapter needs one (the default
    rule when they all have one, else ``paper``). ``paper``'s gate scales the text branch, one ``g`` per
    image, which a mix of adapters does not have: it runs ungated.
    """
    lacking = [name for name, config in zip(names, configs, strict=True) if not config.text_weight]
    listed = ", ".join(map(repr, lacking))
    rule = (MergeRule.PAPER if lacking else MergeRule.OFFICIAL) if rule is None else MergeRule.parse(rule)
    if rule == MergeRule.OFFICIAL and lacking:
        raise MixedRuleError(
            f"rule 'official' weighs each subject by its adapter's text weight, which the adapter of {listed} "
            "has not: use rule 'paper' or 'uniform'",
            "rule",
            lacking,
        )
    if use_text_weight is None:
        return rule, rule == MergeRule.OFFICIAL
    # lacking first: with it, no rule would take the text weight, so the other advice would mislead
    if use_text_weight and lacking:
        raise MixedRuleError(
            f"use_text_weight=True needs a text weight in every subject's adapter; that of {listed} has none",
            "text_weight",
            lacking,
        )
    if use_text_weight and rule == MergeRule.PAPER:
        raise MixedRuleError(
            "use_text_weight=True under rule 'paper' gates the text with one adapter's weight, and this "
            "call mixes adapters: use rule 'official', or use_text_weight=False",
            "text_weight",
            [],
        )
    return rule, bool(use_text_weight)
