"""Throughput of the data pipeline's stages, in images per second, measured in one run.

    python benchmarks/data_throughput.py                      # tiny random models on the CPU
    python benchmarks/data_throughput.py --size real          # real-size random-weight models (needs a GPU)

Models are built from configs with random weights (nothing is downloaded): `tiny` uses the test
factory's models, `real` configs of the default checkpoints' sizes (BLIP-2 OPT-2.7b, Grounding DINO
base, SAM ViT-H, CLIP ViT-g/14) in fp16. Random weights cost what trained ones cost per image, except
for caption length (fixed here by `--caption-tokens`) and the number of boxes SAM decodes (fixed at
`--boxes` per image). Prints one line per stage and the share of the end-to-end time each takes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from mipadapter.data.backends.blip2 import Blip2Captioner
from mipadapter.data.backends.clip import ClipEmbedder
from mipadapter.data.backends.grounding_dino import GroundingDinoGrounder
from mipadapter.data.backends.sam import SamSegmenter


def synthetic_images(count: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    """Noise with a few flat rectangles: decodable, varied, the size of real photos if asked."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        for _ in range(3):
            x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
            pixels[y : y + height // 3, x : x + width // 3] = rng.integers(0, 255, 3)
        images.append(Image.fromarray(pixels))
    return images


def tiny_stages(device: torch.device, dtype: torch.dtype, caption_tokens: int):
    from mipadapter.testing import tiny_data_models as tiny

    def place(pair):
        return pair.model.to(device=device, dtype=dtype), pair.processor

    return (
        Blip2Captioner(*place(tiny.tiny_blip2()), max_new_tokens=caption_tokens),
        GroundingDinoGrounder(*place(tiny.tiny_grounding_dino()), box_threshold=0.0, text_threshold=0.0),
        SamSegmenter(*place(tiny.tiny_sam())),
        ClipEmbedder(*place(tiny.tiny_clip()), batch_size=64),
    )


def _big_gpt2_tokenizer(vocab_size: int):
    """A byte-level tokenizer whose vocabulary spans the model's, so random token ids decode."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2Tokenizer

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    for index in range(len(vocab), vocab_size - 1):
        vocab[f"<t{index}>"] = index
    return GPT2Tokenizer(
        vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def real_size_models():
    """Models of the default checkpoints' sizes with random weights, and processors with their real settings."""
    from transformers import (
        BertConfig,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        CLIPConfig,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        OPTConfig,
        SamConfig,
        SamModel,
        SamVisionConfig,
        SwinConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )
    from transformers.models.grounding_dino.processing_grounding_dino import GroundingDinoProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
    from transformers.models.sam.processing_sam import SamProcessor

    from mipadapter.testing.tiny_data_models import tiny_bert_tokenizer, tiny_clip_tokenizer

    opt_vocab = 50272
    gpt2 = _big_gpt2_tokenizer(opt_vocab)
    blip_processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 224, "width": 224}),
        tokenizer=gpt2,
        num_query_tokens=32,
    )
    blip = (
        lambda: Blip2ForConditionalGeneration(
            Blip2Config(
                vision_config=Blip2VisionConfig(
                    hidden_size=1408,
                    intermediate_size=6144,
                    num_hidden_layers=39,
                    num_attention_heads=16,
                    image_size=224,
                    patch_size=14,
                ),
                qformer_config=Blip2QFormerConfig(encoder_hidden_size=1408),
                text_config=OPTConfig(
                    vocab_size=opt_vocab,
                    hidden_size=2560,
                    num_hidden_layers=32,
                    num_attention_heads=32,
                    ffn_dim=10240,
                    word_embed_proj_dim=2560,
                    bos_token_id=1,
                    eos_token_id=1,
                    pad_token_id=0,
                ),
                num_query_tokens=32,
                image_token_index=gpt2.convert_tokens_to_ids("<image>"),
            )
        ),
        blip_processor,
    )
    dino = (
        lambda: GroundingDinoForObjectDetection(
            GroundingDinoConfig(
                backbone_config=SwinConfig(
                    embed_dim=128,
                    depths=[2, 2, 18, 2],
                    num_heads=[4, 8, 16, 32],
                    window_size=12,
                    image_size=384,
                    out_features=["stage2", "stage3", "stage4"],
                ),
                text_config=BertConfig(),
            )
        ),
        GroundingDinoProcessor(
            image_processor=GroundingDinoImageProcessorPil(), tokenizer=tiny_bert_tokenizer()
        ),
    )
    sam = (
        lambda: SamModel(
            SamConfig(
                vision_config=SamVisionConfig(
                    hidden_size=1280,
                    num_hidden_layers=32,
                    num_attention_heads=16,
                    global_attn_indexes=[7, 15, 23, 31],
                )
            )
        ),
        SamProcessor(image_processor=SamImageProcessorPil()),
    )
    clip = (
        lambda: CLIPModel(
            CLIPConfig(
                text_config=CLIPTextConfig(
                    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
                ),
                vision_config=CLIPVisionConfig(
                    hidden_size=1408,
                    intermediate_size=6144,
                    num_hidden_layers=40,
                    num_attention_heads=16,
                    patch_size=14,
                    image_size=224,
                ),
                projection_dim=1024,
            )
        ),
        CLIPProcessor(
            image_processor=CLIPImageProcessorPil(
                size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
            ),
            tokenizer=tiny_clip_tokenizer(),
        ),
    )
    return {"blip2": blip, "dino": dino, "sam": sam, "clip": clip}


def real_stages(device: torch.device, dtype: torch.dtype, caption_tokens: int):
    models = real_size_models()

    def build(name):
        make, processor = models[name]
        with torch.device(device):  # allocate on the GPU directly: 4B parameters in fp32 on the CPU is slow
            model = make()
        return model.to(dtype=dtype).eval(), processor

    return (
        Blip2Captioner(*build("blip2"), max_new_tokens=caption_tokens),
        GroundingDinoGrounder(*build("dino"), box_threshold=0.0, text_threshold=0.0),
        SamSegmenter(*build("sam")),
        ClipEmbedder(*build("clip"), batch_size=64),
    )


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "real"), help="default: real on a GPU, tiny otherwise")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--boxes", type=int, default=2, help="boxes per image for SAM")
    parser.add_argument("--caption-tokens", type=int, default=20)
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or ("real" if device.type == "cuda" else "tiny")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    started = time.perf_counter()
    captioner, grounder, segmenter, embedder = (real_stages if size == "real" else tiny_stages)(
        device, dtype, args.caption_tokens
    )
    print(f"models: {size}, {dtype}, on {device} (built in {time.perf_counter() - started:.1f} s)")
    images = synthetic_images(args.images, args.width, args.height)
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    w, h = args.width, args.height
    boxes = torch.tensor([[w * 0.1, h * 0.1, w * 0.5, h * 0.6], [w * 0.4, h * 0.3, w * 0.9, h * 0.9]])[
        : args.boxes
    ]
    crops = [image.crop((0, 0, min(w, h), min(w, h))) for image in images] * args.boxes  # one crop per object
    stages = {
        "caption (BLIP-2)": lambda batch: captioner.caption(batch),
        "ground (Grounding DINO)": lambda batch: grounder.ground(batch, [["cat", "jacket"]] * len(batch)),
        "segment (SAM)": lambda batch: segmenter.segment(batch, [boxes] * len(batch)),
    }
    results = {}
    for name, run in stages.items():
        run(batches[0][:1])  # warm-up: kernels, allocator
        seconds = sum(timed(lambda b=b, run=run: run(b), device) for b in batches)
        results[name] = seconds
    embedder.embed_images(crops[:1])
    results[f"CLIP images ({args.boxes} crops per image)"] = timed(
        lambda: embedder.embed_images(crops), device
    )
    results[f"CLIP texts ({args.boxes} names per image)"] = timed(
        lambda: embedder.embed_texts([f"object {i}" for i in range(len(crops))]), device
    )
    total = sum(results.values())
    print(f"{args.images} images of {w}x{h}, batch {args.batch}")
    print(f"{'stage':<34}{'seconds':>9}{'images/s':>11}{'share':>8}")
    for name, seconds in results.items():
        print(f"{name:<34}{seconds:>9.3f}{args.images / seconds:>11.2f}{seconds / total:>8.1%}")
    print(f"{'all stages':<34}{total:>9.3f}{args.images / total:>11.2f}{1:>8.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
