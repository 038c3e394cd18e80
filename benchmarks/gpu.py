"""Every GPU figure ``benchmarks/RESULTS.md`` owes, in one call that never runs past a time budget.

    python benchmarks/gpu.py --out-dir gpu-figures              # on the GPU machine (budget 540 s)
    python benchmarks/gpu.py --tiny --out-dir /tmp/gpu-figures  # the same parts, tiny configs, on the CPU

GPU time for this project comes rarely and briefly, so the parts run most important first and each is on
disk the moment it is measured: ``<out-dir>/<part>.json`` and ``.md`` (the benchmark script's own output),
and after every part ``<out-dir>/gpu.json`` (card, budget, every part's status, time and targets) and
``<out-dir>/gpu.md``, one section ready to paste into RESULTS.md. A run cut short leaves every figure it
measured.

The parts (``PARTS``) call the benchmark scripts beside this one (``unet_step.run``, ``flux_step.run``,
``processor_layer.run``) with the arguments RESULTS.md's commands used, in one process (one UNet is built
once and shared by the SDXL parts):

1. ``inference``: SDXL UNet, fp16, 1024², batch 2 (CFG), random weights; text-only, IP-Adapter (concatenated,
   masked), ours under every rule and the authors' approach for 1, 2, 4, 8 subjects, the mixed case (2
   adapters, 2 subjects: issue 21) and its ratio to one adapter; peak memory; parities; the per-call
   constants over 30 steps;
2. ``training``: the training step at 512², batch 4 (ratios);
3. ``training_memory``: the training step at 1024², batch 4 (peak memory);
4. ``flux``: the FLUX.1 transformer step in bf16 (skipped, with a note, on a card under 80 GB);
5. ``processor``: one cross-attention layer at SDXL's shapes (64² × 10 heads, 32² × 20 heads);
6. ``operators``: operators and kernels one layer call dispatches;
7. ``compiled``: the UNet under ``torch.compile``, graph breaks first, one graph per variant.

The budget (``--budget``, seconds from the start of ``main``; imports come before it) is never overrun by
choice: before each part its cost is estimated (``estimate``: model calls weighted by variant, in units of one
text-only step that a probe times first, plus a table of fixed costs such as compiling a graph; scaled up
when the parts so far ran slower than estimated) and a part that would not fit is skipped and listed with
why; a part that runs stops its timed rounds early rather than pass the budget (``run_interleaved``'s
deadline). What cannot be interrupted (a model build, a compilation) can overrun by the error of its estimate.

``--tiny`` runs every part on the CPU with tiny configs and the same code paths (compiled with dynamo's
``eager`` backend: the same graphs, without inductor's minutes of code generation), so the script is known to
work before it first meets a GPU; its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark scripts, beside this one
import flux_step  # noqa: E402
import processor_layer  # noqa: E402
import unet_step  # noqa: E402
from harness import card, timed_ms  # noqa: E402

from mipadapter.fileio import atomic_write_text, check_output_dir

DEFAULT_BUDGET_S = 540.0
FLUX_MIN_BYTES = 80e9  # FLUX.1's transformer is built in fp32 (about 48 GB), then cast to bf16

# The cost of one model call, relative to a text-only step at the same size (docs/performance.md's H200
# figures: IP-Adapter 1.15×, with masks 1.66×, the authors' 2.34×); ours is assumed at IP-Adapter's cost
# plus the routing. A training step (forward + backward) costs about 4.5 inference steps per pixel-row.
CALL_WEIGHT = {"text_only": 1.0, "ip_concat": 1.15, "ip_multi": 1.15, "ip_masked": 1.7, "ours": 1.2,
               "mixed": 1.25, "authors": 2.4}
TRAIN_FACTOR = 4.5


@dataclass(frozen=True)
class Costs:
    """What the probe does not measure, per mode, in seconds (FLUX steps in probe units)."""

    unit_s: float  # a text-only step, when no probe ran
    probe_s: float  # the probe: building the UNet and three text-only steps
    compile_graph_s: float  # compiling one UNet graph
    explain_s: float  # the three dynamo.explain traces
    flux_build_s: float  # building the FLUX transformer
    flux_step_units: float  # a FLUX step, in text-only SDXL steps of the probe
    processor_s: float  # the processor part, whole
    operators_s: float  # the operator-count part, whole


COSTS = {
    # H200 guesses: SDXL text-only step 72 ms; inductor ~90 s a graph; FLUX.1 1024² bf16 ~4× an SDXL step
    "gpu": Costs(unit_s=0.08, probe_s=30.0, compile_graph_s=90.0, explain_s=45.0, flux_build_s=40.0, flux_step_units=4.0,
                 processor_s=20.0, operators_s=10.0),
    # measured on the shared 2-core CI machine (tiny configs, one thread; the eager backend compiles)
    "tiny": Costs(unit_s=0.02, probe_s=1.0, compile_graph_s=10.0, explain_s=15.0, flux_build_s=0.5, flux_step_units=0.6,
                  processor_s=1.0, operators_s=1.0),
}


@dataclass(frozen=True)
class Part:
    """One measurement: the script it runs and with what (``argv``; ``tiny_argv`` under ``--tiny``), which
    model it keeps built (``model``), and the targets it owes (listed as not measured when it is skipped)."""

    name: str
    title: str
    script: str  # "unet_step" | "flux_step" | "processor_layer"
    argv: tuple[str, ...]
    tiny_argv: tuple[str, ...]
    model: str | None = None  # "unet" | "flux": parts with the same model share one build
    owes: tuple[str, ...] = ()


SDXL = ("--config", "sdxl", "--device", "cuda", "--dtype", "fp16")
TINY_UNET = ("--config", "tiny", "--device", "cpu", "--dtype", "fp32")
PARTS = (
    Part("inference", "SDXL UNet inference step: ratios and peak memory", "unet_step",
         (*SDXL, "--size", "1024", "--batch", "2", "--no-train", "--repeats", "10", "--warmup", "3",
          "--gen-steps", "30"),
         (*TINY_UNET, "--size", "64", "--batch", "2", "--no-train", "--repeats", "2", "--warmup", "1",
          "--gen-steps", "3"),
         "unet",
         ("ours_official/n=2 ÷ ip_concat/n=2 (inference) ≤ 1.05",
          "ours_official/n=2 ÷ authors/n=2 (inference) ≤ 0.45",
          "ours_official/n=8 ÷ ours_official/n=2 (inference) ≤ 1.10",
          "per-call constants computed once per generation",
          "mixed_<rule>/n=2 ÷ ours_<rule>/n=2 (inference, 2 adapters; issue 21 asks for the ratio, no limit)")),
    Part("training", "SDXL UNet training step: ratios", "unet_step",
         (*SDXL, "--size", "512", "--no-inference", "--train-size", "512", "--train-batch", "4",
          "--repeats", "10", "--warmup", "3", "--gen-steps", "0"),
         (*TINY_UNET, "--size", "64", "--no-inference", "--train-size", "64", "--train-batch", "4",
          "--repeats", "2", "--warmup", "1", "--gen-steps", "0"),
         "unet", ("ours_official/n=2 ÷ ip_concat/n=2 (training) ≤ 1.10",)),
    Part("training_memory", "SDXL UNet training step at the larger size: peak memory", "unet_step",
         (*SDXL, "--size", "1024", "--no-inference", "--train-size", "1024", "--train-batch", "4",
          "--repeats", "3", "--warmup", "1", "--gen-steps", "0"),
         (*TINY_UNET, "--size", "64", "--no-inference", "--train-size", "128", "--train-batch", "4",
          "--repeats", "1", "--warmup", "1", "--gen-steps", "0"),
         "unet", ("ours_official/n=2 ÷ ip_concat/n=2 (training peak memory) ≤ 1.05",)),
    Part("flux", "FLUX.1 transformer step", "flux_step",
         ("--config", "flux1", "--device", "cuda", "--dtype", "bf16", "--size", "1024", "--subjects", "1,2,8",
          "--repeats", "10", "--warmup", "3"),
         ("--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--size", "64", "--subjects", "1,2,8",
          "--repeats", "2", "--warmup", "1"),
         "flux",
         ("ours_<rule>/n=2 ÷ ip_concat/n=2 (FLUX) ≤ 1.05", "ours_<rule>/n=8 ÷ ours_<rule>/n=2 (FLUX) ≤ 1.10")),
    Part("processor", "One cross-attention layer at SDXL's shapes", "processor_layer",
         ("--device", "cuda", "--dtype", "fp16",
          "--cases", "4096x10:2:official,4096x10:8:official,1024x20:2:official,1024x20:8:official,4096x10:2:uniform"),
         ("--device", "cpu", "--dtype", "fp32", "--rounds", "2", "--inner", "1",
          "--cases", "64x2:2:official,64x2:8:official,16x4:2:official,64x2:2:uniform")),
    Part("operators", "Operators and kernels per cross-attention layer call", "processor_layer",
         ("--device", "cuda", "--dtype", "fp16", "--count-ops",
          "--cases", "4096x10:2:official,4096x10:2:paper,4096x10:2:uniform"),
         ("--device", "cpu", "--dtype", "fp32", "--count-ops",
          "--cases", "64x2:2:official,64x2:2:paper,64x2:2:uniform")),
    Part("compiled", "SDXL UNet inference step under torch.compile (one graph per variant)",
         "unet_step",
         (*SDXL, "--size", "1024", "--compile", "--subjects", "2", "--rules", "official", "--no-authors",
          "--no-masked", "--no-mixed", "--no-train", "--repeats", "10", "--warmup", "3", "--gen-steps", "0"),
         (*TINY_UNET, "--size", "64", "--compile", "--compile-backend", "eager", "--subjects", "2",
          "--rules", "official", "--no-authors", "--no-masked", "--no-mixed", "--no-train", "--repeats", "2",
          "--warmup", "1", "--gen-steps", "0"),
         "unet"),
)
SCRIPTS = {"unet_step": unet_step, "flux_step": flux_step, "processor_layer": processor_layer}


@dataclass
class Probe:
    """A text-only UNet step at the inference part's size (``unit_s``) and what building the UNet took."""

    unit_s: float
    build_s: float
    pixels: int  # size² × batch of the probed step
    seconds: float  # the whole probe


@dataclass
class Estimate:
    """Seconds a part should take: ``rounds_s`` in the interleaved timed rounds (which a deadline can cut
    short), ``tail_s`` after them (the per-call check), ``fixed_s`` the rest (builds, parities, compiling)."""

    fixed_s: float
    rounds_s: float = 0.0
    tail_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.fixed_s + self.rounds_s + self.tail_s


@dataclass
class Run:
    """What the run has done so far: written to ``gpu.json`` after every part."""

    tiny: bool
    budget_s: float
    started: float  # time.monotonic()
    card: dict
    command: str
    probe: Probe | None = None
    parts: list[dict] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def scale(self) -> float:
        """How much slower than estimated the parts so far ran, never below 1 (estimates are only raised)."""
        done = [p for p in self.parts if p["status"] == "done" and p["estimate_s"]]
        estimated = sum(p["estimate_s"] for p in done)
        return max(1.0, sum(p["seconds"] for p in done) / estimated) if estimated else 1.0


# --------------------------------------------------------------------------------------------------------
# Estimates


def estimate(part: Part, argv: Sequence[str], costs: Costs, probe: Probe | None, built: bool) -> Estimate:
    """Seconds ``part`` should take with ``argv`` (``built``: its model is already built)."""
    unit_s = probe.unit_s if probe else costs.unit_s
    if part.script == "processor_layer":
        return Estimate(costs.operators_s if "--count-ops" in argv else costs.processor_s)
    if part.script == "flux_step":
        args = flux_step.parse_args(argv)
        step_s = costs.flux_step_units * unit_s
        variants = 1 + len(args.subjects) * (2 + len(args.rules))
        parity_calls = 3 + len(args.subjects) * (1 + int("uniform" in args.rules) + int("paper" in args.rules))
        return Estimate(fixed_s=(0 if built else costs.flux_build_s) + parity_calls * step_s,
                        rounds_s=(args.warmup + args.repeats) * variants * CALL_WEIGHT["ip_multi"] * step_s)
    args = unet_step.resolve(unet_step.parse_args(argv))
    build_s = 0.0 if built else (probe.build_s if probe else 10 * unit_s)

    def per_call(size: int, batch: int) -> float:  # a text-only step at this size, scaled by pixel-rows
        return unit_s * (size * size * batch) / probe.pixels if probe else unit_s

    step_s = per_call(args.size, args.batch)
    parity_s = step_s * (2 * CALL_WEIGHT["text_only"] + CALL_WEIGHT["ours"] * 2 + CALL_WEIGHT["ip_concat"]
                         + CALL_WEIGHT["authors"])
    fixed_s = build_s + parity_s
    rounds_s = 0.0
    if not args.no_inference:
        variants = unet_step.inference_variants(args.subjects, args.rules, not args.no_authors, not args.no_masked,
                                                not args.no_mixed)
        rounds_s += (max(args.warmup, int(args.compile)) + args.repeats) * step_s * sum(
            CALL_WEIGHT[v.kind] for v in variants)
        if args.compile:
            fixed_s += costs.explain_s + len(variants) * costs.compile_graph_s
    if not args.no_train:
        train_s = TRAIN_FACTOR * per_call(args.train_size, args.train_batch)
        variants = unet_step.training_variants(args.train_subjects, not args.no_authors)
        rounds_s += (args.warmup + args.repeats) * train_s * sum(CALL_WEIGHT[v.kind] for v in variants)
    tail_s = args.gen_steps * step_s * (CALL_WEIGHT["ours"] + CALL_WEIGHT["authors"]
                                        + (0.0 if args.no_mixed else CALL_WEIGHT["mixed"]))
    return Estimate(fixed_s, rounds_s, tail_s)


def run_probe(part: Part, argv: Sequence[str], benches: dict) -> Probe:
    """Build the UNet the SDXL parts share (kept in ``benches``) and time its text-only step at ``part``'s
    size: one warm-up call, then the faster of two."""
    begin = time.monotonic()
    args = unet_step.resolve(unet_step.parse_args(argv))
    bench = unet_step.bench_for(args, benches)
    build_s = time.monotonic() - begin
    x = bench.inputs(args.batch, args.size, 1)
    variant = unet_step.Variant("text_only", "text_only", 0)
    times = []
    with torch.no_grad(), bench.installed(variant):
        for _ in range(3):
            times.append(timed_ms(lambda: bench.forward(variant, x, None), bench.device)[0] / 1e3)
    return Probe(unit_s=min(times[1:]), build_s=build_s, pixels=args.size * args.size * args.batch,
                 seconds=time.monotonic() - begin)


# --------------------------------------------------------------------------------------------------------
# The card


def gpu_card(device: torch.device) -> dict:
    """Where the run ran: the harness's card plus, on CUDA, the card's memory, driver and cuDNN."""
    info = card(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["gpu_memory_bytes"] = properties.total_memory
        info["driver"] = nvidia_driver()
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi did not answer)"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def flux_fits(card: dict) -> str | None:
    """Why the FLUX part cannot run on this card, or None (it needs FLUX_MIN_BYTES of GPU memory)."""
    total = card.get("gpu_memory_bytes")
    if total is not None and total < FLUX_MIN_BYTES:
        return (f"the card has {total / 1e9:.0f} GB; FLUX.1's transformer is built in fp32 (about 48 GB) before "
                f"its bf16 cast and needs an {FLUX_MIN_BYTES / 1e9:.0f} GB card")
    return None


# --------------------------------------------------------------------------------------------------------
# Running the parts


def release(benches: dict, device: torch.device) -> None:
    """Drop the built models (another part needs the memory)."""
    benches.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_parts(run: Run, parts: Sequence[Part], out_dir: Path, log: Callable[[str], None]) -> None:
    costs = COSTS["tiny" if run.tiny else "gpu"]
    device = torch.device("cpu" if run.tiny else "cuda")
    benches: dict = {}
    built: str | None = None  # the model in ``benches``
    first_unet = next((p for p in parts if p.model == "unet"), None)
    if first_unet is not None and costs.probe_s <= run.budget_s - run.elapsed():
        log(f"probe: building the UNet and timing a text-only step ({run.elapsed():.0f} s into the budget) …")
        run.probe = run_probe(first_unet, argv_of(first_unet, run.tiny), benches)
        built = "unet"
        log(f"  built in {run.probe.build_s:.1f} s; text-only step {run.probe.unit_s * 1e3:.1f} ms")
    elif first_unet is not None:
        log(f"probe skipped: it takes about {costs.probe_s:.0f} s; estimates use a text-only step of "
            f"{costs.unit_s * 1e3:.0f} ms")
    for part in parts:
        argv = argv_of(part, run.tiny)
        guess = estimate(part, argv, costs, run.probe, built is not None and built == part.model)
        scaled = guess.total_s * run.scale()
        left = run.budget_s - run.elapsed()
        record = {"name": part.name, "title": part.title, "estimate_s": round(guess.total_s, 2),
                  "scaled_estimate_s": round(scaled, 2), "budget_left_s": round(left, 2),
                  "command": command_line(part.script, argv), "owes": list(part.owes)}
        reason = flux_fits(run.card) if part.script == "flux_step" else None
        if reason is None and scaled > left:
            reason = (f"estimated {record['scaled_estimate_s']:.0f} s, "
                      f"{max(record['budget_left_s'], 0):.0f} s of the budget left")
        if reason is not None:
            log(f"\n[{part.name}] skipped: {reason}")
            run.parts.append({**record, "status": "skipped", "reason": reason, "seconds": 0.0})
            write_summary(run, out_dir)
            continue
        if part.model != built:
            release(benches, device)
            built = None
        log(f"\n[{part.name}] {part.title}: estimated {scaled:.0f} s, {left:.0f} s left")
        begin = time.monotonic()
        # the timed rounds stop early rather than pass the budget (less what follows them) or run far past
        # their own estimate
        deadline = min(run.started + run.budget_s - guess.tail_s * run.scale(), begin + 2 * scaled)
        outputs = ("--out", str(out_dir / f"{part.name}.json"), "--markdown", str(out_dir / f"{part.name}.md"))
        try:
            result = call(part, (*argv, *outputs), benches, deadline)
        except Exception as error:  # a part that fails (out of memory, say) must not lose the others
            status = {"status": "failed", "reason": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
            release(benches, device)
            built = None
            log(f"[{part.name}] failed: {status['reason']}")
        else:
            status = {"status": "done", "json": f"{part.name}.json", "markdown": f"{part.name}.md",
                      "targets": result.get("targets", []), "peaks": peaks(result),
                      "markdown_text": (out_dir / f"{part.name}.md").read_text()}
            built = part.model
        seconds = time.monotonic() - begin
        run.parts.append({**record, **status, "seconds": round(seconds, 2)})
        log(f"[{part.name}] {status['status']} in {seconds:.1f} s ({run.elapsed():.0f} s of {run.budget_s:.0f})")
        write_summary(run, out_dir)
    release(benches, device)


def argv_of(part: Part, tiny: bool) -> tuple[str, ...]:
    quiet = ("--quiet",) if part.script != "processor_layer" else ()
    return (*(part.tiny_argv if tiny else part.argv), *quiet)


def command_line(script: str, argv: Sequence[str]) -> str:
    return " ".join(["python", f"benchmarks/{script}.py", *(a for a in argv if a != "--quiet")])


def call(part: Part, argv: Sequence[str], benches: dict, deadline: float) -> dict:
    module = SCRIPTS[part.script]
    if part.script == "processor_layer":
        threads = torch.get_num_threads()
        try:
            return module.run(argv)
        finally:
            torch.set_num_threads(threads)  # it times on one thread; the parts after it keep the run's
    return module.run(argv, benches=benches, deadline=deadline)


def peaks(result: dict) -> list[dict]:
    """Every variant's peak memory in a step script's result (CUDA only: empty on a CPU)."""
    rows = []
    for step in ("inference", "training"):
        for name, row in result.get(step, {}).items():
            if row.get("peak_gib") is not None:
                rows.append({"step": step, "variant": name, "peak_gib": row["peak_gib"],
                             "vs_ip_concat": row.get("peak_vs_ip_concat")})
    return rows


# --------------------------------------------------------------------------------------------------------
# The report


def write_summary(run: Run, out_dir: Path) -> None:
    """``gpu.json`` and ``gpu.md``, rewritten after every part (atomically: a kill leaves the last one)."""
    summary = {
        "card": run.card, "tiny": run.tiny, "command": run.command, "budget_s": run.budget_s,
        "elapsed_s": round(run.elapsed(), 2), "probe": vars(run.probe) if run.probe else None,
        "parts": [{k: v for k, v in part.items() if k != "markdown_text"} for part in run.parts],
        "not_run_yet": [p.name for p in PARTS if p.name not in {r["name"] for r in run.parts}],
    }
    atomic_write_text(out_dir / "gpu.json", json.dumps(summary, indent=2, ensure_ascii=False), fsync=False)
    atomic_write_text(out_dir / "gpu.md", markdown(run), fsync=False)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(run: Run) -> str:
    """One section for RESULTS.md: card, targets, peak memory, parts (done, skipped, failed), then each
    part's own tables."""
    card = run.card
    date = card["date"][:10]
    if run.tiny:
        heading = f"## Tiny rehearsal of `benchmarks/gpu.py` (CPU, tiny configs; not GPU figures), {date}"
        where = f"{card['cpu']} ({card['threads']} thread(s))"
    else:
        heading = f"## GPU figures: {card.get('gpu', 'unknown GPU')}, {date} (`benchmarks/gpu.py`)"
        where = (f"{card.get('gpu')} ({card.get('gpu_memory_gib')} GiB), driver {card.get('driver')}, "
                 f"CUDA {card.get('cuda')}, cuDNN {card.get('cudnn')}; CPU {card['cpu']}")
    lines = [
        heading, "",
        f"Card: {where}; torch {card['torch']}, diffusers {card['diffusers']}, python {card['python']}; "
        f"{card['date']}.",
        f"Command: `{run.command}`; budget {run.budget_s:.0f} s, {run.elapsed():.0f} s used "
        "(from the start of `main`; imports before it).",
    ]
    if run.probe:
        lines.append(f"Probe: the UNet built in {run.probe.build_s:.1f} s; a text-only step took "
                     f"{run.probe.unit_s * 1e3:.1f} ms.")
    lines += ["", "**Targets** (each measured within one part, its variants interleaved)", "",
              "| part | the issue's target | measured | limit | met |", "| --- | --- | ---: | ---: | --- |"]
    for part in run.parts:
        if part["status"] != "done":
            lines += [f"| {part['name']} | {owed} | not measured ({part['status']}) | | n/a |" for owed in part["owes"]]
            continue
        for check in part["targets"]:
            value = check["value"]
            if value is None and check["met"] is None:
                continue  # a target of a step this part does not run
            shown = fmt(value, ".3f") if not isinstance(value, dict) else "see the part"
            note = f" ({check['note']})" if check.get("note") else ""
            verdict = {True: "yes", False: "**no**", None: "n/a"}[check["met"]]
            lines.append(f"| {part['name']} | {check['target']}{note} | {shown} | {check['limit']} | {verdict} |")
    peak_rows = [(part["name"], row) for part in run.parts for row in part.get("peaks", [])]
    lines += ["", "**Peak memory** (`torch.cuda.max_memory_allocated` over each variant's step, GiB)", ""]
    if peak_rows:
        lines += ["| part | step | variant | peak GiB | × ip_concat (same n) |", "| --- | --- | --- | ---: | ---: |"]
        lines += [f"| {name} | {row['step']} | {row['variant']} | {row['peak_gib']:.2f} | "
                  f"{fmt(row['vs_ip_concat'], '.3f')} |" for name, row in peak_rows]
    else:
        lines.append("None measured (measured on CUDA only).")
    lines += ["", "**Parts** (most important first)", "",
              "| part | status | seconds | estimated s | command |", "| --- | --- | ---: | ---: | --- |"]
    for part in run.parts:
        status = part["status"] if part["status"] == "done" else f"{part['status']}: {part['reason']}"
        lines.append(f"| {part['name']} | {status} | {part['seconds']:.1f} | {part['scaled_estimate_s']:.0f} | "
                     f"`{part['command']}` |")
    done = {part["name"] for part in run.parts}
    lines += [f"| {p.name} | not reached yet | - | - | |" for p in PARTS if p.name not in done]
    for part in run.parts:
        if part["status"] == "done":
            lines += ["", f"### {part['title']}", "", part["markdown_text"].rstrip()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="gpu-figures", help="where the JSON and Markdown go (made if missing)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the whole run may take (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a rehearsal, not GPU figures")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS),
                        help="which parts, comma-separated (they run in the fixed order)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in names if name not in {p.name for p in PARTS}]
    if unknown or not names:
        parser.error(f"--parts takes {', '.join(p.name for p in PARTS)}, got {args.parts!r}")
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    args.parts = [p for p in PARTS if p.name in names]
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on the GPU machine, or add --tiny for the CPU rehearsal")
    try:
        args.out_dir = check_output_dir(args.out_dir, "--out-dir")
    except (OSError, ValueError) as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # tiny tensors: a thread pool costs more than it saves
    device = torch.device("cpu" if args.tiny else "cuda")
    shown = list(sys.argv[1:] if argv is None else argv)
    run = Run(tiny=args.tiny, budget_s=args.budget, started=started, card=gpu_card(device),
              command=" ".join(["python", "benchmarks/gpu.py", *shown]))
    run.card["platform"] = platform.platform()

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"{len(args.parts)} parts, budget {args.budget:.0f} s; writing to {args.out_dir}")
    write_summary(run, args.out_dir)
    run_parts(run, args.parts, args.out_dir, log)
    write_summary(run, args.out_dir)
    skipped = [p["name"] for p in run.parts if p["status"] != "done"]
    log(f"\ndone in {run.elapsed():.0f} s of {args.budget:.0f}; "
        f"{len(run.parts) - len(skipped)} parts measured" + (f", not measured: {', '.join(skipped)}" if skipped else "")
        + f"\nwrote {args.out_dir / 'gpu.md'} (paste into benchmarks/RESULTS.md) and {args.out_dir / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
