"""Per-call inputs of the processors, passed through ``cross_attention_kwargs`` (never set on modules).

The UNet hands ``cross_attention_kwargs`` to every attention layer. The conditioning travels under the
key ``ip_hidden_states``, which diffusers' self-attention processors drop silently, so only our
cross-attention processors see it.
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
    height, width = latent_size
    while height * width > positions and height * width > 1:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    if height * width != positions:
        raise ValueError(f"a layer with {positions} positions does not fit a latent of {latent_size}")
    return height, width


class RelevanceRecorder:
    """Accumulates each subject's routing map over layers and steps, at the latent resolution.

    Only the last ``keep_last`` batch rows are recorded (the conditional half under CFG).
    """

    def __init__(self, latent_size: tuple[int, int], keep_last: int) -> None:
        self.latent_size = latent_size
        self.keep_last = keep_last
        self.sums: dict[tuple[int, int], torch.Tensor] = {}  # grid → [k, n, H, W] summed maps
        self.counts: dict[tuple[int, int], int] = {}

    def add(self, relevance: torch.Tensor, grid: tuple[int, int]) -> None:
        """relevance [b, n, p] for a layer on ``grid`` (h·w = p)."""
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
            raise RuntimeError("no relevance maps were recorded")
        total = sum(self.sums.values())
        maps = total / sum(self.counts.values())
        return maps / maps.flatten(2).amax(dim=-1)[..., None, None].clamp_min(1e-12)


@dataclass
class SubjectConditioning:
    """Everything a cross-attention layer needs about the subjects for one generation call.

    Attributes (b: batch rows of the UNet call, CFG halves included; n subjects; N conditions):
        image_tokens [b, N, t, c_kv]: projected image tokens of each condition (photo or photo mean).
        owner [N] (long): the subject each condition belongs to.
        share [N]: the condition's share of its subject (1/k for k photos routed separately, else 1).
        scales [b, n]: the image scale ``s_i`` of each subject, on every row (the unconditional rows of
            CFG carry the same scales with zero-image tokens, as IP-Adapter does).
        name_embeds [b, n, m, c_kv]: text-encoder rows of each subject's name tokens (padded to m).
        name_mask [b, n, m] (bool): which rows of ``name_embeds`` are real name tokens.
        rule: the merge rule; use_text_weight: whether a trained ``text_to_weight`` gates the merge.
        latent_size (H, W): the UNet input's spatial size, to place each layer's positions on a grid.
        regions [b, n, H, W] or None: user masks at latent resolution; has_region [n] (bool).
        region_mode: how regions act on relevance.
        present [b, n] (bool) or None: False marks a padding subject (batches of uneven subject counts);
            its routing weight is zero under every rule, so a padded row computes what the unpadded one
            would.
        recorder: collects routing maps when the caller asked for them.
        text_perturbation: optional ``f(Z_text [b, h, p, d], relevance [b, n, p]) -> Z_text`` applied
            before the merge (the relevance experiment perturbs the text branch with it).
    """

    image_tokens: torch.Tensor
    owner: torch.Tensor
    share: torch.Tensor
    scales: torch.Tensor
    name_embeds: torch.Tensor
    name_mask: torch.Tensor
    rule: MergeRule
    use_text_weight: bool
    latent_size: tuple[int, int]
    regions: torch.Tensor | None = None
    has_region: torch.Tensor | None = None
    region_mode: RegionMode = RegionMode.REPLACE
    present: torch.Tensor | None = None
    recorder: RelevanceRecorder | None = None
    text_perturbation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    _memo: dict = field(default_factory=dict, repr=False)

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
        if self.regions is not None:
            expected["regions"] = (tuple(self.regions.shape), (b, n, *self.latent_size))
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

    @property
    def batch_size(self) -> int:
        return self.image_tokens.shape[0]

    @property
    def needs_relevance(self) -> bool:
        return (
            self.rule != MergeRule.UNIFORM or self.recorder is not None or self.text_perturbation is not None
        )

    def memo(self, key: object, compute: Callable[[], object]) -> object:
        """Per-call constants (keys of names and image tokens) computed once per layer, not per step.

        Only under ``torch.no_grad``: in training the adapter weights change between calls and need
        their graph every step.
        """
        if torch.is_grad_enabled():
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def regions_on(self, grid: tuple[int, int]) -> torch.Tensor:
        """User regions resized to a layer grid: [b, n, h·w] (computed once per grid)."""
        assert self.regions is not None
        return self.memo(("regions", grid), lambda: ops.resize_regions(self.regions, grid))
