"""The adapter container: image projection + one processor per attention layer that takes image tokens
(a UNet's cross-attention layers, FLUX's double-stream blocks)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mipadapter.config import TEXT_WEIGHT_INITS, AdapterConfig
from mipadapter.modeling import flux
from mipadapter.modeling.conditioning import SubjectConditioning
from mipadapter.modeling.flux import MIPFluxAttnProcessor
from mipadapter.modeling.processor import MIPAttnProcessor
from mipadapter.modeling.projection import build_image_projection

PROCESSOR_SUFFIX = ".processor"


@dataclass(frozen=True)
class CrossAttentionLayer:
    """An attention layer that takes image tokens.

    name: its key in ``model.attn_processors`` without the ``.processor`` suffix; index: on a UNet its
    position in that dict (self-attention included: the ``k`` of h94's ``"{k}.to_k_ip.weight"``), on FLUX
    the double block's number (the ``i`` of XLabs' ``double_blocks.{i}``); hidden_size: the layer's inner
    width; cross_attention_dim: the width of the image tokens it takes.
    """

    name: str
    index: int
    hidden_size: int
    cross_attention_dim: int


def cross_attention_layers(unet: nn.Module) -> list[CrossAttentionLayer]:
    """Every cross-attention layer of ``unet`` in ``attn_processors`` order."""
    modules = dict(unet.named_modules())
    layers = []
    for index, key in enumerate(unet.attn_processors):
        name = key.removesuffix(PROCESSOR_SUFFIX)
        attention = modules[name]
        if getattr(attention, "is_cross_attention", False):
            layers.append(
                CrossAttentionLayer(name, index, attention.to_k.out_features, attention.to_k.in_features)
            )
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers to attach an adapter to")
    return layers


def flux_layers(transformer: nn.Module) -> list[CrossAttentionLayer]:
    """The double-stream blocks' attention layers of a ``FluxTransformer2DModel``, in block order."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks or not hasattr(transformer.config, "joint_attention_dim"):
        raise ValueError(f"{type(transformer).__name__} is not a FLUX transformer with double-stream blocks")
    width = transformer.config.joint_attention_dim
    return [
        CrossAttentionLayer(f"transformer_blocks.{index}.attn", index, block.attn.to_q.out_features, width)
        for index, block in enumerate(blocks)
    ]


def model_architecture(model: nn.Module) -> str:
    """``flux`` for a FLUX transformer, ``unet`` for anything else (a UNet)."""
    return "flux" if type(model).__name__.startswith("Flux") else "unet"


def adapter_layers(model: nn.Module, config: AdapterConfig) -> list[CrossAttentionLayer]:
    """The layers an adapter of ``config.architecture`` goes into (an error for a model of another kind)."""
    found = model_architecture(model)
    if found != config.architecture:
        raise ValueError(
            f"this is a {config.architecture} adapter but the model is a {type(model).__name__} ({found}): "
            "use an adapter made for this base model"
        )
    return flux_layers(model) if found == "flux" else cross_attention_layers(model)


def diagnostic_layers(layers: list[CrossAttentionLayer]) -> set[str]:
    """The layers that report routed shares for the starved-subject diagnostic: the mid block's, where
    the layout is decided at the lowest resolution (all layers when a UNet has no mid block)."""
    mid = {layer.name for layer in layers if layer.name.startswith("mid_block.")}
    return mid or {layer.name for layer in layers}


def _module_key(layer_name: str) -> str:
    return layer_name.replace(".", "__")


class MIPAdapter(nn.Module):
    """Image projection and per-layer processors of one adapter, for one model architecture.

    Build with ``MIPAdapter.for_model`` (a UNet or a FLUX transformer); ``attach`` installs the processors
    into the model (other layers keep theirs) and ``detach`` puts back what was there. Constructors do no
    I/O.
    """

    def __init__(self, config: AdapterConfig, layers: list[CrossAttentionLayer]) -> None:
        super().__init__()
        self.config = config
        self.layer_specs = list(layers)
        self.image_proj = build_image_projection(config)
        diagnosed = diagnostic_layers(layers)
        self.layers = nn.ModuleDict(
            {_module_key(layer.name): self._processor(layer, layer.name in diagnosed) for layer in layers}
        )
        self._previous: dict[str, object] | None = None
        self._unet_ref: weakref.ref | None = None  # a weakref: a Module attribute would adopt the UNet
        self._attention: dict[str, weakref.ref] = {}  # layer name → its Attention module, while attached
        self._check_widths()

    def _processor(self, layer: CrossAttentionLayer, diagnose: bool) -> nn.Module:
        if self.config.architecture == "flux":
            return MIPFluxAttnProcessor(layer.hidden_size, layer.cross_attention_dim, layer.name, diagnose)
        return MIPAttnProcessor(
            layer.hidden_size, layer.cross_attention_dim, self.config.text_weight, layer.name, diagnose
        )

    @classmethod
    def for_model(cls, model: nn.Module, config: AdapterConfig) -> MIPAdapter:
        """An adapter of ``config`` for ``model`` (a UNet, or a FLUX transformer for ``architecture="flux"``)."""
        return cls(config, adapter_layers(model, config))

    @classmethod
    def for_unet(cls, unet: nn.Module, config: AdapterConfig) -> MIPAdapter:
        return cls.for_model(unet, config)

    def _check_widths(self) -> None:
        widths = {layer.cross_attention_dim for layer in self.layer_specs}
        if widths != {self.config.cross_attention_dim}:
            raise ValueError(
                f"adapter tokens are {self.config.cross_attention_dim} wide but the model's attention layers "
                f"take {sorted(widths)}: this adapter belongs to another base model"
            )

    def processor(self, layer_name: str) -> MIPAttnProcessor:
        return self.layers[_module_key(layer_name)]

    def processors(self) -> Mapping[str, MIPAttnProcessor]:
        """layer name → processor, in ``attn_processors`` order."""
        return {layer.name: self.processor(layer.name) for layer in self.layer_specs}

    @property
    def is_attached(self) -> bool:
        return self._previous is not None

    def attach(self, unet: nn.Module) -> None:
        """Install the processors into ``unet``'s cross-attention layers."""
        if self.is_attached:
            raise RuntimeError("this adapter is already attached to a UNet; detach it first")
        found = adapter_layers(unet, self.config)
        if [layer.name for layer in found] != [layer.name for layer in self.layer_specs]:
            raise ValueError("this adapter was built for a model with different attention layers")
        current = unet.attn_processors
        self._previous = {layer.name: current[layer.name + PROCESSOR_SUFFIX] for layer in self.layer_specs}
        unet.set_attn_processor(
            {
                key: self.processor(key.removesuffix(PROCESSOR_SUFFIX))
                if key.removesuffix(PROCESSOR_SUFFIX) in self._previous
                else processor
                for key, processor in current.items()
            }
        )
        self._unet_ref = weakref.ref(unet)
        modules = dict(unet.named_modules())
        self._attention = {layer.name: weakref.ref(modules[layer.name]) for layer in self.layer_specs}

    def detach(self) -> None:
        """Put back the processors the UNet had before ``attach``."""
        if not self.is_attached:
            raise RuntimeError("this adapter is not attached")
        unet = self._unet_ref()
        if unet is None:
            raise RuntimeError("the UNet this adapter was attached to no longer exists")
        current = unet.attn_processors
        unet.set_attn_processor(
            {
                key: self._previous.get(key.removesuffix(PROCESSOR_SUFFIX), processor)
                for key, processor in current.items()
            }
        )
        self._previous = None
        self._unet_ref = None
        self._attention = {}

    def prepare(self, cond: SubjectConditioning, sources: Sequence[MIPAdapter] = ()) -> SubjectConditioning:
        """Compute every layer's per-call constants for ``cond`` (once per generation call, or once per
        training step) and store them in ``cond.layer_inputs``. Returns ``cond``.

        sources: the adapters whose image tokens ``cond`` carries, in ``cond.adapter_groups`` order, when
        they are not this one alone (a call mixing adapters, or one run with another adapter of the same
        layers): each condition's image keys and values come from its own adapter's projections; the name
        keys and the routing come from the model this adapter is attached to. Left out: those ``cond``
        records (``cond.sources``, set by ``MIPAdapterPipeline.build_conditioning``), else this adapter.
        Sources other than those recorded are refused: the image tokens would meet another adapter's keys.
        """
        if not self.is_attached:
            raise RuntimeError("attach the adapter to a UNet before preparing a conditioning")
        given, recorded = list(sources), list(cond.sources)
        if given and recorded and [id(a) for a in given] != [id(b) for b in recorded]:
            raise ValueError(
                "the conditioning's image tokens were projected by other adapters than the sources given: "
                "leave sources out to use those it records"
            )
        sources = given or recorded or [self]
        self._check_sources(sources, cond)
        cache: dict = {}
        if self.config.architecture == "flux":
            cache[flux.NAME_ROWS], cache[flux.NAME_ROTARY] = flux.name_rows(self._unet_ref(), cond)
        for layer in self.layer_specs:
            attention = self._attention[layer.name]()
            if attention is None:
                raise RuntimeError("the UNet this adapter was attached to no longer exists")
            own = [source.processor(layer.name) for source in sources]
            cond.layer_inputs[layer.name] = self.processor(layer.name).prepare(
                attention, cond, cache, [] if sources == [self] else own
            )
        return cond

    def _check_sources(self, sources: list[MIPAdapter], cond: SubjectConditioning) -> None:
        """Refuse adapters that do not fit this one's layers, or a count that is not the conditioning's."""
        if len(sources) != cond.num_adapters:
            raise ValueError(
                f"the conditioning mixes {cond.num_adapters} adapters' image tokens but {len(sources)} adapters "
                "were given"
            )
        names = [layer.name for layer in self.layer_specs]
        for index, source in enumerate(sources):
            if source.config.architecture != self.config.architecture or [
                layer.name for layer in source.layer_specs
            ] != names:
                raise ValueError(f"adapter #{index + 1} of the call was built for a model with different layers")

    @torch.no_grad()
    def init_from_base(self, unet: nn.Module, text_weight_init: str = "pytorch") -> None:
        """Start training from the UNet itself: ``to_k_ip``/``to_v_ip`` copy each layer's ``to_k``/``to_v``,
        and ``text_to_weight`` is initialised by `init_text_weights`."""
        if self.config.architecture != "unet":
            raise ValueError(
                f"starting from the base model's keys is defined for UNets; start a {self.config.architecture} "
                "adapter from a checkpoint"
            )
        modules = dict(unet.named_modules())
        for layer in self.layer_specs:
            attention, processor = modules[layer.name], self.processor(layer.name)
            processor.to_k_ip.weight.copy_(attention.to_k.weight)
            processor.to_v_ip.weight.copy_(attention.to_v.weight)
        self.init_text_weights(text_weight_init)

    @torch.no_grad()
    def init_text_weights(self, how: str = "pytorch") -> None:
        """(Re)initialise every layer's ``text_to_weight``: ``"pytorch"``, nn.Linear's own initialisation
        (uniform in ±1/sqrt(c), from the global RNG), which the authors' training keeps since their
        checkpoint load leaves the gate out (``strict=False``); ``"zeros"``, a flat gate (``g`` = 1) at the
        start. Nothing happens without a text weight."""
        if how not in TEXT_WEIGHT_INITS:
            raise ValueError(f"text weight init must be one of {TEXT_WEIGHT_INITS}, got {how!r}")
        for processor in self.processors().values():
            if processor.text_to_weight is None:
                continue
            if how == "zeros":
                processor.text_to_weight.weight.zero_()
            else:
                processor.text_to_weight.reset_parameters()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Image-encoder features ([k, D] basic, [k, L, D] plus) → image tokens [k, t, c_kv]."""
        expected_ndim = 3 if self.config.uses_hidden_states else 2
        if features.ndim != expected_ndim or features.shape[-1] != self.config.image_embed_dim:
            want = "[k, L, D]" if expected_ndim == 3 else "[k, D]"
            raise ValueError(
                f"{self.config.projection} projection takes features shaped {want} with D = "
                f"{self.config.image_embed_dim}, got {tuple(features.shape)}"
            )
        weight = next(self.image_proj.parameters())
        return self.image_proj(features.to(weight.dtype))
