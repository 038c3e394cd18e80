"""Speed of one UNet step with multi-subject routing, against diffusers' IP-Adapter and the authors' approach.

Builds a UNet2DConditionModel from a config written here (SDXL base, a scaled-down SDXL-like ``mid`` for CPU
developer runs, or ``tiny`` for CI) with random weights, on the chosen device and dtype, and times, interleaved
(every variant once per repeat, round-robin) with CUDA events on GPU and ``perf_counter`` on CPU:

* ``text_only``: diffusers ``AttnProcessor2_0`` everywhere;
* ``ip_concat``: diffusers' ``IPAdapterAttnProcessor2_0`` with the ``n`` images' tokens concatenated (one
  IP-Adapter, ``image_embeds`` of shape ``[b, n, t, c]`` through an identity ``MultiIPAdapterImageProjection``);
* ``ip_masked``: the same with ``ip_adapter_masks`` (one mask per image, at image resolution, as
  ``IPAdapterMaskProcessor`` makes them);
* ``ours_<rule>``: ``MIPAttnProcessor`` installed by ``MIPAdapter.attach`` under each merge rule, one
  ``SubjectConditioning`` prepared once (``MIPAdapter.prepare``) and reused across steps, as a pipeline does
  within one generation call (training steps prepare theirs every step, as training does);
* ``authors``: the authors' approach re-implemented here from docs/method.md's description (every attention,
  self-attention included, with explicit attention matrices instead of SDPA; a Python loop over subjects; each
  subject's name encoded alone at the full 77-token length, keyed, and its name rows picked, at every call, as
  are the image keys/values), ``official`` rule;
* ``mixed_<rule>/n=2`` (issue 21; ``--no-mixed`` skips it): two subjects, each through its own adapter — the
  first through the adapter of every other variant (4 image tokens), the second through another adapter of the
  same layers (its own ``to_k_ip``/``to_v_ip`` and text weights, 16 tokens as a Plus adapter has), in one
  ``SubjectConditioning`` (``adapter_of``/``token_counts``: the 4-token condition zero-padded to 16 and kept out
  of the softmax by the key bias) prepared once by ``MIPAdapter.prepare(cond, [first, second])``; under
  ``official`` each subject is gated by its own adapter's text weight, under ``paper`` ungated (as a pipeline
  runs a mix). Timed beside ``ours_<rule>/n=2`` (one adapter, 2 subjects; added when ``--subjects`` lacks 2),
  and the ratio mixed ÷ single printed;

for 1, 2, 4, 8 subjects (``--subjects``), an inference step (``no_grad``) at ``--size`` with ``--batch`` rows
(2 = classifier-free guidance), and a training step (adapter weights trainable, UNet frozen, forward and
backward of an MSE loss; the optimiser step, the same for every variant, is left out) at ``--train-size`` with
``--train-batch`` rows. Every adapter variant shares the same ``to_k_ip``/``to_v_ip`` modules. Prints the
ratios against ``ip_concat`` with the same number of images and against ``text_only``, measured in the same
run, and writes everything to ``--out`` as JSON.

It also checks, over a ``--gen-steps`` loop with one ``SubjectConditioning``, that nothing constant per call
is recomputed per step (it counts ``to_k_ip`` calls and name-key projections), and checks two parities on
the model itself: ``ours_uniform`` with one subject against ``ip_concat`` with one image, and
``ours_official`` against ``authors``.

    python benchmarks/unet_step.py --device cuda --dtype fp16 --config sdxl --size 1024 --out results.json
    python benchmarks/unet_step.py --config mid --size 512 --repeats 5 --warmup 1 --out mid.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, beside this script
from harness import Variant, card, median, relative_error, run_interleaved, write_outputs  # noqa: E402

from mipadapter.config import AdapterConfig, MergeRule
from mipadapter.modeling import MIPAdapter, SubjectConditioning
from mipadapter.testing import TINY_SDXL

TEXT_TOKENS = 77
IMAGE_TOKENS = 4  # per image (basic IP-Adapter)
PLUS_TOKENS = 16  # per image of the mixed case's second adapter (IP-Adapter-Plus)
MIXED_SUBJECTS = 2  # the mixed case: 2 subjects, one per adapter
NAME_TOKENS = 3  # padded length of a subject's name; subject i has 1 + i % 3 real tokens

# SDXL base (stabilityai/stable-diffusion-xl-base-1.0/unet/config.json); attention_head_dim is diffusers'
# historical name for the number of heads (head dim 64 everywhere).
SDXL = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    upcast_attention=False,
)
# SDXL's structure at a quarter of the width and fewer transformer layers: head dim 64, 2048-wide tokens and
# text_time conditioning kept; at 512 px its positions-per-channel match SDXL's at 1024 px (p/c = 8 and 1
# against 6.4 and 0.8), so attention and the rest keep roughly SDXL's proportions.
MID = {
    **SDXL,
    "sample_size": 64,
    "block_out_channels": (64, 128, 256),
    "transformer_layers_per_block": (1, 2, 4),
    "attention_head_dim": (1, 2, 4),
}
# SDXL's block layout at the widths of the tests' tiny SDXL (mipadapter.testing.TINY_SDXL), for CI.
TINY = {
    **SDXL,
    "sample_size": TINY_SDXL.latent_size,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": TINY_SDXL.block_out_channels,
    "transformer_layers_per_block": TINY_SDXL.transformer_layers_per_block,
    "attention_head_dim": TINY_SDXL.attention_heads,
    "cross_attention_dim": TINY_SDXL.cross_attention_dim,
    "addition_time_embed_dim": TINY_SDXL.addition_time_embed_dim,
    "projection_class_embeddings_input_dim": 6 * TINY_SDXL.addition_time_embed_dim + TINY_SDXL.text_projection_dim,
}
CONFIGS = {"sdxl": SDXL, "mid": MID, "tiny": TINY}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pooled_dim(config: dict) -> int:
    """Width of the pooled text embedding that text_time conditioning expects."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


# --------------------------------------------------------------------------------------------------------
# The authors' approach, re-implemented from docs/method.md for comparison (not library code).


@dataclass
class AuthorsConditioning:
    """image_tokens [b, n, t, c_kv]; name_embeds [b, n, s, c_kv]: each name encoded alone at the prompt length;
    name_mask [b, n, s] (True on the name's rows); scales [b, n]."""

    image_tokens: torch.Tensor
    name_embeds: torch.Tensor
    name_mask: torch.Tensor
    scales: torch.Tensor


class AuthorsStyleProcessor(nn.Module):
    """``official`` merge the way the authors run it: explicit attention matrices (``baddbmm`` + softmax +
    ``bmm``, no SDPA), one Python iteration per subject, and every per-call constant (image keys/values, the
    keys of the subjects' full-length name encodings) recomputed at every call."""

    def __init__(self, to_k_ip: nn.Linear, to_v_ip: nn.Linear, text_to_weight: nn.Linear) -> None:
        super().__init__()
        self.to_k_ip, self.to_v_ip, self.text_to_weight = to_k_ip, to_v_ip, text_to_weight

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_hidden_states: AuthorsConditioning | None = None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, positions, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [b·h, p, d]
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [b·h, p, s]
        text_out = attn.batch_to_head_dim(torch.bmm(probs, value))  # [b, p, c]

        cond = ip_hidden_states
        if cond is not None:
            heads = attn.heads
            outputs, relevance = [], []
            for i in range(cond.image_tokens.shape[1]):
                ip_key = attn.head_to_batch_dim(self.to_k_ip(cond.image_tokens[:, i]))  # [b·h, t, d]
                ip_value = attn.head_to_batch_dim(self.to_v_ip(cond.image_tokens[:, i]))
                ip_probs = attn.get_attention_scores(query, ip_key, None)  # [b·h, p, t]
                outputs.append(attn.batch_to_head_dim(torch.bmm(ip_probs, ip_value)))  # [b, p, c]
                with torch.no_grad():
                    name_key = attn.head_to_batch_dim(attn.to_k(cond.name_embeds[:, i]))  # [b·h, s, d]
                    name_probs = attn.get_attention_scores(name_key, query, None)  # [b·h, s, p], softmax over p
                    name_probs = name_probs.view(batch, heads, -1, positions).mean(dim=1)  # [b, s, p]
                    mask = cond.name_mask[:, i].to(name_probs.dtype)  # [b, s]: the name's rows
                    relevance.append((name_probs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))  # [b, p]
            total = sum(relevance)
            gate = torch.sigmoid(self.text_to_weight(text_out))  # [b, p, 1]
            gate = gate / gate.mean(dim=1, keepdim=True)
            merged = text_out
            for i, (out_i, rel_i) in enumerate(zip(outputs, relevance, strict=True)):
                weight = (cond.scales[:, i, None] * rel_i / total)[..., None]  # [b, p, 1]
                merged = merged + weight * gate * out_i
            text_out = merged

        out = attn.to_out[1](attn.to_out[0](text_out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# --------------------------------------------------------------------------------------------------------
# Bench: one UNet, its processor sets, and the inputs of every variant.


class Bench:
    def __init__(self, config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        torch.manual_seed(seed)
        with torch.device(device):  # random init on the device: SDXL's 2.6 B parameters init fast on a GPU
            unet = UNet2DConditionModel(**config)
        if dtype != torch.float32:
            verbosity = diffusers.utils.logging.get_verbosity()
            diffusers.utils.logging.set_verbosity_error()  # the from_pretrained-only float32 notice
            unet = unet.to(dtype=dtype)
            diffusers.utils.logging.set_verbosity(verbosity)
        self.unet = unet.eval().requires_grad_(False)
        self.base = {key: AttnProcessor2_0() for key in self.unet.attn_processors}
        self.unet.set_attn_processor(dict(self.base))
        cross_dim = config["cross_attention_dim"]
        adapter_config = AdapterConfig("basic", image_embed_dim=1280, cross_attention_dim=cross_dim,
                                       num_tokens=IMAGE_TOKENS, text_weight=True)
        self.adapter = MIPAdapter.for_unet(self.unet, adapter_config).to(device=device, dtype=dtype)
        with torch.no_grad():  # random, small text weights so the gate is not flat
            for processor in self.adapter.processors().values():
                processor.text_to_weight.weight.normal_(0.0, 0.02)
        modules = dict(self.unet.named_modules())
        self.layer_names = [layer.name for layer in self.adapter.layer_specs]
        self.attn_modules = [modules[name] for name in self.layer_names]
        ours = self.adapter.processors()
        ip, authors = {}, {}
        for name, processor in ours.items():
            shared = IPAdapterAttnProcessor2_0(processor.hidden_size, cross_dim, num_tokens=(IMAGE_TOKENS,))
            shared.to_k_ip = nn.ModuleList([processor.to_k_ip])  # one set of adapter weights for every variant
            shared.to_v_ip = nn.ModuleList([processor.to_v_ip])
            ip[name + ".processor"] = shared
            authors[name + ".processor"] = AuthorsStyleProcessor(processor.to_k_ip, processor.to_v_ip,
                                                                 processor.text_to_weight)
        self.ip_processors = {**self.base, **ip}
        # the authors' code runs its self-attention without SDPA too (diffusers' classic AttnProcessor)
        self.authors_processors = {**{key: AttnProcessor() for key in self.base}, **authors}
        self.identity_proj = MultiIPAdapterImageProjection([nn.Identity()])
        # the mixed case's second adapter: the same layers, other weights, 16 tokens (never attached: the
        # first one's processors route both, each condition through its own adapter's projections)
        second_config = AdapterConfig("basic", image_embed_dim=1280, cross_attention_dim=cross_dim,
                                      num_tokens=PLUS_TOKENS, text_weight=True)
        self.second = MIPAdapter.for_unet(self.unet, second_config).to(device=device, dtype=dtype)
        with torch.no_grad():
            for processor in self.second.processors().values():
                processor.text_to_weight.weight.normal_(0.0, 0.02)
        self.adapter_params = list(self.adapter.layers.parameters())

    # inputs ------------------------------------------------------------------------------------------
    def inputs(self, batch: int, size: int, subjects: int, seed: int = 1) -> dict:
        if size % 8:
            raise ValueError(f"--size must be a multiple of 8, got {size}")
        gen = torch.Generator().manual_seed(seed)
        cross_dim, latent = self.config["cross_attention_dim"], size // 8

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(self.device, self.dtype)

        name_mask = torch.arange(NAME_TOKENS)[None, :] < (1 + torch.arange(subjects) % 3)[:, None]  # [n, m]
        name_embeds = rand(batch, subjects, NAME_TOKENS, cross_dim)
        # the same names encoded at the prompt length, as the authors key them: BOS, the name rows, padding
        full_names = rand(batch, subjects, TEXT_TOKENS, cross_dim)
        full_names[:, :, 1 : 1 + NAME_TOKENS] = name_embeds
        full_mask = torch.zeros(subjects, TEXT_TOKENS, dtype=torch.bool)
        full_mask[:, 1 : 1 + NAME_TOKENS] = name_mask
        strips = torch.zeros(1, subjects, size, size)
        for i, chunk in enumerate(torch.arange(size).chunk(subjects)):
            strips[:, i, :, chunk] = 1.0  # one vertical strip per subject
        return {
            "sample": rand(batch, 4, latent, latent),
            "timestep": torch.full((batch,), 500, device=self.device),
            "text": rand(batch, TEXT_TOKENS, cross_dim),
            "added": {"text_embeds": rand(batch, pooled_dim(self.config)), "time_ids": rand(batch, 6)},
            "image_tokens": rand(batch, subjects, IMAGE_TOKENS, cross_dim),
            "name_embeds": name_embeds,
            "name_mask": name_mask.expand(batch, -1, -1).to(self.device),
            "full_names": full_names,
            "full_mask": full_mask.expand(batch, -1, -1).to(self.device),
            "scales": torch.ones(batch, subjects, device=self.device, dtype=self.dtype),
            "masks": strips.to(self.device, self.dtype),
            "latent_size": (latent, latent),
            "target": rand(batch, 4, latent, latent),
            "plus_tokens": rand(batch, 1, PLUS_TOKENS, cross_dim),  # the mixed case's second subject
        }

    def conditioning(self, x: dict, subjects: int, rule: str) -> SubjectConditioning:
        return SubjectConditioning(
            image_tokens=x["image_tokens"][:, :subjects],
            owner=torch.arange(subjects, device=self.device),
            share=torch.ones(subjects, device=self.device, dtype=self.dtype),
            scales=x["scales"][:, :subjects],
            name_embeds=x["name_embeds"][:, :subjects],
            name_mask=x["name_mask"][:, :subjects],
            rule=rule,
            use_text_weight=rule != MergeRule.UNIFORM.value,
            latent_size=x["latent_size"],
        )

    def mixed_conditioning(self, x: dict, rule: str) -> SubjectConditioning:
        """The mixed case: subject 0 through the first adapter (4 tokens, zero-padded to 16), subject 1
        through the second (16 tokens); gated per adapter under ``official``, ungated otherwise."""
        first = F.pad(x["image_tokens"][:, :1], (0, 0, 0, PLUS_TOKENS - IMAGE_TOKENS))  # [b, 1, 16, c]
        n = MIXED_SUBJECTS
        return SubjectConditioning(
            image_tokens=torch.cat([first, x["plus_tokens"]], dim=1),  # [b, 2, 16, c]
            owner=torch.arange(n, device=self.device),
            share=torch.ones(n, device=self.device, dtype=self.dtype),
            scales=x["scales"][:, :n],
            name_embeds=x["name_embeds"][:, :n],
            name_mask=x["name_mask"][:, :n],
            rule=rule,
            use_text_weight=rule == MergeRule.OFFICIAL.value,
            latent_size=x["latent_size"],
            adapter_of=torch.arange(n, device=self.device),
            token_counts=(IMAGE_TOKENS, PLUS_TOKENS),
        )

    # installing a variant ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, variant: Variant):
        unet = self.unet
        if variant.kind in ("ip_concat", "ip_masked"):
            unet.set_attn_processor(dict(self.ip_processors))
            unet.encoder_hid_proj = self.identity_proj
            unet.config.encoder_hid_dim_type = "ip_image_proj"
        elif variant.kind == "authors":
            unet.set_attn_processor(dict(self.authors_processors))
        elif variant.kind in ("ours", "mixed"):
            self.adapter.attach(unet)
        try:
            yield
        finally:
            if variant.kind in ("ours", "mixed"):
                self.adapter.detach()
            unet.encoder_hid_proj = None
            unet.config.encoder_hid_dim_type = None
            unet.set_attn_processor(dict(self.base))

    def call_kwargs(self, variant: Variant, x: dict, cond: SubjectConditioning | None) -> dict:
        """Keyword arguments of the UNet call for ``variant`` (``cond``: the reused conditioning of ``ours``)."""
        n = variant.subjects
        kwargs = {"added_cond_kwargs": dict(x["added"])}
        if variant.kind in ("ip_concat", "ip_masked"):
            kwargs["added_cond_kwargs"]["image_embeds"] = [x["image_tokens"][:, :n]]  # [b, n, t, c] → n·t tokens
            if variant.kind == "ip_masked":
                kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": [x["masks"][:, :n]]}
        elif variant.kind == "ours":
            if not cond.layer_inputs:  # once per conditioning, with the adapter attached (as a pipeline call)
                self.adapter.prepare(cond)
            kwargs["cross_attention_kwargs"] = {"ip_hidden_states": cond}
        elif variant.kind == "mixed":
            if not cond.layer_inputs:  # each adapter projects its own subject, once per call
                self.adapter.prepare(cond, [self.adapter, self.second])
            kwargs["cross_attention_kwargs"] = {"ip_hidden_states": cond}
        elif variant.kind == "authors":
            kwargs["cross_attention_kwargs"] = {"ip_hidden_states": AuthorsConditioning(
                x["image_tokens"][:, :n], x["full_names"][:, :n], x["full_mask"][:, :n], x["scales"][:, :n])}
        return kwargs

    def forward(self, variant: Variant, x: dict, cond: SubjectConditioning | None, unet=None) -> torch.Tensor:
        unet = unet if unet is not None else self.unet
        return unet(x["sample"], x["timestep"], x["text"], **self.call_kwargs(variant, x, cond)).sample

    def train_step(self, variant: Variant, x: dict, unet=None) -> None:
        """Forward and backward of the epsilon-MSE loss; adapter weights trainable, the UNet frozen."""
        for param in self.adapter_params:
            param.grad = None
        cond = self.conditioning(x, variant.subjects, variant.rule) if variant.kind == "ours" else None
        out = self.forward(variant, x, cond, unet)
        F.mse_loss(out.float(), x["target"].float()).backward()


# --------------------------------------------------------------------------------------------------------
# Timing


# --------------------------------------------------------------------------------------------------------
# Checks: per-call constants, parities, graph breaks


def generation_check(bench: Bench, x: dict, subjects: int, steps: int, mixed: bool = True) -> dict:
    """Run ``steps`` UNet calls with one conditioning and count image-key and name-key projections (ours, the
    authors' and, with ``mixed``, the mixed case's: both adapters' ``to_k_ip`` together)."""
    counts = {"to_k_ip": 0, "name_keys": 0}

    def count_ip(module, args, output):
        counts["to_k_ip"] += 1

    # name rows vs prompt rows at to_k: ours keys [b·n, m, c] name rows (m = NAME_TOKENS, prompts have
    # TEXT_TOKENS); the authors key [b, TEXT_TOKENS, c] views of the full-length name encodings
    full_names = x["full_names"].untyped_storage().data_ptr()

    def count_names(module, args, output):
        rows = args[0]
        if rows.shape[-2] == NAME_TOKENS or rows.untyped_storage().data_ptr() == full_names:
            counts["name_keys"] += 1

    processors = list(bench.adapter.processors().values())
    hooks = [p.to_k_ip.register_forward_hook(count_ip) for p in [*processors, *bench.second.processors().values()]]
    hooks += [attn.to_k.register_forward_hook(count_names) for attn in bench.attn_modules]
    report = {"steps": steps, "subjects": subjects, "cross_attention_layers": len(processors)}
    try:
        for kind in ("ours", "authors", *(("mixed",) if mixed else ())):
            variant = Variant(kind, kind, MIXED_SUBJECTS if kind == "mixed" else subjects, MergeRule.OFFICIAL.value)
            counts.update(to_k_ip=0, name_keys=0)
            cond = None
            if kind == "ours":
                cond = bench.conditioning(x, subjects, variant.rule)
            elif kind == "mixed":
                cond = bench.mixed_conditioning(x, variant.rule)
            sample = x["sample"]
            with bench.installed(variant), torch.no_grad():
                for _ in range(steps):
                    out = bench.unet(sample, x["timestep"], x["text"], **bench.call_kwargs(variant, x, cond)).sample
                    sample = sample - 0.05 * out
            layers = len(processors)
            adapters = 2 if kind == "mixed" else 1  # a mix: each adapter projects its own subject once per layer
            report[kind] = {**counts, "per_call": counts["to_k_ip"] == adapters * layers
                            and counts["name_keys"] == layers}
    finally:
        for hook in hooks:
            hook.remove()
    return report


def parity_checks(bench: Bench, x: dict) -> dict:
    """Relative errors of the whole UNet output between variants that must agree."""
    results = {}
    with torch.no_grad():
        pairs = [
            (Variant("ours_uniform/n=1", "ours", 1, "uniform"), Variant("ip_concat/n=1", "ip_concat", 1)),
        ]
        if x["image_tokens"].shape[1] >= 2:
            pairs.append((Variant("ours_official/n=2", "ours", 2, "official"), Variant("authors/n=2", "authors", 2)))
        for ours, other in pairs:
            outputs = []
            for variant in (ours, other):
                cond = bench.conditioning(x, variant.subjects, variant.rule) if variant.kind == "ours" else None
                with bench.installed(variant):
                    outputs.append(bench.forward(variant, x, cond))
            text_only = Variant("text_only", "text_only", 0)
            with bench.installed(text_only):
                plain = bench.forward(text_only, x, None)
            results[f"{ours.name} vs {other.name}"] = {
                "relative_error": relative_error(outputs[0], outputs[1]),
                "image_branch_effect": relative_error(outputs[1], plain),  # how far both are from text-only
            }
    return results


def explain_graph_breaks(bench: Bench, x: dict, subjects: int) -> dict:
    """``torch._dynamo.explain`` on one of our processors and on the whole UNet (ours, official)."""
    import torch._dynamo as dynamo

    attn, processor = bench.attn_modules[0], bench.adapter.processor(bench.layer_names[0])
    cond = bench.conditioning(x, subjects, MergeRule.OFFICIAL.value)
    report = {}
    with torch.no_grad():
        # the first cross-attention layer sees the latent at its own resolution: capture its input
        captured = {}

        def grab(module, args, kwargs):
            captured.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

        hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
        variant = Variant("ours", "ours", subjects, MergeRule.OFFICIAL.value)
        try:
            with bench.installed(variant):
                bench.forward(variant, x, cond)
        finally:
            hook.remove()
        dynamo.reset()
        explanation = dynamo.explain(processor)(attn, captured["hidden"], x["text"], ip_hidden_states=cond)
        report["processor (prepared conditioning)"] = {
            "graph_breaks": explanation.graph_break_count,
            "reasons": sorted({str(reason.reason)[:160] for reason in explanation.break_reasons}),
        }
        for whole in (Variant("text_only", "text_only", 0), variant):
            dynamo.reset()
            with bench.installed(whole):
                kwargs = bench.call_kwargs(whole, x, cond)
                explanation = dynamo.explain(bench.unet)(x["sample"], x["timestep"], x["text"], **kwargs)
            report[f"unet ({whole.name})"] = {
                "graph_breaks": explanation.graph_break_count,
                "reasons": sorted({str(reason.reason)[:160] for reason in explanation.break_reasons})[:8],
            }
        dynamo.reset()
    return report


# --------------------------------------------------------------------------------------------------------
# Report


def summarise(variants: list[Variant]) -> dict:
    by_name = {variant.name: variant for variant in variants}
    text = by_name.get("text_only")
    rows = {}
    for variant in variants:
        ms = median(variant.times_ms)
        reference = by_name.get(f"ip_concat/n={variant.subjects}")
        row = {
            "kind": variant.kind,
            "subjects": variant.subjects,
            "rule": variant.rule,
            "median_ms": ms,
            "min_ms": min(variant.times_ms) if variant.times_ms else None,
            "times_ms": [round(t, 3) for t in variant.times_ms],
            "wall_ms": [round(t, 3) for t in variant.wall_ms],
            "cpu_ms": [round(t, 3) for t in variant.cpu_ms],
            "vs_ip_concat": ms / median(reference.times_ms) if reference and ms else None,
            "vs_text_only": ms / median(text.times_ms) if text and ms else None,
            "peak_gib": max(variant.peak_gib) if variant.peak_gib else None,
        }
        if row["peak_gib"] is not None and reference and reference.peak_gib:
            row["peak_vs_ip_concat"] = row["peak_gib"] / max(reference.peak_gib)
        single = by_name.get(f"ours_{variant.rule}/n={variant.subjects}") if variant.kind == "mixed" else None
        if single is not None and ms and single.times_ms:  # issue 21: mixed ÷ single adapter, same run
            row["vs_single_adapter"] = ms / median(single.times_ms)
            row["vs_single_adapter_min"] = min(variant.times_ms) / min(single.times_ms)
        rows[variant.name] = row
    return rows


def format_table(title: str, rows: dict) -> str:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    lines = [title, f"{'variant':<24}{'median ms':>12}{'min ms':>10}{'× ip_concat':>13}{'× text':>9}{'peak GiB':>10}"]
    for name, row in rows.items():
        lines.append(
            f"{name:<24}{fmt(row['median_ms'], '.1f'):>12}{fmt(row['min_ms'], '.1f'):>10}"
            f"{fmt(row['vs_ip_concat'], '.3f'):>13}{fmt(row['vs_text_only'], '.3f'):>9}{fmt(row['peak_gib'], '.2f'):>10}"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The run as Markdown (card, tables, checks) for benchmarks/RESULTS.md."""
    card_, settings = result["card"], result["settings"]
    where = card_.get("gpu") or f"{card_['cpu']} ({card_['threads']} thread(s))"
    lines = [
        f"Card: {where}; torch {card_['torch']}, diffusers {card_['diffusers']}, python {card_['python']}; "
        f"{card_['date']}.",
        f"Settings: config `{settings['config']}`, {settings['dtype']}, inference {settings['size']}² batch "
        f"{settings['batch']}, training {settings['train_size']}² batch {settings['train_batch']} with "
        f"{settings['train_subjects']} subjects; {settings['warmup']} warm-up + {settings['repeats']} timed rounds, "
        f"interleaved; timer {settings['timer']}; compile {settings['compile']}.",
        "",
    ]
    for title, rows in (("Inference step", result.get("inference", {})), ("Training step", result.get("training", {}))):
        if not rows:
            continue
        lines += [f"**{title}**", "", "| variant | median ms | min ms | × ip_concat (same n) | × text-only | peak GiB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in rows.items():
            cells = [row["median_ms"], row["min_ms"], row["vs_ip_concat"], row["vs_text_only"], row["peak_gib"]]
            specs = [".1f", ".1f", ".3f", ".3f", ".2f"]
            lines.append(f"| {name} | " + " | ".join("-" if v is None else format(v, f) for v, f in zip(cells, specs, strict=True)) + " |")
        lines.append("")
    mixed = {name: row for name, row in result.get("inference", {}).items() if "vs_single_adapter" in row}
    if mixed:
        lines.append("Mixed adapters (2 adapters, 2 subjects, 4 + 16 tokens) ÷ one adapter (2 subjects), same run: "
                     + "; ".join(f"{name} ÷ ours_{row['rule']}/n={row['subjects']} = {row['vs_single_adapter']:.3f} "
                                 f"(medians), {row['vs_single_adapter_min']:.3f} (minima)" for name, row in mixed.items())
                     + ".")
    if "generation" in result:
        gen = result["generation"]
        lines.append(f"Per-call constants ({gen['steps']} steps, {gen['subjects']} subjects, "
                     f"{gen['cross_attention_layers']} cross-attention layers): "
                     + "; ".join(f"{kind} {gen[kind]['to_k_ip']} `to_k_ip` calls and {gen[kind]['name_keys']} name-key "
                                 f"projections" for kind in ("ours", "authors", "mixed") if kind in gen) + ".")
    for label, parity in result.get("parity", {}).items():
        lines.append(f"Parity {label}: relative error {parity['relative_error']:.1e}.")
    for title, rows in (("inference", result.get("inference", {})), ("training", result.get("training", {}))):
        done = min((len(row["times_ms"]) for row in rows.values()), default=settings["repeats"])
        if done < settings["repeats"]:
            lines.append(f"The {title} step ran {done} of {settings['repeats']} timed rounds (time budget).")
    for label, report in result.get("graph_breaks", {}).items():
        if label == "error":
            lines.append(f"Graph breaks: not counted ({report}).")
        else:
            reasons = "; ".join(report["reasons"])
            lines.append(f"Graph breaks, {label}: {report['graph_breaks']}" + (f" ({reasons})" if reasons else "") + ".")
    if "graphs" in result:
        lines.append(f"Compiled graphs ({settings['compile_backend']}): {result['graphs']['compiled']} for "
                     f"{result['graphs']['variants']} variants (one per variant expected).")
    if result.get("targets"):
        lines += ["", "| the issue's target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
        for check in result["targets"]:
            value = check["value"]
            shown = f"{value:.3f}" if isinstance(value, float) else "see above" if value is not None else "-"
            verdict = {True: "yes", False: "**no**", None: "n/a"}[check["met"]]
            lines.append(f"| {check['target']} | {shown} | {check['limit']} | {verdict} |")
    return "\n".join(lines) + "\n"


def targets(inference: dict, training: dict, generation: dict | None, on_gpu: bool) -> list[dict]:
    """The issue's targets, each with the measured value (GPU targets; on CPU indicative only)."""
    checks = []

    def ratio(rows, a, b):
        if a in rows and b in rows and rows[a]["median_ms"] and rows[b]["median_ms"]:
            return rows[a]["median_ms"] / rows[b]["median_ms"]
        return None

    def add(label, value, limit):
        checks.append({"target": label, "value": value, "limit": limit,
                       "met": None if value is None else value <= limit})

    add("ours_official/n=2 ÷ ip_concat/n=2 (inference)", ratio(inference, "ours_official/n=2", "ip_concat/n=2"), 1.05)
    add("ours_official/n=2 ÷ authors/n=2 (inference)", ratio(inference, "ours_official/n=2", "authors/n=2"), 0.45)
    add("ours_official/n=8 ÷ ours_official/n=2 (inference)", ratio(inference, "ours_official/n=8", "ours_official/n=2"), 1.10)
    train_ours = next((name for name in training if name.startswith("ours_official")), None)
    train_ip = next((name for name in training if name.startswith("ip_concat")), None)
    if train_ours and train_ip:
        add(f"{train_ours} ÷ {train_ip} (training)", ratio(training, train_ours, train_ip), 1.10)
        if on_gpu:
            add(f"{train_ours} ÷ {train_ip} (training peak memory)", training[train_ours].get("peak_vs_ip_concat"), 1.05)
    for name, row in inference.items():  # issue 21 asks for the ratio; it sets no limit
        if "vs_single_adapter" in row:
            checks.append({"target": f"{name} ÷ ours_{row['rule']}/n={row['subjects']} (inference, 2 adapters)",
                           "value": row["vs_single_adapter"], "limit": "none set", "met": None})
    if generation is not None:
        ok = generation["ours"]["per_call"]
        checks.append({"target": "per-call constants computed once per generation", "value": generation["ours"],
                       "limit": "1 per layer", "met": ok})
        if "mixed" in generation:
            checks.append({"target": "per-call constants of a mix computed once per generation and adapter",
                           "value": generation["mixed"], "limit": "1 per layer and adapter",
                           "met": generation["mixed"]["per_call"]})
    return checks


# --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on GPU, fp32 on CPU")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    parser.add_argument("--size", type=int, default=None, help="image px (default 1024 sdxl, 512 mid, 64 tiny)")
    parser.add_argument("--batch", type=int, default=2, help="inference rows (2 = CFG)")
    parser.add_argument("--train-size", type=int, default=None, help="training image px (default 512; 64 tiny)")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-subjects", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--subjects", default="1,2,4,8")
    parser.add_argument("--rules", default="uniform,paper,official")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference step")
    parser.add_argument("--no-authors", action="store_true", help="skip the authors' approach")
    parser.add_argument("--no-masked", action="store_true", help="skip diffusers' IP-Adapter with masks")
    parser.add_argument("--no-mixed", action="store_true",
                        help="skip the mixed case (2 adapters, 2 subjects) and its single-adapter reference")
    parser.add_argument("--gen-steps", type=int, default=None,
                        help="steps of the per-call check (30 GPU, 3 CPU; 0 skips it)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet; report graph breaks")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (eager or aot_eager: dynamo's graphs without inductor's code generation)")
    parser.add_argument("--explain", action="store_true", help="report graph breaks (torch._dynamo.explain) only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="CPU runs: rank by wall-clock (perf_counter) or by process CPU time (process_time), "
                             "steadier on a shared machine; both are recorded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the card and tables as Markdown here")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def inference_variants(subjects: Sequence[int], rules: Sequence[str], authors: bool = True,
                       masked: bool = True, mixed: bool = True) -> list[Variant]:
    """The inference step's variants: ``text_only``, then for every ``n``: ``ip_concat``, ``ip_masked``, ours
    under every rule, the authors'; then (``mixed``) the mixed case under every rule, with the single-adapter
    ``ours_<rule>/n=2`` it is divided by when ``subjects`` lacks 2."""
    variants = [Variant("text_only", "text_only", 0)]
    for n in subjects:
        variants.append(Variant(f"ip_concat/n={n}", "ip_concat", n))
        if masked:
            variants.append(Variant(f"ip_masked/n={n}", "ip_masked", n))
        variants += [Variant(f"ours_{rule}/n={n}", "ours", n, rule) for rule in rules]
        if authors:
            variants.append(Variant(f"authors/n={n}", "authors", n, MergeRule.OFFICIAL.value))
    if mixed:
        n = MIXED_SUBJECTS
        if n not in subjects:
            variants += [Variant(f"ours_{rule}/n={n}", "ours", n, rule) for rule in rules]
        variants += [Variant(f"mixed_{rule}/n={n}", "mixed", n, rule) for rule in rules]
    return variants


def training_variants(subjects: int, authors: bool = True) -> list[Variant]:
    """The training step's variants: ``ip_concat``, ours under ``official``, the authors'."""
    variants = [Variant(f"ip_concat/n={subjects}", "ip_concat", subjects),
                Variant(f"ours_official/n={subjects}", "ours", subjects, MergeRule.OFFICIAL.value)]
    if authors:
        variants.append(Variant(f"authors/n={subjects}", "authors", subjects, MergeRule.OFFICIAL.value))
    return variants


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on the device and config (dtype, sizes, subjects, rules, --gen-steps)."""
    device = torch.device(args.device)
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    args.size = args.size or {"sdxl": 1024, "mid": 512, "tiny": 64}[args.config]
    args.train_size = args.train_size or (64 if args.config == "tiny" else 512)
    if isinstance(args.subjects, str):
        args.subjects = sorted({int(s) for s in args.subjects.split(",") if s.strip()})
    if isinstance(args.rules, str):
        args.rules = [MergeRule.parse(r.strip()).value for r in args.rules.split(",") if r.strip()]
    if args.gen_steps is None:
        args.gen_steps = 30 if device.type == "cuda" else 3
    return args


def bench_for(args: argparse.Namespace, benches: dict | None) -> Bench:
    """The run's ``Bench``: taken from ``benches`` when one of the same config, device, dtype and seed is
    there (a caller running several parts keeps one UNet), else built (and kept there)."""
    key = (args.config, args.device, args.dtype, args.seed)
    if benches is not None and key in benches:
        return benches[key]
    bench = Bench(CONFIGS[args.config], torch.device(args.device), DTYPES[args.dtype], seed=args.seed)
    if benches is not None:
        benches[key] = bench
    return bench


def static_graphs() -> contextlib.AbstractContextManager:
    """Dynamo settings under which every variant is its own static graph (other processors, other inputs):
    recompilation limits raised so none falls back to eager, shapes never made dynamic. A context, so the
    process's settings come back afterwards."""
    import torch._dynamo as dynamo

    options = {option: max(getattr(dynamo.config, option), 128)
               for option in ("recompile_limit", "cache_size_limit") if hasattr(dynamo.config, option)}
    return dynamo.config.patch(automatic_dynamic_shapes=False, **options)


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None, *, benches: dict | None = None, deadline: float | None = None) -> dict:
    """The benchmark as ``main`` runs it; returns the results (also written to ``--out``/``--markdown``).

    ``benches``: a dict the caller keeps across runs to reuse the UNet (see ``bench_for``); ``deadline`` (a
    ``time.monotonic()`` value): timed rounds stop early rather than run past it (``run_interleaved``)."""
    args = resolve(parse_args(argv))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size, train_size, subjects, rules, gen_steps = args.size, args.train_size, args.subjects, args.rules, args.gen_steps

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    log(f"building {args.config} UNet on {device} in {args.dtype} …")
    bench = bench_for(args, benches)
    dtype = bench.dtype
    log(f"  {sum(p.numel() for p in bench.unet.parameters()) / 1e6:.0f} M parameters, "
        f"{len(bench.layer_names)} cross-attention layers")
    max_n = max(subjects + [args.train_subjects, MIXED_SUBJECTS])
    x = bench.inputs(args.batch, size, max_n)
    result: dict = {
        "card": card(device),
        "settings": {"config": args.config, "dtype": str(dtype).removeprefix("torch."), "size": size,
                     "batch": args.batch, "train_size": train_size, "train_batch": args.train_batch,
                     "train_subjects": args.train_subjects, "subjects": subjects, "rules": rules,
                     "repeats": args.repeats, "warmup": args.warmup, "compile": args.compile,
                     "compile_backend": args.compile_backend if args.compile else None,
                     "timer": "cuda events" if device.type == "cuda" else
                     {"wall": "perf_counter", "cpu": "process_time"}[args.timer],
                     "threads": torch.get_num_threads()},
    }

    log("parity checks …")
    result["parity"] = parity_checks(bench, x)
    for label, values in result["parity"].items():
        log(f"  {label}: relative error {values['relative_error']:.2e} "
            f"(image branch moves the output by {values['image_branch_effect']:.2e})")

    if args.compile or args.explain:
        log("graph breaks (torch._dynamo.explain) …")
        try:
            result["graph_breaks"] = explain_graph_breaks(bench, x, min(2, max_n))
        except Exception as error:  # report, do not fail the benchmark
            result["graph_breaks"] = {"error": f"{type(error).__name__}: {error}"[:500]}
        log(json.dumps(result["graph_breaks"], indent=2, ensure_ascii=False))
        if args.explain and not args.compile:
            return _finish(result, args, log)

    unet = bench.unet
    compiling = contextlib.ExitStack()
    if args.compile:
        import torch._dynamo as dynamo

        compiling.enter_context(static_graphs())
        compiling.callback(dynamo.reset)  # drop the graphs and their guards when done
        unet = torch.compile(bench.unet, backend=args.compile_backend)
        # one warm-up round compiles every variant's graph (ours: one per rule and subject count)
        args.warmup = max(args.warmup, 1)
        result["settings"]["warmup"] = args.warmup

    result["inference"] = {}
    with compiling:
        if not args.no_inference:
            inference(args, bench, x, unet, deadline, result, log)

        result["training"] = {}
        if not args.no_train:
            n = args.train_subjects
            tx = bench.inputs(args.train_batch, train_size, n, seed=2)
            train_variants = training_variants(n, authors=not args.no_authors)
            for param in bench.adapter_params:
                param.requires_grad_(True)
            try:
                log(f"training: {len(train_variants)} variants, {train_size}² batch {args.train_batch} …")
                run_interleaved(bench, train_variants, lambda v: (lambda: bench.train_step(v, tx, unet)),
                                args.warmup, args.repeats, log, args.timer, deadline)
            finally:
                for param in bench.adapter_params:
                    param.requires_grad_(False)
                    param.grad = None
            result["training"] = summarise(train_variants)
            log(format_table(f"\ntraining step (forward + backward; {train_size}², batch {args.train_batch}, "
                             f"{result['settings']['timer']})",
                             result["training"]))
    if device.type != "cuda":
        result["memory_note"] = "peak memory is measured on CUDA only (torch.cuda.max_memory_allocated)"

    generation = None
    if gen_steps:
        log(f"\nper-call constants over a {gen_steps}-step loop with one conditioning …")
        generation = result["generation"] = generation_check(bench, x, min(2, max_n), gen_steps, not args.no_mixed)
        for kind in ("ours", "authors", *(() if args.no_mixed else ("mixed",))):
            log(f"  {kind}: to_k_ip calls {generation[kind]['to_k_ip']}, name-key projections "
                f"{generation[kind]['name_keys']} ({generation['cross_attention_layers']} layers, {gen_steps} steps)")

    result["targets"] = targets(result["inference"], result["training"], generation, device.type == "cuda")
    log("\ntargets (the issue's, set for GPU fp16 SDXL; other settings are indicative):")
    for check in result["targets"]:
        value = check["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else "see JSON" if value is not None else "-"
        verdict = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
        log(f"  {check['target']}: {shown} (limit {check['limit']}) {verdict}")
    return _finish(result, args, log)


def inference(args: argparse.Namespace, bench: Bench, x: dict, unet: nn.Module, deadline: float | None,
              result: dict, log: Callable[[str], None]) -> None:
    """Time the inference step's variants into ``result["inference"]`` (and, compiled, the graph count)."""
    size, device = args.size, bench.device
    variants = inference_variants(args.subjects, args.rules, authors=not args.no_authors, masked=not args.no_masked,
                                  mixed=not args.no_mixed)
    conds = {(v.kind, v.subjects, v.rule): bench.conditioning(x, v.subjects, v.rule) if v.kind == "ours"
             else bench.mixed_conditioning(x, v.rule) for v in variants if v.kind in ("ours", "mixed")}

    def inference_step(variant: Variant):
        cond = conds.get((variant.kind, variant.subjects, variant.rule))

        def run_step():
            with torch.no_grad():
                return bench.forward(variant, x, cond, unet)

        return run_step

    log(f"inference: {len(variants)} variants, {size}² batch {args.batch}, {args.warmup} warm-up + "
        f"{args.repeats} timed rounds …")
    graphs_before = unique_graphs() if args.compile else 0
    run_interleaved(bench, variants, inference_step, args.warmup, args.repeats, log, args.timer, deadline)
    result["inference"] = summarise(variants)
    if args.compile:  # one graph per variant: a variant that recompiles shows as more
        result["graphs"] = {"compiled": unique_graphs() - graphs_before, "variants": len(variants)}
        log(f"compiled graphs: {result['graphs']['compiled']} for {len(variants)} variants")
    log(format_table(f"\ninference step ({args.config}, {size}², batch {args.batch}, "
                     f"{result['settings']['dtype']}, {device}, {result['settings']['timer']})", result["inference"]))
    for name, row in result["inference"].items():
        if "vs_single_adapter" in row:
            log(f"  {name} ÷ ours_{row['rule']}/n={row['subjects']} (mixed ÷ single adapter): "
                f"{row['vs_single_adapter']:.3f} (medians), {row['vs_single_adapter_min']:.3f} (minima)")



def unique_graphs() -> int:
    """How many graphs dynamo has compiled so far in this process (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _finish(result: dict, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    write_outputs(result, args.out, args.markdown, markdown, log)
    return result


if __name__ == "__main__":
    sys.exit(main())
