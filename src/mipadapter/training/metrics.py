"""Metrics of a run: one JSON object a line in ``<output_dir>/logs/metrics.jsonl``, mirrored to
TensorBoard when the ``tensorboard`` package is installed (main process only).

A resumed run repeats the steps after its checkpoint, so the log first drops the rows of those steps
(``resume_step``): each step appears once, from the run whose weights continued.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path


class MetricsLog:
    """resume_step: keep only the rows of steps up to it from an earlier run (None: keep everything)."""

    def __init__(
        self, output_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.folder = Path(output_dir) / "logs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            drop_rows_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._writer = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        record = {"step": step, **{k: v for k, v in values.items() if not _bad_number(v)}}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not _bad_number(value):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite ``path`` (atomically) without the rows of steps above ``step`` and any half-written last
    line; returns the number of rows dropped."""
    from mipadapter.fileio import atomic_write_text

    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def _bad_number(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
