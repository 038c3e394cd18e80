"""The benchmarks' round-robin timer stops its timed rounds before a deadline, every variant alike."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("benchmark_harness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


class SleepingBench:
    device = torch.device("cpu")

    def installed(self, variant):
        return contextlib.nullcontext()


def _variants(harness):
    return [harness.Variant("a", "text_only", 0), harness.Variant("b", "ip_concat", 2)]


@pytest.mark.parametrize("sleep_s, deadline_s", [(0.02, 0.09), (0.01, 0.3)])
def test_timed_rounds_stop_before_the_deadline(harness, sleep_s, deadline_s):
    variants = _variants(harness)
    begin = time.monotonic()
    done = harness.run_interleaved(SleepingBench(), variants, lambda v: (lambda: time.sleep(sleep_s)),
                                   warmup=1, repeats=50, log=lambda message: None, deadline=begin + deadline_s)
    # a round is 2 variants × sleep_s; no round starts that would end past the deadline (the warm-up and the
    # first timed round always run); the slack is for a busy machine's late wake-ups
    assert time.monotonic() - begin <= max(deadline_s, 2 * 2 * sleep_s) + 0.1
    assert 1 <= done < 50
    assert [len(v.times_ms) for v in variants] == [done, done]  # every variant the same number of rounds


def test_without_a_deadline_every_round_runs(harness):
    variants = _variants(harness)
    assert harness.run_interleaved(SleepingBench(), variants, lambda v: (lambda: None), warmup=2, repeats=4,
                                   log=lambda message: None) == 4
    assert [len(v.times_ms) for v in variants] == [4, 4]
