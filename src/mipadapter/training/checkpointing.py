"""Run checkpoints: written to a temporary folder then renamed (a reader sees a whole checkpoint or
none), the newest ``keep_last`` kept.

A checkpoint folder ``<output_dir>/checkpoints/step-XXXXXXXX`` holds::

    adapter.safetensors     the whole adapter in our format (loads with `mipadapter.load_adapter`)
    optimizer.pt            optimizer state (identical on every process)
    scheduler.pt            LR schedule and, with fp16, the gradient scaler
    rng-<rank>.pt           each process's RNG states: python, numpy, torch CPU/CUDA, the step generator
    trainer_state.json      step, global batches consumed, skip counters, config fingerprints

``trainer_state.json`` is written last, so a folder without it is incomplete and ignored.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mipadapter.fileio import atomic_write_text

STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")
_TEMP_NAME = re.compile(r"^\.tmp-step-(\d{8})$")


@dataclass
class TrainerState:
    """step: optimiser steps done; batches: global (micro-)batches consumed, the data position."""

    step: int = 0
    batches: int = 0
    skipped_samples: dict[str, int] = field(default_factory=dict)
    skipped_batches: int = 0
    fingerprint: str = ""
    world_size: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG of this process as tensors and numbers (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temp_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-step-{step:08d}"


def final_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:08d}"


def write_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    """Each process writes its own RNG file into the temporary folder."""
    torch.save(rng_state(generator), folder / f"rng-{rank}.pt")


def write_main(folder: Path, adapter, optimizer, scheduler_state: dict, state: TrainerState) -> None:
    """The main process's part: weights, optimizer, schedule (the trainer state comes in `finish`)."""
    from mipadapter.checkpoint import save_adapter

    save_adapter(adapter, folder / ADAPTER_FILE)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler_state, folder / "scheduler.pt")


def finish(folder: Path, output_dir: str | Path, state: TrainerState, keep_last: int) -> Path:
    """Write the trainer state, rename the folder into place, drop checkpoints beyond ``keep_last``."""
    atomic_write_text(folder / STATE_FILE, state.to_json())
    target = final_dir(output_dir, state.step)
    if target.exists():
        shutil.rmtree(target)
    folder.rename(target)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_unfinished(output_dir: str | Path) -> list[Path]:
    """Remove the temporary checkpoint folders (``.tmp-step-*``) a run killed while saving left; returns
    them. A complete checkpoint is renamed out of its temporary name, so none of these is one."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    unfinished = sorted(
        p for p in root.iterdir() if _TEMP_NAME.match(p.name) and p.is_dir() and not p.is_symlink()
    )
    for folder in unfinished:
        shutil.rmtree(folder)
    return unfinished


def prepare_temp(output_dir: str | Path, step: int) -> Path:
    folder = temp_dir(output_dir, step)
    if folder.exists():
        shutil.rmtree(folder)  # left by a run killed while writing
    folder.mkdir(parents=True)
    return folder


@dataclass
class LoadedCheckpoint:
    folder: Path
    state: TrainerState
    optimizer: dict
    scheduler: dict
    rng: dict | None  # this process's RNG states; None when the checkpoint had fewer processes


def read_checkpoint(folder: str | Path, rank: int) -> LoadedCheckpoint:
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {STATE_FILE})")
    state = TrainerState.from_json((folder / STATE_FILE).read_text(encoding="utf-8"))
    rng_file = folder / f"rng-{rank}.pt"
    return LoadedCheckpoint(
        folder=folder,
        state=state,
        optimizer=torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
        scheduler=torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True),
        rng=torch.load(rng_file, weights_only=True) if rng_file.is_file() else None,
    )
