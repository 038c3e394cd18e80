"""The accelerate training loop: one process per GPU (``accelerate launch``), main process writes.

A run lives in ``run.output_dir``::

    config.json                           the config, the models' identities, settings changed (`runrecord`)
    data/index.jsonl, data/report.json    the filtered training index (a manifest) and what was skipped
    checkpoints/step-XXXXXXXX/            resumable checkpoints (see `checkpointing`)
    logs/metrics.jsonl                    loss, lr, throughput, skip counts (+ logs/tensorboard/)
    validation/step-XXXXXXXX/NN.png       validation images
    export/                               the final adapter in the chosen formats (see `export`)

Killed and started again with the same command, a run continues from its newest checkpoint: adapter
weights, optimizer, LR schedule, gradient scaler, every RNG and the data position are restored, so the
continued run computes what an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mipadapter.fileio import atomic_write_text, remove_stale_temporaries
from mipadapter.manifest import read_manifest, write_manifest
from mipadapter.training import checkpointing as ckpt
from mipadapter.training import runrecord
from mipadapter.training.batching import (
    Collator,
    EmptyBatch,
    ResumableBatchSampler,
    SubjectDataset,
    TrainBatch,
)
from mipadapter.training.components import (
    Components,
    build_adapter,
    check_model_files,
    load_components,
    set_trainable,
)
from mipadapter.training.config import TrainConfig
from mipadapter.training.export import export_adapter
from mipadapter.training.metrics import MetricsLog
from mipadapter.training.samples import SampleSettings
from mipadapter.training.sources import SubjectRules, authors_candidates, build_index, manifest_candidates
from mipadapter.training.step import AdapterUNet, FrozenModels, training_loss
from mipadapter.training.text import TextConditioner

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# data settings that change what a run trains on (worker counts do not)
_DATA_KEYS_IGNORED = ("num_workers", "scan_workers", "warn_skipped_share")


@dataclass
class TrainResult:
    step: int
    finished: bool
    output_dir: Path
    last_checkpoint: Path | None
    exports: dict[str, Path] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    main_process: bool = True  # False on the other processes of a launch (they print nothing)


# --- data ---------------------------------------------------------------------------------------------


def data_fingerprint(config: TrainConfig) -> str:
    data = config.to_dict()["data"]
    for key in _DATA_KEYS_IGNORED:
        data.pop(key)
    return json.dumps(data, sort_keys=True)


def subject_rules(config: TrainConfig) -> SubjectRules:
    """The subject rules of the config's data section (index time and every sample's crop)."""
    d = config.data
    return SubjectRules(
        d.filters.object_filter(),
        d.filters.min_mask_fill,
        d.min_subjects,
        d.max_subjects,
        authors_box_check=d.filters.authors_box_check,
        post_crop_filter=d.filters.post_crop_filter,
        duplicate_names=d.filters.duplicate_names,
        crop=d.crop,
        resolution=d.resolution,
    )


def prepare_index(config: TrainConfig, write: bool) -> list:
    """The training index of this run: read from ``data/index.jsonl`` when a previous start of the same
    run built it (same data settings), else built from the source (and written when ``write``)."""
    d = config.data
    folder = Path(config.run.output_dir) / "data"
    index_path, report_path = folder / "index.jsonl", folder / "report.json"
    fingerprint = data_fingerprint(config)
    if index_path.is_file() and report_path.is_file():
        saved = json.loads(report_path.read_text(encoding="utf-8"))
        if saved.get("data_config") != fingerprint:
            raise ValueError(
                f"{report_path} was built with other data settings ({saved.get('data_config')}); this run "
                f"has {fingerprint}: restore them or use a new run.output_dir"
            )
        return read_manifest(index_path)
    if d.format == "authors":
        keys, read = authors_candidates(d.root, d.ids_file)
    else:
        keys, read = manifest_candidates(d.root)
    records, report = build_index(keys, read, subject_rules(config), workers=d.scan_workers, limit=d.limit)
    if write:  # the main process builds the index; the others read what it wrote
        for line in report.lines(d.warn_skipped_share):
            print(line, file=sys.stderr)
        write_manifest(records, index_path)
        atomic_write_text(report_path, json.dumps({**report.to_dict(), "data_config": fingerprint}, indent=2))
    return records


# --- resume -------------------------------------------------------------------------------------------


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """What a run killed while writing left in its folder: the temporary files of interrupted atomic
    writes (config, index, logs, exports, checkpoints, validation images) and unfinished checkpoint
    folders. Run by the main process at the start of ``train``, before anything writes there."""
    root = Path(output_dir)
    folders = [root, root / "data", root / "logs", root / "export"]
    for parent in (ckpt.checkpoint_root(root), root / "validation"):
        if parent.is_dir():
            folders += sorted(p for p in parent.iterdir() if p.is_dir() and not p.is_symlink())
    removed = [path for folder in folders for path in remove_stale_temporaries(folder)]
    return removed + ckpt.remove_unfinished(root)



def resume_source(config: TrainConfig) -> Path | None:
    run = config.run
    if run.resume == "never":
        if ckpt.list_checkpoints(run.output_dir):
            raise FileExistsError(
                f"{run.output_dir} already holds checkpoints and run.resume is 'never': use a new output_dir"
            )
        return None
    if run.resume == "auto":
        return ckpt.latest_checkpoint(run.output_dir)
    path = Path(run.resume)
    if not (path / ckpt.STATE_FILE).is_file():
        raise FileNotFoundError(f"run.resume {run.resume!r} is not a complete checkpoint folder")
    return path


def check_run_inputs(config: TrainConfig) -> None:
    """The paths a run reads and writes, before anything loads; errors name the config key."""
    from mipadapter.fileio import check_creatable_dir
    from mipadapter.photos import photo_size

    d = config.data
    root = Path(d.root)
    if d.format == "authors" and not root.is_dir():
        raise FileNotFoundError(f"data.root {d.root!r} is not a folder (the authors' layout: images/, masks/, jsons/)")
    if d.format == "manifest" and not root.is_file():
        raise FileNotFoundError(f"data.root {d.root!r} is not a manifest file (data.format is 'manifest')")
    if d.ids_file is not None and not Path(d.ids_file).is_file():
        raise FileNotFoundError(f"data.ids_file {d.ids_file!r} does not exist")
    check_creatable_dir(config.run.output_dir, "run.output_dir")  # made once every check passed
    for number, item in enumerate(config.validation.prompts):
        for subject in item.subjects:
            photo_size(subject.image, f"validation.prompts[{number}] image of {subject.name!r}")


def fit_precision(config: TrainConfig, device_type: str) -> tuple[TrainConfig, str | None]:
    """The config with a mixed precision the device can train in, and a one-line note when it changed:
    ``fp16`` needs a GPU (on a CPU autocast has no float16 matmuls), so there it becomes ``bf16``."""
    if config.optim.mixed_precision != "fp16" or device_type != "cpu":
        return config, None
    optim = dataclasses.replace(config.optim, mixed_precision="bf16")
    note = (
        "optim.mixed_precision: fp16 cannot train on a CPU; this run uses bf16 "
        "(set optim.mixed_precision: bf16 or no to say so)"
    )
    return dataclasses.replace(config, optim=optim), note


def check_resume(
    config: TrainConfig,
    source: Path | None,
    identities: dict | None,
    allow_change: Sequence[str],
) -> tuple[dict, list[dict]]:
    """Before any model loads: a resume (``source``) must use the models the run records and change no
    setting that ``allow_change`` does not name (see `runrecord`). Returns the record to write and the
    changes this call applies (each with the step it takes effect at)."""
    from mipadapter.provenance import check_same_models

    output_dir = Path(config.run.output_dir)
    recorded = runrecord.read_record(output_dir)
    if source is None or recorded is None:  # a new run, or one without a checkpoint yet: starts as given
        if allow_change:
            raise ValueError(
                f"--allow-change {allow_change[0]}: run.output_dir {str(output_dir)!r} holds no checkpoint "
                "to resume, so the run starts with the config as given"
            )
        return {**config.to_dict(), "models": identities, "changes": []}, []
    if identities is not None:
        check_same_models(output_dir, recorded.get("models"), identities)
    changes = runrecord.check_changes(output_dir, recorded, config, allow_change)
    step = json.loads((source / ckpt.STATE_FILE).read_text(encoding="utf-8"))["step"]
    changes = [{"step": step, **change} for change in changes]
    history = [c for c in recorded.get("changes", []) if c.get("step", 0) <= step] + changes
    return {**config.to_dict(), "models": recorded.get("models"), "changes": history}, changes


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- the loop -----------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    components: Components | Callable[[], Components] | None = None,
    stop_after: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    identities: dict | None = None,
    allow_change: Sequence[str] = (),
    notify: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or continue training) the adapter described by ``config``.

    components: already loaded models (tests, notebooks), or a function that builds them once the run's
    checks pass (``--tiny``); by default loaded from ``config.model``. stop_after: run at most this many
    optimiser steps in this call, then checkpoint and return (for time-limited jobs; the next call
    continues). on_step(step, loss): called after every step
    on every process (an exception from it ends the run as a kill would). identities: ``{role: identity}``
    of the models (`runrecord`); by default found from ``config.model`` when the models are loaded here,
    none recorded or checked when ``components`` are given without them. allow_change: the settings a
    resume may change (dotted keys, e.g. ``optim.learning_rate``): the change takes effect at the resumed
    step and is recorded with it in ``config.json`` and ``logs/metrics.jsonl``. notify: where the main
    process's one-line notes go (a resume, a precision replaced, a change applied); default the log.
    """
    from accelerate import Accelerator, PartialState
    from diffusers.optimization import get_scheduler

    from mipadapter.launching import check_process_count, several_processes_note

    say = notify if notify is not None else logger.info
    output_dir = Path(config.run.output_dir)
    # processes on CPUs join through gloo only when asked (ACCELERATE_USE_CPU=true), as Accelerator reads it
    launched = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    check_process_count(launched.num_processes)  # before anything is written
    check_run_inputs(config)
    config, precision_note = fit_precision(config, launched.device.type)
    o, r = config.optim, config.run
    accelerator = Accelerator(mixed_precision=o.mixed_precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    source = resume_source(config)
    if components is None and source is None:
        check_model_files(config.model)  # the adapter file and the configs, before minutes of loading
    if identities is None and components is None:
        identities = runrecord.model_identities(config.model)
    record, changes = check_resume(config, source, identities, allow_change)
    if main:
        for note in (several_processes_note(), precision_note):
            if note:
                say(note)
        if source is None and ckpt.list_checkpoints(output_dir) == [] and (output_dir / "data").is_dir():
            _drop_stale_index(config)  # a run with no checkpoint yet starts again with its new data settings
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_leftovers(output_dir):
            logger.info("removed %s, left by an interrupted write", path)
        atomic_write_text(output_dir / runrecord.RECORD_FILE, json.dumps(record, indent=2, sort_keys=True))
    _seed_everything(o.seed + rank)
    generator = torch.Generator().manual_seed(o.seed * 7919 + rank)  # noise, timesteps, latent samples

    with accelerator.main_process_first():
        records = prepare_index(config, write=main)
    if callable(components):
        components = components()
    components = components if components is not None else load_components(config.model)

    if source is not None:
        from mipadapter.checkpoint import load_adapter

        adapter = load_adapter(source / ckpt.ADAPTER_FILE, components.unet)
        if adapter.config.text_weight != config.model.text_weight:
            raise ValueError(
                f"{source} has text_weight={adapter.config.text_weight}, the config says otherwise"
            )
    else:
        adapter = build_adapter(
            config.model, components.unet, components.image_encoder, components.start_adapter
        )
    params = set_trainable(adapter, config.model.train_image_proj)
    adapter.attach(components.unet)
    try:
        weight_dtype = DTYPES[o.mixed_precision]
        cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
        # the authors keep the frozen UNet in float32 and let autocast run it in half precision
        unet_cast = cast if o.unet_precision == "mixed" else {"dtype": torch.float32}
        if unet_cast.get("dtype") == components.unet.dtype:
            unet_cast = {}  # already so: diffusers warns about every dtype cast of a model
        components.unet.to(device, **unet_cast)
        components.vae.to(device)  # float32: the SDXL VAE overflows in fp16
        components.image_encoder.to(device, **cast)
        for encoder in components.text_encoders:
            encoder.to(device, **cast)
        adapter.to(device, torch.float32)
        if o.gradient_checkpointing:
            components.unet.enable_gradient_checkpointing()

        model = AdapterUNet(components.unet, adapter, o.rule)
        optimizer = torch.optim.AdamW(
            params,
            lr=o.learning_rate,
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_epsilon,
            weight_decay=o.weight_decay,
        )
        schedule = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[o.lr_schedule]
        lr_scheduler = get_scheduler(
            schedule, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=o.max_steps
        )
        model, optimizer = accelerator.prepare(model, optimizer)
        frozen = FrozenModels(
            vae=components.vae,
            text=TextConditioner(components.text_encoders, components.arch),
            image_encoder=components.image_encoder,
            noise_scheduler=components.noise_scheduler,
            uses_hidden_states=adapter.config.uses_hidden_states,
            weight_dtype=weight_dtype,
        )

        state = ckpt.TrainerState(fingerprint=config.fingerprint("model"), world_size=world)
        if source is not None:
            loaded = ckpt.read_checkpoint(source, rank)
            if loaded.state.fingerprint != state.fingerprint:
                raise ValueError(
                    f"{source} was trained with other model settings; restore them or use a new output_dir"
                )
            optimizer.load_state_dict(loaded.optimizer)
            lr_scheduler.load_state_dict(loaded.scheduler["lr_scheduler"])
            _apply_optim_settings(optimizer, lr_scheduler, o)  # the config's, --allow-change included
            if accelerator.scaler is not None and "scaler" in loaded.scheduler:
                accelerator.scaler.load_state_dict(loaded.scheduler["scaler"])
            if loaded.rng is not None and loaded.state.world_size == world:
                ckpt.set_rng_state(loaded.rng, generator)
            else:
                logger.warning(
                    "%s was written by %d processes, this run has %d: RNG streams restart",
                    source,
                    loaded.state.world_size,
                    world,
                )
                generator.manual_seed(o.seed * 7919 + rank + 104729 * loaded.state.step)
            batches = loaded.state.batches * loaded.state.world_size // world  # same samples seen
            state = ckpt.TrainerState(
                step=loaded.state.step,
                batches=batches,
                skipped_samples=loaded.state.skipped_samples,
                skipped_batches=loaded.state.skipped_batches,
                fingerprint=state.fingerprint,
                world_size=world,
            )
            if main:
                say(f"resuming from step {state.step} ({source})")
                for change in changes:
                    say(f"from step {change['step']}: {change['key']} {change['old']!r} → {change['new']!r}")

        settings = SampleSettings(
            resolution=config.data.resolution,
            reference_size=components.reference_size,
            flip_prob=config.data.flip_prob,
            random_crop=config.data.random_crop,
            drop_text=o.drop_text,
            drop_image=o.drop_image,
            drop_both=o.drop_both,
            crop=config.data.crop,
            crop_coords=config.data.crop_coords,
            views=config.data.views,
            view_min_scale=config.data.view_min_scale,
            rules=subject_rules(config),
        )
        sampler = ResumableBatchSampler(len(records), o.batch_size, o.seed, rank, world, start=state.batches)
        loader = torch.utils.data.DataLoader(
            SubjectDataset(records, settings),
            batch_sampler=sampler,
            collate_fn=Collator(components.tokenizers, components.reference_size),
            num_workers=config.data.num_workers,
        )
        batches = iter(loader)
        # rows logged after the checkpoint we resume from were computed again: drop them first
        log = MetricsLog(output_dir, r.tensorboard, resume_step=state.step) if main else None
        if log is not None and changes:
            log.log(state.step, {"changes": [{k: c[k] for k in ("key", "old", "new")} for c in changes]})
        progress = None
        if main and r.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=o.max_steps, initial=state.step, desc="train", dynamic_ncols=True)

        result = TrainResult(
            step=state.step, finished=False, output_dir=output_dir, last_checkpoint=source, main_process=main
        )
        skipped = Counter(state.skipped_samples)
        last_good: TrainBatch | None = None
        steps_this_run = 0
        samples_per_step = o.batch_size * o.gradient_accumulation_steps * world

        def save() -> Path:
            folder = ckpt.temp_dir(output_dir, state.step)
            if main:
                ckpt.prepare_temp(output_dir, state.step)
            accelerator.wait_for_everyone()
            ckpt.write_rng(folder, rank, generator)
            if main:
                scheduler_state = {"lr_scheduler": lr_scheduler.state_dict()}
                if accelerator.scaler is not None:
                    scheduler_state["scaler"] = accelerator.scaler.state_dict()
                ckpt.write_main(folder, adapter, optimizer, scheduler_state, state)
            accelerator.wait_for_everyone()
            target = ckpt.final_dir(output_dir, state.step)
            if main:
                state.skipped_samples = dict(skipped)
                target = ckpt.finish(folder, output_dir, state, r.keep_last)
            accelerator.wait_for_everyone()
            return target

        try:
            while state.step < o.max_steps and (stop_after is None or steps_this_run < stop_after):
                started = time.perf_counter()
                losses = []
                for micro in range(o.gradient_accumulation_steps):
                    batch = next(batches)
                    state.batches += 1
                    skipped.update(batch.skipped)
                    weight = 1.0
                    if isinstance(batch, EmptyBatch):
                        state.skipped_batches += 1
                        if last_good is None:
                            raise RuntimeError(
                                f"the first batch of this run had no usable sample ({dict(batch.skipped)}): the data "
                                "changed since it was indexed; rebuild the index (delete output_dir/data)"
                            )
                        batch, weight = last_good, 0.0  # keeps processes in step; contributes nothing
                    else:
                        batch = batch.to(device)
                        last_good = batch
                    sync = micro == o.gradient_accumulation_steps - 1
                    context = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
                    with context:
                        loss = training_loss(model, frozen, batch, generator, o.noise_offset)
                        accelerator.backward(loss * (weight / o.gradient_accumulation_steps))
                    if weight:
                        losses.append(loss.detach())
                if o.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, o.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                steps_this_run += 1

                mean_loss = torch.stack(losses).mean() if losses else torch.zeros((), device=device)
                loss_value = float(mean_loss)
                result.losses.append(loss_value)
                if on_step is not None:
                    on_step(state.step, loss_value)
                elapsed = time.perf_counter() - started
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{loss_value:.4f}", samples_s=f"{samples_per_step / elapsed:.1f}"
                    )
                if state.step % r.log_every == 0 or state.step == o.max_steps:
                    global_loss = float(accelerator.reduce(mean_loss.detach().clone(), reduction="mean"))
                    if log is not None:
                        log.log(
                            state.step,
                            {
                                "loss": global_loss,
                                "lr": lr_scheduler.get_last_lr()[0],
                                "samples_per_s": samples_per_step / elapsed,
                                "step_time_s": elapsed,
                                "epoch": state.batches / sampler.batches_per_epoch,
                                "skipped_samples": sum(skipped.values()),
                                "skipped_batches": state.skipped_batches,
                            },
                        )
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at step {state.step}")
                if state.step % r.checkpoint_every == 0 or state.step == o.max_steps:
                    result.last_checkpoint = save()
                if config.validation.every and state.step % config.validation.every == 0:
                    if main:
                        from mipadapter.training.validation import render_validation

                        render_validation(
                            components,
                            adapter,
                            config.validation,
                            o.rule,
                            config.data.resolution,
                            output_dir / "validation" / f"step-{state.step:08d}",
                        )
                    accelerator.wait_for_everyone()
            if state.step < o.max_steps and (
                result.last_checkpoint is None or state.step > _step_of(result.last_checkpoint)
            ):
                result.last_checkpoint = save()  # stopped by stop_after: keep the place
        finally:
            if progress is not None:
                progress.close()
            if log is not None:
                log.close()

        result.step = state.step
        result.finished = state.step >= o.max_steps
        if result.finished and main:
            result.exports = export_adapter(
                adapter, output_dir / "export", config.export.formats, config.export.dtype
            )
            if skipped:
                counts = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
                print(f"training samples skipped: {counts}", file=sys.stderr)
        accelerator.wait_for_everyone()
    finally:
        adapter.detach()
        if o.gradient_checkpointing:
            components.unet.disable_gradient_checkpointing()
    return result


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def _apply_optim_settings(optimizer, lr_scheduler, o) -> None:
    """Put the config's optimiser settings into restored optimizer and scheduler states (which carry the
    values they were saved with): the learning rate through the schedule's factor at the restored step."""
    for group in optimizer.param_groups:
        group.update(
            weight_decay=o.weight_decay, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
            initial_lr=o.learning_rate,
        )  # fmt: skip
    lr_scheduler.base_lrs = [o.learning_rate for _ in optimizer.param_groups]
    rates = [
        base * factor(lr_scheduler.last_epoch)
        for base, factor in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True)
    ]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    lr_scheduler._last_lr = rates


def _drop_stale_index(config: TrainConfig) -> None:
    """Remove a training index built with other data settings by a run that has no checkpoint yet."""
    folder = Path(config.run.output_dir) / "data"
    report = folder / "report.json"
    if report.is_file():
        saved = json.loads(report.read_text(encoding="utf-8"))
        if saved.get("data_config") != data_fingerprint(config):
            report.unlink()
            (folder / "index.jsonl").unlink(missing_ok=True)
