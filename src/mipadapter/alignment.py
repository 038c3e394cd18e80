"""Prompt ↔ subject alignment: where each subject's name sits among a tokenizer's prompt tokens.

Every name must occur in the prompt, inside the span the text encoder reads, at tokens no other
subject claims. Anything else is an error that names the subject: never a silent fallback.

Names are matched on whole tokens ("cat" does not match "cats"), except names written in a script
without spaces between words (Chinese, Japanese, Thai, …): there a BPE tokenizer merges a name with its
neighbours into other tokens than the name gets alone, so such names are found as text and mapped to
the prompt tokens that cover them (the tokenizer's offsets).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Scripts written without spaces between words: CJK ideographs, kana, Thai, Lao, Khmer, Myanmar.
_UNSPACED = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
    "\u0e00-\u0eff\u1780-\u17ff\u1000-\u109f]"
)


class SubjectAlignmentError(ValueError):
    """A subject's name cannot be placed in the prompt."""


@dataclass(frozen=True)
class NameSpan:
    """Token positions ``[start, stop)`` of a subject's name in the tokenized prompt (BOS is position 0)."""

    subject: str
    start: int
    stop: int

    def overlaps(self, other: NameSpan) -> bool:
        return self.start < other.stop and other.start < self.stop


def name_token_ids(tokenizer, name: str) -> list[int]:
    """The tokens of ``name`` on its own, without BOS/EOS."""
    return list(tokenizer(name, add_special_tokens=False)["input_ids"])


def _occurrences(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    size = len(needle)
    return [
        start
        for start in range(len(haystack) - size + 1)
        if list(haystack[start : start + size]) == list(needle)
    ]


def is_unspaced(name: str) -> bool:
    """Whether ``name`` is written (partly) in a script without spaces between words."""
    return bool(_UNSPACED.search(name))


def _text_spans(tokenizer, prompt: str, name: str) -> list[tuple[int, int]]:
    """Token spans [start, stop) (BOS at 0) covering each occurrence of ``name`` in the prompt's text."""
    encoded = tokenizer(prompt, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    spans = []
    for found in re.finditer(re.escape(name.lower()), prompt.lower()):
        covering = [i for i, (a, b) in enumerate(offsets) if b > a and a < found.end() and b > found.start()]
        if covering:
            spans.append((covering[0], covering[-1] + 1))
    return spans


def _candidate_spans(tokenizer, prompt: str, prompt_ids: Sequence[int], name: str, ids: Sequence[int]):
    """Every place ``name`` occurs in the prompt, as token spans [start, stop)."""
    if is_unspaced(name):
        return _text_spans(tokenizer, prompt, name)
    return [(start, start + len(ids)) for start in _occurrences(prompt_ids, ids)]


def _name_ids(tokenizer, names: Sequence[str]) -> list[list[int]]:
    token_ids = []
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise SubjectAlignmentError(f"subject #{index + 1} has an empty name {name!r}")
        ids = name_token_ids(tokenizer, name)
        if not ids:
            raise SubjectAlignmentError(f"subject name {name!r} tokenizes to nothing")
        token_ids.append(ids)
    return token_ids


def locate_names(tokenizer, prompt: str, names: Sequence[str]) -> list[NameSpan]:
    """Place each name at its own occurrence in ``prompt`` for one tokenizer.

    Longer names choose first (so "wooden pot" is not blocked by "pot"); each takes its first occurrence
    that no other subject holds. Returns spans in the order of ``names``.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"])
    readable = tokenizer.model_max_length - 1  # the last position read is the end-of-text token
    token_ids = _name_ids(tokenizer, names)

    spans: dict[int, NameSpan] = {}
    for index in sorted(range(len(names)), key=lambda i: -len(token_ids[i])):
        name = names[index]
        found = [
            NameSpan(name, start, stop)
            for start, stop in _candidate_spans(tokenizer, prompt, prompt_ids, name, token_ids[index])
        ]
        if not found:
            raise SubjectAlignmentError(
                f"subject {name!r} does not occur in the prompt {prompt!r}: write the name as it appears in "
                "the prompt (the match is on whole tokens, so 'cat' does not match 'cats')"
            )
        free = [span for span in found if not any(span.overlaps(taken) for taken in spans.values())]
        if not free:
            holder = next(s.subject for s in spans.values() if any(span.overlaps(s) for span in found))
            raise SubjectAlignmentError(
                f"subjects {name!r} and {holder!r} claim the same prompt tokens: give each subject its own "
                "mention in the prompt"
            )
        span = free[0]
        if span.stop > readable:
            raise SubjectAlignmentError(
                f"subject {name!r} lies beyond the {tokenizer.model_max_length} tokens the text encoder reads "
                f"(at token {span.start}): shorten the prompt or mention the subject earlier"
            )
        spans[index] = span
    return [spans[index] for index in range(len(names))]


def unnamed_subjects(tokenizers: Sequence, prompt: str, names: Sequence[str]) -> list[int]:
    """Indexes of the names that do not occur in ``prompt`` (for any of the pipeline's tokenizers)."""
    missing = set()
    for tokenizer in tokenizers:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"])
        for index, (name, ids) in enumerate(zip(names, _name_ids(tokenizer, names), strict=True)):
            if not _candidate_spans(tokenizer, prompt, prompt_ids, name, ids):
                missing.add(index)
    return sorted(missing)


def subject_labels(names: Sequence[str]) -> list[str]:
    """Unique labels of a call's subjects: the names, with ``#2``, ``#3``… on repeats ("dog", "dog#2")."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


def numbered_labels(names: Sequence[str]) -> list[str]:
    """Labels for people to read: a name that repeats is numbered from its first use ("dog#1",
    "dog#2", as --scale dog#1=... addresses it); a name used once stays bare."""
    return [
        f"{name}#1" if label == name and names.count(name) > 1 else label
        for name, label in zip(names, subject_labels(names), strict=True)
    ]


def align_subjects(tokenizers: Sequence, prompt: str, names: Sequence[str]) -> list[list[NameSpan]]:
    """``locate_names`` for every tokenizer of a pipeline (SDXL has two): [tokenizer][subject]."""
    aligned = []
    for position, tokenizer in enumerate(tokenizers):
        try:
            aligned.append(locate_names(tokenizer, prompt, names))
        except SubjectAlignmentError as error:
            if len(tokenizers) == 1:
                raise
            raise SubjectAlignmentError(f"{error} (text encoder {position + 1})") from None
    return aligned
