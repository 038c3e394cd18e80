"""Prompt ↔ subject alignment: where each subject's name sits among a tokenizer's prompt tokens.

Every name must occur in the prompt, inside the span the text encoder reads, at tokens no other
subject claims. Anything else is an error that names the subject: never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


def locate_names(tokenizer, prompt: str, names: Sequence[str]) -> list[NameSpan]:
    """Place each name at its own occurrence in ``prompt`` for one tokenizer.

    Longer names choose first (so "wooden pot" is not blocked by "pot"); each takes its first occurrence
    that no other subject holds. Returns spans in the order of ``names``.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"])
    readable = tokenizer.model_max_length - 1  # the last position read is the end-of-text token
    token_ids = []
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise SubjectAlignmentError(f"subject #{index + 1} has an empty name {name!r}")
        ids = name_token_ids(tokenizer, name)
        if not ids:
            raise SubjectAlignmentError(f"subject name {name!r} tokenizes to nothing")
        token_ids.append(ids)

    spans: dict[int, NameSpan] = {}
    for index in sorted(range(len(names)), key=lambda i: -len(token_ids[i])):
        name, ids = names[index], token_ids[index]
        starts = _occurrences(prompt_ids, ids)
        if not starts:
            raise SubjectAlignmentError(
                f"subject {name!r} does not occur in the prompt {prompt!r}: write the name as it appears in "
                "the prompt (the match is on whole tokens, so 'cat' does not match 'cats')"
            )
        free = [NameSpan(name, start, start + len(ids)) for start in starts]
        free = [span for span in free if not any(span.overlaps(taken) for taken in spans.values())]
        if not free:
            holder = next(
                s.subject
                for s in spans.values()
                if any(NameSpan(name, x, x + len(ids)).overlaps(s) for x in starts)
            )
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
