"""Per-call inputs of the processors, passed through ``cross_attention_kwargs`` (never set on modules).

The UNet hands ``cross_attention_kwargs`` to every attention layer. The conditioning travels under the
key ``ip_hidden_states``, which diffusers' self-attention processors drop silently, so only our
cross-attention processors see it.

A call's conditioning is built once (``SubjectConditioning``), then prepared once for every layer
(``MIPAdapter.prepare``: image keys and values, name keys, the relevance weight matrix — the
``LayerInputs``), so the processors compute only what depends on the latents. Nothing is memoised
during the denoising loop: each step reads the same tensors, which also keeps a compiled UNet on
one graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mipadapter import ops
from mipadapter.config import MergeRule, RegionMode

CROSS_ATTENTION_KWARG = "ip_hidden_states"


def layer_grid(latent_size: tuple[int, int], positions: int) -> tuple[int, int]:
    """The (h, w) grid of a UNet layer with ``positions`` cells, for a latent of ``latent_size``.

    Each UNet downsampling halves the grid rounding up (stride-2 convolutions with padding 1), so odd and
    non-square latents are handled exactly.
    """
    for grid in layer_grids(latent_size):
        if grid[0] * grid[1] == positions:
            return grid
    raise ValueError(f"a layer with {positions} positions does not fit a latent of {tuple(latent_size)}")


def layer_grids(latent_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Every grid a UNet layer can run at for a latent of ``latent_size``: it, then halvings down to 1×1."""
    height, width = latent_size
    grids = [(height, width)]
    while height * width > 1:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
        grids.append((height, width))
    return grids


class RelevanceRecorder:
    """Accumulates each subject's map over layers and steps, at the latent resolution.

    Only the last ``keep_last`` batch rows are recorded (the conditional half under CFG). The latent
    size is set when the UNet's input is known (``SubjectConditioning.set_latent_size``).
    """

    def __init__(self, latent_size: tuple[int, int] | None, keep_last: int) -> None:
        self.latent_size = None if latent_size is None else tuple(latent_size)
        self.keep_last = keep_last
        self.sums: dict[tuple[int, int], torch.Tensor] = {}  # grid → [k, n, H, W] summed maps
        self.counts: dict[tuple[int, int], int] = {}

    def add(self, relevance: torch.Tensor, grid: tuple[int, int]) -> None:
        """relevance [b, n, p] for a layer on ``grid`` (h·w = p)."""
        if self.latent_size is None:
            raise RuntimeError("the recorder's latent size is not known yet")
        maps = relevance[-self.keep_last :].detach().float()
        maps = maps / maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)  # each layer's map on [0, 1]
        maps = maps.reshape(*maps.shape[:2], *grid)
        maps = torch.nn.functional.interpolate(
            maps, size=self.latent_size, mode="bilinear", align_corners=False
        )
        self.sums[grid] = self.sums[grid] + maps if grid in self.sums else maps
        self.counts[grid] = self.counts.get(grid, 0) + 1

    def by_resolution(self) -> dict[tuple[int, int], torch.Tensor]:
        """Mean map per layer resolution: grid → [k, n, H, W]."""
        return {grid: total / self.counts[grid] for grid, total in self.sums.items()}

    def average(self) -> torch.Tensor:
        """Mean over every recorded layer and step: [k, n, H, W] (each map scaled to max 1)."""
        if not self.sums:
            raise RuntimeError("no maps were recorded")
        total = sum(self.sums.values())
        maps = total / sum(self.counts.values())
        return maps / maps.flatten(2).amax(dim=-1)[..., None, None].clamp_min(1e-12)


class ShareMeter:
    """How much of the image each condition is routed, summed over the layers that report it.

    ``add`` takes a layer's shares ``A_j / Σ_k A_k`` [b, p, N] and accumulates their mean over positions
    into a tensor allocated up front (no Python state changes per step, so a compiled UNet keeps one
    graph). ``shares()`` normalises the sums so that each row's subjects sum to 1.
    """

    def __init__(self, batch: int, num_conditions: int, device: torch.device) -> None:
        self.sums = torch.zeros(batch, num_conditions, device=device)

    def add(self, shares: torch.Tensor) -> None:
        self.sums.add_(shares.mean(dim=1).to(self.sums.dtype))

    def shares(self, first_condition: torch.Tensor) -> torch.Tensor:
        """[b, n]: each subject's mean share of the image (its first condition's column)."""
        per_subject = self.sums.index_select(1, first_condition)
        return per_subject / per_subject.sum(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class LayerInputs:
    """A layer's per-call constants, computed once per call by its processor's ``prepare``.

    ip_keys, ip_values [b, h, t·N, d] (token-major): keys scaled by ``1/sqrt(d)``; values scaled by each
    condition's image scale, share of its subject and presence. name_keys [b, h, n·m, d] scaled by
    ``1/sqrt(d)`` and name_weights [b, h·n·m, N+1] (``ops.relevance_weights``), when relevance is needed.
    image_weights [b, h·t·N, n]: averages the image tokens' softmaxes over positions per subject, when
    image-attention maps are recorded. key_bias [t·N]: ``-inf`` on the padding rows of a call mixing
    adapters of different token counts, else None. gate_weight [K, c]: the text weights of the call's K
    adapters stacked (the trained ``text_to_weight`` itself when K = 1), when the call gates with them;
    gate_columns [N] (long): each condition's adapter among the K, when K > 1.
    """

    ip_keys: torch.Tensor
    ip_values: torch.Tensor
    name_keys: torch.Tensor | None = None
    name_weights: torch.Tensor | None = None
    image_weights: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    gate_weight: torch.Tensor | None = None
    gate_columns: torch.Tensor | None = None


@dataclass
class SubjectConditioning:
    """Everything a cross-attention layer needs about the subjects for one generation call.

    Attributes (b: batch rows of the UNet call, CFG halves included; n subjects; N conditions):
        image_tokens [b, N, t, c_kv]: projected image tokens of each condition (photo or photo mean).
        owner [N] (long): the subject each condition belongs to.
        share [N]: the condition's share of its subject (1/k for k photos routed separately, else 1).
        scales [b, n]: the image scale ``s_i`` of each subject, on every row (the unconditional rows of
            CFG carry the same scales with unconditional image tokens, as IP-Adapter does).
        name_embeds [b, n, m, c_kv]: text-encoder rows of each subject's name tokens (padded to m).
        name_mask [b, n, m] (bool): which rows of ``name_embeds`` are real name tokens.
        rule: the merge rule; use_text_weight: whether a trained ``text_to_weight`` gates the merge.
        latent_size (H, W): the UNet input's spatial size, to place each layer's positions on a grid;
            None until known (the pipeline sets it from the latents the UNet receives).
        regions [b, n, H, W] or None: user masks at latent resolution; has_region [n] (bool).
        region_mode: how regions act on relevance.
        present [b, n] (bool) or None: False marks a padding subject (batches of uneven subject counts);
            its routing weight is zero under every rule, so a padded row computes what the unpadded one
            would.
        recorder: collects each subject's relevance map when the caller asked for them.
        image_attention: collects each subject's image-attention map (where its image tokens attend).
        share_meter: collects each condition's routed share (for the starved-subject diagnostic).
        text_perturbation: optional ``f(Z_text [b, h, p, d], relevance [b, n, p]) -> Z_text`` applied
            before the merge (the relevance experiment perturbs the text branch with it).
        layer_scales: layer name → [b, n] image scales of that layer, replacing ``scales`` there (per-layer
            scales, diffusers' ``set_ip_adapter_scale`` list and dict forms), or None.
        adapter_of [N] (long) or None: in a call mixing adapters, which of the call's adapters each
            condition's image tokens come from (an index into ``token_counts``); None: one adapter.
        token_counts: with ``adapter_of``, the number of image tokens of each adapter (basic 4, Plus 16):
            ``image_tokens`` holds ``t = max(token_counts)`` per condition, the rest zero padding.
        sources: the adapters whose projections made ``image_tokens``, in ``adapter_groups`` order, as the
            pipeline records them; ``MIPAdapter.prepare`` takes its image keys and values from them. Empty:
            the preparing adapter's own (a conditioning built by hand, or by the training step).
        layer_inputs: layer name → ``LayerInputs``, filled by ``MIPAdapter.prepare``.
    """

    image_tokens: torch.Tensor
    owner: torch.Tensor
    share: torch.Tensor
    scales: torch.Tensor
    name_embeds: torch.Tensor
    name_mask: torch.Tensor
    rule: MergeRule
    use_text_weight: bool
    latent_size: tuple[int, int] | None = None
    regions: torch.Tensor | None = None
    has_region: torch.Tensor | None = None
    region_mode: RegionMode = RegionMode.REPLACE
    present: torch.Tensor | None = None
    recorder: RelevanceRecorder | None = None
    image_attention: RelevanceRecorder | None = None
    share_meter: ShareMeter | None = None
    text_perturbation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    layer_scales: dict[str, torch.Tensor] | None = None
    adapter_of: torch.Tensor | None = None
    token_counts: tuple[int, ...] | None = None
    sources: tuple[torch.nn.Module, ...] = field(default=(), repr=False, compare=False)
    layer_inputs: dict[str, LayerInputs] = field(default_factory=dict, repr=False)
    _grids: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)
    _regions: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _condition_has_region: torch.Tensor | None = field(default=None, repr=False)
    _first_condition: torch.Tensor | None = field(default=None, repr=False)
    _first_of_subject: torch.Tensor | None = field(default=None, repr=False)
    _adapter_groups: list[tuple[torch.Tensor, int]] = field(default_factory=list, repr=False)
    _key_bias: torch.Tensor | None = field(default=None, repr=False)
    _token_mask: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.rule = MergeRule.parse(self.rule)
        self.region_mode = RegionMode(self.region_mode)
        b, num_cond = self.image_tokens.shape[:2]
        n = self.scales.shape[1]
        expected = {
            "owner": (tuple(self.owner.shape), (num_cond,)),
            "share": (tuple(self.share.shape), (num_cond,)),
            "scales": (tuple(self.scales.shape), (b, n)),
            "name_embeds": (tuple(self.name_embeds.shape[:2]), (b, n)),
            "name_mask": (tuple(self.name_mask.shape), tuple(self.name_embeds.shape[:3])),
        }
        if self.present is not None:
            expected["present"] = (tuple(self.present.shape), (b, n))
        for name, layer_scales in (self.layer_scales or {}).items():
            expected[f"layer_scales[{name!r}]"] = (tuple(layer_scales.shape), (b, n))
        if self.regions is not None:
            expected["regions"] = (tuple(self.regions.shape[:2]), (b, n))
            expected["has_region"] = (tuple(self.has_region.shape), (n,))
        bad = {name: shapes for name, shapes in expected.items() if shapes[0] != shapes[1]}
        if bad:
            detail = "; ".join(
                f"{name} has shape {got}, expected {want}" for name, (got, want) in bad.items()
            )
            raise ValueError(f"inconsistent subject conditioning: {detail}")
        ops.check_name_mask(self.name_mask)  # once per call here, not per layer and step (a host sync)
        if int(self.owner.max()) >= n or int(self.owner.min()) < 0:
            raise ValueError(f"owner indices {self.owner.tolist()} must lie in [0, {n})")
        order = torch.arange(num_cond, device=self.owner.device)
        first = torch.full((n,), num_cond, device=self.owner.device)
        self._first_condition = first.scatter_reduce(0, self.owner, order, reduce="amin")  # [n]
        self._first_of_subject = torch.zeros(num_cond, device=self.owner.device)
        self._first_of_subject[self._first_condition] = 1.0  # [N]: 1 on each subject's first condition
        if self.has_region is not None:
            self._condition_has_region = self.has_region.index_select(0, self.owner)  # [N]
        self._check_adapters()
        if self.latent_size is not None:
            self.set_latent_size(self.latent_size)

    def _check_adapters(self) -> None:
        """Check ``adapter_of`` / ``token_counts`` and fold them, once per call, into each adapter's
        conditions, the token mask and the key bias."""
        if (self.adapter_of is None) != (self.token_counts is None):
            raise ValueError("inconsistent subject conditioning: give adapter_of and token_counts together")
        if self.adapter_of is None:
            return
        num_cond, tokens = self.image_tokens.shape[1:3]
        counts = tuple(int(count) for count in self.token_counts)
        if tuple(self.adapter_of.shape) != (num_cond,):
            raise ValueError(
                f"inconsistent subject conditioning: adapter_of has shape {tuple(self.adapter_of.shape)}, "
                f"expected {(num_cond,)}"
            )
        if not counts or max(counts) != tokens or min(counts) < 1:
            raise ValueError(
                f"token_counts {counts} must be ≥ 1 each, the largest equal to the {tokens} image tokens per "
                "condition"
            )
        used = self.adapter_of.tolist()
        if min(used) < 0 or max(used) >= len(counts):
            raise ValueError(f"adapter_of {used} must lie in [0, {len(counts)})")
        device = self.adapter_of.device
        self._adapter_groups = [
            (torch.tensor([j for j, a in enumerate(used) if a == adapter], device=device), count)
            for adapter, count in enumerate(counts)
        ]
        real = torch.tensor(counts, device=device).index_select(0, self.adapter_of)  # [N]
        self._token_mask = torch.arange(tokens, device=device)[None, :] < real[:, None]  # [N, t]
        padding = torch.full((tokens, num_cond), -math.inf, device=device)
        self._key_bias = padding.masked_fill(self._token_mask.T, 0.0).reshape(-1)  # [t·N], token-major
        if min(counts[a] for a in set(used)) == tokens:  # the call's adapters all have t tokens
            self._key_bias = None

    # ------------------------------------------------------------------ adapters
    @property
    def num_adapters(self) -> int:
        """How many adapters' image tokens the call mixes (1 without ``adapter_of``)."""
        return 1 if self.token_counts is None else len(self.token_counts)

    @property
    def adapter_groups(self) -> list[tuple[torch.Tensor, int]]:
        """Per adapter of the call: (its conditions [N_a] (long), its token count); [] for one adapter."""
        return self._adapter_groups

    @property
    def key_bias(self) -> torch.Tensor | None:
        """[t·N] token-major: ``-inf`` on padding tokens, 0 on real ones; None when nothing is padded."""
        return self._key_bias

    @property
    def token_mask(self) -> torch.Tensor | None:
        """[N, t] (bool): which of each condition's image tokens are real; None for one adapter."""
        return self._token_mask

    # ------------------------------------------------------------------ shapes
    @property
    def batch_size(self) -> int:
        return self.image_tokens.shape[0]

    @property
    def num_subjects(self) -> int:
        return self.scales.shape[1]

    def scales_at(self, layer_name: str) -> torch.Tensor:
        """[b, n]: the subjects' image scales on one layer (``layer_scales`` there, else ``scales``)."""
        if self.layer_scales is None:
            return self.scales
        return self.layer_scales.get(layer_name, self.scales)

    @property
    def num_conditions(self) -> int:
        return self.image_tokens.shape[1]

    @property
    def first_condition(self) -> torch.Tensor:
        """[n] (long): the first condition of each subject (conditions of one subject share its map)."""
        return self._first_condition

    @property
    def first_of_subject(self) -> torch.Tensor:
        """[N]: 1.0 on the first condition of each subject, 0.0 on the others."""
        return self._first_of_subject

    @property
    def needs_relevance(self) -> bool:
        return (
            self.rule != MergeRule.UNIFORM
            or self.recorder is not None
            or self.text_perturbation is not None
            or self.share_meter is not None
        )

    # ------------------------------------------------------------------ the latent grid
    def set_latent_size(self, latent_size: tuple[int, int], regions: torch.Tensor | None = None) -> None:
        """Place the layers' positions on grids of a latent of ``latent_size`` (H, W), and bring the
        user regions ([b, n, H, W] at that size; the current ones when None) to every grid once."""
        latent_size = (int(latent_size[0]), int(latent_size[1]))
        if regions is not None:
            self.regions = regions
        if self.regions is not None and tuple(self.regions.shape) != (
            self.batch_size,
            self.num_subjects,
            *latent_size,
        ):
            raise ValueError(
                f"inconsistent subject conditioning: regions has shape {tuple(self.regions.shape)}, "
                f"expected {(self.batch_size, self.num_subjects, *latent_size)}"
            )
        self.latent_size = latent_size
        self._grids = {h * w: (h, w) for h, w in reversed(layer_grids(latent_size))}
        self._regions = {}
        if self.regions is not None:
            present = None if self.present is None else self.present.to(self.regions.dtype).unsqueeze(-1)
            for positions, grid in self._grids.items():
                resized = ops.resize_regions(self.regions, grid)  # [b, n, p]
                if present is not None:
                    resized = resized * present
                per_condition = resized.index_select(1, self.owner)  # [b, N, p]
                self._regions[positions] = per_condition.transpose(1, 2).contiguous()  # [b, p, N]
        for recorder in (self.recorder, self.image_attention):
            if recorder is not None:
                recorder.latent_size = latent_size

    def grid(self, positions: int) -> tuple[int, int]:
        """The (h, w) grid of a layer with ``positions`` cells."""
        if self.latent_size is None:
            raise ValueError(
                "the conditioning does not know the latent size yet (set latent_size, or run it through "
                "MIPAdapterPipeline, which takes it from the latents)"
            )
        if positions not in self._grids:
            raise ValueError(f"a layer with {positions} positions does not fit a latent of {self.latent_size}")
        return self._grids[positions]

    def regions_at(self, positions: int) -> torch.Tensor:
        """User regions on a layer's grid, one column per condition: [b, p, N]."""
        self.grid(positions)
        return self._regions[positions]

    @property
    def has_region_per_condition(self) -> torch.Tensor:
        """[N] (bool): whether each condition's subject has a region."""
        return self._condition_has_region
