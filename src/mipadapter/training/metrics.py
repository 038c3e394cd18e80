"""Metrics of a run: one JSON object a line in ``<output_dir>/logs/metrics.jsonl``, mirrored to
TensorBoard when the ``tensorboard`` package is installed (main process only)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True) -> None:
        self.folder = Path(output_dir) / "logs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
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


def _bad_number(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
