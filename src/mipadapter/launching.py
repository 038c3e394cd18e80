"""How many processes a run really has, against what ``accelerate launch`` was asked for (layer 0).

Two ways a launch on CPUs silently goes wrong, both told apart by the environment accelerate sets:

* ``accelerate launch --num_processes 2`` without ``--multi_gpu`` starts *one* process (its simple
  launcher sets ``MASTER_ADDR`` for the rendezvous, but no ``WORLD_SIZE``): the run is right, only not
  shared. `several_processes_note` says so in one line with the fix.
* ``--multi_gpu`` without ``ACCELERATE_USE_CPU=true`` on a machine without a GPU per process starts N
  processes (``WORLD_SIZE`` = N) that each see a world of one and would each do the whole job in the same
  folder. `check_process_count` refuses that in one line with the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["CPU_FORM", "check_process_count", "several_processes_note"]

CPU_FORM = "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m ..."


def several_processes_note(env: Mapping[str, str] = os.environ) -> str | None:
    """A one-line note when accelerate's simple launcher was asked for several processes and so runs one."""
    launched = "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env
    if launched and "WORLD_SIZE" not in env:
        return (
            "accelerate launch was asked for several processes but started one (no --multi_gpu): this run "
            f"does all the work alone; to share it on CPUs use `{CPU_FORM}`"
        )
    return None


def check_process_count(seen: int, env: Mapping[str, str] = os.environ) -> None:
    """Refuse a process that was launched as one of ``WORLD_SIZE`` > 1 but joined a world of ``seen`` = 1."""
    launched = int(env.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and seen == 1:
        raise RuntimeError(
            f"accelerate launched {launched} processes, but each sees only itself (no GPU per process), so "
            f"each would run the whole job: on CPUs launch with `{CPU_FORM}` (ACCELERATE_USE_CPU=true)"
        )
