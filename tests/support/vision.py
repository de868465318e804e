"""Tiny random-weight vision-language (image-text-to-text) models, saved with their processors, and a synthetic image
dataset in TRL's vision format.

Each family keeps the text side of `support.families` (the same widths, byte-level BPE and turn format) and adds
its own vision tower, projector and image tokens. Images are SIZE px, PATCH px patches: 4 image tokens an image for
PaddleOCR-VL and Gemma 3 (after merging or pooling), 16 for LLaVA.

Qwen2-VL is not among them: transformers 5.25 builds (and `AutoProcessor` loads) its processor only with torchvision
installed, video processor and all (huggingface/transformers#48558), and the only torchvision wheel these machines
can install is a CUDA build that does not load beside the CPU torch. PaddleOCR-VL feeds its model Qwen2-VL's way
(flat patches, `image_grid_thw`, M-RoPE over `mm_token_type_ids`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.demo import write_dataset
from support.families import BY_NAME, TURNS_TEMPLATE, _common, build_tokenizer, corpus

SIZE = 56
PATCH = 14  # SIZE / PATCH = 4 patches a side
# head_dim 16: the temporal, height and width sections of its rotary half (8), as Qwen2-VL and PaddleOCR-VL split it
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH)
QUESTION = "What colour is the shape?"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


@dataclass(frozen=True)
class VisionFamily:
    name: str
    what: str
    config: Callable[[dict, dict], object]
    """(bos/eos/pad ids, this family's token ids by name) -> the model's transformers config."""
    tokens: dict[str, str]
    """Named special tokens; the names become tokenizer attributes, which the processors read."""
    placeholder: str
    """What the chat template writes for an image part (the processor expands it to the image tokens)."""
    processor: Callable[[object, str], object]
    """(tokenizer, chat template) -> the family's processor."""


def _gemma3(tokens, ids):
    from transformers import Gemma3Config, SiglipVisionConfig

    return Gemma3Config(
        text_config=BY_NAME["gemma3"].config(tokens),
        vision_config=SiglipVisionConfig(**TOWER, image_size=SIZE, vision_use_head=False),  # as Gemma 3's
        mm_tokens_per_image=4,  # the 4x4 patches pooled to 2x2
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )


def _gemma3_processor(tokenizer, template):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    images = Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})
    return Gemma3Processor(images, tokenizer, chat_template=template, image_seq_length=4)


def _llava(tokens, ids):
    from transformers import CLIPVisionConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**TOWER, image_size=SIZE, projection_dim=32),
        text_config=BY_NAME["llama"].config(tokens),
        image_token_index=ids["image_token"],
        image_seq_length=16,
        vision_feature_layer=-1,  # LLaVA's -2 would leave half of a 2-layer tower out of the graph
    )


def _llava_processor(tokenizer, template):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    # "default" drops CLIP's class token, which num_additional_image_tokens counts back
    return LlavaProcessor(
        images, tokenizer, patch_size=PATCH, vision_feature_select_strategy="default", chat_template=template,
        num_additional_image_tokens=1,
    )  # fmt: skip


def _paddleocr_vl(tokens, ids):
    from transformers import PaddleOCRVLConfig

    return PaddleOCRVLConfig(
        text_config=_common(tokens, head_dim=16, rope_parameters=MROPE, tie_word_embeddings=True),
        vision_config=dict(TOWER, image_size=SIZE),
        image_token_id=ids["image_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=True,
    )


def _paddleocr_vl_processor(tokenizer, template):
    from transformers import PaddleOCRVLImageProcessorPil, PaddleOCRVLProcessor

    images = PaddleOCRVLImageProcessorPil(size={"shortest_edge": SIZE * SIZE, "longest_edge": SIZE * SIZE})
    return PaddleOCRVLProcessor(images, tokenizer, chat_template=template)


VISION_FAMILIES = [
    VisionFamily(
        "gemma3",
        "Gemma 3: SigLIP, pooled soft tokens, bidirectional attention over an image (token_type_ids), tied",
        _gemma3,
        {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
        "<start_of_image>",
        _gemma3_processor,
    ),
    VisionFamily(
        "llava",
        "LLaVA-1.5: CLIP, a 2-layer MLP projector, a Llama decoder",
        _llava,
        {"image_token": "<image>"},
        "<image>",
        _llava_processor,
    ),
    VisionFamily(
        "paddleocr_vl",
        "PaddleOCR-VL: Qwen2-VL's inputs (flat patches, image_grid_thw, M-RoPE), a NaViT-style SigLIP, an ERNIE-4.5 "
        "decoder",
        _paddleocr_vl,
        {
            "vision_start_token": "<|IMAGE_START|>",
            "image_token": "<|IMAGE_PLACEHOLDER|>",
            "vision_end_token": "<|IMAGE_END|>",
        },
        "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>",
        _paddleocr_vl_processor,
    ),
]
VISION_BY_NAME = {f.name: f for f in VISION_FAMILIES}


def chat_template(placeholder: str) -> str:
    """TURNS_TEMPLATE, its content either a string or a list of image and text parts."""
    content = (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        f"{{% if p['type'] == 'image' %}}{placeholder}{{% elif p['type'] == 'text' %}}{{{{ p['text'] }}}}{{% endif %}}"
        "{% endfor %}{% endif %}"
    )
    assert "{{ m['content'] }}" in TURNS_TEMPLATE
    return TURNS_TEMPLATE.replace("{{ m['content'] }}", content, 1)


def write_shapes_dataset(root: Path, records: int, seed: int = 0, size: int = SIZE) -> Path:
    """`records` images of one filled square or circle in one of COLOURS on a grey background, each asked the same
    QUESTION and answered with the colour: `root/images/*.png` and `root/vision.jsonl`, which it returns."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / "vision.jsonl"
    with path.open("w") as f:
        for i in range(records):
            colour = rng.choice(sorted(COLOURS))
            grey = rng.randrange(40, 216)
            image = Image.new("RGB", (size, size), (grey, grey, grey))
            side = rng.randrange(size // 4, size // 2)
            x, y = rng.randrange(size - side), rng.randrange(size - side)
            draw = ImageDraw.Draw(image)
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((x, y, x + side - 1, y + side - 1), fill=COLOURS[colour])
            name = f"images/{i:05d}.png"
            image.save(root / name)
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": colour}]},
            ]
            f.write(json.dumps({"messages": messages, "images": [name]}) + "\n")
    return path


def build_vision_family(family: VisionFamily, root: Path, seed: int = 0, initializer_range: float = 0.0) -> Path:
    """Writes `root/base` (model, processor, tokenizer), `root/vision.jsonl` with its images and a text-only
    `root/data.jsonl`; returns `root`. `initializer_range` (the config's default where 0) sets the spread of the
    language model's random weights: a model meant to learn needs a wider one, as its frozen random output layer
    over a 64-wide normalized hidden state bounds every logit near 1 at the default 0.02."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    texts = corpus(write_dataset(root / "data.jsonl", records=64, words=30))
    write_shapes_dataset(root, records=64, seed=seed)
    texts += ["user", "assistant", QUESTION, *COLOURS]
    base = build_tokenizer(texts)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, **base.special_tokens_map, extra_special_tokens=family.tokens
    )
    tokenizer.chat_template = chat_template(family.placeholder)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in family.tokens.items()}
    config = family.config(
        {f"{t}_id": getattr(tokenizer, f"{t}_id") for t in ("bos_token", "eos_token", "pad_token")}, ids
    )
    text = config.get_text_config()
    text.vocab_size = max(text.vocab_size, len(tokenizer))  # the image tokens come after the BPE's VOCAB
    text.initializer_range = initializer_range or text.initializer_range
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.to(torch.bfloat16).save_pretrained(root / "base")
    family.processor(tokenizer, tokenizer.chat_template).save_pretrained(root / "base")
    # transformers picks the tokenizer class from the model type: whatever it picks must still give these ids.
    probe = f"{texts[0]} {QUESTION}{''.join(family.tokens.values())}"
    for reloaded in (
        AutoTokenizer.from_pretrained(root / "base"),
        AutoProcessor.from_pretrained(root / "base").tokenizer,
    ):
        same_ids = all(getattr(reloaded, f"{name}_id", None) == id_ for name, id_ in ids.items())
        if not same_ids or reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
            raise RuntimeError(f"{family.name}: {type(reloaded).__name__} tokenizes differently after from_pretrained")
    return root
