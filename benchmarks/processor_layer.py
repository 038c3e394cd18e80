"""One cross-attention layer: ``MIPAttnProcessor`` against diffusers' text-only and IP-Adapter processors.

The UNet-step benchmark (``unet_step.py``) is the reference; this one isolates the processor, where the
routing costs live, so that a change to them is visible on a CPU whose whole-UNet timings swing by a few
percent. Each case builds one diffusers ``Attention`` at a mid-config layer shape, gives all three processors
the same weights and inputs, and times them round-robin with process CPU time (one thread by default),
taking the median over rounds of the best of ``--inner`` calls. Our conditioning is prepared once, before
timing, as a generation call does before its denoising loop.

``--count-ops`` counts instead what one call of each processor dispatches, with the profiler: every
top-level ``aten`` operator (what a CPU pays dispatch overhead for) and those that run a kernel (views and
no-op conversions excluded: what a GPU pays a launch for), with the kernels by name.

    python benchmarks/processor_layer.py
    python benchmarks/processor_layer.py --count-ops --cases 256x2:2:official,256x2:2:paper,256x2:2:uniform
    python benchmarks/processor_layer.py --device cuda --dtype fp16 --cases 4096x10:2:official,1024x20:8:official
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, beside this script
from harness import card, write_outputs  # noqa: E402

from mipadapter.modeling import MIPAttnProcessor, SubjectConditioning

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# positions x heads : subjects : rule — the mid config's layers at 512 px (32² with 2 heads, 16² with 4)
DEFAULT_CASES = "1024x2:2:official,1024x2:8:official,256x4:2:official,1024x2:2:uniform"
# Operators that never launch a kernel; reshape-like ones only count when they copy.
VIEW_OPS = {
    "aten::view", "aten::transpose", "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze",
    "aten::slice", "aten::select", "aten::as_strided", "aten::t", "aten::_unsafe_view", "aten::alias",
    "aten::detach", "aten::unflatten", "aten::split", "aten::chunk", "aten::narrow", "aten::result_type",
}
COPYING_CHILDREN = {"aten::clone", "aten::copy_", "aten::_to_copy"}
MAYBE_VIEW_OPS = {"aten::reshape", "aten::contiguous", "aten::to", "aten::flatten", "aten::dropout"}


def count_ops(fn: Callable[[], object]) -> dict:
    """Top-level aten operators one call of ``fn`` dispatches, and those that run a kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    kernels = [
        e.name
        for e in top
        if e.name not in VIEW_OPS
        and not (e.name in MAYBE_VIEW_OPS and not any(c.name in COPYING_CHILDREN for c in e.cpu_children))
    ]
    return {"operators": len(top), "kernels": len(kernels), "by_name": dict(sorted(Counter(kernels).items()))}


def best_ms(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    times = []
    for _ in range(inner):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.process_time()
            fn()
            times.append((time.process_time() - begin) * 1e3)
    return min(times)


def run_case(positions: int, heads: int, subjects: int, rule: str, args, device, dtype) -> dict:
    batch, head_dim, cross, tokens, name_tokens = 2, 64, 2048, 4, 3
    hidden = heads * head_dim
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with torch.device(device):
        attn = Attention(query_dim=hidden, cross_attention_dim=cross, heads=heads, dim_head=head_dim)
        ours = MIPAttnProcessor(hidden, cross, text_weight=True, layer_name="layer")
    attn, ours = attn.to(dtype).eval(), ours.to(dtype)
    ip = IPAdapterAttnProcessor2_0(hidden, cross, num_tokens=(tokens * subjects,))
    ip.to_k_ip[0], ip.to_v_ip[0] = ours.to_k_ip, ours.to_v_ip  # the same adapter weights
    side = int(positions**0.5)
    if side * side != positions:
        raise ValueError(f"positions must be a square number, got {positions}")

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    name_mask = torch.zeros(batch, subjects, name_tokens, dtype=torch.bool, device=device)
    name_mask[..., :2] = True
    cond = SubjectConditioning(
        image_tokens=rand(batch, subjects, tokens, cross), owner=torch.arange(subjects, device=device),
        share=torch.ones(subjects, device=device, dtype=dtype), scales=torch.ones(batch, subjects, device=device, dtype=dtype),
        name_embeds=rand(batch, subjects, name_tokens, cross), name_mask=name_mask, rule=rule,
        use_text_weight=rule != "uniform", latent_size=(side, side),
    )  # fmt: skip
    hidden_states, text = rand(batch, positions, hidden), rand(batch, 77, cross)
    with torch.no_grad():
        cond.layer_inputs[ours.layer_name] = ours.prepare(attn, cond)  # once per generation call
    text_only = AttnProcessor2_0()
    calls = {
        "text_only": lambda: text_only(attn, hidden_states, text),
        "ip_concat": lambda: ip(attn, hidden_states, (text, [cond.image_tokens])),
        "ours": lambda: ours(attn, hidden_states, text, ip_hidden_states=cond),
    }
    if args.count_ops:
        with torch.no_grad():
            for fn in calls.values():
                fn()  # warm-up
            return {"case": f"{positions}x{heads}:{subjects}:{rule}", **{name: count_ops(fn) for name, fn in calls.items()}}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in calls.items():
                times[name].append(best_ms(fn, args.inner, device))
    ms = {name: statistics.median(values) for name, values in times.items()}
    extra_ip, extra_ours = ms["ip_concat"] - ms["text_only"], ms["ours"] - ms["text_only"]
    return {
        "case": f"{positions}x{heads}:{subjects}:{rule}",
        **{f"{name}_ms": value for name, value in ms.items()},
        "ours_vs_ip": ms["ours"] / ms["ip_concat"],
        "extra_vs_ip_extra": extra_ours / extra_ip if extra_ip > 0 else None,
    }


def parse_case(spec: str) -> tuple[int, int, int, str]:
    """``"4096x10:2:official"`` → (positions, heads, subjects, rule)."""
    shape, subjects, rule = spec.split(":")
    positions, heads = (int(v) for v in shape.split("x"))
    return positions, heads, int(subjects), rule


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None) -> dict:
    """The benchmark as ``main`` runs it: prints a table, returns the results (also written to ``--out`` and
    ``--markdown`` when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="positions x heads : subjects : rule, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--count-ops", action="store_true", help="count dispatched operators instead of timing")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the card and table as Markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    result = {"card": card(device), "settings": {"device": str(device), "dtype": args.dtype, "rounds": args.rounds,
                                                 "inner": args.inner, "count_ops": args.count_ops},
              "cases": []}
    if args.count_ops:
        print(f"{'case':<22}{'processor':<11}{'operators':>10}{'kernels':>9}  kernels by name")
    else:
        print(f"{'case':<22}{'text ms':>9}{'ip ms':>9}{'ours ms':>9}{'ours÷ip':>9}{'extra÷ip extra':>16}")
    for spec in args.cases.split(","):
        row = run_case(*parse_case(spec), args, device, dtype)
        result["cases"].append(row)
        if args.count_ops:
            for name in PROCESSORS:
                ops = row[name]
                names = ", ".join(f"{op.removeprefix('aten::')} {count}" for op, count in ops["by_name"].items())
                print(f"{row['case']:<22}{name:<11}{ops['operators']:>10}{ops['kernels']:>9}  {names}", flush=True)
        else:
            extra = row["extra_vs_ip_extra"]
            print(f"{row['case']:<22}{row['text_only_ms']:>9.2f}{row['ip_concat_ms']:>9.2f}{row['ours_ms']:>9.2f}"
                  f"{row['ours_vs_ip']:>9.3f}{'-' if extra is None else format(extra, '.2f'):>16}", flush=True)
    write_outputs(result, args.out, args.markdown, markdown, print)
    return result


PROCESSORS = ("text_only", "ip_concat", "ours")


def markdown(result: dict) -> str:
    """The run as Markdown: per case, the three processors' times and ratios, or their operator counts."""
    card_, settings = result["card"], result["settings"]
    where = card_.get("gpu") or f"{card_['cpu']} ({card_['threads']} thread(s))"
    lines = [f"Card: {where}; torch {card_['torch']}, {settings['dtype']}; {card_['date']}.", ""]
    if settings["count_ops"]:
        lines += ["| case (positions × heads : subjects : rule) | processor | operators | kernels |",
                  "| --- | --- | ---: | ---: |"]
        for row in result["cases"]:
            lines += [f"| {row['case']} | {name} | {row[name]['operators']} | {row[name]['kernels']} |"
                      for name in PROCESSORS]
    else:
        lines += [f"Median over {settings['rounds']} rounds of the best of {settings['inner']} calls.", "",
                  "| case (positions × heads : subjects : rule) | text-only ms | ip ms | ours ms | ours ÷ ip "
                  "| extra ÷ ip extra |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in result["cases"]:
            extra = row["extra_vs_ip_extra"]
            lines.append(f"| {row['case']} | {row['text_only_ms']:.3f} | {row['ip_concat_ms']:.3f} | "
                         f"{row['ours_ms']:.3f} | {row['ours_vs_ip']:.3f} | "
                         f"{'-' if extra is None else format(extra, '.2f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
