"""Evaluation metrics as pure functions over features (docs/evaluation.md).

Features are arrays or tensors ``[n, e]``; everything is computed in float64 numpy and returned as numpy.

* CLIP-T: cosine between an image's CLIP feature and its prompt's CLIP feature. Two conventions exist and
  a table uses exactly one: ``raw`` (DreamBench, ≈0.30) and ``concept101`` (``2.5·max(cos, 0)``, ≈0.75).
* CLIP-I / DINO: mean cosine between a generated image's feature and each reference photo's feature.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLIP_T_CONVENTIONS = {
    "raw": "cos(CLIP image, CLIP prompt)",
    "concept101": "2.5 * max(cos(CLIP image, CLIP prompt), 0)",
}

__all__ = [
    "CLIP_T_CONVENTIONS",
    "clip_t",
    "clip_t_convention",
    "cosine_matrix",
    "image_alignment",
    "paired_cosine",
]


def _as_2d(features: Any, name: str) -> np.ndarray:
    if hasattr(features, "detach"):
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [n, e], got shape {array.shape}")
    return array


def _normalise(array: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(
            f"{name} has a zero feature vector at rows {np.flatnonzero(norms[:, 0] == 0).tolist()}"
        )
    return array / norms


def cosine_matrix(a: Any, b: Any) -> np.ndarray:
    """Cosine of every row of ``a`` [n, e] with every row of ``b`` [m, e] → [n, m]."""
    a2, b2 = _as_2d(a, "a"), _as_2d(b, "b")
    if a2.shape[1] != b2.shape[1]:
        raise ValueError(f"feature widths differ: a {a2.shape}, b {b2.shape}")
    return _normalise(a2, "a") @ _normalise(b2, "b").T


def paired_cosine(a: Any, b: Any) -> np.ndarray:
    """Cosine of row i of ``a`` [n, e] with row i of ``b`` [n, e] → [n]."""
    a2, b2 = _as_2d(a, "a"), _as_2d(b, "b")
    if a2.shape != b2.shape:
        raise ValueError(f"paired features must have one shape, got {a2.shape} and {b2.shape}")
    return np.sum(_normalise(a2, "a") * _normalise(b2, "b"), axis=-1)


def clip_t_convention(cosine: Any, convention: str) -> np.ndarray:
    """Apply a CLIP-T convention to raw cosines [n] → [n]: ``raw`` or ``concept101`` (2.5·max(cos, 0))."""
    values = np.asarray(cosine, dtype=np.float64)
    if convention == "raw":
        return values
    if convention == "concept101":
        return 2.5 * np.maximum(values, 0.0)
    raise ValueError(f"unknown CLIP-T convention {convention!r}; choose one of {sorted(CLIP_T_CONVENTIONS)}")


def clip_t(image_features: Any, text_features: Any, convention: str = "raw") -> np.ndarray:
    """CLIP-T of each image with its own prompt: image [n, e], text [n, e] → [n]."""
    return clip_t_convention(paired_cosine(image_features, text_features), convention)


def image_alignment(generated: Any, references: Any) -> np.ndarray:
    """CLIP-I or DINO: mean cosine of each generated image [n, e] with every reference [m, e] → [n]."""
    refs = _as_2d(references, "references")
    if refs.shape[0] == 0:
        raise ValueError("image_alignment needs at least one reference feature")
    return cosine_matrix(generated, refs).mean(axis=1)
