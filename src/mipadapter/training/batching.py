"""Dataset, resumable batch order, and collation of samples with different subject counts.

Batch order: epoch ``e`` visits the records in the permutation drawn from ``seed + e``; global batch
``g`` of an epoch is ``batch_size × world_size`` consecutive entries of it and each process takes its
own ``batch_size`` slice. A run's data position is therefore one number, the global batches consumed,
and a resumed run continues exactly where the killed one stopped.

Collation pads the subjects of a batch to its largest count ``n``: a padded subject has a white
reference, the name "" (its one row, the end-of-text token, keeps its name mask non-empty) and
``subject_mask`` False, which the step turns into scale 0 and no routing weight (see `step`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from mipadapter.manifest import ImageRecord
from mipadapter.training.samples import (
    SampleSettings,
    SkippedSample,
    TrainSample,
    safe_build_sample,
    sample_seed,
)


class SubjectDataset(torch.utils.data.Dataset):
    """Indexed records → samples. Keys are ``(record index, sample seed)`` pairs from `ResumableBatchSampler`."""

    def __init__(self, records: Sequence[ImageRecord], settings: SampleSettings) -> None:
        self.records = list(records)
        self.settings = settings

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> TrainSample | SkippedSample:
        index, seed = key
        return safe_build_sample(self.records[index], index, seed, self.settings)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields this process's batches of ``(index, sample seed)`` from global batch ``start`` on, forever."""

    def __init__(
        self, num_records: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        self.num_records, self.batch_size, self.seed = num_records, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_records} usable images are fewer than one global batch "
                f"(batch_size {batch_size} × {world_size} processes)"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_records // (self.batch_size * self.world_size)

    def position(self, global_batch: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a global batch number."""
        return divmod(global_batch, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = self.position(self.start)
        span = self.batch_size * self.world_size
        while True:
            order = torch.randperm(
                self.num_records, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
            for batch in range(offset, self.batches_per_epoch):
                start = batch * span + self.rank * self.batch_size
                indices = order[start : start + self.batch_size].tolist()
                yield [(i, sample_seed(self.seed, epoch, i)) for i in indices]
            epoch, offset = epoch + 1, 0


@dataclass
class TrainBatch:
    """A collated batch (B samples, n = most subjects in the batch, m = longest name in tokens).

    pixel_values [B, 3, R, R]; references [B, n·K, 3, S, S] (K = ``views`` per subject, subject-major);
    subject_mask [B, n] (bool, False = padding);
    prompt_ids: per tokenizer [B, L_text]; name_ids: per tokenizer [B·n, L_name]; name_mask [B, n, m]
    (bool: rows 1..m of each name's encoding); time_ids [B, 6]; drop_image [B] (bool); indices [B];
    skipped: reasons of the samples dropped from this batch.
    """

    pixel_values: torch.Tensor
    references: torch.Tensor
    subject_mask: torch.Tensor
    prompt_ids: tuple[torch.Tensor, ...]
    name_ids: tuple[torch.Tensor, ...]
    name_mask: torch.Tensor
    time_ids: torch.Tensor
    drop_image: torch.Tensor
    indices: torch.Tensor
    skipped: Counter = field(default_factory=Counter)
    views: int = 1

    @property
    def size(self) -> int:
        return self.pixel_values.shape[0]

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
            elif isinstance(value, tuple):
                value = tuple(v.to(device, non_blocking=True) for v in value)
            moved[f.name] = value
        return TrainBatch(**moved)


@dataclass
class EmptyBatch:
    """Every sample of a batch was skipped."""

    skipped: Counter

    @property
    def size(self) -> int:
        return 0


def name_token_mask(attention_mask: torch.Tensor, batch: int, subjects: int) -> tuple[torch.Tensor, int]:
    """Name rows from a tokenizer's attention mask [B·n, L] (bos, name tokens, eos, padding).

    Returns (mask [B, n, m], m): row j of a name is token j + 1; a name of no tokens (padding) keeps
    row 0 (its end-of-text token) so that no mask row is empty.
    """
    lengths = attention_mask.sum(dim=1) - 2  # [B·n] name tokens without bos/eos
    m = max(1, int(lengths.max()))
    rows = torch.arange(m).unsqueeze(0)  # [1, m]
    mask = rows < lengths.clamp_min(1).unsqueeze(1)  # [B·n, m]
    return mask.view(batch, subjects, m), m


class Collator:
    """Pads subjects to the batch's largest count and tokenizes captions and names (in the workers)."""

    def __init__(self, tokenizers: Sequence, reference_size: int) -> None:
        self.tokenizers = list(tokenizers)
        self.reference_size = reference_size

    def __call__(self, items: Sequence[TrainSample | SkippedSample]) -> TrainBatch | EmptyBatch:
        skipped = Counter(item.reason for item in items if isinstance(item, SkippedSample))
        samples = [item for item in items if isinstance(item, TrainSample)]
        if not samples:
            return EmptyBatch(skipped)
        batch = len(samples)
        n = max(len(s.names) for s in samples)
        views = samples[0].views
        if any(s.views != views for s in samples):
            raise ValueError(
                f"samples of one batch have different view counts {sorted({s.views for s in samples})}"
            )
        reference_shape = samples[0].references.shape[1:]
        references = torch.empty(batch, n * views, *reference_shape)
        subject_mask = torch.zeros(batch, n, dtype=torch.bool)
        names = [""] * (batch * n)
        for row, sample in enumerate(samples):  # copies only; no model work
            count = len(sample.names)
            references[row, : count * views] = sample.references
            references[row, count * views :] = sample.references[0]  # any valid image: its weight is 0
            subject_mask[row, :count] = True
            names[row * n : row * n + count] = sample.names
        captions = [s.caption for s in samples]
        prompt_ids, name_ids, name_mask = [], [], None
        for tokenizer in self.tokenizers:
            prompt_ids.append(
                tokenizer(
                    captions,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
            encoded = tokenizer(names, padding="longest", truncation=True, return_tensors="pt")
            mask, _ = name_token_mask(encoded.attention_mask, batch, n)
            if name_mask is not None and not torch.equal(mask, name_mask):
                raise ValueError("the tokenizers split the subject names into different numbers of tokens")
            name_mask = mask
            name_ids.append(encoded.input_ids)
        return TrainBatch(
            pixel_values=torch.stack([s.pixel_values for s in samples]),
            references=references,
            subject_mask=subject_mask,
            prompt_ids=tuple(prompt_ids),
            name_ids=tuple(name_ids),
            name_mask=name_mask,
            time_ids=torch.tensor([s.time_ids for s in samples], dtype=torch.float32),
            drop_image=torch.tensor([s.drop_image for s in samples]),
            indices=torch.tensor([s.index for s in samples]),
            skipped=skipped,
            views=views,
        )
