"""Offline CLIP tokenizers for tiny pipelines.

Two sources, chosen by `build_clip_tokenizer(vocab=...)`:

* ``"clip"`` — the real OpenAI CLIP BPE tokenizer (49,408 tokens, the one SD1.5 and SDXL use), built
  offline from the merges file that the `open_clip` package ships (``open_clip/bpe_simple_vocab_16e6.txt.gz``).
  The package is only *located* (``importlib.util.find_spec``), never imported: importing it drags in
  torchvision. The vocabulary is derived exactly as OpenAI CLIP does it: the 256 byte-level unicode
  symbols, the same 256 with ``</w>``, the first 48,894 merges joined, then ``<|startoftext|>`` and
  ``<|endoftext|>``. The derived ``vocab.json`` / ``merges.txt`` are cached under the system temp dir in a
  folder keyed by the hash of the ``.gz`` (see `clip_vocab_files`); they load with
  ``CLIPTokenizer.from_pretrained(folder)`` too.
* ``"fallback"`` — used when `open_clip` is not installed: a *small* BPE tokenizer with the same class, the
  same normalisation (NFC, whitespace collapse, lowercasing) and pre-tokenisation (words, single digits and
  punctuation runs split apart) as CLIP, over the 512 byte-level symbols plus a built-in vocabulary of
  common prompt words (`FALLBACK_WORDS`), each of which is one token. Any other ASCII word still tokenises
  (into pieces, down to single bytes), so nothing maps to the unknown token. Its ids mean nothing outside
  this package: it is a stand-in that keeps tests and ``--tiny`` runs working without `open_clip`, not a
  substitute for the real vocabulary.

``"auto"`` (the default) takes the real vocabulary when it is there.

Both end with ``<|startoftext|>`` (bos) and ``<|endoftext|>`` (eos) as their two largest ids, like CLIP, so
a text encoder that pools at ``argmax(input_ids)`` finds the eos token with either. The pad token is a
parameter: SD1.5 and SDXL's first tokenizer pad with ``<|endoftext|>``, SDXL's second with ``"!"``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from transformers import CLIPTokenizer

from mipadapter.fileio import atomic_write_text
from mipadapter.provenance import file_sha256

__all__ = [
    "CLIP_MAX_LENGTH",
    "CLIP_VOCAB_SIZE",
    "FALLBACK_WORDS",
    "build_clip_tokenizer",
    "clip_bpe_path",
    "clip_vocab_files",
    "has_real_clip_vocab",
]

VocabChoice = Literal["auto", "clip", "fallback"]

CLIP_VOCAB_SIZE = 49408
"""Number of tokens of the OpenAI CLIP tokenizer (ids 49406 = bos, 49407 = eos)."""

CLIP_MAX_LENGTH = 77
"""Context length of every CLIP text encoder used by SD1.5 / SDXL (bos + 75 tokens + eos)."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

_NUM_CLIP_MERGES = 49152 - 256 - 2  # 48,894: the merges OpenAI CLIP keeps from the 16e6 file

FALLBACK_WORDS: tuple[str, ...] = tuple(
    """
    a an the and or of in on at to with without by for from near next under over above below behind
    beside between into onto through inside outside wearing holding sitting standing lying running jumping
    playing eating drinking reading walking flying swimming sleeping looking riding is are it its this that
    photo picture image painting drawing sketch render portrait closeup close up view shot scene style
    high quality detailed realistic sharp blurry best worst low resolution masterpiece hd
    cat dog bird fish horse cow sheep bear lion tiger rabbit duck owl teddy toy robot person man woman
    boy girl child baby people face hand head
    jacket hat cap shirt dress shoes boots glasses sunglasses scarf bag backpack watch necklace sweater
    coat hoodie
    car bike bicycle boat plane train bus truck house building tree flower plant grass rock mountain
    river lake sea ocean beach sand snow sky cloud clouds sun moon star city street road forest garden
    park field desert room table chair sofa couch bed cup mug bottle vase bowl plate book lamp clock
    guitar ball box pot teapot can candle backpack
    red orange yellow green blue purple pink brown black white gray grey gold silver colorful dark light
    bright small big large tiny huge cute old new young wooden metal plastic glass
    sks subject object thing one two three left right top bottom front back day night morning evening
    sunset sunrise rain water fire ice snowy rainy sunny
    """.split()
)
"""The whole words the fallback tokenizer encodes as single tokens (sorted unique at build time)."""


def clip_bpe_path() -> Path | None:
    """Path of `open_clip`'s bundled ``bpe_simple_vocab_16e6.txt.gz`` if the package is installed, else None.

    Locates the package with ``importlib.util.find_spec`` without importing it.
    """
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    return None


def has_real_clip_vocab() -> bool:
    """Whether the real 49,408-token CLIP vocabulary can be built offline (i.e. `open_clip` is installed)."""
    return clip_bpe_path() is not None


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible map of the 256 byte values to printable unicode symbols (GPT-2's)."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = byte_values[:]
    extra = 0
    for byte in range(2**8):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(2**8 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def _byte_symbols() -> list[str]:
    """The 512 base symbols of a CLIP vocabulary: 256 byte symbols, then the same with ``</w>``."""
    symbols = list(_bytes_to_unicode().values())
    return symbols + [s + "</w>" for s in symbols]


def clip_vocab_files(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Write (once) and return ``(vocab.json, merges.txt)`` of the real CLIP tokenizer.

    The files go to ``cache_dir`` (default: ``<tempdir>/mipadapter-clip-bpe-<sha256 of the .gz, 16 hex>``)
    and are reused when already there. Raises `FileNotFoundError` when `open_clip` is not installed.
    """
    bpe = clip_bpe_path()
    if bpe is None:
        raise FileNotFoundError(
            "the real CLIP vocabulary needs the `open_clip` package (open_clip_torch), whose "
            "bpe_simple_vocab_16e6.txt.gz it is built from; use vocab='fallback' without it"
        )
    if cache_dir is None:
        folder = Path(tempfile.gettempdir()) / f"mipadapter-clip-bpe-{file_sha256(bpe)[:16]}"
    else:
        folder = Path(cache_dir)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return vocab_path, merges_path

    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_CLIP_MERGES + 1]  # line 0 is the "#version" header
    if len(merges) != _NUM_CLIP_MERGES:
        raise ValueError(f"{bpe} holds {len(merges)} merges, expected at least {_NUM_CLIP_MERGES}")
    tokens = _byte_symbols() + ["".join(merge.split()) for merge in merges] + [BOS_TOKEN, EOS_TOKEN]
    encoder = {token: index for index, token in enumerate(tokens)}
    if len(encoder) != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"built a CLIP vocabulary of {len(encoder)} tokens from {bpe}, expected {CLIP_VOCAB_SIZE}"
        )

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(vocab_path, json.dumps(encoder, ensure_ascii=False))
    return vocab_path, merges_path


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The real CLIP (vocab, merges), parsed once per process from the cached files."""
    vocab_path, merges_path = clip_vocab_files()
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:] if line)
    return vocab, merges  # type: ignore[return-value]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one pre-token: lowest-rank adjacent pair first, all its occurrences, until none applies."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


@functools.lru_cache(maxsize=1)
def _fallback_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """A small CLIP-style BPE (vocab, merges) in which every word of `FALLBACK_WORDS` is one token.

    Words are added one by one; while BPE with the merges so far leaves a word in several pieces, the
    merge of its first two pieces is appended (a merge ranked after all existing ones never changes how
    an earlier word tokenises, so every word ends as one token).
    """
    tokens = _byte_symbols()
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(FALLBACK_WORDS)):
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                tokens.append(pair[0] + pair[1])
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, tuple(merges)


def build_clip_tokenizer(
    pad_token: str = EOS_TOKEN,
    *,
    vocab: VocabChoice = "auto",
    model_max_length: int = CLIP_MAX_LENGTH,
) -> CLIPTokenizer:
    """A fresh CLIP tokenizer built offline (no hub access).

    Args:
        pad_token: ``"<|endoftext|>"`` (SD1.5, SDXL's ``tokenizer``) or ``"!"`` (SDXL's ``tokenizer_2``); any
            token of the vocabulary.
        vocab: ``"clip"`` for the real 49,408-token vocabulary (needs `open_clip` installed), ``"fallback"``
            for the small built-in one, ``"auto"`` for the real one when available.
        model_max_length: context length (77 for every SD text encoder).

    Returns:
        a ``transformers.CLIPTokenizer`` (the tokenizers-backed class); ``len(tok)`` is 49,408 with the
        real vocabulary. Each call returns a new object (tokenizers are mutable); the vocabulary itself is
        parsed once per process.
    """
    if vocab not in ("auto", "clip", "fallback"):
        raise ValueError(f"vocab must be 'auto', 'clip' or 'fallback', got {vocab!r}")
    available = has_real_clip_vocab()
    if vocab == "clip" and not available:
        raise FileNotFoundError(
            "vocab='clip' needs the `open_clip` package (open_clip_torch) for its BPE file; "
            "use vocab='fallback' or 'auto' without it"
        )
    real = vocab == "clip" or (vocab == "auto" and available)
    encoder, merges = _clip_vocab_and_merges() if real else _fallback_vocab_and_merges()
    if pad_token not in encoder:
        raise ValueError(f"pad_token {pad_token!r} is not in the {'CLIP' if real else 'fallback'} vocabulary")
    tokenizer = CLIPTokenizer(
        vocab=dict(encoder),
        merges=list(merges),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    if real and len(tokenizer) != CLIP_VOCAB_SIZE:
        # A CLIPTokenizer built from unreadable files silently holds only its 2-3 special tokens.
        raise ValueError(f"built a CLIP tokenizer with {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    if len(tokenizer) != len(encoder):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, its vocabulary {len(encoder)}")
    return tokenizer
