"""Tiny random-weight models and processors for the data pipeline's transformers backends.

Everything is built offline from configs and in-memory vocabularies (no hub, no files): a BLIP-2
captioner, a Grounding DINO detector, SAM and CLIP, each with a processor that uses the PIL image
backends (torchvision is not a dependency). Sizes are chosen so that a forward pass on a few 64-px
images takes well under a second on one CPU core; outputs are random but have the real shapes.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import torch

# Words the tiny tokenizers know as whole tokens; anything else falls back to characters.
_WORDS = (
    "a",
    "an",
    "the",
    "and",
    "of",
    "on",
    "with",
    "photo",
    "cat",
    "dog",
    "car",
    "frog",
    "apple",
    "jacket",
)

TINY_IMAGE_SIZE = 32  # pixels the tiny vision towers see (square)


@dataclass(frozen=True)
class TinyModel:
    """A model in eval mode with the processor that feeds it."""

    model: Any
    processor: Any


def _wordpiece_vocab() -> dict[str, int]:
    """BERT-style vocabulary: specials, whole words, then every letter and digit with and without '##'."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]
    tokens += list(_WORDS)
    chars = string.ascii_lowercase + string.digits
    tokens += [c for c in chars if c not in tokens] + [f"##{c}" for c in chars]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def tiny_bert_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab=_wordpiece_vocab())


def tiny_clip_tokenizer():
    """CLIP BPE tokenizer over single characters (no merges): every lowercase word is encodable."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = specials + chars + [f"{c}</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def tiny_gpt2_tokenizer():
    """Byte-level BPE tokenizer with the 256 byte symbols and no merges (OPT uses GPT-2's tokenizer)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2Tokenizer

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    return GPT2Tokenizer(
        vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _eval(model):
    torch.manual_seed(0)
    return model.eval()


def tiny_blip2(seed: int = 0) -> TinyModel:
    """Blip2ForConditionalGeneration (ViT 1 layer, Q-Former 1 layer with 4 queries, OPT 1 layer)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = tiny_gpt2_tokenizer()
    num_query_tokens = 4
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}),
        tokenizer=tokenizer,
        num_query_tokens=num_query_tokens,
    )
    vocab_size = len(tokenizer)  # includes the "<image>" token the processor adds
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
        ),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=37,
            encoder_hidden_size=32,
            vocab_size=vocab_size,
        ),
        text_config=OPTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            ffn_dim=37,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    return TinyModel(_eval(Blip2ForConditionalGeneration(config)), processor)


def tiny_grounding_dino(seed: int = 0) -> TinyModel:
    """GroundingDinoForObjectDetection with a 4-stage Swin of width 8, d_model 32, 10 queries."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )
    from transformers.models.grounding_dino.processing_grounding_dino import GroundingDinoProcessor

    tokenizer = tiny_bert_tokenizer()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}),
        tokenizer=tokenizer,
    )
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        d_model=32,
        num_queries=10,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(seed)
    return TinyModel(_eval(GroundingDinoForObjectDetection(config)), processor)


def tiny_sam(seed: int = 0) -> TinyModel:
    """SamModel with a 2-layer ViT on 32-px inputs (patch 4), hidden 16."""
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
    from transformers.models.sam.processing_sam import SamProcessor

    size = TINY_IMAGE_SIZE
    processor = SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": size},
            pad_size={"height": size, "width": size},
            mask_size={"longest_edge": size // 4},
            mask_pad_size={"height": size // 4, "width": size // 4},
        )
    )
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=16,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=32,
            image_size=size,
            patch_size=4,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=8,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=size, patch_size=4, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16,
            mlp_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=16,
        ),
    )
    torch.manual_seed(seed)
    return TinyModel(_eval(SamModel(config)), processor)


def tiny_clip(seed: int = 0, projection_dim: int = 12) -> TinyModel:
    """CLIPModel with 1-layer towers of width 16 and a `projection_dim`-wide joint space."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_clip_tokenizer()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
    )
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return TinyModel(_eval(CLIPModel(config)), processor)

