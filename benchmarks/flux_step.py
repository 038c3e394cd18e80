"""Speed of one FLUX transformer step with several reference images: diffusers' FLUX IP-Adapter, and ours.

Builds a ``FluxTransformer2DModel`` from a config written here (``flux1``: FLUX.1-dev's; ``mid``: FLUX's
structure scaled down for CPU developer runs; ``tiny`` for CI) with random weights, on the chosen device and
dtype, and times one forward step (``no_grad``), interleaved (every variant once per round, round-robin),
with CUDA events on GPU and ``perf_counter`` (and process CPU time) on CPU:

* ``text_only``: ``FluxAttnProcessor`` everywhere, no image term;
* ``ip_concat/n``: diffusers' ``FluxIPAdapterAttnProcessor`` with ONE IP-Adapter given ``n`` images: their
  tokens concatenated, one softmax over ``n·T`` tokens (what ``pipe(ip_adapter_image=[[img1, img2]])`` does
  after one ``load_ip_adapter``);
* ``ip_multi/n``: the same processor with ``n`` IP-Adapters (the same file loaded ``n`` times), one image
  each: ``Σ_k s_k·Attn_k``, which is our ``uniform`` rule (docs/flux.md);
* ``ours_<rule>/n``: ``MIPAdapter`` of the FLUX architecture (``MIPFluxAttnProcessor`` in every double-stream
  block, installed by ``attach``), one ``SubjectConditioning`` of ``n`` subjects prepared once
  (``MIPAdapter.prepare``, as a pipeline call does before its steps) and passed as
  ``joint_attention_kwargs["ip_hidden_states"]``; random name rows stand in for the T5 encodings of the names.

Image tokens are given already projected (``[b, n, T, J]``; diffusers' through an identity
``encoder_hid_proj``), so the step times the transformer alone; every IP variant, ours included, uses the same
``to_k_ip``/``to_v_ip`` pair per block (the adapter's own, lent to diffusers' processors).

Before timing it checks that ``ip_multi/n=1`` equals ``ip_concat/n=1``, that ``ours_uniform/n`` equals
``ip_multi/n`` for every ``n`` (relative errors printed), and that the image term moves the output. Prints, for
every variant, the ratio to ``ip_concat`` and ``ip_multi`` with the same number of images and to
``text_only``, all measured in the same run, and issue 11's targets: ours with 2 subjects ≤ 1.05 ×
``ip_concat/n=2`` (the baseline: diffusers' FLUX IP-Adapter loaded once and given the 2 references, the
way it is used with one adapter file; see ``TARGET_BASELINE``), and ours with 8 ≤ 1.10 × ours with 2. Writes everything to
``--out`` as JSON (``--markdown`` for ``benchmarks/RESULTS.md``).

    python benchmarks/flux_step.py --device cuda --dtype bf16 --config flux1 --size 1024 --out flux1.json
    python benchmarks/flux_step.py --config mid --threads 1 --timer cpu --repeats 3 --warmup 1 --out mid.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import diffusers
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, beside this script
from harness import Variant, card, median, relative_error, run_interleaved, timed_ms, write_outputs  # noqa: E402

from mipadapter.config import AdapterConfig
from mipadapter.modeling import MIPAdapter, SubjectConditioning
from mipadapter.modeling.conditioning import CROSS_ATTENTION_KWARG
from mipadapter.testing.flux import TINY_FLUX

IMAGE_TOKENS = 16  # per image: XLabs' v2 file (v1: 4)
IMAGE_EMBED_DIM = 768  # CLIP ViT-L/14's projected embedding (the projection is not timed: tokens come projected)
NAME_TOKENS = 3  # T5 rows per name (names of 1, 2 and 3 tokens take turns)

# FLUX.1-dev (black-forest-labs/FLUX.1-dev/transformer/config.json = diffusers' defaults + guidance embedding)
FLUX1 = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# FLUX's structure with fewer and narrower blocks: head dim 128 and RoPE axes kept, double : single = 1 : 2,
# text width above the inner width as in FLUX.1 (4096 vs 3072), so attention and the image term keep roughly
# FLUX's proportions per block.
MID = {**FLUX1, "num_layers": 3, "num_single_layers": 6, "num_attention_heads": 4, "joint_attention_dim": 768,
       "pooled_projection_dim": 256}
# The tiny FLUX of the tests (mipadapter.testing.flux.TINY_FLUX).
TINY = {**FLUX1, "in_channels": TINY_FLUX.in_channels, "num_layers": TINY_FLUX.num_layers,
        "num_single_layers": TINY_FLUX.num_single_layers, "attention_head_dim": TINY_FLUX.attention_head_dim,
        "num_attention_heads": TINY_FLUX.num_attention_heads, "joint_attention_dim": TINY_FLUX.joint_attention_dim,
        "pooled_projection_dim": TINY_FLUX.pooled_projection_dim, "axes_dims_rope": TINY_FLUX.axes_dims_rope}
CONFIGS = {"flux1": FLUX1, "mid": MID, "tiny": TINY}
DEFAULT_SIZE = {"flux1": 1024, "mid": 512, "tiny": 64}
DEFAULT_TEXT_TOKENS = {"flux1": 512, "mid": 512, "tiny": 16}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RULES = ("uniform", "paper")  # official needs a trained text weight; XLabs' FLUX adapters have none


class Bench:
    """One transformer, the processor sets of every variant, and the inputs of one step."""

    def __init__(self, config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        torch.manual_seed(seed)
        with torch.device(device):  # random init on the device: FLUX.1's 12 B parameters init fast on a GPU
            transformer = FluxTransformer2DModel(**config)
        if dtype != torch.float32:
            verbosity = diffusers.utils.logging.get_verbosity()
            diffusers.utils.logging.set_verbosity_error()
            transformer = transformer.to(dtype=dtype)
            diffusers.utils.logging.set_verbosity(verbosity)
        self.transformer = transformer.eval().requires_grad_(False)
        self.base = {name: FluxAttnProcessor() for name in self.transformer.attn_processors}
        self.transformer.set_attn_processor(dict(self.base))
        self.double_names = [name for name in self.base if name.startswith("transformer_blocks.")]
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        cross = config["joint_attention_dim"]
        self.inner, self.cross = inner, cross
        adapter_config = AdapterConfig("basic", image_embed_dim=IMAGE_EMBED_DIM, cross_attention_dim=cross,
                                       num_tokens=IMAGE_TOKENS, architecture="flux")
        with torch.device(device):
            adapter = MIPAdapter.for_model(self.transformer, adapter_config)
        self.adapter = adapter.to(dtype=dtype).eval().requires_grad_(False)
        # the adapter's (to_k_ip, to_v_ip) pair per double block, lent to every diffusers IP variant: one set
        # of weights for all variants and adapter counts
        self.shared = {}
        for layer_name, processor in self.adapter.processors().items():
            with torch.no_grad():
                for linear in (processor.to_k_ip, processor.to_v_ip):
                    nn.init.normal_(linear.weight, std=cross**-0.5)
                    nn.init.zeros_(linear.bias)
            self.shared[layer_name + ".processor"] = (processor.to_k_ip, processor.to_v_ip)
        if sorted(self.shared) != sorted(self.double_names):
            raise RuntimeError("the FLUX adapter's layers are not the transformer's double-stream blocks")
        self.conditionings: dict[tuple[int, str], SubjectConditioning] = {}
        self.prepare_ms: dict[str, float] = {}

    def ip_processors(self, adapters: int) -> dict:
        """Processors of diffusers' FLUX IP-Adapter with ``adapters`` IP-Adapters (the shared weights)."""
        processors = dict(self.base)
        for name in self.double_names:
            # built on the meta device: its own Linears are never used, so never allocated
            processor = FluxIPAdapterAttnProcessor(self.inner, self.cross, num_tokens=[IMAGE_TOKENS] * adapters,
                                                   scale=1.0, device="meta")
            to_k_ip, to_v_ip = self.shared[name]
            processor.to_k_ip = nn.ModuleList([to_k_ip] * adapters)
            processor.to_v_ip = nn.ModuleList([to_v_ip] * adapters)
            processors[name] = processor
        return processors

    # inputs --------------------------------------------------------------------------------------------
    def inputs(self, batch: int, size: int, subjects: int, text_tokens: int, seed: int = 1) -> dict:
        if size % 16:
            raise ValueError(f"--size must be a multiple of 16 (FLUX packs 2x2 latent patches), got {size}")
        gen = torch.Generator().manual_seed(seed)
        side = size // 16
        name_mask = torch.arange(NAME_TOKENS)[None, :] < (1 + torch.arange(subjects) % NAME_TOKENS)[:, None]
        name_mask = name_mask.expand(batch, -1, -1).to(self.device)  # [b, n, m]
        rows = torch.arange(side).repeat_interleave(side)
        columns = torch.arange(side).repeat(side)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(self.device, self.dtype)

        return {
            "hidden_states": rand(batch, side * side, self.config["in_channels"]),
            "encoder_hidden_states": rand(batch, text_tokens, self.cross),
            "pooled_projections": rand(batch, self.config["pooled_projection_dim"]),
            "timestep": torch.full((batch,), 0.5, device=self.device, dtype=self.dtype),
            "guidance": torch.full((batch,), 3.5, device=self.device, dtype=self.dtype)
            if self.config["guidance_embeds"] else None,
            "img_ids": torch.stack([torch.zeros_like(rows), rows, columns], dim=1).to(self.device, self.dtype),
            "txt_ids": torch.zeros(text_tokens, 3, device=self.device, dtype=self.dtype),
            # already projected image tokens, as encoder_hid_proj would give them: [b, n, T, J]
            "image_tokens": rand(batch, subjects, IMAGE_TOKENS, self.cross),
            # the names' T5 rows [b, n, m, J] (zero past each name's length, as encode_names gives them)
            "name_embeds": rand(batch, subjects, NAME_TOKENS, self.cross) * name_mask[..., None].to(self.dtype),
            "name_mask": name_mask,
            "latent_size": (side, side),
        }

    def conditioning(self, x: dict, subjects: int, rule: str) -> SubjectConditioning:
        """The ``SubjectConditioning`` of ``subjects`` subjects (one photo each, scale 1) under ``rule``, prepared
        once with the adapter attached (``MIPAdapter.prepare``) and reused by every step, as within one
        generation call; the preparation's time is kept in ``prepare_ms``."""
        key = (subjects, rule)
        if key not in self.conditionings:
            b = x["image_tokens"].shape[0]
            cond = SubjectConditioning(
                image_tokens=x["image_tokens"][:, :subjects],
                owner=torch.arange(subjects, device=self.device),
                share=torch.ones(subjects, device=self.device, dtype=self.dtype),
                scales=torch.ones(b, subjects, device=self.device, dtype=self.dtype),
                name_embeds=x["name_embeds"][:, :subjects],
                name_mask=x["name_mask"][:, :subjects],
                rule=rule,
                use_text_weight=False,
                latent_size=x["latent_size"],
            )
            attached = self.adapter.is_attached
            if not attached:
                self.adapter.attach(self.transformer)
            try:
                with torch.no_grad():
                    elapsed, _ = timed_ms(lambda: self.adapter.prepare(cond), self.device)
            finally:
                if not attached:
                    self.adapter.detach()
            self.prepare_ms[f"ours_{rule}/n={subjects}"] = elapsed
            self.conditionings[key] = cond
        return self.conditionings[key]

    # installing a variant ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, variant: Variant) -> Iterator[None]:
        transformer = self.transformer
        if variant.kind in ("ip_concat", "ip_multi"):
            adapters = 1 if variant.kind == "ip_concat" else variant.subjects
            transformer.set_attn_processor(self.ip_processors(adapters))
            transformer.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity() for _ in range(adapters)])
        elif variant.kind == "ours":
            self.adapter.attach(transformer)
        try:
            yield
        finally:
            if variant.kind == "ours":
                self.adapter.detach()
            transformer.encoder_hid_proj = None
            transformer.set_attn_processor(dict(self.base))

    def joint_attention_kwargs(self, variant: Variant, x: dict) -> dict | None:
        """A fresh dict per call: the transformer pops ``ip_adapter_image_embeds`` from it."""
        n = variant.subjects
        tokens = x["image_tokens"][:, :n]
        if variant.kind == "ip_concat":
            return {"ip_adapter_image_embeds": [tokens]}  # one adapter, n images: [b, n, T, J]
        if variant.kind == "ip_multi":
            return {"ip_adapter_image_embeds": [tokens[:, i : i + 1] for i in range(n)]}  # n adapters
        if variant.kind == "ours":  # the conditioning a MIPAdapterPipeline's pre-hook hands every step
            return {CROSS_ATTENTION_KWARG: self.conditioning(x, n, variant.rule)}
        return None

    def forward(self, variant: Variant, x: dict) -> torch.Tensor:
        return self.transformer(
            hidden_states=x["hidden_states"],
            encoder_hidden_states=x["encoder_hidden_states"],
            pooled_projections=x["pooled_projections"],
            timestep=x["timestep"],
            guidance=x["guidance"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            joint_attention_kwargs=self.joint_attention_kwargs(variant, x),
            return_dict=False,
        )[0]


# --------------------------------------------------------------------------------------------------------
# Timing


# --------------------------------------------------------------------------------------------------------
# Checks and reports


def parity_checks(bench: Bench, x: dict, subjects: Sequence[int] = (), paper: bool = False) -> dict:
    """Output of the whole step, variant against variant (relative error of the first to the second):

    * ``ip_multi/n=1`` against ``ip_concat/n=1`` (one image: the same computation);
    * for every ``n`` of ``subjects``, ``ours_uniform/n`` against ``ip_multi/n`` (diffusers with ``n`` adapters,
      one image each: the ``uniform`` rule), with ``paper``: how far ``ours_paper/n`` moves from it
      (``paper_vs_uniform``, the routing must act);

    each with how far the image term moves the output from ``text_only`` (it must not be a no-op)."""
    outputs = {}

    def output(variant: Variant) -> torch.Tensor:
        if variant.name not in outputs:
            with torch.no_grad(), bench.installed(variant):
                outputs[variant.name] = bench.forward(variant, x)
        return outputs[variant.name]

    text_only = output(Variant("text_only", "text_only", 0))
    concat = output(Variant("ip_concat/n=1", "ip_concat", 1))
    checks = {
        "ip_multi/n=1 vs ip_concat/n=1": {
            "relative_error": relative_error(output(Variant("ip_multi/n=1", "ip_multi", 1)), concat),
            "image_branch_effect": relative_error(concat, text_only),
        }
    }
    for n in subjects:
        multi = output(Variant(f"ip_multi/n={n}", "ip_multi", n))
        uniform = output(Variant(f"ours_uniform/n={n}", "ours", n, "uniform"))
        check = {"relative_error": relative_error(uniform, multi), "image_branch_effect": relative_error(multi, text_only)}
        if paper:
            check["paper_vs_uniform"] = relative_error(output(Variant(f"ours_paper/n={n}", "ours", n, "paper")), uniform)
        checks[f"ours_uniform/n={n} vs ip_multi/n={n}"] = check
    return checks


def describe_parity(label: str, check: dict) -> str:
    """One sentence of a parity check, for the log and the Markdown."""
    text = (f"{label}: relative error {check['relative_error']:.1e} (the image term moves the output by "
            f"{check['image_branch_effect']:.1e}")
    if "paper_vs_uniform" in check:
        text += f"; ours_paper differs from ours_uniform by {check['paper_vs_uniform']:.1e}"
    return text + ")"


def summarise(variants: list[Variant]) -> dict:
    by_name = {variant.name: variant for variant in variants}

    def ratio(ms, name):
        reference = by_name.get(name)
        return ms / median(reference.times_ms) if ms and reference and reference.times_ms else None

    rows = {}
    for variant in variants:
        ms = median(variant.times_ms)
        n = variant.subjects
        rows[variant.name] = {
            "kind": variant.kind,
            "subjects": n,
            "rule": variant.rule,
            "median_ms": ms,
            "min_ms": min(variant.times_ms) if variant.times_ms else None,
            "times_ms": [round(t, 3) for t in variant.times_ms],
            "wall_ms": [round(t, 3) for t in variant.wall_ms],
            "cpu_ms": [round(t, 3) for t in variant.cpu_ms],
            "vs_ip_concat": ratio(ms, f"ip_concat/n={n}"),
            "vs_ip_multi": ratio(ms, f"ip_multi/n={n}"),
            "vs_text_only": ratio(ms, "text_only"),
            "peak_gib": max(variant.peak_gib) if variant.peak_gib else None,
        }
    return rows


def format_table(title: str, rows: dict) -> str:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    header = f"{'variant':<22}{'median ms':>12}{'min ms':>10}{'× ip_concat':>13}{'× ip_multi':>12}{'× text':>9}{'peak GiB':>10}"
    lines = [title, header]
    for name, row in rows.items():
        lines.append(
            f"{name:<22}{fmt(row['median_ms'], '.1f'):>12}{fmt(row['min_ms'], '.1f'):>10}"
            f"{fmt(row['vs_ip_concat'], '.3f'):>13}{fmt(row['vs_ip_multi'], '.3f'):>12}"
            f"{fmt(row['vs_text_only'], '.3f'):>9}{fmt(row['peak_gib'], '.2f'):>10}"
        )
    return "\n".join(lines)


TARGET_BASELINE = "ip_concat"
"""Issue 11 compares ours with "diffusers' own FLUX IP-Adapter with the same number of references": the XLabs
file loaded once and given the ``n`` images (``ip_concat``, one softmax over their tokens), which is how
diffusers is used with one adapter file, and does the least work of its two ways (one attention over ``n·T``
tokens, not ``n`` attentions); ``ip_multi`` (the file loaded ``n`` times), numerically our ``uniform``, is
beside it in every table."""


def targets(rows: dict, rules: Sequence[str]) -> list[dict]:
    """Issue 11's targets for every timed rule of ours (set for a GPU; on a CPU indicative only):
    ``ours_<rule>/n=2 ÷ ip_concat/n=2 ≤ 1.05`` and ``ours_<rule>/n=8 ÷ ours_<rule>/n=2 ≤ 1.10``."""

    def ratio(a, b):
        if a in rows and b in rows and rows[a]["median_ms"] and rows[b]["median_ms"]:
            return rows[a]["median_ms"] / rows[b]["median_ms"]
        return None

    checks = []
    if not rules:
        return [{"target": label, "value": None, "limit": limit, "met": None, "note": "no rule of ours timed (--rules)"}
                for label, limit in ((f"ours/n=2 ÷ {TARGET_BASELINE}/n=2", 1.05), ("ours/n=8 ÷ ours/n=2", 1.10))]
    for rule in rules:
        ours = f"ours_{rule}"
        for a, b, limit in ((f"{ours}/n=2", f"{TARGET_BASELINE}/n=2", 1.05), (f"{ours}/n=8", f"{ours}/n=2", 1.10)):
            value = ratio(a, b)
            note = None
            if value is None:
                note = "not measured (--subjects needs 2 and 8)"
            elif b.startswith(TARGET_BASELINE):
                other = ratio(a, "ip_multi/n=2")
                note = f"× ip_multi/n=2: {other:.3f}" if other is not None else None
            checks.append({"target": f"{a} ÷ {b}", "value": value, "limit": limit,
                           "met": None if value is None else value <= limit, "note": note})
    return checks


def markdown(result: dict) -> str:
    """The run as Markdown (card, settings, table, checks) for benchmarks/RESULTS.md."""
    card_, settings = result["card"], result["settings"]
    where = card_.get("gpu") or f"{card_['cpu']} ({card_['threads']} thread(s))"
    lines = [
        f"Card: {where}; torch {card_['torch']}, diffusers {card_['diffusers']}, python {card_['python']}; "
        f"{card_['date']}.",
        f"Settings: config {settings['config']}, {settings['dtype']}, {settings['size']}² "
        f"({settings['image_rows']} image rows + {settings['text_tokens']} text rows), batch {settings['batch']}, "
        f"{settings['image_tokens']} tokens per image, {settings['warmup']} warm-up + {settings['repeats']} "
        f"timed rounds, timer {settings['timer']}.",
        f"Command: `{result['command']}`" if result.get("command") else "",
        "",
        "| variant | median ms | × ip_concat | × ip_multi | × text_only | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    for name, row in result["inference"].items():
        lines.append(f"| {name} | {fmt(row['median_ms'], '.1f')} | {fmt(row['vs_ip_concat'], '.3f')} | "
                     f"{fmt(row['vs_ip_multi'], '.3f')} | {fmt(row['vs_text_only'], '.3f')} | "
                     f"{fmt(row['peak_gib'], '.2f')} |")
    done = min((len(row["times_ms"]) for row in result["inference"].values()), default=settings["repeats"])
    if done < settings["repeats"]:
        lines.append(f"\nThe step ran {done} of {settings['repeats']} timed rounds (time budget).")
    if result.get("prepare_ms"):
        prepared = ", ".join(f"{name} {ms:.1f}" for name, ms in result["prepare_ms"].items())
        lines.append(f"\nOurs' per-call preparation (`MIPAdapter.prepare`, once per generation, not per step), "
                     f"ms: {prepared}.")
    lines.append("\nParity (the whole step's output):\n")
    lines += [f"- {describe_parity(label, check)}." for label, check in result.get("parity", {}).items()]
    lines += ["", f"Targets: the baseline is `{TARGET_BASELINE}` (diffusers' FLUX IP-Adapter loaded once and given "
              "the n references, as it is used with one adapter file; `ip_multi`, the file loaded n times, is "
              "numerically our `uniform`).", "",
              "| the issue's target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
    for check in result["targets"]:
        value = check["value"]
        verdict = {True: "yes", False: "**no**", None: "n/a"}[check["met"]]
        note = f" ({check['note']})" if check.get("note") else ""
        lines.append(f"| {check['target']}{note} | {fmt(value, '.3f')} | {check['limit']} | {verdict} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="flux1")
    parser.add_argument("--size", type=int, default=None, help="image px (default 1024 flux1, 512 mid, 64 tiny)")
    parser.add_argument("--text-tokens", type=int, default=None, help="T5 rows (default 512; 16 tiny)")
    parser.add_argument("--batch", type=int, default=1,
                        help="rows per call (FLUX.1-dev has no CFG batch; true CFG makes a second call)")
    parser.add_argument("--subjects", default="1,2,8", help="numbers of references (the targets read 2 and 8)")
    parser.add_argument("--rules", default="uniform,paper",
                        help="rules of ours to time (FLUX adapters have no text weight: no official)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="CPU runs: rank by wall-clock or by process CPU time (steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the card and table as Markdown here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        subjects = {int(n) for n in args.subjects.split(",") if n.strip()}
    except ValueError:
        parser.error(f"--subjects takes numbers like 1,2,8, got {args.subjects!r}")
    if not subjects or min(subjects) < 1:
        parser.error(f"--subjects takes numbers ≥ 1, got {args.subjects!r}")
    args.subjects = sorted(subjects)
    args.rules = list(dict.fromkeys(rule.strip() for rule in args.rules.split(",") if rule.strip()))
    unknown = [rule for rule in args.rules if rule not in RULES]
    if unknown:
        parser.error(f"--rules takes {', '.join(RULES)} (FLUX adapters have no text weight for official), "
                     f"got {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


def bench_for(config: str, device: torch.device, dtype: torch.dtype, seed: int, benches: dict | None) -> Bench:
    """The run's ``Bench``: taken from ``benches`` when one of the same config, device, dtype and seed is
    there (a caller running several parts keeps one transformer), else built (and kept there)."""
    key = ("flux", config, str(device), dtype, seed)
    if benches is not None and key in benches:
        return benches[key]
    bench = Bench(CONFIGS[config], device, dtype, seed=seed)
    if benches is not None:
        benches[key] = bench
    return bench


def run(argv: Sequence[str] | None = None, *, benches: dict | None = None, deadline: float | None = None) -> dict:
    """The benchmark as ``main`` runs it; returns the results (also written to ``--out``/``--markdown``).

    ``benches``: a dict the caller keeps to reuse the transformer (``bench_for``); ``deadline`` (a
    ``time.monotonic()`` value): timed rounds stop early rather than run past it (``run_interleaved``)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or DEFAULT_SIZE[args.config]
    text_tokens = args.text_tokens or DEFAULT_TEXT_TOKENS[args.config]
    subjects, rules = args.subjects, args.rules

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    log(f"building {args.config} FLUX transformer on {device} in {dtype} …")
    bench = bench_for(args.config, device, dtype, args.seed, benches)
    log(f"  {sum(p.numel() for p in bench.transformer.parameters()) / 1e6:.0f} M parameters, "
        f"{len(bench.double_names)} double-stream blocks")
    x = bench.inputs(args.batch, size, max(subjects), text_tokens)
    result: dict = {
        "card": card(device),
        "settings": {"config": args.config, "dtype": str(dtype).removeprefix("torch."), "size": size,
                     "image_rows": (size // 16) ** 2, "text_tokens": text_tokens, "batch": args.batch,
                     "image_tokens": IMAGE_TOKENS, "subjects": subjects, "rules": rules,
                     "repeats": args.repeats, "warmup": args.warmup,
                     "timer": "cuda events" if device.type == "cuda" else
                     {"wall": "perf_counter", "cpu": "process_time"}[args.timer],
                     "threads": torch.get_num_threads()},
        "command": "python benchmarks/flux_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }

    log("parity checks …")
    result["parity"] = parity_checks(bench, x, subjects if "uniform" in rules else (), paper="paper" in rules)
    for label, check in result["parity"].items():
        log(f"  {describe_parity(label, check)}")

    variants = [Variant("text_only", "text_only", 0)]
    for n in subjects:
        variants += [Variant(f"ip_concat/n={n}", "ip_concat", n), Variant(f"ip_multi/n={n}", "ip_multi", n)]
        variants += [Variant(f"ours_{rule}/n={n}", "ours", n, rule) for rule in rules]
    for variant in variants:  # prepared before the clock runs, as a pipeline prepares before its steps
        if variant.kind == "ours":
            bench.conditioning(x, variant.subjects, variant.rule)
    result["prepare_ms"] = dict(bench.prepare_ms)
    if bench.prepare_ms:
        log("ours' per-call preparation (once per generation): " +
            ", ".join(f"{name} {ms:.1f} ms" for name, ms in bench.prepare_ms.items()))

    log(f"inference: {len(variants)} variants, {size}² batch {args.batch}, {args.warmup} warm-up + "
        f"{args.repeats} timed rounds …")
    def step(variant: Variant):
        def run():
            with torch.no_grad():
                return bench.forward(variant, x)

        return run

    run_interleaved(bench, variants, step, args.warmup, args.repeats, log, args.timer, deadline)
    result["inference"] = summarise(variants)
    log(format_table(f"\ntransformer step ({args.config}, {size}², {text_tokens} text rows, batch {args.batch}, "
                     f"{result['settings']['dtype']}, {device}, {result['settings']['timer']})",
                     result["inference"]))
    if device.type != "cuda":
        result["memory_note"] = "peak memory is measured on CUDA only (torch.cuda.max_memory_allocated)"

    result["targets"] = targets(result["inference"], rules)
    log("\ntargets (the issue's, set for a GPU; other settings are indicative):")
    for check in result["targets"]:
        value = check["value"]
        verdict = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
        shown = f"{value:.3f}" if value is not None else "-"
        log(f"  {check['target']}: {shown} (limit {check['limit']}) {verdict}"
            + (f" — {check['note']}" if check.get("note") else ""))
    write_outputs(result, args.out, args.markdown, markdown, log)
    return result


if __name__ == "__main__":
    sys.exit(main())
