"""Speed of one FLUX transformer step with several reference images: diffusers' FLUX IP-Adapter, and ours.

Builds a ``FluxTransformer2DModel`` from a config written here (``flux1``: FLUX.1-dev's; ``mid``: FLUX's
structure scaled down for CPU developer runs; ``tiny`` for CI) with random weights, on the chosen device and
dtype, and times one forward step (``no_grad``), interleaved (every variant once per round, round-robin),
with CUDA events on GPU and ``perf_counter`` (and process CPU time) on CPU:

* ``text_only``: ``FluxAttnProcessor`` everywhere, no image term;
* ``ip_concat/n``: diffusers' ``FluxIPAdapterAttnProcessor`` with ONE IP-Adapter given ``n`` images: their
  tokens concatenated, one softmax over ``n·T`` tokens (what ``pipe(ip_adapter_image=[[img1, img2]])`` does);
* ``ip_multi/n``: the same processor with ``n`` IP-Adapters (the same file loaded ``n`` times), one image
  each: ``Σ_k s_k·Attn_k``, which is our ``uniform`` rule (docs/flux.md);
* ``ours_<rule>/n``: our FLUX processor — a SLOT (``OursSlot`` below) that the FLUX processor fills; until
  then no ``ours`` variant runs and the targets say so.

Image tokens are given already projected (``[b, n, T, J]``, through an identity ``encoder_hid_proj``), so
the step times the transformer alone; every IP variant shares one ``to_k_ip``/``to_v_ip`` pair per block.
Prints, for every variant, the ratio to ``ip_concat`` and ``ip_multi`` with the same number of images and to
``text_only``, all measured in the same run, and writes everything to ``--out`` as JSON (``--markdown`` for
``benchmarks/RESULTS.md``). Before timing it checks that ``ip_multi/n=1`` equals ``ip_concat/n=1`` and that
the image term moves the output.

    python benchmarks/flux_step.py --device cuda --dtype bf16 --config flux1 --size 1024 --out flux1.json
    python benchmarks/flux_step.py --config mid --size 256 --repeats 3 --warmup 1 --out mid.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import diffusers
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor
from torch import nn

IMAGE_TOKENS = 16  # per image: XLabs' v2 file (v1: 4)

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
# The tiny FLUX of mipadapter.testing.flux (TINY_FLUX).
TINY = {**FLUX1, "num_layers": 3, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 48, "pooled_projection_dim": 24, "axes_dims_rope": (4, 6, 6)}
CONFIGS = {"flux1": FLUX1, "mid": MID, "tiny": TINY}
DEFAULT_SIZE = {"flux1": 1024, "mid": 512, "tiny": 64}
DEFAULT_TEXT_TOKENS = {"flux1": 512, "mid": 512, "tiny": 16}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Variant:
    name: str
    kind: str  # text_only | ip_concat | ip_multi | ours
    subjects: int
    rule: str | None = None
    times_ms: list[float] = field(default_factory=list)  # by the clock --timer picks
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # process CPU time (CPU runs only)
    peak_gib: list[float] = field(default_factory=list)


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
        # one (to_k_ip, to_v_ip) pair per double block, shared by every IP variant and adapter count
        self.shared = {}
        for name in self.double_names:
            pair = [nn.Linear(cross, inner, bias=True, device=device, dtype=dtype) for _ in range(2)]
            for linear in pair:
                nn.init.normal_(linear.weight, std=cross**-0.5)
                nn.init.zeros_(linear.bias)
            self.shared[name] = pair

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
        }

    # installing a variant ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, variant: Variant) -> Iterator[None]:
        transformer = self.transformer
        if variant.kind in ("ip_concat", "ip_multi"):
            adapters = 1 if variant.kind == "ip_concat" else variant.subjects
            transformer.set_attn_processor(self.ip_processors(adapters))
            transformer.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity() for _ in range(adapters)])
        elif variant.kind == "ours":
            stack = contextlib.ExitStack()
            stack.enter_context(OursSlot.install(self, variant.subjects, variant.rule))
        try:
            yield
        finally:
            if variant.kind == "ours":
                stack.close()
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
        if variant.kind == "ours":
            return OursSlot.joint_attention_kwargs(self, x, n, variant.rule)
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
# SLOT FOR OURS. The FLUX processor fills this in: `rules` lists the merge rules it runs ("uniform", "paper",
# later "official"); `install` puts our processors (and whatever per-call conditioning they need, built from
# `x["image_tokens"][:, :subjects]` and random name keys) on `bench.transformer` for the duration of the
# `with`; `joint_attention_kwargs` returns a fresh kwargs dict of one step. Each `ours_<rule>/n` variant is
# then timed like the others, its ratios printed against `ip_concat/n` and `ip_multi/n`, and a parity check
# `ours_uniform/n=2` against `ip_multi/n=2` should be added to `parity_checks`.


class OursSlot:
    rules: tuple[str, ...] = ()  # empty: not filled yet

    @staticmethod
    def install(bench: Bench, subjects: int, rule: str | None) -> contextlib.AbstractContextManager:
        raise NotImplementedError("ours is not in this benchmark yet: fill OursSlot in benchmarks/flux_step.py")

    @staticmethod
    def joint_attention_kwargs(bench: Bench, x: dict, subjects: int, rule: str | None) -> dict:
        raise NotImplementedError("ours is not in this benchmark yet: fill OursSlot in benchmarks/flux_step.py")


# --------------------------------------------------------------------------------------------------------
# Timing


def timed_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """(elapsed ms, process CPU ms or None): CUDA events on GPU; ``perf_counter`` and ``process_time`` on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end), None
    begin, begin_cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - begin) * 1e3, (time.process_time() - begin_cpu) * 1e3


def run_interleaved(bench: Bench, variants: list[Variant], x: dict, warmup: int, repeats: int,
                    log: Callable[[str], None], timer: str = "wall") -> None:
    """Every variant once per round, round-robin; ``warmup`` untimed rounds first."""
    cuda = bench.device.type == "cuda"
    for round_index in range(warmup + repeats):
        timed_round = round_index >= warmup
        for variant in variants:
            with bench.installed(variant), torch.no_grad():
                if cuda:
                    torch.cuda.reset_peak_memory_stats(bench.device)
                elapsed, cpu_elapsed = timed_ms(lambda v=variant: bench.forward(v, x), bench.device)
                peak = torch.cuda.max_memory_allocated(bench.device) / 2**30 if cuda else None
            if timed_round:
                variant.wall_ms.append(elapsed)
                if cpu_elapsed is not None:
                    variant.cpu_ms.append(cpu_elapsed)
                variant.times_ms.append(cpu_elapsed if timer == "cpu" and cpu_elapsed is not None else elapsed)
                if peak is not None:
                    variant.peak_gib.append(peak)
        log(f"  round {round_index + 1}/{warmup + repeats}{'' if timed_round else ' (warm-up)'} done")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------------------------------------
# Checks and reports


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parity_checks(bench: Bench, x: dict) -> dict:
    """``ip_multi/n=1`` against ``ip_concat/n=1`` (one image: the same computation), and how far the image
    term moves the output from ``text_only`` (it must not be a no-op)."""
    outputs = {}
    with torch.no_grad():
        for variant in (Variant("text_only", "text_only", 0), Variant("ip_concat/n=1", "ip_concat", 1),
                        Variant("ip_multi/n=1", "ip_multi", 1)):
            with bench.installed(variant):
                outputs[variant.name] = bench.forward(variant, x)
    return {
        "ip_multi/n=1 vs ip_concat/n=1": {
            "relative_error": relative_error(outputs["ip_multi/n=1"], outputs["ip_concat/n=1"]),
            "image_branch_effect": relative_error(outputs["ip_concat/n=1"], outputs["text_only"]),
        }
    }


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def card(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


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


def targets(rows: dict) -> list[dict]:
    """Issue 11's targets (set for a GPU; on a CPU indicative only). Unmeasurable until ours is in."""
    ours = sorted({row["rule"] for row in rows.values() if row["kind"] == "ours"})
    rule = "paper" if "paper" in ours else (ours[0] if ours else None)

    def ratio(a, b):
        if a in rows and b in rows and rows[a]["median_ms"] and rows[b]["median_ms"]:
            return rows[a]["median_ms"] / rows[b]["median_ms"]
        return None

    checks = []
    for label, a, b, limit in (
        ("ours/n=2 ÷ ip_concat/n=2", f"ours_{rule}/n=2", "ip_concat/n=2", 1.05),
        ("ours/n=8 ÷ ours/n=2", f"ours_{rule}/n=8", f"ours_{rule}/n=2", 1.10),
    ):
        value = ratio(a, b) if rule else None
        checks.append({"target": label if rule is None else label.replace("ours", f"ours_{rule}"),
                       "value": value, "limit": limit,
                       "met": None if value is None else value <= limit,
                       "note": None if rule else "ours not in the benchmark yet (OursSlot)"})
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
    for label, parity in result.get("parity", {}).items():
        lines.append(f"\nParity {label}: relative error {parity['relative_error']:.1e} (the image term moves "
                     f"the output by {parity['image_branch_effect']:.1e}).")
    lines += ["", "| the issue's target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
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
    parser.add_argument("--subjects", default="1,2,4,8")
    parser.add_argument("--rules", default="uniform,paper", help="rules of ours to time, once OursSlot is filled")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="CPU runs: rank by wall-clock or by process CPU time (steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the card and table as Markdown here")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or DEFAULT_SIZE[args.config]
    text_tokens = args.text_tokens or DEFAULT_TEXT_TOKENS[args.config]
    subjects = sorted({int(s) for s in args.subjects.split(",") if s.strip()})
    rules = [rule.strip() for rule in args.rules.split(",") if rule.strip()]

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    log(f"building {args.config} FLUX transformer on {device} in {dtype} …")
    bench = Bench(CONFIGS[args.config], device, dtype, seed=args.seed)
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
    }

    log("parity checks …")
    result["parity"] = parity_checks(bench, x)
    for label, values in result["parity"].items():
        log(f"  {label}: relative error {values['relative_error']:.2e} "
            f"(the image term moves the output by {values['image_branch_effect']:.2e})")

    ours_rules = [rule for rule in rules if rule in OursSlot.rules]
    if rules and not ours_rules:
        log("  ours: not in this benchmark yet (OursSlot is empty); timing diffusers' variants only")
    variants = [Variant("text_only", "text_only", 0)]
    for n in subjects:
        variants += [Variant(f"ip_concat/n={n}", "ip_concat", n), Variant(f"ip_multi/n={n}", "ip_multi", n)]
        variants += [Variant(f"ours_{rule}/n={n}", "ours", n, rule) for rule in ours_rules]

    log(f"inference: {len(variants)} variants, {size}² batch {args.batch}, {args.warmup} warm-up + "
        f"{args.repeats} timed rounds …")
    run_interleaved(bench, variants, x, args.warmup, args.repeats, log, args.timer)
    result["inference"] = summarise(variants)
    log(format_table(f"\ntransformer step ({args.config}, {size}², {text_tokens} text rows, batch {args.batch}, "
                     f"{result['settings']['dtype']}, {device}, {result['settings']['timer']})",
                     result["inference"]))
    if device.type != "cuda":
        result["memory_note"] = "peak memory is measured on CUDA only (torch.cuda.max_memory_allocated)"

    result["targets"] = targets(result["inference"])
    log("\ntargets (the issue's, set for a GPU; other settings are indicative):")
    for check in result["targets"]:
        value = check["value"]
        verdict = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
        shown = f"{value:.3f}" if value is not None else "-"
        log(f"  {check['target']}: {shown} (limit {check['limit']}) {verdict}"
            + (f" — {check['note']}" if check.get("note") else ""))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2, ensure_ascii=False)
        log(f"\nwrote {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown(result))
        log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
