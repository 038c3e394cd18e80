"""What the step benchmarks share: a timed variant, the clock, round-robin rounds, and the run's card.

``unet_step.py`` and ``flux_step.py`` import it from beside them (they put their own folder first on
``sys.path``, so ``python benchmarks/<script>.py`` and the smoke tests' loaders both find it).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import diffusers
import torch

from mipadapter.fileio import atomic_write_text


@dataclass
class Variant:
    """One timed configuration: its label, kind (which processors the bench installs), subjects, rule, and
    what the rounds measured."""

    name: str
    kind: str
    subjects: int
    rule: str | None = None
    times_ms: list[float] = field(default_factory=list)  # by the clock --timer picks
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # process CPU time (CPU runs only)
    peak_gib: list[float] = field(default_factory=list)


def timed_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """(elapsed ms, process CPU ms or None): CUDA events on GPU; ``perf_counter`` and ``process_time`` on CPU.

    On a CPU shared with other jobs, wall-clock time swings with their load while the process's own CPU
    time stays put (with one thread, no spinning workers): ``--timer cpu`` ranks variants by it.
    """
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


def run_interleaved(bench, variants: list[Variant], step: Callable[[Variant], Callable[[], object]],
                    warmup: int, repeats: int, log: Callable[[str], None], timer: str = "wall",
                    deadline: float | None = None) -> int:
    """Every variant once per round, round-robin; ``warmup`` untimed rounds first. ``bench.installed(variant)``
    installs a variant's processors; ``step(variant)`` returns the call to time.

    ``deadline`` (a ``time.monotonic()`` value): after the first timed round, no round starts that the last
    round's duration says would end past it, so a run under a time budget keeps every variant's rounds even
    (fewer of them) instead of overrunning. Returns the number of timed rounds run."""
    cuda = bench.device.type == "cuda"
    timed_rounds, last_round_s = 0, 0.0
    for round_index in range(warmup + repeats):
        if deadline is not None and timed_rounds and time.monotonic() + last_round_s > deadline:
            log(f"  stopped after {timed_rounds} of {repeats} timed rounds: the time budget is spent")
            break
        round_start = time.monotonic()
        timed_round = round_index >= warmup
        for variant in variants:
            with bench.installed(variant):
                fn = step(variant)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(bench.device)
                elapsed, cpu_elapsed = timed_ms(fn, bench.device)
                peak = torch.cuda.max_memory_allocated(bench.device) / 2**30 if cuda else None
            if timed_round:
                variant.wall_ms.append(elapsed)
                if cpu_elapsed is not None:
                    variant.cpu_ms.append(cpu_elapsed)
                variant.times_ms.append(cpu_elapsed if timer == "cpu" and cpu_elapsed is not None else elapsed)
                if peak is not None:
                    variant.peak_gib.append(peak)
        timed_rounds += timed_round
        last_round_s = time.monotonic() - round_start
        log(f"  round {round_index + 1}/{warmup + repeats}{'' if timed_round else ' (warm-up)'} done")
    return timed_rounds


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def card(device: torch.device) -> dict:
    """Where and with what the run ran (date, versions, device, CPU model, threads; the GPU when CUDA)."""
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


def write_outputs(result: dict, out: str | None, markdown_path: str | None, markdown: Callable[[dict], str],
                  log: Callable[[str], None]) -> int:
    """Write the run as JSON (``--out``) and Markdown (``--markdown``) when asked, each atomically (a run
    killed mid-write leaves the previous file or none, never half of one); returns 0."""
    if out:
        atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False))
        log(f"\nwrote {out}")
    if markdown_path:
        atomic_write_text(markdown_path, markdown(result))
        log(f"wrote {markdown_path}")
    return 0
