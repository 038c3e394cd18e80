"""Run the pipeline over shards: rank assignment, resumable per-shard outputs, the final merge.

Output folder::

    run.json                  what was run (input, layout, config): a restart must match it
    shards/<shard>.jsonl      the shard's records            } written atomically, in this order;
    shards/<shard>.done.json  its completion record           } the .done.json marks the shard finished
    masks/<shard>/<id>.png    label maps (build)
    images/<shard>/<id>.jpg   images copied out of tar shards (build)
    manifest.jsonl            every scored image (merge), in shard order
    selected.jsonl            the top-K images by S_quality, best first (merge)
    selection.json            the three rankings' top-K ids with scores (merge)
    stats.json                counts, skipped inputs by reason, score statistics (merge)
    histogram.png             score histograms (merge)

Rank r of `world` owns shards r, r + world, ... of the sorted shard list. A shard whose completion
record exists is skipped; any other shard is redone from its start (its records file is replaced
whole, its mask files overwritten), so a killed run restarted with the same command loses and
duplicates nothing. The merge runs on the main process after all ranks are done (a barrier: shards
are dealt round-robin, so ranks finish within about one shard of each other; keep the process group's
timeout above one shard's time). `merge_dataset` redoes the merge alone, e.g. after ranks ran apart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mipadapter.data import pipeline, ranking, sources
from mipadapter.data.config import DataConfig
from mipadapter.data.stages import Backends
from mipadapter.fileio import atomic_write_text
from mipadapter.manifest import ImageRecord, read_manifest, write_manifest

logger = logging.getLogger(__name__)

ChunkFn = Callable[[Sequence[sources.Item], Backends, DataConfig, Path, sources.SkipLog], list[ImageRecord]]

# Config fields that do not change any shard's records: a restart may change them.
_RESTART_FREE = (
    "top_k",
    "histogram_bins",
    "batch_size",
    "caption_batch_size",
    "grounding_batch_size",
    "segment_batch_size",
    "clip_batch_size",
)


class IncompleteRunError(RuntimeError):
    """The merge found shards without a completion record."""


@dataclass
class Report:
    """What a run did; `text()` is the end-of-run message."""

    output: str
    shards_total: int = 0
    shards_processed: int = 0  # by this process in this run
    shards_already_done: int = 0  # of this process's shards, finished by an earlier run
    images_seen: int = 0  # all images read (of the shards counted)
    images_now: int = 0  # read by this process in this run: what the speed is measured on
    records: int = 0
    selected: int = 0
    merged: bool = False
    seconds: float = 0.0
    skips: sources.SkipLog = field(default_factory=sources.SkipLog)

    def text(self) -> str:
        lines = [
            f"shards: {self.shards_total} (this process: {self.shards_processed} processed now, "
            f"{self.shards_already_done} done by an earlier run)",
            f"images read: {self.images_seen}, scored: {self.records}"
            + (f", selected: {self.selected}" if self.merged else ""),
        ]
        if self.skips.counts:
            lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skips.counts.items())))
            for reason, names in sorted(self.skips.examples.items()):
                lines.append(f"  {reason}: e.g. {', '.join(names)}")
        else:
            lines.append("skipped: none")
        rate = self.images_now / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"time: {self.seconds:.1f} s ({rate:.2f} images/s); output: {self.output}")
        return "\n".join(lines)


# --- paths ------------------------------------------------------------------------------------------


def _records_path(output: Path, shard: str) -> Path:
    return output / "shards" / f"{shard}.jsonl"


def _done_path(output: Path, shard: str) -> Path:
    return output / "shards" / f"{shard}.done.json"


def _produced_anything(output: Path) -> bool:
    """Whether a run folder holds a finished shard."""
    return any((output / "shards").glob("*.done.json"))


def _check_run_file(
    output: Path, run: dict[str, Any], allow_change: Sequence[str] = (), *, write: bool = True
) -> None:
    """Record what is being run; refuse to resume a folder made by another input, other models or another
    config — unless each changed config key is in ``allow_change`` (it then applies to the shards not
    finished yet, and ``run.json``'s ``changes`` records it with the shards finished before it). A folder
    with no finished shard yet starts again with what it is given (its partial shard outputs go).
    write: False only checks (every rank, before the main process writes)."""
    from mipadapter.provenance import check_same_models, dotted_keys

    path = output / "run.json"
    if path.exists() and not _produced_anything(output) and write:
        for folder in ("shards", "masks", "images"):
            shutil.rmtree(output / folder, ignore_errors=True)
        path.unlink()
    if not path.exists() or not _produced_anything(output):
        if allow_change:
            raise ValueError(
                f"--allow-change {allow_change[0]}: output folder {str(output)!r} holds no finished shard, "
                "so the run starts with the settings as given"
            )
        if write:
            atomic_write_text(path, json.dumps({**run, "changes": []}, indent=2, sort_keys=True) + "\n")
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    if previous.get("models") is not None or run.get("models") is not None:
        check_same_models(output, previous.get("models"), run.get("models") or {})
    fixed = sorted(k for k in set(previous) | set(run) if k not in ("config", "models", "changes"))
    fixed = [k for k in fixed if previous.get(k) != run.get(k)]
    if fixed:
        raise ValueError(
            f"output folder {str(output)!r} holds a run with other {', '.join(fixed)}; use a new --output, "
            "or the same input to resume"
        )
    old, new = dotted_keys(previous.get("config", {})), dotted_keys(run.get("config", {}))
    changed = [
        {"key": k, "old": old.get(k), "new": new.get(k)} for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    ]
    refused = [c for c in changed if c["key"] not in allow_change]
    if refused:
        details = "; ".join(f"{c['key']}: {c['old']!r} → {c['new']!r}" for c in refused)
        raise ValueError(
            f"output folder {str(output)!r} holds a run with other settings ({details}): rerun with the same "
            "settings, allow them with --allow-change KEY (for the shards not finished yet), or use a new --output"
        )
    names = {c["key"] for c in changed}
    unchanged = [k for k in allow_change if k not in names]
    if unchanged:
        raise ValueError(
            f"--allow-change {unchanged[0]}: that setting is the same as the run's ({old.get(unchanged[0])!r})"
            if unchanged[0] in old
            else f"--allow-change {unchanged[0]}: no such setting"
        )
    if changed and write:
        done = sorted(p.name[: -len(".done.json")] for p in (output / "shards").glob("*.done.json"))
        history = previous.get("changes", []) + [{**c, "shards_done": done} for c in changed]
        atomic_write_text(path, json.dumps({**run, "changes": history}, indent=2, sort_keys=True) + "\n")


def _run_description(
    task: str, input_path: str, layout: str, config: DataConfig, shards: Sequence[sources.Shard]
) -> dict[str, Any]:
    settings = {k: v for k, v in config.to_dict().items() if k not in _RESTART_FREE}
    return {
        "task": task,
        "input": str(Path(input_path).resolve()),
        "layout": layout,
        "config": settings,
        "shards": [s.name for s in shards],
    }


# --- distributed context ----------------------------------------------------------------------------


@dataclass
class _Context:
    rank: int
    world_size: int
    device: Any
    state: Any = None  # accelerate.PartialState when launched through it

    def barrier(self) -> None:
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()


def _context(rank: int | None, world_size: int | None, device: Any) -> _Context:
    """Rank and device: given explicitly (tests, custom launchers) or from accelerate's PartialState."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(
                f"rank and world_size go together with 0 <= rank < world_size, got {rank} and {world_size}"
            )
        return _Context(rank, world_size, device)
    from mipadapter.launching import check_process_count, several_processes_note

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and several_processes_note():
        logger.warning(several_processes_note())
    if device is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # one process with a device chosen by the caller: nothing to ask accelerate (a slow import)
        return _Context(0, 1, device)
    from accelerate import PartialState  # optional dependency (the `data` extra)

    # ranks on CPUs only join through gloo when asked, as accelerate's Accelerator reads it
    # (ACCELERATE_USE_CPU=true); without it every process would believe it is the only one
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu)
    check_process_count(state.num_processes)
    return _Context(
        state.process_index, state.num_processes, device if device is not None else state.device, state
    )


# --- shards -----------------------------------------------------------------------------------------


def process_shard(
    shard: sources.Shard,
    chunk_fn: ChunkFn,
    backends: Backends,
    config: DataConfig,
    output: Path,
    bar: Any = None,
) -> dict[str, Any]:
    """Run one shard from its start and write its records, then its completion record (both atomically)."""
    started = time.perf_counter()
    skips = sources.SkipLog()
    records: list[ImageRecord] = []
    seen = 0
    chunk: list[sources.Item] = []

    def flush() -> None:
        records.extend(chunk_fn(chunk, backends, config, output, skips))
        if bar is not None:
            bar.update(len(chunk))
        chunk.clear()

    for item in sources.iter_items(shard, skips):
        seen += 1
        chunk.append(item)
        if len(chunk) == config.batch_size:
            flush()
    if chunk:
        flush()
    write_manifest(records, _records_path(output, shard.name))
    done = {
        "shard": shard.name,
        "images_seen": seen,
        "records": len(records),
        "skipped": skips.to_dict(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(_done_path(output, shard.name), json.dumps(done, indent=2, sort_keys=True) + "\n")
    return done


def _progress(enabled: bool, rank: int, total: int | None):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="img", desc=f"rank {rank}", position=rank, disable=not enabled, dynamic_ncols=True
    )


def run_shards(
    shards: Sequence[sources.Shard],
    chunk_fn: ChunkFn,
    backends: Backends,
    config: DataConfig,
    output: Path,
    rank: int,
    world_size: int,
    progress: bool = True,
) -> Report:
    """Process this rank's unfinished shards (rank r owns shards r::world_size)."""
    report = Report(output=str(output), shards_total=len(shards))
    mine = list(shards[rank::world_size])
    todo = [s for s in mine if not _done_path(output, s.name).exists()]
    report.shards_already_done = len(mine) - len(todo)
    if report.shards_already_done:
        logger.info("rank %d: %d of its %d shards already done", rank, report.shards_already_done, len(mine))
    known = [len(s.members) for s in todo]
    total = sum(known) if todo and all(known) else None  # tar shards: sizes unknown without a pass
    started = time.perf_counter()
    with _progress(progress, rank, total) as bar:
        for shard in todo:
            bar.set_postfix_str(shard.name)
            done = process_shard(shard, chunk_fn, backends, config, output, bar)
            report.shards_processed += 1
            report.images_seen += done["images_seen"]
            report.images_now += done["images_seen"]
            report.records += done["records"]
            report.skips.merge(sources.SkipLog.from_dict(done["skipped"]))
    report.seconds = time.perf_counter() - started
    return report


# --- merge ------------------------------------------------------------------------------------------


def merge(output: str | os.PathLike, shards: Sequence[str], config: DataConfig) -> Report:
    """Join the named shards' records (in that order) into the manifest, rank them, write selection and stats."""
    output = Path(output)
    missing = [s for s in shards if not _done_path(output, s).exists()]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise IncompleteRunError(
            f"{len(missing)} of {len(shards)} shards are not finished ({shown}); rerun the same "
            "command to finish them"
        )
    report = Report(output=str(output), shards_total=len(shards), merged=True)
    records: list[ImageRecord] = []
    first_shard: dict[str, str] = {}
    for shard in shards:
        done = json.loads(_done_path(output, shard).read_text(encoding="utf-8"))
        report.images_seen += done["images_seen"]
        report.skips.merge(sources.SkipLog.from_dict(done["skipped"]))
        for record in read_manifest(_records_path(output, shard)):
            if record.id in first_shard:
                raise ValueError(
                    f"image id {record.id!r} occurs in shards {first_shard[record.id]!r} and {shard!r}"
                )
            first_shard[record.id] = shard
            records.append(record)
    report.records = len(records)
    write_manifest(records, output / "manifest.jsonl")
    rankings = {name: ranking.rank(records, name, config.top_k) for name in ranking.RANKINGS}
    rankings = {name: ranked for name, ranked in rankings.items() if ranked or name == "s_quality"}
    by_id = {r.id: r for r in records}
    selected = [by_id[r.id] for r in rankings["s_quality"]]
    report.selected = len(selected)
    write_manifest(selected, output / "selected.jsonl")
    selection = {name: [(r.id, r.score) for r in ranked] for name, ranked in rankings.items()}
    atomic_write_text(output / "selection.json", _selection_json(config, len(records), selection))
    stats = {
        "images_seen": report.images_seen,
        "records": len(records),
        "selected": len(selected),
        "skipped": report.skips.to_dict(),
        "scores": ranking.summary(records),
        "selected_scores": ranking.summary(selected),
    }
    atomic_write_text(output / "stats.json", json.dumps(stats, indent=2) + "\n")
    threshold = rankings["s_quality"][-1].score if rankings["s_quality"] else None
    if not ranking.draw_histograms(records, str(output / "histogram.png"), config.histogram_bins, threshold):
        logger.warning("no scored images: histogram.png not written")
    return report


def _selection_json(config: DataConfig, total: int, rankings: dict[str, list[tuple[str, float]]]) -> str:
    """selection.json: {"mode", "top_k", "records", "rankings": {name: [{"id", "score"}, ...]}}, one entry a line."""
    head = json.dumps({"mode": config.mode, "top_k": config.top_k, "records": total})[:-1]
    blocks = []
    for name, ranked in rankings.items():
        entries = ",\n".join(f"    {json.dumps({'id': i, 'score': v})}" for i, v in ranked)
        blocks.append(f"  {json.dumps(name)}: [\n{entries}\n  ]" if ranked else f"  {json.dumps(name)}: []")
    return head + ', "rankings": {\n' + ",\n".join(blocks) + "\n}}\n"


# --- entry points -----------------------------------------------------------------------------------


def _run(
    task: str,
    chunk_fn: ChunkFn,
    shards: list[sources.Shard],
    input_path: str,
    layout: str,
    output: str | os.PathLike,
    config: DataConfig,
    backends: Backends | None,
    load: Callable[[Any], Backends],
    device: Any,
    rank: int | None,
    world_size: int | None,
    do_merge: bool,
    progress: bool,
    models: dict[str, Any] | None = None,
    allow_change: Sequence[str] = (),
) -> Report:
    started = time.perf_counter()
    output = Path(output)
    context = _context(rank, world_size, device)
    description = {**_run_description(task, input_path, layout, config, shards), "models": models}
    _check_run_file(output, description, allow_change, write=False)  # every rank: refused before writing
    context.barrier()
    if context.rank == 0 or context.state is None:  # ranks run apart (explicit ranks) write for themselves
        output.mkdir(parents=True, exist_ok=True)
        _check_run_file(output, description, allow_change)
    context.barrier()
    mine_todo = [
        s for s in shards[context.rank :: context.world_size] if not _done_path(output, s.name).exists()
    ]
    if backends is None and mine_todo:
        if context.device is None:
            raise ValueError(
                "no backends given and no device to load models onto: pass device= or launch with accelerate"
            )
        backends = load(context.device)
    report = run_shards(
        shards, chunk_fn, backends, config, output, context.rank, context.world_size, progress
    )
    context.barrier()
    if do_merge and context.rank == 0:
        merged = merge(output, [s.name for s in shards], config)
        merged.shards_processed = report.shards_processed
        merged.shards_already_done = report.shards_already_done
        merged.images_now = report.images_now
        report = merged
    context.barrier()
    report.seconds = time.perf_counter() - started
    return report


def build_dataset(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    config: DataConfig | None = None,
    *,
    layout: str = "auto",
    backends: Backends | None = None,
    device: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    merge: bool = True,
    progress: bool = True,
    models: dict[str, Any] | None = None,
    allow_change: Sequence[str] = (),
) -> Report:
    """Caption, ground, segment and score raw images (SA-1B tars or a folder) into a training set.

    backends: stages to use; default the transformers models of `config`, loaded onto `device`.
    device: where models go; default accelerate's device for this process.
    rank, world_size: this process's share; default from accelerate (`accelerate launch`).
    merge: build the global manifest and rankings once every shard is done (main process only).
    models: ``{config key: identity}`` of the models (`mipadapter.provenance`), recorded in ``run.json``
    and compared on a resume. allow_change: config keys (``box_threshold``, ``filters.min_score``) a
    resume may change; the change applies to the shards not finished yet and ``run.json`` records it.
    """
    config = config or DataConfig()
    if layout == "authors":
        raise ValueError(
            "the authors' layout already has objects and masks: use score_dataset (`data score`)"
        )
    shards = sources.list_shards(input_path, layout, config.images_per_shard)
    layout = shards[0].layout

    def load(device: Any) -> Backends:
        from mipadapter.data.backends import load_backends

        return load_backends(config, device)

    return _run(
        "build",
        pipeline.build_chunk,
        shards,
        str(input_path),
        layout,
        output,
        config,
        backends,
        load,
        device,
        rank,
        world_size,
        merge,
        progress,
        models,
        allow_change,
    )


def score_dataset(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    config: DataConfig | None = None,
    *,
    layout: str = "authors",
    ids: list[str] | None = None,
    backends: Backends | None = None,
    device: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    merge: bool = True,
    progress: bool = True,
    models: dict[str, Any] | None = None,
    allow_change: Sequence[str] = (),
) -> Report:
    """Score an existing set in the authors' layout (objects and label maps given) and rank it.

    ids: the ids to score (e.g. their released selection); default every `jsons/*.json`.
    The manifest references the input's images and masks by relative path; nothing is copied.
    models, allow_change: as `build_dataset`.
    """
    config = config or DataConfig()
    if layout != "authors":
        raise ValueError(f"score reads the authors' layout (images/, masks/, jsons/), got layout {layout!r}")
    shards = sources.list_shards(input_path, "authors", config.images_per_shard, ids=ids)

    def load(device: Any) -> Backends:
        from mipadapter.data.backends import load_backends

        return load_backends(config, device, stages=("clip",))

    return _run(
        "score",
        pipeline.score_chunk,
        shards,
        str(input_path),
        "authors",
        output,
        config,
        backends,
        load,
        device,
        rank,
        world_size,
        merge,
        progress,
        models,
        allow_change,
    )


def merge_dataset(output: str | os.PathLike, top_k: int | None = None) -> Report:
    """Redo only the merge of a finished run, e.g. with another `top_k`; shards and config come from run.json."""
    import dataclasses

    from mipadapter.data.config import data_config_from_dict

    output = Path(output)
    run_file = output / "run.json"
    if not run_file.exists():
        raise FileNotFoundError(
            f"{str(run_file)!r} not found: {str(output)!r} is not the output of a data run"
        )
    run = json.loads(run_file.read_text(encoding="utf-8"))
    config = data_config_from_dict(run["config"])
    if top_k is not None:
        config = dataclasses.replace(config, top_k=top_k)
    return merge(output, run["shards"], config)
