"""Text conditioning for SD1.5 (one CLIP text encoder) and SDXL (two, concatenated).

Prompt embeddings follow diffusers' pipelines: SD1.5 takes the last hidden state, SDXL the penultimate
hidden states of both encoders side by side plus the second encoder's pooled projection. Subject names
are encoded on their own the same way and the rows of their name tokens kept (rows 1..m after the
start token); the text encoders are causal, so those rows do not depend on the padding after them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TextConditioner:
    """Frozen text encoders of one pipeline. arch: ``sdxl`` or ``sd15``."""

    def __init__(self, encoders: Sequence[nn.Module], arch: str) -> None:
        if arch not in ("sdxl", "sd15"):
            raise ValueError(f"arch must be 'sdxl' or 'sd15', got {arch!r}")
        expected = 2 if arch == "sdxl" else 1
        if len(encoders) != expected:
            raise ValueError(f"{arch} takes {expected} text encoders, got {len(encoders)}")
        self.encoders = list(encoders)
        self.arch = arch

    def _hidden(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids per encoder [k, L] → (hidden [k, L, c], pooled [k, d] or None)."""
        if self.arch == "sd15":
            (encoder,), (tokens,) = self.encoders, ids
            return encoder(tokens.to(encoder.device))[0], None
        states, pooled = [], None
        for encoder, tokens in zip(self.encoders, ids, strict=True):
            output = encoder(tokens.to(encoder.device), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected pooled output (text_embeds)
        return torch.cat(states, dim=-1), pooled

    @torch.no_grad()
    def encode_prompts(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt token ids per tokenizer [B, L] → (prompt embeds [B, L, c], pooled [B, d] or None)."""
        return self._hidden(ids)

    @torch.no_grad()
    def encode_names(self, ids: Sequence[torch.Tensor], name_mask: torch.Tensor) -> torch.Tensor:
        """Name token ids per tokenizer [B·n, L] and name_mask [B, n, m] → name rows [B, n, m, c]."""
        b, n, m = name_mask.shape
        hidden, _ = self._hidden(ids)  # [B·n, L, c]
        rows = hidden[:, 1 : 1 + m]  # [B·n, m, c]
        if rows.shape[1] < m:
            raise ValueError(f"names are encoded with {hidden.shape[1]} tokens, fewer than 1 + m = {1 + m}")
        return rows.reshape(b, n, m, -1)
