"""The paper's object quality score (docs/method.md#selecting-training-data-the-object-quality-score), as pure tensor functions.

For an image with objects O, CLIP text embeddings g_text(o) of the object names and CLIP image
embeddings g_img(o) of the object crops:

    S_single  = mean_o cos(g_text(o), g_img(o))
    S_pair    = -mean_{o' != o''} cos(g_img(o'), g_img(o''))      (ordered pairs: |O|(|O|-1) terms)
    S_quality = S_single + S_pair                                  (multi-subject)
    S_quality = S_single                                           (single-subject: S_pair dropped)

S_pair has no pair to average over when |O| < 2: it is NaN there (undefined, not 0), and so is a
multi-subject S_quality. Callers drop such images from a multi-subject ranking, or score them in
single-subject mode. S_single of an image with no objects is NaN too.

Notation: `...` any batch dims (images), `n` objects (padded), `e` embedding width. A boolean
`mask [..., n]` marks the real objects of padded batches; omitted, all `n` are real.
Inputs are not assumed normalised. Sums run in at least float32: fp16 CLIP features summed in fp16
lose digits that decide rankings.
"""

from __future__ import annotations

import torch


def _working(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last dim; [..., e] -> [..., e]."""
    return torch.nn.functional.normalize(_working(x), dim=-1)


def _mask(embeddings: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The object mask [..., n] (all True when None), checked against embeddings [..., n, e]."""
    if mask is None:
        return torch.ones(embeddings.shape[:-1], dtype=torch.bool, device=embeddings.device)
    if mask.shape != embeddings.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal embeddings shape without the last dim {tuple(embeddings.shape[:-1])}"
        )
    return mask.to(torch.bool)


def object_similarity(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """cos(g_text(o), g_img(o)) of each object: text, image [..., n, e] -> [..., n]."""
    if text.shape != image.shape:
        raise ValueError(
            f"text embeddings {tuple(text.shape)} and image embeddings {tuple(image.shape)} must match"
        )
    return (_unit(text) * _unit(image)).sum(-1)


def pairwise_cosine(image: torch.Tensor) -> torch.Tensor:
    """cos(g_img(o'), g_img(o'')) for all pairs: [..., n, e] -> [..., n, n]."""
    unit = _unit(image)
    return unit @ unit.transpose(-1, -2)


def s_single(text: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean text-image cosine over the objects: [..., n, e] x2 (+ mask [..., n]) -> [...]; NaN with no object."""
    valid = _mask(image, mask)
    similarity = object_similarity(text, image)  # [..., n]
    count = valid.sum(-1)
    total = torch.where(valid, similarity, torch.zeros_like(similarity)).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def s_pair(image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Minus the mean image-image cosine over ordered pairs of distinct objects: [..., n, e] -> [...].

    NaN where fewer than 2 objects are marked.
    """
    valid = _mask(image, mask)
    cosine = pairwise_cosine(image)  # [..., n, n]
    n = image.shape[-2]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=image.device)
    pairs = valid[..., :, None] & valid[..., None, :] & off_diagonal  # [..., n, n]
    count = pairs.sum((-1, -2))  # k(k-1) for k valid objects
    total = torch.where(pairs, cosine, torch.zeros_like(cosine)).sum((-1, -2))
    return torch.where(count > 0, -total / count.clamp(min=1), torch.full_like(total, float("nan")))


def s_quality(
    text: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None = None, *, pair: bool = True
) -> torch.Tensor:
    """S_single + S_pair ([..., n, e] x2 -> [...]); with `pair=False` (single-subject) S_single alone."""
    single = s_single(text, image, mask)
    return single + s_pair(image, mask) if pair else single
