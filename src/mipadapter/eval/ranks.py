"""Which share of a benchmark this process generates: one process, or one rank of ``accelerate launch``.

Rank ``r`` of ``world`` processes takes items ``r, r + world, ...`` of the run's ordered work list (the
(case, seed) pairs of each variant): disjoint slices of equal size, dealt round-robin so that ranks
finish within about one item of each other. Every file is written atomically and skipped when it
exists, so a rerun (with any number of processes) only fills the gaps. The main process (rank 0)
writes the run's own files, and scores once every rank is done.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from mipadapter.launching import check_process_count, several_processes_note

logger = logging.getLogger(__name__)

__all__ = ["Ranks", "current_ranks"]


@dataclass
class Ranks:
    """This process's rank among ``world_size``; ``state`` is accelerate's PartialState when launched
    through it (None for a single process or explicit ranks)."""

    rank: int = 0
    world_size: int = 1
    state: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank and world_size go together with 0 <= rank < world_size, got {self.rank} and {self.world_size}"
            )

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: list) -> list:
        """This rank's slice of an ordered work list."""
        return items[self.rank :: self.world_size]

    def barrier(self) -> None:
        """Wait for every rank (a no-op for one process or explicit ranks)."""
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()


def current_ranks(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """Explicit ranks (tests, custom launchers), else accelerate's when ``WORLD_SIZE`` > 1, else one process."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError(f"rank and world_size go together, got {rank} and {world_size}")
        return Ranks(rank, world_size)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        note = several_processes_note()
        if note:
            logger.warning(note)
        return Ranks()
    from accelerate import PartialState  # only when launched by accelerate (a slow import)

    # processes on CPUs (no GPU per rank) join through gloo only when asked, as accelerate's Accelerator
    # reads it: ACCELERATE_USE_CPU=true (e.g. `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...`)
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu)
    check_process_count(state.num_processes)
    return Ranks(state.process_index, state.num_processes, state)
