"""What a benchmark asks for: prompts with their subjects, independent of any dataset layout.

A `Case` is one prompt of a benchmark with the subjects it shows. Cases are numbered by ``index`` (their
position in the run), and that index, never the prompt text, names every file written for them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Case", "SubjectSpec", "cases_from_json", "cases_to_json"]


@dataclass(frozen=True)
class SubjectSpec:
    """One subject of a prompt.

    name: the word(s) naming the object in the prompt, used for routing (e.g. ``"chair"``).
    key: the concept's identity for scoring and aggregation (e.g. the folder ``"furniture_chair1"``).
    references: reference photo paths, relative to the benchmark's root folder.
    """

    name: str
    key: str
    references: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.references:
            raise ValueError(f"subject {self.key!r} has no reference photos")


@dataclass(frozen=True)
class Case:
    """One prompt with its subjects.

    index: the case number (file names derive from it); group: the combination or subject set the
    prompt belongs to (e.g. ``"c101/004"``); quirks: known problems of the benchmark entry, flagged.
    """

    index: int
    prompt: str
    subjects: tuple[SubjectSpec, ...]
    group: str
    quirks: tuple[str, ...] = field(default=())

    @property
    def subject_keys(self) -> list[str]:
        return [subject.key for subject in self.subjects]


def cases_to_json(cases: list[Case]) -> list[dict[str, Any]]:
    """Cases as plain JSON data (lists for tuples)."""
    return [asdict(case) for case in cases]


def cases_from_json(data: list[dict[str, Any]]) -> list[Case]:
    """Inverse of `cases_to_json`."""
    cases = []
    for item in data:
        subjects = tuple(
            SubjectSpec(name=s["name"], key=s["key"], references=tuple(s["references"]))
            for s in item["subjects"]
        )
        cases.append(
            Case(
                index=int(item["index"]),
                prompt=item["prompt"],
                subjects=subjects,
                group=item["group"],
                quirks=tuple(item.get("quirks", ())),
            )
        )
    return cases


def resolve(root: str | Path, relative: str) -> Path:
    """A reference path of a case, relative to the benchmark root."""
    return Path(root) / relative
