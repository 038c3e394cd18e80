"""Encoders run once per call: subject names through the text encoder(s), photos through the image encoder."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from mipadapter.alignment import SubjectAlignmentError, name_token_ids
from mipadapter.photos import upright


def is_flux(pipe) -> bool:
    """Whether ``pipe`` is a FLUX pipeline (a FLUX transformer where UNet pipelines have a UNet)."""
    return type(getattr(pipe, "transformer", None)).__name__.startswith("Flux")


def denoiser(pipe):
    """The model the adapter goes into: the UNet, or FLUX's transformer."""
    return pipe.transformer if is_flux(pipe) else pipe.unet


def tokenizers_of(pipe) -> list:
    """The tokenizers of the text the attention keys: SDXL's two CLIP ones, SD1.5's one, FLUX's T5."""
    if is_flux(pipe):
        return [pipe.tokenizer_2]
    return [
        tok
        for tok in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
        if tok is not None
    ]


def first_name_row(pipe) -> int:
    """The row where a name encoded alone starts: after CLIP's start token; T5 has none."""
    return 0 if is_flux(pipe) else 1


def max_sequence_length(pipe, given: int | None = None) -> int:
    """FLUX's T5 length of a call: ``given``, else ``FluxPipeline.__call__``'s default (512)."""
    if given is not None:
        return int(given)
    return int(inspect.signature(pipe.__call__).parameters["max_sequence_length"].default)


def _encode_texts(pipe, texts: list[str], device, sequence_length: int | None = None) -> torch.Tensor:
    """Texts → the pipeline's own prompt embeddings [k, S, c] (same layers and length as the prompt's).

    sequence_length: FLUX only, the call's ``max_sequence_length`` (None: the pipeline's default). T5 runs
    without an attention mask in ``FluxPipeline._get_t5_prompt_embeds``, so the padding length changes
    every row: names must be encoded at the prompt's length."""
    if is_flux(pipe):
        return pipe._get_t5_prompt_embeds(
            prompt=texts,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length(pipe, sequence_length),
            device=device,
        )
    if getattr(pipe, "tokenizer_2", None) is not None:
        embeds = pipe.encode_prompt(
            prompt=texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]
    else:
        embeds = pipe.encode_prompt(texts, device, 1, False)[0]
    return embeds


def name_lengths(pipe, names: Sequence[str]) -> list[int]:
    """Each name's token count (at least 1: the empty name keeps one row); the same for every tokenizer."""
    lengths = []
    for name in names:
        counts = {len(name_token_ids(tok, name)) for tok in tokenizers_of(pipe)}
        if len(counts) != 1:
            raise SubjectAlignmentError(
                f"the text encoders split subject {name!r} into different token counts {sorted(counts)}"
            )
        lengths.append(max(counts.pop(), 1))
    return lengths


def name_window(longest: int, window: int | None) -> int:
    """Rows kept per name: the longest name's token count, or (``window``) the smallest multiple of
    ``window`` that holds it, so that every call of a session has the same shapes (one compiled graph)."""
    if window is None:
        return longest
    if window < 1:
        raise ValueError(f"the name window must be a positive number of tokens, got {window}")
    return -(-longest // window) * window


def encode_names(
    pipe, names: Sequence[str], device, window: int | None = None, sequence_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each name encoded on its own; the rows of its name tokens (after CLIP's start token), padded.

    window: pad to a multiple of this many rows (see ``name_window``); None pads to the longest name.
    sequence_length: FLUX's ``max_sequence_length`` of the call (None: the pipeline's default).
    An empty name has one row: the end-of-text token in the place where a name would start.
    Returns embeds [n, m, c] (zero on padding rows) and mask [n, m] (bool).
    """
    lengths = name_lengths(pipe, names)
    embeds = _encode_texts(pipe, list(names), device, sequence_length)  # [n, S, c]
    rows = name_window(max(lengths), window)
    first = first_name_row(pipe)
    if first + rows > embeds.shape[1]:
        raise SubjectAlignmentError(
            f"subject names of {max(lengths)} tokens do not fit the text encoder's {embeds.shape[1]} tokens"
        )
    mask = torch.arange(rows, device=embeds.device)[None, :] < torch.tensor(lengths, device=embeds.device)[:, None]
    gathered = embeds[:, first : first + rows]  # [n, m, c]
    return gathered * mask[..., None].to(gathered.dtype), mask


def unconditional_names(pipe, name_mask: torch.Tensor, device, sequence_length: int | None = None) -> torch.Tensor:
    """The names of classifier-free guidance's unconditional half, as the authors key them: the empty
    string encoded once, and for each subject its rows ``1..n_i`` (``n_i`` = its own name's length; rows
    ``0..n_i−1`` on T5, which has no start token).

    name_mask [n, m] (bool, from ``encode_names``) → embeds [n, m, c] (zero on padding rows);
    sequence_length: as for ``encode_names``.
    """
    first = first_name_row(pipe)
    empty = _encode_texts(pipe, [""], device, sequence_length)[0, first : first + name_mask.shape[1]]  # [m, c]
    return empty.unsqueeze(0) * name_mask[..., None].to(empty.dtype)


def encode_photos(image_encoder, feature_extractor, photos: Sequence, hidden_states: bool) -> torch.Tensor:
    """Photos → image-encoder features: [k, D] (projected embedding) or [k, L, D] (penultimate hidden states)."""
    parameter = next(image_encoder.parameters())
    upright_photos = [upright(photo).convert("RGB") for photo in photos]  # EXIF orientation applied
    pixels = feature_extractor(upright_photos, return_tensors="pt")["pixel_values"]
    pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
    output = image_encoder(pixels, output_hidden_states=hidden_states)
    return output.hidden_states[-2] if hidden_states else output.image_embeds


def black_image(feature_extractor):
    """A black RGB image at the encoder's input size: what diffusers' FLUX pipeline (``np.zeros((width,
    height, 3), uint8)``) and x-flux (``neg_image_prompt``) encode as the negative image. Any size gives
    the same pixels after resizing and cropping: black stays black."""
    from PIL import Image

    size = feature_extractor.crop_size
    return Image.new("RGB", (size["width"], size["height"]))


def unconditional_features(
    image_encoder, feature_extractor, hidden_states: bool, like: torch.Tensor, negative_image: str = "zeros"
) -> torch.Tensor:
    """Features for the unconditional side of CFG. negative_image ``zeros``: as IP-Adapter does it, a zero
    embedding for basic adapters, the hidden states of an all-zero pixel input for plus adapters;
    ``black``: a black image through the encoder, as diffusers' FLUX pipeline and x-flux do.
    [1, D] or [1, L, D]."""
    if negative_image == "black":
        return encode_photos(image_encoder, feature_extractor, [black_image(feature_extractor)], hidden_states)
    if not hidden_states:
        return torch.zeros_like(like[:1])
    parameter = next(image_encoder.parameters())
    size = feature_extractor.crop_size
    pixels = torch.zeros(1, 3, size["height"], size["width"], device=parameter.device, dtype=parameter.dtype)
    return image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
