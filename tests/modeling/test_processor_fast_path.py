"""The processor's fast path: the name-mask check runs once per call, and ``torch.compile`` sees one graph
without breaks once the per-call constants are prepared."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from mipadapter.modeling import MIPAttnProcessor, SubjectConditioning

HIDDEN, HEADS, CROSS, BATCH, LATENT = 16, 2, 12, 2, (4, 4)


def layer():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        attn = Attention(query_dim=HIDDEN, cross_attention_dim=CROSS, heads=HEADS, dim_head=HIDDEN // HEADS)
        proc = MIPAttnProcessor(HIDDEN, CROSS, text_weight=True, layer_name="layer")
    attn.eval().set_processor(proc)
    return attn, proc


def conditioning(name_mask: torch.Tensor, rule: str = "official") -> SubjectConditioning:
    g = torch.Generator().manual_seed(1)
    n = name_mask.shape[1]
    return SubjectConditioning(
        image_tokens=torch.randn(BATCH, n, 4, CROSS, generator=g),
        owner=torch.arange(n),
        share=torch.ones(n),
        scales=torch.ones(BATCH, n),
        name_embeds=torch.randn(BATCH, n, name_mask.shape[2], CROSS, generator=g),
        name_mask=name_mask,
        rule=rule,
        use_text_weight=True,
        latent_size=LATENT,
    )


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, LATENT[0] * LATENT[1], HIDDEN, generator=g), torch.randn(BATCH, 5, CROSS, generator=g)


@pytest.mark.parametrize("grad", [False, True])
def test_a_subject_without_name_tokens_is_an_error_not_nan(grad):
    attn, _ = layer()
    mask = torch.ones(BATCH, 2, 3, dtype=torch.bool)
    mask[1, 1] = False  # row 1, subject 1: no name token
    hidden, text = inputs()
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="name token"):
        attn(hidden, text, ip_hidden_states=conditioning(mask))


@pytest.mark.parametrize("rule", ["uniform", "paper", "official"])
def test_no_graph_break_once_the_conditioning_is_prepared(rule):
    import torch._dynamo as dynamo

    attn, proc = layer()
    cond = conditioning(torch.ones(BATCH, 3, 2, dtype=torch.bool), rule)
    hidden, text = inputs()
    with torch.no_grad():
        cond.layer_inputs[proc.layer_name] = proc.prepare(attn, cond)
        eager = attn(hidden, text, ip_hidden_states=cond)
        dynamo.reset()
        try:
            explanation = dynamo.explain(proc)(attn, hidden, text, ip_hidden_states=cond)
        finally:
            dynamo.reset()
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]
    assert explanation.graph_count == 1
    with torch.no_grad():
        torch.testing.assert_close(attn(hidden, text, ip_hidden_states=cond), eager)
