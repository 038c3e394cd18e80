"""Prompt ↔ subject alignment on the tiny pipelines' CLIP tokenizers (both of SDXL's)."""

from __future__ import annotations

import pytest

from mipadapter.alignment import NameSpan, SubjectAlignmentError, align_subjects, locate_names
from mipadapter.testing import build_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    """SDXL's pair: the first pads with <|endoftext|>, the second with "!" (as the real ones do)."""
    return [build_clip_tokenizer(), build_clip_tokenizer("!")]


def tokens_at(tokenizer, prompt: str, span: NameSpan) -> list[int]:
    return tokenizer(prompt)["input_ids"][span.start : span.stop]


@pytest.mark.parametrize("which", [0, 1])
def test_spans_point_at_the_name_tokens(tokenizers, which):
    tokenizer = tokenizers[which]
    prompt = "a cat wearing a wooden pot"
    cat, pot = locate_names(tokenizer, prompt, ["cat", "wooden pot"])
    assert (cat.subject, pot.subject) == ("cat", "wooden pot")
    assert tokens_at(tokenizer, prompt, cat) == tokenizer("cat", add_special_tokens=False)["input_ids"]
    assert tokens_at(tokenizer, prompt, pot) == tokenizer("wooden pot", add_special_tokens=False)["input_ids"]
    assert pot.stop - pot.start == len(tokenizer("wooden pot", add_special_tokens=False)["input_ids"]) >= 2
    assert cat.start >= 1  # BOS is position 0


def test_multi_token_names_choose_before_their_parts(tokenizers):
    """ "pot" must not take the "pot" of "wooden pot" when the prompt has a second pot for it."""
    tokenizer = tokenizers[0]
    prompt = "a wooden pot next to a pot"
    pot, wooden = locate_names(tokenizer, prompt, ["pot", "wooden pot"])  # short name first in the list
    assert not pot.overlaps(wooden)
    assert wooden.start < pot.start
    assert tokens_at(tokenizer, prompt, pot) == tokenizer("pot", add_special_tokens=False)["input_ids"]


def test_case_and_punctuation(tokenizers):
    tokenizer = tokenizers[0]
    upper = locate_names(tokenizer, "A photo of a Cat", ["cat"])
    lower = locate_names(tokenizer, "a photo of a cat", ["Cat"])
    assert (upper[0].start, upper[0].stop) == (lower[0].start, lower[0].stop)
    cat, dog = locate_names(tokenizer, "a cat, a dog.", ["cat", "dog"])
    ids = tokenizer("a cat, a dog.")["input_ids"]
    assert ids[cat.start : cat.stop] == tokenizer("cat", add_special_tokens=False)["input_ids"]
    assert ids[dog.start : dog.stop] == tokenizer("dog", add_special_tokens=False)["input_ids"]
    assert (
        ids[cat.stop] == tokenizer(",", add_special_tokens=False)["input_ids"][0]
    )  # the comma is its own token


def test_absent_name_is_an_error_naming_the_subject(tokenizers):
    with pytest.raises(SubjectAlignmentError, match="'dog' does not occur"):
        locate_names(tokenizers[0], "a cat on a sofa", ["cat", "dog"])
    with pytest.raises(SubjectAlignmentError, match="'cat' does not occur"):  # whole tokens only
        locate_names(tokenizers[0], "two cats on a sofa", ["cat"])


def test_two_subjects_on_the_same_tokens_is_an_error_naming_both(tokenizers):
    with pytest.raises(SubjectAlignmentError, match="'pot' and 'wooden pot'"):
        locate_names(tokenizers[0], "a cat in a wooden pot", ["wooden pot", "pot"])
    with pytest.raises(SubjectAlignmentError, match="'dog' and 'dog'"):
        locate_names(tokenizers[0], "a dog on the grass", ["dog", "dog"])


def test_the_same_name_twice_takes_two_mentions(tokenizers):
    tokenizer = tokenizers[0]
    first, second = locate_names(tokenizer, "a dog and another dog", ["dog", "dog"])
    assert first.start < second.start and not first.overlaps(second)


def test_names_must_lie_in_the_tokens_the_encoder_reads(tokenizers):
    tokenizer = tokenizers[0]
    filler = " ".join(["a"] * 74)  # BOS + 74 tokens: "cat" lands on token 75, the last read before EOS
    (span,) = locate_names(tokenizer, f"{filler} cat", ["cat"])
    assert span.start == 75
    with pytest.raises(SubjectAlignmentError, match="'cat' lies beyond the 77 tokens"):
        locate_names(tokenizer, f"{filler} a cat", ["cat"])
    with pytest.raises(SubjectAlignmentError, match="beyond"):
        locate_names(tokenizer, " ".join(["a"] * 90) + " cat", ["cat"])


def test_empty_names_are_refused(tokenizers):
    with pytest.raises(SubjectAlignmentError, match="empty name"):
        locate_names(tokenizers[0], "a cat", ["cat", " "])


def test_both_sdxl_tokenizers_agree_and_errors_say_which(tokenizers):
    prompt = "a cat wearing a jacket, a wooden pot"
    names = ["jacket", "wooden pot", "cat"]
    first, second = align_subjects(tokenizers, prompt, names)
    assert [(s.start, s.stop) for s in first] == [(s.start, s.stop) for s in second]
    assert [s.subject for s in first] == names
    with pytest.raises(SubjectAlignmentError, match=r"'hat' does not occur.*\(text encoder 1\)"):
        align_subjects(tokenizers, prompt, ["hat"])
    with pytest.raises(SubjectAlignmentError) as single:  # one tokenizer: no encoder number
        align_subjects(tokenizers[:1], prompt, ["hat"])
    assert "text encoder" not in str(single.value)


@pytest.mark.parametrize("vocab", ["clip", "fallback"])
def test_names_in_an_unspaced_script_are_found_through_the_text(vocab):
    """In "一只猫和一只狗在公园" BPE merges 猫 with its neighbours into other tokens than 猫 gets alone,
    so token matching alone would call it absent; the text match maps it to the tokens covering it."""
    from mipadapter.testing.tokenizer import has_real_clip_vocab

    if vocab == "clip" and not has_real_clip_vocab():
        pytest.skip("the real CLIP vocabulary comes with open_clip_torch (installed in CI)")
    tokenizer = build_clip_tokenizer(vocab=vocab)
    prompt = "一只猫和一只狗在公园"
    cat, dog = locate_names(tokenizer, prompt, ["猫", "狗"])
    assert 1 <= cat.start < cat.stop <= dog.start < dog.stop
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    assert {c for start, stop in offsets[cat.start : cat.stop] for c in prompt[start:stop]} >= {"猫"}
    assert {c for start, stop in offsets[dog.start : dog.stop] for c in prompt[start:stop]} >= {"狗"}
    with pytest.raises(SubjectAlignmentError, match="'鸟' does not occur"):
        locate_names(tokenizer, prompt, ["鸟"])
    with pytest.raises(SubjectAlignmentError, match="claim the same prompt tokens"):
        locate_names(tokenizer, "一只猫", ["猫", "一只猫"])


def test_unnamed_subjects_lists_the_missing_ones(tokenizers):
    from mipadapter.alignment import unnamed_subjects

    assert unnamed_subjects(tokenizers, "a dog at dawn", ["dog", "cat", "dawn", "猫"]) == [1, 3]
    assert unnamed_subjects(tokenizers, "a dog and a cat", ["dog", "cat"]) == []
